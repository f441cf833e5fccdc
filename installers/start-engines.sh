#!/usr/bin/env bash
#! Starts the engines the tests use (dockerd) in the background if they are not already answering.
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
