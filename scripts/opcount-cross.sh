#!/usr/bin/env bash
# Instruction counts per operation on the Raspberry Pi targets: examples/opcount.rs (the same
# program as scripts/opcount.sh) cross-built in release mode and run under qemu-user with a guest
# instruction counter (scripts/qemu-insncount.c). Counts are exact and repeatable; emulated time
# is not measured, as it says nothing about a Raspberry Pi.
# Usage: scripts/opcount-cross.sh [TARGET...]   (default: aarch64 and armv7)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
source scripts/cross-env.sh

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${CROSS_TARGETS_ALL[@]}")
cross_setup --emulate "${targets[@]}"

plugin="$CARGO_TARGET_DIR/qemu-insncount.so"
if [ ! -f "$plugin" ] || [ scripts/qemu-insncount.c -nt "$plugin" ]; then
  gcc -shared -fPIC -O2 -o "$plugin" scripts/qemu-insncount.c
fi

ops=(sign verify batch8 batch64 batch256 batch64-one-key libsecp-ecdsa-verify libsecp-bip340-verify)
for t in "${targets[@]}"; do
  gnu=$(cross_gnu_triple "$t")
  qemu=$(cross_qemu "$t")
  cargo build -q --release --locked --target "$t" -p quva-client --example opcount
  bin="$CARGO_TARGET_DIR/$t/release/examples/opcount"
  count() {
    "$qemu" -L "/usr/$gnu" -plugin "$plugin" "$bin" "$1" "$2" 2>&1 >/dev/null |
      awk '/^guest instructions:/ {print $3}'
  }
  echo "$t"
  printf '%-24s %16s\n' operation instructions/op
  for op in "${ops[@]}"; do
    n=20
    base=$(count "$op" 0)
    total=$(count "$op" "$n")
    printf '%-24s %16d\n' "$op" $(( (total - base) / n ))
  done
done
