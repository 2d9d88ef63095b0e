#!/usr/bin/env bash
# The GPU tests (`pytest -m gpu`) on one machine, in groups of test files that run side by side
# (a cold run is mostly NVRTC compiling kernel variants, one CPU core per group). Prints each
# group's pytest summary line and exits non-zero when a group fails; the logs stay in $1
# (default ./gpu-test-logs). It also prints a line as each group finishes, and when stopped from
# outside (a time limit's TERM, Ctrl-C) it stops the running groups and reports how far each got.
# CUFLASH_TEST_GROUPS picks groups by name (comma-separated); PYTHON names the interpreter
# (default python3). A test that runs past pytest's faulthandler_timeout (pyproject.toml) leaves
# every thread's traceback in its group's log, so a kernel that never returns is named there.
#
#   tools/gpu_tests.sh [LOG_DIR]
set -uo pipefail
here="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
logs="${1:-gpu-test-logs}"
mkdir -p "$logs"

# name: pytest arguments, read as shell words so that a -k expression may be quoted (roughly even
# run times on an H200 from a cold kernel cache)
groups=(
    "backward_ws: tests/test_gpu_backward_ws.py"
    "backward: tests/test_gpu_backward.py tests/test_dispatch.py tests/test_validation.py"
    "forward: tests/test_gpu_forward.py tests/test_gpu_float32.py tests/test_sparse_attention.py tests/test_exact_mask.py"
    "features: tests/test_gpu_features.py tests/test_gpu_calls.py tests/test_flash_attn_semantics.py"
    # the dropout file in four processes by kernel family and dtype (alone it took six minutes)
    "dropout_hopper_f16: tests/test_dropout_gpu.py -k 'default and not bfloat16'"
    "dropout_hopper_bf16: tests/test_dropout_gpu.py -k 'default and bfloat16'"
    "dropout_sm80_f16: tests/test_dropout_gpu.py -k 'sm80 and not bfloat16'"
    "dropout_sm80_bf16: tests/test_dropout_gpu.py -k 'sm80 and bfloat16'"
    "varlen_torch: tests/test_varlen.py tests/test_varlen_pages.py tests/test_torch_gpu.py tests/test_torch_kvcache.py"
    # the KV-cache file in four processes (alone it outlasts a 10-minute run)
    "kvcache_grid_d128: tests/test_kvcache.py::test_decode_kernel -k D128"
    "kvcache_grid_rest: tests/test_kvcache.py::test_decode_kernel -k 'not D128'"
    "kvcache_features: tests/test_kvcache.py::test_features"
    "kvcache_rest: tests/test_kvcache.py -k 'not test_features and (not test_decode_kernel or short_of_whole_lines)'"
    "cli_parallel: tests/test_cli.py tests/test_parallel_gpu.py"
)

# Every test file with GPU tests is in a group: a new file must be added above.
listed=" $(printf '%s ' "${groups[@]#*:}") "
for file in $(grep -l "mark.gpu\|mark\.gpu" "$here"/tests/test_*.py); do
    file="tests/${file##*/}"
    [[ "$listed" == *" $file "* ]] || { echo "tools/gpu_tests.sh: $file is in no group"; exit 2; }
done

names=()
pids=()
start=$SECONDS
for group in "${groups[@]}"; do
    name="${group%%:*}"
    if [ -n "${CUFLASH_TEST_GROUPS:-}" ] && [[ ",$CUFLASH_TEST_GROUPS," != *",$name,"* ]]; then
        continue
    fi
    names+=("$name")
    rm -f "$logs/$name.rc"
    eval "args=(${group#*:})"
    (cd "$here" && PYTHONPATH="$here${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 \
        "${PYTHON:-python3}" -m pytest -m gpu -q -p no:cacheprovider "${args[@]}" > "$logs/$name.log" 2>&1;
     rc=$?; echo $rc > "$logs/$name.rc"; echo "($((SECONDS - start)) s) $name finished: exit $rc") &
    pids+=($!)
done

summary() {  # a group's line once it has ended: its exit status and pytest's summary line
    echo "$1: exit $(cat "$logs/$1.rc"); $(tail -1 "$logs/$1.log")"
}

# Killed from outside (a time limit, Ctrl-C): stop the groups still running and say how far each
# got, so that a run cut short still reports the groups that ended and the failures seen so far.
stop_groups() {
    trap - TERM INT
    echo "tools/gpu_tests.sh: stopped after $((SECONDS - start)) s"
    for i in "${!names[@]}"; do
        name="${names[$i]}"
        if [ -f "$logs/$name.rc" ]; then
            summary "$name"
        else
            pkill -TERM -P "${pids[$i]}" 2> /dev/null
            kill -TERM "${pids[$i]}" 2> /dev/null
            failed="$(grep -cE '^(FAILED|ERROR) ' "$logs/$name.log" 2> /dev/null)"
            # pytest -q's progress lines: one character per test run so far
            done_tests="$(grep -E '^[.sFExX]+ *(\[ *[0-9]+%\])?$' "$logs/$name.log" 2> /dev/null | tr -cd '.sFExX' | wc -c)"
            echo "$name: stopped before it ended; $done_tests tests run; failure lines so far: ${failed:-0}"
        fi
    done
    exit 124
}
trap stop_groups TERM INT
wait

status=0
for name in "${names[@]}"; do
    rc="$(cat "$logs/$name.rc")"
    summary "$name"
    # 5: no test collected (a group whose tests all carry other marks) is not a failure
    [ "$rc" -ne 0 ] && [ "$rc" -ne 5 ] && status=1
done
exit "$status"
