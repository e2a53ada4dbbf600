// Package api is the contract of strata's registry extension: the layer-mount
// routes, their JSON bodies and error codes. Registries serve it and nodes
// call it; both sides import this package and nothing else of strata's.
//
// Routes follow the distribution-spec extension naming (/v2/<name>/_<ext>/…):
//
//	GET  /v2/_strata/info                                 → 200 Info
//	POST /v2/<name>/_strata/layers/<layer-digest>/mount   → 200 MountDescriptor
//	                                                        202 + Retry-After while the layer expands
//	                                                        404 BLOB_UNKNOWN: the layer is not in <name>
//	                                                        422 EXPANSION_FAILED: the layer cannot be expanded
//	GET  /v2/<name>/_strata/layers/<layer-digest>/index   → 200 the index blob (zstd Content-Encoding
//	                                                        when accepted), Docker-Content-Digest its digest;
//	                                                        202, 404 and 422 as for mount
//	GET  /v2/<name>/_strata/profiles/<manifest-digest>    → 200 Profile; 404 PROFILE_UNKNOWN
//	PUT  /v2/<name>/_strata/profiles/<manifest-digest>    → 201: stores the image's start-up profile
//	                                                        (authorized as a push to <name>)
//
// The index and data blobs named by a MountDescriptor, and the pack blob of
// a Profile, are read, with Range, through the ordinary
// GET /v2/<name>/blobs/<digest>.
package api

import (
	"github.com/opencontainers/go-digest"
	ocispec "github.com/opencontainers/image-spec/specs-go/v1"
)

// Extension is the extension's name in routes (/_strata/).
const Extension = "strata"

// InfoPath is the path of the discovery endpoint.
const InfoPath = "/v2/_" + Extension + "/info"

// MountPath returns the path of the layer-mount request for layer in repo.
func MountPath(repo string, layer digest.Digest) string {
	return "/v2/" + repo + "/_" + Extension + "/layers/" + layer.String() + "/mount"
}

// IndexPath returns the path of the index of layer's expansion in repo:
// one request, where a mount request and a blob request of the index take
// two.
func IndexPath(repo string, layer digest.Digest) string {
	return "/v2/" + repo + "/_" + Extension + "/layers/" + layer.String() + "/index"
}

// Info is the body of GET /v2/_strata/info.
type Info struct {
	// Versions lists the expanded-layer format versions the registry serves.
	Versions []int `json:"versions"`
}

// MountDescriptor is the body of a successful layer-mount request.
type MountDescriptor struct {
	// Layer is the digest of the layer blob the expansion was made from.
	Layer digest.Digest `json:"layer"`
	// DiffID is the digest of the layer's uncompressed tar stream.
	DiffID digest.Digest `json:"diffID,omitempty"`
	// Version is the format version of the index.
	Version int `json:"version"`
	// Index is the expanded layer's index blob.
	Index ocispec.Descriptor `json:"index"`
	// Data is the expanded layer's packed data blob (zstd frames).
	Data ocispec.Descriptor `json:"data"`
}

// ProfilePath returns the path of the start-up profile of the image whose
// manifest is m in repo.
func ProfilePath(repo string, m digest.Digest) string {
	return "/v2/" + repo + "/_" + Extension + "/profiles/" + m.String()
}

// MaxProfileBytes bounds the JSON body of a profile.
const MaxProfileBytes = 4 << 20

// A Profile is what the containers of one image read while they start: for
// each layer, the frames of its expanded data blob, in the order first
// read. A node that starts the image prefetches them, all at once, as soon
// as the layers are mounted. The first node to start an image records one
// and stores it with PUT; it applies to that image in that repository.
type Profile struct {
	// Version is the format version of the indexes whose frames are listed.
	Version int            `json:"version"`
	Layers  []ProfileLayer `json:"layers"`
	// Pack is made by the registry when the layers list Pages (a Pack in
	// a PUT is ignored): exactly the pages the start reads, in the order
	// first read, compressed, in one blob of the repository.
	Pack *Pack `json:"pack,omitempty"`
	// Derived is set when the registry has no profile of the image asked
	// for and answers with the profile of another image of the
	// repository that shares the most of its layers (a previous version):
	// its frames and pack serve the shared layers; a node uses it and
	// records the image's own profile. Ignored in a PUT.
	Derived bool `json:"derived,omitempty"`
}

