#!/usr/bin/env bash
# Runs relayhub's fuzz targets (fuzz/fuzz_targets) with cargo-fuzz and libFuzzer, each for a bounded time.
#
#   scripts/fuzz.sh                 every target for FUZZ_SECONDS (30) each
#   scripts/fuzz.sh TARGET [SECS]   one target
#
# cargo-fuzz is installed with `cargo install cargo-fuzz` when missing. libFuzzer's instrumentation needs
# unstable compiler flags: on a stable toolchain they are enabled with RUSTC_BOOTSTRAP=1, for this build only.
# The seed corpus is fuzz/corpus/TARGET (small, in the repository); what a run adds goes to a scratch copy, so
# the repository's corpus only changes by hand. A crash leaves its input in fuzz/artifacts/TARGET and fails.
set -euo pipefail
cd "$(dirname "$0")/.."

seconds="${2:-${FUZZ_SECONDS:-30}}"
if ! command -v cargo-fuzz >/dev/null 2>&1; then
    echo "fuzz.sh: cargo-fuzz not found; installing it (cargo install cargo-fuzz --locked)" >&2
    cargo install cargo-fuzz --locked >&2
fi
if ! rustc --version | grep -q nightly; then export RUSTC_BOOTSTRAP=1; fi

targets=("$@")
[[ ${#targets[@]} -gt 0 ]] && targets=("$1") || mapfile -t targets < <(cargo fuzz list --fuzz-dir fuzz)
# cargo-fuzz builds into fuzz/target unless CARGO_TARGET_DIR says otherwise; keep it apart from the hub's.
export CARGO_TARGET_DIR="${FUZZ_TARGET_DIR:-$PWD/fuzz/target}"
cargo fuzz build --fuzz-dir fuzz -O --debug-assertions
scratch="$(mktemp -d)"
trap 'rm -rf "$scratch"' EXIT
for target in "${targets[@]}"; do
    echo "==> fuzz $target for ${seconds}s"
    mkdir -p "$scratch/$target"
    cp -r "fuzz/corpus/$target/." "$scratch/$target/"
    # libFuzzer's progress lines (`#1234 NEW ...`) are dropped; everything else, a crash report included, stays.
    set +e
    cargo fuzz run --fuzz-dir fuzz -O --debug-assertions "$target" "$scratch/$target" -- \
        -max_total_time="$seconds" -max_len=65536 -timeout=10 -rss_limit_mb=2048 -print_final_stats=1 2>&1 \
        | grep -Ev '^#[0-9]+[[:space:]]'
    status="${PIPESTATUS[0]}"
    set -e
    if [[ "$status" -ne 0 ]]; then
        echo "fuzz.sh: $target failed (exit $status); the input is in fuzz/artifacts/$target/" >&2
        exit 1
    fi
done
echo "fuzz.sh: ${#targets[@]} targets ran ${seconds}s each without a crash"
