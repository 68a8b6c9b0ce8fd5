"""Whose output a kept log file holds (runtime/applog.py): by the instance's record, not by reading its name."""

from __future__ import annotations

from pathlib import Path

from activator.runtime import applog


def _instance(instances: Path, name: str, service: str | None, output: bytes) -> Path:
    d = instances / name
    d.mkdir(parents=True)
    if service is not None:
        applog.record_owner(d, service)
    (d / "output.log").write_bytes(output)
    return d


def test_service_a_tpl_is_not_filed_under_a(tmp_path: Path) -> None:
    """Service `a-tpl`'s instance a-tpl-1a2b3c4d has a name of the same shape as service `a`'s template: its
    output goes to a-tpl's file; `a`'s template output (kept from the build directory, no record) to a's."""
    logs = tmp_path / "logs"
    inst = _instance(tmp_path / "instances", "a-tpl-1a2b3c4d", "a-tpl", b"I am a-tpl\n")
    applog.keep(inst / "output.log", logs, inst.name)
    build = tmp_path / ".build-a-xyz"
    build.mkdir()
    (build / "template.log").write_bytes(b"I am a's template\n")
    applog.keep(build / "template.log", logs, "a-tpl-0badf00d")
    a_tpl = b"".join(p.read_bytes() for p in applog.kept(logs, "a-tpl"))
    a = b"".join(p.read_bytes() for p in applog.kept(logs, "a"))
    assert b"I am a-tpl" in a_tpl and b"I am a's template" not in a_tpl
    assert b"I am a's template" in a and b"I am a-tpl" not in a
    assert sorted(p.name for p in logs.iterdir()) == ["a-tpl.output", "a.output"]


def test_owner_of_an_instance_directory(tmp_path: Path) -> None:
    instances = tmp_path / "instances"
    assert applog.owner(_instance(instances, "a-tpl-1a2b3c4d", "a-tpl", b"")) == "a-tpl"
    assert applog.owner(_instance(instances, "web-1a2b3c4d", "web", b"")) == "web"
    # no record (a template, or a directory left by an older run): the name, read as a template's
    assert applog.owner(_instance(instances, "a-tpl-0badf00d", None, b"")) == "a"
    assert applog.owner(_instance(instances, "db-0badf00d", None, b"")) == "db"
    # a record that is not a service name is nobody's (it never names a file)
    bad = _instance(instances, "x-11111111", None, b"")
    (bad / applog.OWNER).write_text("../../etc/cron.d/x")
    assert applog.owner(bad) is None
    applog.keep(bad / "output.log", tmp_path / "logs", bad.name)
    assert not (tmp_path / "logs").exists() or list((tmp_path / "logs").iterdir()) == []
