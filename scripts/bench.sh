#!/usr/bin/env bash
# Runs one relayhub benchmark scenario end to end: writes a hub config, starts the hub pinned to one core,
# runs relayhub-bench pinned to another, stops the hub (and the Redis it started, if any). Each row of
# docs/benchmarks.md is one command:
#
#   scripts/bench.sh <scenario> [extra relayhub-bench flags]
#
# Scenarios:
#   smoke          20 connections, 2 channels, 50 publishes/s for 2 s; the CI run (fails only if the bench fails)
#   fanout-20      1,000 connections on 1 channel, 20 publishes/s over HTTP (memory mode)
#   fanout-200     the same at 200 publishes/s
#   fanout-1000    the same at 1,000 publishes/s
#   channels       10,000 connections over 1,000 channels, 2,000 publishes/s
#   idle           as many subscribed connections as the fd limit allows; RSS per connection
#   connect        10,000 connections, as fast as the hub accepts them; connect rate
#   relay-local    redis mode, one replica: 1,000 connections on 100 channels, 500 publishes/s over HTTP
#   relay-cross    redis mode, two replicas: publishes on A over HTTP, subscribers on B (same load)
#   redis-publish  redis mode, one replica: the same load published straight to Redis (PUBLISH)
#   redis-channels redis mode, one replica: 10,000 connections over 1,000 channels, 2,000 raw PUBLISHes/s
#                  straight to Redis; compare with ref-redis-channels (the tail-latency pair)
#   cluster-cross  cluster mode, two replicas on a 3-master Redis Cluster: the relay-cross load (publishes on A,
#                  subscribers on B); compare with relay-cross (one Redis)
#   soak           1,000 connections over 100 channels, 2,000 publishes/s over HTTP for SOAK_SECONDS (60), twice
#                  on a fresh hub each: alone, then beside 100 hostile clients (--hostile: stuck readers, 4 GiB
#                  frame headers, ping floods, subscribe churn, malformed frames); prints both side by side
#   calibrate      no hub: the kernel's CPU cost of one loopback TCP write and read (the floor per delivery);
#                  `calibrate --calibrate-batch 4`: per message when 4 leave in one write
#   ref-fanout-20, ref-fanout-200, ref-fanout-1000, ref-channels
#                  the same as fanout-20/-200/-1000 and channels, against `relayhub-bench --serve-reference`
#                  (a plain single-threaded tokio relay) instead of the hub: a baseline for comparison
#   ref-redis-channels  the redis-channels load against the reference relay reading the same Redis
#                  (`--reference-redis`: one PSUBSCRIBE on its one thread)
#
# Environment:
#   RUNS=3              run the scenario N times (a fresh hub each time) and print the median of the key figures
#   HUB_CPU=0 BENCH_CPU=1   cores to pin the hub and the bench to
#   PORT=18080          first port used (hub A; hub B is PORT+1, Redis is PORT+2; cluster nodes PORT+2..PORT+4,
#                       their bus ports PORT+12..PORT+14)
#   RELAYHUB_BIN, BENCH_BIN   binaries (default: the newer of release/ and debug/ in cargo's target directory,
#                       which honours CARGO_TARGET_DIR, else `cargo build --release`); BENCH_BIN is also the
#                       reference relay of the ref-* scenarios
#   WRITE_DELAY=20ms    the hub's websocket.write_delay (default 0s)
#   PROFILE=perf        record the hub with perf (DWARF call graphs) during the bench: $OUT/<scenario>.perf.data
#   OUT=<target dir>/bench   where JSON lines and logs go
set -euo pipefail

cd "$(dirname "$0")/.."
scenario="${1:-}"
[[ -n "$scenario" ]] || { sed -n '2,44p' "$0"; exit 64; }
shift
extra=("$@")
scenarios=" smoke fanout-20 fanout-200 fanout-1000 channels idle connect relay-local relay-cross redis-publish redis-channels"
scenarios+=" cluster-cross soak calibrate ref-fanout-20 ref-fanout-200 ref-fanout-1000 ref-channels ref-redis-channels "
if [[ "$scenarios" != *" $scenario "* ]]; then
    echo "bench.sh: unknown scenario '$scenario'; one of:$scenarios" >&2
    exit 64
fi

