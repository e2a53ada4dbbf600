// Package atomicfile writes small files so that readers see the old
// content or the new, never a part: a temporary file in the same
// directory, fsync, rename, and a sync of the directory.
package atomicfile

import (
	"os"
	"path/filepath"
	"syscall"
)

// Write replaces path with data atomically, creating its directory.
func Write(path string, data []byte) error { return write(path, data, true) }

// WriteUnsynced is Write without the syncs: readers never see a part of
// the file, but after a crash of the machine the file may be missing,
// empty or damaged. For files whose content is verified when read.
func WriteUnsynced(path string, data []byte) error { return write(path, data, false) }

func write(path string, data []byte, sync bool) error {
	dir := filepath.Dir(path)
	mkdir := os.MkdirAll
	if sync {
		mkdir = MkdirAll
	}
	if err := mkdir(dir, 0o755); err != nil {
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
	SyncDir(dir)
	return nil
}

// SyncDir fsyncs directory dir, so that the entries made in it last
// through a crash. Errors are ignored: some filesystems cannot sync a
// directory, and there is nothing better to do then.
var SyncDir = func(dir string) {
	if d, err := os.Open(dir); err == nil {
		d.Sync()
		d.Close()
	}
}

// MkdirAll is os.MkdirAll that makes the directories it creates durable:
// after creating each one it syncs its parent, whose new entry it is
// (otherwise a crash can lose a directory, and every file renamed into it
// since, although each of those was synced).
func MkdirAll(dir string, perm os.FileMode) error {
	if fi, err := os.Stat(dir); err == nil {
		if !fi.IsDir() {
			return &os.PathError{Op: "mkdir", Path: dir, Err: syscall.ENOTDIR}
		}
		return nil
	}
	parent := filepath.Dir(dir)
	if parent != dir {
		if err := MkdirAll(parent, perm); err != nil {
			return err
		}
	}
	if err := os.Mkdir(dir, perm); err != nil {
		if os.IsExist(err) {
			return nil // made meanwhile by someone else, who syncs it
		}
		return err
	}
	SyncDir(parent)
	return nil
}
