#!/usr/bin/env bash
# Checks the client's TypeScript declarations (web/relayhub.d.ts) with tsc, pinned in tests/typescript: installs
# the pinned packages when missing (`npm ci`; typescript and the client package linked from web/), then runs
# tests/typescript/types.test.mjs with node's test runner (TAP: ends with "# pass N", "# fail M").
set -euo pipefail

dir="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)/tests/typescript"
command -v node >/dev/null 2>&1 || { echo "test-types: error: node is not installed (node >= 20)" >&2; exit 1; }
command -v npm >/dev/null 2>&1 || { echo "test-types: error: npm is not installed" >&2; exit 1; }

# `npm ci` wipes and reinstalls node_modules; skip it when the installed tree already matches the lock file.
stamp="$dir/node_modules/.package-lock.json"
if [[ ! -f "$stamp" || ! -d "$dir/node_modules/typescript" || "$dir/package-lock.json" -nt "$stamp" ]]; then
    echo "test-types: installing node packages in tests/typescript (npm ci)"
    (cd "$dir" && npm ci --no-audit --no-fund)
fi
cd "$dir"
exec node --test --test-reporter=tap types.test.mjs
