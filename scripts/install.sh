#!/usr/bin/env bash
# `make install` / `make uninstall`: activator as a system service, not a git checkout.
#
#   install    the package (no dev tools) and pycriu in their own venv, PREFIX/venv; `activator` on the PATH
#              (a link in BINDIR); the systemd units (paths rewritten to PREFIX and SYSCONFDIR) in UNITDIR; a
#              starter SYSCONFDIR/config.yaml if there is none (commented examples, no service: it needs no image);
#              the README, CHANGELOG, docs/ (the configuration reference among them), JSON Schema, Grafana dashboard and
#              alert rules under PREFIX/share. Every file and
#              directory it makes is listed in PREFIX/share/install-manifest. Run again to upgrade.
#   uninstall  stops the units and removes exactly what the manifest lists (directories only when empty, so
#              nothing else that lives there goes); keeps SYSCONFDIR/config.yaml and state_dir (your
#              configuration, checkpoints and volumes), and says so.
#
# Where it writes (each can be set):        default                  with PREFIX=X given
#   PREFIX      venv, share, manifest        /opt/activator           X
#   BINDIR      the `activator` link         /usr/local/bin           X/bin
#   SYSCONFDIR  config.yaml                  /etc/activator           X/etc
#   UNITDIR     activator.service/.socket    /etc/systemd/system      X/lib/systemd/system
# So PREFIX alone never writes to /etc; PREFIX=/opt/activator (the default's own value) is the default layout.
# DESTDIR (for packagers) is put in front of every path written, not of
# the paths the units and the link name; with DESTDIR, systemctl is never called.
#
# The host needs what `scripts/setup.sh --runtime` installs first (`make install` runs it): a Docker engine (the one
# already there), runc, and CRIU 4.2 built from the pinned, checksum-verified source, whose tree also provides
# pycriu. The venv is made from the system's Python (/usr/bin/python3), or PYTHON=; the project is built from a
# copy of this tree, so nothing (build/, *.egg-info) is written into it.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
if [ -n "${PREFIX:-}" ] && [ "$PREFIX" != /opt/activator ]; then
    BINDIR=${BINDIR:-$PREFIX/bin}
    SYSCONFDIR=${SYSCONFDIR:-$PREFIX/etc}
    UNITDIR=${UNITDIR:-$PREFIX/lib/systemd/system}
else
    PREFIX=/opt/activator
    BINDIR=${BINDIR:-/usr/local/bin}
    SYSCONFDIR=${SYSCONFDIR:-/etc/activator}
    UNITDIR=${UNITDIR:-/etc/systemd/system}
fi
DESTDIR=${DESTDIR:-}
CRIU_SRC=${CRIU_SRC:-/usr/local/src/activator-criu}
PY=${PYTHON:-/usr/bin/python3}
UNITS=(activator.service activator.socket)
MANIFEST="$PREFIX/share/install-manifest"

