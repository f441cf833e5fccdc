#!/usr/bin/env bash
#! The test command (README): set up what the tests need on this machine, then run every test.
set -euo pipefail
cd "$(dirname "$0")/.."
bash installers/install-deps.sh --start
# The daemon starts the VM helper from beside its executable: built first, so that the client's
# VM tests find it even when the arguments below select only some packages.
cargo build -p gleaner-vmhost
cargo test --workspace --no-fail-fast "$@"
