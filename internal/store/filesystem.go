package store

import (
	"context"
	"errors"
	"io/fs"
	"os"
	"path"
	"path/filepath"
	"time"

	"github.com/strata-oci/strata/internal/atomicfile"
)

// Filesystem is the driver of a store in one directory of the local
// filesystem: a key is the file at that path below the root. Files are
// written in the root's tmp/ directory, fsynced and renamed into place,
// and each new directory (and the directory of each new file) is synced,
// so that what is visible is complete and lasts through a crash.
type Filesystem struct {
	root string
}

// NewFilesystem returns the driver of the directory root (Open makes the
// store's directories in it).
func NewFilesystem(root string) *Filesystem { return &Filesystem{root: root} }

var (
	_ Driver     = (*Filesystem)(nil)
	_ fileMover  = (*Filesystem)(nil)
	_ dirRemover = (*Filesystem)(nil)
)

func (d *Filesystem) path(key string) string {
	return filepath.Join(d.root, filepath.FromSlash(key))
}

func (d *Filesystem) tmpDir() string { return filepath.Join(d.root, "tmp") }

// Get implements Driver.
func (d *Filesystem) Get(ctx context.Context, key string) ([]byte, error) {
	return os.ReadFile(d.path(key))
}

// Put implements Driver: a temporary file, fsync, rename, sync of the
// directory.
func (d *Filesystem) Put(ctx context.Context, key string, b []byte) error {
	p := d.path(key)
	if err := atomicfile.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	f, err := os.CreateTemp(d.tmpDir(), "w-")
	if err != nil {
		return err
	}
	tmp := f.Name()
	if _, err := f.Write(b); err != nil {
		f.Close()
		os.Remove(tmp)
		return err
	}
	if err := f.Sync(); err != nil {
		f.Close()
		os.Remove(tmp)
		return err
	}
	if err := f.Close(); err != nil {
		os.Remove(tmp)
		return err
	}
	return d.rename(tmp, p)
}

// rename moves a finished temporary file into place and syncs the
// directory; the temporary file is removed if it cannot be.
func (d *Filesystem) rename(tmp, p string) error {
	if err := atomicfile.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		os.Remove(tmp)
		return err
	}
	if err := os.Rename(tmp, p); err != nil {
		os.Remove(tmp)
		return err
	}
	atomicfile.SyncDir(filepath.Dir(p))
	return nil
}

// Open implements Driver: an *os.File.
func (d *Filesystem) Open(ctx context.Context, key string) (Reader, error) {
	f, err := os.Open(d.path(key))
	if err != nil {
		return nil, err
	}
	return f, nil
}

// Stat implements Driver.
func (d *Filesystem) Stat(ctx context.Context, key string) (FileInfo, error) {
	fi, err := os.Stat(d.path(key))
	if err != nil {
		return FileInfo{}, err
	}
	return FileInfo{Key: key, Size: fi.Size(), ModTime: fi.ModTime(), Dir: fi.IsDir()}, nil
}

// List implements Driver. Only regular files and directories are listed.
func (d *Filesystem) List(ctx context.Context, prefix string, recursive bool) ([]FileInfo, error) {
	base := d.path(prefix)
	var out []FileInfo
	if !recursive {
		ents, err := os.ReadDir(base)
		if errors.Is(err, fs.ErrNotExist) {
			return nil, nil
		}
		if err != nil {
			return nil, err
		}
		for _, e := range ents {
			if !e.IsDir() && !e.Type().IsRegular() {
				continue
			}
			fi, err := e.Info()
			if err != nil {
				continue
			}
			out = append(out, FileInfo{Key: path.Join(prefix, e.Name()), Size: fi.Size(), ModTime: fi.ModTime(), Dir: e.IsDir()})
		}
		return out, nil
	}
	err := filepath.WalkDir(base, func(p string, e fs.DirEntry, err error) error {
		if err != nil || !e.Type().IsRegular() {
			return nil
		}
		fi, err := e.Info()
		if err != nil {
			return nil
		}
		rel, _ := filepath.Rel(base, p)
		out = append(out, FileInfo{Key: path.Join(prefix, filepath.ToSlash(rel)), Size: fi.Size(), ModTime: fi.ModTime()})
		return nil
	})
	return out, err
}

