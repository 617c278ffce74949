#!/usr/bin/env bash
# unus-edge uninstaller: the counterpart of install.sh (device and gateway alike).
#
#   sudo ./uninstall.sh [--purge] [--no-systemd]
#
# Stops and removes the unus-device / unus-aggregator units, Mosquitto's unus-edge drop-in
# and the virtual environment. Configuration (/etc/unus-edge), state (/var/lib/unus-edge:
# data, checkpoints) and the system user stay, unless --purge. Idempotent: what is already
# gone is skipped. Mosquitto itself (a Debian package) is left installed.
#
# The same environment variables as install.sh move the paths: UNUS_PREFIX, UNUS_ETC,
# UNUS_STATE, UNUS_SYSTEMD_DIR, UNUS_MOSQUITTO_CONF_D, UNUS_USER.
set -euo pipefail

say() { printf 'uninstall.sh: %s\n' "$*"; }
warn() { printf 'uninstall.sh: warning: %s\n' "$*" >&2; }
die() { printf 'uninstall.sh: error: %s\n' "$*" >&2; exit 1; }

PURGE=0
SYSTEMD=1
while [ $# -gt 0 ]; do
    case "$1" in
        --purge) PURGE=1; shift ;;
        --no-systemd) SYSTEMD=0; shift ;;
        -h|--help) sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done

PREFIX=${UNUS_PREFIX:-/opt/unus-edge}
ETC=${UNUS_ETC:-/etc/unus-edge}
STATE=${UNUS_STATE:-/var/lib/unus-edge}
UNIT_DIR=${UNUS_SYSTEMD_DIR:-/etc/systemd/system}
CONF_D=${UNUS_MOSQUITTO_CONF_D:-/etc/mosquitto/conf.d}
SERVICE_USER=${UNUS_USER:-unus}
ROOT=0
if [ "$(id -u)" -eq 0 ]; then ROOT=1; fi

if [ "$SYSTEMD" = 1 ] && { [ ! -d /run/systemd/system ] || ! command -v systemctl >/dev/null 2>&1; }; then
    SYSTEMD=0
fi
for unit in unus-device.service unus-aggregator.service; do
    if [ "$SYSTEMD" = 1 ]; then
        systemctl disable --now "$unit" >/dev/null 2>&1 || true
    fi
    if [ -e "$UNIT_DIR/$unit" ]; then
        rm -f "$UNIT_DIR/$unit"
        say "removed $UNIT_DIR/$unit"
    fi
done
if [ "$SYSTEMD" = 1 ]; then
    systemctl daemon-reload
fi
if [ -e "$CONF_D/unus-edge.conf" ]; then
    rm -f "$CONF_D/unus-edge.conf" "$CONF_D/unus-edge.conf.new"
    say "removed Mosquitto's drop-in $CONF_D/unus-edge.conf"
    if [ "$SYSTEMD" = 1 ]; then
        systemctl restart mosquitto.service || warn "mosquitto did not restart: journalctl -u mosquitto"
    fi
fi
if [ -d "$PREFIX" ]; then
    # Only a venv made by install.sh: never rm -rf a folder that is not one.
    if [ -f "$PREFIX/pyvenv.cfg" ] && [ -x "$PREFIX/bin/unus-edge" ]; then
        rm -rf "$PREFIX"
        say "removed $PREFIX"
    else
        warn "$PREFIX is not an unus-edge virtual environment: left alone"
    fi
fi
if [ "$PURGE" = 1 ]; then
    for folder in "$ETC" "$STATE"; do
        case "${folder%/}" in
            ""|/|/etc|/var|/var/lib|/opt|/usr|/home|/root) die "refusing to remove $folder" ;;
        esac
        if [ -d "$folder" ]; then
            rm -rf "$folder"
            say "removed $folder"
        fi
    done
    if [ "$ROOT" = 1 ] && [ "$SERVICE_USER" = unus ] && id -u unus >/dev/null 2>&1; then
        userdel unus
        say "removed the system user unus"
    fi
else
    say "kept $ETC and $STATE (remove them with --purge)"
fi
say "done"
