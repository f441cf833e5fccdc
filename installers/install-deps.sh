#!/usr/bin/env bash
#! Installs (idempotently) the system packages that Gleaner's build and tests need on Debian.
# Usage: installers/install-deps.sh [--start]
#   --start  also start the daemons the tests use (dockerd, libvirtd) if they are not running.
set -euo pipefail

PKGS=(
  pkg-config          # build: -sys crates
  docker.io           # runtime: containers (Docker Engine)
  libvirt-daemon-system  # runtime: VMs (libvirtd, virtlogd, the libvirt-qemu user)
  libvirt-daemon-driver-qemu
  libvirt-clients     # tests: virsh as an independent check (dumpxml, schedinfo)
  libvirt-dev         # build: virt-sys links libvirt
  qemu-system-x86     # runtime: the VMs themselves (TCG, or KVM when a test boot works)
  qemu-utils          # runtime: qemu-img for per-machine copy-on-write overlays
  genisoimage         # runtime: the NoCloud (cidata) seed that carries user_data
  cpio                # test assets: the VM's busybox initramfs
  busybox-static      # test assets: a rootfs for the container image
  iproute2            # tests: network namespaces
  iptables            # runtime: egress policies (a chain per filtered container; docker.io pulls it in too)
  chromium            # tests: the dashboard in a real (headless) browser
  postgresql          # tests: the coordinator on PostgreSQL (each test starts its own cluster)
  util-linux          # tests: runuser (a caller without permission)
  xvfb                # tests: a real X server for owner-activity detection
  xdotool             # tests: the owner moving the mouse
  debootstrap         # installer tests: a fresh Debian root to install the packages into
  dpkg-dev            # packages: dpkg-shlibdeps for cargo-deb's $auto dependencies
  shellcheck          # installer tests: maintainer scripts and install.sh
  systemd             # installer tests: systemd-analyze verify (no systemd as PID 1 here)
  desktop-file-utils  # installer tests: desktop-file-validate for the GUI's desktop entry
  dbus-daemon         # tests: a private bus serving a stand-in logind (owner idle source)
  slurmctld           # tests: a real one-node Slurm cluster on loopback (cluster nodes)
  slurmd
  slurm-client
  munge
  libgl1-mesa-dri     # GUI tests: Mesa's llvmpipe renders the window in Xvfb with no GPU
  libglx-mesa0        # GUI tests: GLX for glutin on the X server
  libegl1             # GUI: EGL, which glutin tries first
  libegl-mesa0        # GUI: Mesa's EGL vendor library
  libxkbcommon-x11-0  # GUI: winit loads the keyboard map and these X libraries at run time
  libxcursor1
  libxrandr2
  libxi6
)

missing=()
for p in "${PKGS[@]}"; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if ((${#missing[@]})); then
  echo "installing: ${missing[*]}"
  export DEBIAN_FRONTEND=noninteractive
  apt-get update -qq
  apt-get install -y -qq --no-install-recommends "${missing[@]}" >/dev/null
fi

# The pinned cargo-deb the installer tests and releases build packages with (about a minute, once).
bash "$(dirname "$0")/build-debs.sh" --install-tool

if [[ "${1:-}" == "--start" ]]; then
  "$(dirname "$0")/start-engines.sh"
fi
