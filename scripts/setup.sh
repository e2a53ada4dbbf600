#!/usr/bin/env bash
# Installs what strata's demo and tests need on a fresh Debian machine:
# Debian packages (runc, skopeo, fuse3, umoci, busybox-static, containerd, …) and the Go
# modules. Idempotent; run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
export PATH="$PATH:/usr/local/go/bin"

pkgs=(runc skopeo fuse3 umoci busybox-static debootstrap curl ca-certificates tar containerd strace iproute2 e2fsprogs util-linux)
missing=()
for p in "${pkgs[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ "${#missing[@]}" -gt 0 ]; then
  if [ "$(id -u)" -ne 0 ]; then
    echo "setup: need root to install: ${missing[*]}" >&2
    exit 1
  fi
  echo "setup: installing ${missing[*]}" >&2
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

if ! command -v go >/dev/null; then
  echo "setup: Go is not installed (expected at /usr/local/go)" >&2
  exit 1
fi
go mod download
