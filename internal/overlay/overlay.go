// Package overlay plans and performs union mounts of layer directories.
//
// Plan is pure: it turns layer directories and a per-container upper/work
// directory into the data of one mount, which a unit test can check. Mount
// performs it in one Linux-specific place.
package overlay

import (
	"errors"
	"fmt"
	"strings"
)

// Spec describes a union: Lowers top layer first; Upper and Work empty for
// a read-only union.
type Spec struct {
	Lowers []string
	Upper  string
	Work   string
}

// Mount is a planned mount: what mount(2) or fsconfig(2) needs.
type Mount struct {
	// Type is "overlay", or "bind" for a read-only union of a single layer
	// (overlayfs needs two lowers without an upper).
	Type   string
	Source string
	// Lowers is the lowerdir list, top first (overlay only).
	Lowers []string
	// Options are the remaining key[=value] options, in order.
	Options  []string
	ReadOnly bool
	// NoSuid mounts with nosuid and nodev: setuid bits and device nodes
	// of the layers have no effect (for views of images, not containers'
	// root filesystems).
	NoSuid bool
}

// ErrInvalid reports an impossible spec.
var ErrInvalid = errors.New("invalid union")

// Plan returns the mount for s.
func Plan(s Spec) (Mount, error) {
	if len(s.Lowers) == 0 {
		return Mount{}, fmt.Errorf("%w: no layers", ErrInvalid)
	}
	if (s.Upper == "") != (s.Work == "") {
		return Mount{}, fmt.Errorf("%w: upper and work directories go together", ErrInvalid)
	}
	for _, l := range append(append([]string{}, s.Lowers...), s.Upper, s.Work) {
		// ':' separates lowers and ',' options in the legacy mount data;
		// the fsconfig path has neither problem, but one rule is simpler.
		if strings.ContainsAny(l, ":,\n") {
			return Mount{}, fmt.Errorf("%w: path %q contains ':' or ','", ErrInvalid, l)
		}
	}
	if s.Upper == "" && len(s.Lowers) == 1 {
		return Mount{Type: "bind", Source: s.Lowers[0], ReadOnly: true}, nil
	}
	m := Mount{Type: "overlay", Source: "overlay", Lowers: append([]string(nil), s.Lowers...)}
	if s.Upper != "" {
		m.Options = append(m.Options, "upperdir="+s.Upper, "workdir="+s.Work)
	} else {
		m.ReadOnly = true
	}
	// Layers are immutable and served by FUSE: skip the index and
	// redirect/metacopy features that need trusted xattrs on lowers, and
	// xino (FUSE lowers have their own inode space).
	m.Options = append(m.Options, "index=off", "redirect_dir=off", "metacopy=off")
	return m, nil
}

// Data returns the legacy mount(2) data string (lowerdir=a:b,upperdir=…).
// Long layer lists may exceed the page-size limit of mount(2); Mount uses
// fsconfig(2) instead, which has none.
func (m Mount) Data() string {
	opts := append([]string{"lowerdir=" + strings.Join(m.Lowers, ":")}, m.Options...)
	return strings.Join(opts, ",")
}
