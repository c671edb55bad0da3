#!/usr/bin/env bash
# Runs a whole Quva deployment on this machine for a person to watch: Mosquitto, the CA, the bridge
# and four devices as real processes on free loopback ports, then messages of options 1-3, a query
# and its answer, and live rekeys (a subscriber joins, one is removed).
#
#   scripts/demo.sh            the networked demo (exits non-zero if any expected message is missing)
#   scripts/demo.sh --keep     the same, keeping the work directory (configs, key stores, logs)
#   scripts/demo.sh --offline  the protocol in one process, no network (client-lib/examples/walkthrough.rs)
set -euo pipefail
cd "$(dirname "$0")/.."

DEMO_KEEP=0
OFFLINE=0
for arg in "$@"; do
  case "$arg" in
    --keep) DEMO_KEEP=1 ;;
    --offline) OFFLINE=1 ;;
    -h | --help) sed -n '2,8p' "$0" | sed 's/^# \{0,1\}//'; exit 0 ;;
    *) echo "error: unknown argument $arg (try --help)" >&2; exit 2 ;;
  esac
done

source scripts/common.sh
source scripts/demo/lib.sh

if [ "$OFFLINE" = 1 ]; then
  echo "==> building the walkthrough (build dir: $CARGO_TARGET_DIR)"
  cargo build --locked -p quva-client --example walkthrough
  echo
  echo "==> the protocol end to end in one process (real cryptography, no network):"
  echo "    CA, enrollment, group join, options 1-3 both directions, a member leaves, rekey"
  echo
  exec "$CARGO_TARGET_DIR/debug/examples/walkthrough"
fi

echo "==> building the workspace as scripts/test.sh does, so the tests reuse it (build dir: $CARGO_TARGET_DIR)"
announce_first_build
cargo test --workspace --locked --all-targets --no-run
export PATH="$CARGO_TARGET_DIR/debug:$PATH"
MOSQUITTO=$(command -v mosquitto || echo /usr/sbin/mosquitto)

DEMO_DIR=$(mktemp -d "${TMPDIR:-/tmp}/quva-demo.XXXXXX")
trap cleanup EXIT
trap 'echo; echo "demo interrupted" >&2; exit 130' INT
trap 'exit 143' TERM
cd "$DEMO_DIR"
mkdir -p logs nodes
export RUST_LOG_STYLE=never NO_COLOR=1

GROUP=plant/line-1/temp

# ---------------------------------------------------------------------------------------------
step "Start Mosquitto, the stock MQTT 5 broker" \
  "Its own configuration and port; no system broker is used. Devices never talk to it directly."
for _ in 1 2 3 4 5; do
  BROKER_PORT=$(free_port)
  printf 'listener %s 127.0.0.1\nallow_anonymous true\npersistence false\n' "$BROKER_PORT" >mosquitto.conf
  spawn mosquitto "$MOSQUITTO" -c mosquitto.conf
  if wait_port "$SPAWNED_PID" "$BROKER_PORT" mosquitto; then
    daemon mosquitto "$SPAWNED_PID"
    break
  fi
  forget "$SPAWNED_PID"
  BROKER_PORT=""   # the port was taken in between: try another
done
[ -n "$BROKER_PORT" ] || fail "mosquitto did not start (see logs/mosquitto.err)"
sed 's/^/    /' mosquitto.conf
echo "  \$ mosquitto -c mosquitto.conf &        listening on 127.0.0.1:$BROKER_PORT"

# ---------------------------------------------------------------------------------------------
step "Create the CA and start it" \
  "quva-ca init makes the data directory: the CA key, the admin token and the bridge token." \
  "quva-ca serve keeps devices, groups and keys in RocksDB and serves gRPC."
show quva-ca init --data ca
for _ in 1 2 3; do
  CA_PORT=$(free_port)
  spawn quva-ca quva-ca serve --data ca --listen "127.0.0.1:$CA_PORT" --batch-window-ms 50
  if wait_port "$SPAWNED_PID" "$CA_PORT" quva-ca; then
    daemon quva-ca "$SPAWNED_PID"
    break
  fi
  forget "$SPAWNED_PID"
  CA_PORT=""   # the port was taken in between: try another
