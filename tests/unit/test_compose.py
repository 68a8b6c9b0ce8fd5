"""docker-compose.yml as a services file (pure: translation and interpolation, no engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from activator.config.model import load_config
from activator.errors import ConfigError

COMPOSE = """
x-activator:
  settings: {state_dir: /var/lib/activator-compose, metrics: null}
services:
  db:                      # not marked: left to docker compose
    image: postgres:16
    volumes: [pgdata:/var/lib/postgresql/data]
  web:
    image: "example/web:${TAG:-1.0}"
    command: httpd -f -p 80 -h "/var/www html"
    environment:
      GREETING: "hello ${WHO}"
      PRICE: "$$5"
    env_file: [web.env]
    user: "1000:1000"
    working_dir: /srv
    cap_add: [SYS_PTRACE]
    cap_drop: [CAP_MKNOD]
    volumes: ["webdata:/data", "./static:/srv/static:ro", {type: bind, source: /etc/web, target: /etc/web}]
    ports: ["127.0.0.1:8080:80"]
    restart: always
    depends_on: [db]
    x-activator:
      idle_timeout: 2m
  api:
    image: example/api
    ports:
      - {target: 9000, published: 9001, protocol: tcp}
      - "127.0.0.1:9002:9000"
    x-activator: {port: 9000}
volumes:
  webdata: {}
