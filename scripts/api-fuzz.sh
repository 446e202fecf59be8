#!/usr/bin/env bash
# Property-based check of the HTTP API against docs/openapi.json: schemathesis generates requests from the
# document for a bounded number of cases per operation and fails on any 5xx, any answer whose status,
# content type or body the document does not allow, and the other checks of `--checks all`. `/ws` is left
# out: it is a WebSocket handshake, not a request/response operation, and so is `/sse`, an event stream that
# never ends by itself (tests/openapi.rs covers both answers, tests/sse.rs the stream).
# positive_data_acceptance is off: polling sources are named by the deployment's config, which the document
# cannot list, so a well-formed start for a name that is not configured is rightly refused (400). The hub runs
# from the debug build in memory mode on a free loopback port and is stopped at the end.
set -euo pipefail
cd "$(dirname "$0")/.."

SCHEMATHESIS_VERSION="4.32.5"
MAX_EXAMPLES="${API_FUZZ_MAX_EXAMPLES:-50}"
# Cargo's target directory (CARGO_TARGET_DIR, a cargo config, or target/), where the build below puts the binary.
TARGET_DIR="$(bash scripts/target-dir.sh)"
VENV="$TARGET_DIR/api-fuzz-venv"

if ! "$VENV/bin/schemathesis" --version 2>/dev/null | grep -q "$SCHEMATHESIS_VERSION"; then
    echo "==> installing schemathesis $SCHEMATHESIS_VERSION into $VENV"
    python3 -m venv "$VENV"
    "$VENV/bin/pip" install --quiet --disable-pip-version-check "schemathesis==$SCHEMATHESIS_VERSION"
fi

echo "==> building relayhub"
cargo build --quiet --bin relayhub
BIN="$TARGET_DIR/debug/relayhub"

PORT="$(python3 -c 'import socket; s = socket.socket(); s.bind(("127.0.0.1", 0)); print(s.getsockname()[1])')"
LOG="$(mktemp)"
# Only the variables set here steer the hub: a Redis or a key from the caller's environment must not.
env -u REDIS_URL -u REDIS_HOST -u RELAYHUB_CONFIG -u RELAYHUB_API_KEY -u RELAYHUB_ADMIN_TOKEN \
    PORT="$PORT" HOST=127.0.0.1 RUST_LOG=warn "$BIN" >"$LOG" 2>&1 &
HUB=$!
cleanup() {
    kill "$HUB" 2>/dev/null || true
    wait "$HUB" 2>/dev/null || true
    rm -f "$LOG"
}
trap cleanup EXIT

for _ in $(seq 1 100); do
    if curl -fsS "http://127.0.0.1:$PORT/health" >/dev/null 2>&1; then break; fi
    if ! kill -0 "$HUB" 2>/dev/null; then
        echo "the hub did not start:"; cat "$LOG"; exit 1
    fi
    sleep 0.1
done

echo "==> schemathesis against http://127.0.0.1:$PORT ($MAX_EXAMPLES cases per operation)"
status=0
timeout 900 "$VENV/bin/schemathesis" run "http://127.0.0.1:$PORT/api/openapi.json" \
    --url "http://127.0.0.1:$PORT" \
    --checks all \
    --exclude-path /ws \
    --exclude-path /sse \
    --exclude-checks positive_data_acceptance \
    --max-examples "$MAX_EXAMPLES" \
    --workers 1 \
    --request-timeout 10 \
    --generation-deterministic \
    --no-color || status=$?
if ! kill -0 "$HUB" 2>/dev/null; then
    echo "the hub exited during the run:"; cat "$LOG"; exit 1
fi
if [ "$status" -ne 0 ]; then
    echo "==> api-fuzz: FAILED (schemathesis exit $status)"
    exit "$status"
fi
echo "==> api-fuzz: passed"
