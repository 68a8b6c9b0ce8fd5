"""The command line's shape (issue 31 item 5), no engine: `-c` wherever a user puts it, checkpoint's verbs as
sub-commands with every earlier spelling still meaning what it meant, and a description in every --help."""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import tarfile
from pathlib import Path

import pytest

from activator import cli
from activator.checkpoints import ociarchive
from activator.cli import CHECKPOINT_VERBS, DEFAULT_CONFIG, build_parser, checkpoint_argv


def parse(*argv: str) -> argparse.Namespace:
    args = build_parser().parse_args(checkpoint_argv(list(argv)))
    if not hasattr(args, "config"):
        args.config = DEFAULT_CONFIG
    return args


@pytest.mark.parametrize(("argv", "verb", "what", "config"), [
    (["checkpoint", "web"], "build", "web", DEFAULT_CONFIG),  # the verb left out: build
    (["checkpoint", "web", "--rebuild", "-c", "f.yaml"], "build", "web", "f.yaml"),
    (["checkpoint", "--rebuild", "-c", "f.yaml", "web"], "build", "web", "f.yaml"),
    (["-c", "f.yaml", "checkpoint", "web"], "build", "web", "f.yaml"),
    (["checkpoint", "build", "web", "-c", "f.yaml"], "build", "web", "f.yaml"),
    (["checkpoint", "export", "web", "-o", "out.tar", "-c", "f.yaml"], "export", "web", "f.yaml"),
    (["checkpoint", "export", "-c", "f.yaml", "web", "-o", "out.tar"], "export", "web", "f.yaml"),
    (["checkpoint", "-c", "f.yaml", "export", "web", "-o", "out.tar"], "export", "web", "f.yaml"),  # the old way
    (["--log-level", "debug", "checkpoint", "--config=f.yaml", "push", "web"], "push", "web", "f.yaml"),
    (["checkpoint", "import", "a.tar", "--service", "web", "-c", "f.yaml"], "import", "a.tar", "f.yaml"),
    (["checkpoint", "pull", "web"], "pull", "web", DEFAULT_CONFIG),
    (["checkpoint", "keygen", "/k"], "keygen", "/k", DEFAULT_CONFIG),
    (["checkpoint", "sign", "a.tar", "--key", "/k"], "sign", "a.tar", DEFAULT_CONFIG),
    (["checkpoint", "export"], "export", None, DEFAULT_CONFIG),  # a service named export: cmd_checkpoint decides
])
def test_checkpoint_verbs_and_options_anywhere(argv: list[str], verb: str, what: str | None, config: str) -> None:
    args = parse(*argv)
    assert (args.verb, args.what, args.config) == (verb, what, config)
    assert args.rebuild == ("--rebuild" in argv)
    assert args.output == ("out.tar" if "-o" in argv else None)
    assert args.key == ("/k" if "--key" in argv else None)
    assert args.service == ("web" if "--service" in argv else None)


@pytest.mark.parametrize("argv", [
    ["validate", "-c", "f.yaml"], ["-c", "f.yaml", "validate"], ["status", "--json", "-c", "f.yaml"],
    ["-c", "other.yaml", "logs", "web", "-c", "f.yaml"],  # both: the one after the command counts
    ["inspect", "-c", "f.yaml", "web"], ["--config", "f.yaml", "scale", "web", "2"],
])
def test_config_before_or_after_the_command(argv: list[str]) -> None:
    assert parse(*argv).config == "f.yaml"


def test_an_option_a_verb_does_not_take_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse("checkpoint", "push", "web", "-o", "x.tar")
    assert "unrecognized arguments: -o x.tar" in capsys.readouterr().err


def _subparsers(p: argparse.ArgumentParser) -> dict[str, argparse.ArgumentParser]:
    for action in p._actions:
        if isinstance(action, argparse._SubParsersAction):
            return dict(action.choices)
    return {}


def test_every_command_and_verb_has_a_description_and_the_top_level_names_them_all() -> None:
    top = build_parser()
    commands = _subparsers(top)
    assert len(commands) == 14  # run ... schema: a new one gets a description here too
    shown = top.format_help()
    for name, sp in commands.items():
        assert f"\n    {name} " in shown and name in (top.description or ""), name
        assert sp.description and " ".join(sp.description.split()) in " ".join(sp.format_help().split()), name
    verbs = _subparsers(commands["checkpoint"])
    assert tuple(verbs) == CHECKPOINT_VERBS
    for name, sp in verbs.items():
        assert sp.description, name
        assert "-c CONFIG" in sp.format_help()


def _main(*argv: str) -> tuple[int, str, str]:
    out, err = io.StringIO(), io.StringIO()
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        rc = cli.main(list(argv))
    return rc, out.getvalue(), err.getvalue()


def test_inspect_of_an_archive_needs_no_services_file(tmp_path: Path) -> None:
    layer = tmp_path / "layer.tar"
    with tarfile.open(layer, "w") as t:
        info = tarfile.TarInfo("a")
        info.size = 1
        t.addfile(info, io.BytesIO(b"1"))
    archive = tmp_path / "image.tar"
    ociarchive.write(archive, layer, {"k": "v"}, ref="r", arch="amd64", created="x")
    absent = str(tmp_path / "no-such-config.yaml")
    rc, out, err = _main("inspect", str(archive), "-c", absent)
    assert rc == 0 and out.startswith(f"{archive}: OCI image (no checkpoint annotations) sha256:"), err
    # a service name still needs the file that names it
    rc, out, err = _main("inspect", "web", "-c", absent)
    assert rc == 2 and err == f"activator: error: {absent}: no such file; pass the services file with -c FILE\n"
    rc, out, err = _main("inspect", str(tmp_path / "gone.tar"), "-c", absent)
    assert rc == 1 and err == f"activator: error: {tmp_path / 'gone.tar'}: no such file\n"


def test_status_json_says_so_when_no_daemon_runs(tmp_path: Path) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(f"settings: {{state_dir: {tmp_path / 'state'}}}\nservices: {{}}\n")
    rc, out, err = _main("status", "--json", "-c", str(cfg))
    sock = tmp_path / "state" / "control.sock"
    assert rc == 1 and json.loads(out) == {
        "running": False, "socket": str(sock),
        "error": f"no activator is running with this state_dir ({sock} does not answer); start it with "
                 "`activator run`"}
    assert err.startswith("activator: error: no activator is running")
