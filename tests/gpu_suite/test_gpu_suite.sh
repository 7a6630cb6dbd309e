#!/usr/bin/env bash
# test_gpu_suite.sh: bench/gpu_suite.sh's verdicts, checked here without a GPU. A fake
# nvidia-smi on PATH and fake bundles (shell scripts printing what Criterion and bench_kernels
# print) drive each path; the real script runs unchanged. Every case asserts the exit status,
# the status.md it leaves and that results are written into the folder it was given.
set -u
root=$(cd "$(dirname "$0")/../.." && pwd)
suite=$root/bench/gpu_suite.sh
tmp=$(mktemp -d)
trap 'rm -rf "$tmp"' EXIT
fails=0
check() { # DESCRIPTION CONDITION...
    local what=$1
    shift
    if "$@"; then echo "ok: $what"; else echo "FAILED: $what"; fails=$((fails + 1)); fi
}
has() { grep -q -- "$2" "$1"; }

# Without a GPU: exit 2, a clear message, and status.md saying the tests did not run.
out=$tmp/nogpu
PATH=/usr/bin:/bin OUT="" bash "$suite" --quick --out "$out" >"$tmp/nogpu.txt" 2>&1
rc=$?
check "no GPU: exit 2 (got $rc)" [ $rc = 2 ]
check "no GPU: says so" has "$tmp/nogpu.txt" "no GPU found"
check "no GPU: status.md written" has "$out/status.md" "did NOT run"

# A fake device machine.
mkdir -p "$tmp/path"
cat >"$tmp/path/nvidia-smi" <<'X'
#!/bin/sh
[ "$1" = "--query-gpu=name" ] && { echo "Fake H200"; exit 0; }
echo "fake nvidia-smi"
X
chmod +x "$tmp/path/nvidia-smi"
# make_bundle DIR BEHAVIOUR: behaviours pass, skip, fail, none (Tested: 0), missing (no
# test_gpu_parity), hang (test_gpu_backend sleeps past its limit)
make_bundle() {
    local d=$1 how=$2
    mkdir -p "$d/bin" "$d/lib"
    for t in test_gpu_host test_gpu_backend test_gpu_parity test_als_gpu; do
        local body='echo "[----] tests: 3 | Passing: 3"; echo "[====] Synthesis: Tested: 3 | Passing: 3 | Failing: 0 | Crashing: 0"; exit 0'
        if [ "$t" = test_gpu_backend ]; then
            case $how in
            skip) body='echo "[SKIP] gpu_backend::x: no CUDA device"; echo "[====] Synthesis: Tested: 3 | Passing: 3 | Failing: 0 | Crashing: 0"; exit 0' ;;
            fail) body='echo "[FAIL] gpu_backend::x"; echo "[====] Synthesis: Tested: 3 | Passing: 2 | Failing: 1 | Crashing: 0"; exit 1' ;;
            none) body='echo "[====] Synthesis: Tested: 0 | Passing: 0 | Failing: 0 | Crashing: 0"; exit 0' ;;
            hang) body='sleep 600' ;;
            esac
        fi
        [ "$how" = missing ] && [ "$t" = test_gpu_parity ] && continue
        printf '#!/bin/sh\n%s\n' "$body" >"$d/bin/$t"
        chmod +x "$d/bin/$t"
    done
    cat >"$d/bin/bench_kernels" <<'X'
#!/bin/sh
case "$*" in
*--check*) echo "check: all good"; exit 0 ;;
esac
while [ $# -gt 0 ]; do [ "$1" = --out ] && out=$2; shift; done
echo '{"kind":"ceilings","device":"Fake H200","sm_count":132,"memory_total":1,"copy_gbps":4000.0,"gemm_tflops":700.0}' >"$out"
echo '{"kind":"search","n":1000000,"d":128,"b":1,"k":10,"ms_median":1.0,"gbps":256,"tflops":0.1,"floor_ms":0.1,"ratio":10.0,"top_rows":[1,2]}' >>"$out"
X
    chmod +x "$d/bin/bench_kernels"
}
run_fake() { # NAME BEHAVIOUR [extra args]: runs the suite on a fake bundle, sets rc and out
    local name=$1 how=$2
    shift 2
    make_bundle "$tmp/$name.bundle" "$how"
    out=$tmp/$name
    PATH="$tmp/path:/usr/bin:/bin" OUT="" bash "$suite" --quick --bundle "$tmp/$name.bundle" \
        --out "$out" "$@" >"$tmp/$name.txt" 2>&1
    rc=$?
}

