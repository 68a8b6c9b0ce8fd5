"""User namespace ranges: where they come from, how they are kept, what the runtime spec says (no root needed)."""

from __future__ import annotations

import json
import os
import pwd
import shutil
import stat
import tempfile
from pathlib import Path

import pytest

from activator.config.model import Resources
from activator.errors import ActivatorError
from activator.runtime import userns
from activator.runtime.spec import ProcessSpec, runtime_spec

PROCESS = ProcessSpec(args=("/app",), env=(), cwd="/", uid=0, gid=0)


def test_the_pool_is_activator_s_subordinate_range_when_there_is_one(tmp_path: Path) -> None:
    sub = tmp_path / "subuid"
    sub.write_text("alice:100000:65536\nactivator:300000000:6553600\n")
    assert userns.pool(sub, sub) == (300000000, 6553600)
    # only a range both files give it counts, and one too small for a service does not
    gid = tmp_path / "subgid"
    gid.write_text("activator:400000000:6553600\n")
    assert userns.pool(sub, gid) == userns.DEFAULT_POOL
    sub.write_text("activator:300000000:1000\n")
    assert userns.pool(sub, sub) == userns.DEFAULT_POOL


def test_the_default_pool_is_refused_when_a_delegated_range_overlaps_it(tmp_path: Path) -> None:
    sub = tmp_path / "subuid"
    sub.write_text(f"bob:{userns.DEFAULT_POOL[0] + 5 * userns.SIZE}:65536\n")
    with pytest.raises(ActivatorError) as e:
        userns.pool(sub, tmp_path / "missing")
    assert "bob's subordinate ids" in str(e.value) and "'activator:START:COUNT'" in str(e.value)
    assert "\n" not in str(e.value)
    sub.write_text("bob:100000:65536\n# a comment\nbroken line\n")  # where useradd puts them: no overlap
    assert userns.pool(sub, tmp_path / "missing") == userns.DEFAULT_POOL


def test_each_service_gets_its_own_range_and_keeps_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(userns, "pool", lambda: (1_000_000, 3 * userns.SIZE))
    ranges = userns.Ranges(tmp_path, tmp_path / "registry.json")
    a, b = ranges.for_service("a"), ranges.for_service("b")
    assert a != b and {a.host, b.host} <= {1_000_000, 1_000_000 + userns.SIZE, 1_000_000 + 2 * userns.SIZE}
    assert userns.Ranges(tmp_path, tmp_path / "registry.json").for_service("a") == a  # kept (state_dir/userns.json)
    assert stat.S_IMODE((tmp_path / userns.STATE).stat().st_mode) == 0o600
    assert json.loads((tmp_path / userns.STATE).read_text()) == {"a": a.host, "b": b.host}
    ranges.for_service("c")
    with pytest.raises(ActivatorError) as e:
        ranges.for_service("d")
    assert "no user namespace range is left for service 'd'" in str(e.value)


def test_a_kept_range_outside_the_pool_is_replaced(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / userns.STATE).write_text(json.dumps({"a": 5}))
    monkeypatch.setattr(userns, "pool", lambda: (1_000_000, 2 * userns.SIZE))
    assert userns.Ranges(tmp_path, tmp_path / "registry.json").for_service("a").host == 1_000_000
    (tmp_path / userns.STATE).write_text("{not json")
    with pytest.raises(ActivatorError) as e:
        userns.Ranges(tmp_path, tmp_path / "registry.json").for_service("a")
    assert "userns.json is unreadable" in str(e.value) and "remove it" in str(e.value)


def test_idmap_text_and_ids() -> None:
    m = userns.IdMap(1 << 30)
    assert userns.IdMap.parse(str(m)) == m and str(m) == f"{1 << 30}:65536"
    assert m.to_host(0) == 1 << 30 and m.to_host(999) == (1 << 30) + 999
    assert m.to_host(70000) == 70000  # not a container id: left as it is
    assert m.oci() == [{"containerID": 0, "hostID": 1 << 30, "size": 65536}]


def test_the_runtime_spec_asks_for_a_user_namespace_with_the_range() -> None:
    common = dict(rootfs="/r", netns_path="/run/netns/x", cgroups_path="/a/x", hostname="h", resources=Resources())
    plain = runtime_spec(PROCESS, **common)  # type: ignore[arg-type]
    assert {"type": "user"} not in plain["linux"]["namespaces"] and "uidMappings" not in plain["linux"]
    m = userns.IdMap(1 << 30)
    spec = runtime_spec(PROCESS, idmap=m, **common)  # type: ignore[arg-type]
    assert {"type": "user"} in spec["linux"]["namespaces"]
    # the network namespace stays the one made outside it (prepared ahead)
    assert {"type": "network", "path": "/run/netns/x"} in spec["linux"]["namespaces"]
    assert spec["linux"]["uidMappings"] == spec["linux"]["gidMappings"] == m.oci()
    # the same capabilities as without one
    assert spec["process"]["capabilities"] == plain["process"]["capabilities"]


