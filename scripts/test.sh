#!/usr/bin/env bash
# The test command: every test of relayhub, against real parts.
#   1. makes sure redis-server and nginx are installed (installs Debian's packages when missing and possible),
#   2. builds and runs the Rust tests of the workspace (the hub and the load generator; unit and integration:
#      real hubs on port 0, private redis-servers, real upstream HTTP servers, real WebSocket and HTTP clients),
#   3. checks the client's TypeScript declarations with tsc (scripts/test-types.sh),
#   4. runs the browser tests in headless Chromium (scripts/test-browser.sh installs Chromium when missing),
#   5. runs a short smoke run of the load generator (it works and prints numbers; no speed is asserted).
# Ends with one line "tests: N passed, M failed"; exits non-zero when anything failed. Binaries and the log
# (test-output.log) are in cargo's target directory, which honours CARGO_TARGET_DIR.
set -uo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$repo"
target_dir="$(bash scripts/target-dir.sh)" || exit 1
mkdir -p "$target_dir"
log="$target_dir/test-output.log"
: > "$log"

need_redis() {
    command -v redis-server >/dev/null 2>&1 && return 0
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: redis-server not found; installing Debian's redis-server" >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq redis-server) >&2 || true
    fi
    command -v redis-server >/dev/null 2>&1 && return 0
    echo "test.sh: error: redis-server is required by the tests (they start private ones on free ports)." >&2
    echo "test.sh: install it: apt-get install redis-server (Debian/Ubuntu) or brew install redis (macOS)." >&2
    exit 1
}
need_redis

need_nginx() { # the proxy tests run a real nginx in front of a hub
    command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] && return 0
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "test.sh: nginx not found; installing Debian's nginx-light" >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq nginx-light) >&2 || true
    fi
    command -v nginx >/dev/null 2>&1 || [[ -x /usr/sbin/nginx ]] && return 0
    echo "test.sh: error: nginx is required by tests/nginx.rs (it runs a private one on a free port)." >&2
    echo "test.sh: install it: apt-get install nginx-light (Debian/Ubuntu) or brew install nginx (macOS)." >&2
    exit 1
}
need_nginx

failed_steps=()
step() { # step NAME COMMAND...: runs a step, teeing its output into the log
    local name="$1"; shift
    echo "==> $name"
    if ! "$@" 2>&1 | tee -a "$log"; then
        failed_steps+=("$name")
    fi
}

step "cargo build" cargo build --workspace --bins
step "cargo test" cargo test --workspace --no-fail-fast
step "client types" bash scripts/test-types.sh
step "browser tests" env RELAYHUB_BIN="$target_dir/debug/relayhub" bash scripts/test-browser.sh
# The smoke run's hub gets a port nothing listens on (bench.sh's default, 18080, may be taken, for example by
# another run of these tests).
free_port() {
    local port
    for _ in $(seq 1 50); do
        port=$((20000 + RANDOM % 10000))
        (exec 3<>"/dev/tcp/127.0.0.1/$port") 2>/dev/null || { echo "$port"; return 0; }
    done
    echo 18080
}
step "load generator smoke run" env RELAYHUB_BIN="$target_dir/debug/relayhub" \
    BENCH_BIN="$target_dir/debug/relayhub-bench" PORT="$(free_port)" bash scripts/bench.sh smoke

# Totals over every runner: cargo's "test result:" lines and node's "# pass / # fail".
passed=$(grep -Eo 'test result: [a-zA-Z]+\. [0-9]+ passed' "$log" | grep -Eo '[0-9]+ passed' | awk '{s+=$1} END {print s+0}')
failed=$(grep -Eo '[0-9]+ failed;' "$log" | awk '{s+=$1} END {print s+0}')
node_pass=$(grep -E '^# pass [0-9]+' "$log" | awk '{s+=$3} END {print s+0}')
node_fail=$(grep -E '^# fail [0-9]+' "$log" | awk '{s+=$3} END {print s+0}')
passed=$((passed + node_pass))
failed=$((failed + node_fail))
if ((${#failed_steps[@]} > 0)); then
    echo "test.sh: failed steps: ${failed_steps[*]}"
    ((failed == 0)) && failed=1
fi
echo "tests: $passed passed, $failed failed"
((failed == 0))
