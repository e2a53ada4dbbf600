package unpack_test

import (
	"bytes"
	"context"
	"io/fs"
	"path/filepath"
	"testing"

	"github.com/strata-oci/strata/internal/unpack"
)

// FuzzLayer unpacks arbitrary blobs. Oracles beyond "no crash": nothing
// outside the layer directory changes, and the budgets hold. Each run
// costs milliseconds, so limit minimization:
//
//	go test -fuzz FuzzLayer -fuzzminimizetime 3s ./internal/unpack/
func FuzzLayer(f *testing.F) {
	seedEnv := env{base: "/fuzz/base", rel: "fuzz/base"}
	for _, tc := range hostileCases() {
		if tc.opts.MaxBytes == 0 && tc.opts.MaxEntries == 0 {
			f.Add(tc.blob(f, seedEnv))
		}
	}
	f.Add(tarOf(f, everyEntry(100)...))
	const maxBytes, maxEntries = 1 << 20, 64
	f.Fuzz(func(t *testing.T, blob []byte) {
		e := newEnv(t)
		e.guard(t)
		opts := unpack.Options{MaxBytes: maxBytes, MaxEntries: maxEntries}
		st, err := unpack.Layer(context.Background(), bytes.NewReader(blob), e.layer, opts)
		if err != nil {
			return
		}
		if st.Entries > maxEntries || st.Bytes > maxBytes || st.Size > maxBytes {
			t.Errorf("budget exceeded: %+v", st)
		}
		var total int64
		filepath.WalkDir(e.layer, func(p string, d fs.DirEntry, err error) error {
			if err != nil {
				return err
			}
			if d.Type().IsRegular() {
				if info, err := d.Info(); err == nil {
					total += info.Size()
				}
			}
			return nil
		})
		if total > maxBytes {
			t.Errorf("files total %d bytes, budget %d", total, maxBytes)
		}
	})
}
