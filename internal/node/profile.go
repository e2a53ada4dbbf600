package node

import (
	"cmp"
	"context"
	"encoding/json"
	"fmt"
	"log/slog"
	"maps"
	"os"
	"slices"
	"strings"
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
	fs.Prefetch(m.profileFrames(p, l.repo, l.digest, fs.Index().Data))
}

// profileFrames returns the frames of profile p to prefetch for the layer
// whose digest and data blob are layer and data, mounted from repo: none
// when a start-up pack holds its pages.
func (m *Manager) profileFrames(p *api.Profile, repo remote.Repository, layer, data digest.Digest) []int {
	if m.packFor(repo, data) != nil {
		return nil
	}
	return profileFrames(p, layer, data)
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
// their frames' first reads (seqs[i] for p.Layers[i]), and the PageRanks
// from those of their pages' (pageSeqs), and returns the number of frames.
func rankProfile(p *api.Profile, seqs, pageSeqs [][]uint64) int {
	ranks := rank(seqs)
	for l := range seqs {
		p.Layers[l].Ranks = ranks[l]
	}
	if pageSeqs != nil {
		ranks = rank(pageSeqs)
		for l := range pageSeqs {
			p.Layers[l].PageRanks = ranks[l]
		}
	}
	n := 0
	for _, s := range seqs {
		n += len(s)
	}
	return n
}

// rank returns the place of each of seqs' sequence numbers among all of
// them, 0 first.
func rank(seqs [][]uint64) [][]int {
	type read struct {
		seq      uint64
		layer, i int
	}
	var all []read
	out := make([][]int, len(seqs))
	for l, seq := range seqs {
		out[l] = make([]int, len(seq))
		for i, s := range seq {
			all = append(all, read{s, l, i})
		}
	}
	slices.SortFunc(all, func(a, b read) int { return cmp.Compare(a.seq, b.seq) })
	for r, rd := range all {
		out[rd.layer][rd.i] = r
	}
	return out
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
	var seqs, pageSeqs [][]uint64
	for _, l := range r.layers {
		fs := l.server.FS()
		rec := fs.StopRecording()
		if len(rec.Frames) == 0 {
			continue
		}
		ranges := make([][2]int64, len(rec.Frames))
		for i, k := range rec.Frames {
			fr := &fs.Index().Frames[k]
			ranges[i] = [2]int64{fr.COffset, fr.CSize}
		}
		p.Layers = append(p.Layers, api.ProfileLayer{
			Layer: l.digest, Data: fs.Index().Data, Frames: rec.Frames, Ranges: ranges, Pages: rec.Pages,
		})
		seqs = append(seqs, rec.Seq)
		pageSeqs = append(pageSeqs, rec.PageSeq)
		if m.log.Enabled(context.Background(), slog.LevelDebug) {
			m.log.Debug("start-up profile: layer", "layer", l.digest, "frames", len(rec.Frames), "read", readByFile(fs.Index(), rec.Pages))
		}
	}
	n := rankProfile(p, seqs, pageSeqs)
	if n == 0 {
		return
	}
	if b, err := json.Marshal(p); err != nil || len(b) > api.MaxProfileBytes {
		// Over what a registry takes: the frames without the pages.
		for i := range p.Layers {
			p.Layers[i].Pages, p.Layers[i].PageRanks = nil, nil
		}
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

// readByFile describes the bytes ranges of ix's stream hold: the total,
// then the files holding most of them.
func readByFile(ix *layerindex.Index, ranges [][2]int64) string {
	var regs []int
	for i := range ix.Entries {
		if ix.Entries[i].Type == layerindex.TypeReg && ix.Entries[i].Size > 0 {
			regs = append(regs, i)
		}
	}
	slices.SortFunc(regs, func(a, b int) int { return cmp.Compare(ix.Entries[a].Offset, ix.Entries[b].Offset) })
	per := map[int]int64{}
	var total int64
	for _, r := range ranges {
		total += r[1]
		j, _ := slices.BinarySearchFunc(regs, r[0], func(i int, off int64) int {
			e := &ix.Entries[i]
			switch {
			case e.Offset+e.Size <= off:
				return -1
			case e.Offset > off:
				return 1
			}
			return 0
		})
		for ; j < len(regs) && ix.Entries[regs[j]].Offset < r[0]+r[1]; j++ {
			e := &ix.Entries[regs[j]]
			per[regs[j]] += min(r[0]+r[1], e.Offset+e.Size) - max(r[0], e.Offset)
		}
	}
	files := slices.Collect(maps.Keys(per))
	slices.SortFunc(files, func(a, b int) int { return cmp.Compare(per[b], per[a]) })
	var sb strings.Builder
	fmt.Fprintf(&sb, "%d bytes in %d files", total, len(files))
	for _, i := range files[:min(len(files), 12)] {
		fmt.Fprintf(&sb, "; %s %d of %d", ix.Entries[i].Path, per[i], ix.Entries[i].Size)
	}
	return sb.String()
}
