# Shared by scripts/cross.sh and scripts/cross-test.sh: the Raspberry Pi targets and what building
# and emulating them needs (rustup targets, Debian cross compilers, qemu-user). As root the missing
# pieces are installed; otherwise they are named and the script stops.
# shellcheck shell=bash

# 64-bit Raspberry Pi OS (Pi 3, 4, 5, Zero 2 W) and 32-bit Raspberry Pi OS (Pi 2 and later).
# The 32-bit target needs ARMv7; the ARMv6 Pi 1 and Zero are not covered.
CROSS_TARGETS_ALL=(aarch64-unknown-linux-gnu armv7-unknown-linux-gnueabihf)

# Debian's name for a target's multiarch triple (cross gcc prefix and sysroot under /usr).
cross_gnu_triple() {
  case "$1" in
    aarch64-unknown-linux-gnu) echo aarch64-linux-gnu ;;
    armv7-unknown-linux-gnueabihf) echo arm-linux-gnueabihf ;;
    *) echo "error: unsupported target $1 (supported: ${CROSS_TARGETS_ALL[*]})" >&2; return 1 ;;
  esac
}

# The qemu-user emulator of a target.
cross_qemu() {
  case "$1" in
    aarch64-unknown-linux-gnu) echo qemu-aarch64 ;;
    armv7-unknown-linux-gnueabihf) echo qemu-arm ;;
    *) cross_gnu_triple "$1" ;;
  esac
}

# The Debian architecture of a target (for the .deb).
cross_deb_arch() {
  case "$1" in
    aarch64-unknown-linux-gnu) echo arm64 ;;
    armv7-unknown-linux-gnueabihf) echo armhf ;;
    *) cross_gnu_triple "$1" ;;
  esac
}

# cross_setup [--emulate] TARGET...: checks (and as root installs) the rustup targets and the cross
# gcc of each target, and with --emulate also qemu-user.
cross_setup() {
  local emulate=0
  if [ "${1:-}" = --emulate ]; then emulate=1; shift; fi
  local pkgs=() targets=() t gnu
  local installed
  installed=$(rustup target list --installed)
  for t in "$@"; do
    gnu=$(cross_gnu_triple "$t") || exit 1
    grep -qx "$t" <<<"$installed" || targets+=("$t")
    command -v "$gnu-gcc" >/dev/null 2>&1 || pkgs+=("gcc-$gnu" "libc6-dev-$(cross_deb_arch "$t")-cross")
    if [ "$emulate" = 1 ]; then
      command -v "$(cross_qemu "$t")" >/dev/null 2>&1 || pkgs+=(qemu-user)
    fi
  done
  if [ ${#targets[@]} -gt 0 ]; then
    echo "==> rustup target add ${targets[*]}"
    rustup target add "${targets[@]}"
  fi
  if [ ${#pkgs[@]} -gt 0 ]; then
    mapfile -t pkgs < <(printf '%s\n' "${pkgs[@]}" | sort -u)
    if [ "$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then
      echo "==> installing ${pkgs[*]} with apt-get"
      export DEBIAN_FRONTEND=noninteractive
      apt-get update -qq
      apt-get install -y -qq --no-install-recommends "${pkgs[@]}" >/dev/null
    else
      echo "error: missing Debian packages: ${pkgs[*]}" >&2
      echo "       run as root, or: sudo apt-get install ${pkgs[*]}" >&2
      exit 1
    fi
  fi
}
