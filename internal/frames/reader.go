package frames

import (
	"context"
	"fmt"
	"time"
)

// A Source reads bytes of a blob, typically with ranged GETs from a
// registry: ReadAt returns exactly bytes [off, off+n), or an error. It may
// be called concurrently.
type Source interface {
	ReadAt(ctx context.Context, off, n int64) ([]byte, error)
}

// A Reader reads spans of a blob from a Source with bounded retries: at
// most Attempts attempts (default 3), each bounded by AttemptTimeout
// (default 10 s) even when the source does not honour its context, with a
// pause between them that grows from 50 ms to 1 s.
type Reader struct {
	Source         Source
	Attempts       int
	AttemptTimeout time.Duration
	// OnFail, if set, is told of each failed attempt as it fails (its
	// number, from 1), and whether another attempt follows.
	OnFail func(s Span, attempt int, err error, again bool)
}

// Read reads s, retrying failed attempts until r.Attempts failed or ctx
// is done.
func (r *Reader) Read(ctx context.Context, s Span) ([]byte, error) {
	attempts := r.Attempts
	if attempts <= 0 {
		attempts = 3
	}
	pause := 50 * time.Millisecond
	for attempt := 1; ; attempt++ {
		b, err := r.attempt(ctx, s)
		if err == nil {
			return b, nil
		}
		again := attempt < attempts && ctx.Err() == nil
		if r.OnFail != nil {
			r.OnFail(s, attempt, err, again)
		}
		if !again {
			return nil, fmt.Errorf("read data blob bytes %d-%d: %d attempts: %w", s.Off, s.End()-1, attempt, err)
		}
		t := time.NewTimer(pause)
		select {
		case <-t.C:
		case <-ctx.Done():
			t.Stop()
			return nil, fmt.Errorf("read data blob bytes %d-%d: %d attempts: %w", s.Off, s.End()-1, attempt, err)
		}
		pause = min(2*pause, time.Second)
	}
}

// attempt makes one request, bounded by AttemptTimeout even when the
// source does not honour its context: a request that overstays is
// abandoned.
func (r *Reader) attempt(ctx context.Context, s Span) ([]byte, error) {
	timeout := r.AttemptTimeout
	if timeout <= 0 {
		timeout = 10 * time.Second
	}
	ctx, cancel := context.WithTimeout(ctx, timeout)
	defer cancel()
	type result struct {
		b   []byte
		err error
	}
	ch := make(chan result, 1)
	go func() {
		b, err := r.Source.ReadAt(ctx, s.Off, s.Len)
		ch <- result{b, err}
	}()
	select {
	case res := <-ch:
		if res.err == nil && int64(len(res.b)) != s.Len {
			res.err = fmt.Errorf("source returned %d bytes, want %d", len(res.b), s.Len)
		}
		return res.b, res.err
	case <-ctx.Done():
		return nil, ctx.Err()
	}
}
