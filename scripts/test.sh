#!/usr/bin/env bash
# Runs every Quva test: unit, property, vector, gRPC and end-to-end tests over real processes.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
echo "==> cargo test --workspace (build dir: $CARGO_TARGET_DIR)"
cargo test --workspace --locked --all-targets "$@"
cargo test --workspace --locked --doc
