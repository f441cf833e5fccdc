#!/usr/bin/env bash
#! The test command (README): set up what the tests need on this machine, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash installers/install-deps.sh --start
cargo test --workspace --no-fail-fast "$@"
