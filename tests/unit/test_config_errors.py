"""Every problem of a services file, each said in one exact line (issue 31 item 5): what the parser refuses, all
of a file's problems in one run (per key, per service, per section, and what relates services), wildcard and specific
listen addresses that cannot both be bound, the daemon's own addresses (metrics, agent) on a service's; with the
files that must still pass beside them. Host checks (a port in use, an image, state_dir) are in
tests/engine/test_cli.py."""

from __future__ import annotations

from pathlib import Path

import pytest

from activator.config.model import parse_config
from activator.errors import ConfigError

P = Path("/etc/activator/services.yaml")
S = "services: {web: {image: x, listen: 127.0.0.1:8080, port: 80"  # a valid service, extended as S + ", key: v}}"

#: (name, file, the exact lines after "FILE: "), each problem of the file on its own line, in the file's order
BROKEN: list[tuple[str, str, list[str]]] = [
    ('tab',
     'services:\n\tweb: {}\n',
     ['malformed YAML: a tab character; YAML is indented with spaces, not tabs (replace the tab with spaces) at '
      'line 2, column 1']),
    ('duration-half-compound',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, idle_timeout: 1m30}}',
     ["services.web.idle_timeout: '1m30' is not a duration (e.g. 500ms, 5s, 2m, 1h, 1m30s)"]),
    ('unknown-service-key',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, colour: red}}',
     ['services.web.colour: unknown key; the valid keys are in docs/configuration.md (or `activator schema`)']),
    ('unknown-service-key-close',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, idle_timout: 5m}}',
     ["services.web.idle_timout: unknown key; did you mean 'idle_timeout'? the valid keys are in "
      'docs/configuration.md (or `activator schema`)']),
    ('unknown-settings-key',
     'settings: {verbose: true}\nservices: {web: {image: x, listen: 127.0.0.1:8080, port: 80}}',
     ['settings.verbose: unknown key; valid keys are: state_dir, metrics, drain_timeout, runc, criu, images, '
      'network, checkpoint_registry, agent, checkpoint_trust']),
    ('unknown-top-level-key',
     'servces: {}\nservices: {web: {image: x, listen: 127.0.0.1:8080, port: 80}}',
     ["servces: unknown key; did you mean 'services'? valid keys are: settings, services"]),
    ('wildcard-after-specific',
     'services:\n  a: {image: x, listen: 127.0.0.1:18081, port: 80}\n  b: {image: x, listen: 0.0.0.0:18081, '
     'port: 80}',
     ["services.b.listen: 0.0.0.0:18081 collides with 127.0.0.1:18081 of service 'a': 0.0.0.0:18081 takes port "
      '18081 on every IPv4 address of the host, so the second socket cannot be bound; use one address for both, '
      'specific addresses for each, or another port']),
    ('specific-after-wildcard',
     'services:\n  a: {image: x, listen: 0.0.0.0:18081, port: 80}\n  b: {image: x, listen: 127.0.0.1:18081, '
     'port: 80}',
     ["services.b.listen: 127.0.0.1:18081 collides with 0.0.0.0:18081 of service 'a': 0.0.0.0:18081 takes port "
      '18081 on every IPv4 address of the host, so the second socket cannot be bound; use one address for both, '
      'specific addresses for each, or another port']),
    ('v6-wildcard-holds-v4',
     "services:\n  a: {image: x, listen: '[::]:18081', port: 80}\n  b: {image: x, listen: 10.0.0.1:18081, port: "
     '80}',
     ["services.b.listen: 10.0.0.1:18081 collides with [::]:18081 of service 'a': [::]:18081 takes port 18081 on "
      'every IPv6 and IPv4 address of the host, so the second socket cannot be bound; use one address for both, '
      'specific addresses for each, or another port']),
    ('v6-wildcard-holds-v6',
     "services:\n  a: {image: x, listen: '[::1]:18081', port: 80}\n  b: {image: x, listen: '[::]:18081', port: "
     '80}',
     ["services.b.listen: [::]:18081 collides with [::1]:18081 of service 'a': [::]:18081 takes port 18081 on "
      'every IPv6 and IPv4 address of the host, so the second socket cannot be bound; use one address for both, '
      'specific addresses for each, or another port']),
    ('same-address-two-services',
     'services:\n  a: {image: x, listen: 127.0.0.1:18081, port: 80}\n  b: {image: x, listen: 127.0.0.1:18081, '
     'port: 80, protocol: udp}',
     ["services.b.listen: 127.0.0.1:18081 is already used by service 'a'"]),
    ('same-address-one-service',
     'services: {web: {image: x, listen: [127.0.0.1:8080, 127.0.0.1:8080], port: 80}}',
     ['services.web.listen: 127.0.0.1:8080 is already used by this service']),
    ('wildcard-within-one-service',
     'services: {web: {image: x, listen: [127.0.0.1:8080, 0.0.0.0:8080], port: 80}}',
     ['services.web.listen: 0.0.0.0:8080 collides with 127.0.0.1:8080 of this service: 0.0.0.0:8080 takes port '
      '8080 on every IPv4 address of the host, so the second socket cannot be bound; use one address for both, '
      'specific addresses for each, or another port']),
    ('metrics-is-a-listen-address',
     'settings: {metrics: 127.0.0.1:8080}\nservices: {web: {image: x, listen: 127.0.0.1:8080, port: 80}}',
     ["settings.metrics: 127.0.0.1:8080 is already used by service 'web'"]),
    ('metrics-wildcard-over-a-listen-address',
     'settings: {metrics: 0.0.0.0:8080}\nservices: {web: {image: x, listen: 127.0.0.1:8080, port: 80}}',
     ["settings.metrics: 0.0.0.0:8080 collides with 127.0.0.1:8080 of service 'web': 0.0.0.0:8080 takes port "
      '8080 on every IPv4 address of the host, so the second socket cannot be bound; use one address for both, '
      'specific addresses for each, or another port']),
    ('agent-is-a-listen-address',
     'settings: {agent: {listen: 127.0.0.1:8080}}\nservices: {web: {image: x, listen: 127.0.0.1:8080, port: 80}}',
     ["settings.agent.listen: 127.0.0.1:8080 is already used by service 'web'"]),
    ('agent-is-metrics',
     'settings: {agent: {listen: 127.0.0.1:9464}}\nservices: {web: {image: x, listen: 127.0.0.1:8080, port: 80}}',
     ['settings.agent.listen: 127.0.0.1:9464 is already used by settings.metrics']),
    ('port-zero',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 0}}',
     ['services.web.port: 0 is out of range: use 1 to 65535']),
    ('listen-port-out-of-range',
     "services: {web: {image: x, listen: '127.0.0.1:99999', port: 80}}",
     ['services.web.listen: port 99999 is out of range 1-65535 (port 0 would pick a random port no client could '
      'know)']),
    ('listen-host-name',
     'services: {web: {image: x, listen: localhost:8080, port: 80}}',
     ["services.web.listen: 'localhost' in 'localhost:8080' is not an IP address (names are not resolved: give "
      'the address) (e.g. 127.0.0.1:8080)']),
    ('listen-time',
     'services: {web: {image: x, listen: 18:00, port: 80}}',
     ["services.web.listen: '18' in '18:00' is not an IP address (e.g. 127.0.0.1:8080; quote times like "
      '"18:00": unquoted, YAML 1.1 tools read them as numbers)']),
    ('duration-nan',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, idle_timeout: .nan}}',
     ['services.web.idle_timeout: nan is not a finite, non-negative duration']),
    ('duration-out-of-range',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, idle_timeout: 40d}}',
     ['services.web.idle_timeout: 40d is out of range: use 10ms to 30d']),
    ('three-required-keys',
     'services: {web: {}}',
     ['services.web.image: is required',
      'services.web.listen: is required',
      'services.web.port: is required']),
    ('two-services-one-problem-each',
     'services:\n  a: {image: x, listen: 127.0.0.1:1, port: 80, wake_on: syn}\n  b: {image: x, listen: '
     '127.0.0.1:2, port: 80, max_instances: 0}',
     ["services.a.wake_on: 'syn' is not one of: data, connect",
      'services.b.max_instances: 0 is out of range: use 1 to 256']),
    ('settings-and-service',
     'settings: {drain_timeout: forever}\nservices: {web: {image: x, listen: 127.0.0.1:8080, port: 80, '
     'max_waiting: -1}}',
     ["settings.drain_timeout: 'forever' is not a duration (e.g. 500ms, 5s, 2m, 1h, 1m30s)",
      'services.web.max_waiting: -1 is out of range: use 0 to 1000000']),
    ('services-not-a-mapping',
     'services: [web]',
     ['services: expected a mapping of service names to definitions']),
    ('services-missing',
     'settings: {}',
     ['services: is required (a mapping of service names to definitions)']),
    ('service-name',
     'services: {Web!: {image: x, listen: 127.0.0.1:1, port: 80}}',
     ["services.Web!: service names are 1-40 of a-z, 0-9, '_' and '-', starting with a letter or digit"]),
    ('depends-on-unknown',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, depends_on: [db]}}',
     ["services.web.depends_on: no service named 'db' in this file (known: web)"]),
    ('depends-on-cycle',
     'services:\n  a: {image: x, listen: 0.0.0.0:1, port: 80, depends_on: [b]}\n  b: {image: x, listen: '
     '0.0.0.0:2, port: 80, depends_on: [a]}',
     ['services.a.depends_on: a cycle (a -> b -> a); a dependency cannot depend on its dependant']),
    ('depends-on-from-network-none',
     'services:\n  a: {image: x, listen: 127.0.0.1:1, port: 80, network: none, depends_on: [b]}\n  b: {image: x, '
     'listen: 0.0.0.0:2, port: 80}',
     ['services.a.depends_on: this service cannot open connections (network: none, egress: true); give it '
      'network: bridge and egress: true']),
    ('depends-on-unreachable',
     'services:\n  a: {image: x, listen: 127.0.0.1:1, port: 80, depends_on: [b]}\n  b: {image: x, listen: '
     '127.0.0.1:2, port: 80}',
     ["services.a.depends_on: 'b' listens on 127.0.0.1:2, which instances cannot reach; add 10.89.0.1:PORT (the "
      "bridge's address) or 0.0.0.0:PORT to its listen"]),
    ('min-above-max',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, min_instances: 2}}',
     ['services.web: min_instances (2) must not exceed max_instances (1)']),
    ('handoff-standby',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, handoff: true, standby: 1}}',
     ["services.web: handoff: true: a standby's app would accept from the service's socket between its restore "
      'and its freeze; set standby: 0 or handoff: false']),
    ('handoff-two-addresses',
     'services: {web: {image: x, listen: [127.0.0.1:8080, 127.0.0.1:8081], port: 80, handoff: true}}',
     ['services.web: handoff: true hands one listening socket to the app; give the service one listen address '
      '(it has 2)']),
    ('waiting-page-without-http',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, waiting_page: 2s}}',
     ['services.web: waiting_page answers HTTP requests; set http: true (the service speaks HTTP/1.x) or remove '
      'waiting_page']),
    ('stateful-scaled',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, stateful: true, max_instances: 2}}',
     ['services.web: stateful: true runs one instance at a time; max_instances (2) must be 1']),
    ('net-raw-in-userns',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, cap_add: [NET_RAW]}}',
     ["services.web: cap_add: NET_RAW gives nothing in the instance's user namespace (its network namespace is "
      "made outside it, so no capability over the network is held); set 'userns: host' for an app that needs it"]),
    ('udp-proxy-protocol',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, protocol: udp, proxy_protocol: v2}}',
     ['services.web: proxy_protocol: the PROXY header is written into TCP streams only; remove it or use '
      'protocol: tcp']),
    ('cpus-too-small',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, resources: {cpus: 0.001}}}',
     ["services.web.resources: cpus: 0.001 is below the kernel's smallest CPU quota; use at least 0.01"]),
    ('backoff-inverted',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, backoff: {initial: 1m, max: 1s}}}',
     ['services.web.backoff: backoff.max (1s) must be at least backoff.initial (1m)']),
    ('memory-too-small',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, resources: {memory: 1k}}}',
     ['services.web.resources.memory: 1024 bytes is out of range: use 4m to 1024g']),
    ('environment-name',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, environment: {1A: x}}}',
     ["services.web.environment: '1A' is not a valid environment variable name"]),
    ('volume-on-proc',
     "services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, volumes: ['data:/proc/x']}}",
     ["services.web.volumes: '/proc/x': the target must be an absolute path other than /, /proc, /sys and /dev"]),
    ('tmpfs-option',
     "services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, tmpfs: ['/tmp:bogus']}}",
     ["services.web.tmpfs: '/tmp:bogus': unknown tmpfs option 'bogus' (size=, mode=, uid=, gid=, ro, exec, suid, "
      'dev, ...)']),
    ('ulimit-soft-above-hard',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, ulimits: {nofile: {soft: 10, hard: 5}}}}',
     ['services.web.ulimits: nofile: soft (10) is above hard (5)']),
    ('stop-signal',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, stop_signal: SIGNOPE}}',
     ["services.web: 'SIGNOPE' is not a signal (stop_signal: SIGTERM, SIGINT, SIGQUIT, ... or a number)"]),
    ('probe-without-from',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, probes: [{http: /healthz}]}}',
     ["services.web.probes: [0].from: the prober's addresses are required, e.g. [10.0.0.0/8] (a probe is "
      'recognised by where it comes from)']),
    ('schedule',
     "services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, keep_alive_schedule: ['someday 08:00-18:00']}}",
     ["services.web.keep_alive_schedule: 'someday' is not a day or a range of days (mon, tue, ... sun; mon-fri; "
      '*)']),
    ('registry-pull-unsigned',
     'settings: {checkpoint_registry: {repository: reg.example/x, push: false}}\nservices: {web: {image: x, '
     'listen: 127.0.0.1:8080, port: 80}}',
     ['settings: checkpoint_registry.pull: pulled checkpoints must be signed, and checkpoint_trust.keys names no '
      "key to check them with; add the builder's public key (`activator checkpoint keygen PATH` on the builder), "
      'or set pull: false']),
    ('public-subnet',
     'settings: {network: {subnet: 8.8.8.0/24}}\nservices: {web: {image: x, listen: 127.0.0.1:8080, port: 80}}',
     ["settings.network.subnet: '8.8.8.0/24' is not a private network (use e.g. 10.89.0.0/24 or 192.168.250.0/24)"]),
    ('bridge-name',
     'settings: {network: {bridge: a-very-long-bridge-name}}\nservices: {web: {image: x, listen: 127.0.0.1:8080, '
     'port: 80}}',
     ["settings.network.bridge: 'a-very-long-bridge-name' is not valid (an interface name, at most 15 characters)"]),
    ('duplicate-key',
     'services:\n  web: {image: x, listen: 127.0.0.1:1, port: 80}\n  web: {image: y}\n',
     ["duplicate key 'web' (first at line 2) at line 3, column 3"]),
    ('warmup-path',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, warmup: {http_paths: [health]}}}',
     ["services.web.warmup: warmup.http_paths: 'health' must start with '/'"]),
    ('readiness-path',
     "services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, readiness: {http_path: 'not a path'}}}",
     ["services.web.readiness.http_path: 'not a path' is not valid (an absolute URL path like /health)"]),
    ('nested-sections-each',
     'services: {web: {image: x, listen: 127.0.0.1:8080, port: 80, readiness: {timeout: 0}, pre_stop: {method: '
     'PATCH}, resources: {pids: 1}}}',
     ['services.web.readiness.timeout: 0 is out of range: use 100ms to 1h',
      "services.web.pre_stop.method: 'PATCH' is not one of: GET, POST, PUT, DELETE",
      'services.web.resources.pids: 1 is out of range: use 8 to 4194304']),
]


