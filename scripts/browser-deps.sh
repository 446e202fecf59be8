#!/usr/bin/env bash
# Installs what the browser tests need: Debian's Chromium (when /usr/bin/chromium is missing) and the pinned
# node packages of tests/browser (`npm ci`). Safe to run again: each step is skipped when already done.
# Runs non-interactively; installing Chromium needs root (apt-get).
set -euo pipefail

repo="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
browser_dir="$repo/tests/browser"
chromium="${CHROMIUM_BIN:-/usr/bin/chromium}"

die() {
    echo "browser-deps: error: $*" >&2
    exit 1
}

say() {
    echo "browser-deps: $*"
}

# --- Chromium -------------------------------------------------------------------------------------------------
if [[ -x "$chromium" ]]; then
    say "chromium present: $chromium"
else
    command -v apt-get >/dev/null 2>&1 \
        || die "$chromium is missing and apt-get is not available; install Chromium and set CHROMIUM_BIN"
    if [[ "$(id -u)" -ne 0 ]]; then
        die "$chromium is missing; run this script as root (it runs 'apt-get install -y chromium'), or install it yourself"
    fi
    say "installing Debian package 'chromium' (apt-get update, then apt-get install -y chromium)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -q || die "'apt-get update' failed"
    apt-get install -y -q --no-install-recommends chromium fonts-dejavu-core \
        || die "'apt-get install -y chromium' failed"
    [[ -x "$chromium" ]] || die "chromium was installed but $chromium does not exist; set CHROMIUM_BIN"
    say "chromium installed: $("$chromium" --version 2>/dev/null || echo "$chromium")"
fi

# --- Node packages --------------------------------------------------------------------------------------------
command -v node >/dev/null 2>&1 || die "node is not installed (node >= 20 is needed)"
command -v npm >/dev/null 2>&1 || die "npm is not installed"
node_major="$(node -p 'process.versions.node.split(".")[0]')"
[[ "$node_major" -ge 20 ]] || die "node >= 20 is needed, found $(node --version)"
[[ -f "$browser_dir/package-lock.json" ]] || die "$browser_dir/package-lock.json is missing"

# `npm ci` wipes and reinstalls node_modules; skip it when the installed tree already matches the lock file.
stamp="$browser_dir/node_modules/.package-lock.json"
if [[ -f "$stamp" && -d "$browser_dir/node_modules/playwright-core" && "$stamp" -nt "$browser_dir/package-lock.json" ]]; then
    say "node packages up to date in tests/browser"
else
    say "installing node packages in tests/browser (npm ci)"
    # PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD: the tests drive Debian's Chromium; nothing else is fetched.
    (cd "$browser_dir" && PLAYWRIGHT_SKIP_BROWSER_DOWNLOAD=1 npm ci --no-audit --no-fund) \
        || die "'npm ci' failed in $browser_dir"
fi

say "ready"