def test_userns_needs_activator_s_criu() -> None:
    assert userns.supported("4.2.1 (v4.2.1+activator-userns.0123456789ab)")
    assert not userns.supported("4.2.1")


def test_a_private_parent_is_named_with_the_fix() -> None:
    top = Path(tempfile.mkdtemp(prefix="activator-passable-"))  # /tmp itself lets everyone pass
    try:
        top.chmod(0o755)
        private = top / "private"
        (private / "state" / "instances").mkdir(parents=True)
        private.chmod(0o700)
        with pytest.raises(ActivatorError) as e:
            userns.check_passable(private / "state" / "instances")
        assert str(e.value).startswith(f"{private} lets no other user pass (mode 700)")
        assert f"chmod o+x {private}" in str(e.value) and "'userns: host'" in str(e.value)
        private.chmod(0o711)
        userns.check_passable(private / "state" / "instances")
    finally:
        shutil.rmtree(top, ignore_errors=True)


def test_a_criu_without_the_patch_is_named_in_one_line(tmp_path: Path) -> None:
    """userns: private on a CRIU without activator's patch: one line with the fix; userns: host still builds."""
    from activator.checkpoints.builder import CheckpointBuilder
    from activator.config.model import ListenAddress, ServiceConfig
    from activator.errors import CheckpointError

    builder = CheckpointBuilder(None, None, None, tmp_path / "instances", "4.2.1", "1.1.5")  # type: ignore[arg-type]
    svc = ServiceConfig(name="db", image="x", listen=(ListenAddress("127.0.0.1", 1),), port=5432)
    with pytest.raises(CheckpointError) as e:
        builder.idmap(svc)
    assert str(e.value) == ("service 'db': userns: private needs a CRIU built with activator's patch "
                            "(scripts/criu-patches/; `make setup` builds it), found CRIU 4.2.1; or set 'userns: host'")
    host = ServiceConfig(name="db", image="x", listen=(ListenAddress("127.0.0.1", 1),), port=5432, userns="host")
    assert builder.idmap(host) is None


