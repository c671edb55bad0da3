# Process handling for scripts/demo.sh: free loopback ports, background daemons with logs, commands
# with deadlines, and cleanup of everything started (on success, error and Ctrl-C alike).
#
# Every command runs in the background and the script waits for it in short sleeps: a hung
# command then fails its step after DEMO_TIMEOUT seconds, and Ctrl-C stops the script at once
# (bash defers traps while it waits for a foreground command that handles SIGINT itself).
# shellcheck shell=bash

DEMO_PIDS=()                      # every process started, killed on exit
DEMO_DAEMONS=()                   # the broker, the CA and the bridge
DEMO_DAEMON_NAMES=()
DEMO_TIMEOUT=${DEMO_TIMEOUT:-60}  # seconds any one command or wait may take

bold() { if [ -t 1 ]; then printf '\033[1m%s\033[0m\n' "$*"; else printf '%s\n' "$*"; fi; }

# step TITLE [LINE...]: a numbered header with a short explanation, for a person following along.
DEMO_STEP=0
step() {
  DEMO_STEP=$((DEMO_STEP + 1))
  echo
  bold "== $DEMO_STEP. $1"
  shift
  local line
  for line in "$@"; do echo "   $line"; done
}

alive() { kill -0 "$1" 2>/dev/null; }

