"""Every key of a Compose service is applied, refused, or ignored with a note: never silently dropped (issue 17).

The key list is the Compose specification's own (tests/data/compose-spec.json, its service schema). The pure tests
check the classification of each key; the engine test serves a Compose service that uses every applied key and
reads what the restored instance got from inside it (a CGI of its own, bound in with a volume).
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from activator.config import compose
from activator.config.model import ServiceConfig, load_config
from activator.errors import ConfigError

SPEC = json.loads((Path(__file__).parent.parent / "data" / "compose-spec.json").read_text())
SERVICE_KEYS = sorted(SPEC["definitions"]["service"]["properties"])
DEPLOY_KEYS = sorted(SPEC["definitions"]["deployment"]["properties"])

#: a value that says something, for the keys whose handling is "refused" or "ignored"
SAMPLES: dict[str, Any] = {
    "ports": ["8080:80"], "build": ".", "depends_on": ["other"], "deploy": {"replicas": 2},
    "healthcheck": {"test": ["CMD", "true"]}, "extends": {"service": "base"}, "develop": {"watch": []},
    "networks": ["front"], "labels": {"a": "b"}, "logging": {"driver": "json-file"},
}

#: applied: the key and a value, and what the service then has
APPLIED: dict[str, tuple[Any, Any]] = {
    "image": ("other:1", lambda s: s.image == "other:1"),
    "command": ("httpd -f", lambda s: s.command == ("httpd", "-f")),
    "entrypoint": (["/bin/sh", "-c"], lambda s: s.entrypoint == ("/bin/sh", "-c")),
    "environment": (["A=1", "FROM_SHELL"], lambda s: dict(s.environment) == {"A": "1", "FROM_SHELL": "shell"}),
    "env_file": ("web.env", lambda s: dict(s.environment) == {"FROM_FILE": "1"}),
    "user": ("1000:1000", lambda s: s.user == "1000:1000"),
    "working_dir": ("/srv", lambda s: s.working_dir == "/srv"),
    "cap_add": (["SYS_PTRACE"], lambda s: s.cap_add == ("SYS_PTRACE",)),
    "cap_drop": (["ALL"], lambda s: s.cap_drop == ("ALL",)),
    "volumes": (["./data:/data:ro"], lambda s: s.volumes[0].target == "/data" and s.volumes[0].read_only),
    "ports": (["127.0.0.1:8081:80", "8082:80"], lambda s: [str(a) for a in s.listen] ==
              ["127.0.0.1:8081", "0.0.0.0:8082"] and s.port == 80),
    "expose": (["80"], lambda s: s.port == 80),  # the published port's: nothing to say (no port published: below)
    "hostname": ("web1", lambda s: s.hostname == "web1"),
    "read_only": (True, lambda s: s.read_only),
    "tmpfs": (["/run:size=1m", "/tmp"], lambda s: [t.target for t in s.tmpfs] == ["/run", "/tmp"]
              and "size=1048576" in s.tmpfs[0].options and "noexec" in s.tmpfs[1].options),
    "ulimits": ({"nofile": {"soft": 100, "hard": 200}, "nproc": 50},
                lambda s: s.ulimits == (("nofile", 100, 200), ("nproc", 50, 50))),
    "healthcheck": ({"test": ["CMD-SHELL", "test -e /run/ok"], "timeout": "2s", "start_period": "1m30s"},
                    lambda s: s.readiness.command == ("test -e /run/ok",) and s.readiness.command_timeout == 2
                    and s.readiness.timeout == 90 + 3 * 32),
    "mem_limit": ("64m", lambda s: s.resources.memory == 64 << 20),
    "cpus": ("0.5", lambda s: s.resources.cpus == 0.5),
    "pids_limit": (100, lambda s: s.resources.pids == 100),
    "deploy": ({"resources": {"limits": {"memory": "32m", "cpus": "1.5", "pids": 64}}},
               lambda s: (s.resources.memory, s.resources.cpus, s.resources.pids) == (32 << 20, 1.5, 64)),
    "stop_signal": ("SIGINT", lambda s: s.stop_signal == "SIGINT"),
    "stop_grace_period": ("1m30s", lambda s: s.stop_grace == 90),
    "extra_hosts": (["db.example:10.1.2.3", "v6.example=::1"],
                    lambda s: s.extra_hosts == (("db.example", "10.1.2.3"), ("v6.example", "::1"))),
    "security_opt": (["no-new-privileges:true", "seccomp=unconfined"], lambda s: s.seccomp == "unconfined"),
    "depends_on": ({"cache": {"condition": "service_started"}}, lambda s: s.depends_on == ("cache",)),
    "userns_mode": ("host", lambda s: s.userns == "host"),
}


def _load(tmp_path: Path, key: str, value: Any, **extra: Any) -> Any:
    web: dict[str, Any] = {"image": "x", "ports": ["8080:80"], "x-activator": {}}
    web[key] = value
    doc = {"services": {"web": web, "cache": {"image": "redis", "ports": ["10.89.0.1:6379:6379"],
                                              "x-activator": {}}}, **extra}
    (tmp_path / "web.env").write_text("FROM_FILE=1\n")
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump(doc))
    return load_config(tmp_path / "compose.yaml")


def test_every_key_of_the_specification_is_classified_once() -> None:
    tables = [set(compose.APPLIED), set(compose.IGNORED), set(compose.REFUSED)]
    for key in SERVICE_KEYS:
        assert sum(key in t for t in tables) == 1, f"{key}: applied, ignored or refused, and only one of them"
    assert set().union(*tables) == set(SERVICE_KEYS), "a key the specification does not have"
    assert set(APPLIED) == compose.APPLIED, "every applied key has a test below"
    assert set(DEPLOY_KEYS) == compose.DEPLOY_IGNORED | {"resources"}


@pytest.mark.parametrize("key", sorted(compose.APPLIED))
def test_an_applied_key_reaches_the_service(tmp_path: Path, key: str, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_SHELL", "shell")
    value, check = APPLIED[key]
    cfg = _load(tmp_path, key, value)
    svc: ServiceConfig = cfg.service("web")
    assert check(svc), svc
    assert not [n for n in cfg.notes if f".{key}:" in n and key != "depends_on"]


@pytest.mark.parametrize("key", sorted(compose.REFUSED))
def test_a_refused_key_is_refused_in_one_line(tmp_path: Path, key: str) -> None:
    with pytest.raises(ConfigError) as e:
        _load(tmp_path, key, SAMPLES.get(key, "something"))
    msg = str(e.value)
    assert f"compose.yaml: services.web.{key}: not supported (" in msg and "\n" not in msg, msg
    cfg = _load(tmp_path, key, False)  # a key that says nothing (`tty: false`) is not refused
    assert cfg.service("web").image == "x"


@pytest.mark.parametrize("key", sorted(compose.IGNORED))
def test_an_ignored_key_is_named_with_why(tmp_path: Path, key: str) -> None:
    cfg = _load(tmp_path, key, SAMPLES.get(key, "something"))
    (note,) = [n for n in cfg.notes if n.startswith(f"services.web.{key}: ignored: ")]
    assert len(note) > len(f"services.web.{key}: ignored: ") + 10


def test_deploy_beyond_limits(tmp_path: Path) -> None:
    cfg = _load(tmp_path, "deploy", {"replicas": 3, "resources": {"limits": {"memory": "64m"}}})
    assert cfg.service("web").resources.memory == 64 << 20
    assert any("services.web.deploy.replicas: ignored" in n and "max_instances" in n for n in cfg.notes)
    with pytest.raises(ConfigError, match=r"services.web.deploy.resources.reservations: not supported"):
        _load(tmp_path, "deploy", {"resources": {"reservations": {"memory": "64m"}}})
    with pytest.raises(ConfigError, match=r"services.web.mem_limit: says 32m and deploy.resources.limits"):
        load_config(_write(tmp_path, {
            "image": "x", "ports": ["1:2"], "x-activator": {}, "mem_limit": "32m",
            "deploy": {"resources": {"limits": {"memory": "64m"}}}}))


def _write(tmp_path: Path, web: dict[str, Any], **extra: Any) -> Path:
    (tmp_path / "compose.yaml").write_text(yaml.safe_dump({"services": {"web": web}, **extra}))
    return tmp_path / "compose.yaml"


def test_unknown_keys_and_odd_values(tmp_path: Path) -> None:
    base: dict[str, Any] = {"image": "x", "ports": ["1:2"], "x-activator": {}}
    cases: list[tuple[dict[str, Any], str]] = [
        ({"colour": "red"}, "services.web.colour: not a key of a Compose service"),
        ({"environment": {"DEBUG": True}}, "services.web.environment.DEBUG: true is a boolean; Compose wants a "
                                           "string: quote it ('true')"),
        ({"security_opt": ["apparmor=unconfined"]}, "services.web.security_opt: 'apparmor=unconfined' is not "
                                                    "supported"),
        ({"security_opt": ["no-new-privileges:false"]}, "'no-new-privileges:false' is not supported"),
        ({"stop_grace_period": "soon"}, "services.web.stop_grace_period: 'soon' is not a duration"),
        ({"healthcheck": {"test": ["WHAT"]}}, "services.web.healthcheck.test: expected [CMD, ARG...]"),
        ({"ports": ["1:2", "3:4"]}, "publish ports 2, 4 of the app"),
        ({"volumes": ["data:/data"]}, "'data' is not declared under the top-level volumes"),
        ({"userns_mode": "keep-id"}, "services.web.userns_mode: 'keep-id' is not supported: every service has a "
                                     "user namespace of its own unless this says host"),
    ]
    for extra, message in cases:
        with pytest.raises(ConfigError) as e:
            load_config(_write(tmp_path, base | extra))
        assert message in str(e.value) and "\n" not in str(e.value), (extra, str(e.value))


def test_environment_from_the_shell_and_dotenv(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_SHELL", "shell")
    monkeypatch.delenv("UNSET_VAR", raising=False)
    (tmp_path / ".env").write_text("FROM_DOTENV=dot\n")
    path = _write(tmp_path, {"image": "x", "ports": ["1:2"], "x-activator": {},
                             "environment": {"FROM_SHELL": None, "FROM_DOTENV": None, "UNSET_VAR": None,
                                             "N": 3}})
    env = dict(load_config(path).service("web").environment)
    assert env == {"FROM_SHELL": "shell", "FROM_DOTENV": "dot", "N": "3"}  # UNSET_VAR left out, as Compose does


def test_volumes_external_tmpfs_and_own(tmp_path: Path) -> None:
    path = _write(tmp_path, {"image": "x", "ports": ["1:2"], "x-activator": {}, "volumes": [
        "ext:/ext", "mine:/mine:ro", {"type": "tmpfs", "target": "/cache", "tmpfs": {"size": 1048576}}]},
        volumes={"ext": {"external": True, "name": "operators-volume"}, "mine": None})
    cfg = load_config(path)
    svc = cfg.service("web")
    assert [(v.source, v.target, v.read_only, v.external) for v in svc.volumes] == [
        ("operators-volume", "/ext", False, True), ("mine", "/mine", True, False)]
    assert [(t.target, "size=1048576" in t.options) for t in svc.tmpfs] == [("/cache", True)]
    assert any("services.web.volumes.mine: ignored: kept by activator in state_dir/volumes/mine" in n
               for n in cfg.notes)
    with pytest.raises(ConfigError, match="a volume with a driver or driver_opts is not supported"):
        load_config(_write(tmp_path, {"image": "x", "ports": ["1:2"], "x-activator": {}, "volumes": ["nfs:/n"]},
                           volumes={"nfs": {"driver": "local", "driver_opts": {"type": "nfs"}}}))


def test_x_activator_adds_to_what_is_derived(tmp_path: Path) -> None:
    path = _write(tmp_path, {"image": "x", "ports": ["1:2"], "mem_limit": "64m",
                             "healthcheck": {"test": "true"},
                             "x-activator": {"readiness": {"timeout": "5m"}, "resources": {"pids": 20}}})
    svc = load_config(path).service("web")
    assert svc.readiness.command == ("true",) and svc.readiness.timeout == 300
    assert (svc.resources.memory, svc.resources.pids) == (64 << 20, 20)


# --- the real thing: every applied key, seen from inside a restored instance -------------------------------------





