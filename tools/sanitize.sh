#!/usr/bin/env bash
# compute-sanitizer's memcheck, racecheck, synccheck and initcheck over every kernel family
# (tools/sanitize_driver.py); prints one summary line per tool and keeps the logs in $1 (default
# ./sanitize-logs). racecheck reports hazards in the warp-specialised Hopper backward
# (flash_bwd_sm90_dkdv_ws) and in the exact-mask variants of the TMA forward (flash_fwd_sm90_tma)
# between accesses their mbarriers order, which racecheck does not model: see docs/internals.md
# and tools/racecheck_mbarrier_probe.py. initcheck runs with the Hopper backward's dQ accumulator
# zeroed on every route (SANITIZE_DQ_ZEROS=1): where the kernels write it only by bulk copies and
# reduce-adds, which initcheck does not count as initialising, it reported nearly every read of it
# (tools/sanitize_driver.py, write_dq_zeros; tools/initcheck_bulk_store_probe.py asks initcheck
# directly).
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
logs="${1:-sanitize-logs}"
mkdir -p "$logs"
# Compile every variant once outside the sanitizer (CuPy's disk cache keeps them).
PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" python3 "$here/tools/sanitize_driver.py" > "$logs/plain.log" 2>&1 \
    || { echo "driver failed without the sanitizer:"; tail -20 "$logs/plain.log"; exit 1; }
status=0
for tool in memcheck racecheck synccheck initcheck; do
    extra=()
    [ "$tool" = racecheck ] && extra=(--racecheck-report analysis)
    zeros=0
    [ "$tool" = initcheck ] && zeros=1
    SANITIZE_DQ_ZEROS=$zeros PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" timeout "${SANITIZE_TIMEOUT:-600}" \
        compute-sanitizer --tool "$tool" "${extra[@]}" \
        --error-exitcode 9 python3 "$here/tools/sanitize_driver.py" > "$logs/$tool.log" 2>&1
    rc=$?
    summary="$(grep -E 'ERROR SUMMARY|RACECHECK SUMMARY' "$logs/$tool.log" | tail -1)"
    echo "$tool: exit $rc; ${summary:-no summary line}"
    [ "$rc" -ne 0 ] && status=1
done
exit "$status"
