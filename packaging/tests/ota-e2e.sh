#!/usr/bin/env bash
# Group OTA end to end with real processes on loopback: Mosquitto, quva-ca, quva-bridge, a release
# signer (quva-node ota release, then quva-node run) and a device running `quva-node run` with an
# [ota] table whose apply command is packaging/bin/quva-node-apply-binary (installing into the
# work directory's bin/). Release v1 is fetched, verified and applied; release v2 is interrupted
# by kill -9 at about 30% and resumes after a restart without fetching the stored chunks again.
#
#   packaging/tests/ota-e2e.sh QUVA_NODE QUVA_CA QUVA_BRIDGE
#
# PROTECTED (default "plant/#") is the bridge's topics.protected: a bridge that does not yet
# accept OTA deposits on protected groups needs the OTA group fw/pi-node left unprotected
# (PROTECTED='"fw/#"' with one that does). Exits non-zero if an expected line is missing.
set -euo pipefail
NODE=$(realpath "${1:?quva-node binary}"); CA=$(realpath "${2:?quva-ca binary}")
BRIDGE=$(realpath "${3:?quva-bridge binary}")
APPLY=${APPLY:-$(realpath "$(dirname "$0")/../bin/quva-node-apply-binary")}
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)
W=$(mktemp -d "${TMPDIR:-/tmp}/quva-ota-e2e.XXXXXX"); cd "$W"; mkdir -p logs nodes bin
echo "work dir $W"
pids=()
cleanup() { for p in "${pids[@]}"; do kill "$p" 2>/dev/null || true; done; [ -n "${KEEP:-}" ] || rm -rf "$W"; }
trap cleanup EXIT
port() { python3 -c 'import socket; s=socket.socket(); s.bind(("127.0.0.1",0)); print(s.getsockname()[1])'; }
waitport() { for _ in $(seq 100); do (echo >/dev/tcp/127.0.0.1/$1) 2>/dev/null && return 0; sleep 0.1; done; echo "port $1 not up"; exit 1; }
waitfor() { for _ in $(seq ${3:-300}); do grep -q -- "$2" "$1" 2>/dev/null && return 0; sleep 0.1; done; echo "timeout waiting for '$2' in $1"; tail -20 "$1"; exit 1; }

BP=$(port); printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' $BP > mosquitto.conf
"$MOSQUITTO" -c mosquitto.conf >logs/mosquitto.log 2>&1 & pids+=($!); waitport $BP
$CA init --data ca >/dev/null
CP=$(port); $CA serve --data ca --listen 127.0.0.1:$CP --batch-window-ms 50 >logs/ca.log 2>&1 & pids+=($!); waitport $CP
export QUVA_CA_SERVER=http://127.0.0.1:$CP QUVA_CA_DATA=ca
QP=$(port)
cat > bridge.toml <<B
listen = "127.0.0.1:$QP"
[upstream]
address = "127.0.0.1:$BP"
[ca]
endpoint = "http://127.0.0.1:$CP"
public_key_file = "ca/ca.pub"
token_file = "ca/bridge.token"
[topics]
protected = [${PROTECTED:-\"plant/#\"}]
B
RUST_LOG=info $BRIDGE --config bridge.toml >logs/bridge.log 2>&1 & pids+=($!); waitport $QP
for id in release-1 pi-1; do
  $CA device add $id > logs/add-$id.txt
  sed -n 's/^enrollment secret (shown once): \([0-9a-f]*\)$/\1/p' logs/add-$id.txt > nodes/$id.secret
  printf 'broker = "127.0.0.1:%s"\nstore = "nodes/%s"\nconnect_timeout_secs = 5\n' $QP $id > nodes/$id.toml
done
cat >> nodes/pi-1.toml <<T
[ota]
groups = ["fw/pi-node"]
signers = ["release-1"]
apply_command = ["$APPLY"]
T
$CA group create fw/pi-node >/dev/null
$CA group allow fw/pi-node release-1 --role pub >/dev/null
$CA group allow fw/pi-node pi-1 --role sub >/dev/null
for id in release-1 pi-1; do $NODE --config nodes/$id.toml enroll --id $id --ca-key-file ca/ca.pub --secret-file nodes/$id.secret; done
echo "== device: quva-node run"
QUVA_APPLY_TARGET=$W/bin/quva-node QUVA_APPLY_RESTART=none RUST_LOG=quva_node=info \
  $NODE --config nodes/pi-1.toml run >logs/pi-1.out 2>logs/pi-1.err & DEV=$!; pids+=($DEV)
waitfor logs/pi-1.err "joined" 300
if [ -n "${IMAGE_SRC:-}" ]; then cp "$IMAGE_SRC" image-1.bin; else
  { printf '#!/bin/sh\necho "quva-node 0.2.0-ota"\nexit 0\n'; head -c ${IMAGE_BYTES:-3000000} /dev/urandom | base64; } > image-1.bin; fi
echo "== signer: ota release v1 ($(stat -c %s image-1.bin) bytes)"
$NODE --config nodes/release-1.toml ota release --group fw/pi-node --version 1 --name quva-node-1 image-1.bin | tail -3
waitfor logs/pi-1.out "v1: applied" 600
cat logs/pi-1.out
cmp image-1.bin bin/quva-node && echo "installed image == released image v1"
echo "== signer: ota status"
$NODE --config nodes/release-1.toml ota status --group fw/pi-node --wait 3 || true

echo "== signer: quva-node run (serves the releases, collects the status reports)"
RUST_LOG=quva_node=info $NODE --config nodes/release-1.toml run >logs/release-1.out 2>logs/release-1.err & pids+=($!)
waitfor logs/release-1.err "joined" 300
{ printf '#!/bin/sh\necho "quva-node 0.3.0-ota"\nexit 0\n'; head -c ${IMAGE2_BYTES:-24000000} /dev/urandom | base64; } > image-2.bin
echo "== signer: ota release v2 ($(stat -c %s image-2.bin) bytes)"
$NODE --config nodes/release-1.toml ota release --group fw/pi-node --version 2 --name quva-node-2 image-2.bin | tail -1
waitfor logs/pi-1.out "v2: .*(3[0-9]%)" 600
echo "== kill -9 the device at: $(grep 'v2: ' logs/pi-1.out | tail -1)"
kill -9 $DEV; sleep 1
QUVA_APPLY_TARGET=$W/bin/quva-node QUVA_APPLY_RESTART=none RUST_LOG=quva_node=info \
  $NODE --config nodes/pi-1.toml run >logs/pi-1b.out 2>logs/pi-1b.err & DEV=$!; pids+=($DEV)
waitfor logs/pi-1b.out "v2: applied" 900
echo "== after the restart:"
cat logs/pi-1b.out
grep -o "resumed, .*" logs/pi-1b.err
cmp image-2.bin bin/quva-node && echo "installed image == released image v2"
echo "== the signer's daemon recorded:"
grep "status report" logs/release-1.err | sed 's/.*status report/status report/' | tail -12