done
[ -n "$CA_PORT" ] || fail "quva-ca did not start (see logs/quva-ca.err)"
echo "  \$ quva-ca serve --data ca --listen 127.0.0.1:$CA_PORT --batch-window-ms 50 &"
export QUVA_CA_SERVER="http://127.0.0.1:$CA_PORT" QUVA_CA_DATA=ca
echo "  (admin commands below reach it through QUVA_CA_SERVER=$QUVA_CA_SERVER and QUVA_CA_DATA=ca)"

# ---------------------------------------------------------------------------------------------
step "Start the bridge in front of Mosquitto" \
  "Devices connect here. Topics under plant/ are protected: the bridge relays enrollment and" \
  "group-key requests to the CA and drops any PUBLISH whose signature, epoch or time is wrong."
for _ in 1 2 3; do
  BRIDGE_PORT=$(free_port)
  cat >bridge.toml <<EOF
listen = "127.0.0.1:$BRIDGE_PORT"
[upstream]
address = "127.0.0.1:$BROKER_PORT"
[ca]
endpoint = "http://127.0.0.1:$CA_PORT"
public_key_file = "ca/ca.pub"      # pinned: the bridge never takes Q_CA from the CA link
token_file = "ca/bridge.token"
[topics]
protected = ["plant/#"]
EOF
  spawn quva-bridge env RUST_LOG=info quva-bridge --config bridge.toml
  if wait_port "$SPAWNED_PID" "$BRIDGE_PORT" quva-bridge; then
    daemon quva-bridge "$SPAWNED_PID"
    break
  fi
  forget "$SPAWNED_PID"
  BRIDGE_PORT=""   # the port was taken in between: try another
done
[ -n "$BRIDGE_PORT" ] || fail "quva-bridge did not start (see logs/quva-bridge.err)"
sed 's/^/    /' bridge.toml
echo "  \$ quva-bridge --config bridge.toml &        listening on 127.0.0.1:$BRIDGE_PORT"

# ---------------------------------------------------------------------------------------------
step "Register the devices and the group" \
  "Each device gets a one-time enrollment secret; the group is an MQTT topic with its members."
# register ID: registers a device and keeps its secret in nodes/ID.secret (0600) for enrollment.
register() {
  local id=$1 secret
  echo "  \$ quva-ca device add $id"
  : >logs/last.txt
  run_to logs/last.txt logs/last.txt quva-ca device add "$id" || fail "quva-ca device add $id: $(cat logs/last.txt)"
  secret=$(sed -n 's/^enrollment secret (shown once): \([0-9a-f]*\)$/\1/p' logs/last.txt)
  [ -n "$secret" ] || fail "no enrollment secret in: $(cat logs/last.txt)"
  (umask 077 && printf '%s\n' "$secret" >"nodes/$id.secret")
  sed "s/$secret/${secret:0:8}… (saved in nodes\/$id.secret)/; s/^/    /" logs/last.txt
}
for id in sensor-01 display-01 display-02; do register "$id"; done
quiet quva-ca group create "$GROUP"
quiet quva-ca group allow "$GROUP" sensor-01 --role pub
quiet quva-ca group allow "$GROUP" display-01 --role sub
quiet quva-ca group allow "$GROUP" display-02 --role sub
show quva-ca group show "$GROUP"

# ---------------------------------------------------------------------------------------------
step "Enroll the devices through the bridge" \
  "Each device proves its secret inside MQTT CONNECT and gets an implicit certificate; its" \
  "private key is computed on the device and never leaves it. One config file per device:"
# node_config ID: nodes/ID.toml with the bridge address and the device's key store.
node_config() {
  printf 'broker = "127.0.0.1:%s"\nstore = "nodes/%s"\nconnect_timeout_secs = 5\n' "$BRIDGE_PORT" "$1" >"nodes/$1.toml"
}
enroll() {
  node_config "$1"
  show quva-node --config "nodes/$1.toml" enroll --id "$1" --ca-key-file ca/ca.pub --secret-file "nodes/$1.secret"
}
node_config sensor-01
sed 's/^/    /' nodes/sensor-01.toml
for id in sensor-01 display-01 display-02; do enroll "$id"; done