"""


def load(tmp_path: Path, text: str, env: str | None = None, **files: str) -> object:
    (tmp_path / "docker-compose.yml").write_text(text)
    if env is not None:
        (tmp_path / ".env").write_text(env)
    for name, body in files.items():
        (tmp_path / name.replace("_", ".")).write_text(body)
    return load_config(tmp_path / "docker-compose.yml")


def test_a_compose_file_is_a_services_file(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WHO", "world")
    monkeypatch.delenv("TAG", raising=False)
    cfg = load(tmp_path, COMPOSE, env="WHO=dotenv\nTAG=2.1 # pinned\n",
               web_env="# defaults\nGREETING=from file\nMODE='prod'\nexport LEVEL=3\n")
    assert str(cfg.settings.state_dir) == "/var/lib/activator-compose"  # type: ignore[attr-defined]
    web, api = cfg.service("web"), cfg.service("api")  # type: ignore[attr-defined]
    assert [s.name for s in cfg.services] == ["web", "api"]  # type: ignore[attr-defined]
    assert web.image == "example/web:2.1"  # .env fills what the environment does not have
    assert web.command == ("httpd", "-f", "-p", "80", "-h", "/var/www html")
    assert dict(web.environment) == {"GREETING": "hello world", "PRICE": "$5", "MODE": "prod", "LEVEL": "3"}
    assert (web.user, web.working_dir, web.idle_timeout) == ("1000:1000", "/srv", 120.0)
    assert (web.cap_add, web.cap_drop) == (("SYS_PTRACE",), ("MKNOD",))
    assert [str(a) for a in web.listen] == ["127.0.0.1:8080"] and web.port == 80
    assert [(v.source, v.target, v.read_only) for v in web.volumes] == [
        ("webdata", "/data", False), (str(tmp_path / "static"), "/srv/static", True), ("/etc/web", "/etc/web", False)]
    assert [str(a) for a in api.listen] == ["0.0.0.0:9001", "127.0.0.1:9002"] and api.port == 9000


@pytest.mark.parametrize(("text", "message"), [
    ("services:\n  w:\n    image: x\n    ports: ['1:2']\n    volumes: [/data]\n    x-activator: {}\n",
     "services.w.volumes: '/data' has no source: an anonymous volume would be lost"),
    ("services:\n  w:\n    image: x\n    ports: ['1:2']\n    privileged: true\n    x-activator: {}\n",
     "services.w.privileged: not supported (activator runs instances with Docker's default sandbox only)"),
    ("services:\n  w:\n    build: .\n    ports: ['1:2']\n    x-activator: {}\n", "services.w.image: missing"),
    ("services:\n  w:\n    image: x\n    x-activator: {}\n", "services.w.ports: no published port: say which port"),
    ("services:\n  w:\n    image: x\n    ports: ['1:2', '3:4']\n    x-activator: {}\n",
     "publish ports 2, 4 of the app, and activator serves one app port per service"),
    ("services:\n  w:\n    image: x\n    ports: ['53:53/sctp']\n    x-activator: {}\n",
     "services.w.ports: '53:53/sctp': only TCP and UDP ports can be served (/tcp, /udp)"),
    ("services:\n  w:\n    image: x\n    ports: ['8080']\n    x-activator: {}\n", "[HOST_IP:]PUBLISHED:TARGET"),
    ("services:\n  w:\n    image: '${IMG:?set IMG to the image}'\n    ports: ['1:2']\n    x-activator: {}\n",
     "services.w.image: ${IMG} is required (not set): set IMG to the image"),
    ("services:\n  w:\n    image: x\n    ports: ['1:2']\n    x-activator: {colour: red}\n",
     "services.w.x-activator.colour: unknown key"),
    ("services:\n  w:\n    image: x\n    ports: ['1:2']\n    env_file: missing.env\n    x-activator: {}\n",
     "missing.env does not exist"),
    ("x-activator: {}\nservices:\n  w: {image: x}\n", "no Compose service has an 'x-activator' block"),
])
def test_what_cannot_be_served_is_refused_in_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, text: str,
                                                      message: str) -> None:
    monkeypatch.delenv("IMG", raising=False)
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)
    assert str(e.value).startswith(str(tmp_path / "docker-compose.yml"))


def test_interpolation_forms(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SET", "s")
    monkeypatch.setenv("EMPTY", "")
    monkeypatch.delenv("UNSET", raising=False)
    env = {"A": "$SET ${SET} ${UNSET-d1} ${UNSET:-d2} ${EMPTY-d3} ${EMPTY:-d4} $$SET ${UNSET}."}
    text = ("services:\n  w:\n    image: x\n    ports: ['1:2']\n    environment:\n"
            f"      A: '{env['A']}'\n    x-activator: {{}}\n")
    cfg = load(tmp_path, text)
    assert dict(cfg.service("w").environment)["A"] == "s s d1 d2  d4 $SET ."  # type: ignore[attr-defined]




@pytest.mark.parametrize(("text", "message"), [
    # issue 17 item 6: say where a key really is, what the file looks like, and what was meant
    ("services:\n  site:\n    image: x\n    ports: ['1:2']\n    x-activator: {idle_timout: 5m}\n",
     "services.site.x-activator.idle_timout: unknown key; did you mean 'idle_timeout'?"),
    ("version: '3'\nservices:\n  site:\n    image: x\n    ports: ['1:2']\n",
     "version: this looks like a Compose file, but no service has an 'x-activator' block; add `x-activator: {}`"),
    ("services:\n  site:\n    image: x\n    ports: ['1:2']\n",
     "services.site.ports: this looks like a Compose service, but it has no 'x-activator' block"),
    ("services:\n  w:\n    image: x\n    ports: ['1:2']\n    volumes: [/data]\n    x-activator: {}\n",
     "name it (NAME:/data)"),
])
def test_mistakes_are_named_where_they_are(tmp_path: Path, text: str, message: str) -> None:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text)
    assert message in str(e.value) and "\n" not in str(e.value), str(e.value)


# --- issue 31 item 7: Compose without traps ---------------------------------------------------------------------

def _err(tmp_path: Path, text: str, **kw: str) -> tuple[str, ...]:
    with pytest.raises(ConfigError) as e:
        load(tmp_path, text, **kw)
    return tuple(line.removeprefix(f"{tmp_path / 'docker-compose.yml'}: ") for line in e.value.lines)


def test_udp_ports_are_served_as_udp(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
services:
  dns:
    image: x
    ports: ["127.0.0.1:5353:53/udp", "127.0.0.1:5353:53/tcp", "[::1]:5353:53/udp", "[::1]:5353:53"]
    x-activator: {}
  syslog:
    image: x
    ports: [{target: 514, published: 1514, protocol: udp, host_ip: 127.0.0.1}]
    x-activator: {}
  web:
    image: x
    ports: ["127.0.0.1:8080:80/tcp"]
    x-activator: {}
""")
    dns, syslog, web = (cfg.service(n) for n in ("dns", "syslog", "web"))  # type: ignore[attr-defined]
    assert ([str(a) for a in dns.listen], dns.port, dns.protocol) == (["127.0.0.1:5353", "[::1]:5353"], 53,
                                                                     ("tcp", "udp"))
    assert ([str(a) for a in syslog.listen], syslog.port, syslog.protocol) == (["127.0.0.1:1514"], 514, ("udp",))
    assert web.protocol == ("tcp",)
    # TCP and UDP of one port on different addresses: activator binds both protocols on the same ones
    assert _err(tmp_path, "services:\n  d:\n    image: x\n    ports: ['53:53/udp', '127.0.0.1:53:53']\n"
                          "    x-activator: {}\n") == (
        "services.d.ports: port 53 is published for TCP on 127.0.0.1:53 and for UDP on 0.0.0.0:53; activator serves "
        "both protocols on the same addresses: publish the same ones for both",)


