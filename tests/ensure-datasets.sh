#!/usr/bin/env bash
# Real datasets beyond MNIST for the tests: Fashion-MNIST from Debian's dataset-fashion-mnist
# (/usr/share/datasets/fashion-mnist). MNIST itself comes from UNUS_DATA_DIR (the Makefile).
set -euo pipefail
if [ -d /usr/share/datasets/fashion-mnist ]; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "Fashion-MNIST is missing: installing the Debian package dataset-fashion-mnist"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends dataset-fashion-mnist >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends dataset-fashion-mnist >/dev/null; } \
        || echo "note: dataset-fashion-mnist could not be installed; the Fashion-MNIST tests will be skipped." >&2
    exit 0
fi
echo "note: Fashion-MNIST is not installed and this is not root; its tests will be skipped." >&2
echo "      install it with: sudo apt-get install dataset-fashion-mnist" >&2
