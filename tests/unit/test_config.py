"""Config parsing and validation: pure logic, no engine."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from activator.config.model import ListenAddress, load_config, parse_config
from activator.config.units import parse_duration, parse_size
from activator.errors import ConfigError

P = Path("/etc/activator/services.yaml")

MINIMAL = """
services:
  web:
    image: demo:latest
    listen: 127.0.0.1:8080
    port: 80
"""


def test_minimal_service_gets_defaults() -> None:
    cfg = parse_config(MINIMAL, P)
    (web,) = cfg.services
    assert web.name == "web" and web.port == 80
    assert web.listen == (ListenAddress("127.0.0.1", 8080),)
    assert web.idle_timeout == 300 and web.restore_timeout == 10
    assert web.readiness.http_path is None
    assert cfg.settings.metrics == ListenAddress("127.0.0.1", 9464)


def test_full_service() -> None:
    cfg = parse_config(
        """
settings: {state_dir: /srv/act, metrics: null, drain_timeout: 500ms}
services:
  api:
    image: api:1
    listen: ["127.0.0.1:1", "[::1]:2", ":3"]
    port: 8080
    command: [serve, --fast]
    entrypoint: /bin/sh
    environment: [A=1, B=x=y]
    working_dir: /app
    user: "1000:1000"
    readiness: {http_path: /health, timeout: 2m}
    idle_timeout: 90s
    restore_timeout: 1.5
    resources: {memory: 256m, cpus: 0.5, pids: 64}
