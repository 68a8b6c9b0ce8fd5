#!/usr/bin/env bash
# Refreshes activator/runtime/profiles/docker-default.json: Docker's own default seccomp profile, taken byte for byte from
# the Debian package that ships moby's source (golang-github-docker-docker-dev), at the version of the docker.io
# engine installed here (the same source version). apt verifies the package's signature; nothing is hand-edited.
set -euo pipefail
. "$(dirname "${BASH_SOURCE[0]}")/lib.sh"
ROOT=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
DEST=$ROOT/activator/runtime/profiles/docker-default.json
version=$(dpkg-query -W -f='${source:Version}' docker.io 2>/dev/null) || die "docker.io is not installed; run make setup"
work=$(mktemp -d); trap 'rm -rf "$work"' EXIT
(cd "$work" && apt-get -o APT::Sandbox::User=root download -qq "golang-github-docker-docker-dev=$version" >/dev/null) ||
    die "cannot download golang-github-docker-docker-dev=$version from the configured apt sources"
dpkg-deb --fsys-tarfile "$work"/golang-github-docker-docker-dev_*.deb |
    tar -xO ./usr/share/gocode/src/github.com/docker/docker/profiles/seccomp/default.json >"$work/default.json"
python3 -c 'import json,sys; p=json.load(open(sys.argv[1])); assert p["defaultAction"] and p["syscalls"]' \
    "$work/default.json" || die "the extracted profile is not a seccomp profile"
if cmp -s "$work/default.json" "$DEST"; then
    log "unchanged: $DEST is Docker $version's default profile"
else
    install -m 0644 "$work/default.json" "$DEST"
    log "updated $DEST to Docker $version's default profile; checkpoints rebuild (their seccomp origin changed)"
fi
