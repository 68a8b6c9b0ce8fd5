"""Every writer fed a name from outside (a checkpoint record, an image, Docker, the config) builds its text or its
path from checked values or refuses in one line: newlines, `..`, absolute paths, NULs, quotes and the syntax of
the text it writes. Each refusal has its control: the ordinary value gives the expected text (issue 30 item 4)."""

from __future__ import annotations

import ipaddress
import json
import os
from pathlib import Path
from typing import Any

import pytest

from activator.config.model import NetworkSettings, Volume
from activator.errors import ActivatorError, CheckpointError, RuncError
from activator.net import firewall, network
from activator.net.network import Backend, HostNetwork, _ident
from activator.net.nft import NftError, ifname
from activator.runtime import criurestore, extmounts, imagefs, volumes
from activator.runtime.etcfiles import hosts_line
from activator.runtime.extmounts import DevEntry
from activator.runtime.runc import CRIU_CONFIG, Runc, dump_config, restore_config
from activator.runtime.sandbox import Sandbox

#: what `runc run` makes in /dev (read from a busybox template's snapshot_dev), modes as runc sets them
RUNC_DEV = (
    DevEntry("console", "chr", 0o620, os.makedev(5, 1)),
    DevEntry("core", "link", 0o777, target="/proc/kcore"),
    DevEntry("fd", "link", 0o777, target="/proc/self/fd"),
    DevEntry("full", "chr", 0o666, os.makedev(1, 7)),
    DevEntry("mqueue", "dir", 0o1777),
    DevEntry("null", "chr", 0o666, os.makedev(1, 3)),
    DevEntry("ptmx", "link", 0o777, target="pts/ptmx"),
    DevEntry("pts", "dir", 0o755),
    DevEntry("random", "chr", 0o666, os.makedev(1, 8)),
    DevEntry("shm", "dir", 0o1777),
    DevEntry("stderr", "link", 0o777, target="/proc/self/fd/2"),
    DevEntry("stdin", "link", 0o777, target="/proc/self/fd/0"),
    DevEntry("stdout", "link", 0o777, target="/proc/self/fd/1"),
    DevEntry("tty", "chr", 0o666, os.makedev(5, 0)),
    DevEntry("urandom", "chr", 0o666, os.makedev(1, 9)),
    DevEntry("zero", "chr", 0o666, os.makedev(1, 5)),
)
HOSTILE_NAMES = ["../../../var/tmp/x", "..", ".", "/etc/x", "a/b", "null\n", "nu\0ll", "x\nexternal mnt[/]:/", ""]


def one_line(e: BaseException) -> str:
    text = str(e)
    assert "\n" not in text and "\0" not in text, text
    return text


# --- the slot's /dev (extmounts) ----------------------------------------------------------------------------


def test_runc_s_own_dev_entries_pass() -> None:
    for e in RUNC_DEV:
        extmounts.check(e)


@pytest.mark.parametrize("name", HOSTILE_NAMES)
def test_a_dev_entry_name_that_is_not_one_plain_component_is_refused(name: str) -> None:
    with pytest.raises(CheckpointError, match=r"checkpoint /dev entry .* refused: not a plain file name") as e:
        extmounts.check(DevEntry(name, "chr", 0o666, os.makedev(1, 3)))
    one_line(e.value)


