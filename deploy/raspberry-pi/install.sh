#!/usr/bin/env bash
# unus-edge installer for Raspberry Pi OS Bookworm (and Debian 12): a device or a gateway.
#
#   sudo ./install.sh --role device  [--bundle DIR] [--no-systemd] [--no-apt]
#   sudo ./install.sh --role gateway [--bundle DIR [--job NAME]] [--replace-credentials] [--no-systemd] [--no-apt]
#
# Idempotent: run it again to upgrade. It installs unus-edge into a virtual environment
# (Bookworm's Python refuses system-wide pip), creates the system user "unus", writes the
# configuration into /etc/unus-edge/ only where there is none yet (otherwise next to it, as
# <name>.new), and installs the systemd units (not with --no-systemd: containers, tests).
#
# --bundle DIR   what `unus-edge provision` made for this machine: fleet/devices/<id> for a
#                device (device.toml, password, ca.crt), fleet/gateway for the gateway
#                (certificates, Mosquitto password file and ACL, <job>.toml and passwords).
# --job NAME     gateway: which <job>.toml of the bundle becomes /etc/unus-edge/job.toml.
# --replace-credentials  gateway: replace the broker's password file, ACL and certificates
#                with the bundle's (after a re-provisioning), keeping the old ones as .old.
# --no-apt       never call apt-get (by default, as root, it installs python3-venv when
#                missing, and mosquitto on a gateway).
#
# Every path can be moved with an environment variable:
#   UNUS_PREFIX (/opt/unus-edge)  UNUS_ETC (/etc/unus-edge)  UNUS_STATE (/var/lib/unus-edge)
#   UNUS_SYSTEMD_DIR (/etc/systemd/system)  UNUS_MOSQUITTO_CONF_D (/etc/mosquitto/conf.d)
#   UNUS_USER (unus)  UNUS_PYTHON (python3)
#   UNUS_SOURCE   what pip installs: this checkout by default, else "unus-edge"; or a wheel
#   UNUS_EXTRAS   pip extras: none on a device; "onnx" on a 64-bit gateway (onnxruntime)
#   UNUS_PIP_ARGS extra pip arguments (--index-url ..., --no-index --find-links ...)
#   UNUS_KEEP_PIP=1  keep pip and setuptools in the venv (removed by default: -26 MB)
set -euo pipefail

say() { printf 'install.sh: %s\n' "$*"; }
warn() { printf 'install.sh: warning: %s\n' "$*" >&2; }
die() { printf 'install.sh: error: %s\n' "$*" >&2; exit 1; }
usage() { sed -n '2,/^set -euo/p' "$0" | sed -e '$d' -e 's/^# \{0,1\}//'; }

ROLE=""
SYSTEMD=1
APT=1
BUNDLE=""
JOB=""
REPLACE_CREDENTIALS=0
while [ $# -gt 0 ]; do
    case "$1" in
        --role) [ $# -ge 2 ] || die "--role needs device or gateway"; ROLE=$2; shift 2 ;;
        --role=*) ROLE=${1#*=}; shift ;;
        --bundle) [ $# -ge 2 ] || die "--bundle needs a folder"; BUNDLE=$2; shift 2 ;;
        --bundle=*) BUNDLE=${1#*=}; shift ;;
        --job) [ $# -ge 2 ] || die "--job needs a name"; JOB=$2; shift 2 ;;
        --job=*) JOB=${1#*=}; shift ;;
        --no-systemd) SYSTEMD=0; shift ;;
        --no-apt) APT=0; shift ;;
        --replace-credentials) REPLACE_CREDENTIALS=1; shift ;;
        -h|--help) usage; exit 0 ;;
        *) die "unknown option: $1 (see --help)" ;;
    esac
done
case "$ROLE" in
    device|gateway) ;;
    "") die "--role device|gateway is required" ;;
    *) die "--role must be device or gateway, not '$ROLE'" ;;
