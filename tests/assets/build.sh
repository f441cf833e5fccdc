#!/usr/bin/env bash
#! Builds the test assets the runtime tests need, once, cached under target/test-assets/ keyed by
#! their inputs' content. Today: a busybox-static container image as a docker-archive tarball
#! (`docker save` format), the shape of a content-addressed machine-type image.
#
# Usage: tests/assets/build.sh            prints "<path> <sha256>" of the image tarball
# Needs: busybox-static and a running dockerd (installers/install-deps.sh --start).
# The engine is left as it was: the image is imported, saved by id, then removed.
set -euo pipefail

root=$(cd "$(dirname "$0")/../.." && pwd)
out="${CARGO_TARGET_DIR:-$root/target}/test-assets"
busybox=${BUSYBOX:-/bin/busybox}
mkdir -p "$out"

[[ -x "$busybox" ]] || { echo "build.sh: $busybox is missing (apt-get install busybox-static)" >&2; exit 1; }
"$busybox" --list-full >/dev/null 2>&1 || { echo "build.sh: $busybox is not a static busybox with --list-full" >&2; exit 1; }

key=$( { sha256sum "$0" "$busybox" | cut -d' ' -f1; } | sha256sum | cut -c1-16)
tarball="$out/busybox-$key.tar"

# One builder at a time: test binaries run in parallel and all ask for the same asset.
exec 9>"$out/.build.lock"
flock 9

if [[ ! -s "$tarball" ]]; then
  work=$(mktemp -d "$out/.build-XXXXXX")
  trap 'rm -rf "$work"' EXIT
  rootfs="$work/rootfs"
  mkdir -p "$rootfs"/{bin,sbin,usr/bin,usr/sbin,etc,tmp,scratch,proc,sys,dev,machinefeatures,jobfeatures,joboutputs}
  chmod 1777 "$rootfs/tmp" "$rootfs/scratch"
  cp "$busybox" "$rootfs/bin/busybox"
  for applet in $("$busybox" --list-full); do
    [[ "$applet" == bin/busybox ]] && continue
    mkdir -p "$rootfs/$(dirname "$applet")"
    ln -sf /bin/busybox "$rootfs/$applet"
  done
  printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/nonexistent:/bin/sh\n' >"$rootfs/etc/passwd"
  printf 'root:x:0:\nnogroup:x:65534:\n' >"$rootfs/etc/group"
  tag="gleaner-test-assets/busybox:$key-$$"
  # Sorted names and fixed times keep the layer stable across runs of this script.
  tar --sort=name --mtime=@0 --owner=0 --group=0 --numeric-owner -C "$rootfs" -cf "$work/rootfs.tar" .
  id=$(docker import \
        --change 'ENV PATH=/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/bin/sh", "/user_data"]' \
        "$work/rootfs.tar" "$tag")
  # Saved by id, so the archive carries no tag that loading it would create in the engine.
  docker save -o "$work/image.tar" "$id"
  docker rmi "$tag" >/dev/null
  mv "$work/image.tar" "$tarball"
  # Older builds (other keys) are stale now.
  find "$out" -maxdepth 1 -name 'busybox-*.tar' ! -name "$(basename "$tarball")" -delete
fi

echo "$tarball $(sha256sum "$tarball" | cut -d' ' -f1)"
