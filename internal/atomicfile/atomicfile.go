// Package atomicfile writes small files so that readers see the old
// content or the new, never a part: a temporary file in the same
// directory, fsync, rename, and a sync of the directory.
package atomicfile

import (
	"os"
	"path/filepath"
)

// Write replaces path with data atomically, creating its directory.
func Write(path string, data []byte) error { return write(path, data, true) }

// WriteUnsynced is Write without the syncs: readers never see a part of
// the file, but after a crash of the machine the file may be missing,
// empty or damaged. For files whose content is verified when read.
func WriteUnsynced(path string, data []byte) error { return write(path, data, false) }

func write(path string, data []byte, sync bool) error {
	dir := filepath.Dir(path)
	if err := os.MkdirAll(dir, 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(dir, ".tmp-")
	if err != nil {
		return err
	}
	if _, err = f.Write(data); err == nil && sync {
		err = f.Sync()
	}
	if cerr := f.Close(); err == nil {
		err = cerr
	}
	if err == nil {
		err = os.Rename(f.Name(), path)
	}
	if err != nil {
		os.Remove(f.Name())
		return err
	}
	if !sync {
		return nil
	}
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
	return nil
}
