#!/usr/bin/env bash
# Checks that the README's two commands share one build: the cargo command that scripts/demo.sh
# builds with and the one scripts/test.sh tests with resolve the same librocksdb-sys artifact (the
# C++ build that takes most of a fresh machine's time). Both are no-ops once built, so this costs
# seconds. Exits non-zero, naming both artifacts, when a change to the scripts or to the features
# of a dependency would make a new user compile RocksDB twice.
set -euo pipefail
cd "$(dirname "$0")/.."
source scripts/common.sh

# The first `cargo ...` line of each script, as the script runs it (without "$@").
demo_cmd=$(grep -m1 -E '^cargo (build|test) ' scripts/demo.sh)
test_cmd=$(grep -m1 -E '^cargo test ' scripts/test.sh | sed 's/ "\$@"//')
case "$test_cmd" in *--no-run*) ;; *) test_cmd="$test_cmd --no-run" ;; esac

rocksdb_artifacts() {
  # compiler-artifact messages of librocksdb-sys: the file names carry the build's hash.
  local out
  out=$(mktemp)
  if ! $1 --message-format=json >"$out" 2>"$out.err"; then
    echo "error: '$1' failed:" >&2
    tail -20 "$out.err" >&2
    rm -f "$out" "$out.err"
    return 1
  fi
  grep '"reason":"compiler-artifact"' "$out" \
    | grep '"package_id":"[^"]*librocksdb-sys' \
    | grep -o '[^"]*liblibrocksdb_sys-[0-9a-f]*\.rlib' \
    | sort -u || true
  rm -f "$out" "$out.err"
}

demo=$(rocksdb_artifacts "$demo_cmd") || exit 1
tests=$(rocksdb_artifacts "$test_cmd") || exit 1
if [ -z "$demo" ] || [ -z "$tests" ]; then
  echo "error: no librocksdb-sys artifact found for '$demo_cmd' or '$test_cmd'" >&2
  exit 1
fi
if [ "$(printf '%s\n' "$tests" | wc -l)" -ne 1 ] || [ "$demo" != "$tests" ]; then
  echo "error: the demo and the tests build RocksDB differently (a second C++ build):" >&2
  echo "  $demo_cmd -> $demo" >&2
  echo "  $test_cmd -> $tests" >&2
  exit 1
fi
echo "==> one build: '$demo_cmd' and '$test_cmd' share librocksdb-sys"