esac
if [ -n "$BUNDLE" ] && [ ! -d "$BUNDLE" ]; then
    die "--bundle $BUNDLE is not a folder"
fi

HERE=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
PREFIX=${UNUS_PREFIX:-/opt/unus-edge}
ETC=${UNUS_ETC:-/etc/unus-edge}
STATE=${UNUS_STATE:-/var/lib/unus-edge}
UNIT_DIR=${UNUS_SYSTEMD_DIR:-/etc/systemd/system}
CONF_D=${UNUS_MOSQUITTO_CONF_D:-/etc/mosquitto/conf.d}
SERVICE_USER=${UNUS_USER:-unus}
PYTHON=${UNUS_PYTHON:-python3}
PIP_ARGS=${UNUS_PIP_ARGS:-}
KEEP_PIP=${UNUS_KEEP_PIP:-0}
if [ -n "${UNUS_SOURCE:-}" ]; then
    SOURCE=$UNUS_SOURCE
elif [ -f "$HERE/../../pyproject.toml" ]; then
    SOURCE=$(cd "$HERE/../.." && pwd)
else
    SOURCE=unus-edge
fi
ARCH=$(uname -m)
case "$ARCH" in
    armv6l|armv7l|armhf) BITS=32 ;;
    *) BITS=64 ;;
esac
if [ -n "${UNUS_EXTRAS+set}" ]; then
    EXTRAS=$UNUS_EXTRAS
elif [ "$ROLE" = gateway ] && [ "$BITS" = 64 ]; then
    EXTRAS=onnx
else
    EXTRAS=""
fi
ROOT=0
if [ "$(id -u)" -eq 0 ]; then ROOT=1; fi
DATA=""
BROKER_BEFORE=""
BROKER_AFTER=""

# ------------------------------------------------------------------------------ checks
if [ -r /etc/os-release ]; then
    CODENAME=$(sed -n 's/^VERSION_CODENAME=//p' /etc/os-release | tr -d '"')
    if [ "$CODENAME" != bookworm ]; then
        warn "made for Raspberry Pi OS / Debian bookworm, this is '${CODENAME:-unknown}': continuing"
    fi
fi
if [ "$BITS" = 32 ]; then
    say "32-bit ($ARCH): onnxruntime has no armhf wheels, so unus-edge runs (and evaluates) with NumPy alone"
    case ",$EXTRAS," in
        *,onnx,*) warn "UNUS_EXTRAS=$EXTRAS asks for onnxruntime, which does not exist for $ARCH" ;;
    esac
fi

apt_install() {
    if [ "$APT" = 1 ] && [ "$ROOT" = 1 ] && command -v apt-get >/dev/null 2>&1; then
        say "apt-get install $*"
        DEBIAN_FRONTEND=noninteractive apt-get install -y -q "$@" >/dev/null
        return 0
    fi
    return 1
}

command -v "$PYTHON" >/dev/null 2>&1 || apt_install python3 || die "$PYTHON not found (apt-get install python3)"
"$PYTHON" -c 'import sys; sys.exit(sys.version_info < (3, 11))' \
    || die "$PYTHON is $("$PYTHON" -V 2>&1): unus-edge needs Python 3.11 or newer"
if [ ! -x "$PREFIX/bin/python" ] && ! "$PYTHON" -c 'import ensurepip, venv' >/dev/null 2>&1; then
    apt_install python3-venv || die "$PYTHON cannot create virtual environments: apt-get install python3-venv"
fi
if [ "$ROLE" = gateway ] && ! command -v mosquitto >/dev/null 2>&1 && [ ! -x /usr/sbin/mosquitto ]; then
    apt_install mosquitto mosquitto-clients || warn "mosquitto is not installed: apt-get install mosquitto mosquitto-clients"
fi

