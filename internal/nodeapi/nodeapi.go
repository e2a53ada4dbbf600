// Package nodeapi is the node daemon's wire API: the requests the CLI
// sends to the daemon that owns a node's layer mounts, the server that
// answers them for a Backend (a node.Manager), and the client, which starts
// the daemon on demand.
//
// The daemon listens on ROOT/strata.sock (HTTP with JSON bodies; errors as
// {"error": "…"}):
//
//	POST   /v1/pull          PullRequest     → node.Image
//	POST   /v1/leases        AcquireRequest  → node.Lease
//	DELETE /v1/leases/{id}                   → {}
//	GET    /v1/leases                        → []node.Lease
//	POST   /v1/unmount       UnmountRequest  → {}
//	GET    /v1/images                        → []node.Image
//	DELETE /v1/images?ref=REF                → {}
//	GET    /v1/downloads                     → []node.Download
//	GET    /v1/df                            → node.DFReport
//
// Its files under ROOT: strata.sock, daemon.pid, daemon.log (its output),
// daemon.lock (Lock) and daemon.start (the start lock).
//
// Starting on demand is race-free. One daemon at a time holds ROOT's
// daemon lock (Lock) for its whole life, from before it opens the node's
// state until after it removed its socket; a second one waits for it.
// Clients that find no daemon start one under ROOT's start lock, so one
// starts and the others wait for it and connect; a daemon does not go idle
// while a client holds that lock. A daemon that goes idle first refuses
// new requests (503, "the node daemon is exiting"), then removes its
// socket and answers every connection it had queued before it closes, so
// a request is either served by a daemon that stays up for it or never
// reached one. A client sends a request that reached none (refused, no
// socket, 503, or reset before an answer) again, to a daemon it starts
// anew if need be; it opens a connection per request.
package nodeapi

import (
	"path/filepath"
)

// PullRequest asks the daemon to pull an image.
type PullRequest struct {
	Ref string `json:"ref"`
	// PlainHTTP reaches the image's registry over plain HTTP (the user's
	// --plain-http), from now on for the daemon's life.
	PlainHTTP bool `json:"plainHTTP,omitempty"`
}

// AcquireRequest asks for a lease on an image's layers (see
// node.AcquireRequest).
type AcquireRequest struct {
	// ID names the lease: container:<id> or mount:<dir>.
	ID  string `json:"id"`
	Ref string `json:"ref"`
	// PlainHTTP: as PullRequest's.
	PlainHTTP bool `json:"plainHTTP,omitempty"`
	// Union, if set, is where a read-only union of the image is mounted.
	Union string `json:"union,omitempty"`
	// PID, if set, ends the lease when that process exits.
	PID int `json:"pid,omitempty"`
}

// UnmountRequest ends the union mount of `strata mount` at Dir.
type UnmountRequest struct {
	Dir string `json:"dir"`
}

// errorBody is the body of every failed request.
type errorBody struct {
	Error string `json:"error"`
}

// SocketPath is the daemon's socket under root.
func SocketPath(root string) string { return filepath.Join(root, "strata.sock") }

func lockPath(root string) string  { return filepath.Join(root, "daemon.lock") }
func startPath(root string) string { return filepath.Join(root, "daemon.start") }
func pidPath(root string) string   { return filepath.Join(root, "daemon.pid") }

// exiting is the error text of a request that reached a daemon going idle.
const exiting = "the node daemon is exiting"
