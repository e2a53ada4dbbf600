package snapshotter

import "github.com/strata-oci/strata/internal/remote"

// Hosts returns how the snapshotter reaches registries: as containerd does,
// from containerd's registry host configuration directory (config_path,
// usually /etc/containerd/certs.d), read with containerd's own parser
// (mirrors, server, capabilities, TLS settings, override_path), and
// loopback registries without a hosts.toml over plain HTTP (containerd
// falls back to HTTP for them too).
func Hosts(dir string) *remote.Hosts {
	return &remote.Hosts{Dir: dir, Config: func(r string) remote.Host {
		return remote.Host{PlainHTTP: remote.IsLoopback(r)}
	}}
}
