"""An instance's device rules on cgroup v2: a BPF_PROG_TYPE_CGROUP_DEVICE program attached to its cgroup.

Cgroup v2 has no devices.allow file. The kernel asks every device program attached to the cgroup and its ancestors
(BPF_F_ALLOW_MULTI: all must allow) on each open and mknod of a device node; a program answers 1 (allow) or 0.
runc compiles its rules into such a program (libcontainer/cgroups/devices/ebpf, devicefilter.go); this is the same
program for the same rules, written out here because an instance restored through CRIU directly has no runc to
make it. The instruction layout and the shape of the program (one block per rule, first match allows, default
deny) follow runc's, so what the kernel enforces is what `runc restore` would have made.

The program is assembled by hand (a few dozen instructions: no compiler, no libbpf) and loaded and attached with
the bpf(2) syscall through ctypes. A legacy attachment (BPF_PROG_ATTACH, not a bpf_link) holds its own reference:
the program stays attached after the descriptor is closed, until the cgroup is removed.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import errno
import os
import platform
import struct
from collections.abc import Iterable
from dataclasses import dataclass

# <linux/bpf.h>
_BPF_PROG_LOAD = 5
_BPF_PROG_ATTACH = 8
_BPF_PROG_QUERY = 16
_BPF_PROG_TYPE_CGROUP_DEVICE = 15
_BPF_CGROUP_DEVICE = 6
_BPF_F_ALLOW_MULTI = 2
_DEVCG_DEV_BLOCK, _DEVCG_DEV_CHAR = 1, 2
_DEVCG_ACC_MKNOD, _DEVCG_ACC_READ, _DEVCG_ACC_WRITE = 1, 2, 4
_SYS_BPF = {"x86_64": 321, "aarch64": 280}

# eBPF opcodes used below
_LDXW = 0x61  # BPF_LDX | BPF_MEM | BPF_W: dst = *(u32 *)(src + off)
_AND32_K = 0x54  # BPF_ALU | BPF_AND | BPF_K
_RSH32_K = 0x74  # BPF_ALU | BPF_RSH | BPF_K
_MOV32_K = 0xB4  # BPF_ALU | BPF_MOV | BPF_K
_MOV32_X = 0xBC  # BPF_ALU | BPF_MOV | BPF_X
_JNE_K = 0x55  # BPF_JMP | BPF_JNE | BPF_K
_JNE_X = 0x5D  # BPF_JMP | BPF_JNE | BPF_X
_EXIT = 0x95  # BPF_JMP | BPF_EXIT


@dataclass(frozen=True)
class Rule:
    """One allow rule as devices.allow writes it: `c 1:3 rwm`, `b *:* m` (None for a wildcard)."""

    kind: str  # "b" or "c"
    major: int | None
    minor: int | None
    access: str  # a subset of "rwm"

    @classmethod
    def parse(cls, text: str) -> Rule:
        kind, numbers, access = text.split()
        major, minor = numbers.split(":")
        if kind not in ("b", "c") or not access or set(access) - set("rwm"):
            raise ValueError(f"not a device rule: {text!r}")
        return cls(kind, None if major == "*" else int(major), None if minor == "*" else int(minor), access)

    def allows(self, kind: str, major: int, minor: int, access: str) -> bool:
        """What the program answers for this rule alone (the pure model the tests compare the kernel with)."""
        return (kind == self.kind and set(access) <= set(self.access)
                and self.major in (None, major) and self.minor in (None, minor))


def _insn(code: int, dst: int = 0, src: int = 0, off: int = 0, imm: int = 0) -> bytes:
    return struct.pack("<BBhi", code, (src << 4) | dst, off, imm)


def _mask(access: str) -> int:
    return ((_DEVCG_ACC_READ if "r" in access else 0) | (_DEVCG_ACC_WRITE if "w" in access else 0)
            | (_DEVCG_ACC_MKNOD if "m" in access else 0))


def assemble(rules: Iterable[Rule]) -> bytes:
    """The program: r2 = type, r3 = access, r4 = major, r5 = minor; then per rule a block that jumps to the next
    block on any mismatch and returns 1 at its end; 0 after the last."""
    prologue = [
        _insn(_LDXW, 2, 1, 0), _insn(_AND32_K, 2, imm=0xFFFF),
        _insn(_LDXW, 3, 1, 0), _insn(_RSH32_K, 3, imm=16),
        _insn(_LDXW, 4, 1, 4), _insn(_LDXW, 5, 1, 8),
    ]
    blocks = []
    for rule in rules:
        kind = _DEVCG_DEV_BLOCK if rule.kind == "b" else _DEVCG_DEV_CHAR
        checks: list[tuple[int, int, int, int]] = [(_JNE_K, 2, 0, kind)]  # (opcode, dst, src, imm)
        mask = _mask(rule.access)
        if mask != _mask("rwm"):  # (access & mask) != access: something asked for that the rule does not give
            checks += [(_MOV32_X, 1, 3, 0), (_AND32_K, 1, 0, mask), (_JNE_X, 1, 3, 0)]
        if rule.major is not None:
            checks.append((_JNE_K, 4, 0, rule.major))
        if rule.minor is not None:
            checks.append((_JNE_K, 5, 0, rule.minor))
        # Jumps are relative to the next instruction; the block's last two are "r0 = 1; exit".
        n = len(checks) + 2
        block = []
        for i, (code, dst, src, imm) in enumerate(checks):
            jump = code in (_JNE_K, _JNE_X)
            block.append(_insn(code, dst, src, off=n - i - 1 if jump else 0, imm=imm))
        block += [_insn(_MOV32_K, 0, imm=1), _insn(_EXIT)]
        blocks.append(b"".join(block))
    return b"".join(prologue) + b"".join(blocks) + _insn(_MOV32_K, 0, imm=0) + _insn(_EXIT)


class _Load(ctypes.Structure):
    _fields_ = [("prog_type", ctypes.c_uint32), ("insn_cnt", ctypes.c_uint32), ("insns", ctypes.c_uint64),
                ("license", ctypes.c_uint64), ("log_level", ctypes.c_uint32), ("log_size", ctypes.c_uint32),
                ("log_buf", ctypes.c_uint64), ("kern_version", ctypes.c_uint32), ("prog_flags", ctypes.c_uint32),
                ("prog_name", ctypes.c_char * 16), ("prog_ifindex", ctypes.c_uint32),
                ("expected_attach_type", ctypes.c_uint32)]


class _Attach(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_bpf_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32),
                ("attach_flags", ctypes.c_uint32), ("replace_bpf_fd", ctypes.c_uint32)]


class _Query(ctypes.Structure):
    _fields_ = [("target_fd", ctypes.c_uint32), ("attach_type", ctypes.c_uint32), ("query_flags", ctypes.c_uint32),
                ("attach_flags", ctypes.c_uint32), ("prog_ids", ctypes.c_uint64), ("prog_cnt", ctypes.c_uint32)]


_libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)


def _bpf(cmd: int, attr: ctypes.Structure) -> int:
    nr = _SYS_BPF.get(platform.machine())
    if nr is None:
        raise OSError(errno.ENOSYS, f"bpf(2) on {platform.machine()} is not known here")
    # The kernel takes any attr size up to its own and checks that what it does not know is zero: pass exactly ours.
    ret = int(_libc.syscall(ctypes.c_long(nr), ctypes.c_int(cmd), ctypes.byref(attr),
                            ctypes.c_uint(ctypes.sizeof(attr))))
    if ret < 0:
        e = ctypes.get_errno()
        raise OSError(e, os.strerror(e))
    return ret


def load(rules: Iterable[Rule]) -> int:
    """A descriptor of the loaded program (the caller closes it). The verifier's log comes with a refusal."""
    code = assemble(rules)
    insns = ctypes.create_string_buffer(code, len(code))
    license = ctypes.create_string_buffer(b"Apache")
    log = ctypes.create_string_buffer(16384)
    attr = _Load(prog_type=_BPF_PROG_TYPE_CGROUP_DEVICE, insn_cnt=len(code) // 8,
                 insns=ctypes.addressof(insns), license=ctypes.addressof(license), log_level=1,
                 log_size=len(log), log_buf=ctypes.addressof(log), prog_name=b"activator_dev",
                 expected_attach_type=_BPF_CGROUP_DEVICE)
    try:
        return _bpf(_BPF_PROG_LOAD, attr)
    except OSError as e:
        detail = log.value.decode(errors="replace").strip().splitlines()[-1:] or [""]
        raise OSError(e.errno, f"{e.strerror}{': ' + detail[0] if detail[0] else ''}") from None


