"""restore_memory: copy against map (scripts/criu-patches/0003), proved on a real restore of scripts/images/memcheck.c:
every check runs on memory that was dumped, and each gives what docs/restore-memory.md says it gives. Under copy
everything behaves as anonymous memory; under map-always (the patch's raw behaviour), memory the app discards and
reuses shows the kernel's file-mapping semantics where the patch mapped it, and nothing else changes. Instances of
one checkpoint never see each other's writes, and no write reaches the pages images.

memcheck runs a statically linked jemalloc twin (memcheck-je) as its child, so under plain `map` its checkpoint
carries a map hazard (activator/checkpoints/maphazard.py) and is restored by copy, with one warning: the raw
mapping is shown with map-always, and what `map` does with such an app has a test of its own."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import logging
import re
import shutil
from pathlib import Path
from typing import Any

import pytest

from activator.cli.inspection import cmd_inspect
from tests.conftest import BUSYBOX

pytestmark = [pytest.mark.engine, pytest.mark.asyncio]

MEMCHECK = {"image": BUSYBOX, "command": ["memcheck", "9000"], "port": 9000}

#: check -> (verdict under copy, verdict under map-always): the table docs/restore-memory.md documents. PASS is
#: anonymous memory's behaviour, DIFF the kernel's private-file-mapping behaviour on dumped memory (memcheck.c says,
#: per check, exactly what each means).
EXPECTED = {
    "dontneed_zero": ("PASS", "DIFF"),        # MADV_DONTNEED refills the dump's bytes from pages-N.img
    "madv_free": ("PASS", "DIFF"),            # EINVAL: MADV_FREE is for anonymous VMAs only
    "calloc_after_trim": ("PASS", "PASS"),    # glibc clears every chunk that is not fresh from the kernel
    "jemalloc_purge_calloc": ("PASS", "DIFF"),  # jemalloc marks a DONTNEED'd extent zeroed: Redis's hazard
    "mremap_grow": ("PASS", "DIFF"),          # growth maps the image's next bytes; a holey range spans VMAs
    "realloc_mmapped": ("PASS", "PASS"),      # glibc's mremap of a chunk keeps the bytes; the tail is not judged
    "fork_cow": ("PASS", "PASS"),
    "mprotect": ("PASS", "PASS"),
    "checksum": ("PASS", "PASS"),
    "locked": ("PASS", "PASS"),               # locked VMAs are left to copying
}
#: the checks whose region map-always must have mapped (vma=file in their line): without that, a PASS there would
#: prove nothing
MAPPED = ("dontneed_zero", "madv_free", "calloc_after_trim", "jemalloc_purge_calloc", "mremap_grow", "realloc_mmapped",
          "fork_cow", "mprotect", "checksum")


async def session(port: int, *commands: str) -> list[str]:
    """Send the commands on one connection, half-close, read every answer line."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write("".join(f"{c}\n" for c in commands).encode())
    writer.write_eof()
    data = await asyncio.wait_for(reader.read(), 60)
    writer.close()
    return data.decode().splitlines()


def verdicts(lines: list[str]) -> dict[str, tuple[str, str]]:
    """name -> (verdict, the rest of its line)."""
    got = {}
    for line in lines:
        name, verdict, *rest = [*line.split(" ", 2), ""]
        if verdict in ("PASS", "FAIL", "DIFF", "INFO"):
            got[name] = (verdict, rest[0])
    return got


def mapped_pages(inst: Any) -> int:
    """Patch 0003's own count, summed over the restored tasks: the positive control that mapping happened."""
    log = (inst.sandbox.layout.criu_work / "restore.log").read_text()
    return sum(int(m) for m in re.findall(r"nr_mapped_pages:\s+(\d+)", log))


def restores_by(run: Any, service: str, capsys: pytest.CaptureFixture[str]) -> dict[str, Any]:
    """What `activator inspect --json` says of how the service's instances get their memory."""
    capsys.readouterr()
    assert cmd_inspect(run.config, argparse.Namespace(service=service, json=True)) == 0
    shown: dict[str, Any] = json.loads(capsys.readouterr().out)["restores_by"]
    return shown


