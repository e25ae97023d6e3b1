"""Runs ``python -m specext.analyze ARGS`` and SIGKILLs itself right after a checkpoint:

    python tests/kill_at_checkpoint.py STAGE N -- ARGS...

``STAGE`` is ``scoring`` (kill after chunk N's checkpoint) or ``pss`` (after N + 1 PSS
concepts are checkpointed). The kill-and-resume tests use it: a real SIGKILL, no test hook
in library code (``run_analysis``'s ``on_checkpoint`` callback is the public seam)."""

import os
import signal
import sys

from specext.analyze import main

stage, n = sys.argv[1], int(sys.argv[2])
assert sys.argv[3] == "--", sys.argv


def on_checkpoint(s: str, k: int) -> None:
    if s == stage and (k == n if s == "scoring" else k > n):
        os.kill(os.getpid(), signal.SIGKILL)


sys.exit(main(sys.argv[4:], on_checkpoint=on_checkpoint))