def attach(cgroup: str | os.PathLike[str], rules: Iterable[Rule]) -> None:
    """Blocking. Attach a device program for these rules to a cgroup v2 directory (alongside whatever its
    ancestors have: each of theirs must allow too)."""
    prog = load(rules)
    try:
        fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
        try:
            _bpf(_BPF_PROG_ATTACH, _Attach(target_fd=fd, attach_bpf_fd=prog, attach_type=_BPF_CGROUP_DEVICE,
                                           attach_flags=_BPF_F_ALLOW_MULTI))
        finally:
            os.close(fd)
    finally:
        os.close(prog)


def attached(cgroup: str | os.PathLike[str]) -> int:
    """How many device programs are attached to this cgroup itself (not its ancestors)."""
    fd = os.open(cgroup, os.O_RDONLY | os.O_DIRECTORY | os.O_CLOEXEC)
    try:
        q = _Query(target_fd=fd, attach_type=_BPF_CGROUP_DEVICE)
        _bpf(_BPF_PROG_QUERY, q)
        return int(q.prog_cnt)
    finally:
        os.close(fd)


def supported() -> bool:
    """Whether this kernel loads a device program for us (CONFIG_CGROUP_BPF, and we may use bpf(2))."""
    try:
        os.close(load([Rule("c", 1, 3, "rwm")]))
    except OSError:
        return False
    return True
