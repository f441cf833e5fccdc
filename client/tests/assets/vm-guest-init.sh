#!/bin/sh
#! /init of the test VM's busybox initramfs: mount the NoCloud seed and the MJF shares, run
#! user_data with a heartbeat, write an outcome to joboutputs/ and the serial console, power off.
/bin/busybox --install -s /bin
export PATH=/bin
mount -t proc proc /proc
mount -t sysfs sys /sys
mount -t devtmpfs dev /dev
say() { echo "gleaner-init: $*"; }
say "booted $(uname -r)"
while read -r m; do
  insmod "/lib/modules/$m.ko" || say "insmod $m failed"
done < /lib/modules/order

# The seed (a cidata ISO on a virtio disk) may take a moment to appear.
mkdir -p /seed
dev=""
for _ in $(seq 1 100); do
  dev=$(findfs LABEL=cidata 2>/dev/null) && break
  sleep 0.1
done
if [ -z "$dev" ] || ! mount -t iso9660 -o ro "$dev" /seed; then
  say "no cidata seed"
  poweroff -f
fi
cp /seed/user-data /user_data
say "seed on $dev: $(wc -c < /user_data) bytes of user_data"

for tag in machinefeatures jobfeatures joboutputs; do
  mkdir -p "/$tag"
  opt=ro
  [ "$tag" = joboutputs ] && opt=rw
  mount -t virtiofs -o "$opt" "$tag" "/$tag" || say "mount $tag failed"
done
export MACHINEFEATURES=/machinefeatures JOBFEATURES=/jobfeatures JOBOUTPUTS=/joboutputs
export USER_DATA=/user_data

outcome() {
  [ -s /joboutputs/shutdown_message ] || echo "$1" > /joboutputs/shutdown_message
  say "outcome: $(cat /joboutputs/shutdown_message)"
  sync
  umount /joboutputs
  poweroff -f
}

# The host's graceful stop is an ACPI power-button press. The button's input device delivers an
# event only when pressed, so reading one event is the whole watcher (no acpid configuration).
# (A test of the hard stop kills the watcher from user_data: kill $(cat /run/powerbutton.pid).)
mkdir -p /run
for ev in /sys/class/input/event*; do
  if [ "$(cat "$ev/device/name" 2>/dev/null)" = "Power Button" ]; then
    (
      dd if="/dev/$(basename "$ev" | sed 's|^|input/|')" bs=24 count=1 >/dev/null 2>&1 || exit
      echo "gleaner-init: acpi power button"
      [ -s /joboutputs/shutdown_message ] || echo "100 Shutdown as requested by the host" > /joboutputs/shutdown_message
      sync
      umount /joboutputs
      poweroff -f
    ) &
    echo $! > /run/powerbutton.pid
  fi
done
[ -s /run/powerbutton.pid ] || say "no power button: a graceful stop will time out"

# (A test of heartbeat loss stops it from user_data: kill $(cat /run/heartbeat.pid).)
(while :; do touch /joboutputs/heartbeat; sleep 1; done) &
echo $! > /run/heartbeat.pid
say "running user_data"
sh /user_data > /joboutputs/user_data.log 2>&1
rc=$?
say "user_data exited with $rc"
if [ "$rc" = 0 ]; then outcome "200 Success"; else outcome "500 user_data exited with $rc"; fi
