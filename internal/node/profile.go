package node

import (
	"cmp"
	"context"
	"encoding/json"
	"os"
	"slices"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/atomicfile"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/layerindex"
)

// A profileRecording records what the first container of an image reads
// while it starts, to store as the image's start-up profile.
type profileRecording struct {
	img    *Image
	layers []*layer
	timer  *time.Timer
}

// prefetch starts fetching the frames of mounted layer l that profile p
// lists.
func (m *Manager) prefetch(l *layer, p *api.Profile) {
	if l.server == nil {
		return
	}
	fs := l.server.FS()
	if frames := profileFrames(p, l.digest, fs.Index().Data); len(frames) > 0 {
		fs.Prefetch(frames)
	}
}

// profileFrames returns the frames profile p lists for the layer whose
// digest and data blob are layer and data (nil p: none).
func profileFrames(p *api.Profile, layer, data digest.Digest) []int {
	if p == nil {
		return nil
	}
	for _, pl := range p.Layers {
		if pl.Layer == layer && pl.Data == data {
			return pl.Frames
		}
	}
	return nil
}

// rankProfile sets the Ranks of p's layers from the sequence numbers of
// their frames' first reads (seqs[i] for p.Layers[i]) and returns the
// number of frames.
func rankProfile(p *api.Profile, seqs [][]uint64) int {
	type read struct {
		seq      uint64
		layer, i int
	}
	var all []read
	for l, seq := range seqs {
		p.Layers[l].Ranks = make([]int, len(seq))
		for i, s := range seq {
			all = append(all, read{s, l, i})
		}
	}
	slices.SortFunc(all, func(a, b read) int { return cmp.Compare(a.seq, b.seq) })
	for rank, r := range all {
		p.Layers[r.layer].Ranks[r.i] = rank
	}
	return len(all)
}

// record starts recording the reads of the lazy layers of lease id's
// image; finishRecording stores them as its profile when the lease ends or
// Options.ProfileWindow has passed, whichever comes first.
func (m *Manager) record(id string, img *Image, layers []*layer) {
	r := &profileRecording{img: img}
	for _, l := range layers {
		if l.server != nil {
			l.server.FS().StartRecording()
			r.layers = append(r.layers, l)
		}
	}
	if len(r.layers) == 0 {
		return
	}
	window := m.opts.ProfileWindow
	if window <= 0 {
		window = 10 * time.Second
	}
	m.mu.Lock()
	m.recordings[id] = r
	m.uploads.Add(1)
	m.mu.Unlock()
	r.timer = time.AfterFunc(window, func() { m.finishRecording(id) })
}

func (m *Manager) finishRecording(id string) {
	m.mu.Lock()
	r := m.recordings[id]
	delete(m.recordings, id)
	m.mu.Unlock()
	if r == nil {
		return
	}
	defer m.uploads.Done()
	r.timer.Stop()
	p := &api.Profile{Version: layerindex.Version}
	var seqs [][]uint64
	for _, l := range r.layers {
		fs := l.server.FS()
		frames, seq := fs.StopRecording()
		if len(frames) == 0 {
			continue
		}
		ranges := make([][2]int64, len(frames))
		for i, k := range frames {
			fr := &fs.Index().Frames[k]
			ranges[i] = [2]int64{fr.COffset, fr.CSize}
		}
		p.Layers = append(p.Layers, api.ProfileLayer{Layer: l.digest, Data: fs.Index().Data, Frames: frames, Ranges: ranges})
		seqs = append(seqs, seq)
	}
	n := rankProfile(p, seqs)
	if n == 0 {
		return
	}
	ctx, cancel := context.WithTimeout(context.Background(), 30*time.Second)
	defer cancel()
	repo := remote.Repository{Registry: r.img.Registry, Name: r.img.Repo}
	if err := m.client.PutProfile(ctx, repo, r.img.Digest, p); err != nil {
		m.log.Info("start-up profile not stored", "ref", r.img.Ref, "err", err)
		return
	}
	m.log.Info("start-up profile stored", "ref", r.img.Ref, "layers", len(p.Layers), "frames", n)
	// The next container of the image on this node uses it too.
	path := imagePath(m.root, r.img.Ref)
	b, err := os.ReadFile(path)
	var img Image
	if err != nil || json.Unmarshal(b, &img) != nil || img.Digest != r.img.Digest {
		return
	}
	img.Profile, img.Unprofiled = p, false
	b, _ = json.MarshalIndent(&img, "", "  ")
	atomicfile.Write(path, b)
}