RUNS="${RUNS:-1}"
HUB_CPU="${HUB_CPU:-0}"
BENCH_CPU="${BENCH_CPU:-1}"
PORT="${PORT:-18080}"
TARGET_DIR="$(bash scripts/target-dir.sh)"
OUT="${OUT:-$TARGET_DIR/bench}"
PROFILE="${PROFILE:-}"
mkdir -p "$OUT"

# --- binaries --------------------------------------------------------------------------------------------
pick() { # pick NAME: the newest of release/NAME and debug/NAME in the target directory
    local found=""
    for candidate in "$TARGET_DIR"/release/"$1" "$TARGET_DIR"/debug/"$1"; do
        if [[ -x "$candidate" && ( -z "$found" || "$candidate" -nt "$found" ) ]]; then found="$candidate"; fi
    done
    echo "$found"
}
RELAYHUB_BIN="${RELAYHUB_BIN:-$(pick relayhub)}"
BENCH_BIN="${BENCH_BIN:-$(pick relayhub-bench)}"
# The ref-* scenarios and calibrate run only relayhub-bench (the reference relay is a mode of it).
needs_hub=true
case "$scenario" in ref-* | calibrate) needs_hub=false ;; esac
if [[ -z "$BENCH_BIN" || ( "$needs_hub" == true && -z "$RELAYHUB_BIN" ) ]]; then
    echo "bench.sh: building release binaries" >&2
    cargo build --release --workspace --bins
    RELAYHUB_BIN="${RELAYHUB_BIN:-$TARGET_DIR/release/relayhub}"
    BENCH_BIN="${BENCH_BIN:-$TARGET_DIR/release/relayhub-bench}"
fi
# The binary measured: the hub, or relayhub-bench itself as the reference relay.
SERVER_BIN="$RELAYHUB_BIN"
[[ "$needs_hub" == true ]] || SERVER_BIN="$BENCH_BIN"
case "$SERVER_BIN" in *debug*) echo "bench.sh: WARNING: $SERVER_BIN is a debug build; figures are not representative" >&2 ;; esac

# Hub and bench each need one descriptor per connection.
ulimit -n "$(ulimit -Hn)" 2>/dev/null || true
FD_LIMIT="$(ulimit -n)"

pin_to() { # pin_to CPU: the command prefix that pins to CPU (none without taskset or that core)
    if command -v taskset >/dev/null && (($1 < $(nproc))); then echo "taskset -c $1"; fi
}
read -r -a PIN_HUB <<<"$(pin_to "$HUB_CPU")"
read -r -a PIN_BENCH <<<"$(pin_to "$BENCH_CPU")"

# --- processes started here are stopped on any exit -----------------------------------------------------
pids=()
cleanup() {
    local pid
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    for pid in "${pids[@]}"; do wait "$pid" 2>/dev/null || true; done
    pids=()
}
trap cleanup EXIT INT TERM

port_free() { # port_free PORT: fails, naming it, when something already listens there
    if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then
        echo "bench.sh: port $1 is already in use (another benchmark or test?); choose others with PORT=" >&2
        exit 1
    fi
}

wait_port() { # wait_port PORT: until something listens (10 s)
    local i
    for i in $(seq 1 200); do
        if (exec 3<>"/dev/tcp/127.0.0.1/$1") 2>/dev/null; then return 0; fi
        sleep 0.05
    done
    echo "bench.sh: nothing listens on port $1" >&2
    return 1
}

# start_redis PORT: a private, non-persistent redis-server
start_redis() {
    command -v redis-server >/dev/null || { echo "bench.sh: redis-server is not installed" >&2; exit 1; }
    port_free "$1"
    (exec redis-server --port "$1" --bind 127.0.0.1 --save "" --appendonly no --daemonize no) \
        >"$OUT/redis-$1.log" 2>&1 &
    pids+=($!)
    wait_port "$1"
}

