"""Child processes that end with their parent, even when the parent is SIGKILLed.

A training (`python -m model.train`, torchrun) or the temporary Prefect server left running by a
killed `gptpipe run` would go on alone: training orphaned, writing checkpoints nobody waits for,
holding the machine. On Linux the child asks the kernel for a signal when its parent dies
(prctl PR_SET_PDEATHSIG); torchrun passes that SIGTERM on to its ranks. Elsewhere nothing is
done. Kept free of heavy imports: the CLI uses it before torch is loaded.
"""

from __future__ import annotations

import ctypes
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1  # <linux/prctl.h>


def _prctl():
    """libc's prctl, looked up here (in the parent): a forked child must not load libraries."""
    try:
        prctl = ctypes.CDLL(None, use_errno=True).prctl
    except (OSError, AttributeError):
        return None
    prctl.argtypes = [ctypes.c_int, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong, ctypes.c_ulong]
    prctl.restype = ctypes.c_int
    return prctl


def die_with_parent(sig: int = signal.SIGTERM) -> Callable[[], None] | None:
    """A ``preexec_fn`` for `subprocess.Popen`: the child gets ``sig`` when this process dies;
    None (no preexec_fn) where that is not available (not Linux).

    The kernel sends the signal when the *thread* that started the child ends: start it from a
    thread that outlives it (one that waits for it, or the main thread).
    """
    if not sys.platform.startswith("linux"):
        return None
    prctl = _prctl()
    if prctl is None:
        return None
    parent = os.getpid()
    number = int(sig)

    def preexec() -> None:  # runs in the child, between fork and exec: nothing but two calls
        prctl(PR_SET_PDEATHSIG, number, 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os.kill(os.getpid(), number)

    return preexec
