#!/usr/bin/env bash
# Starts a fleet on loopback to try by hand: a private redis-server, three relayhub replicas and nginx in
# front of them running deploy/nginx.conf (its replica and listen lines replaced, nothing else). Ctrl-C stops
# everything. Installs Debian's redis-server and nginx-light when missing (and possible).
#
#   scripts/fleet.sh            # nginx on 127.0.0.1:8000, replicas on 8001-8003, Redis on 6390
#   FLEET_PORT=9000 scripts/fleet.sh
#
# Then open http://127.0.0.1:8000/ (the dashboard through the balancer), stop one replica with
# `kill -TERM <pid>` (printed below) and watch its clients move to the others.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."

base="${FLEET_PORT:-8000}"
redis_port="${FLEET_REDIS_PORT:-6390}"
work="$(mktemp -d "${TMPDIR:-/tmp}/relayhub-fleet.XXXXXX")"
pids=()

install_if_missing() { # command package
    command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" ]] && return 0
    if [[ $(id -u) -eq 0 ]] && command -v apt-get >/dev/null 2>&1; then
        echo "fleet.sh: $1 not found; installing Debian's $2" >&2
        (apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq "$2") >&2 || true
    fi
    command -v "$1" >/dev/null 2>&1 || [[ -x "/usr/sbin/$1" ]] && return 0
    echo "fleet.sh: error: $1 is required; install it (Debian/Ubuntu: apt-get install $2)" >&2
    exit 1
}
install_if_missing redis-server redis-server
install_if_missing nginx nginx-light
nginx_bin="$(command -v nginx || echo /usr/sbin/nginx)"

stop() {
    echo "fleet.sh: stopping"
    for pid in "${pids[@]}"; do kill -TERM "$pid" 2>/dev/null || true; done
    wait 2>/dev/null || true
    rm -rf "$work"
}
trap stop EXIT
trap 'exit 0' INT TERM

cargo build --quiet --bin relayhub
bin="$(bash scripts/target-dir.sh)/debug/relayhub"

redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no --dir "$work" >"$work/redis.log" 2>&1 &
pids+=($!)

cat >"$work/replica.toml" <<EOF
[server]
host = "127.0.0.1"
trusted_proxies = ["127.0.0.1"]
drain_period = "5s"

[redis]
url = "redis://127.0.0.1:$redis_port"
required = true
EOF

replicas=""
for n in 1 2 3; do
    port=$((base + n))
    PORT="$port" RELAYHUB_INSTANCE_ID="replica-$n" "$bin" --config "$work/replica.toml" >"$work/replica-$n.log" 2>&1 &
    pids+=($!)
    echo "fleet.sh: replica-$n on 127.0.0.1:$port (pid $!, log $work/replica-$n.log)"
    replicas+="    server 127.0.0.1:$port max_fails=1 fail_timeout=10s;"$'\n'
done

# deploy/nginx.conf as shipped, with its replica lines and listen line replaced.
python3 - "$replicas" "$base" >"$work/site.conf" <<'EOF'
import re, sys
replicas, port = sys.argv[1], sys.argv[2]
text = open("deploy/nginx.conf").read()
def between(text, marker, new):
    pattern = re.compile(r"^[ \t]*# %s begin\n.*?^[ \t]*# %s end\n" % (marker, marker), re.S | re.M)
    if not pattern.search(text):
        sys.exit(f"fleet.sh: deploy/nginx.conf has no '# {marker} begin/end' lines")
    return pattern.sub(lambda _: new, text)
text = between(text, "replicas", replicas)
text = between(text, "listen", f"    listen 127.0.0.1:{port};\n")
print(text)
EOF
mkdir -p "$work/nginx/logs" "$work/nginx/tmp"
cat >"$work/nginx/nginx.conf" <<EOF
worker_processes 1;
error_log $work/nginx/logs/error.log warn;
pid $work/nginx/nginx.pid;
events { worker_connections 4096; }
http {
    access_log off;
    client_body_temp_path $work/nginx/tmp/body;
    proxy_temp_path $work/nginx/tmp/proxy;
    fastcgi_temp_path $work/nginx/tmp/fastcgi;
    uwsgi_temp_path $work/nginx/tmp/uwsgi;
    scgi_temp_path $work/nginx/tmp/scgi;
    include $work/site.conf;
}
EOF
"$nginx_bin" -p "$work/nginx" -c "$work/nginx/nginx.conf" -g "daemon off;" &
pids+=($!)

echo "fleet.sh: nginx on http://127.0.0.1:$base/ (WebSocket ws://127.0.0.1:$base/ws); Redis on $redis_port"
echo "fleet.sh: Ctrl-C stops everything"
wait