# start_cluster PORT...: a Redis Cluster of one non-persistent master per port (no replicas), slots spread
start_cluster() {
    command -v redis-cli >/dev/null || { echo "bench.sh: redis-cli is not installed" >&2; exit 1; }
    local port nodes=()
    for port in "$@"; do
        port_free "$port"
        mkdir -p "$OUT/cluster-$port"
        (cd "$OUT/cluster-$port" && rm -f nodes.conf && exec redis-server --port "$port" --cluster-port "$((port + 10))" \
            --bind 127.0.0.1 --cluster-enabled yes --cluster-config-file nodes.conf --save "" --appendonly no) \
            >"$OUT/redis-$port.log" 2>&1 &
        pids+=($!)
        wait_port "$port"
        nodes+=("127.0.0.1:$port")
    done
    redis-cli --cluster create "${nodes[@]}" --cluster-replicas 0 --cluster-yes >"$OUT/cluster-create.log" 2>&1
    for _ in $(seq 1 100); do
        redis-cli -p "$1" cluster info | grep -q cluster_state:ok && return 0
        sleep 0.1
    done
    echo "bench.sh: the cluster did not reach cluster_state:ok" >&2
    return 1
}

# start_hub NAME PORT REDIS_URL [CLUSTER_NODES]: writes the config, starts the hub pinned; sets HUB_PID.
# CLUSTER_NODES is a TOML array of seed URLs; with it REDIS_URL is empty.
start_hub() {
    local name="$1" port="$2" redis_url="$3" cluster_nodes="${4:-[]}" config="$OUT/hub-$1.toml"
    local required=false
    [[ -n "$redis_url" || "$cluster_nodes" != "[]" ]] && required=true
    cat >"$config" <<EOF
# Written by scripts/bench.sh for one benchmark run.
[server]
host = "127.0.0.1"
port = $port
instance_id = "bench-$name"
# Every load-generator connection comes from loopback: one address, so its budget is the replica's.
max_connections_per_ip = 100000

[websocket]
client_timeout = "120s"
write_delay = "${WRITE_DELAY:-0s}"

[redis]
url = "$redis_url"
cluster_nodes = $cluster_nodes
required = $required

[demo]
enabled = false
EOF
    port_free "$port"
    # exec: $! is then the hub itself (taskset execs it too), so --server-pid and kill reach the right process.
    # The config file says everything: the script's own PORT (and any HOST/REDIS_URL a caller exported) would
    # override it, since the hub honours those variables.
    (unset PORT HOST REDIS_URL REDIS_CLUSTER_NODES; RUST_LOG="${HUB_LOG:-warn}" exec "${PIN_HUB[@]}" "$RELAYHUB_BIN" --config "$config") \
        >"$OUT/hub-$name.log" 2>&1 &
    HUB_PID=$!
    pids+=("$HUB_PID")
    wait_port "$port"
    if ! kill -0 "$HUB_PID" 2>/dev/null; then
        echo "bench.sh: the hub exited at start; its log ($OUT/hub-$name.log):" >&2
        cat "$OUT/hub-$name.log" >&2
        exit 1
    fi
}

# run_bench LABEL SERVER_PID FLAGS...: runs the bench pinned; keeps its JSON line in $OUT/<scenario>.jsonl
run_bench() {
    local label="$1" server_pid="$2" status=0 perf_pid=""
    shift 2
    if [[ "$PROFILE" == perf ]]; then
        # The release profile keeps line tables but no frame pointers: unwind with DWARF.
        perf record -F 499 --call-graph dwarf,16384 -p "$server_pid" -o "$OUT/$scenario.perf.data" \
            >"$OUT/$scenario.perf.log" 2>&1 &
        perf_pid=$!
    fi
    "${PIN_BENCH[@]}" "$BENCH_BIN" --scenario "$label" --server-pid "$server_pid" "$@" "${extra[@]}" \
        | tee "$OUT/$label.out" || status=$?
    if [[ -n "$perf_pid" ]]; then kill -INT "$perf_pid"; wait "$perf_pid" || true; fi
    tail -n 1 "$OUT/$label.out" >>"$OUT/$scenario.jsonl"
    return "$status"
}

# start_reference PORT [FLAGS...]: starts `relayhub-bench --serve-reference` pinned like a hub; sets HUB_PID
start_reference() {
    local port="$1"
    shift
    port_free "$port"
    # exec, as for the hub: $! is the reference relay itself.
    (RUST_LOG="${HUB_LOG:-warn}" exec "${PIN_HUB[@]}" "$BENCH_BIN" --serve-reference "127.0.0.1:$port" "$@") \
        >"$OUT/reference.log" 2>&1 &
    HUB_PID=$!
    pids+=("$HUB_PID")
    wait_port "$port"
}