systemd_running() { [ -z "$DESTDIR" ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; }

# Everything install makes goes through these two, so the manifest is complete.
made=()
make_dir() {  # a directory and the parents it had to make, each recorded (uninstall removes them if empty)
    local d=$1 missing=()
    while [ "$d" != / ] && [ ! -d "$DESTDIR$d" ]; do missing=("$d" "${missing[@]}"); d=$(dirname "$d"); done
    for d in "${missing[@]}"; do mkdir -m "${2:-0755}" "$DESTDIR$d"; made+=("dir $d"); done
}
put() {  # put MODE SRC DEST: a file, replaced atomically, recorded
    make_dir "$(dirname "$3")"
    install -m "$1" "$2" "$DESTDIR$3.tmp" && mv "$DESTDIR$3.tmp" "$DESTDIR$3"
    made+=("file $3")
}

install_all() {
    [ -n "$DESTDIR" ] || [ "$(id -u)" = 0 ] || die "run as root (it writes to $PREFIX, $BINDIR, $SYSCONFDIR and $UNITDIR)"
    [ -f "$CRIU_SRC/lib/setup.py" ] || [ -f "$CRIU_SRC/lib/pyproject.toml" ] ||
        die "no CRIU source tree at $CRIU_SRC (pycriu comes from it); run 'bash scripts/setup.sh --runtime' first"
    command -v "$PY" >/dev/null || die "no Python at $PY; name one with PYTHON="
    [ -z "$DESTDIR" ] || mkdir -p "$DESTDIR"
    log "installing: venv and share in $PREFIX, the command in $BINDIR, units in $UNITDIR, configuration in $SYSCONFDIR"
    [ "$UNITDIR" = /etc/systemd/system ] || [ -n "$DESTDIR" ] ||
        log "note: systemd does not look in $UNITDIR; 'systemctl link $UNITDIR/activator.service' (and .socket) to use them"
    local old=()
    [ -f "$DESTDIR$MANIFEST" ] && mapfile -t old <"$DESTDIR$MANIFEST"  # an upgrade keeps what the first install made
    make_dir "$PREFIX"
    local venv="$DESTDIR$PREFIX/venv" base
    base=$("$PY" -c 'import os, sys; print(os.path.realpath(sys.executable))') || die "$PY does not run"
    if [ -x "$venv/bin/python" ] &&
       [ "$("$venv/bin/python" -c 'import os, sys; print(os.path.realpath(sys._base_executable))' 2>/dev/null)" != "$base" ]; then
        log "the venv in $PREFIX was made from another Python: making it again from $base"
        rm -rf "$venv"
    fi
    if [ ! -x "$venv/bin/python" ]; then
        log "venv $PREFIX/venv from $base"
        "$PY" -m venv "$venv" || die "$PY -m venv failed (Debian: apt-get install python3-venv)"
    fi
    made+=("tree $PREFIX/venv")
    "$DESTDIR$PREFIX/venv/bin/pip" install -q --upgrade pip >/dev/null 2>&1 || true
    make_dir "$PREFIX/share"
    local logf="$DESTDIR$PREFIX/share/install.log"
    # setuptools builds in the source directory (build/, activator.egg-info): a copy of the tree is built instead.
    local src; src=$(mktemp -d)
    tar -C "$ROOT" --exclude=./.git --exclude=./.venv --exclude=./build --exclude='*.egg-info' \
        --exclude=__pycache__ --exclude=./.mypy_cache --exclude=./.ruff_cache --exclude=./.pytest_cache -cf - . |
        tar -C "$src" -xf -
    "$DESTDIR$PREFIX/venv/bin/pip" install -q --upgrade "$src" >"$logf" 2>&1 ||
        { rm -rf "$src"; die "installing activator into $PREFIX/venv failed; see $logf"; }
    rm -rf "$src"
    "$DESTDIR$PREFIX/venv/bin/pip" install -q "$CRIU_SRC/lib" >>"$logf" 2>&1 ||
        die "installing pycriu from $CRIU_SRC/lib failed; see $logf"
    made+=("file $PREFIX/share/install.log")
    "$DESTDIR$PREFIX/venv/bin/activator" --version >/dev/null || die "the installed activator does not run"
    if [ -n "$DESTDIR" ]; then  # a venv names its own path in its scripts: the final one, not the staging one
        grep -rlF "$DESTDIR$PREFIX/venv" "$DESTDIR$PREFIX/venv/bin" | xargs -r sed -i "s|$DESTDIR$PREFIX/venv|$PREFIX/venv|g"
    fi

    put 0644 "$ROOT/README.md" "$PREFIX/share/README.md"
    put 0644 "$ROOT/CHANGELOG.md" "$PREFIX/share/CHANGELOG.md"  # the README links to it, as to docs/ below
    put 0644 "$ROOT/config/activator.schema.json" "$PREFIX/share/activator.schema.json"
    put 0644 "$ROOT/config/grafana/activator-dashboard.json" "$PREFIX/share/grafana-dashboard.json"
    put 0644 "$ROOT/config/prometheus/activator-alerts.yml" "$PREFIX/share/prometheus-alerts.yml"
    put 0644 "$ROOT/config/examples.yaml" "$PREFIX/share/examples.yaml"
    for f in "$ROOT"/docs/*; do  # docs/configuration.md is rendered from the parser's own declarations
        if [ -f "$f" ]; then put 0644 "$f" "$PREFIX/share/docs/${f##*/}"; fi
    done

    make_dir "$BINDIR"
    if [ -e "$DESTDIR$BINDIR/activator" ] && [ ! -L "$DESTDIR$BINDIR/activator" ]; then
        die "$BINDIR/activator exists and is not our link; remove it or set BINDIR"
    fi
    ln -sfn "$PREFIX/venv/bin/activator" "$DESTDIR$BINDIR/activator"
    made+=("file $BINDIR/activator")

    local tmp; tmp=$(mktemp -d)
    for u in "${UNITS[@]}"; do
        # Paths as installed; systemd's ConfigurationDirectory= is /etc/activator only, so it goes when the
        # configuration lives elsewhere (the directory is made here instead).
        # The header's hints too: the link's and the units' own places.
        sed -e "s|/opt/activator|$PREFIX|g" -e "s|/etc/activator|$SYSCONFDIR|g" \
            -e "s|/usr/local/bin/activator|$BINDIR/activator|g" -e "s|/etc/systemd/system|$UNITDIR|g" \
            "$ROOT/systemd/$u" >"$tmp/$u"
        [ "$SYSCONFDIR" = /etc/activator ] || sed -i '/^ConfigurationDirectory=/d' "$tmp/$u"
        put 0644 "$tmp/$u" "$UNITDIR/$u"
    done
    rm -rf "$tmp"

    make_dir "$SYSCONFDIR"
    if [ ! -e "$DESTDIR$SYSCONFDIR/config.yaml" ]; then
        # The environment of a service may hold secrets: root only, like state_dir. Not in the manifest: once
        # written it is the operator's, and uninstall keeps it.
        { echo "# activator's services (docs: $PREFIX/share/README.md, examples: $PREFIX/share/examples.yaml,"
          echo "# every key: $PREFIX/share/docs/configuration.md)."
          echo "# Check a change with 'activator validate -c $SYSCONFDIR/config.yaml'; apply it with"
          echo "# 'systemctl reload activator'."
          echo "services: {}"; } >"$DESTDIR$SYSCONFDIR/config.yaml"
        chmod 0600 "$DESTDIR$SYSCONFDIR/config.yaml"
        log "starter configuration (no service yet): $SYSCONFDIR/config.yaml"
    else
        log "keeping $SYSCONFDIR/config.yaml"
    fi

    # The manifest: what this install (and any earlier one) made, each once, in the order made.
    printf '%s\n' "${old[@]}" "${made[@]}" "file $MANIFEST" | awk 'NF && !seen[$0]++' >"$DESTDIR$MANIFEST.tmp"
    mv "$DESTDIR$MANIFEST.tmp" "$DESTDIR$MANIFEST"
    local enable="systemctl enable --now activator.service"
    [ "$UNITDIR" = /etc/systemd/system ] ||
        enable="systemctl link $UNITDIR/activator.service $UNITDIR/activator.socket && $enable"
    if [ -n "$DESTDIR" ]; then
        log "staged in $DESTDIR (units for $UNITDIR, the command $BINDIR/activator)"
    elif systemd_running; then
        systemctl daemon-reload
        log "installed; start it with: $enable"
    else
        log "installed (no systemd here: run '$BINDIR/activator run -c $SYSCONFDIR/config.yaml')"
    fi
}