""",
        P,
    )
    (api,) = cfg.services
    assert [str(a) for a in api.listen] == ["127.0.0.1:1", "[::1]:2", "0.0.0.0:3"]
    assert api.command == ("serve", "--fast") and api.entrypoint == ("/bin/sh",)
    assert api.environment == (("A", "1"), ("B", "x=y"))
    assert api.readiness.timeout == 120 and api.readiness.http_path == "/health"
    assert api.resources.memory == 256 * 2**20 and api.resources.cpus == 0.5 and api.resources.pids == 64
    assert cfg.settings.metrics is None and cfg.settings.drain_timeout == 0.5


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("services: {web: {image: x, listen: 1, port: 80, colour: red}}", "services.web.colour: unknown key"),
        ("services: {web: {image: x, listen: 1}}", "services.web.port: is required"),
        ("services: {web: {image: x, listen: '127.0.0.1:99999', port: 80}}", "out of range"),
        ("services: {web: {image: x, listen: 1, port: 80, idle_timeout: soon}}", "'soon' is not a duration"),
        ("services: {web: {image: x, listen: 1, port: 80, resources: {memory: lots}}}", "not a size"),
        ("services: {web: {image: x, listen: 1, port: 80, resources: {gpu: 1}}}", "resources.gpu: unknown key"),
        ("services: {web: {image: x, listen: 1, port: 80, readiness: {http_path: health}}}",
         "an absolute URL path like /health"),
        ("services: {Web!: {image: x, listen: 1, port: 80}}", "service names"),
        ("services: {a: {image: x, listen: 1, port: 80}, b: {image: y, listen: 1, port: 81}}",
         "already used by service 'a'"),
        ("settings: {verbose: true}\nservices: {a: {image: x, listen: 1, port: 80}}", "settings.verbose: unknown key"),
        ("servics: {}", "servics: unknown key"),
        ("services: []", "expected a mapping"),
        ("services: {web: {image: x, listen: 1, port: 80, environment: [NOEQUALS]}}", "not KEY=VALUE"),
    ],
)
def test_invalid_configs_name_file_and_key(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, P)
    msg = str(e.value)
    assert msg.startswith(str(P)), msg
    assert fragment in msg, msg
    assert "\n" not in msg


def test_malformed_yaml_points_at_the_line() -> None:
    with pytest.raises(ConfigError, match=r"malformed YAML: .* at line \d+, column \d+"):
        parse_config("services:\n  web:\n    image: [unclosed\n", P)


def test_units() -> None:
    assert parse_duration("250ms") == 0.25 and parse_duration("2m") == 120 and parse_duration(3) == 3
    assert parse_size("1g") == 2**30 and parse_size("64k") == 65536 and parse_size(100) == 100
    with pytest.raises(ValueError):
        parse_duration(True)


def test_fingerprint_ignores_listen_and_timeouts_but_not_the_process() -> None:
    base = parse_config(MINIMAL, P).services[0]
    moved = parse_config(MINIMAL.replace("127.0.0.1:8080", "127.0.0.1:9999") + "    idle_timeout: 1s\n", P)
    assert moved.services[0].checkpoint_fingerprint() == base.checkpoint_fingerprint()
    changed = parse_config(MINIMAL + "    command: [other]\n", P)
    assert changed.services[0].checkpoint_fingerprint() != base.checkpoint_fingerprint()


#: levels of nesting that overflow Python's stack while the document is composed (see its case below)
DEEP = sys.getrecursionlimit() * 3 // 4

HOSTILE = [
    # (YAML, fragment of the one-line error)
    ("settings: {drain_timeout: .nan}\nservices: {web: {image: x, listen: 1, port: 80}}",
     "settings.drain_timeout: nan is not a finite"),
    ("services: {web: {image: x, listen: 1, port: 80, idle_timeout: .nan}}", "services.web.idle_timeout: nan is not"),
    ("services: {web: {image: x, listen: 1, port: 80, idle_timeout: .inf}}", "idle_timeout: inf is not a finite"),
    ("services: {web: {image: x, listen: 1, port: 80, restore_timeout: 100000000000000000000h}}",
     "restore_timeout: 4.16667e+18d is out of range: use 10ms to 1h"),
    ("services: {web: {image: x, listen: 1, port: 80, idle_timeout: -5}}", "idle_timeout: -5 is not a finite"),
    ("services: {web: {image: x, listen: '127.0.0.1:0', port: 80}}", "services.web.listen: port 0 is out of range"),
    ("services: {web: {image: x, listen: 18:00, port: 80}}", "services.web.listen: '18' in '18:00' is not an IP"),
    ("services:\n  web: {image: x, listen: 1, port: 80}\n  web: {image: y, listen: 2, port: 80}\n",
     "duplicate key 'web' (first at line 2) at line 3"),
    ("services: {web: {image: 5, listen: 1, port: 80}}", "services.web.image: expected a string, got int 5"),
    ("services: {web: {image: x, listen: 1, port: 80, min_instances: 5}}",
     "min_instances (5) must not exceed max_instances (1)"),
    ("services: {web: {image: x, listen: 1, port: 80, standby: 2}}",
     "standby (2) must not exceed max_instances (1): a standby is thawed into one of them"),
    ("services: {web: {image: x, listen: 1, port: 80, standby: 1, stateful: true}}",
     "stateful: true makes the checkpoint again after each instance, so no instance can be restored ahead"),
    ("services: {web: {image: x, listen: 1, port: 80, standby: 17, max_instances: 20}}",
     "standby: 17 is out of range: use 0 to 16"),
    ("services: {web: {image: x, listen: [1, 2], port: 80, handoff: true}}",
     "handoff: true hands one listening socket to the app; give the service one listen address (it has 2)"),
    ("services: {web: {image: x, listen: 1, port: 80, handoff: true, proxy_protocol: v2}}",
     "the activator cannot apply proxy_protocol; remove it or set handoff: false"),
    ("services: {web: {image: x, listen: 1, port: 80, handoff: true, max_connections: 10}}",
     "cannot apply max_connections"),
    ("services: {web: {image: x, listen: 1, port: 80, handoff: true, client_idle_timeout: 5s}}",
     "cannot apply client_idle_timeout"),
    ("services: {web: {image: x, listen: 1, port: 80, handoff: true, standby: 1}}",
     "a standby's app would accept from the service's socket between its restore and its freeze"),
    ("services: {web: {image: x, listen: 1, port: 80, handoff: yes please}}", "handoff:"),
    ("services: {web: {image: x, listen: 1, port: 80, max_instances: 100000000}}", "max_instances: 100000000 is out"),
    ("services: {web: {image: x, listen: 1, port: 80, restore_timeout: 1ns}}", "restore_timeout: '1ns' is not a"),
    ("services: {web: {image: x, listen: 1, port: 80, restore_timeout: 1ms}}", "out of range: use 10ms to 1h"),
    ("services: {web: {image: x, listen: 1, port: 80, resources: {pids: 1}}}",
     "resources.pids: 1 is out of range: use 8 to"),
    ("services: {web: {image: x, listen: 1, port: 80, resources: {cpus: .nan}}}", "resources.cpus: nan is out"),
    ("services: {web: {image: x, listen: 1, port: 80, command: [[nested]]}}", "command: expected a string or a list"),
    ("services: {web: {image: x, listen: 1, port: 80, environment: {A: [1]}}}", "'A': expected a plain value"),
    ("services: {web: {image: !!binary aGk=, listen: 1, port: 80}}", "image: expected a string, got bytes"),
    ("services: {web: {image: x, listen: 1, port: true}}", "port: expected a whole number, got bool True"),
    ("services: {web: {image: x, listen: [], port: 80}}", "listen: needs at least one address"),
    ("services: {web: {image: x, listen: '[1.2.3.4]:80', port: 80}}", "brackets are for IPv6"),
    ("services: {web: {image: x, listen: 1, port: 80, seccomp: permissive}}", "seccomp: 'permissive' is not valid"),
    ("services: {web: {image: x, listen: 1, port: 80, wake_on: syn}}", "wake_on: 'syn' is not one of: data, connect"),
    ("services: {1: {image: x, listen: 1, port: 80}}", "services.1: service names are"),
    ("- a\n- b\n", "top level: expected a mapping"),
    ("services: {web: {image: x, listen: 1, port: 80}}\nsettings: {state_dir: relative/path}",
     "settings.state_dir: expected an absolute path"),
    ("""a: &a ["x","x","x","x","x","x","x","x","x","x"]
