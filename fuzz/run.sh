#!/usr/bin/env bash
# Runs fuzz targets one after another on the stable toolchain and prints a summary row for each.
#   fuzz/run.sh SECONDS [TARGET...]    (no TARGET: every target of `cargo fuzz list`)
# Each run starts from fuzz/seeds/TARGET (committed) and grows fuzz/corpus/TARGET (ignored by git).
# A crash stops that target's run; its input is in fuzz/artifacts/TARGET/ and the row says so.
set -uo pipefail
cd "$(dirname "$0")"
export RUSTC_BOOTSTRAP=1   # cargo-fuzz passes -Z flags; this lets the stable compiler accept them
seconds=${1:?usage: fuzz/run.sh SECONDS [TARGET...]}
shift
targets=("$@")
[ ${#targets[@]} -gt 0 ] || mapfile -t targets < <(cargo fuzz list)
cargo fuzz build >/dev/null || exit 1
mkdir -p logs
printf '| target | seconds | executions | result |\n| --- | ---: | ---: | --- |\n'
for t in "${targets[@]}"; do
  mkdir -p "corpus/$t" "seeds/$t"
  cargo fuzz run "$t" "corpus/$t" "seeds/$t" -- -max_total_time="$seconds" -print_final_stats=1 \
    >"logs/$t.log" 2>&1
  rc=$?
  runs=$(sed -n 's/^stat::number_of_executed_units: *//p' "logs/$t.log" | tail -1)
  secs=$(sed -n 's/^Done [0-9]* runs in \([0-9]*\) second.*/\1/p' "logs/$t.log" | tail -1)
  if [ "$rc" = 0 ]; then result="no crash"; else result="CRASH (exit $rc, see fuzz/logs/$t.log)"; fi
  printf '| %s | %s | %s | %s |\n' "$t" "${secs:-$seconds}" "${runs:-?}" "$result"
done
