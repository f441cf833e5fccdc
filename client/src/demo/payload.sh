#!/bin/sh
# Gleaner demo payload: real computation (hashing chunks of data) with a heartbeat, stopping early
# when the host's shutdowntime arrives, then an outcome in Vac's shutdown_message format.
out=${JOBOUTPUTS:-/joboutputs}
mf=${MACHINEFEATURES:-/machinefeatures}
seconds=##user_data_work_seconds##
case "$seconds" in *[!0-9]*|'') seconds=20 ;; esac
echo "machine ##user_data_machine_id## in space ##user_data_space## working for $seconds s"
end=$(( $(date +%s) + seconds ))
chunks=0
while [ "$(date +%s)" -lt "$end" ]; do
  # One chunk of real work: SHA-256 over 16 MiB.
  dd if=/dev/zero bs=1048576 count=16 2>/dev/null | sha256sum >/dev/null
  chunks=$((chunks + 1))
  touch "$out/heartbeat"
  shutdown=$(cat "$mf/shutdowntime" 2>/dev/null || echo 0)
  if [ "$(date +%s)" -ge "$shutdown" ]; then
    echo "$chunks" >"$out/chunks"
    echo "100 Shutdown as requested by the host" >"$out/shutdown_message"
    exit 0
  fi
done
echo "$chunks" >"$out/chunks"
echo "200 Intended work completed ok ($chunks chunks)" >"$out/shutdown_message"