GATEWAY_NOTE = ("services.cache.ports: none published: served on 10.89.0.1:6379 only (the bridge's address), where "
                "the other services reach it (cache:6379 with depends_on: [cache]) and so does this host, nothing "
                "else; publish a port to serve other clients")


def test_a_service_with_no_published_port_is_served_on_the_bridge_only(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
services:
  cache:
    image: redis
    expose: ["6379"]
    x-activator: {}
  queue:
    image: x
    x-activator: {port: 5672}
  dns:
    image: x
    expose: [53/udp, 53/tcp]
    x-activator: {}
  web:
    image: x
    ports: ["127.0.0.1:8080:80"]
    depends_on: [cache]
    x-activator: {}
""")
    cache, queue, dns = (cfg.service(n) for n in ("cache", "queue", "dns"))  # type: ignore[attr-defined]
    assert ([str(a) for a in cache.listen], cache.port, cache.protocol) == (["10.89.0.1:6379"], 6379, ("tcp",))
    assert ([str(a) for a in queue.listen], queue.port) == (["10.89.0.1:5672"], 5672)
    assert ([str(a) for a in dns.listen], dns.port, dns.protocol) == (["10.89.0.1:53"], 53, ("tcp", "udp"))
    assert cfg.service("web").depends_on == ("cache",)  # type: ignore[attr-defined]
    assert GATEWAY_NOTE in cfg.notes  # type: ignore[attr-defined]
    # another subnet: its bridge address
    cfg = load(tmp_path, "x-activator:\n  settings: {network: {subnet: 10.77.3.0/24}}\nservices:\n  cache:\n"
                         "    image: redis\n    expose: [6379]\n    x-activator: {}\n")
    assert [str(a) for a in cfg.service("cache").listen] == ["10.77.3.1:6379"]  # type: ignore[attr-defined]
    # x-activator's listen wins, and then nothing is derived to note
    cfg = load(tmp_path, "services:\n  cache:\n    image: redis\n    expose: [6379]\n"
                         "    x-activator: {listen: 127.0.0.1:6380}\n")
    assert [str(a) for a in cfg.service("cache").listen] == ["127.0.0.1:6380"]  # type: ignore[attr-defined]
    assert not [n for n in cfg.notes if "ports" in n]  # type: ignore[attr-defined]


def test_the_default_bridge_address_is_the_settings_default() -> None:
    from activator.config import compose
    from activator.config.model import NetworkSettings

    assert str(NetworkSettings().subnet) == compose.DEFAULT_SUBNET


def test_no_port_at_all_is_one_line_that_exposes_nothing(tmp_path: Path) -> None:
    (line,) = _err(tmp_path, "services:\n  db:\n    image: postgres\n    x-activator: {}\n")
    assert line == ("services.db.ports: no published port: say which port the app listens on with expose: "
                    "[\"PORT\"] (or x-activator: {port: PORT}) to serve it to the other services on the bridge's "
                    "address 10.89.0.1 only, or publish it for clients on this host (\"127.0.0.1:PORT:PORT\")")
    assert "0.0.0.0" not in line and "8080:80" not in line  # never a hint that publishes it on every address
    (line,) = _err(tmp_path, "services:\n  db:\n    image: postgres\n    expose: [5432, 5433]\n    x-activator: {}\n")
    assert line.startswith("services.db.ports: no published port, and it exposes 5432, 5433: say which port")
    (line,) = _err(tmp_path, "services:\n  db:\n    image: postgres\n    expose: [5432-5440]\n    x-activator: {}\n")
    assert line == "services.db.expose: '5432-5440': expected PORT, PORT/tcp or PORT/udp (one port, no range)"


def test_expose_beside_published_ports_is_noted(tmp_path: Path) -> None:
    cfg = load(tmp_path, "services:\n  w:\n    image: x\n    ports: ['1:80']\n    expose: [80, 9000]\n"
                         "    x-activator: {}\n")
    assert cfg.notes == ("services.w.expose: ignored: port 9000 is not served: the published ports are (80); "  # type: ignore[attr-defined]
                         "expose names the app's port only when none is published",)


DEPENDS = """
services:
  db:
    image: postgres
    expose: [5432]
    {db_extra}
    x-activator: {{}}
  legacy: {{image: x}}
  web:
    image: x
    ports: ["127.0.0.1:8080:80"]
    depends_on: {depends}
    x-activator: {{}}
"""


@pytest.mark.parametrize(("db_extra", "depends", "note"), [
    ("", "[db]", None),
    ("", "{db: {condition: service_started}}", None),
    ("healthcheck: {test: [CMD, pg_isready]}", "{db: {condition: service_healthy}}",
     "services.web.depends_on.db: service_healthy: db is restored from its checkpoint, made once its healthcheck "
     "passed (the check is not run again), and this service's connections to it wait for its restore"),
    ("x-activator: {readiness: {command: [pg_isready]}}", "{db: {condition: service_healthy}}",
     "services.web.depends_on.db: service_healthy: db is restored"),
    ("", "{db: {condition: service_started, restart: true}}",
     "services.web.depends_on.db.restart: ignored: activator restarts no dependant (a dependant's connections to "
     "this dependency wait for its restore instead)"),
    ("", "{db: {condition: service_started}, legacy: {condition: service_healthy}}",
     "services.web.depends_on.legacy: ignored: not served by activator (it runs under docker compose); its "
     "instances are not woken with this one, nor waited for (service_healthy is docker compose's)"),
])
def test_depends_on_conditions_are_mapped_and_noted(tmp_path: Path, db_extra: str, depends: str,
                                                    note: str | None) -> None:
    if db_extra.startswith("x-activator"):
        text = DEPENDS.replace("    {db_extra}\n    x-activator: {{}}\n", "    {db_extra}\n", 1)
    else:
        text = DEPENDS
    cfg = load(tmp_path, text.format(db_extra=db_extra, depends=depends))
    assert cfg.service("web").depends_on == ("db",)  # type: ignore[attr-defined]
    dep_notes = [n for n in cfg.notes if ".depends_on." in n]  # type: ignore[attr-defined]
    if note is None:
        assert dep_notes == []
    else:
        assert [n for n in dep_notes if n.startswith(note)], dep_notes


@pytest.mark.parametrize(("depends", "line"), [
    ("{db: {condition: service_healthy}}",
     "services.web.depends_on.db.condition: service_healthy, but 'db' has no healthcheck (docker compose refuses "
     "this too): give db a healthcheck, or use condition: service_started"),
    ("{db: {condition: service_completed_successfully}}",
     "services.web.depends_on.db.condition: service_completed_successfully: 'db' is served on demand and never "
     "completes; leave a one-off job (a migration) to docker compose (remove db's x-activator block)"),
    ("{db: {condition: service_ready}}",
     "services.web.depends_on.db.condition: 'service_ready' is not a condition (service_started, service_healthy, "
     "service_completed_successfully)"),
    ("{db: {condition: service_started, wait: true}}",
     "services.web.depends_on.db.wait: not a key of depends_on (condition, restart, required)"),
])
def test_depends_on_conditions_that_cannot_hold_are_refused(tmp_path: Path, depends: str, line: str) -> None:
    assert _err(tmp_path, DEPENDS.format(db_extra="", depends=depends)) == (line,)


def test_every_problem_of_the_file_in_one_run(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A five-service file with a problem in each (two in one) took four failing runs: now one, a line each."""
    monkeypatch.delenv("TAG", raising=False)
    lines = _err(tmp_path, """
services:
  a:
    image: x
    ports: ["53:53/sctp"]
    privileged: true
    x-activator: {}
  b:
    image: redis
    x-activator: {}
  c:
    image: x
    ports: ["1:2"]
    stop_grace_period: soon
    x-activator: {}
  fine:
    image: x
    ports: ["3:4"]
    x-activator: {}
  d:
    image: "app:${TAG:?set TAG}"
    ports: ["5:6"]
    environment: {DEBUG: true}
    x-activator: {}
""")
    assert lines == (
        "services.a.privileged: not supported (activator runs instances with Docker's default sandbox only); remove "
        "it or leave this service to docker compose",
        "services.a.ports: '53:53/sctp': only TCP and UDP ports can be served (/tcp, /udp)",
        "services.b.ports: no published port: say which port the app listens on with expose: [\"PORT\"] (or "
        "x-activator: {port: PORT}) to serve it to the other services on the bridge's address 10.89.0.1 only, or "
        "publish it for clients on this host (\"127.0.0.1:PORT:PORT\")",
        "services.c.stop_grace_period: 'soon' is not a duration (e.g. 10s, 1m30s, 500ms)",
        "services.d.image: ${TAG} is required (not set): set TAG",
        "services.d.environment.DEBUG: true is a boolean; Compose wants a string: quote it ('true')",
    )
    with pytest.raises(ConfigError) as e:
        load(tmp_path, (tmp_path / "docker-compose.yml").read_text())
    assert str(e.value).startswith(f"{tmp_path / 'docker-compose.yml'}: services.a.privileged: not supported")
    assert "\n" not in str(e.value)  # as a message (a log line): the first, and how many more


def test_dotenv_as_compose_reads_it(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("FROM_SHELL", "shell")
    monkeypatch.setenv("BOTH", "the shell wins")
    for name in ("UNSET_BARE", "Q", "I", "S", "D", "E", "C", "H", "N"):
        monkeypatch.delenv(name, raising=False)
    dotenv = ("# a comment\n"
              "Q=\"x\" # c\n"            # issue 31: kept its quotes
              "H=a#b\n"                  # no space before #: part of the value
              "C=plain # comment\n"
              "S='lit ${FROM_SHELL}'\n"   # single quotes: literal
              "D=\"in ${FROM_SHELL}\"\n"  # double quotes: interpolated
              "I=${Q}-${FROM_SHELL}\n"    # unquoted too, from the file's earlier keys and the shell
              "export E=exported\n"
              "N=\"two\\nlines\"\n"
              "BOTH=dotenv\n"
              "UNSET_BARE\n")
    keys = ["Q", "H", "C", "S", "D", "I", "E", "N", "BOTH", "UNSET_BARE"]
    text = ("services:\n  w:\n    image: x\n    ports: ['1:2']\n    environment:\n"
            + "".join(f"      {k}: ${{{k}-unset}}\n" for k in keys) + "    x-activator: {}\n")
    env = dict(load(tmp_path, text, env=dotenv).service("w").environment)  # type: ignore[attr-defined]
    assert env == {"Q": "x", "H": "a#b", "C": "plain", "S": "lit ${FROM_SHELL}", "D": "in shell", "I": "x-shell",
                   "E": "exported", "N": "two\nlines", "BOTH": "the shell wins", "UNSET_BARE": "unset"}


def test_a_malformed_dotenv_line_is_named(tmp_path: Path) -> None:
    text = "services:\n  w:\n    image: x\n    ports: ['1:2']\n    x-activator: {}\n"
    assert _err(tmp_path, text, env="GOOD=1\n\nnot a line\nBAD=${X\n") == (
        f"{tmp_path / '.env'} line 3: expected KEY=VALUE",
        f"{tmp_path / '.env'} line 4: '${{X' has no closing '}}' (write $$ for a literal $)")
    (tmp_path / ".env").unlink()
    assert _err(tmp_path, text.replace("x-activator", "env_file: web.env\n    x-activator"), web_env="a b c\n") == (
        f"services.w: {tmp_path / 'web.env'} line 1: expected KEY=VALUE",)


def test_yes_no_on_off_are_words_as_compose_reads_them(tmp_path: Path) -> None:
    cfg = load(tmp_path, """
services:
  w:
    image: x
    ports: ['1:2']
    environment: {A: yes, B: no, C: On, D: OFF, E: "yes"}
    command: [serve, --color, on]
    x-activator: {http: yes}
""")
    w = cfg.service("w")  # type: ignore[attr-defined]
    assert dict(w.environment) == {"A": "yes", "B": "no", "C": "On", "D": "OFF", "E": "yes"}
    assert w.command == ("serve", "--color", "on")
    assert w.http is True  # x-activator's keys are activator's, read as in its own file
    # a Compose boolean key given a word is refused (docker compose refuses it too)
    (line,) = _err(tmp_path, "services:\n  w:\n    image: x\n    ports: ['1:2']\n    read_only: yes\n"
                             "    x-activator: {}\n")
    assert line.startswith("services.w.read_only: ") and "yes" in line, line


def test_unset_variables_are_noted(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOT_THERE", raising=False)
    cfg = load(tmp_path, "services:\n  w:\n    image: 'x:${NOT_THERE}latest'\n    ports: ['1:2']\n"
                         "    environment: [A=$NOT_THERE]\n    x-activator: {}\n"
                         "  other: {image: '${NOT_THERE:?only docker compose reads this}'}\n")
    assert cfg.service("w").image == "x:latest"  # type: ignore[attr-defined]
    assert cfg.notes == ("services.w.image: ${NOT_THERE} is not set: an empty string, as docker compose reads it "  # type: ignore[attr-defined]
                         "(compose warns too)",)


def test_compose_durations(tmp_path: Path) -> None:
    cfg = load(tmp_path, "services:\n  w:\n    image: x\n    ports: ['1:2']\n    stop_grace_period: 1m30s\n"
                         "    healthcheck: {test: 'true', interval: 1h2m3.5s, timeout: 1500ms, retries: 1}\n"
                         "    x-activator: {}\n")
    w = cfg.service("w")  # type: ignore[attr-defined]
    assert w.stop_grace == 90 and w.readiness.command_timeout == 1.5
    assert w.readiness.timeout == 3600  # 1h2m3.5s + 1.5s, bounded to an hour


def test_the_docs_example_is_served_as_it_says(tmp_path: Path) -> None:
    page = (Path(__file__).parents[2] / "docs" / "compose.md").read_text()  # the README's section, moved there
    section = page.split("# From a docker-compose.yml", 1)[1]
    example = section.split("```yaml\n", 1)[1].split("```", 1)[0]
    cfg = load(tmp_path, example, wiki_env="A=1\n")
    assert [s.name for s in cfg.services] == ["cache", "dns", "wiki"]  # type: ignore[attr-defined]
    cache, dns, wiki = cfg.services  # type: ignore[attr-defined]
    assert [str(a) for a in cache.listen] == ["10.89.0.1:6379"] and dns.protocol == ("tcp", "udp")
    assert wiki.depends_on == ("cache",)
