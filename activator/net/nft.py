"""nftables through libnftables, in process: a rule change is a library call (~1 ms), not a fork of `nft`.

The same text syntax as the `nft` command; listings come back as JSON. A tiny ctypes binding over the stable
libnftables API (nft_ctx_new, nft_run_cmd_from_buffer and the output buffers), which is what Debian's
python3-nftables wraps too; it is not used directly because it lives outside the project's venv.
"""

from __future__ import annotations

import ctypes
import json
import re
import threading
from typing import Any

from activator.errors import ActivatorError, PreflightError

_JSON = 1 << 4  # NFT_CTX_OUTPUT_JSON


class NftError(ActivatorError):
    """nftables refused a command."""


#: an interface name as nftables rule text may quote it: the kernel's limit (15 bytes), a trailing `*` for a
#: prefix match, nothing that would end the string or the rule (a quote, a newline, `;`, `}`, a blank)
_IFNAME = re.compile(r"[A-Za-z0-9_.:-]{1,15}\*?")


def ifname(name: str) -> str:
    """The name quoted for rule text; NftError (one line) for anything else, never an escaped guess."""
    if not isinstance(name, str) or not _IFNAME.fullmatch(name) or len(name) > 15:
        raise NftError(f"nftables: interface name {name!r} refused (at most 15 of A-Z a-z 0-9 _ . : -)")
    return f'"{name}"'


class Nft:
    def __init__(self, library: str = "libnftables.so.1") -> None:
        try:
            lib = ctypes.CDLL(library, use_errno=True)
        except OSError:
            raise PreflightError("libnftables (Debian package libnftables1, with nftables) is not installed; it is "
                                 "needed for instance networking; run 'make setup' or set network: none") from None
        lib.nft_ctx_new.restype = ctypes.c_void_p
        lib.nft_ctx_new.argtypes = [ctypes.c_uint32]
        lib.nft_ctx_free.argtypes = [ctypes.c_void_p]
        lib.nft_run_cmd_from_buffer.argtypes = [ctypes.c_void_p, ctypes.c_char_p]
        for fn in ("nft_ctx_buffer_output", "nft_ctx_buffer_error"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
        for fn in ("nft_ctx_get_output_buffer", "nft_ctx_get_error_buffer"):
            getattr(lib, fn).argtypes = [ctypes.c_void_p]
            getattr(lib, fn).restype = ctypes.c_char_p
        lib.nft_ctx_output_set_flags.argtypes = [ctypes.c_void_p, ctypes.c_uint]
        lib.nft_ctx_output_get_flags.argtypes = [ctypes.c_void_p]
        lib.nft_ctx_output_get_flags.restype = ctypes.c_uint
        self._lib = lib
        self._ctx = lib.nft_ctx_new(0)
        lib.nft_ctx_buffer_output(self._ctx)
        lib.nft_ctx_buffer_error(self._ctx)
        self._plain = lib.nft_ctx_output_get_flags(self._ctx) & ~_JSON
        # One context, used from the event loop and from worker threads: libnftables contexts are not thread-safe.
        self._lock = threading.Lock()

    def _run(self, cmd: str, flags: int) -> str:
        with self._lock:
            self._lib.nft_ctx_output_set_flags(self._ctx, flags)
            rc = self._lib.nft_run_cmd_from_buffer(self._ctx, cmd.encode())
            out = (self._lib.nft_ctx_get_output_buffer(self._ctx) or b"").decode(errors="replace")
            err = (self._lib.nft_ctx_get_error_buffer(self._ctx) or b"").decode(errors="replace")
        if rc != 0:
            first = next((ln for ln in err.splitlines() if ln.startswith("Error")), err.strip() or "failed")
            raise NftError(f"nftables: {first}")
        return out

    def run(self, cmd: str) -> None:
        """Run one or more commands (a transaction: all or nothing)."""
        self._run(cmd, self._plain)

    def query(self, cmd: str) -> list[dict[str, Any]]:
        """A `list ...` command's objects, from its JSON output."""
        out = self._run(cmd, self._plain | _JSON)
        items: list[dict[str, Any]] = json.loads(out)["nftables"] if out.strip() else []
        return items

    def close(self) -> None:
        with self._lock:
            if self._ctx:
                self._lib.nft_ctx_free(self._ctx)
                self._ctx = None