uninstall_all() {
    [ -n "$DESTDIR" ] || [ "$(id -u)" = 0 ] || die "run as root"
    [ -f "$DESTDIR$MANIFEST" ] || die "no install manifest at $MANIFEST: nothing installed with this PREFIX (or it was installed before manifests); remove by hand"
    if systemd_running; then
        systemctl disable --now "${UNITS[@]}" >/dev/null 2>&1 || true
    fi
    local entries kind path
    mapfile -t entries <"$DESTDIR$MANIFEST"
    for ((i = ${#entries[@]} - 1; i >= 0; i--)); do  # files first, then the directories they were in
        kind=${entries[i]%% *}; path=${entries[i]#* }
        case "$path" in /*) ;; *) continue ;; esac  # a manifest line we did not write
        case "$kind" in
            file) rm -f "$DESTDIR$path" ;;
            tree) [ "$path" = "$PREFIX/venv" ] && rm -rf "$DESTDIR$path" ;;  # only ever the venv we made
            dir) rmdir "$DESTDIR$path" 2>/dev/null || true ;;  # still holds something not ours: kept
        esac
    done
    if systemd_running; then systemctl daemon-reload; fi
    log "removed what the install made (per its manifest); kept $SYSCONFDIR/config.yaml and state_dir (checkpoints, volumes): remove them by hand"
}

case "${1:-}" in
    install) install_all ;;
    uninstall) uninstall_all ;;
    *) die "usage: install.sh install|uninstall (PREFIX, BINDIR, SYSCONFDIR, UNITDIR, DESTDIR, CRIU_SRC from the environment)" ;;
esac