# ------------------------------------------------------------------------------ user and folders
SERVICE_GROUP=$SERVICE_USER
if [ "$ROOT" = 1 ]; then
    if ! id -u "$SERVICE_USER" >/dev/null 2>&1; then
        say "creating the system user $SERVICE_USER"
        useradd --system --user-group --home-dir "$STATE" --no-create-home \
            --shell /usr/sbin/nologin --comment "unus-edge" "$SERVICE_USER"
    fi
    SERVICE_GROUP=$(id -gn "$SERVICE_USER")
    OWNER=(-o root -g "$SERVICE_GROUP")
    STATE_OWNER=(-o "$SERVICE_USER" -g "$SERVICE_GROUP")
else
    warn "not root: no system user, files keep your ownership"
    OWNER=()
    STATE_OWNER=()
fi
install -d -m 0755 "$PREFIX"
# 0751: the mosquitto user must traverse it to reach broker/ (it is not in the service group);
# every file in it has its own restrictive mode, and others cannot list it.
install -d -m 0751 "${OWNER[@]}" "$ETC"
install -d -m 0750 "${STATE_OWNER[@]}" "$STATE"

# ------------------------------------------------------------------------------ the venv
if [ ! -x "$PREFIX/bin/python" ]; then
    say "creating the virtual environment $PREFIX"
    "$PYTHON" -m venv "$PREFIX"
fi
if ! "$PREFIX/bin/python" -m pip --version >/dev/null 2>&1; then
    "$PREFIX/bin/python" -m ensurepip --default-pip >/dev/null
fi
SPEC=$SOURCE
if [ -n "$EXTRAS" ]; then SPEC="${SOURCE}[${EXTRAS}]"; fi
say "pip install $SPEC"
# shellcheck disable=SC2086  # UNUS_PIP_ARGS is a list of arguments
"$PREFIX/bin/python" -m pip install --quiet --disable-pip-version-check --upgrade $PIP_ARGS "$SPEC"
if [ "$KEEP_PIP" != 1 ]; then
    "$PREFIX/bin/python" -m pip uninstall --quiet --yes pip setuptools >/dev/null 2>&1 || true
fi
VERSION=$("$PREFIX/bin/unus-edge" --version) || die "$PREFIX/bin/unus-edge does not run"
say "installed $VERSION in $PREFIX ($(du -sh "$PREFIX" | cut -f1))"

# ------------------------------------------------------------------------------ files
escape() { printf '%s' "$1" | sed -e 's/[|&\\]/\\&/g'; }
relocate() {  # a bundle's configuration with provision's default folders moved to this install's
    if [ "$ETC" != /etc/unus-edge ] || [ "$STATE" != /var/lib/unus-edge ]; then
        if grep -q -e '"/etc/unus-edge/' -e '"/var/lib/unus-edge/' "$1"; then
            warn "$(basename "$1"): paths under /etc/unus-edge and /var/lib/unus-edge moved to $ETC and $STATE"
        fi
    fi
    sed -e "s|\"/etc/unus-edge/|\"$(escape "$ETC")/|g" -e "s|\"/var/lib/unus-edge/|\"$(escape "$STATE")/|g" "$1"
}
render() {  # the shipped file with the default paths and user replaced by this install's
    sed -e "s|/opt/unus-edge|$(escape "$PREFIX")|g" \
        -e "s|/etc/unus-edge|$(escape "$ETC")|g" \
        -e "s|/var/lib/unus-edge|$(escape "$STATE")|g" \
        -e "s|^User=unus\$|User=$(escape "$SERVICE_USER")|" \
        -e "s|^Group=unus\$|Group=$(escape "$SERVICE_GROUP")|" "$1"
}
NEW_FILES=()
place() {  # place SOURCE DEST MODE [GROUP [TEMPLATE]]: install, or DEST.new when DEST differs
    # (a DEST still equal to TEMPLATE, the untouched template an earlier run wrote, is replaced)
    local source=$1 dest=$2 mode=$3 group=${4:-} template=${5:-} target
    target=$dest
    if [ -e "$dest" ] && [ -n "$template" ] && cmp -s "$template" "$dest"; then
        rm -f "$dest"
    fi
    if [ -e "$dest" ]; then
        if cmp -s "$source" "$dest"; then return 0; fi
        target="$dest.new"
        if [ -e "$target" ] && cmp -s "$source" "$target"; then return 0; fi
        NEW_FILES+=("$target")
    fi
    if [ "$ROOT" = 1 ]; then
        install -m "$mode" -o root -g "${group:-root}" "$source" "$target"
    else
        install -m "$mode" "$source" "$target"
    fi
}
replace() {  # replace SOURCE DEST MODE GROUP: install, keeping a different DEST as DEST.old
    local source=$1 dest=$2 mode=$3 group=$4
    rm -f "$dest.new"
    if [ -e "$dest" ] && cmp -s "$source" "$dest"; then return 0; fi
    if [ -e "$dest" ]; then cp -p "$dest" "$dest.old"; fi
    if [ "$ROOT" = 1 ]; then
        install -m "$mode" -o root -g "$group" "$source" "$dest"
    else
        install -m "$mode" "$source" "$dest"
    fi
}
WORK=$(mktemp -d)
trap 'rm -rf "$WORK"' EXIT

