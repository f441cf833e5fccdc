#!/usr/bin/env bash
#! Builds Gleaner's Debian packages (client, coordinator, and the GUI once gui/ has its metadata) with
#! a pinned cargo-deb, from the debug binaries (CI) or from a release build (--release).
#
# Usage: installers/build-debs.sh [--release] [--out DIR] [--install-tool]
#   (default)       package the debug binaries already in target/debug (built here if missing);
#                   fast enough for CI, large and slow binaries: not for distribution
#   --release       cargo build --profile dist (release + fat LTO), then package: what a real release ships
#   --out DIR       where the .deb files go [default: target/debian]
#   --install-tool  only make sure the pinned cargo-deb is installed, then exit
# Env: GLEANER_DEBS_NO_BUILD=1 fails instead of building a missing debug binary.
set -euo pipefail

# Pinned: 3.8.0 builds on Rust 1.95 and still accepts the dev profile (with a warning that a later
# version will refuse it; a bump must check that, or move CI to a custom profile).
CARGO_DEB_VERSION=3.8.0

cd "$(dirname "$0")/.."
profile=dev
out=target/debian
tool_only=false
while (($#)); do
  case "$1" in
    --release) profile=dist ;;
    --out) out=${2:?--out needs a directory}; shift ;;
    --install-tool) tool_only=true ;;
    *) echo "build-debs.sh: unknown argument '$1' (see the usage at the top of the script)" >&2; exit 2 ;;
  esac
  shift
done

have=$(cargo deb --version 2>/dev/null | awk '{print $2}' || true)
if [[ "$have" != "$CARGO_DEB_VERSION" ]]; then
  echo "installing cargo-deb $CARGO_DEB_VERSION (found: ${have:-none})"
  cargo install cargo-deb --version "$CARGO_DEB_VERSION" --locked --quiet
fi
$tool_only && exit 0

command -v dpkg-shlibdeps >/dev/null || {
  echo "build-debs.sh: dpkg-shlibdeps not found; apt-get install dpkg-dev (it computes the packages' library dependencies)" >&2
  exit 1
}

# crate:binary for every crate whose Cargo.toml has a [package.metadata.deb] section.
crates=()
for pair in gleaner-client:client:gleaner gleaner-coordinator:coordinator:gleaner-coordinator gleaner-gui:gui:gleaner-gui; do
  IFS=: read -r crate dir bin <<<"$pair"
  if [[ -f "$dir/Cargo.toml" ]] && grep -q '^\[package.metadata.deb\]' "$dir/Cargo.toml"; then
    crates+=("$crate:$bin")
  elif [[ -f "$dir/Cargo.toml" ]]; then
    echo "note: $dir/Cargo.toml has no [package.metadata.deb]; no $crate package (see installers/debian/$dir/)" >&2
  fi
done

# Where cargo puts the binaries: CARGO_TARGET_DIR when set (cargo-deb follows it too), else target/.
target_dir=${CARGO_TARGET_DIR:-target}

mkdir -p "$out"
for pair in "${crates[@]}"; do
  IFS=: read -r crate bin <<<"$pair"
  # The client package also ships the VM helper (its own crate, vmhost/), beside `gleaner`.
  builds=("$crate:$bin")
  [[ $crate == gleaner-client ]] && builds+=("gleaner-vmhost:gleaner-vmhost")
  for b in "${builds[@]}"; do
    IFS=: read -r bcrate bbin <<<"$b"
    if [[ $profile == dist ]]; then
      cargo build --profile dist --locked -p "$bcrate"
    elif [[ ! -x "$target_dir/debug/$bbin" ]]; then
      # The installer tests run inside `cargo test`, which already built every binary: no nested cargo.
      if [[ -n "${GLEANER_DEBS_NO_BUILD:-}" ]]; then
        echo "build-debs.sh: $target_dir/debug/$bbin is missing; cargo build -p $bcrate (or cargo test --workspace) first" >&2
        exit 1
      fi
      cargo build --locked -p "$bcrate"
    fi
  done
  # --no-build: the binary is the one just built (or the one cargo test built); -q hides the
  # dev-profile warning, which is expected here.
  args=(-p "$crate" --no-build --profile "$profile" -o "$out")
  [[ $profile == dev ]] && args+=(-q --fast)
  # cargo-deb prints the path of the package it wrote.
  echo "built $(cargo deb "${args[@]}")"
done
