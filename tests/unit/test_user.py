"""USER as Docker resolves it against the image's own /etc/passwd and /etc/group (pure, no engine)."""

from __future__ import annotations

from pathlib import Path

import pytest

from activator.checkpoints.images import resolve_user
from activator.errors import ImageError


@pytest.fixture
def rootfs(tmp_path: Path) -> Path:
    etc = tmp_path / "etc"
    etc.mkdir()
    (etc / "passwd").write_text("root:x:0:0:root:/root:/bin/sh\napp:x:1000:1000::/home/app:/bin/sh\n"
                                "svc:x:1001:1001::/:/bin/false\n")
    (etc / "group").write_text("root:x:0:\napp:x:1000:\naudio:x:29:app,svc\nvideo:x:44:svc\nwww:x:33:app\n")
    return tmp_path


@pytest.mark.parametrize(("user", "expected"), [
    ("", (0, 0, ())),
    ("app", (1000, 1000, (29, 33))),            # supplementary groups from /etc/group
    ("1000", (1000, 1000, (29, 33))),           # a uid with a passwd entry: its group and groups, as Docker
    ("app:www", (1000, 33, (29,))),             # the primary group is not repeated
    ("svc:0", (1001, 0, (29, 44))),
    ("4242", (4242, 0, ())),                    # a uid the image does not know
    ("4242:4242", (4242, 4242, ())),
])
def test_users_and_groups(rootfs: Path, user: str, expected: tuple[int, int, tuple[int, ...]]) -> None:
    assert resolve_user(rootfs, user, "web") == expected


def test_unknown_names_are_one_line_errors(rootfs: Path) -> None:
    with pytest.raises(ImageError, match="user 'nobody' is not in the image's /etc/passwd"):
        resolve_user(rootfs, "nobody", "web")
    with pytest.raises(ImageError, match="group 'staff' is not in the image's /etc/group"):
        resolve_user(rootfs, "app:staff", "web")
