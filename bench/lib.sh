# bench/lib.sh: the set-up the shell benchmarks share that run a real affinityd (sourced, with
# $build set): the build, a work directory removed at exit with the server, the server started
# on a free port and waited for, and a process's CPU time.

# bench_init NAME: builds affinityd, the CLI and affinity_load in $build, exports
# OMP_WAIT_POLICY=PASSIVE, makes $work (/tmp/affinity-NAME-*) and sets $load and $cli. At exit
# the server ($pid) is stopped and $work removed.
bench_init() {
  cmake --build "$build" -j2 --target affinityd affinity affinity_load >/dev/null
  export OMP_WAIT_POLICY=PASSIVE
  work="$(mktemp -d "/tmp/affinity-$1-XXXXXX")"
  pid=""
  trap bench_cleanup EXIT
  load="$build/bench/affinity_load"
  cli="$build/src/affinity"
}

bench_cleanup() {
  bench_stop_server
  rm -rf "$work"
}

# bench_start_server [affinityd flags...]: affinityd on a free loopback port with --data-dir
# $work/store and the CPU backend; returns once it answers health. Sets $pid and $addr.
bench_start_server() {
  rm -f "$work/port"
  "$build/src/affinityd" --listen 127.0.0.1:0 --port-file "$work/port" --data-dir "$work/store" \
    --backend cpu --log-level warn "$@" >"$work/affinityd.log" 2>&1 &
  pid=$!
  for _ in $(seq 1 600); do [ -s "$work/port" ] && break; sleep 0.1; done
  addr="127.0.0.1:$(cat "$work/port")"
  for _ in $(seq 1 600); do "$cli" --addr "$addr" health >/dev/null 2>&1 && break; sleep 0.1; done
}

bench_stop_server() {
  if [ -n "$pid" ]; then kill "$pid" 2>/dev/null || true; wait "$pid" 2>/dev/null || true; fi
  pid=""
}

# cpu_ticks PID: the process's user + system time so far, in clock ticks (getconf CLK_TCK).
cpu_ticks() { awk '{print $14 + $15}' "/proc/$1/stat"; }