hub_url() { echo "ws://127.0.0.1:$1/ws"; }

# --- scenarios -------------------------------------------------------------------------------------------
one_run() {
    local status=0
    case "$scenario" in
        smoke)
            start_hub a "$PORT" ""
            run_bench smoke "$HUB_PID" --url "$(hub_url "$PORT")" \
                --connections 20 --channels 2 --rate 50 --duration 2 || status=$?
            ;;
        fanout-20 | fanout-200 | fanout-1000)
            start_hub a "$PORT" ""
            run_bench "$scenario" "$HUB_PID" --url "$(hub_url "$PORT")" \
                --connections 1000 --channels 1 --rate "${scenario#fanout-}" --duration 10 --warmup 2 || status=$?
            ;;
        channels)
            start_hub a "$PORT" ""
            run_bench channels "$HUB_PID" --url "$(hub_url "$PORT")" \
                --connections 10000 --channels 1000 --rate 2000 --duration 10 --warmup 2 || status=$?
            ;;
        ref-fanout-20 | ref-fanout-200 | ref-fanout-1000)
            start_reference "$PORT"
            run_bench "$scenario" "$HUB_PID" --url "$(hub_url "$PORT")" \
                --connections 1000 --channels 1 --rate "${scenario#ref-fanout-}" --duration 10 --warmup 2 || status=$?
            ;;
        ref-channels)
            start_reference "$PORT"
            run_bench ref-channels "$HUB_PID" --url "$(hub_url "$PORT")" \
                --connections 10000 --channels 1000 --rate 2000 --duration 10 --warmup 2 || status=$?
            ;;
        redis-channels | ref-redis-channels)
            local redis_port=$((PORT + 2)) redis_url
            redis_url="redis://127.0.0.1:$redis_port"
            start_redis "$redis_port"
            if [[ "$scenario" == redis-channels ]]; then
                start_hub a "$PORT" "$redis_url"
            else
                start_reference "$PORT" --reference-redis "$redis_url"
            fi
            run_bench "$scenario" "$HUB_PID" --url "$(hub_url "$PORT")" --publish redis --redis-url "$redis_url" \
                --connections 10000 --channels 1000 --rate 2000 --duration 10 --warmup 2 || status=$?
            ;;
        idle)
            start_hub a "$PORT" ""
            run_bench idle "$HUB_PID" --url "$(hub_url "$PORT")" --publish none \
                --connections "$((FD_LIMIT - 1000))" --channels 100 --duration 5 --sources 8 || status=$?
            ;;
        connect)
            start_hub a "$PORT" ""
            run_bench connect "$HUB_PID" --url "$(hub_url "$PORT")" --publish none \
                --connections 10000 --channels 100 --duration 1 --sources 8 --connect-concurrency 512 || status=$?
            ;;
        relay-local | relay-cross | redis-publish)
            local redis_port=$((PORT + 2)) redis_url
            redis_url="redis://127.0.0.1:$redis_port"
            start_redis "$redis_port"
            start_hub a "$PORT" "$redis_url"
            local hub_a="$HUB_PID" subscribe_port="$PORT" publish
            case "$scenario" in
                relay-cross)
                    start_hub b "$((PORT + 1))" "$redis_url"
                    subscribe_port=$((PORT + 1))
                    publish=(--publish http --http "http://127.0.0.1:$PORT")
                    ;;
                relay-local) publish=(--publish http --http "http://127.0.0.1:$PORT") ;;
                redis-publish) publish=(--publish redis --redis-url "$redis_url") ;;
            esac
            # The hub sampled is the one delivering to the subscribers.
            local sampled="$hub_a"
            [[ "$scenario" == relay-cross ]] && sampled="$HUB_PID"
            run_bench "$scenario" "$sampled" --url "$(hub_url "$subscribe_port")" "${publish[@]}" \
                --connections 1000 --channels 100 --rate 500 --duration 10 --warmup 2 || status=$?
            ;;
        cluster-cross)
            local first=$((PORT + 2)) seeds
            start_cluster "$first" "$((first + 1))" "$((first + 2))"
            seeds="[\"redis://127.0.0.1:$first\", \"redis://127.0.0.1:$((first + 1))\", \"redis://127.0.0.1:$((first + 2))\"]"
            start_hub a "$PORT" "" "$seeds"
            start_hub b "$((PORT + 1))" "" "$seeds"
            # B delivers to the subscribers: it is the hub sampled, as in relay-cross.
            run_bench cluster-cross "$HUB_PID" --url "$(hub_url "$((PORT + 1))")" \
                --publish http --http "http://127.0.0.1:$PORT" \
                --connections 1000 --channels 100 --rate 500 --duration 10 --warmup 2 || status=$?
            ;;
        soak)
            local label hostile
            for label in soak-calm soak-hostile; do
                hostile=0
                [[ "$label" == soak-hostile ]] && hostile=100
                start_hub a "$PORT" ""
                run_bench "$label" "$HUB_PID" --url "$(hub_url "$PORT")" --hostile "$hostile" \
                    --connections 1000 --channels 100 --rate 2000 --duration "${SOAK_SECONDS:-60}" --warmup 2 \
                    --drain 5 || status=$?
                cleanup
            done
            ;;
        calibrate)
            "${PIN_HUB[@]}" "$BENCH_BIN" --calibrate "${extra[@]}" | tee "$OUT/calibrate.out" || status=$?
            tail -n 1 "$OUT/calibrate.out" >>"$OUT/$scenario.jsonl"
            ;;
        *) exit 64 ;; # unreachable: checked at the top
    esac
    cleanup
    return "$status"
}