def image_digests(images: Path) -> dict[str, str]:
    pages = sorted(images.glob("pages-*.img"))
    assert pages, f"no pages images in {images}"
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in pages}


async def test_each_check_gives_the_documented_result_under_copy_and_under_map_always(start, capsys) -> None:  # type: ignore[no-untyped-def]
    run = await start({"copy": MEMCHECK | {"restore_memory": "copy"},
                       "always": MEMCHECK | {"restore_memory": "map-always"}})
    results = {}
    for mode in ("copy", "always"):
        lines = await session(run.port(mode), "check")
        assert lines[-1] == "END", lines
        results[mode] = verdicts(lines)
        (inst,) = run.act.services[mode].instances
        results[mode]["nr_mapped_pages"] = (str(mapped_pages(inst)), "")
    table = "\n".join(f"{n:24} {results['copy'].get(n, ('-',))[0]:5} {results['always'].get(n, ('-',))[0]:5}"
                      for n in EXPECTED)
    said = "\n".join(f"{mode}: {n} {v} {d}" for mode in results for n, (v, d) in results[mode].items())
    print(f"\ncheck                    copy  map-always\n{table}\n{said}")

    assert results["copy"]["nr_mapped_pages"][0] == "0", "copy must map nothing"
    assert int(results["always"]["nr_mapped_pages"][0]) > 0, "nothing was mapped: its results would prove nothing"
    for name, (copy, mapped) in EXPECTED.items():
        assert results["copy"][name][0] == copy, f"copy: {name}: {results['copy'][name]}"
        assert results["always"][name][0] == mapped, f"map-always: {name}: {results['always'][name]}"
        assert "vma=file" not in results["copy"][name][1] and "vma=mixed" not in results["copy"][name][1]
    for name in MAPPED:
        line = results["always"][name]
        assert re.search(r"vma=(file|mixed)", line[1]), f"map-always did not map {name}: {line}"
    # What stays copied under mapping: locked memory, and the MADV_WIPEONFORK / MADV_DONTFORK regions
    assert "vma=anon" in results["always"]["locked"][1]
    assert "wipe_vma=anon dontfork_vma=anon" in results["always"]["fork_cow"][1]
    # The visible change (issue 33, criu#1711): the maps name the images
    assert "pages_lines=0" in results["copy"]["visible"][1]
    assert not re.search(r"pages_lines=0\b", results["always"]["visible"][1])
    # and `activator inspect` says which way each is restored
    assert restores_by(run, "copy", capsys) == {"restore_memory": "copy", "maps": False, "map_hazard": "jemalloc, "
                                                "linked into /bin/memcheck-je", "why_not": ""}
    assert restores_by(run, "always", capsys)["maps"] is True


#: the one line the launcher logs when map is not used for a checkpoint (activator/checkpoints/instance.py _maps)
NOT_MAPPED = "restore_memory: map is not used: its app has "


async def test_under_map_a_checkpoint_whose_app_links_jemalloc_is_restored_by_copy_with_one_warning(  # type: ignore[no-untyped-def]
        start, caplog, capsys) -> None:
    """memcheck-je (memcheck's child) carries a static jemalloc: found in the executable the dumped child maps, so
    `map` restores by copy, every check passes as under copy, and the operator reads why, once. The same image
    under map-always maps (the table's test): the hazard, not the image, is what turned mapping off."""
    caplog.set_level(logging.WARNING, logger="activator.checkpoints.instance")
    run = await start({"map": MEMCHECK | {"restore_memory": "map"}})
    svc = run.act.services["map"]
    assert svc.checkpoint is not None
    assert svc.checkpoint.map_hazard == "jemalloc, linked into /bin/memcheck-je"
    lines = await session(run.port("map"), "check")
    assert lines[-1] == "END", lines
    got = verdicts(lines)
    (inst,) = svc.instances
    assert mapped_pages(inst) == 0, "map must not be used for a checkpoint with a hazard"
    for name, (copy, _) in EXPECTED.items():
        assert got[name][0] == copy, f"map with a hazard must behave as copy: {name}: {got[name]}"
        assert not re.search(r"vma=(file|mixed)", got[name][1]), f"{name} was mapped: {got[name]}"
    assert "pages_lines=0" in got["visible"][1]
    warned = [r.getMessage() for r in caplog.records if NOT_MAPPED in r.getMessage()]
    assert len(warned) == 1, warned
    assert warned[0].startswith("service=map ") and "jemalloc, linked into /bin/memcheck-je" in warned[0], warned
    shown = restores_by(run, "map", capsys)  # `activator inspect` gives the operator the same reason
    assert shown["maps"] is False and shown["why_not"] == warned[0].removeprefix("service=map "), (shown, warned)


