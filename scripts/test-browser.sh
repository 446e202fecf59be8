#!/usr/bin/env bash
# Runs the browser tests (tests/browser) against an already built hub: installs Chromium and the node packages
# when missing (scripts/browser-deps.sh), then runs node's test runner. Builds nothing.
#   RELAYHUB_BIN   hub binary to test (default: debug/relayhub in cargo's target directory, which honours
#                  CARGO_TARGET_DIR)
#   CHROMIUM_BIN   browser (default: /usr/bin/chromium)
# Exits non-zero when a test fails or something is missing. Screenshots land in <target dir>/dashboard*.png.
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"

bash "$repo/scripts/browser-deps.sh"

target_dir="$(bash "$repo/scripts/target-dir.sh")"
bin="${RELAYHUB_BIN:-$target_dir/debug/relayhub}"
case "$bin" in
    /*) ;;
    *) bin="$PWD/$bin" ;;
esac
if [[ ! -x "$bin" ]]; then
    echo "test-browser: error: relayhub binary not found or not executable: $bin" >&2
    echo "test-browser: build it first (cargo build), or set RELAYHUB_BIN to its path" >&2
    exit 1
fi
export RELAYHUB_BIN="$bin"
# Where the dashboard test leaves its screenshots.
export RELAYHUB_TARGET_DIR="$target_dir"

cd "$repo/tests/browser"
# client.test.mjs and recovery.test.mjs drive relayhub.js from node itself (recovery.test.mjs also starts a
# private redis-server); node 20 has WebSocket only behind a flag.
ws_flag=()
node -e 'process.exit(typeof WebSocket === "function" ? 0 : 1)' || ws_flag=(--experimental-websocket)
status=0
node "${ws_flag[@]}" --test --test-reporter=tap dashboard.test.mjs client.test.mjs recovery.test.mjs token.test.mjs presence.test.mjs || status=$?
# sse.test.mjs needs an EventSource in node too (behind a flag in node 20). Run on its own: with a global
# EventSource the other files' clients would take the SSE fallback where they test REST polling.
es_flag=()
node -e 'process.exit(typeof EventSource === "function" ? 0 : 1)' || es_flag=(--experimental-eventsource)
node "${ws_flag[@]}" "${es_flag[@]}" --test --test-reporter=tap sse.test.mjs || status=$?
exit "$status"
