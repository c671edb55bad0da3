#!/usr/bin/env bash
# Quva against TLS 1.3 and plain MQTT on this machine (docs/benchmarks.md, "Quva against TLS and
# plain MQTT"): key-setup bytes, client CPU per key setup (time, and instructions with valgrind),
# publish-to-receive latency and throughput with 10-200 subscribers. Real Mosquitto, quva-ca and
# quva-bridge processes on loopback. Takes about 15 minutes; run it on an otherwise idle machine.
# Usage: scripts/bench.sh [quva-bench run options, e.g. --subscribers 10,50]
# Writes docs/bench/{results.md,results.json,instructions.tsv,*.png} (or --out DIR).
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
command -v valgrind >/dev/null || { echo "error: valgrind is not installed (apt-get install valgrind)" >&2; exit 1; }

out=docs/bench
args=("$@")
for ((i = 0; i < ${#args[@]}; i++)); do
  [ "${args[$i]}" = --out ] && out="${args[$((i + 1))]}"
done
[[ " $* " == *" --out "* ]] || set -- --out "$out" "$@"
mkdir -p "$out"

cargo build -q --release --locked -p quva-bench -p quva-ca -p quva-bridge -p quva-node
bin="$CARGO_TARGET_DIR/release/quva-bench"

# Client instructions per key setup: only the client's steps (functions client_step_*) are
# counted; (count(n) - count(0)) / n removes the warm-up run and the set-up.
count() {
  valgrind --tool=callgrind --callgrind-out-file=/dev/null --toggle-collect='*client_step_*' \
    "$bin" client-op "$1" "$2" 2>&1 | awk '/Collected/ {print $4}'
}
: >"$out/instructions.tsv"
for op in quva-setup quva-reconnect tls-server-only tls-mutual; do
  n=20
  base=$(count "$op" 0)
  total=$(count "$op" "$n")
  printf '%s\t%d\n' "$op" $(( (total - base) / n )) | tee -a "$out/instructions.tsv"
done

"$bin" run --instructions "$out/instructions.tsv" "$@"