@pytest.mark.parametrize(("name", "text", "lines"), BROKEN, ids=[b[0] for b in BROKEN])
def test_each_broken_file_is_refused_with_exactly_these_lines(name: str, text: str, lines: list[str]) -> None:
    with pytest.raises(ConfigError) as e:
        parse_config(text, P)
    assert list(e.value.lines) == [f"{P}: {line}" for line in lines]
    assert all("\n" not in line for line in e.value.lines)
    first = str(e.value)  # as a log line or a refused reload says it: the first, and how many more
    assert first.startswith(e.value.lines[0]) and "\n" not in first
    if len(lines) > 1:
        assert first.endswith(f"(and {len(lines) - 1} more problem{'s' if len(lines) > 2 else ''}: "
                              "`activator validate` lists them all)")


def test_the_table_is_at_least_forty_files() -> None:
    assert len(BROKEN) >= 40 and len({b[0] for b in BROKEN}) == len(BROKEN)


@pytest.mark.parametrize("text", [
    S + ", idle_timeout: 1m30s, stop_grace: 1m 5s, restore_timeout: 1m30s500ms}}",  # Compose's durations
    # a TCP service and a UDP one on the same port, one on the wildcard: two sockets of different kinds
    "services:\n  a: {image: x, listen: 0.0.0.0:53, port: 53}\n  b: {image: x, listen: 127.0.0.1:53, port: 53, "
    "protocol: udp}",
    # wildcards on different ports, and the same specific port on two addresses
    "services:\n  a: {image: x, listen: 0.0.0.0:1, port: 80}\n  b: {image: x, listen: [127.0.0.1:2, 127.0.0.2:2], "
    "port: 80}",
    "settings: {metrics: null, agent: {listen: 127.0.0.1:9464}}\n" + S + "}}",  # metrics off: its port is free
    "services: {}",
])
def test_what_must_still_pass(text: str) -> None:
    parse_config(text, P)


