package store_test

import (
	"errors"
	"fmt"
	"os"
	"path/filepath"
	"strings"
	"testing"

	"github.com/strata-oci/strata/internal/store"
)

// TestLockRoot: a root is locked by one holder at a time; the second is
// told which process holds it and nothing of the root is touched.
func TestLockRoot(t *testing.T) {
	root := t.TempDir()
	unlock, err := store.LockRoot(root)
	if err != nil {
		t.Fatal(err)
	}
	if _, err := store.Open(root); err != nil {
		t.Fatal(err)
	}
	inProgress := filepath.Join(root, "tmp", "blob-in-progress")
	os.WriteFile(inProgress, []byte("x"), 0o600)
	_, err = store.LockRoot(root)
	if !errors.Is(err, store.ErrRootInUse) || !strings.Contains(err.Error(), fmt.Sprintf("process %d", os.Getpid())) {
		t.Fatalf("a second lock: %v, want ErrRootInUse naming this process", err)
	}
	if _, err := os.Stat(inProgress); err != nil {
		t.Errorf("the holder's temporary file is gone: %v", err)
	}
	unlock()
	unlock2, err := store.LockRoot(root)
	if err != nil {
		t.Fatalf("lock after unlock: %v", err)
	}
	unlock2()
}
