package atomicfile

import (
	"os"
	"path/filepath"
	"slices"
	"sync"
	"testing"
)

// recordSyncs makes SyncDir record the directories it syncs.
func recordSyncs(t *testing.T) func() []string {
	var mu sync.Mutex
	var synced []string
	old := SyncDir
	SyncDir = func(dir string) {
		mu.Lock()
		synced = append(synced, dir)
		mu.Unlock()
		old(dir)
	}
	t.Cleanup(func() { SyncDir = old })
	return func() []string {
		mu.Lock()
		defer mu.Unlock()
		return slices.Clone(synced)
	}
}

// TestWriteSyncsNewParents: a file written into directories that did not
// exist is durable only if each new directory's entry in its parent is
// synced too; before, only the file's own directory was.
func TestWriteSyncsNewParents(t *testing.T) {
	root := t.TempDir()
	synced := recordSyncs(t)
	p := filepath.Join(root, "a", "b", "c", "file")
	if err := Write(p, []byte("x")); err != nil {
		t.Fatal(err)
	}
	for _, dir := range []string{root, filepath.Join(root, "a"), filepath.Join(root, "a", "b"), filepath.Join(root, "a", "b", "c")} {
		if !slices.Contains(synced(), dir) {
			t.Errorf("%s not synced; synced %v", dir, synced())
		}
	}
	// Directories that exist already are not synced again.
	before := len(synced())
	if err := Write(filepath.Join(root, "a", "b", "c", "other"), []byte("y")); err != nil {
		t.Fatal(err)
	}
	if got := synced()[before:]; !slices.Equal(got, []string{filepath.Join(root, "a", "b", "c")}) {
		t.Errorf("second write synced %v, want only the file's directory", got)
	}
}

func TestMkdirAllNotADirectory(t *testing.T) {
	root := t.TempDir()
	f := filepath.Join(root, "f")
	os.WriteFile(f, nil, 0o644)
	if err := MkdirAll(filepath.Join(f, "x"), 0o755); err == nil {
		t.Fatal("MkdirAll under a file succeeded")
	}
	if err := MkdirAll(f, 0o755); err == nil {
		t.Fatal("MkdirAll of a file succeeded")
	}
}