SHARE="$PREFIX/share/unus-edge"
install -d -m 0755 "$SHARE" "$SHARE/systemd"
for unit in unus-device.service unus-aggregator.service; do
    render "$HERE/$unit" >"$SHARE/systemd/$unit"
done
render "$HERE/mosquitto-unus-edge.conf" >"$SHARE/mosquitto-unus-edge.conf"
install -m 0644 "$HERE/README.md" "$SHARE/README.md"

if [ "$ROLE" = device ]; then
    id=$(uname -n | tr -c 'A-Za-z0-9_.\n-' '-' | cut -c1-64)
    render "$HERE/device.toml.example" | sed -e "s|pi-001|$(escape "$id")|g" >"$WORK/device.toml.template"
    if [ -n "$BUNDLE" ]; then
        [ -f "$BUNDLE/device.toml" ] || die "$BUNDLE holds no device.toml: give a fleet/devices/<id> folder"
        relocate "$BUNDLE/device.toml" >"$WORK/device.toml"
        for file in "$BUNDLE"/*; do
            name=$(basename "$file")
            case "$name" in
                device.toml) ;;
                ca.crt|*.crt) place "$file" "$ETC/$name" 0644 ;;
                *) place "$file" "$ETC/$name" 0640 "$SERVICE_GROUP" ;;
            esac
        done
    else
        cp "$WORK/device.toml.template" "$WORK/device.toml"
    fi
    place "$WORK/device.toml" "$ETC/device.toml" 0640 "$SERVICE_GROUP" "$WORK/device.toml.template"
    render "$HERE/device.env.example" >"$WORK/device.env"
    place "$WORK/device.env" "$ETC/device.env" 0640 "$SERVICE_GROUP"
    DATA=$(sed -n 's/^data *= *"\([^"]*\)".*/\1/p' "$ETC/device.toml" | head -n 1)
    UNITS=(unus-device.service)
