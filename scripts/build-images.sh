#!/usr/bin/env bash
# Builds the demo and test images locally (no registry is needed): a busybox image for the small app and the
# tests, a Debian minbase image with Tomcat 10 on OpenJDK 17 for the slow-starting demo, and one with Redis and
# iperf3 for the warm-path benchmark (real servers for real clients: redis-benchmark, iperf3), and a Debian with
# systemd as PID 1 for the test of the installed unit under a real systemd, and PostgreSQL (a non-root app with
# its data in a volume) for the user namespace tests, and dnsmasq (a DNS server on UDP and TCP) for the UDP tests.
#   scripts/build-images.sh [busybox] [tomcat] [redis] [postgres] [systemd] [dns]   (default: busybox and tomcat)
# An image that already exists is kept; FORCE=1 rebuilds.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"

BUSYBOX_IMAGE=activator-demo/busybox:latest
TOMCAT_IMAGE=activator-demo/tomcat:latest
REDIS_IMAGE=activator-demo/redis:latest
DNS_IMAGE=activator-demo/dns:latest
POSTGRES_IMAGE=activator-test/postgres:latest
SYSTEMD_IMAGE=activator-test/systemd:latest
SUITE=${SUITE:-bookworm}

# An image is current when it exists and, if a source tag is given, its activator.source label matches it.
have() {
    [ "${FORCE:-0}" != 1 ] && docker image inspect "$1" >/dev/null 2>&1 || return 1
    [ -z "${2:-}" ] || [ "$(docker image inspect -f '{{index .Config.Labels "activator.source"}}' "$1")" = "$2" ]
}
ECHO_SRC="$(dirname "${BASH_SOURCE[0]}")/images/echo-server.c"
PROBE_SRC="$(dirname "${BASH_SOURCE[0]}")/images/sandbox-probe.sh"
NETPROBE_SRC="$(dirname "${BASH_SOURCE[0]}")/images/netprobe.c"
ATTACKER_SRC="$(dirname "${BASH_SOURCE[0]}")/images/attacker.c"
MEMCHECK_SRC="$(dirname "${BASH_SOURCE[0]}")/images/memcheck.c"

build_busybox() {
    local source; source="test-apps-$(cat "$ECHO_SRC" "$PROBE_SRC" "$NETPROBE_SRC" "$ATTACKER_SRC" "$MEMCHECK_SRC" "${BASH_SOURCE[0]}" | sha256sum | cut -c1-12)"
    have "$BUSYBOX_IMAGE" "$source" && return 0
    local r; r=$(mktemp -d)
    mkdir -p "$r"/{bin,etc,www/cgi-bin,tmp,proc,sys,dev,root}
    cp /bin/busybox "$r/bin/busybox"
    gcc -O2 -static -o "$r/bin/echo-server" "$ECHO_SRC" ||
        die "compiling the echo server failed (needs gcc and libc6-dev)"
    # getaddrinfo in a static binary: glibc >= 2.34 has /etc/hosts lookups built in; the link-time warning
    # about shared NSS libraries does not apply to that.
    gcc -O2 -static -pthread -o "$r/bin/netprobe" "$NETPROBE_SRC" 2>/dev/null ||
        die "compiling netprobe failed (needs gcc and libc6-dev)"
    gcc -O2 -static -pthread -o "$r/bin/attacker" "$ATTACKER_SRC" 2>/dev/null ||
        die "compiling attacker failed (needs gcc and libc6-dev)"
    # memcheck (restore_memory's correctness app) and its jemalloc twin, linked with Debian's static jemalloc so
    # that the purge logic under test is jemalloc's own, not an imitation of it.
    gcc -O2 -static -pthread -o "$r/bin/memcheck" "$MEMCHECK_SRC" ||
        die "compiling memcheck failed (needs gcc and libc6-dev)"
    gcc -O2 -static -pthread -DJEMALLOC -o "$r/bin/memcheck-je" "$MEMCHECK_SRC" -l:libjemalloc.a -lm ||
        die "compiling memcheck-je failed (needs libjemalloc-dev: apt-get install libjemalloc-dev, or make setup)"
    chroot "$r" /bin/busybox --install -s /bin
    printf 'root:x:0:0:root:/root:/bin/sh\nnobody:x:65534:65534:nobody:/:/bin/false\n' >"$r/etc/passwd"
    printf 'root:x:0:\nnogroup:x:65534:\n' >"$r/etc/group"
    echo 'hello from a restored busybox httpd' >"$r/www/index.html"
    install -m 0755 "$PROBE_SRC" "$r/www/cgi-bin/sandbox"
    tar -C "$r" -c . | docker import \
        --change 'CMD ["httpd", "-f", "-p", "8080", "-h", "/www"]' --change "LABEL activator.source=$source" \
        --change 'WORKDIR /' --change 'ENV PATH=/bin' - "$BUSYBOX_IMAGE" >/dev/null
    rm -rf "$r"
    log "built $BUSYBOX_IMAGE"
}

