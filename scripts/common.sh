# Shared by scripts/test.sh and scripts/demo.sh: check (and as root, install) what Quva needs.
# shellcheck shell=bash

need_pkgs=()
command -v cargo >/dev/null 2>&1 || { echo "error: cargo is not installed; install the Rust toolchain (rustup) first" >&2; exit 1; }
dpkg -s libclang-dev >/dev/null 2>&1 || need_pkgs+=(libclang-dev)   # RocksDB's bindings (quva-ca)
command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ] || need_pkgs+=(mosquitto)  # the MQTT broker
# A clustered MQTT 5 broker for the scale-out test (tests/cluster.rs, docs/scale-out.md).
compgen -G '/usr/lib/*/ejabberd-*/ebin/mod_mqtt.beam' >/dev/null || need_pkgs+=(ejabberd)

if [ ${#need_pkgs[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
    echo "==> installing ${need_pkgs[*]} with apt-get"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends "${need_pkgs[@]}" >/dev/null
    # The Debian packages start system services (Mosquitto and ejabberd on port 1883) where
    # services may start; Quva's scripts and tests start their own on free ports.
  else
    echo "error: missing Debian packages: ${need_pkgs[*]}" >&2
    echo "       run as root, or: sudo apt-get install ${need_pkgs[*]}" >&2
    exit 1
  fi
fi
export PATH="$PATH:/usr/sbin"

# One build directory per machine, outside the checkout, so that a fresh clone reuses the compiled
# dependencies (RocksDB's C++ alone takes 13-16 minutes on 2 cores the first time).
export CARGO_TARGET_DIR="${CARGO_TARGET_DIR:-${XDG_CACHE_HOME:-$HOME/.cache}/quva/target}"
mkdir -p "$CARGO_TARGET_DIR"
# No incremental caches: they add gigabytes per build variant to the shared directory, and the
# scripts rebuild the workspace crates from scratch often enough that they rarely pay off.
export CARGO_INCREMENTAL="${CARGO_INCREMENTAL:-0}"

# Says so before a build that will compile RocksDB's C++ (quva-ca's store), the longest step of a
# first build, so that a new user knows why nothing seems to happen for a quarter of an hour.
announce_first_build() {
  if ! compgen -G "$CARGO_TARGET_DIR/debug/deps/liblibrocksdb_sys-*.rlib" >/dev/null; then
    echo "==> first build on this machine: compiling RocksDB's C++ for quva-ca, the longest step"
    echo "    (13-16 of the first build's 20-23 minutes on 2 cores, once per machine; later builds"
    echo "    reuse $CARGO_TARGET_DIR)"
  fi
}
