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
    ("services:\n  w:\n    image: x\n    x-activator: {}\n", "services.w.ports: no published port"),
    ("services:\n  w:\n    image: x\n    ports: ['1:2', '3:4']\n    x-activator: {}\n",
     "publish ports 2, 4 of the app, and activator serves one app port per service"),
    ("services:\n  w:\n    image: x\n    ports: ['53:53/udp']\n    x-activator: {}\n", "only TCP"),
    ("services:\n  w:\n    image: x\n    ports: ['8080']\n    x-activator: {}\n", "[HOST_IP:]PUBLISHED:TARGET"),
    ("services:\n  w:\n    image: '${IMG:?set IMG to the image}'\n    ports: ['1:2']\n    x-activator: {}\n",
     "services.w.image: ${IMG} is required: set IMG to the image"),
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
