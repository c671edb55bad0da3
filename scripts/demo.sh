#!/usr/bin/env bash
# Sets up and runs Quva for a person to watch.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

echo "==> building (build dir: $CARGO_TARGET_DIR)"
cargo build --release --locked -p quva-client --example walkthrough
echo
echo "==> the protocol end to end in one process (real cryptography, no network):"
echo "    CA, enrollment, group join, options 1-3 both directions, a member leaves, rekey"
echo
"$CARGO_TARGET_DIR/release/examples/walkthrough"
