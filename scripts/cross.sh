#!/usr/bin/env bash
# Cross-builds quva-node (release) and quva-client for Raspberry Pi OS; with --deb also packages
# quva-node as a .deb per target (cargo-deb; systemd unit and settings from packaging/).
# Installs, as root, what the build needs (rustup targets, Debian cross gcc; cargo-deb with --deb).
#
# Usage: scripts/cross.sh [--deb] [TARGET...]
#   TARGET: aarch64-unknown-linux-gnu (64-bit Raspberry Pi OS, Pi 3/4/5/Zero 2 W) and
#           armv7-unknown-linux-gnueabihf (32-bit Raspberry Pi OS, Pi 2 and later); default both.
# Binaries: $CARGO_TARGET_DIR/<TARGET>/release/quva-node; packages: $CARGO_TARGET_DIR/debian/.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh
source scripts/cross-env.sh

deb=0
targets=()
for arg in "$@"; do
  case "$arg" in
    --deb) deb=1 ;;
    -h | --help) sed -n '2,10p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    -*) echo "error: unknown option $arg (see --help)" >&2; exit 2 ;;
    *) cross_gnu_triple "$arg" >/dev/null; targets+=("$arg") ;;
  esac
done
[ ${#targets[@]} -gt 0 ] || targets=("${CROSS_TARGETS_ALL[@]}")

cross_setup "${targets[@]}"
if [ "$deb" = 1 ] && ! cargo deb --version >/dev/null 2>&1; then
  echo "==> cargo install cargo-deb --locked"
  cargo install cargo-deb --locked
fi

for t in "${targets[@]}"; do
  gnu=$(cross_gnu_triple "$t")
  # The device side must not pull in the CA's RocksDB (C++), dev-dependencies included.
  if cargo tree --locked -p quva-node -p quva-client --target "$t" -e normal,build,dev --prefix none \
    | grep -q '^librocksdb-sys '; then
    echo "error: quva-node or quva-client depends on RocksDB for $t" >&2
    exit 1
  fi
  echo "==> cargo build --release --target $t -p quva-node -p quva-client"
  cargo build --release --locked --target "$t" -p quva-node -p quva-client
  bin="$CARGO_TARGET_DIR/$t/release/quva-node"
  stripped=$(mktemp)
  "$gnu-strip" -o "$stripped" "$bin"
  printf '    %s: %s bytes, %s bytes stripped\n' "$bin" "$(stat -c %s "$bin")" "$(stat -c %s "$stripped")"
  rm -f "$stripped"
  if [ "$deb" = 1 ]; then
    echo "==> cargo deb --target $t -p quva-node"
    cargo deb --no-build --strip --target "$t" -p quva-node
  fi
done