build_tomcat() {
    have "$TOMCAT_IMAGE" && return 0
    local r mirror; r=$(mktemp -d); mirror=$(debian_mirror)
    log "debootstrap $SUITE from $mirror (about a minute)"
    debootstrap --variant=minbase --include=openjdk-17-jre-headless "$SUITE" "$r" "$mirror" >"$r.log" 2>&1 ||
        die "debootstrap failed; see $r.log"
    # Debian's tomcat10 postinst expects a running policy layer; keep daemons from starting in the chroot.
    printf '#!/bin/sh\nexit 101\n' >"$r/usr/sbin/policy-rc.d"; chmod +x "$r/usr/sbin/policy-rc.d"
    mount -t proc proc "$r/proc"
    trap 'umount "$r/proc" 2>/dev/null || true' RETURN
    chroot "$r" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends tomcat10 \
        >>"$r.log" 2>&1 || die "installing tomcat10 failed; see $r.log"
    umount "$r/proc"
    chroot "$r" apt-get clean
    rm -rf "$r"/var/lib/apt/lists/* "$r/usr/sbin/policy-rc.d"
    tar -C "$r" -c . | docker import \
        --change 'ENV CATALINA_HOME=/usr/share/tomcat10' --change 'ENV CATALINA_BASE=/var/lib/tomcat10' \
        --change 'ENV CATALINA_TMPDIR=/tmp' --change 'ENV JAVA_HOME=/usr/lib/jvm/java-17-openjdk-amd64' \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["/usr/share/tomcat10/bin/catalina.sh", "run"]' \
        - "$TOMCAT_IMAGE" >/dev/null
    rm -rf "$r" "$r.log"
    log "built $TOMCAT_IMAGE"
}

build_redis() {
    have "$REDIS_IMAGE" && return 0
    local r mirror; r=$(mktemp -d); mirror=$(debian_mirror)
    log "debootstrap $SUITE with redis-server and iperf3 from $mirror"
    debootstrap --variant=minbase --include=redis-server,iperf3 "$SUITE" "$r" "$mirror" >"$r.log" 2>&1 ||
        die "debootstrap failed; see $r.log"
    chroot "$r" apt-get clean
    rm -rf "$r"/var/lib/apt/lists/*
    tar -C "$r" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["redis-server", "--port", "6379", "--protected-mode", "no", "--save", "", "--appendonly", "no"]' \
        - "$REDIS_IMAGE" >/dev/null
    rm -rf "$r" "$r.log"
    log "built $REDIS_IMAGE"
}

# dnsmasq from Debian as a DNS server answering from its own records (no upstream, no DHCP), on UDP and TCP port
# 53: the UDP test app (tests/engine/test_udp.py). --user=root: it drops nothing (the instance's user namespace
# is the sandbox), and a restored process must not depend on having changed users at start.
build_dns() {
    have "$DNS_IMAGE" && return 0
    local r mirror; r=$(mktemp -d); mirror=$(debian_mirror)
    log "debootstrap $SUITE with dnsmasq-base from $mirror"
    debootstrap --variant=minbase --include=dnsmasq-base "$SUITE" "$r" "$mirror" >"$r.log" 2>&1 ||
        die "debootstrap failed; see $r.log"
    chroot "$r" apt-get clean
    rm -rf "$r"/var/lib/apt/lists/*
    tar -C "$r" -c . | docker import \
        --change 'ENV PATH=/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'CMD ["dnsmasq", "--keep-in-foreground", "--user=root", "--no-resolv", "--no-hosts", "--no-poll", "--port=53", "--log-facility=-", "--address=/activator.test/192.0.2.53", "--txt-record=hello.activator.test,hello from a restored dnsmasq"]' \
        - "$DNS_IMAGE" >/dev/null
    rm -rf "$r" "$r.log"
    log "built $DNS_IMAGE"
}

# PostgreSQL 15 from Debian, run as user postgres (a non-root app: checkpointed in its user namespace), with a
# data directory made at build time at /var/lib/postgresql/data (a VOLUME: activator fills a named volume there
# from it). Test image: every client is trusted (pg_hba `host all all all trust`). Dynamic shared memory is SysV
# (in the IPC namespace, which CRIU dumps) rather than files in /dev/shm, which each instance gets fresh.
build_postgres() {
    have "$POSTGRES_IMAGE" && return 0
    local r mirror; r=$(mktemp -d); mirror=$(debian_mirror)
    chmod 755 "$r"  # the chroot's / (mktemp makes it 0700): user postgres must pass through it
    log "debootstrap $SUITE with postgresql-15 from $mirror (about a minute)"
    debootstrap --variant=minbase "$SUITE" "$r" "$mirror" >"$r.log" 2>&1 || die "debootstrap failed; see $r.log"
    # No server may start in the chroot (it shares the host's network), and no cluster is made by the package.
    printf '#!/bin/sh\nexit 101\n' >"$r/usr/sbin/policy-rc.d"; chmod +x "$r/usr/sbin/policy-rc.d"
    mkdir -p "$r/etc/postgresql-common/createcluster.d"
    echo "create_main_cluster = false" >"$r/etc/postgresql-common/createcluster.d/activator.conf"
    mount -t proc proc "$r/proc"
    mount -t tmpfs tmpfs "$r/dev/shm" 2>/dev/null || { mkdir -p "$r/dev/shm" && mount -t tmpfs tmpfs "$r/dev/shm"; }
    trap 'umount "$r/dev/shm" "$r/proc" 2>/dev/null || true' RETURN
    chroot "$r" env DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends postgresql-15 \
        >>"$r.log" 2>&1 || die "installing postgresql-15 failed; see $r.log"
    chroot "$r" su postgres -s /bin/sh -c \
        "/usr/lib/postgresql/15/bin/initdb -D /var/lib/postgresql/data -U postgres --auth=trust" >>"$r.log" 2>&1 ||
        die "initdb failed; see $r.log"
    echo "host all all all trust" >>"$r/var/lib/postgresql/data/pg_hba.conf"
    printf "listen_addresses = '*'\nunix_socket_directories = '/tmp'\ndynamic_shared_memory_type = sysv\n" \
        >>"$r/var/lib/postgresql/data/postgresql.conf"
    umount "$r/dev/shm" "$r/proc"
    chroot "$r" apt-get clean
    rm -rf "$r"/var/lib/apt/lists/* "$r/usr/sbin/policy-rc.d"
    tar -C "$r" -c . | docker import \
        --change 'ENV PATH=/usr/lib/postgresql/15/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin' \
        --change 'ENV PGDATA=/var/lib/postgresql/data' --change 'USER postgres' \
        --change 'VOLUME ["/var/lib/postgresql/data"]' \
        --change 'CMD ["postgres", "-D", "/var/lib/postgresql/data"]' \
        - "$POSTGRES_IMAGE" >/dev/null
    rm -rf "$r" "$r.log"
    log "built $POSTGRES_IMAGE"
}

# A Debian with systemd as PID 1, for the test that runs the installed unit under a real systemd
# (tests/engine/test_real_systemd.py): systemd, Python for the installed venv, and the libraries the host's CRIU and
# runc link against (they are bound in from the host, as is the Docker socket).
SYSTEMD_PACKAGES=systemd,systemd-sysv,dbus,python3,python3-venv,libprotobuf-c1,libnl-3-200,libnet1,libnftables1,libbsd0,libgnutls30,libuuid1,runc,iproute2,procps,iptables
build_systemd() {
    local source="systemd-$(echo "$SYSTEMD_PACKAGES $SUITE" | sha256sum | cut -c1-12)"
    have "$SYSTEMD_IMAGE" "$source" && return 0
    local r mirror; r=$(mktemp -d); mirror=$(debian_mirror)
    log "debootstrap $SUITE with systemd from $mirror (about a minute)"
    debootstrap --variant=minbase --include="$SYSTEMD_PACKAGES" "$SUITE" "$r" "$mirror" >"$r.log" 2>&1 ||
        die "debootstrap failed; see $r.log"
    rm -rf "$r"/var/lib/apt/lists/*
    tar -C "$r" -c . | docker import --change "LABEL activator.source=$source" \
        --change 'CMD ["/lib/systemd/systemd"]' - "$SYSTEMD_IMAGE" >/dev/null
    rm -rf "$r" "$r.log"
    log "built $SYSTEMD_IMAGE"
}

[ "$(id -u)" = 0 ] || die "must run as root (debootstrap and docker import)"
docker info >/dev/null 2>&1 || die "dockerd is not running; run 'make setup' first"
targets=("$@"); [ ${#targets[@]} -gt 0 ] || targets=(busybox tomcat)
for t in "${targets[@]}"; do
    case "$t" in
        busybox) build_busybox ;;
        tomcat) build_tomcat ;;
        redis) build_redis ;;
        postgres) build_postgres ;;
        dns) build_dns ;;
        systemd) build_systemd ;;
        *) die "unknown image '$t' (busybox, tomcat, redis, postgres, systemd, dns)" ;;
    esac
done
