package startup

import (
	"cmp"
	"context"
	"encoding/json"
	"errors"
	"fmt"
	"log/slog"
	"maps"
	"slices"
	"strings"
	"time"

	"github.com/opencontainers/go-digest"

	"github.com/strata-oci/strata/api"
	"github.com/strata-oci/strata/internal/layerfs"
	"github.com/strata-oci/strata/internal/remote"
	"github.com/strata-oci/strata/layerindex"
)

// A Target is the image a recording is for: its reference, and its
// manifest in its repository, where the profile is stored.
type Target struct {
	Ref      string
	Repo     remote.Repository
	Manifest digest.Digest
	// Referrers: the registry has no profile route; the profile is
	// stored as a profile artifact referring to the manifest
	// (Options.PushReferrer).
	Referrers bool
}

// A Layer is a mounted lazy layer whose reads a recording lists.
type Layer struct {
	Digest digest.Digest
	FS     *layerfs.FS
}

// A recording records what the first container of an image reads while it
// starts, to store as the image's start-up profile.
type recording struct {
	target Target
	layers []Layer
	timer  *time.Timer
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

// Record starts recording the reads of layers, the lazy layers of the
// image of a start (lease id): Finish(id) stores them as the image's
// profile, at the latest Options.Window after now.
func (s *Profiles) Record(id string, t Target, layers []Layer) {
	r := &recording{target: t}
	for _, l := range layers {
		l.FS.StartRecording()
		r.layers = append(r.layers, l)
	}
	if len(r.layers) == 0 {
		return
	}
	s.mu.Lock()
	s.recordings[id] = r
	s.uploads.Add(1)
	r.timer = time.AfterFunc(s.opts.Window, func() { s.Finish(id) })
	s.mu.Unlock()
}

// Finish ends the recording of start id, if there is one, and stores what
// it read as the profile of its image.
func (s *Profiles) Finish(id string) {
	s.mu.Lock()
	r := s.recordings[id]
	delete(s.recordings, id)
	s.mu.Unlock()
	if r == nil {
		return
	}
	defer s.uploads.Done()
	r.timer.Stop()
	p := &api.Profile{Version: layerindex.Version}
	var seqs, pageSeqs [][]uint64
	for _, l := range r.layers {
		fs := l.FS
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
			Layer: l.Digest, Data: fs.Index().Data, Frames: rec.Frames, Ranges: ranges, Pages: rec.Pages,
		})
		seqs = append(seqs, rec.Seq)
		pageSeqs = append(pageSeqs, rec.PageSeq)
		if s.log.Enabled(context.Background(), slog.LevelDebug) {
			s.log.Debug("start-up profile: layer", "layer", l.Digest, "frames", len(rec.Frames), "read", readByFile(fs.Index(), rec.Pages))
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
	put := func() error { return s.client.PutProfile(ctx, r.target.Repo, r.target.Manifest, p) }
	if r.target.Referrers {
		// No registry makes a pack of the pages there: the frames only.
		for i := range p.Layers {
			p.Layers[i].Pages, p.Layers[i].PageRanks = nil, nil
		}
		put = func() error {
			if s.opts.PushReferrer == nil {
				return errors.New("the node does not push profile artifacts")
			}
			return s.opts.PushReferrer(ctx, r.target, p)
		}
	}
	if err := put(); err != nil {
		s.log.Info("start-up profile not stored", "ref", r.target.Ref, "err", err)
		return
	}
	s.log.Info("start-up profile stored", "ref", r.target.Ref, "layers", len(p.Layers), "frames", n)
	if s.opts.Stored != nil {
		s.opts.Stored(r.target, p)
	}
}

// Close ends every recording, storing what each read, and waits up to 5 s
// (or until ctx is done) for their profiles to be stored.
func (s *Profiles) Close(ctx context.Context) {
	s.mu.Lock()
	var ids []string
	for id := range s.recordings {
		ids = append(ids, id)
	}
	s.mu.Unlock()
	for _, id := range ids {
		go s.Finish(id)
	}
	uploaded := make(chan struct{})
	go func() { s.uploads.Wait(); close(uploaded) }()
	t := time.NewTimer(5 * time.Second)
	defer t.Stop()
	select {
	case <-uploaded:
	case <-t.C:
	case <-ctx.Done():
	}
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