@pytest.mark.parametrize(("entry", "why"), [
    (DevEntry("null", "chr", 0o666, os.makedev(1, 1)), "device 1:1 is not one runc makes"),  # /dev/mem
    (DevEntry("sda", "chr", 0o666, os.makedev(8, 0)), "device 8:0 is not one runc makes"),
    (DevEntry("zero", "chr", 0o666, os.makedev(1, 3)), "device 1:3 is not one runc makes under that name"),
    (DevEntry("null", "chr", -1, os.makedev(1, 3)), "no setuid"),
    (DevEntry("null", "chr", 0o4666, os.makedev(1, 3)), "no setuid"),
    (DevEntry("null", "chr", 0o1666, os.makedev(1, 3)), "sticky"),
    (DevEntry("null", "chr", 0o666, -1), "device -1"),
    (DevEntry("null", "chr", True, os.makedev(1, 3)), "wrong types"),
    (DevEntry("sda", "blk", 0o666, os.makedev(8, 0)), "no block devices"),
    (DevEntry("x", "fifo", 0o666), "no block devices"),
    (DevEntry("pts", "dir", 0o2755), "at most 0o1777"),
    (DevEntry("pts", "dir", 0o4755), "at most 0o1777"),
    (DevEntry("fd", "link", 0o777, target="/etc/shadow"), "target '/etc/shadow' is not one runc makes"),
    (DevEntry("fd", "link", 0o777, target="../../../../etc"), "is not one runc makes"),
    (DevEntry("fd", "link", 0o777, target="/proc/self/fd\n"), "is not one runc makes"),
])
def test_a_dev_entry_runc_would_not_make_is_refused(entry: DevEntry, why: str) -> None:
    with pytest.raises(CheckpointError, match=f"checkpoint /dev entry '{entry.name}'") as e:
        extmounts.check(entry)
    assert why in one_line(e.value)


@pytest.mark.parametrize(("key", "point"), [
    ("dev\nexternal mnt[/]:/etc", "/dev"), ("../dev", "/dev"), ("/dev", "/dev"), ("dev\0", "/dev"),
    ("mask0]", "/proc/acpi"), ("dev", "/"), ("dev", "/dev/../etc"), ("shm", "/dev"), ("mask1", "/etc"),
    ("mask1", "/proc/acpi\n"),
])
def test_an_external_mount_other_than_activators_own_is_refused(key: str, point: str) -> None:
    with pytest.raises(CheckpointError, match="checkpoint external mount") as e:
        extmounts.check_external({key: point})
    one_line(e.value)


def test_the_external_mounts_activator_records_pass() -> None:
    extmounts.check_external({"dev": "/dev", "shm": "/dev/shm", "mask0": "/proc/acpi", "mask3": "/sys/firmware"})
    extmounts.check_external(extmounts.mounts())


@pytest.mark.parametrize("name", ["../../../var/tmp/x", "/var/tmp/x"])
def test_a_hostile_dev_record_makes_nothing_on_the_host(tmp_path: Path, name: str) -> None:
    # the record that made a 0666 device node anywhere as root: refused before the slot's directory is made
    target = tmp_path / "slot" / "ext"
    dev = (*RUNC_DEV, DevEntry(name, "chr", 0o666, os.makedev(1, 3)))
    with pytest.raises(CheckpointError, match=f"{name!r}"):
        extmounts.prepare(target, dev, {"dev": "/dev", "shm": "/dev/shm"})
    assert not target.exists()
    assert not (tmp_path / "var").exists()
    with pytest.raises(CheckpointError, match="external mount key"):
        extmounts.prepare(target, RUNC_DEV, {"dev": "/dev", "x\nexternal mnt[/]:/": "/dev"})
    assert not target.exists()