def test_durations_as_compose_writes_them() -> None:
    (web,) = parse_config(S + ", idle_timeout: 1m30s, stop_grace: 1m 5s, restore_timeout: 1m30s500ms}}", P).services
    assert (web.idle_timeout, web.stop_grace, web.restore_timeout) == (90, 65, 90.5)


@pytest.mark.parametrize(("listen", "port"), [("8080", 8080), ("':8080'", 8080), ("[127.0.0.1:1, 9000]", 9000)])
def test_a_port_without_a_host_is_said_to_listen_on_every_interface(listen: str, port: int) -> None:
    cfg = parse_config(f"services: {{web: {{image: x, listen: {listen}, port: 80}}}}", P)
    written = listen.strip("'").split(", ")[-1].rstrip("]")
    assert cfg.notes == (f"services.web.listen: warning: '{written}' names no host, so it listens on every interface "
                         f"of this host (0.0.0.0:{port}), as Docker's `-p {port}:...` publishes on all interfaces; "
                         f"write 0.0.0.0:{port} to say so, or 127.0.0.1:{port} for this host only",)
    assert str(cfg.services[0].listen[-1]) == f"0.0.0.0:{port}"


def test_an_address_with_its_host_is_not_warned_about() -> None:
    assert parse_config(S.replace("127.0.0.1:8080", "[0.0.0.0:8080, '[::1]:8081']") + "}}", P).notes == ()
