#!/usr/bin/env bash
#! Makes (once, cached under target/installers/) a fresh minimal Debian 12 root as a tarball, for the
#! installer tests to `docker import`: debootstrap minbase plus systemd (for `systemd-analyze verify`
#! and the deb-systemd-helper paths of the maintainer scripts). Prints the tarball's path.
# Needs: debootstrap (installers/install-deps.sh), root, and the Debian mirror.
set -euo pipefail

cd "$(dirname "$0")/../.."
cache=$PWD/target/installers
tarball=$cache/bookworm-minbase-systemd.tar
mirror=${DEBIAN_MIRROR:-http://deb.debian.org/debian}
mkdir -p "$cache"

# Parallel tests share one cache: the first one builds, the others wait.
exec 9>"$cache/.debian-root.lock"
flock 9
if [[ ! -s $tarball ]]; then
  command -v debootstrap >/dev/null || { echo "debian-root.sh: debootstrap not found; run installers/install-deps.sh" >&2; exit 1; }
  root=$(mktemp -d "$cache/root.XXXXXX")
  trap 'rm -rf "$root"' EXIT
  if ! debootstrap --variant=minbase --include=systemd bookworm "$root" "$mirror" >"$cache/debootstrap.log" 2>&1; then
    echo "debian-root.sh: debootstrap from $mirror failed; see $cache/debootstrap.log" >&2
    tail -n 20 "$cache/debootstrap.log" >&2
    exit 1
  fi
  rm -rf "$root"/var/cache/apt/archives/*.deb "$root"/var/lib/apt/lists/*
  tar -C "$root" -cf "$tarball.tmp" .
  mv "$tarball.tmp" "$tarball"
fi
echo "$tarball"
