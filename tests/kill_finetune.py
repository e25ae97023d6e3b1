"""Runs ``python -m specext.finetune ARGS`` and SIGKILLs itself right after its N-th finished
(strategy, seed) run is on disk:

    python tests/kill_finetune.py N -- ARGS...

The kill-and-resume test uses it (a real SIGKILL; ``run_finetune``'s ``on_checkpoint`` is the
public seam, as tests/kill_at_checkpoint.py does for analyze)."""

import os
import signal
import sys

from specext.finetune import main

n = int(sys.argv[1])
assert sys.argv[2] == "--", sys.argv


def on_checkpoint(stage: str, k: int) -> None:
    if stage == "run" and k == n:
        os.kill(os.getpid(), signal.SIGKILL)


sys.exit(main(sys.argv[3:], on_checkpoint=on_checkpoint))
