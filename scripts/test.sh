#!/usr/bin/env bash
# Runs strata's tests: unit tests, fuzz seed corpora, integration tests with
# real components (the OCI conformance suite, skopeo, FUSE, runc …).
# Privileged tests skip on a machine without root/FUSE unless
# STRATA_TEST_PRIVILEGED=1, when they fail instead (CI sets it).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/setup.sh
export PATH="$PATH:/usr/local/go/bin"
go vet ./...
(cd bench/stargz && go vet ./...) # the benchmark's stargz peer, a module of its own
go test -count=1 -timeout 30m ./... "$@"
