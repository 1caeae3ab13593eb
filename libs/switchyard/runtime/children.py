"""Child processes that do not outlive their parent."""

from __future__ import annotations

import ctypes
import os
import shutil
import signal
import threading
from pathlib import Path
from typing import Any

PR_SET_PDEATHSIG = 1
_SETPRIV = shutil.which("setpriv")


def die_with_parent() -> None:
    """Runs in the child before exec: SIGTERM it when the parent exits (Linux), so a killed
    `switchyard up` or test run leaves no orphans."""
    try:
        ctypes.CDLL("libc.so.6", use_errno=True).prctl(PR_SET_PDEATHSIG, signal.SIGTERM)
    except OSError:
        pass


def orphan_proof(argv: list[str]) -> tuple[list[str], dict[str, Any]]:
    """(argv, Popen keyword arguments) for a child that gets SIGTERM when its parent dies.

    With util-linux's `setpriv --pdeathsig` the child sets that itself after the fork, so no
    Python runs between fork and exec: a `preexec_fn` is unsafe in a process with other threads
    (gRPC's, the stack supervisor's) — a restart from the supervisor thread segfaulted in the
    forked child. Without setpriv, `preexec_fn` is used from the main thread only."""
    if _SETPRIV:
        return [_SETPRIV, "--pdeathsig", "TERM", "--", *argv], {}
    if threading.current_thread() is threading.main_thread():
        return argv, {"preexec_fn": die_with_parent}
    return argv, {}


def cpu_seconds(pid: int) -> float:
    """CPU time (user + system) a live process has used so far, from /proc (Linux): what a
    benchmark charges each process of the stack per token."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")  # utime + stime
