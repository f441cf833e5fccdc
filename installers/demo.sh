#!/usr/bin/env bash
#! The main job (README): set up this machine if needed (engines, build), then run `gleaner demo`,
#! a whole local space with credit on the dashboard. Extra arguments go to `gleaner demo`.
set -euo pipefail
cd "$(dirname "$0")/.."
bash installers/install-deps.sh --start
cargo build --workspace --bins
exec ./target/debug/gleaner demo "$@"
