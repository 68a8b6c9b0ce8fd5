#!/usr/bin/env bash
# Idempotent host setup for activator (root, Debian 12 or newer).
#
#   setup.sh --runtime   what the daemon needs and nothing else (`make install`): its runtime packages, a Docker
#                        engine when none is there, and a CRIU that can really checkpoint TCP listeners on this
#                        kernel (4.2.x built from the pinned source with scripts/criu-patches, pycriu's tree too).
#                        Says what it installed. No venv, nothing written into this checkout.
#   setup.sh             that, plus what a checkout needs to build the images and run the demo, and the venv
#                        ($ROOT/.venv) with the project and its dev tools (`make setup`, `make demo`).
#   setup.sh --tests     that, plus the real clients, servers and proxies the tests and benchmarks drive, and
#                        promtool (`make test`, `make bench`).
#   setup.sh --services-only   everything is installed already (make's stamp says so): just make sure dockerd runs.
#
# An engine already here (Docker CE, Debian's docker.io, or Podman's Docker-compatible API) is used as it is: the
# distribution's docker.io, containerd and runc are installed only when none is, and apt is never allowed to remove
# a package (Debian's docker.io and runc Conflict with Docker CE's). Package mirrors always come from the system's
# apt configuration: nothing here names a host.
set -euo pipefail

ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${ACTIVATOR_VENV:-$ROOT/.venv}
CRIU_VERSION=${CRIU_VERSION:-4.2.1}
# The upstream tarball is fetched through an unsigned source list (Debian unstable's deb-src, trusted=yes): what
# is built is what this checksum names, or nothing. Pinned from criu_4.2.1-1.dsc (Checksums-Sha256); changing
# CRIU_VERSION needs CRIU_SHA256 too.
CRIU_SHA256=${CRIU_SHA256:-29ec0ee09e296479fe7048c80980e8ef1d0684d0b0204c2b101dfea19f6725b9}
CRIU_SRC=${CRIU_SRC:-/usr/local/src/activator-criu}
# activator's patches to that source (scripts/criu-patches/*.patch, each with its reason and upstream reference).
# The build is marked with them (`criu --version` says GitID: ...+activator-userns.ID), so a CRIU without them
# is rebuilt here, and the daemon can tell a CRIU that restores user namespaces from one that cannot.
CRIU_PATCHES=("$ROOT"/scripts/criu-patches/*.patch)
CRIU_PATCHES_ID=$(cat "${CRIU_PATCHES[@]}" | sha256sum | cut -c1-12)
CRIU_GITID="v${CRIU_VERSION}+activator-userns.${CRIU_PATCHES_ID}"
STAMP_DIR=${ACTIVATOR_STATE:-/var/lib/activator}/setup
# The system's Python, not whichever python3 is first on PATH (a pyenv's, a user's): the venv lives on it.
PY=${PYTHON:-/usr/bin/python3}

. "$ROOT/scripts/lib.sh"

MODE=checkout
case "${1:-}" in
    "") ;;
    --runtime) MODE=runtime ;;
    --tests) MODE=tests ;;
    --services-only) MODE=services ;;
    *) die "usage: setup.sh [--runtime | --tests | --services-only]" ;;
esac
[ "$(id -u)" = 0 ] || die "must run as root (it installs packages and starts dockerd); try: sudo make setup"
command -v apt-get >/dev/null || die "needs a Debian-family host with apt-get"
mkdir -p "$STAMP_DIR"

export DEBIAN_FRONTEND=noninteractive
# What the daemon runs: ip (instance networking), nftables/libnftables1 (libnftables in process; `nft` for
# operators), iptables (the DNAT path's forward rules), util-linux (unshare, mount), zstd (checkpoint image layers,
# GNU tar --zstd), skopeo (checkpoints to and from a registry), python3-venv (its venv).
RUNTIME_PKGS=(iproute2 nftables libnftables1 iptables util-linux procps zstd skopeo ca-certificates python3-venv)
# A checkout: the test and demo images are built here (debootstrap, busybox-static, gcc/libc6-dev for the static
# helpers, libjemalloc-dev for memcheck-je), and the dev venv may compile a wheel.
CHECKOUT_PKGS=(debootstrap busybox-static make gcc libc6-dev libjemalloc-dev pkgconf git xz-utils python3-dev)
# The tests' and benchmarks' real clients, servers and proxies, never installed by `make install`.
# systemd: systemd-socket-activate and systemd-analyze for the tests, systemd-socket-proxyd for the benchmarks;
# conntrack: the tests' leak checks; redis-tools, iperf3, wrk: real clients for the warm-path benchmark;
# postgresql-client: psql, the real client of the PostgreSQL tests; docker-registry (CNCF distribution) and
# haproxy: the multi-host test's registry and L4 balancer; podman: a checkpoint image made by another engine, for
# `activator inspect` (tests/engine/test_podman_images.py); nginx-light, caddy, curl: the reverse proxies
# docs/reverse-proxies.md configures, in front of an http: true service; bind9-dnsutils: dig, for the UDP tests;
# socat: a plain relay in tests; qemu-system-x86 and debootstrap: the cgroup v2 VM of `make test-cgroup2`
# (scripts/vm/), e2fsprogs for its disks (mkfs.ext4 -d, debugfs).
TEST_PKGS=(systemd socat conntrack redis-tools iperf3 wrk postgresql-client docker-registry haproxy podman
           nginx-light caddy curl bind9-dnsutils qemu-system-x86 qemu-utils debootstrap e2fsprogs)
# Packages whose installation would enable and start a server (nginx and caddy on :80): the tests start their own.
TEST_SERVICES=(nginx-light:nginx caddy:caddy haproxy:haproxy docker-registry:docker-registry)
CRIU_BUILD_DEPS=(make gcc libc6-dev pkgconf xz-utils patch libbsd-dev libcap-dev libgnutls28-dev libnet1-dev
                 libnftables-dev libnl-3-dev libprotobuf-c-dev libprotobuf-dev protobuf-c-compiler protobuf-compiler
                 python3-protobuf python3-dev uuid-dev)

installed=()  # every package this run installed, for the closing line
is_installed() { dpkg-query -W -f='${Status}' "$1" 2>/dev/null | grep -q 'install ok installed'; }
apt_install() {
    local missing=()
    for p in "$@"; do
        case "$p" in *-) continue ;; esac
        is_installed "$p" || missing+=("$p")
    done
    [ ${#missing[@]} -eq 0 ] && return 0
    log "apt-get install ${missing[*]}"
    if [ ! -e "$STAMP_DIR/apt-updated" ] || [ -n "$(find "$STAMP_DIR/apt-updated" -mmin +720)" ]; then
        apt-get update -qq && touch "$STAMP_DIR/apt-updated"
    fi
    # --no-remove: a package that Conflicts with one of the host's (docker.io or runc with Docker CE's
    # containerd.io) makes apt stop here instead of removing the operator's.
    apt-get install -y -qq --no-install-recommends --no-remove "${missing[@]}" >/dev/null ||
        die "apt-get install ${missing[*]} failed, or would have removed an installed package (see: apt-get install -s ${missing[*]})"
    installed+=("${missing[@]}")
}

# --- Docker engine and runc -------------------------------------------------------------------------------
# The Docker-compatible API answering on its usual sockets (or DOCKER_HOST's): Docker CE, docker.io, Podman.
engine_socket() {
    local s
    for s in ${DOCKER_HOST:+"${DOCKER_HOST#unix://}"} /var/run/docker.sock /run/podman/podman.sock; do
        [ -S "$s" ] || continue
        "$PY" -c 'import socket, sys
c = socket.socket(socket.AF_UNIX); c.settimeout(5); c.connect(sys.argv[1])
c.sendall(b"GET /_ping HTTP/1.0\r\nHost: x\r\n\r\n")
sys.exit(0 if c.recv(64).split()[1:2] == [b"200"] else 1)' "$s" 2>/dev/null && { echo "$s"; return 0; }
    done
    return 1
}
engine_package() {  # an engine installed, running or not: its package (or binary) name
    local p
    for p in docker-ce moby-engine docker.io podman-docker; do
        is_installed "$p" && { echo "$p"; return 0; }
    done
    command -v dockerd >/dev/null && { echo "dockerd ($(command -v dockerd))"; return 0; }
    return 1
}

start_dockerd() {
    if docker info >/dev/null 2>&1; then return 0; fi
    command -v dockerd >/dev/null || die "no dockerd here, and the tests and the demo need a Docker engine; install one (or run setup without it for the daemon alone: setup.sh --runtime)"
    log "starting dockerd"
    if [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        systemctl start docker || true
    fi
    if ! docker info >/dev/null 2>&1; then
        mkdir -p /var/log/activator
        nohup dockerd >/var/log/activator/dockerd.log 2>&1 &
    fi
    for _ in $(seq 1 60); do docker info >/dev/null 2>&1 && return 0; sleep 0.5; done
    die "dockerd did not come up; see /var/log/activator/dockerd.log"
}

if [ "$MODE" = services ]; then start_dockerd; exit 0; fi

apt_install "${RUNTIME_PKGS[@]}"
if sock=$(engine_socket); then
    log "engine: the one answering on $sock is used as it is${DOCKER_HOST:+ (DOCKER_HOST)}"
elif pkg=$(engine_package); then
    log "engine: $pkg is installed (not answering yet): used as it is"
else
    log "engine: none here; installing Debian's docker.io"
    apt_install docker.io containerd
fi
# runc 1.1 or newer: Docker CE's containerd.io carries its own (and Conflicts with Debian's runc package).
if ! command -v runc >/dev/null; then
    if is_installed containerd.io; then
        die "containerd.io is installed but no runc is on PATH; reinstall containerd.io (Debian's runc package would conflict with it)"
    fi
    apt_install runc
fi
if [ "$MODE" != runtime ]; then
    apt_install "${CHECKOUT_PKGS[@]}"
    start_dockerd
elif engine_socket >/dev/null || docker info >/dev/null 2>&1; then
    :
elif command -v dockerd >/dev/null; then
    start_dockerd
fi
if [ "$MODE" = tests ]; then
    # A server a test package would start on install (nginx and caddy on :80) is not started by apt (policy-rc.d,
    # ours only for this call) and, on a systemd host, not enabled for the next boot either.
    fresh=()
    for ps in "${TEST_SERVICES[@]}"; do is_installed "${ps%%:*}" || fresh+=("${ps#*:}"); done
    ours_policy=0
    if [ ! -e /usr/sbin/policy-rc.d ]; then
        printf '#!/bin/sh
exit 101
' >/usr/sbin/policy-rc.d && chmod 0755 /usr/sbin/policy-rc.d && ours_policy=1
        trap '[ "$ours_policy" = 0 ] || rm -f /usr/sbin/policy-rc.d' EXIT
    fi
    apt_install "${TEST_PKGS[@]}"
    if [ "$ours_policy" = 1 ]; then rm -f /usr/sbin/policy-rc.d; ours_policy=0; fi
    if [ ${#fresh[@]} -gt 0 ] && [ -d /run/systemd/system ] && command -v systemctl >/dev/null; then
        systemctl disable --now --quiet "${fresh[@]}" 2>/dev/null || true
    fi
fi

# --- CRIU -----------------------------------------------------------------------------------------------
# A CRIU is good enough when `criu check` passes and it can dump a process holding a TCP listener
# (SO_PASSCRED on TCP is refused since kernel 6.16, which breaks CRIU < 4.2 exactly there).
criu_works() {
    local bin=$1 d pid ok=1 py i
    [ -x "$bin" ] || return 1
    "$bin" check >/dev/null 2>&1 || return 1
    d=$(mktemp -d)
    # The interpreter itself, not a wrapper (a pyenv shim is a shell script that execs it later), and dumped only
    # once it says it listens: on a busy host a fixed sleep dumped the wrapper, or Python before its socket.
    py=$("$PY" -c 'import sys; print(sys.executable)') || return 1
    setsid "$py" -c 'import socket,sys,time; s=socket.socket(); s.bind(("127.0.0.1",0)); s.listen(); '\
'open(sys.argv[1], "w").close(); time.sleep(60)' "$d/listening" </dev/null >/dev/null 2>&1 &
    pid=$!
    disown "$pid" 2>/dev/null || true
    for _ in $(seq 100); do [ -e "$d/listening" ] && break; sleep 0.1; done
    rm -f "$d/listening"
    if "$bin" dump -t "$pid" -D "$d" --tcp-established --shell-job -o dump.log >/dev/null 2>&1; then ok=0; fi
    kill -9 "$pid" 2>/dev/null || true
    wait "$pid" 2>/dev/null || true
    rm -rf "$d"
    return $ok
}

find_good_criu() {
    # Only ours: a distribution's CRIU (or one built before the current patches) cannot restore user namespaces.
    local c=/usr/local/sbin/criu
    "$c" --version 2>/dev/null | grep -qF "GitID: $CRIU_GITID" || return 1
    criu_works "$c" && { echo "$c"; return 0; }
    return 1
}

fetch_criu_source() {
    # Debian's unstable suite ships the upstream tarball as its source package. Ask apt for it through the
    # system's own mirror, using a private apt state so the host's sources are left untouched.
    local mirror work
    mirror=$(debian_mirror)
    work=$(mktemp -d)
    mkdir -p "$work/lists/partial" "$work/archives/partial"
    echo "deb-src [trusted=yes] $mirror unstable main" >"$work/sources.list"
    local opts=(-o Dir::Etc::SourceList="$work/sources.list" -o Dir::Etc::SourceParts=/dev/null
                -o Dir::State::Lists="$work/lists" -o Dir::Cache::Archives="$work/archives"
                -o APT::Sandbox::User=root)
    apt-get "${opts[@]}" update -qq >/dev/null
    (cd "$work" && apt-get "${opts[@]}" source --download-only "criu=${CRIU_VERSION}*" >/dev/null 2>&1 ||
         apt-get "${opts[@]}" source --download-only criu >/dev/null 2>&1 || true)
    local tarball
    tarball=$(ls "$work"/criu_*.orig.tar.* 2>/dev/null | sort -V | tail -1)
    [ -n "$tarball" ] || die "could not download CRIU's source package from $mirror (unstable)"
    echo "$tarball"
}

build_criu() {
    apt_install "${CRIU_BUILD_DEPS[@]}"
    if [ ! -x "$CRIU_SRC/criu/criu" ] || [ "$(cat "$CRIU_SRC/.activator-patches" 2>/dev/null)" != "$CRIU_PATCHES_ID" ]; then
        local tarball p
        tarball=$(fetch_criu_source)
        echo "$CRIU_SHA256  $tarball" | sha256sum --check --quiet - ||
            die "$(basename "$tarball") does not have the pinned SHA-256 ($CRIU_SHA256): not building it"
        log "building CRIU from $(basename "$tarball") (SHA-256 verified) with ${#CRIU_PATCHES[@]} patch(es)"
        rm -rf "$CRIU_SRC" && mkdir -p "$CRIU_SRC"
        tar -xf "$tarball" -C "$CRIU_SRC" --strip-components=1
        for p in "${CRIU_PATCHES[@]}"; do
            patch -d "$CRIU_SRC" -p1 --quiet <"$p" || die "$(basename "$p") does not apply to CRIU $CRIU_VERSION"
        done
        make -C "$CRIU_SRC" -j"$(nproc)" GITID="$CRIU_GITID" criu >"$CRIU_SRC/build.log" 2>&1 ||
            die "CRIU build failed; see $CRIU_SRC/build.log"
        echo "$CRIU_PATCHES_ID" >"$CRIU_SRC/.activator-patches"
    fi
    make -C "$CRIU_SRC" lib >>"$CRIU_SRC/build.log" 2>&1 || die "CRIU lib build failed; see $CRIU_SRC/build.log"
    install -m 0755 "$CRIU_SRC/criu/criu" /usr/local/sbin/criu
}

if CRIU_BIN=$(find_good_criu); then
    log "CRIU ok: $CRIU_BIN ($("$CRIU_BIN" --version | head -1))"
else
    log "no working CRIU found; building $CRIU_VERSION"
    build_criu
    CRIU_BIN=/usr/local/sbin/criu
    criu_works "$CRIU_BIN" || die "built CRIU at $CRIU_BIN still fails 'criu check' or a TCP dump on this kernel"
fi

# pycriu matches the CRIU we build, and comes from its tree: the checkout's venv and `make install` take it there.
ensure_pycriu_tree() {
    [ -d "$CRIU_SRC/lib/pycriu" ] && return 0
    # A host CRIU without its tree still needs the source.
    apt_install "${CRIU_BUILD_DEPS[@]}"
    [ -d "$CRIU_SRC/lib" ] || { tarball=$(fetch_criu_source); mkdir -p "$CRIU_SRC";
                               tar -xf "$tarball" -C "$CRIU_SRC" --strip-components=1; }
    make -C "$CRIU_SRC" lib >>"$CRIU_SRC/build.log" 2>&1 || die "building pycriu failed; see $CRIU_SRC/build.log"
}
engine_version() {
    if docker version -f '{{.Server.Version}}' 2>/dev/null; then return 0; fi
    if sock=$(engine_socket); then echo "the API on $sock"; else echo "not running"; fi
}

if [ "$MODE" = runtime ]; then
    ensure_pycriu_tree
    if [ ${#installed[@]} -gt 0 ]; then
        log "installed for the daemon: ${installed[*]}"
    else
        log "installed for the daemon: nothing (every package it needs was here)"
    fi
    log "ready: criu $CRIU_BIN, runc $(runc --version | head -1 | awk '{print $3}'), engine $(engine_version)"
    exit 0
fi

# --- Python venv with the project and pycriu ----------------------------------------------------------------
if [ ! -x "$VENV/bin/python" ]; then
    log "creating venv $VENV from $PY"
    "$PY" -m venv "$VENV"
fi
"$VENV/bin/pip" install -q --upgrade pip >/dev/null
if ! "$VENV/bin/python" -c 'import pycriu' 2>/dev/null; then
    ensure_pycriu_tree
    log "installing pycriu from $CRIU_SRC/lib"
    "$VENV/bin/pip" install -q "$CRIU_SRC/lib" >"$STAMP_DIR/pycriu-install.log" 2>&1 ||
        die "installing pycriu failed; see $STAMP_DIR/pycriu-install.log"
fi
"$VENV/bin/pip" install -q -e "${ROOT}[dev]" >"$STAMP_DIR/pip-install.log" 2>&1 ||
    die "installing the project into $VENV failed; see $STAMP_DIR/pip-install.log"
# promtool checks and unit-tests the alert rules. It comes in Debian's prometheus package, whose installation
# would also enable and start a Prometheus server on a systemd host: only the binary is taken from it.
if [ "$MODE" = tests ] && [ ! -x "$VENV/bin/promtool" ]; then
    log "promtool from Debian's prometheus package (the binary only)"
    tmp=$(mktemp -d)
    (cd "$tmp" && apt-get download -qq prometheus >/dev/null 2>&1) ||
        { apt-get update -qq && (cd "$tmp" && apt-get download -qq prometheus >/dev/null); } ||
        die "downloading Debian's prometheus package (for promtool) failed"
    dpkg-deb -x "$tmp"/prometheus_*.deb "$tmp/x"
    install -m 0755 "$tmp/x/usr/bin/promtool" "$VENV/bin/promtool"
    rm -rf "$tmp"
fi
[ ${#installed[@]} -eq 0 ] || log "installed: ${installed[*]}"
log "ready: venv $VENV, criu $CRIU_BIN, runc $(runc --version | head -1 | awk '{print $3}'), docker $(engine_version)"
