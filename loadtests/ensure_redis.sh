#!/usr/bin/env bash
# Make sure Debian's redis-server is installed (the Celery peer of the bus benchmark needs it).
# Installs with apt-get only when `redis-server` is missing; never starts a service: the
# benchmark runs its own throw-away server on a free loopback port and stops it afterwards.
set -euo pipefail

if command -v redis-server >/dev/null 2>&1; then
  exit 0
fi
if ! command -v apt-get >/dev/null 2>&1; then
  echo "redis-server is missing and apt-get is not available" >&2
  exit 1
fi
SUDO=""
if [ "$(id -u)" -ne 0 ]; then
  if command -v sudo >/dev/null 2>&1 && sudo -n true 2>/dev/null; then
    SUDO="sudo -n"
  else
    echo "redis-server is missing and installing it needs root (apt-get install redis-server)" >&2
    exit 1
  fi
fi
export DEBIAN_FRONTEND=noninteractive
# Only the binary is needed: where an init system runs, Debian also starts a system service on
# the default port, which the benchmark neither uses nor touches.
$SUDO apt-get update -qq >/dev/null
$SUDO apt-get install -y -qq --no-install-recommends redis-server >/dev/null
command -v redis-server >/dev/null 2>&1
