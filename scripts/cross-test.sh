#!/usr/bin/env bash
# Tests the device side for the Raspberry Pi targets under emulation (qemu-user, the cargo runner
# set in .cargo/config.toml): quva-client's tests and quva-node's unit and doc tests for each
# target, then the end-to-end test tests/device_targets.rs, in which an emulated aarch64
# quva-node enrolls, joins and exchanges option 2 and 3 messages with host quva-node devices
# through Mosquitto, quva-ca and quva-bridge on loopback. Emulated timings say nothing about a Raspberry Pi's speed.
# The device side is built in release mode (what runs on a Pi; emulated tests run several times
# faster optimized); the host side of the end-to-end test uses the debug build of scripts/test.sh.
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
  echo "==> cargo test --target $t -p quva-client (under $(cross_qemu "$t"))"
  cargo test --release --locked --target "$t" -p quva-client
  # quva-node's tests/cli.rs starts the binary as a child process, which an emulated test cannot
  # do without binfmt_misc; the end-to-end test below runs that binary instead (enroll, publish,
  # subscribe, query and answer, status).
  echo "==> cargo test --target $t -p quva-node --lib --doc (under $(cross_qemu "$t"))"
  cargo test --release --locked --target "$t" -p quva-node --lib
  cargo test --release --locked --target "$t" -p quva-node --doc
done

for t in "${targets[@]}"; do
  [ "$t" = aarch64-unknown-linux-gnu ] || continue
  gnu=$(cross_gnu_triple "$t")
  cargo build --release --locked --target "$t" -p quva-node
  bin="$CARGO_TARGET_DIR/$t/release/quva-node"
  wrapper="$CARGO_TARGET_DIR/$t/quva-node-emulated"
  printf '#!/bin/sh\nexec %s -L /usr/%s %s "$@"\n' "$(cross_qemu "$t")" "$gnu" "$bin" >"$wrapper"
  chmod +x "$wrapper"
  "$wrapper" --version >/dev/null
  echo "==> end-to-end: emulated $t quva-node against host devices"
  # The same package selection as scripts/test.sh, so that the build is reused (another selection
  # resolves other features for RocksDB's build dependencies and compiles RocksDB again).
  cargo test --workspace --locked --all-targets --no-run
  QUVA_DEVICE_NODE="$wrapper" cargo test --workspace --locked --test device_targets -- --nocapture
done