else
    render "$HERE/job.toml.example" >"$WORK/job.toml.template"
    BROKER_BEFORE=$( { cat "$ETC"/broker/{ca.crt,server.crt,server.key,mosquitto.passwd,mosquitto.acl} \
        "$CONF_D/unus-edge.conf" 2>/dev/null || true; } | cksum)
    MOSQUITTO_GROUP=root
    if getent group mosquitto >/dev/null 2>&1; then MOSQUITTO_GROUP=mosquitto; fi
    if [ -n "$BUNDLE" ]; then
        [ -f "$BUNDLE/mosquitto.passwd" ] || die "$BUNDLE holds no mosquitto.passwd: give a fleet/gateway folder"
        if [ -z "$JOB" ]; then
            jobs=("$BUNDLE"/*.toml)
            if [ "${#jobs[@]}" -ne 1 ] || [ ! -f "${jobs[0]}" ]; then
                die "the bundle holds several jobs (or none): choose one with --job"
            fi
            JOB=$(basename "${jobs[0]}" .toml)
        fi
        [ -f "$BUNDLE/$JOB.toml" ] || die "the bundle has no job $JOB ($BUNDLE/$JOB.toml)"
        relocate "$BUNDLE/$JOB.toml" >"$WORK/job.toml"
        if [ "$ROOT" = 1 ]; then
            install -d -m 0750 -o root -g "$MOSQUITTO_GROUP" "$ETC/broker"
        else
            install -d -m 0750 "$ETC/broker"
        fi
        for name in ca.crt server.crt server.key mosquitto.passwd mosquitto.acl; do
            if [ "$REPLACE_CREDENTIALS" = 1 ]; then
                replace "$BUNDLE/$name" "$ETC/broker/$name" 0640 "$MOSQUITTO_GROUP"
            else
                place "$BUNDLE/$name" "$ETC/broker/$name" 0640 "$MOSQUITTO_GROUP"
            fi
        done
        place "$BUNDLE/ca.crt" "$ETC/ca.crt" 0644
        if [ -f "$BUNDLE/listeners.env" ]; then
            replace "$BUNDLE/listeners.env" "$ETC/broker/listeners.env" 0644 root  # provision's, not edited here
        fi
        for file in "$BUNDLE"/*.password; do
            place "$file" "$ETC/$(basename "$file")" 0640 "$SERVICE_GROUP"
        done
    else
        cp "$WORK/job.toml.template" "$WORK/job.toml"
    fi
    place "$WORK/job.toml" "$ETC/job.toml" 0640 "$SERVICE_GROUP" "$WORK/job.toml.template"
    # The listeners as provisioned: the TLS port (provision --port) and its address (--bind),
    # and the loopback port of the aggregator's broker.url; the shipped drop-in says 8883, 1883.
    TLS_PORT=8883 TLS_BIND="" PLAIN_PORT=1883
    if [ -f "$ETC/broker/listeners.env" ]; then
        TLS_PORT=$(sed -n 's/^TLS_PORT=\([0-9][0-9]*\)$/\1/p' "$ETC/broker/listeners.env")
        TLS_BIND=$(sed -n 's/^TLS_BIND=\([0-9A-Fa-f.:]*\)$/\1/p' "$ETC/broker/listeners.env")
        CLIENT_CERTS=$(sed -n 's/^CLIENT_CERTS=\([01]\)$/\1/p' "$ETC/broker/listeners.env")
        [ -n "$TLS_PORT" ] || die "$ETC/broker/listeners.env names no TLS_PORT"
    fi
    # With client certificates (provision --client-certs) the certificate is the identity.
    IDENTITY='s|^require_certificate false$|require_certificate false|'
    if [ "${CLIENT_CERTS:-0}" = 1 ]; then
        IDENTITY='s|^require_certificate false$|require_certificate true\nuse_identity_as_username true|'
    fi
    url_port=$(sed -n 's|^url *= *"mqtt://[^"]*:\([0-9][0-9]*\)".*|\1|p' "$ETC/job.toml" | head -n 1)
    PLAIN_PORT=${url_port:-1883}
    sed -e "s|^listener 1883 127.0.0.1\$|listener $PLAIN_PORT 127.0.0.1|" \
        -e "s|^listener 8883\$|listener $TLS_PORT${TLS_BIND:+ $TLS_BIND}|" -e "$IDENTITY" \
        "$SHARE/mosquitto-unus-edge.conf" >"$WORK/mosquitto-unus-edge.conf"
    cp "$WORK/mosquitto-unus-edge.conf" "$SHARE/mosquitto-unus-edge.conf"
    render "$HERE/aggregator.env.example" >"$WORK/aggregator.env"
    place "$WORK/aggregator.env" "$ETC/aggregator.env" 0640 "$SERVICE_GROUP"
    # The drop-in names the provisioned files: without them Mosquitto would not start.
    BROKER_FILES=()
    for name in ca.crt server.crt server.key mosquitto.passwd mosquitto.acl; do
        BROKER_FILES+=("$ETC/broker/$name")
    done
    if [ ! -d "$CONF_D" ]; then
        warn "$CONF_D does not exist: Mosquitto's drop-in is in $SHARE/mosquitto-unus-edge.conf"
    elif ls "${BROKER_FILES[@]}" >/dev/null 2>&1; then
        place "$SHARE/mosquitto-unus-edge.conf" "$CONF_D/unus-edge.conf" 0644
    else
        warn "Mosquitto's drop-in is not installed yet: it needs the provisioned files (--bundle fleet/gateway)"
    fi
    BROKER_AFTER=$( { cat "${BROKER_FILES[@]}" "$CONF_D/unus-edge.conf" 2>/dev/null || true; } | cksum)
    UNITS=(unus-aggregator.service)
fi

# ------------------------------------------------------------------------------ systemd
if [ "$SYSTEMD" = 1 ] && { [ ! -d /run/systemd/system ] || ! command -v systemctl >/dev/null 2>&1; }; then
    warn "systemd is not running here: units not installed (they are in $SHARE/systemd)"
    SYSTEMD=0
fi
if [ "$SYSTEMD" = 1 ]; then
    [ "$ROOT" = 1 ] || die "installing systemd units needs root (or use --no-systemd)"
    install -d -m 0755 "$UNIT_DIR"
    for unit in "${UNITS[@]}"; do
        install -m 0644 "$SHARE/systemd/$unit" "$UNIT_DIR/$unit"
    done
    systemctl daemon-reload
    systemctl enable "${UNITS[@]}" >/dev/null 2>&1
    if [ "$ROLE" = gateway ] && [ "$BROKER_BEFORE" != "$BROKER_AFTER" ] \
            && systemctl list-unit-files mosquitto.service >/dev/null 2>&1; then
        systemctl enable mosquitto.service >/dev/null 2>&1 || true
        systemctl restart mosquitto.service || warn "mosquitto did not restart: journalctl -u mosquitto"
    fi
    if [ "$ROLE" = device ] && [ -n "$BUNDLE" ] && [ -f "$DATA" ]; then
        systemctl restart unus-device.service || warn "unus-device did not start: journalctl -u unus-device"
    fi
fi

# ------------------------------------------------------------------------------ summary
say "done: $ROLE, $VERSION, configuration in $ETC, state in $STATE"
for file in "${NEW_FILES[@]}"; do
    say "kept your $(basename "${file%.new}"); the new version is $file (compare and merge)"
done
if [ "$SYSTEMD" = 0 ]; then  # no units: the commands they would run
    if [ "$ROLE" = device ]; then
        say "next: put this device's partition at ${DATA:-the path device.data names}, check $ETC/device.toml, then"
        say "      $PREFIX/bin/unus-edge device --config $ETC/device.toml"
    else
        say "next: complete $ETC/job.toml, then $PREFIX/bin/unus-edge aggregator --config $ETC/job.toml"
    fi
elif [ "$ROLE" = device ] && [ -f "$DATA" ] && [ -n "$BUNDLE" ]; then
    say "started: journalctl -u unus-device -f"
elif [ "$ROLE" = device ]; then
    say "next: put this device's partition at ${DATA:-the path device.data names}, check $ETC/device.toml, then"
    say "      systemctl restart unus-device && journalctl -u unus-device -f"
else
    say "next: complete $ETC/job.toml, then systemctl start unus-aggregator && journalctl -u unus-aggregator -f"
fi
