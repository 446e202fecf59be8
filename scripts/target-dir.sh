#!/usr/bin/env bash
# Prints cargo's target directory for this workspace (absolute): where `cargo build` puts the binaries. It is
# CARGO_TARGET_DIR, or `build.target-dir` of a cargo config, or target/ at the root; asking cargo covers all three.
# The other scripts run `bash scripts/target-dir.sh` and take its output.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
metadata="$(cargo metadata --format-version 1 --no-deps)" \
    || { echo "target-dir.sh: 'cargo metadata' failed" >&2; exit 1; }
python3 -c 'import json, sys; print(json.load(sys.stdin)["target_directory"])' <<<"$metadata"
