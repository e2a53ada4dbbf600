package snapshotter

import (
	"bufio"
	"bytes"
	"os"
	"path/filepath"
	"strings"

	"github.com/strata-oci/strata/internal/remote"
)

// Hosts reads what the snapshotter needs from containerd's registry host
// configuration: a directory (containerd's config_path, usually
// /etc/containerd/certs.d) holding <host[:port]>/hosts.toml or
// _default/hosts.toml. A registry is reached over plain HTTP when its
// hosts.toml names an http:// server or host, as containerd does; loopback
// registries always are (containerd falls back to HTTP for them too).
type Hosts struct {
	Dir string
}

// PlainHTTP reports whether registry is reached over plain HTTP.
func (h Hosts) PlainHTTP(registry string) bool {
	if remote.IsLoopback(registry) {
		return true
	}
	if h.Dir == "" {
		return false
	}
	for _, name := range []string{registry, "_default"} {
		b, err := os.ReadFile(filepath.Join(h.Dir, name, "hosts.toml"))
		if err == nil {
			return plainHTTPServer(b)
		}
	}
	return false
}

// plainHTTPServer reports whether a hosts.toml names an http:// endpoint,
// as `server = "http://…"` or a `[host."http://…"]` table. It reads only
// those lines: the rest of the file is containerd's business.
func plainHTTPServer(b []byte) bool {
	sc := bufio.NewScanner(bytes.NewReader(b))
	for sc.Scan() {
		line := strings.TrimSpace(sc.Text())
		if k, v, ok := strings.Cut(line, "="); ok && strings.TrimSpace(k) == "server" {
			if strings.HasPrefix(strings.Trim(strings.TrimSpace(v), `"'`), "http://") {
				return true
			}
			continue
		}
		if strings.HasPrefix(line, "[host.") {
			name := strings.Trim(strings.TrimSuffix(strings.TrimPrefix(line, "[host."), "]"), `"'`)
			if strings.HasPrefix(name, "http://") {
				return true
			}
		}
	}
	return false
}