run_fake pass pass
check "all pass: exit 0 (got $rc)" [ $rc = 0 ]
check "all pass: status PASS" has "$out/status.md" "Overall: PASS"
check "all pass: benchmark rows written to the folder" has "$out/bench_kernels.jsonl" '"kind":"search"'
check "all pass: results.md joined" has "$out/results.md" "| 1000000 | 128 | 1 | 10 |"
check "all pass: suite.log written" has "$out/suite.log" "==== test_gpu_backend: exit 0"

run_fake skip skip
check "a skipped test: exit 1 (got $rc)" [ $rc = 1 ]
check "a skipped test: named" has "$out/suite.log" "SKIPPED on a GPU machine"
check "a skipped test: status FAIL" has "$out/status.md" "Overall: FAIL"

run_fake fail fail
check "a failing test: exit 1 (got $rc)" [ $rc = 1 ]
check "a failing test: its step FAILs" has "$out/status.md" "| test_gpu_backend | FAIL"

run_fake none none
check "no test ran: exit 1 (got $rc)" [ $rc = 1 ]
check "no test ran: said so" has "$out/suite.log" "no test ran"

run_fake missing missing
check "a missing suite: exit 1 (got $rc)" [ $rc = 1 ]
check "a missing suite: NOT RUN" has "$out/status.md" "| test_gpu_parity | FAIL: NOT RUN"

# A suite that hangs is cut at its limit; status.md and suite.log are already there.
SUITE_LIMIT=3 run_fake hang hang --budget 400
check "a hanging suite: exit 1 (got $rc)" [ $rc = 1 ]
check "a hanging suite: timed out" has "$out/status.md" "| test_gpu_backend | FAIL: timed out"
check "a hanging suite: later steps still ran" has "$out/status.md" "| test_gpu_parity | pass"

# The budget: with none left, the tests do not run, and that fails.
run_fake budget pass --budget 10
check "no budget: exit 1 (got $rc)" [ $rc = 1 ]
check "no budget: NOT RUN" has "$out/status.md" "time budget spent"

# A missing bundle folder.
PATH="$tmp/path:/usr/bin:/bin" OUT="" bash "$suite" --quick --bundle "$tmp/nothing" \
    --out "$tmp/nob" >"$tmp/nob.txt" 2>&1
rc=$?
check "no bundle: exit 1 (got $rc)" [ $rc = 1 ]
check "no bundle: NOT RUN" has "$tmp/nob/status.md" "NOT RUN"

# A packed bundle (what gpu_bundle.sh carries) is unpacked and run.
make_bundle "$tmp/packed" pass
tar -cf - -C "$tmp/packed" . | xz -1 >"$tmp/packed.tar.xz"
PATH="$tmp/path:/usr/bin:/bin" OUT="" bash "$suite" --quick --bundle "$tmp/packed.tar.xz" \
    --out "$tmp/pk" >"$tmp/pk.txt" 2>&1
rc=$?
check "packed bundle: exit 0 (got $rc)" [ $rc = 0 ]
check "packed bundle: the suites ran" has "$tmp/pk/status.md" "| test_gpu_backend | pass"

# $OUT is the default output folder (the device tool's).
make_bundle "$tmp/o.bundle" pass
mkdir -p "$tmp/outvar"
PATH="$tmp/path:/usr/bin:/bin" OUT="$tmp/outvar" bash "$suite" --quick --bundle "$tmp/o.bundle" \
    >/dev/null 2>&1
check "\$OUT is used" has "$tmp/outvar/status.md" "Overall: PASS"

echo "$fails failed"
[ $fails = 0 ]