def test_the_snapshot_keeps_only_what_check_allows(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # an app that added /dev entries before the dump: not recorded (a restart would lose them too)
    fake = tmp_path / "proc" / "dev"
    fake.mkdir(parents=True)
    os.symlink("/proc/self/fd", fake / "fd")
    os.symlink("/etc/shadow", fake / "evil")
    (fake / "pts").mkdir(mode=0o755)
    os.chmod(fake / "pts", 0o755)
    (fake / "regular").write_text("")
    real_path = Path

    def path(p: str) -> Path:
        return fake if p.endswith("/root/dev") else real_path(p)

    monkeypatch.setattr(extmounts, "Path", path)
    assert extmounts.snapshot_dev(1) == [DevEntry("fd", "link", 0o777, target="/proc/self/fd"),
                                         DevEntry("pts", "dir", 0o755)]


# --- the CRIU config and the RPC --------------------------------------------------------------------------------


def test_the_criu_configs_are_the_expected_text() -> None:
    assert dump_config({"dev": "/dev", "shm": "/dev/shm", "mask0": "/proc/acpi"}) == CRIU_CONFIG + (
        "external mnt[/dev]:dev\nexternal mnt[/proc/acpi]:mask0\nexternal mnt[/dev/shm]:shm\n")
    assert restore_config({"dev": Path("/s/i/ext/dev"), "/data": Path("/s/vol/0"), "/sys": Path("/s/i/sys")}) == \
        CRIU_CONFIG + ("external mnt[/data]:/s/vol/0\nexternal mnt[/sys]:/s/i/sys\nexternal mnt[dev]:/s/i/ext/dev\n")
    # through runc on a pure v2 host: the instance's own cgroup, in place of the template's it was dumped in
    assert restore_config({}, cgroup_root="/activator/web-1a2b3c4d") == \
        CRIU_CONFIG + "cgroup-root /activator/web-1a2b3c4d\n"
    with pytest.raises(RuncError, match="CRIU config: path"):
        restore_config({}, cgroup_root="/activator/x\nexternal mnt[/]:/etc")


@pytest.mark.parametrize("key", ["dev\nexternal mnt[/]:/etc", "dev]", "dev:x", "de v", "dev\0", "/data/../etc",
                                 "//data", "", "dev\r", "#dev"])
def test_a_criu_config_key_that_would_misparse_is_refused(key: str) -> None:
    with pytest.raises(RuncError, match=r"CRIU config: (mount key|path)") as e:
        restore_config({key: Path("/s/ext/dev")})
    one_line(e.value)
    with pytest.raises(RuncError, match="CRIU config"):
        dump_config({key: "/dev"})


@pytest.mark.parametrize("path", ["/s/ext\nexternal mnt[/]:/etc", "relative/dev", "/s/../etc", "/s/./x", "/s/x]",
                                  "/s/x:y", "/s/x\0", "/s/x y", "/s/x/", "//s"])
def test_a_criu_config_path_that_would_misparse_is_refused(path: str) -> None:
    with pytest.raises(RuncError, match="CRIU config: path") as e:
        restore_config({"dev": path})  # type: ignore[dict-item]  # as a str: Path would normalise some
    one_line(e.value)
    with pytest.raises(RuncError, match="CRIU config: path"):
        dump_config({"dev": path})


def test_the_daemon_wide_dump_config_is_written_from_checked_values(tmp_path: Path) -> None:
    Runc(tmp_path / "runc").write_criu_config()
    text = (tmp_path / "runc" / "criu-dump.conf").read_text()
    assert text.startswith(CRIU_CONFIG) and "external mnt[/dev]:dev\n" in text


def write_descriptors(tmp_path: Path, value: Any) -> Path:
    p = tmp_path / "descriptors.json"
    p.write_text(json.dumps(value))
    return p


def test_the_restores_inherit_keys_are_the_templates_pipes(tmp_path: Path) -> None:
    p = write_descriptors(tmp_path, ["/dev/null", "pipe:[1234]", "pipe:[99]", "pipe:[5]"])
    assert criurestore.output_keys(p) == {"pipe:[1234]", "pipe:[99]"}
    assert criurestore.output_keys(write_descriptors(tmp_path, ["/dev/null", "/dev/null", "/dev/null"])) == set()
    assert criurestore.inherit_key("tcp-listen:8080") == "tcp-listen:8080"


@pytest.mark.parametrize("value", [
    ["/dev/null", "pipe:[1]\nexternal mnt[/]:/", "pipe:[2]"], ["/dev/null", "pipe:../../x", "pipe:[2]"],
    ["/dev/null", "pipe:[1]\0", "pipe:[2]"], ["/dev/null", "pipe:/etc/shadow", "pipe:[2]"],
    ["/dev/null", 5, "pipe:[2]"], {"a": "pipe:[1]"}, "pipe:[1]",
])
def test_a_descriptors_record_with_other_keys_is_refused(tmp_path: Path, value: Any) -> None:
    with pytest.raises(RuncError, match=r"CRIU restore: .*descriptors\.json") as e:
        criurestore.output_keys(write_descriptors(tmp_path, value))
    one_line(e.value)


@pytest.mark.parametrize("key", ["tcp-listen:80\nx", "pipe:[1]", "tcp-listen:../1", "tcp-listen:1\0", ""])
def test_an_inherit_key_of_another_shape_is_refused(key: str) -> None:
    with pytest.raises(RuncError, match="inherit-fd key") as e:
        criurestore.inherit_key(key)
    one_line(e.value)


# --- files written into an image's tree ---------------------------------------------------------------------


def sandbox(tmp_path: Path) -> Sandbox:
    sb = Sandbox("svc-0001", tmp_path / "instances", Runc(tmp_path / "runc"))
    sb.layout.rootfs.mkdir(parents=True)
    return sb


def test_etc_hosts_is_written_into_the_images_etc(tmp_path: Path) -> None:
    sb = sandbox(tmp_path)
    (sb.layout.rootfs / "etc").mkdir()
    os.symlink("/etc/hosts", sb.layout.rootfs / "etc" / "hosts")  # a symlink there is replaced, never followed
    sb.write_etc("web", (("db.local", "10.0.0.5"),))
    hosts = sb.layout.rootfs / "etc" / "hosts"
    assert not hosts.is_symlink()
    assert hosts.read_text() == ("127.0.0.1\tlocalhost web\n::1\tlocalhost ip6-localhost ip6-loopback\n"
                                 "10.0.0.5\tdb.local\n")
    assert hosts.stat().st_mode & 0o7777 == 0o644


def test_an_images_etc_that_points_at_a_host_directory_gets_the_images_own(tmp_path: Path) -> None:
    victim = tmp_path / "host-etc"  # stands for the host's /etc
    victim.mkdir()
    (victim / "hosts").write_text("the host's own\n")
    sb = sandbox(tmp_path)
    os.symlink(str(victim), sb.layout.rootfs / "etc")  # absolute: on the host it names the host's directory
    inside = sb.layout.rootfs / str(victim).lstrip("/")  # the same path inside the image
    inside.mkdir(parents=True)
    sb.write_etc("web")
    assert (victim / "hosts").read_text() == "the host's own\n"
    assert sorted(os.listdir(victim)) == ["hosts"]
    assert (inside / "hosts").read_text().startswith("127.0.0.1\tlocalhost web\n")  # the control
    # without that directory in the image, nothing is written anywhere
    (inside / "hosts").unlink()
    inside.rmdir()
    sb.write_etc("web")
    assert sorted(os.listdir(victim)) == ["hosts"] and not inside.exists()


def test_an_etc_hosts_that_is_a_directory_is_refused_in_one_line(tmp_path: Path) -> None:
    sb = sandbox(tmp_path)
    (sb.layout.rootfs / "etc" / "hosts").mkdir(parents=True)
    with pytest.raises(ActivatorError, match="the image's /etc/hosts is a directory") as e:
        sb.write_etc("web")
    one_line(e.value)


@pytest.mark.parametrize("name", ["web\n10.0.0.1 bank.example", "web#x", "web x", "a\0b", "", "../x/y"])
def test_a_hosts_line_from_an_unchecked_name_is_refused(name: str) -> None:
    with pytest.raises(ActivatorError, match="/etc/hosts") as e:
        hosts_line("10.0.0.1", name)
    one_line(e.value)
    with pytest.raises(ActivatorError, match="is not an IP address"):
        hosts_line(name or "x", "web")
    assert hosts_line("10.0.0.1", "web", "web.local") == "10.0.0.1\tweb web.local"


@pytest.mark.parametrize("name", ["hosts/../../x", "..", "/etc/hosts", "a\0"])
def test_replace_file_takes_one_file_name(tmp_path: Path, name: str) -> None:
    with pytest.raises(ValueError, match="not one file name"):
        imagefs.replace_file(tmp_path, "/etc", name, "x")


# --- nftables rule text --------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ['br0"', "br0\n", "br0;", "br0}", "br 0", "", "a" * 16, "br0\0", "br*0", "x'"])
def test_an_interface_name_that_would_leave_its_quotes_is_refused(name: str) -> None:
    with pytest.raises(NftError, match="interface name") as e:
        ifname(name)
    one_line(e.value)


def test_interface_names_are_quoted_as_they_are() -> None:
    assert ifname("activator0") == '"activator0"'
    assert ifname("br-*") == '"br-*"'
    assert ifname("a" * 15) == f'"{"a" * 15}"'


def test_a_bridge_name_that_would_break_the_rules_is_refused_before_anything(tmp_path: Path) -> None:
    for name in ['x"; flush ruleset; "', "x\ny"]:
        with pytest.raises(NftError, match="interface name"):
            HostNetwork(NetworkSettings(bridge=name), owner=tmp_path)


class Recorder:
    def __init__(self) -> None:
        self.text: list[str] = []

    def run(self, cmd: str) -> None:
        self.text.append(cmd)


def test_the_table_is_written_from_checked_interface_names(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net = HostNetwork(NetworkSettings(bridge="actv0"), owner=tmp_path)
    rec = Recorder()
    net._nft = rec  # type: ignore[assignment]
    monkeypatch.setattr(firewall, "docker_bridges", lambda: ["br-1a2b"])
    net._install_table()
    table = rec.text[-1]
    assert 'iifname "actv0" oifname "br-1a2b" ct status & dnat == 0 drop' in table
    assert 'oifname "actv0" ct state new drop' in table
    # a name Docker reports that would end the string: the table is not written at all
    monkeypatch.setattr(firewall, "docker_bridges", lambda: ['x" accept; "'])
    rec.text.clear()
    with pytest.raises(NftError, match="interface name"):
        net._install_table()
    assert not any("accept; " in t for t in rec.text)


@pytest.mark.parametrize("service", ['web";\n}', "a b;c}", "..", "x\0y", "web\nflush ruleset"])
def test_a_service_name_becomes_an_identifier_of_letters_digits_and_underscores(service: str) -> None:
    ident = _ident(service)
    assert ident.replace("_", "").isalnum() and ident.isascii()


def test_the_steering_rules_are_built_from_checked_values(tmp_path: Path) -> None:
    net = HostNetwork(NetworkSettings(bridge="actv0"), owner=tmp_path)
    net._backends["web;}"] = [Backend(ipaddress.IPv4Address("10.89.0.2"), 8080, 0xA0100002)]
    net._exempt["web;}"] = ("10.0.0.0/8",)
    rules = net._steer_rules("web;}")
    assert rules[0] == f"flush chain ip {net.table} svc_web_x3b_x7d"
    assert rules[1] == f"add rule ip {net.table} svc_web_x3b_x7d ip saddr {{ 10.0.0.0/8 }} return"
    assert any(r.endswith("dnat ip to ct mark map { 0xa0100002 : 10.89.0.2 . 8080 }") for r in rules)
    assert all("\n" not in r and ";" not in r.split("svc_")[1] for r in rules)
    assert network._ident("web-a") != network._ident("web_a")


# --- paths under state_dir ------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["../../etc", "..", "a/b", "data\n", "da\0ta", ".hidden", "x" * 65])
def test_a_volume_name_that_is_a_path_is_refused(tmp_path: Path, name: str) -> None:
    with pytest.raises(ActivatorError, match="is not a volume name") as e:
        volumes.binds((Volume(name, "/data"),), tmp_path)
    one_line(e.value)
    with pytest.raises(ActivatorError, match=r"service 'svc': volumes: .* is not a volume name"):
        volumes.ensure((Volume(name, "/data"),), tmp_path, tmp_path / "image", "svc")
    assert not (tmp_path / "volumes").exists() and not (tmp_path / "etc").exists()


def test_a_named_volume_lives_in_state_dirs_volumes(tmp_path: Path) -> None:
    (bind,) = volumes.binds((Volume("data-1.x", "/data"),), tmp_path)
    assert bind.host == tmp_path / "volumes" / "data-1.x"
    (host,) = volumes.binds((Volume("/srv/data", "/data"),), tmp_path)  # a host path: the config author's own
    assert host.host == Path("/srv/data")
