#!/usr/bin/env bash
# Tests the device side for the Raspberry Pi targets under emulation (qemu-user, the cargo runner
# set in .cargo/config.toml): quva-client's tests and quva-node's unit and doc tests for each
# target, then the end-to-end test tests/device_targets.rs, in which an emulated aarch64
# quva-node enrolls, joins and exchanges option 2 and 3 messages with host quva-node devices
# through Mosquitto, quva-ca and quva-bridge on loopback. Emulated timings say nothing about a Raspberry Pi's speed.
# The device side is built optimized (what runs on a Pi; emulated tests run several times faster
# optimized) in the `device-test` profile: release code without debug info. Each target's test
# binaries and its quva-node binary come from one build of one package selection (another
# selection would resolve other features and compile the dependencies again). The host side of
# the end-to-end test uses the test build of scripts/test.sh.
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

# The package selection and profile of every device-side build below.
device_build=(--profile device-test --locked -p quva-client -p quva-node)

# quva-node's integration tests start programs as child processes: tests/cli.rs the quva-node
# binary, which an emulated test cannot do without binfmt_misc, and tests/apply_script.rs a host
# shell script. They run in the host pass of scripts/test.sh; the end-to-end test below runs the
# emulated binary instead (enroll, publish, subscribe, query and answer, status).
host_only='/(cli|apply_script)-[0-9a-f]+$'

for t in "${targets[@]}"; do
  qemu=$(cross_qemu "$t")
  gnu=$(cross_gnu_triple "$t")
  echo "==> building quva-client's and quva-node's tests for $t"
  # The executables cargo built: test harnesses (named <target>-<hash>), and quva-node itself
  # (built for the integration tests).
  executables=$(cargo test "${device_build[@]}" --target "$t" --tests --no-run --message-format=json-render-diagnostics |
    grep '"reason":"compiler-artifact"' | grep -v '"executable":null' |
    sed -E 's/.*"executable":"([^"]+)".*/\1/' || true)
  tests=$(grep -E -- '-[0-9a-f]{16}$' <<<"$executables" | grep -Ev "$host_only" || true)
  [ -n "$tests" ] || { echo "error: no test binaries were built for $t" >&2; exit 1; }
  while read -r exe; do
    echo "==> $(basename "$exe") (under $qemu)"
    "$qemu" -L "/usr/$gnu" "$exe"
  done <<<"$tests"
  echo "==> doc tests of quva-client and quva-node for $t (under $qemu)"
  cargo test "${device_build[@]}" --target "$t" --doc

  [ "$t" = aarch64-unknown-linux-gnu ] || continue
  bin=$(grep '/quva-node$' <<<"$executables" | head -n 1 || true)
  [ -n "$bin" ] || { echo "error: the quva-node binary for $t was not built" >&2; exit 1; }
  wrapper="$CARGO_TARGET_DIR/$t/quva-node-emulated"
  printf '#!/bin/sh\nexec %s -L /usr/%s %s "$@"\n' "$qemu" "$gnu" "$bin" >"$wrapper"
  chmod +x "$wrapper"
  "$wrapper" --version >/dev/null
  echo "==> end-to-end: emulated $t quva-node against host devices"
  # The same package selection as scripts/test.sh, so that the build is reused (another selection
  # resolves other features for RocksDB's build dependencies and compiles RocksDB again).
  cargo test --workspace --locked --all-targets --no-run
  QUVA_DEVICE_NODE="$wrapper" cargo test --workspace --locked --test device_targets -- --nocapture
done
