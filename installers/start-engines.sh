#!/usr/bin/env bash
#! Starts the engines the tests use (dockerd, libvirtd + virtlogd) in the background if they are not already answering.
set -euo pipefail

if ! docker version >/dev/null 2>&1; then
  echo "starting dockerd"
  mkdir -p /var/log
  (setsid dockerd >/var/log/gleaner-dockerd.log 2>&1 &)
  for _ in $(seq 1 60); do
    docker version >/dev/null 2>&1 && break
    sleep 0.5
  done
  docker version >/dev/null 2>&1 || { echo "dockerd did not start; see /var/log/gleaner-dockerd.log" >&2; exit 1; }
fi
echo "dockerd: $(docker version --format '{{.Server.Version}} (API {{.Server.APIVersion}})')"

# libvirt + QEMU for VMs. No systemd as PID 1 here, so the daemons are started by hand (each
# daemonises itself with -d); both are left alone when already running.
if command -v libvirtd >/dev/null; then
  # What udev would do: /dev/kvm usable by the kvm group, which the QEMU user (libvirt-qemu) is in.
  # Without it libvirt sees KVM "enabled when probed but not available now" and re-probes QEMU's
  # capabilities on every domain start (about a minute each on 2 cores).
  if [[ -c /dev/kvm ]] && getent group kvm >/dev/null; then
    chgrp kvm /dev/kvm && chmod 0660 /dev/kvm
  fi
  # Each refuses to start while another instance holds its pidfile, so a second call is harmless
  # (and a zombie left by a killed daemon cannot fool a pgrep check).
  virtlogd -d 2>/dev/null || true
  if ! virsh -c qemu:///system version >/dev/null 2>&1; then
    echo "starting libvirtd"
    libvirtd -d 2>/dev/null || true
    for _ in $(seq 1 60); do
      virsh -c qemu:///system version >/dev/null 2>&1 && break
      sleep 0.5
    done
    virsh -c qemu:///system version >/dev/null 2>&1 || { echo "libvirtd did not answer on qemu:///system" >&2; exit 1; }
  fi
  echo "libvirtd: $(virsh -c qemu:///system version | sed -n 's/^Running hypervisor: //p; s/^Using library: //p' | tr '\n' ' ')"
fi