def test_ranges_are_unique_across_state_dirs_and_freed_with_them(tmp_path: Path,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Two activators on one host (two state dirs) never hand out the same range; a state dir removed frees its."""
    monkeypatch.setattr(userns, "pool", lambda: (1_000_000, 2 * userns.SIZE))
    registry = tmp_path / "host" / "ranges.json"
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    a = userns.Ranges(one, registry).for_service("web")
    b = userns.Ranges(two, registry).for_service("web")  # the same service name, another daemon
    assert a != b
    with pytest.raises(ActivatorError):
        userns.Ranges(two, registry).for_service("db")  # the pool of two is used up host-wide
    shutil.rmtree(one)
    assert userns.Ranges(two, registry).for_service("db") == a  # freed with its state dir
    assert stat.S_IMODE(registry.stat().st_mode) == 0o600



# --- the range registry: never freed on absence; ranges off the host's users and groups (issue 30 item 7) ------


class FakeIds(userns.HostIds):
    """NSS as a directory service would answer: `listed` is what getpwall()/getgrall() return, `directory` ids
    only a getpwuid()/getgrgid() finds (SSSD without enumeration)."""

    def __init__(self, tmp: Path, listed: dict[str, int], directory: dict[int, str], sources: str) -> None:
        (tmp / "nsswitch.conf").write_text(f"passwd: {sources}\ngroup: {sources}\nhosts: files dns\n")
        super().__init__(tmp / "nsswitch.conf", tmp / "no-subuid", tmp / "no-subgid")
        self.listed, self.directory, self.asked = listed, directory, 0

    def users(self) -> list[tuple[str, int]]:
        return list(self.listed.items())

    def groups(self) -> list[tuple[str, int]]:
        return []

    def user_by_id(self, uid: int) -> str | None:
        self.asked += 1
        return self.directory.get(uid)

    def group_by_id(self, gid: int) -> str | None:
        return None


BASE = 1_000_000


def test_a_range_holding_a_listed_users_id_is_skipped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(userns, "pool", lambda: (BASE, 3 * userns.SIZE))
    ids = FakeIds(tmp_path, {"root": 0, "alice": BASE + 70000}, {}, "files systemd")
    got = userns.Ranges(tmp_path, tmp_path / "registry.json", ids).for_service("a")
    assert got.host == BASE  # control: the first range holds no host id
    got = userns.Ranges(tmp_path, tmp_path / "registry.json", ids).for_service("b")
    assert got.host == BASE + 2 * userns.SIZE  # the second holds alice's uid: skipped
    assert ids.asked == 0  # files and systemd list every user: no id-by-id lookups


def test_a_directory_users_id_is_found_id_by_id(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """SSSD without enumeration: getpwall() does not list the user, getpwuid() finds it."""
    monkeypatch.setattr(userns, "pool", lambda: (BASE, 2 * userns.SIZE))
    ids = FakeIds(tmp_path, {"root": 0}, {BASE + 12345: "CORP\\\\bob"}, "files sss")
    assert ids.unlisted_sources() == ["sss"]
    assert userns.Ranges(tmp_path, tmp_path / "registry.json", ids).for_service("a").host == BASE + userns.SIZE
    with pytest.raises(ActivatorError) as e:
        userns.Ranges(tmp_path, tmp_path / "registry.json", ids).for_service("b")
    assert "ranges skipped for host ids, e.g. user CORP\\\\bob (1012345)" in str(e.value)
    assert "\n" not in str(e.value)


def test_subordinate_ids_of_other_users_are_avoided(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(userns, "pool", lambda: (BASE, 2 * userns.SIZE))
    (tmp_path / "subuid").write_text(f"carol:{BASE}:1000\n{userns.POOL_USER}:{BASE}:{2 * userns.SIZE}\n")
    ids = userns.HostIds(tmp_path / "nsswitch.conf", tmp_path / "subuid", tmp_path / "subgid")
    assert ids.conflict(BASE) == f"carol's subordinate ids in {tmp_path / 'subuid'} ({BASE}-{BASE + 999})"
    assert ids.conflict(BASE + userns.SIZE) is None  # activator's own delegation is the pool, not a conflict


def test_the_hosts_real_users_and_groups_are_seen(tmp_path: Path) -> None:
    """The real NSS: root (0) and nobody (65534) are in the first range of ids; the default pool's first range
    holds nobody's id on this host (else activator would skip it)."""
    ids = userns.HostIds()
    assert ids.conflict(0) is not None and "root" in (ids.conflict(0) or "")
    nobody = pwd.getpwnam("nobody").pw_uid
    assert ids.conflict(nobody - 10, 20) is not None
    assert ids.conflict(userns.DEFAULT_POOL[0]) is None


def test_a_missing_userns_json_frees_nothing(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A state dir whose userns.json is missing for a while (its disk not mounted yet) keeps its ranges: another
    state dir does not get them, and it gets its own back from the registry."""
    monkeypatch.setattr(userns, "pool", lambda: (BASE, 2 * userns.SIZE))
    registry = tmp_path / "host" / "ranges.json"
    disk, other = tmp_path / "disk" / "state", tmp_path / "other"
    disk.mkdir(parents=True)
    other.mkdir()
    a = userns.Ranges(disk, registry).for_service("web")
    (disk / userns.STATE).unlink()  # as if the disk were not mounted: the file is not there
    b = userns.Ranges(other, registry).for_service("web")
    assert b != a  # not freed
    assert userns.Ranges(disk, registry).for_service("web") == a  # its table back from the registry
    assert json.loads((disk / userns.STATE).read_text()) == {"web": a.host}
    # the whole mount point gone (the disk's directory absent, its parent on another device: not this one)
    dev = os.stat(disk).st_dev
    data = json.loads(registry.read_text())
    data[str(disk.resolve())][userns.DEVICE] = dev + 1
    registry.write_text(json.dumps(data))
    shutil.rmtree(tmp_path / "disk")
    with pytest.raises(ActivatorError):
        userns.Ranges(other, registry).for_service("db")  # the pool of two: still one each
    # control: a state dir removed from a filesystem that is there frees its ranges
    data = json.loads(registry.read_text())
    data[str(disk.resolve())][userns.DEVICE] = dev
    registry.write_text(json.dumps(data))
    assert userns.Ranges(other, registry).for_service("db") == a


def test_a_kept_range_another_state_dir_holds_is_refused(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(userns, "pool", lambda: (BASE, 2 * userns.SIZE))
    registry = tmp_path / "host" / "ranges.json"
    one, two = tmp_path / "one", tmp_path / "two"
    one.mkdir()
    two.mkdir()
    a = userns.Ranges(one, registry).for_service("web")
    (two / userns.STATE).write_text(json.dumps({"web": a.host}))  # as a registry that freed it would have let be
    with pytest.raises(ActivatorError) as e:
        userns.Ranges(two, registry).for_service("web")
    assert f"also held by the activator of {one.resolve()}" in str(e.value) and "\n" not in str(e.value)
    assert userns.Ranges(one, registry).for_service("web") == a  # control: its holder keeps it