b: &b [*a,*a,*a,*a,*a,*a,*a,*a,*a,*a]
c: &c [*b,*b,*b,*b,*b,*b,*b,*b,*b,*b]
d: &d [*c,*c,*c,*c,*c,*c,*c,*c,*c,*c]
e: &e [*d,*d,*d,*d,*d,*d,*d,*d,*d,*d]
f: &f [*e,*e,*e,*e,*e,*e,*e,*e,*e,*e]
g: &g [*f,*f,*f,*f,*f,*f,*f,*f,*f,*f]
h: &h [*g,*g,*g,*g,*g,*g,*g,*g,*g,*g]
i: &i [*h,*h,*h,*h,*h,*h,*h,*h,*h,*h]
services: {web: {image: x, listen: 1, port: 80, command: *i}}
""", "alias bomb"),
    # PyYAML's composer takes two frames a level, so DEEP levels need 1.5 times the frames Python allows; deeper
    # proves nothing more and costs time (its scanner is quadratic in depth up to its 1024-character look-ahead)
    ("[" * DEEP + "]" * DEEP, "nested too deeply"),
    # issue 17 item 6: a close key is suggested; a host name is not taken for a time
    ("services: {web: {image: x, listen: 1, port: 80, idle_timout: 5m}}",
     "services.web.idle_timout: unknown key; did you mean 'idle_timeout'?"),
    ("services: {web: {image: x, listen: localhost:17620, port: 80}}",
     "'localhost' in 'localhost:17620' is not an IP address (names are not resolved: give the address) "
     "(e.g. 127.0.0.1:8080)"),
    ("services: {web: {image: x, listen: '18:00', port: 80}}", 'quote times like "18:00"'),
    # values the kernel would refuse at every restore (issue 16 item 8)
    ("services: {web: {image: x, listen: 1, port: 80, resources: {cpus: 0.000001}}}",
     "services.web.resources: cpus: 1e-06 is below the kernel's smallest CPU quota; use at least 0.01"),
    # values that contain themselves (issue 16 item 3): refused at once instead of spinning to a MemoryError
    ("x: &x [*x]\nservices: {web: {image: x, listen: 1, port: 80}}", "an alias refers to a value that contains it"),
    ("services: &s {web: {image: x, listen: 1, port: 80, environment: {A: *s}}}", "contains it"),
    ("services: {web: &w {image: x, listen: 1, port: 80, command: [a, [b, *w]]}}", "contains it"),
]


@pytest.mark.parametrize(("text", "fragment"), HOSTILE)
def test_hostile_configs_are_refused_in_one_line(text: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, P)
    msg = str(e.value)
    assert msg.startswith(str(P)) and "\n" not in msg, msg
    assert fragment in msg, msg


def test_yaml_merge_keys_are_not_duplicates() -> None:
    cfg = parse_config("services:\n  a: &base {image: x, port: 80, listen: 1}\n  b: {<<: *base, listen: 2, image: y}\n",
                       P)
    _, b = cfg.services
    assert (b.image, b.port, b.listen[0].port) == ("y", 80, 2)


def test_non_utf8_and_huge_files(tmp_path: Path) -> None:
    from activator.config.model import load_config

    bad = tmp_path / "latin1.yaml"
    bad.write_bytes(b"services: {w\xe9b: {image: x, listen: 1, port: 80}}\n")
    with pytest.raises(ConfigError, match=r"latin1.yaml: not UTF-8 text \(byte 12\); save the file as UTF-8"):
        load_config(bad)
    huge = tmp_path / "huge.yaml"
    huge.write_bytes(b"#" * (5 * 2**20))
    with pytest.raises(ConfigError, match="larger than 4 MiB"):
        load_config(huge)
    with pytest.raises(ConfigError, match="is a directory"):
        load_config(tmp_path)


def test_depends_on_is_checked(tmp_path: Path) -> None:
    from tests.conftest import ECHO, write_config

    cases = [
        ({"a": ECHO | {"listen": 1001, "depends_on": ["b"]}}, "services.a.depends_on: no service named 'b'"),
        ({"a": ECHO | {"listen": 1001, "depends_on": ["b"]}, "b": ECHO | {"listen": "127.0.0.1:1002"}},
         "'b' listens on 127.0.0.1:1002, which instances cannot reach; add 10.89.0.1:PORT"),
        ({"a": ECHO | {"listen": 1001, "depends_on": ["b"]}, "b": ECHO | {"listen": 1002, "depends_on": ["a"]}},
         "a cycle (a -> b -> a)"),
        ({"a": ECHO | {"listen": 1001, "depends_on": ["b"], "network": "none"}, "b": ECHO | {"listen": 1002}},
         "services.a.depends_on: this service cannot open connections (network: none"),
        ({"a": ECHO | {"listen": 1001, "depends_on": ["a"]}}, "'a' is this service itself"),
    ]
    for services, message in cases:
        with pytest.raises(ConfigError) as e:
            load_config(write_config(tmp_path, services))
        assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


def test_network_capabilities_need_userns_host(tmp_path: Path) -> None:
    from tests.conftest import ECHO, write_config

    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, {"a": ECHO | {"listen": 1001, "cap_add": ["NET_RAW", "SYS_PTRACE"]}}))
    assert "services.a: cap_add: NET_RAW gives nothing in the instance's user namespace" in str(e.value)
    assert "set 'userns: host'" in str(e.value) and "\n" not in str(e.value)
    cfg = load_config(write_config(tmp_path, {"a": ECHO | {"listen": 1001, "cap_add": ["NET_RAW"], "userns": "host"}}))
    assert cfg.service("a").cap_add == ("NET_RAW",) and cfg.service("a").userns == "host"
    assert load_config(write_config(tmp_path, {"a": ECHO | {"listen": 1001}})).service("a").userns == "private"


def test_stateful_true_means_one_instance(tmp_path: Path) -> None:
    from tests.conftest import ECHO, write_config

    with pytest.raises(ConfigError) as e:
        load_config(write_config(tmp_path, {"a": ECHO | {"listen": 1001, "stateful": True, "max_instances": 3}}))
    assert "stateful: true runs one instance at a time; max_instances (3) must be 1" in str(e.value)
    assert load_config(write_config(tmp_path, {"a": ECHO | {"listen": 1001}})).service("a").stateful == "auto"


def test_the_installed_examples_are_valid(tmp_path: Path) -> None:
    """config/examples.yaml (installed next to the starter file) is all comments: uncommented as it says (the "# "
    taken off `settings:`, `services:` and the lines of the services, nothing else changed), it must parse (issue
    31: a live `services: {}` above the examples made that malformed YAML)."""
    examples = Path(__file__).parents[2] / "config" / "examples.yaml"
    lines = [line[2:] if line.startswith(("#   ", "# settings:", "# services:")) else line
             for line in examples.read_text().splitlines()]
    assert all(not ln.strip() or ln.startswith(("#", " ", "settings:", "services:")) for ln in lines)
    (tmp_path / "examples.yaml").write_text("\n".join(lines))
    cfg = load_config(tmp_path / "examples.yaml")
    assert {"hello", "shop", "cache", "pinger", "app", "db"} <= {s.name for s in cfg.services}
    assert cfg.service("app").depends_on == ("db",)


@pytest.mark.parametrize(("settings", "fragment"), [
    ("checkpoint_registry: {repository: 'https://reg.example/x'}", "settings.checkpoint_registry.repository: "),
    ("checkpoint_registry: {repository: reg.example}", "REGISTRY[:PORT]/PATH"),
    ("checkpoint_registry: {repository: reg.example/x, tls_verfy: false}", "did you mean 'tls_verify'"),
    ("checkpoint_registry: {repository: reg.example/x, auth_file: creds.json}", "auth_file"),
    ("checkpoint_registry: {}", "repository: is required"),
    ("agent: {listen: example.com:9300}", "settings.agent.listen"),
    ("agent: {listen: 127.0.0.1:9300, drain_notice: 2 hours}", "settings.agent.drain_notice"),
    ("agent: {}", "settings.agent.listen: is required"),
    # issue 30: pulled checkpoints are verified and pushed ones signed, so a registry needs keys (or says why not)
    ("checkpoint_registry: {repository: reg.example/x, push: false}", "checkpoint_trust.keys names no key"),
    ("checkpoint_registry: {repository: reg.example/x, pull: false}", "checkpoint_trust.sign_key is not set"),
    ("checkpoint_trust: {keys: [builder.pub]}", "settings.checkpoint_trust.keys: expected an absolute path"),
    ("checkpoint_trust: {key: /x.pub}", "did you mean 'keys'"),
    ("checkpoint_trust: {insecure_unsigned: maybe}", "settings.checkpoint_trust.insecure_unsigned"),
])
def test_registry_and_agent_settings_are_checked(settings: str, fragment: str) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(f"settings:\n  {settings}\n" + MINIMAL, P)
    assert fragment in str(e.value) and "\n" not in str(e.value) and str(P) in str(e.value)


def test_registry_and_agent_settings_parse() -> None:
    cfg = parse_config("settings:\n  checkpoint_registry: {repository: 10.0.0.1:5000/fleet/ckpt, tls_verify: false}\n"
                       "  checkpoint_trust: {keys: /etc/activator/builder.pub, sign_key: /etc/activator/builder}\n"
                       "  agent: {listen: 10.0.0.2:9300}\n" + MINIMAL, P)
    trust = cfg.settings.checkpoint_trust
    assert trust.keys == (Path("/etc/activator/builder.pub"),) and trust.sign_key == Path("/etc/activator/builder")
    assert not trust.insecure_unsigned
    reg, agent = cfg.settings.checkpoint_registry, cfg.settings.agent
    assert reg is not None and reg.repository == "10.0.0.1:5000/fleet/ckpt" and not reg.tls_verify and reg.push
    assert agent is not None and agent.listen == ListenAddress("10.0.0.2", 9300) and agent.drain_notice == 2.0
    assert parse_config(MINIMAL, P).settings.agent is None


def test_udp_services() -> None:
    """protocol (issue 22 item 1): tcp, udp or both; UDP keys bounded; what UDP cannot do refused in one line."""
    from activator.config.model import parse_config as parse

    def svc(extra: str):  # type: ignore[no-untyped-def]
        return parse(f"services:\n  dns: {{image: x, listen: 5353, port: 53{extra}}}\n", Path("/x.yaml")).services[0]

    assert svc("").protocol == ("tcp",)
    assert svc(", protocol: udp").protocol == ("udp",)
    assert svc(", protocol: [udp, tcp]").protocol == ("tcp", "udp")
    s = svc(", protocol: udp, udp_flow_timeout: 10s, udp_queue: 5")
    assert s.udp_flow_timeout == 10.0 and s.udp_queue == 5
    assert svc("").checkpoint_fingerprint() == svc(", protocol: tcp").checkpoint_fingerprint() \
        != svc(", protocol: [tcp, udp]").checkpoint_fingerprint()
    for extra, says in [(", protocol: sctp", "expected tcp, udp or [tcp, udp]"),
                        (", protocol: []", "expected tcp, udp or [tcp, udp]"),
                        (", protocol: udp, handoff: true", "handoff: true hands over a TCP listening socket"),
                        (", protocol: udp, proxy_protocol: v2", "the PROXY header is written into TCP streams"),
                        (", udp_queue: 0", "udp_queue: 0 is out of range")]:
        with pytest.raises(ConfigError, match=r"^/x\.yaml: services\.dns") as e:
            svc(extra)
        assert says in str(e.value), str(e.value)
