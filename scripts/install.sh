#!/usr/bin/env bash
# `make install` / `make uninstall`: activator as a system service, not a git checkout.
#
#   install    the package (no dev tools) and pycriu in their own venv, PREFIX/venv; the systemd units (paths
#              rewritten to PREFIX and SYSCONFDIR) in UNITDIR; a starter SYSCONFDIR/config.yaml if there is none;
#              the README, JSON Schema, Grafana dashboard and alert rules under PREFIX/share. Run again to upgrade.
#   uninstall  stops and removes the units and PREFIX; keeps SYSCONFDIR and state_dir (your configuration,
#              checkpoints and volumes), and says so.
#
# The host needs what `make setup` installs first: the Docker engine, runc, and CRIU 4.2 built from the pinned,
# checksum-verified source (scripts/setup.sh), whose tree also provides pycriu. Nothing here pulls a compiler.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
PREFIX=${PREFIX:-/opt/activator}
SYSCONFDIR=${SYSCONFDIR:-/etc/activator}
UNITDIR=${UNITDIR:-/etc/systemd/system}
CRIU_SRC=${CRIU_SRC:-/usr/local/src/activator-criu}
PY=${PYTHON:-python3}
UNITS=(activator.service activator.socket)

systemd_running() { [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

install_all() {
    [ "$(id -u)" = 0 ] || die "run as root (it installs to $PREFIX, $SYSCONFDIR and $UNITDIR)"
    [ -f "$CRIU_SRC/lib/setup.py" ] || [ -f "$CRIU_SRC/lib/pyproject.toml" ] ||
        die "no CRIU source tree at $CRIU_SRC (pycriu comes from it); run 'make setup' first"
    log "venv $PREFIX/venv"
    mkdir -p "$PREFIX"
    [ -x "$PREFIX/venv/bin/python" ] || "$PY" -m venv "$PREFIX/venv"
    "$PREFIX/venv/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
    "$PREFIX/venv/bin/pip" install -q --upgrade "$ROOT" >"$PREFIX/install.log" 2>&1 ||
        die "installing activator into $PREFIX/venv failed; see $PREFIX/install.log"
    "$PREFIX/venv/bin/pip" install -q "$CRIU_SRC/lib" >>"$PREFIX/install.log" 2>&1 ||
        die "installing pycriu from $CRIU_SRC/lib failed; see $PREFIX/install.log"
    "$PREFIX/venv/bin/activator" --version >/dev/null || die "the installed activator does not run"

    mkdir -p "$PREFIX/share"
    install -m 0644 "$ROOT/README.md" "$PREFIX/README.md"
    install -m 0644 "$ROOT/config/activator.schema.json" "$PREFIX/share/activator.schema.json"
    install -m 0644 "$ROOT/config/grafana/activator-dashboard.json" "$PREFIX/share/grafana-dashboard.json"
    install -m 0644 "$ROOT/config/prometheus/activator-alerts.yml" "$PREFIX/share/prometheus-alerts.yml"

    mkdir -p "$UNITDIR"
    for u in "${UNITS[@]}"; do
        sed -e "s|/opt/activator|$PREFIX|g" -e "s|/etc/activator|$SYSCONFDIR|g" "$ROOT/systemd/$u" >"$UNITDIR/$u.tmp"
        chmod 0644 "$UNITDIR/$u.tmp"
        mv "$UNITDIR/$u.tmp" "$UNITDIR/$u"
    done
    log "units in $UNITDIR: ${UNITS[*]}"

    install -d -m 0755 "$SYSCONFDIR"
    if [ ! -e "$SYSCONFDIR/config.yaml" ]; then
        # The environment of a service may hold secrets: root only, like state_dir.
        { echo "# Starter configuration (the demo's services; see $PREFIX/README.md). Check it with"
          echo "# '$PREFIX/venv/bin/activator validate $SYSCONFDIR/config.yaml'; apply changes with systemctl reload."
          cat "$ROOT/config/demo.yaml"; } >"$SYSCONFDIR/config.yaml"
        chmod 0600 "$SYSCONFDIR/config.yaml"
        log "starter configuration: $SYSCONFDIR/config.yaml"
    else
        log "keeping $SYSCONFDIR/config.yaml"
    fi
    if systemd_running; then
        systemctl daemon-reload
        log "installed; start it with: systemctl enable --now activator.service"
    else
        log "installed (no systemd running here: run '$PREFIX/venv/bin/activator run -c $SYSCONFDIR/config.yaml')"
    fi
}

uninstall_all() {
    [ "$(id -u)" = 0 ] || die "run as root"
    if systemd_running; then
        systemctl disable --now "${UNITS[@]}" >/dev/null 2>&1 || true
    fi
    for u in "${UNITS[@]}"; do rm -f "$UNITDIR/$u"; done
    rm -rf "$PREFIX"
    if systemd_running; then systemctl daemon-reload; fi
    log "removed $PREFIX and the units; kept $SYSCONFDIR and state_dir (checkpoints, volumes): remove them by hand"
}

case "${1:-}" in
    install) install_all ;;
    uninstall) uninstall_all ;;
    *) die "usage: install.sh install|uninstall (PREFIX, SYSCONFDIR, UNITDIR, CRIU_SRC from the environment)" ;;
esac
