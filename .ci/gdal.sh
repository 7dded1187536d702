#!/usr/bin/env bash
# Installs Debian's gdal-bin when ogrinfo is missing: tests/test_outputs.py opens the footprint
# files with it (as QGIS would, through GDAL) and skips that check without it.
set -euo pipefail
if command -v ogrinfo >/dev/null 2>&1; then
    exit 0
fi
if [ "$(id -u)" -ne 0 ]; then
    SUDO=sudo
else
    SUDO=
fi
export DEBIAN_FRONTEND=noninteractive
$SUDO apt-get update -qq
$SUDO apt-get install -y -qq --no-install-recommends gdal-bin >/dev/null
ogrinfo --version
