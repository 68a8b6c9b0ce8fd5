"""runc's seccomp stub: the few instructions runc puts before libseccomp's program (pure). A dumped filter is the
reference one only if its body is the reference's byte for byte and its stub can refuse more calls, never allow
one the body refuses."""

from __future__ import annotations

BPF_LD_W_ABS, BPF_JA, BPF_RET_K = 0x20, 0x05, 0x06
BPF_COND = {0x15, 0x25, 0x35, 0x45}  # jeq, jgt, jge, jset with a constant
RET_ENOSYS = 0x00050000 | 38  # SECCOMP_RET_ERRNO | ENOSYS


def _insns(program: bytes) -> list[tuple[int, int, int, int]]:
    import struct

    return [struct.unpack_from("<HBBI", program, i) for i in range(0, len(program) - len(program) % 8, 8)]


def _stub_length(program: bytes) -> int:
    """runc's stub ends with its `ret ERRNO(ENOSYS)`; the body (libseccomp's program) starts after it."""
    for i, (code, _jt, _jf, k) in enumerate(_insns(program)[:256]):
        if code == BPF_RET_K:
            return i + 1 if k == RET_ENOSYS else 0
    return 0


def seccomp_matches(program: bytes, reference: bytes) -> bool:
    """Is `program` the reference up to runc's stub? Its libseccomp body must be the reference's byte for byte,
    and what comes before it only loads seccomp_data, jumps forward within itself or to the body's first
    instruction, and returns -ENOSYS: such a stub can refuse more calls than the body but allow none it refuses,
    whatever order runc put its blocks in."""
    if program == reference:
        return True
    n = _stub_length(reference)
    body = reference[n * 8:]
    if not body or len(program) <= len(body) or not program.endswith(body) or (len(program) - len(body)) % 8:
        return False
    stub = _insns(program[: len(program) - len(body)])
    end = len(stub)
    for i, (code, jt, jf, k) in enumerate(stub):
        if code == BPF_LD_W_ABS:
            if k >= 64 or k % 4:  # inside struct seccomp_data
                return False
        elif code == BPF_JA:
            if i + 1 + k > end:
                return False
        elif code in BPF_COND:
            if i + 1 + jt > end or i + 1 + jf > end:
                return False
        elif code == BPF_RET_K:
            if k != RET_ENOSYS:
                return False
        else:
            return False
    return True
