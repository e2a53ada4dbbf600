#!/usr/bin/env bash
# The main job, end to end: build strata, start the embedded registry, build
# a small image and push it with a standard client (skopeo), then pull it back
# and show what the registry holds.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PATH:/usr/local/go/bin"

mkdir -p bin
go build -o bin/strata ./cmd/strata
work=$(mktemp -d /tmp/strata-demo.XXXXXX)
addr=127.0.0.1:${STRATA_DEMO_PORT:-5000}
cleanup() { [ -n "${regpid:-}" ] && kill "$regpid" 2>/dev/null; wait 2>/dev/null; rm -rf "$work"; }
trap cleanup EXIT

echo "== starting the registry on $addr (root $work/registry)" >&2
bin/strata registry serve --addr "$addr" --root "$work/registry" --log-level warn &
regpid=$!
for _ in $(seq 50); do curl -fsS "http://$addr/v2/" >/dev/null 2>&1 && break; sleep 0.1; done

echo "== building a busybox image with umoci" >&2
umoci init --layout "$work/oci" >/dev/null
umoci new --image "$work/oci:demo" >/dev/null
umoci unpack --image "$work/oci:demo" "$work/bundle" >/dev/null
mkdir -p "$work/bundle/rootfs/bin"
cp /bin/busybox "$work/bundle/rootfs/bin/busybox"
ln -s busybox "$work/bundle/rootfs/bin/sh"
echo "hello from a strata registry" > "$work/bundle/rootfs/hello.txt"
umoci repack --image "$work/oci:demo" "$work/bundle" >/dev/null
umoci config --image "$work/oci:demo" --config.cmd /bin/sh --config.env PATH=/bin >/dev/null

echo "== pushing with skopeo" >&2
skopeo copy -q --dest-tls-verify=false "oci:$work/oci:demo" "docker://$addr/demo/busybox:latest"
echo "== pulling it back with skopeo" >&2
skopeo copy -q --src-tls-verify=false "docker://$addr/demo/busybox:latest" "oci:$work/pulled:latest"

echo "== what the registry holds" >&2
curl -fsS "http://$addr/v2/_catalog"; echo
curl -fsS "http://$addr/v2/demo/busybox/tags/list"; echo
skopeo inspect --tls-verify=false "docker://$addr/demo/busybox:latest" | grep -E '"(Digest|Layers)"|sha256' | head -5
echo "== request counts (from /metrics)" >&2
curl -fsS "http://$addr/metrics" | grep '^strata_registry_requests_total' | sort
