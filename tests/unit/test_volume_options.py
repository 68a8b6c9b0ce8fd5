"""`U` and `idmap` on volumes: how they are written (short form, long form, Compose), what is refused in one
line, that volumes written before the options existed keep their checkpoints, and the chown walk on a real tree
(tests/engine/test_volume_owners.py plays the attackers against the real daemon)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

from activator.config import compose
from activator.config.mounts import Volume, Volumes
from activator.config.parse import parse_config
from activator.errors import ConfigError
from activator.runtime import volumeowner

P = Path("/etc/activator/services.yaml")


@pytest.mark.parametrize(("raw", "want"), [
    ("/srv/data:/data:U", Volume("/srv/data", "/data", chown=True)),
    ("/srv/data:/data:ro,U", Volume("/srv/data", "/data", True, chown=True)),
    ("/srv/data:/data:idmap,rw", Volume("/srv/data", "/data", idmap=True)),
    ({"source": "/srv/data", "target": "/data", "chown": True}, Volume("/srv/data", "/data", chown=True)),
    ({"source": "/srv/data", "target": "/data", "idmap": True, "read_only": True},
     Volume("/srv/data", "/data", True, idmap=True)),
    ("data:/data", Volume("data", "/data")),
])
def test_options_are_read(raw: object, want: Volume) -> None:
    assert Volumes().parse([raw]) == (want,)


@pytest.mark.parametrize(("raw", "fragment"), [
    ("/srv/data:/data:U,idmap", "U (chown) and idmap together: pick one"),
    ("data:/data:U", "U (chown) and idmap apply to host paths only"),
    ("/srv/data:/data:u", "is not SOURCE:TARGET[:OPTIONS]"),
    ("/srv/data:/data:ro,rw", "is not SOURCE:TARGET[:OPTIONS]"),
    ("/srv/data:/data:U,U", "is not SOURCE:TARGET[:OPTIONS]"),
    ({"source": "/srv/data", "target": "/data", "chown": "yes"}, "chown, idmap: true/false"),
    ({"source": "x", "target": "/data", "idmap": True, "external": True}, "apply to host paths only"),
])
def test_wrong_options_are_one_line(raw: object, fragment: str) -> None:
    with pytest.raises(ValueError) as e:
        Volumes().parse([raw])
    assert fragment in str(e.value) and "\n" not in str(e.value)


def _fingerprint(volume: str) -> str:
    text = f"services:\n  web:\n    image: demo:latest\n    listen: 127.0.0.1:8080\n    port: 80\n" \
           f"    volumes: ['{volume}']\n"
    return parse_config(text, P).services[0].checkpoint_fingerprint()


def test_a_volume_without_options_keeps_its_fingerprint_and_options_change_it() -> None:
    # the fingerprint a plain volume had before the options existed (asdict of source, target, read_only, external)
    import hashlib
    import json

    from activator.config.service import _shaping

    cfg = parse_config("services:\n  web:\n    image: demo:latest\n    listen: 127.0.0.1:8080\n    port: 80\n"
                       "    volumes: ['/srv/d:/d']\n", P)
    shaped = _shaping(cfg.services[0])
    assert shaped["volumes"] == [{"source": "/srv/d", "target": "/d", "read_only": False, "external": False}]
    assert cfg.services[0].checkpoint_fingerprint() == \
        hashlib.sha256(json.dumps(shaped, sort_keys=True).encode()).hexdigest()[:16]
    plain, chown, idmap = (_fingerprint(v) for v in ("/srv/d:/d", "/srv/d:/d:U", "/srv/d:/d:idmap"))
    assert len({plain, chown, idmap}) == 3  # a change of either option rebuilds the checkpoint (shapes=True)


def test_compose_short_form_carries_podmans_options(tmp_path: Path) -> None:
    raw = {"services": {"web": {"image": "demo", "ports": ["8080:80"], "x-activator": {},
                                "volumes": ["/srv/a:/a:U", "/srv/b:/b:ro,idmap", "/srv/c:/c:z"]}}}
    out = compose.translate(raw, tmp_path / "compose.yaml")
    vols = out["services"]["web"]["volumes"]
    assert vols[0] == {"source": "/srv/a", "target": "/a", "read_only": False, "chown": True}
    assert vols[1] == {"source": "/srv/b", "target": "/b", "read_only": True, "idmap": True}
    assert vols[2] == {"source": "/srv/c", "target": "/c", "read_only": False}


@pytest.mark.parametrize(("path", "fragment"), [
    ("/", "is a system directory"), ("/home", "is a system directory"), ("/etc/ssl", "is under /etc"),
    ("/var/lib/docker/volumes/x/_data", "is under /var/lib/docker"), ("/run/user/0", "is under /run"),
    ("/data/state", "holds or is inside state_dir"), ("/data/state/volumes/x", "holds or is inside state_dir"),
    ("/data", "holds or is inside state_dir"), ("/data/../etc", "is under /etc"),
])
def test_refused_paths(path: str, fragment: str) -> None:
    why = volumeowner.refusal(Path(path), Path("/data/state"))
    assert why is not None and fragment in why


def test_refusal_resolves_symlinks_the_config_names(tmp_path: Path) -> None:
    (tmp_path / "looks-harmless").symlink_to("/etc")
    why = volumeowner.refusal(tmp_path / "looks-harmless", Path("/var/lib/activator"))
    assert why is not None and "(-> /etc)" in why
    assert volumeowner.refusal(tmp_path, Path("/var/lib/activator")) is None


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_chown_tree_changes_links_not_what_they_name(tmp_path: Path) -> None:
    tree, outside = tmp_path / "tree", tmp_path / "outside"
    (tree / "a" / "b").mkdir(parents=True)
    outside.write_text("not the volume's")
    (tree / "a" / "b" / "f").write_text("x")
    (tree / "to-outside").symlink_to(outside)
    (tree / "to-dir").symlink_to(tmp_path)
    os.link(outside, tree / "hard")
    changed, skipped = volumeowner.chown_tree(tree, 4242, 4343, range(4242, 4243))
    assert (changed, skipped) == (6, 1)  # tree, a, b, f and the two symlinks; the hard link skipped
    for p in (tree, tree / "a", tree / "a" / "b", tree / "a" / "b" / "f", tree / "to-outside", tree / "to-dir"):
        st = os.lstat(p)
        assert (st.st_uid, st.st_gid) == (4242, 4343), p
    assert os.stat(outside).st_uid == 0 and os.stat(tmp_path).st_uid == 0
    assert volumeowner.chown_tree(tree, 4242, 4343, range(4242, 4243)) == (0, 1)  # nothing left to change


@pytest.mark.skipif(os.geteuid() != 0, reason="chown needs root")
def test_chown_tree_gives_nothing_through_a_name_swapped_for_a_hard_link(tmp_path: Path,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """Whoever writes in the tree (the app, or a user the directory lets in) swaps a file for a hard link to a
    file outside the tree at the worst moment for the walk: right after the walk looked at the name. The swap is
    made by the test at that moment (a race won every time), on the real file system, with real chowns."""
    tree, victim = tmp_path / "tree", tmp_path / "victim"
    tree.mkdir()
    victim.write_text("root's, outside the volume")
    (tree / "swap").write_text("the app's own file, one link")
    (tree / "plain").write_text("x")
    (tree / "link").symlink_to(victim)
    real_stat, swapped = os.stat, list[bool]()

    def stat_then_swap(path: object, *args: object, **kwargs: object) -> os.stat_result:
        st = real_stat(path, *args, **kwargs)  # type: ignore[arg-type]
        if path == "swap" and not swapped:
            swapped.append(True)
            os.unlink(tree / "swap")
            os.link(victim, tree / "swap")
        return st

    monkeypatch.setattr(os, "stat", stat_then_swap)
    changed, skipped = volumeowner.chown_tree(tree, 4242, 4343, range(4242, 4243))
    monkeypatch.undo()
    assert swapped, "the walk no longer looks at entries by name: move the swap to where it looks now"
    assert (os.stat(victim).st_uid, os.stat(victim).st_gid) == (0, 0), "a file outside the tree was given away"
    assert skipped == 1
    # the positive control: the rest of the tree is the app's, the symbolic link's own owner included
    for p in (tree, tree / "plain", tree / "link"):
        assert (os.lstat(p).st_uid, os.lstat(p).st_gid) == (4242, 4343), p
    assert changed == 3


def test_too_deep_a_tree_is_one_line(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(volumeowner, "MAX_DEPTH", 3)
    (tmp_path / "1" / "2" / "3" / "4").mkdir(parents=True)
    with pytest.raises(Exception, match="more than 3 directories deep; U walks no deeper"):
        volumeowner.chown_tree(tmp_path, os.getuid(), os.getgid(), range(0))


def test_config_error_names_the_key() -> None:
    text = "services:\n  web:\n    image: demo:latest\n    listen: 127.0.0.1:8080\n    port: 80\n" \
           "    volumes: ['/srv/d:/d:U,idmap']\n"
    with pytest.raises(ConfigError, match=r"services\.web\.volumes.*pick one"):
        parse_config(text, P)
