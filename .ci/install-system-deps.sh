#!/usr/bin/env bash
# System libraries FFCV needs to build and run (libturbojpeg, OpenCV, pkg-config).
set -euo pipefail
need=()
for pkg in pkg-config libturbojpeg0-dev libopencv-dev; do
  dpkg -s "$pkg" >/dev/null 2>&1 || need+=("$pkg")
done
if [ ${#need[@]} -gt 0 ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update -qq
  DEBIAN_FRONTEND=noninteractive $SUDO apt-get install -y -qq "${need[@]}"
fi
