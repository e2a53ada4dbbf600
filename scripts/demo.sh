#!/usr/bin/env bash
# The main job, end to end: build strata, start the embedded registry, build
# a Debian+python3 image and push it with a standard client (skopeo), run a
# container from it lazily with `strata run`, and show what was fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PATH:/usr/local/go/bin"

mkdir -p bin
go build -o bin/strata ./cmd/strata
work=$(mktemp -d /tmp/strata-demo.XXXXXX)
addr=127.0.0.1:${STRATA_DEMO_PORT:-5000}
node="$work/node"
cleanup() {
  bin/strata --root "$node" rm -f demo >/dev/null 2>&1 || true
  [ -f "$node/daemon.pid" ] && kill "$(cat "$node/daemon.pid")" 2>/dev/null
  [ -n "${regpid:-}" ] && kill "$regpid" 2>/dev/null
  wait 2>/dev/null
  sleep 0.5
  rm -rf "$work"
}
trap cleanup EXIT

echo "== starting the registry on $addr" >&2
bin/strata registry serve --addr "$addr" --root "$work/registry" --log-level warn &
regpid=$!
for _ in $(seq 50); do curl -fsS "http://$addr/v2/" >/dev/null 2>&1 && break; sleep 0.1; done

echo "== building a Debian bookworm + python3 image (debootstrap; cached after the first run)" >&2
go run ./bench/mkimage -o "$work/oci" -cmd python3 python3
echo "== pushing it with skopeo; the registry expands the layer" >&2
skopeo copy -q --dest-tls-verify=false "oci:$work/oci:latest" "docker://$addr/demo/python:latest"

echo "== strata run (lazy: nothing is downloaded before the container starts)" >&2
start=$(date +%s%N)
bin/strata --root "$node" run --rm --plain-http "$addr/demo/python:latest" python3 -c 'print("hello from a lazily started container")'
end=$(date +%s%N)
echo "== strata run took $(( (end - start) / 1000000 )) ms, including the layer's expansion on first use" >&2

echo "== again, warm (layers cached on this node)" >&2
start=$(date +%s%N)
bin/strata --root "$node" run --rm --plain-http "$addr/demo/python:latest" python3 -c 'print("hello again")'
end=$(date +%s%N)
echo "== strata run took $(( (end - start) / 1000000 )) ms" >&2

echo "== what was fetched (strata df)" >&2
bin/strata --root "$node" df
layer=0
for s in $(skopeo inspect --raw --tls-verify=false "docker://$addr/demo/python:latest" | grep -o '"size":[0-9]*' | tail -n +2 | cut -d: -f2); do layer=$((layer + s)); done
served=$(curl -fsS "http://$addr/metrics" | awk '/^strata_registry_response_bytes_total\{route="blob"\}/ {printf "%d", $2}')
echo "== registry sent $served bytes of blobs for a $layer-byte image layer" >&2