# ---------------------------------------------------------------------------------------------
# subscribe ID: starts `quva-node subscribe` for the group in the background; waits until joined.
declare -A SUB_PID
subscribe() {
  local id=$1
  spawn "$id" env RUST_LOG=quva_node=debug quva-node --config "nodes/$id.toml" subscribe --group "$GROUP"
  SUB_PID[$id]=$SPAWNED_PID
  echo "  [$id] \$ quva-node --config nodes/$id.toml subscribe --group $GROUP &"
  wait_for "logs/$id.err" " joined" "$id joining $GROUP" "$SPAWNED_PID"
}
# expect ID TEXT: waits until subscriber ID printed a message containing TEXT, and shows it.
expect() {
  local id=$1 text=$2
  wait_for "logs/$id.out" "$text" "$id receiving \"$text\"" "${SUB_PID[$id]}"
  grep -F -- "$text" "logs/$id.out" | tail -n 1 | sed "s/^/    $id | /"
}
# publish OPTION TEXT: one message from sensor-01.
publish() {
  echo "  [sensor-01] \$ quva-node --config nodes/sensor-01.toml publish --group $GROUP --option $1 \"$2\""
  run_to logs/sensor-01-publish.out logs/sensor-01-publish.err \
    quva-node --config nodes/sensor-01.toml publish --group "$GROUP" --option "$1" "$2" ||
    fail "publishing \"$2\" failed: $(tail -n 3 logs/sensor-01-publish.err)"
}
# epoch VAR: sets VAR to the group's current epoch, from the CA.
epoch() {
  : >logs/group.json
  run_to logs/group.json logs/admin.err quva-ca group show "$GROUP" --json || fail "quva-ca group show failed"
  local e
  e=$(sed -n 's/^ *"epoch": \([0-9]*\),*$/\1/p' logs/group.json)
  [ -n "$e" ] || fail "no epoch in $(cat logs/group.json)"
  printf -v "$1" '%s' "$e"
}
# wait_rekey ID EPOCH: until subscriber ID has followed the rekey notice to EPOCH.
wait_rekey() {
  wait_for "logs/$1.err" "rekeyed group=$GROUP role=Subscriber epoch=$2" "$1 following the rekey to epoch $2" "${SUB_PID[$1]}"
  echo "    $1 | rekeyed to epoch $2"
}

step "Two subscribers join the group" \
  "Joining = SUBSCRIBE with a key request; the bridge returns the group key encrypted to the" \
  "device. The second join starts a new epoch, which the first subscriber follows."
subscribe display-01
subscribe display-02
epoch E
wait_rekey display-01 "$E"
echo "  group $GROUP is at epoch $E"

# ---------------------------------------------------------------------------------------------
step "Option 1: authenticated" \
  "Signed by the publisher; the bridge verifies the signature before the broker sees it."
publish 1 "21.1 C (option 1)"
expect display-01 "21.1 C (option 1)"
expect display-02 "21.1 C (option 1)"

step "Option 2: authenticated and confidential" \
  "Encrypted to the group's subscribers: the bridge and the broker carry ciphertext only."
publish 2 "21.2 C (option 2)"
expect display-01 "21.2 C (option 2)"
expect display-02 "21.2 C (option 2)"

step "Option 3: authenticated, confidential and anonymous" \
  "The sender's identity is inside the ciphertext: the bridge verifies a group signature, and" \
  "nothing in the payload names the publisher; only the subscribers learn who sent it."
publish 3 "21.3 C (option 3)"
expect display-01 "21.3 C (option 3)"
expect display-02 "21.3 C (option 3)"

# ---------------------------------------------------------------------------------------------
step "Query and answer" \
  "A subscriber asks the group's publishers; the publisher answers with the query's own option."
