#!/usr/bin/env bash
# Instruction counts per operation (valgrind callgrind): repeatable on any machine, unlike time.
# Usage: scripts/opcount.sh [op ...]   (default: every operation of examples/opcount.rs)
set -euo pipefail
cd "$(dirname "$0")/.."
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/quva/target}"
command -v valgrind >/dev/null || { echo "error: valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }
cargo build -q --release --locked -p quva-client --example opcount
bin="$CARGO_TARGET_DIR/release/examples/opcount"
ops=("$@")
[ ${#ops[@]} -gt 0 ] || ops=(sign verify batch8 batch64 batch256 batch64-one-key libsecp-ecdsa-verify libsecp-bip340-verify)
count() { valgrind --tool=callgrind --callgrind-out-file=/dev/null "$bin" "$1" "$2" 2>&1 | awk '/Collected/ {print $4}'; }
printf '%-24s %16s\n' operation instructions/op
for op in "${ops[@]}"; do
  n=20
  base=$(count "$op" 0)
  total=$(count "$op" "$n")
  printf '%-24s %16d\n' "$op" $(( (total - base) / n ))
done
