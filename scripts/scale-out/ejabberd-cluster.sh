#!/usr/bin/env bash
# Starts two clustered ejabberd nodes (Debian's ejabberd 23.01, mod_mqtt as the MQTT 5 broker) on
# loopback for Quva's scale-out probe: ej1 on 127.0.0.2:PORT1, ej2 on 127.0.0.3:PORT2, joined over
# Erlang distribution, with one MQTT account bridge@quva.test (password: $BRIDGE_PASSWORD).
#   scripts/scale-out/ejabberd-cluster.sh start DIR [PORT1 PORT2]
#   scripts/scale-out/ejabberd-cluster.sh stop DIR [1|2]      (no node: both)
#   scripts/scale-out/ejabberd-cluster.sh kill DIR 1|2         (SIGKILL one node, as a crash)
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
cmd=${1:?start|stop|kill}; dir=${2:?directory}
p1=${3:-18831}; p2=${4:-18832}
pw=${BRIDGE_PASSWORD:-quva-bridge-secret}
ctl() { # node-number args...
  local n=$1; shift
  ejabberdctl --config-dir "$dir/ej$n" --spool "$dir/ej$n/spool" --logs "$dir/ej$n/logs" \
    --node "ej$n@127.0.0.1" "$@"
}
case $cmd in
start)
  mkdir -p "$dir"
  for n in 1 2; do
    port=$([ $n = 1 ] && echo "$p1" || echo "$p2")
    mkdir -p "$dir/ej$n/spool" "$dir/ej$n/logs"
    sed -e "s/@PORT@/$port/" -e "s/@IP@/127.0.0.$((n + 1))/" "$here/ejabberd-node.yml.in" \
      > "$dir/ej$n/ejabberd.yml"
    # ejabberdctl reads this file after its arguments: it must not name /etc/ejabberd's config.
    printf 'ERL_OPTIONS="-env ERL_CRASH_DUMP_BYTES 0"\nEJABBERD_CONFIG_PATH=%s\n' \
      "$dir/ej$n/ejabberd.yml" > "$dir/ej$n/ejabberdctl.cfg"
    cp /etc/ejabberd/inetrc "$dir/ej$n/inetrc"
    chown -R ejabberd:ejabberd "$dir/ej$n" 2>/dev/null || true
    ctl $n start
  done
  for n in 1 2; do ctl $n started; done
  ctl 1 register bridge quva.test "$pw"
  ctl 2 join_cluster ej1@127.0.0.1
  ctl 2 started
  ctl 1 list_cluster
  ;;
stop)
  for n in ${3:-1 2}; do ctl "$n" stop || true; done
  for n in ${3:-1 2}; do ctl "$n" stopped || true; done
  ;;
kill)
  # The beam process of exactly this node (its command line names it).
  for p in /proc/[0-9]*; do
    if { tr '\0' ' ' < "$p/cmdline"; } 2>/dev/null | grep -q -- "-name ej${3:?node}@127.0.0.1 "; then
      kill -KILL "${p#/proc/}"
    fi
  done ;;
esac