spawn sensor-01-answer quva-node --config nodes/sensor-01.toml -v answer --group "$GROUP" --reply "21.4 C (answer)" --count 3
ANSWER_PID=$SPAWNED_PID
echo "  [sensor-01] \$ quva-node --config nodes/sensor-01.toml answer --group $GROUP --reply \"21.4 C (answer)\" --count 3 &"
wait_for logs/sensor-01-answer.err " joined" "sensor-01 joining to answer" "$ANSWER_PID"
n=0
for who_opt in display-01:1 display-02:2 display-01:3; do
  who=${who_opt%:*} opt=${who_opt#*:}
  n=$((n + 1))
  echo "  [$who] \$ quva-node --config nodes/$who.toml query --group $GROUP --option $opt --count 1 --wait 20s \"temperature? ($n)\""
  : >logs/query.out
  run_to logs/query.out "logs/$who-query.err" \
    quva-node --config "nodes/$who.toml" query --group "$GROUP" --option "$opt" --count 1 --wait 20s "temperature? ($n)" ||
    fail "query from $who failed: $(tail -n 3 "logs/$who-query.err")"
  [ -s logs/query.out ] || fail "query $n from $who (option $opt) got no answer"
  sed "s/^/    $who | /" logs/query.out
  wait_for logs/sensor-01-answer.out "temperature? ($n)" "sensor-01 answering query $n" "$ANSWER_PID"
  grep -F "temperature? ($n)" logs/sensor-01-answer.out | sed 's/^/    sensor-01 | /'
done
wait_exit "$ANSWER_PID" "the answering publisher" || fail "sensor-01 answer exited with an error"

# ---------------------------------------------------------------------------------------------
step "Live rekey: a third subscriber joins" \
  "The CA starts a new epoch; the running subscribers get the signed rekey notice through the" \
  "bridge and switch keys without reconnecting. Traffic keeps flowing to all three."
epoch E0
register display-03
quiet quva-ca group allow "$GROUP" display-03 --role sub
enroll display-03
subscribe display-03
epoch E1
[ "$E1" -gt "$E0" ] || fail "the epoch did not advance when display-03 joined ($E0 -> $E1)"
echo "  epoch $E0 -> $E1"
wait_rekey display-01 "$E1"
wait_rekey display-02 "$E1"
publish 2 "21.5 C (epoch $E1)"
for id in display-01 display-02 display-03; do expect "$id" "21.5 C (epoch $E1)"; done

# ---------------------------------------------------------------------------------------------
step "Live rekey: display-02 is removed from the group" \
  "The owner denies it; the CA rekeys, and only the remaining members get the new key." \
  "display-02 gets no key of the new epoch; the CA-signed member list tells it it was removed."
show quva-ca group deny "$GROUP" display-02 --role sub
deadline=$((SECONDS + DEMO_TIMEOUT))
while epoch E2 && [ "$E2" -le "$E1" ]; do
  [ $SECONDS -lt $deadline ] || fail "the epoch did not advance after the deny"
  sleep 0.1
done
echo "  epoch $E1 -> $E2"
wait_rekey display-01 "$E2"
wait_rekey display-03 "$E2"
publish 2 "21.6 C (epoch $E2)"
publish 3 "21.7 C (epoch $E2)"
for id in display-01 display-03; do
  expect "$id" "21.6 C (epoch $E2)"
  expect "$id" "21.7 C (epoch $E2)"
done
# The members have both messages; give display-02 a moment more, then check it has neither.
sleep 2
if grep -qF "(epoch $E2)" logs/display-02.out; then
  fail "display-02 received a message of epoch $E2 after it was removed"
fi
echo "    display-02 | (nothing: it holds no key of epoch $E2)"
if removed=$(grep -m1 "removed from $GROUP" logs/display-02.err); then
  echo "    display-02 | ${removed#*error: }"
fi

# ---------------------------------------------------------------------------------------------
step "What the CA recorded" "The group now, and the audit log's last entries."
show quva-ca group show "$GROUP"
show quva-ca audit --tail --limit 8

echo
bold "demo finished: every expected message arrived, and none reached the removed member."
[ "$DEMO_KEEP" = 1 ] || echo "(scripts/demo.sh --keep keeps the configurations, key stores and logs)"