// Delete implements Driver.
func (d *Filesystem) Delete(ctx context.Context, key string) error {
	p := d.path(key)
	fi, err := os.Lstat(p)
	if err != nil {
		return err
	}
	if fi.IsDir() {
		return os.RemoveAll(p)
	}
	return os.Remove(p)
}

// RemoveDir removes directory key if it is empty.
func (d *Filesystem) RemoveDir(key string) error { return os.Remove(d.path(key)) }

// Move implements Driver: a rename, with the directory synced.
func (d *Filesystem) Move(ctx context.Context, from, to string) error {
	p := d.path(to)
	if err := atomicfile.MkdirAll(filepath.Dir(p), 0o755); err != nil {
		return err
	}
	if err := os.Rename(d.path(from), p); err != nil {
		return err
	}
	atomicfile.SyncDir(filepath.Dir(p))
	return nil
}

// MoveFile makes the local file at path (in the same filesystem) the
// content of key, by a rename; path is removed if it cannot be.
func (d *Filesystem) MoveFile(ctx context.Context, path, key string) error {
	return d.rename(path, d.path(key))
}

// Touch implements Driver.
func (d *Filesystem) Touch(ctx context.Context, key string) error {
	now := time.Now()
	return os.Chtimes(d.path(key), now, now)
}

// Create implements Driver: a temporary file in tmp/, renamed into place
// by Commit.
func (d *Filesystem) Create(ctx context.Context, key string) (Writer, error) {
	f, err := os.CreateTemp(d.tmpDir(), "blob-")
	if err != nil {
		return nil, err
	}
	return &fsWriter{d: d, f: f, key: key, temp: true}, nil
}

// Append implements Driver: the file itself, appended to.
func (d *Filesystem) Append(ctx context.Context, key string, create bool) (Writer, error) {
	p := d.path(key)
	flags := os.O_WRONLY
	if create {
		if err := os.MkdirAll(filepath.Dir(p), 0o755); err != nil {
			return nil, err
		}
		flags |= os.O_CREATE
	}
	f, err := os.OpenFile(p, flags, 0o644)
	if err != nil {
		return nil, err
	}
	fi, err := f.Stat()
	if err == nil {
		_, err = f.Seek(fi.Size(), 0)
	}
	if err != nil {
		f.Close()
		return nil, err
	}
	return &fsWriter{d: d, f: f, key: key, start: fi.Size(), size: fi.Size()}, nil
}

type fsWriter struct {
	d           *Filesystem
	f           *os.File
	key         string
	temp        bool // Create's: f is a temporary file, renamed by Commit
	start, size int64
}

func (w *fsWriter) Write(p []byte) (int, error) {
	n, err := w.f.Write(p)
	w.size += int64(n)
	return n, err
}

func (w *fsWriter) Size() int64 { return w.size }

func (w *fsWriter) Close() error {
	err := w.f.Close()
	if w.temp {
		os.Remove(w.f.Name())
	}
	return err
}

func (w *fsWriter) Cancel(ctx context.Context) error {
	if w.temp {
		return w.Close()
	}
	err := w.f.Truncate(w.start)
	if cerr := w.f.Close(); err == nil {
		err = cerr
	}
	return err
}

func (w *fsWriter) Commit(ctx context.Context) error {
	err := w.f.Sync()
	if cerr := w.f.Close(); err == nil {
		err = cerr
	}
	if !w.temp {
		return err
	}
	if err != nil {
		os.Remove(w.f.Name())
		return err
	}
	return w.d.rename(w.f.Name(), w.d.path(w.key))
}