async def test_instances_of_one_mapped_checkpoint_never_see_each_others_writes(start) -> None:  # type: ignore[no-untyped-def]
    # network: none puts each connection on the userspace path, placed by the activator (least loaded), so the
    # second connection is sure to get the second instance; the kernel path would leave it to DNAT
    run = await start({"map": MEMCHECK | {"restore_memory": "map-always", "max_instances": 2,
                                          "target_connections": 1, "network": "none"}})
    svc = run.act.services["map"]
    port = run.port("map")
    # A holds its connection, so the next one gets an instance of its own (target_connections: 1)
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"peek\npoke\npeek\n")
    await writer.drain()
    a_said = [(await asyncio.wait_for(reader.readline(), 60)).decode().strip() for _ in range(3)]
    assert a_said == ["dump", "poked", "poked"]  # positive control: A's write is there for A
    (a,) = svc.instances
    images = a.checkpoint.images
    before = image_digests(images)
    try:
        b_said = await session(port, "peek", "check")
        assert len(svc.instances) == 2
        b = next(i for i in svc.instances if i.name != a.name)
        assert b.checkpoint.images == images, "both instances must come from the one checkpoint"
        assert mapped_pages(a) > 0 and mapped_pages(b) > 0
    finally:
        writer.close()
    assert b_said[0] == "dump", f"B saw A's write: {b_said[0]}"
    b_checks = verdicts(b_said)
    assert b_checks["checksum"][0] == "PASS" and "vma=" in b_checks["checksum"][1], b_checks["checksum"]
    assert image_digests(images) == before, "a write reached the pages images"


def refault(tmp_path: Path) -> dict[str, str]:
    """runc and CRIU as they are, but with CRIU_FAULT=139 (patch 0003's FI_MMAP_PAGE_IMAGE: every second map fails
    and that run is read instead). The wrapper's variable wins over the 130 activator sets (one fault at a time:
    the restore then uses breakpoints, which is slower and changes no memory)."""
    tools = {}
    for tool in ("runc", "criu"):
        wrapper = tmp_path / f"{tool}-fault139"
        wrapper.write_text(f"#!/bin/sh\nCRIU_FAULT=139 exec {shutil.which(tool)} \"$@\"\n")
        wrapper.chmod(0o755)
        tools[tool] = str(wrapper)
    return tools


async def test_a_run_whose_map_failed_is_read_and_behaves_as_copied(start, tmp_path) -> None:  # type: ignore[no-untyped-def]
    run = await start({"map": MEMCHECK | {"restore_memory": "map-always"}}, **refault(tmp_path))
    lines = await session(run.port("map"), "check")
    assert lines[-1] == "END", lines
    got = verdicts(lines)
    (inst,) = run.act.services["map"].instances
    log = (inst.sandbox.layout.criu_work / "restore.log").read_text()
    fell_back = [int(n) for n in re.findall(r"mmap-page-image: \d+ pages mapped, (\d+) pages read after a failed", log)]
    assert mapped_pages(inst) > 0 and sum(fell_back) > 0, "the fault must leave some runs mapped and some read"
    kinds = set()
    for name, (copy, mapped) in EXPECTED.items():
        verdict, detail = got[name]
        kind = re.search(r"\bvma=(\w+)", detail)
        assert kind, got[name]
        kinds.add(kind[1])
        # a region wholly read behaves as copied, one wholly mapped as mapped; a mixed one may show either
        allowed = {"anon": {copy}, "file": {mapped}}.get(kind[1], {copy, mapped})
        assert verdict in allowed, f"{name}: {verdict} with vma={kind[1]}: {detail}"
    assert {"anon", "file"} <= kinds or "mixed" in kinds, f"the fault changed nothing the checks can see: {kinds}"