echo "bench.sh: $scenario with $SERVER_BIN (server on CPU $HUB_CPU) and $BENCH_BIN (bench on CPU $BENCH_CPU)" >&2
: >"$OUT/$scenario.jsonl"
worst=0
for run in $(seq 1 "$RUNS"); do
    [[ "$RUNS" -gt 1 ]] && echo "bench.sh: run $run of $RUNS" >&2
    status=0
    one_run || status=$?
    # 2 = the run finished with losses or dropped connections: reported, not fatal, except in smoke.
    if [[ "$status" -ne 0 && ( "$status" -ne 2 || "$scenario" == smoke ) ]]; then exit "$status"; fi
    [[ "$status" -gt "$worst" ]] && worst="$status"
done

if [[ "$scenario" == soak ]] && command -v python3 >/dev/null; then
    python3 - "$OUT/$scenario.jsonl" <<'EOF'
import json, sys
runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
print("soak: normal clients alone and beside hostile ones (one line per run, in order)")
print(f"  {'run':<14}{'p50 ms':>9}{'p99 ms':>9}{'p99.9 ms':>10}{'missing':>9}{'dropped':>9}{'peak RSS MiB':>14}{'hub CPU':>9}")
for run in runs:
    lat, dl, srv = run.get("latency_ms") or {}, run.get("deliveries") or {}, run.get("server") or {}
    print(f"  {run.get('scenario', '?'):<14}{lat.get('p50', float('nan')):>9.3f}{lat.get('p99', float('nan')):>9.3f}"
          f"{lat.get('p999', float('nan')):>10.3f}{dl.get('missing', -1):>9}{run.get('dropped', -1):>9}"
          f"{srv.get('peak_rss_kib', 0) / 1024:>14.1f}{srv.get('cpu_share', 0) * 100:>8.0f}%")
EOF
fi

if [[ "$RUNS" -gt 1 ]] && command -v python3 >/dev/null; then
    python3 - "$OUT/$scenario.jsonl" <<'EOF'
import json, statistics, sys
runs = [json.loads(line) for line in open(sys.argv[1]) if line.strip()]
def get(run, path):
    for key in path.split("."):
        run = run.get(key) if isinstance(run, dict) else None
    return run
figures = ["connect.per_second", "connect.per_server_cpu_second", "deliveries.per_second", "deliveries.missing",
           "latency_ms.p50", "latency_ms.p99", "latency_ms.p999", "server.cpu_share",
           "server.deliveries_per_cpu_second", "server.rss_per_connection_bytes", "bench.cpu_share",
           "write_us", "read_us", "write_bound_per_cpu_second"]
print(f"median of {len(runs)} runs ({sys.argv[1]}):")
for figure in figures:
    values = [v for v in (get(run, figure) for run in runs) if isinstance(v, (int, float))]
    if values:
        print(f"  {figure:<34} {statistics.median(values):>14.3f}   runs: {', '.join(f'{v:.3f}' for v in values)}")
EOF
fi
exit "$worst"
