"""Configuration: YAML in, frozen and validated objects out.

A file looks like this (compose-like, so Docker users read it at a glance)::

    settings:                         # optional: every key has a default
      state_dir: /var/lib/activator   # the default
      metrics: 127.0.0.1:9464         # the default; null to disable
      drain_timeout: 10s              # the default
    services:
      tomcat:
        image: activator-demo/tomcat:latest   # required
        listen: 127.0.0.1:8080        # required; or a list of addresses
        port: 8080                    # required: where the app listens inside its container
        environment: {JAVA_OPTS: -Xmx256m}        # an example (default: the image's environment only)
        readiness: {http_path: /, timeout: 60s}   # an example (default: listening is enough, within 60s)
        idle_timeout: 5m              # the default
        max_instances: 4              # an example: the default is 1, so no scale-out unless set

Every key, its default, its bounds and what it means are declared once, on the dataclass fields (`key(...)`,
declare.py) of service.py, sections.py and settings.py; the parser, the unknown-key check, the error messages, the
JSON Schema (config/activator.schema.json, `activator schema`) and the reference (docs/configuration.md,
`activator schema --markdown`, core/reference.py) are all derived from those declarations.

Invalid, each refused with one line naming the file, the service and the key, and what would be valid (every
problem of a file is said, each on its line: ConfigErrors)::

    services: {web: {image: x, listen: 8080, port: 80, colour: red}}      # unknown key 'colour'
    services: {web: {image: x, listen: "127.0.0.1:99999", port: 80}}     # port out of range
    services: {web: {image: x, listen: 18:00, port: 80}}                 # '18' is not an IP address
    services: {web: {image: x, listen: 8080, port: 80, idle_timeout: .nan}}   # not a finite duration

Durations are seconds (a number) or strings with a unit: 250ms, 5s, 2m, 1h, 1d, or several (1m30s). Sizes are
bytes or strings with k/m/g (binary). Nothing here touches the network, Docker or the filesystem beyond reading the
file.

The configuration's rooms: kinds.py (the plain value kinds), addresses.py, mounts.py, probes.py and process.py
(the kinds of one concern each, with their value types), declare.py (key(), Section, a section's JSON Schema),
sections.py (a service's sections), settings.py, service.py (ServiceConfig, its cross-key checks and checkpoint
fingerprint), document.py (Config, what relates services, the file's JSON Schema), parse.py (the walk that
collects every problem, load_config). This module re-exports the names tests, benches and tools import; code in
activator imports the room it needs.
"""

from __future__ import annotations

from .addresses import ListenAddress
from .document import Config, dependency_address, json_schema
from .kinds import Duration, Kind, Size
from .mounts import TmpfsMount, Volume, Volumes
from .parse import load_config, parse_config, unknown_key
from .probes import Probe, probe_paths
from .process import CAPABILITIES, ULIMITS
from .sections import Backoff, PreStop, Readiness, Resources, Warmup
from .service import NAME_PATTERN, SECCOMP_DEFAULT, SECCOMP_UNCONFINED, ServiceConfig, signal_number
from .settings import DEFAULT_ENGINE_SOCKETS, ImageSettings, NetworkSettings, RegistrySettings, Settings

__all__ = [
    "CAPABILITIES", "DEFAULT_ENGINE_SOCKETS", "NAME_PATTERN", "SECCOMP_DEFAULT", "SECCOMP_UNCONFINED", "ULIMITS",
    "Backoff", "Config", "Duration", "ImageSettings", "Kind", "ListenAddress", "NetworkSettings", "PreStop", "Probe",
    "Readiness", "RegistrySettings", "Resources", "ServiceConfig", "Settings", "Size", "TmpfsMount", "Volume",
    "Volumes", "Warmup", "dependency_address", "json_schema", "load_config", "parse_config", "probe_paths",
    "signal_number", "unknown_key",
]
