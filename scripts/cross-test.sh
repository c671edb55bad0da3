#!/usr/bin/env bash
# Tests the device side for the Raspberry Pi targets under emulation (qemu-user, the cargo runner
# set in .cargo/config.toml): quva-client's and quva-node's tests for each target, then the
# end-to-end test tests/device_targets.rs, in which an emulated aarch64 quva-node enrolls, joins
# and exchanges option 2 and 3 messages with host quva-node devices through Mosquitto, quva-ca and
# quva-bridge on loopback. Emulated timings say nothing about a Raspberry Pi's speed.
#
# Usage: scripts/cross-test.sh [TARGET...]   (default: aarch64 and armv7; the end-to-end test
#        runs when aarch64-unknown-linux-gnu is among them)
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
source scripts/cross-env.sh

targets=("$@")
[ ${#targets[@]} -gt 0 ] || targets=("${CROSS_TARGETS_ALL[@]}")
cross_setup --emulate "${targets[@]}"

for t in "${targets[@]}"; do
  echo "==> cargo test --target $t -p quva-client -p quva-node (under $(cross_qemu "$t"))"
  cargo test --locked --target "$t" -p quva-client -p quva-node
done

for t in "${targets[@]}"; do
  [ "$t" = aarch64-unknown-linux-gnu ] || continue
  gnu=$(cross_gnu_triple "$t")
  bin="$CARGO_TARGET_DIR/$t/debug/quva-node"   # built above for quva-node's command-line tests
  [ -x "$bin" ] || cargo build --locked --target "$t" -p quva-node
  wrapper="$CARGO_TARGET_DIR/$t/quva-node-emulated"
  printf '#!/bin/sh\nexec %s -L /usr/%s %s "$@"\n' "$(cross_qemu "$t")" "$gnu" "$bin" >"$wrapper"
  chmod +x "$wrapper"
  "$wrapper" --version >/dev/null
  echo "==> end-to-end: emulated $t quva-node against host devices"
  QUVA_DEVICE_NODE="$wrapper" cargo test --locked -p quva-tests --test device_targets -- --nocapture
done