# mine PID: whether PID is still a running child of this script (not a reused process ID).
mine() {
  local stat
  stat=$(cat "/proc/$1/stat" 2>/dev/null) || return 1
  stat=${stat##*) }
  set -- $stat
  [ "$2" = "$$" ] && [ "$1" != Z ]
}

# forget PID: drops a finished process from the list cleanup stops.
forget() {
  local keep=() pid
  for pid in "${DEMO_PIDS[@]}"; do [ "$pid" = "$1" ] || keep+=("$pid"); done
  DEMO_PIDS=("${keep[@]}")
}

# spawn NAME CMD...: starts CMD in the background, output in logs/NAME.out and logs/NAME.err;
# sets SPAWNED_PID.
spawn() {
  local name=$1
  shift
  "$@" </dev/null >"logs/$name.out" 2>"logs/$name.err" &
  SPAWNED_PID=$!
  DEMO_PIDS+=("$SPAWNED_PID")
}
# daemon NAME PID: marks a started process as one the demo cannot go on without.
daemon() {
  DEMO_DAEMON_NAMES+=("$1")
  DEMO_DAEMONS+=("$2")
}

# check_daemons: fails as soon as the broker, the CA or the bridge has stopped.
check_daemons() {
  local i
  for i in "${!DEMO_DAEMONS[@]}"; do
    alive "${DEMO_DAEMONS[$i]}" || fail "${DEMO_DAEMON_NAMES[$i]} stopped"
  done
}

# wait_exit PID WHAT: waits (at most DEMO_TIMEOUT) for PID to exit; returns its exit status.
wait_exit() {
  local pid=$1 what=$2 deadline=$((SECONDS + DEMO_TIMEOUT))
  while alive "$pid"; do
    [ $SECONDS -lt $deadline ] || fail "$what did not finish within ${DEMO_TIMEOUT}s"
    check_daemons
    sleep 0.1
  done
  local rc=0
  wait "$pid" || rc=$?
  forget "$pid"
  return $rc
}

# run_to OUT ERR CMD...: runs CMD to completion with stdout in OUT and stderr in ERR (appended);
# returns its exit status.
run_to() {
  local out=$1 err=$2
  shift 2
  "$@" </dev/null >>"$out" 2>>"$err" &
  local pid=$!
  DEMO_PIDS+=("$pid")
  wait_exit "$pid" "'$*'"
}

# show CMD...: prints the command as typed, runs it and prints its output indented.
show() {
  echo "  \$ $*"
  : >logs/last.txt
  local rc=0
  run_to logs/last.txt logs/last.txt "$@" || rc=$?
  sed 's/^/    /' logs/last.txt
  [ $rc -eq 0 ] || fail "'$*' exited with status $rc"
}

# quiet CMD...: prints the command as typed and runs it; prints its output only if it fails.
quiet() {
  echo "  \$ $*"
  : >logs/last.txt
  run_to logs/last.txt logs/last.txt "$@" || fail "'$*' failed: $(cat logs/last.txt)"
}

# fail MESSAGE: reports a failed step with the end of every log, and exits 1.
fail() {
  echo >&2
  # Ctrl-C reaches every process of the terminal's group: the daemons stop with it (the bridge
  # within its 5 s shutdown grace), and the step that was running fails. Say so instead of
  # reporting a failure.
  local pid running=0 deadline=$((SECONDS + 6))
  while :; do
    running=0
    for pid in "${DEMO_DAEMONS[@]}"; do alive "$pid" && running=$((running + 1)); done
    [ $running -gt 0 ] && [ $running -lt ${#DEMO_DAEMONS[@]} ] && [ $SECONDS -lt $deadline ] || break
    sleep 0.2
  done
  if [ ${#DEMO_DAEMONS[@]} -ge 3 ] && [ $running = 0 ]; then
    echo "demo interrupted: the broker, the CA and the bridge have stopped" >&2
    exit 130
  fi
  echo "demo FAILED: $*" >&2
  if [ -n "${DEMO_DIR:-}" ] && [ -d "$DEMO_DIR/logs" ]; then
    local f
    for f in "$DEMO_DIR"/logs/*; do
      [ -s "$f" ] || continue
      echo "--- last lines of logs/${f##*/} ---" >&2
      tail -n 15 "$f" >&2
    done
  fi
  exit 1
}

# free_port: a loopback port nobody listens on. The daemon binds it right after; the caller
# retries if another process took it in between.
free_port() {
  local p
  for _ in $(seq 1 100); do
    p=$((20000 + RANDOM % 40000))
    if ! (exec 3<>"/dev/tcp/127.0.0.1/$p") 2>/dev/null; then
      echo "$p"
      return 0
    fi
  done
  fail "no free loopback port found"
}

# wait_port PID PORT NAME: until something accepts on 127.0.0.1:PORT; returns 1 if PID exits first.
wait_port() {
  local pid=$1 port=$2 name=$3 deadline=$((SECONDS + DEMO_TIMEOUT))
  while [ $SECONDS -lt $deadline ]; do
    if (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null; then return 0; fi
    alive "$pid" || return 1
    sleep 0.1
  done
  fail "$name did not listen on 127.0.0.1:$port within ${DEMO_TIMEOUT}s"
}

# wait_for FILE TEXT WHAT [PID]: until FILE contains the fixed string TEXT; fails after
# DEMO_TIMEOUT, or as soon as PID (the process writing FILE) has exited without writing it.
wait_for() {
  local file=$1 text=$2 what=$3 pid=${4:-} deadline=$((SECONDS + DEMO_TIMEOUT))
  while [ $SECONDS -lt $deadline ]; do
    if grep -qF -- "$text" "$file" 2>/dev/null; then return 0; fi
    if [ -n "$pid" ] && ! alive "$pid"; then
      grep -qF -- "$text" "$file" 2>/dev/null && return 0
      fail "$what: the process exited without it"
    fi
    check_daemons
    sleep 0.1
  done
  fail "$what: not seen within ${DEMO_TIMEOUT}s"
}

# cleanup: the EXIT trap. Stops every process started (TERM, then KILL after 3 s) and removes the
# work directory unless DEMO_KEEP=1.
cleanup() {
  local rc=$?
  trap - EXIT
  trap '' INT TERM
  local pid live=()
  for pid in "${DEMO_PIDS[@]}"; do
    if mine "$pid"; then
      kill -TERM "$pid" 2>/dev/null || true
      live+=("$pid")
    fi
  done
  local deadline=$((SECONDS + 3))
  for pid in "${live[@]}"; do
    while mine "$pid" && [ $SECONDS -lt $deadline ]; do sleep 0.1; done
    if mine "$pid"; then kill -KILL "$pid" 2>/dev/null || true; fi
    wait "$pid" 2>/dev/null || true
  done
  if [ -n "${DEMO_DIR:-}" ] && [ -d "$DEMO_DIR" ]; then
    cd /
    if [ "${DEMO_KEEP:-0}" = 1 ]; then
      echo "kept $DEMO_DIR (configurations, key stores and logs in logs/)"
    else
      rm -rf "$DEMO_DIR"
    fi
  fi
  exit "$rc"
}
