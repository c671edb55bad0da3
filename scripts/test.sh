#!/usr/bin/env bash
# Runs every Quva test: unit, property, vector, gRPC and end-to-end tests over real processes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
echo "==> cargo test --workspace (build dir: $CARGO_TARGET_DIR)"
announce_first_build
cargo test --workspace --locked --all-targets "$@"
cargo test --workspace --locked --doc
# The README's demo command reuses this build (one RocksDB C++ build per machine).
scripts/check-one-build.sh
# The device side for the Raspberry Pi targets, under qemu-user (docs/raspberry-pi.md); QUVA_CROSS=0
# skips it.
[ "${QUVA_CROSS:-1}" = 0 ] || scripts/cross-test.sh
