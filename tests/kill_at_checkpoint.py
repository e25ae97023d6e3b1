"""Runs ``python -m specext.analyze ARGS`` and SIGKILLs itself right after a checkpoint:

    python tests/kill_at_checkpoint.py STAGE N -- ARGS...

``STAGE`` is ``scoring`` (kill after chunk N's checkpoint) or ``pss`` (after N + 1 PSS
concepts are checkpointed). The kill-and-resume tests use it: a real SIGKILL, no test hook
in library code (``run_analysis``'s ``on_checkpoint`` callback is the public seam).

Under torchrun, ``SPECEXT_KILL_RANK=R`` limits the kill to rank R (the others run on)."""

import os
import signal
import sys

from specext.analyze import main

stage, n = sys.argv[1], int(sys.argv[2])
assert sys.argv[3] == "--", sys.argv


only_rank = os.environ.get("SPECEXT_KILL_RANK")


def on_checkpoint(s: str, k: int) -> None:
    if only_rank is not None and os.environ.get("RANK", "0") != only_rank:
        return
    if s == stage and (k == n if s == "scoring" else k > n):
        os.kill(os.getpid(), signal.SIGKILL)


sys.exit(main(sys.argv[4:], on_checkpoint=on_checkpoint))
