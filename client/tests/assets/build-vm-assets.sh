#!/usr/bin/env bash
#! Builds the test VM (a Debian cloud kernel + a busybox-static initramfs running vm-guest-init.sh)
#! into OUTDIR, once: a rerun with the same kernel package and init script does nothing.
# Usage: build-vm-assets.sh OUTDIR
# Needs: apt (with package lists), dpkg-deb, cpio, gzip, busybox-static. GLEANER_VM_KERNEL_DEB may
# name a local linux-image-*-cloud-amd64 .deb to use instead of downloading one.
set -euo pipefail
out=${1:?usage: build-vm-assets.sh OUTDIR}
here=$(cd "$(dirname "$0")" && pwd)
mkdir -p "$out"

deb=${GLEANER_VM_KERNEL_DEB:-}
if [[ -z "$deb" ]]; then
  # The exact package the metapackage points at: a wildcard download would fetch gigabytes.
  pkg=$(apt-cache depends linux-image-cloud-amd64 2>/dev/null | sed -n 's/^ *Depends: \(linux-image-[^ ]*-cloud-amd64\)$/\1/p' | head -1)
  [[ -n "$pkg" ]] || { echo "build-vm-assets: no linux-image-cloud-amd64 in the apt lists (apt-get update?)" >&2; exit 1; }
else
  pkg=$(basename "$deb")
fi
stamp="$pkg $(sha256sum "$here/vm-guest-init.sh" "$0" | sha256sum | cut -c1-16)"
if [[ -f "$out/stamp" && "$(cat "$out/stamp")" == "$stamp" && -f "$out/vmlinuz" && -f "$out/initrd.img" ]]; then
  exit 0
fi

work=$(mktemp -d "$out/.build.XXXXXX")
trap 'rm -rf "$work"' EXIT
if [[ -z "$deb" ]]; then
  (cd "$work" && apt-get download -q "$pkg" >/dev/null 2>&1 || apt-get download "$pkg")
  deb=$(ls "$work"/linux-image-*.deb)
fi
dpkg-deb -x "$deb" "$work/k"
kver=$(ls "$work/k/lib/modules")
mods="$work/k/lib/modules/$kver/kernel"

root="$work/root"
mkdir -p "$root"/{bin,dev,proc,sys,etc,lib/modules}
cp /bin/busybox "$root/bin/busybox"
ln -s busybox "$root/bin/sh"
install -m 0755 "$here/vm-guest-init.sh" "$root/init"
# Dependencies first (no depmod here): virtio PCI transport, the seed disk (virtio-blk + iso9660),
# the MJF shares (virtiofs), the memory balloon (live memory limits) and the ACPI power button
# (button + evdev for acpid).
order=(
  drivers/virtio/virtio_ring drivers/virtio/virtio drivers/virtio/virtio_pci_modern_dev
  drivers/virtio/virtio_pci_legacy_dev drivers/virtio/virtio_pci drivers/virtio/virtio_balloon
  drivers/block/virtio_blk
  drivers/cdrom/cdrom fs/isofs/isofs fs/fuse/fuse fs/fuse/virtiofs drivers/acpi/button
  drivers/input/evdev
)
: > "$root/lib/modules/order"
for m in "${order[@]}"; do
  name=$(basename "$m")
  cp "$mods/$m.ko" "$root/lib/modules/$name.ko"
  echo "$name" >> "$root/lib/modules/order"
done
(cd "$root" && find . | cpio -o -H newc --quiet | gzip -6) > "$work/initrd.img"
cp "$work/k/boot/vmlinuz-$kver" "$work/vmlinuz"
mv "$work/vmlinuz" "$out/vmlinuz"
mv "$work/initrd.img" "$out/initrd.img"
echo "$stamp" > "$out/stamp"
echo "build-vm-assets: kernel $kver, initrd $(stat -c %s "$out/initrd.img") bytes in $out"
