#!/usr/bin/env bash
# Make sure the mosquitto binary exists for the integration tests. The tests start their own
# broker on a free loopback port; nothing is started here.
set -euo pipefail
if command -v mosquitto >/dev/null 2>&1 || [ -x /usr/sbin/mosquitto ]; then
    exit 0
fi
if [ "$(id -u)" = "0" ] && command -v apt-get >/dev/null 2>&1; then
    echo "mosquitto is missing: installing the Debian package (and its clients)"
    export DEBIAN_FRONTEND=noninteractive
    apt-get install -y --no-install-recommends mosquitto mosquitto-clients >/dev/null \
        || { apt-get update >/dev/null && apt-get install -y --no-install-recommends mosquitto mosquitto-clients >/dev/null; }
    # The package may start a system broker on :1883; the tests do not use it.
    exit 0
fi
echo "note: mosquitto is not installed and this is not root; the mosquitto tests will be skipped." >&2
echo "      install it with: sudo apt-get install mosquitto mosquitto-clients" >&2
