package store

import (
	"context"
	"io"
	"time"
)

// A Driver keeps the store's files: the blobs, links, records and upload
// sessions drawn in the package doc, each named by a key, its path below
// the root with slashes ("blobs/sha256/ab/ab12…",
// "repositories/library/debian/_manifests/tags/latest"). A key names a
// file; the names between its slashes are directories, which exist while
// a file below them does (and on a filesystem, until they are removed).
//
// The Store holds the rules (what is verified, what is linked, what is
// young for garbage collection); a Driver only moves bytes. Two exist: the
// filesystem (NewFilesystem, one directory, the layout above exactly as
// files) and S3-compatible object storage (NewS3, one object per file).
//
// Errors: a key that does not exist is fs.ErrNotExist (errors.Is); an
// error of the storage itself (a network failure, an object store answering
// 5xx, a throttled request) is wrapped with ErrUnavailable where the driver
// can tell, so that the registry answers 503 and the client retries.
type Driver interface {
	// Get returns the content of key.
	Get(ctx context.Context, key string) ([]byte, error)
	// Put replaces key with b atomically: readers see the old content or
	// b, never a part.
	Put(ctx context.Context, key string, b []byte) error
	// Open opens key for reading, sequentially and at any offset.
	Open(ctx context.Context, key string) (Reader, error)
	// Stat returns what key is: a file, with its size and modification
	// time, or a directory (a prefix of files) with the time it was last
	// changed at (a filesystem's directory time; for an object store, the
	// newest of the files below it).
	Stat(ctx context.Context, key string) (FileInfo, error)
	// List lists what is below the directory prefix: its files and
	// directories (one level), or with recursive every file below it at
	// any depth, in no particular order. A prefix with nothing below it
	// lists nothing.
	List(ctx context.Context, prefix string, recursive bool) ([]FileInfo, error)
	// Delete removes the file key, or the directory key with everything
	// below it. Deleting what does not exist is fs.ErrNotExist.
	Delete(ctx context.Context, key string) error
	// Move makes file to hold the content of file from (replacing what
	// to held) and removes from.
	Move(ctx context.Context, from, to string) error
	// Touch sets the modification time of key to now (garbage
	// collection's "young"), where the storage can do that cheaply; the
	// S3 driver's does nothing (an object's time is when it was written).
	Touch(ctx context.Context, key string) error
	// Create returns a writer of a new content for key, which readers see
	// only after Commit, all at once. Close without Commit discards it.
	Create(ctx context.Context, key string) (Writer, error)
	// Append returns a writer that continues key's content: the bytes
	// written to it by earlier Append writers (of this process or of
	// another, before or after a restart), which Close kept. A key that
	// no writer created is fs.ErrNotExist unless create. The content is
	// readable (Open, Move) only after Commit. Upload sessions are made
	// of these.
	Append(ctx context.Context, key string, create bool) (Writer, error)
}

// A Reader reads a file from a driver: sequentially, at offsets (ranged
// blob GETs, expansion frames), or after a seek. Size is known without a
// read.
type Reader interface {
	io.ReadSeekCloser
	io.ReaderAt
}

// FileInfo describes a file or directory of a driver.
type FileInfo struct {
	Key     string // below the root, with slashes
	Size    int64
	ModTime time.Time
	Dir     bool
}

// A Writer writes a file of a driver (Create, Append).
type Writer interface {
	io.Writer
	// Size is the size of the content: the bytes of the writers before
	// this one (Append) and this one's.
	Size() int64
	// Close ends the writer. An Append writer keeps what it wrote for the
	// next; a Create writer not committed discards it.
	Close() error
	// Cancel ends the writer discarding what it wrote: an Append
	// writer's content is again what it was when the writer was opened.
	Cancel(ctx context.Context) error
	// Commit ends the writer making the content readable at its key.
	Commit(ctx context.Context) error
}

// A fileMover takes a local file as a key's content without copying it
// (the filesystem driver: a rename within one filesystem).
type fileMover interface {
	MoveFile(ctx context.Context, path, key string) error
}

// A dirRemover removes a directory that is empty (a filesystem's; an
// object store has none to remove).
type dirRemover interface {
	RemoveDir(key string) error
}

// A redirector gives a URL that serves key's content without the
// registry in between (an object store's presigned GET), or "" when it
// has none to give.
type redirector interface {
	URL(ctx context.Context, key string) (string, error)
}
