"""OCI spec generation and Docker's command rules: pure logic, no engine."""

from __future__ import annotations

from activator.config.model import Resources
from activator.runtime.spec import ProcessSpec, merge_env, process_args, runtime_spec


def test_docker_entrypoint_and_cmd_rules() -> None:
    assert process_args(("ep",), ("cmd",), None, None) == ("ep", "cmd")
    assert process_args(("ep",), ("cmd",), None, ("mine",)) == ("ep", "mine")
    # Overriding the entrypoint drops the image's Cmd, as `docker run --entrypoint` does.
    assert process_args(("ep",), ("cmd",), ("new",), None) == ("new",)
    assert process_args((), ("cmd",), ("new",), ("arg",)) == ("new", "arg")


def test_env_merge_overrides_image_values() -> None:
    env = merge_env(("PATH=/bin", "A=1"), (("A", "2"), ("B", "3")), "svc")
    assert env == ("PATH=/bin", "A=2", "HOSTNAME=svc", "B=3")


def test_spec_joins_the_given_netns_and_applies_limits() -> None:
    spec = runtime_spec(
        ProcessSpec(args=("app",), env=("A=1",), cwd="/", uid=1, gid=2),
        rootfs="/r", netns_path="/run/netns/x", cgroups_path="/activator/x", hostname="h",
        resources=Resources(memory=64 * 2**20, cpus=0.5, pids=10), criu_config="/s/criu.conf",
    )
    assert {"type": "network", "path": "/run/netns/x"} in spec["linux"]["namespaces"]
    assert spec["annotations"] == {"org.criu.config": "/s/criu.conf"}
    res = spec["linux"]["resources"]
    assert res["memory"]["limit"] == 64 * 2**20
    assert res["cpu"] == {"quota": 50_000, "period": 100_000}
    assert res["pids"] == {"limit": 10}
    assert spec["process"]["user"]["uid"] == 1 and spec["root"]["path"] == "/r"
    assert spec["process"]["terminal"] is False