// A Pack holds the pages a profile lists: their bytes, from the layers'
// uncompressed streams, one span after the other in first-read order, cut
// into chunks of at most PackChunkSize bytes, each compressed alone as one
// zstd frame; the frames one after the other are the pack blob. A node
// fetches the blob in order and serves the reads the spans cover from it,
// verifying each chunk against its digest first.
type Pack struct {
	// Digest and Size are the pack blob's.
	Digest digest.Digest `json:"digest"`
	Size   int64         `json:"size"`
	// Spans are [layer, offset, length]: layer indexes Profile.Layers,
	// offset and length are in that layer's uncompressed stream.
	Spans [][3]int64 `json:"spans"`
	// Chunks are the chunks in order.
	Chunks []PackChunk `json:"chunks"`
}

// A PackChunk is one zstd frame of a pack blob.
type PackChunk struct {
	// Size is the compressed size, USize what it decompresses to.
	Size  int64 `json:"size"`
	USize int64 `json:"usize"`
	// Digest is the digest of the compressed bytes.
	Digest digest.Digest `json:"digest"`
}

// PackChunkSize bounds the uncompressed bytes of a pack chunk, and
// MaxPackBytes those of a pack: a registry leaves out the pages a profile
// lists past it, in first-read order (a node reads them from the frames).
const (
	PackChunkSize = 128 << 10
	MaxPackBytes  = 64 << 20
)

// ProfileLayer lists the frames read from one layer.
type ProfileLayer struct {
	// Layer is the layer blob's digest, Data its expansion's data blob.
	Layer digest.Digest `json:"layer"`
	Data  digest.Digest `json:"data"`
	// Frames are indexes into the index's frame table.
	Frames []int `json:"frames"`
	// Ranges, if present, are the byte ranges [offset, length] of those
	// frames in the data blob, in the same order, so a node can start
	// fetching them before it has the index (it verifies them once it
	// has).
	Ranges [][2]int64 `json:"ranges,omitempty"`
	// Ranks, if present, are the places of those frames, in the same
	// order, in the order the image's frames were first read across all
	// its layers (0 first), so a node can fetch the frames of every layer
	// in the order they will be needed.
	Ranks []int `json:"ranks,omitempty"`
	// Pages, if present, are the byte ranges [offset, length] of the
	// layer's uncompressed stream that the start read (each byte once),
	// and PageRanks their places in the order the image's ranges were
	// first read across all its layers (0 first). The registry makes
	// Profile.Pack of them and stores the profile without them.
	Pages     [][2]int64 `json:"pages,omitempty"`
	PageRanks []int      `json:"pageRanks,omitempty"`
}

// Error codes the extension adds to the distribution spec's table.
const (
	// CodeExpansionFailed: the layer cannot be expanded; the message names
	// the reason. The layer stays pullable the ordinary way.
	CodeExpansionFailed = "EXPANSION_FAILED"
	// CodeProfileUnknown: no start-up profile is stored for the image.
	CodeProfileUnknown = "PROFILE_UNKNOWN"
	// CodeProfileInvalid: a profile was refused; the message names why.
	CodeProfileInvalid = "PROFILE_INVALID"
)

// Annotation keys on the expansion artifact (the referrer of an image
// manifest that lists its expanded layers).
const (
	// AnnotationLayer names the source layer digest on an index or data
	// descriptor of the expansion artifact.
	AnnotationLayer = "dev.strata.layer"
	// AnnotationRole is "index" or "data" on the artifact's layer descriptors.
	AnnotationRole = "dev.strata.role"
)
