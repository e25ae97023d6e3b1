"""Data parallelism for ``torchrun --nproc_per_node N -m specext.analyze``: who this process
is, the process group (with a timeout), which share of the work is its own, and the
collectives that merge the shares (DESIGN.md §5; docs/DESIGN-NOTES.md "Data parallel").

Without ``WORLD_SIZE`` (or with ``WORLD_SIZE=1``) nothing here creates a process group and
every helper is the identity: the single-process path is unchanged.

Failure is bounded: the group is created with a timeout (``--dist-timeout``) that every
gloo/NCCL collective honours; torchrun itself tears the whole group down as soon as one
worker exits non-zero or dies; a collective that fails raises an error naming this rank,
what it was doing and the cause.
"""

from __future__ import annotations

import contextlib
import logging
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Any, Dict, Iterator, List, Optional, Tuple

import torch

logger = logging.getLogger(__name__)


@dataclass
class Dist:
    """This process's place in the run: ``rank`` of ``world`` (``local_rank`` on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout_s: float = 1800.0

    @property
    def active(self) -> bool:
        return self.world > 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    def __str__(self) -> str:
        return f"rank {self.rank} of {self.world}"

    # ------------------------------------------------------------------ work shares

    def chunk_range(self, n: int, chunk: int) -> Tuple[int, int]:
        """This rank's contiguous block of ``[0, n)``, cut at multiples of ``chunk`` (whole
        chunks, so that every batch holds the questions it holds in a single-process run):
        rank ``r`` of ``w`` gets chunks ``[r*C//w, (r+1)*C//w)`` of the ``C`` chunks."""
        n_chunks = -(-n // chunk)
        lo = self.rank * n_chunks // self.world
        hi = (self.rank + 1) * n_chunks // self.world
        return min(lo * chunk, n), min(hi * chunk, n)

    def share(self, items: List[Any]) -> List[Any]:
        """Round-robin share of ``items`` (item ``i`` goes to rank ``i % world``)."""
        return list(items[self.rank :: self.world])

    # ------------------------------------------------------------------ collectives

    @contextlib.contextmanager
    def _collective(self, what: str) -> Iterator[None]:
        try:
            yield
        except Exception as e:  # gloo: connection reset / timeout; NCCL: watchdog errors
            raise RuntimeError(f"{self}: {what} failed (a peer rank died, raised, or did not arrive within "
                               f"{self.timeout_s:g} s): {type(e).__name__}: {e}") from e

    def all_reduce_(self, tensors: Dict[str, torch.Tensor], what: str) -> None:
        """Sum each tensor over ranks, in place. A CPU tensor on an NCCL-only group travels via
        the rank's GPU."""
        if not self.active:
            return
        import torch.distributed as dist

        with self._collective(f"summing {what}"):
            for t in tensors.values():
                if t.device.type == "cpu" and not _has_cpu_backend():
                    dev = torch.device("cuda", torch.cuda.current_device())
                    tmp = t.to(dev)
                    dist.all_reduce(tmp)
                    t.copy_(tmp)
                else:
                    dist.all_reduce(t)

    def all_gather(self, obj: Any, what: str) -> List[Any]:
        """Every rank's ``obj``, in rank order (``[obj]`` without a group)."""
        if not self.active:
            return [obj]
        import torch.distributed as dist

        out: List[Any] = [None] * self.world
        with self._collective(f"gathering {what}"):
            dist.all_gather_object(out, obj)
        return out

    def broadcast(self, obj: Any, what: str) -> Any:
        """Rank 0's ``obj`` on every rank."""
        if not self.active:
            return obj
        import torch.distributed as dist

        box = [obj]
        with self._collective(f"broadcasting {what}"):
            dist.broadcast_object_list(box, src=0)
        return box[0]

    def barrier(self, what: str) -> None:
        """Wait for every rank, at most the timeout. With gloo, ``monitored_barrier`` names
        the ranks that did not arrive."""
        if not self.active:
            return
        import torch.distributed as dist

        with self._collective(f"waiting for every rank ({what})"):
            if _has_cpu_backend():
                dist.monitored_barrier(timeout=timedelta(seconds=self.timeout_s), wait_all_ranks=True)
            else:
                dist.barrier()


def _has_cpu_backend() -> bool:
    import torch.distributed as dist

    try:
        return "gloo" in str(dist.get_backend())
    except Exception:  # noqa: BLE001  (no group)
        return False


def from_env(timeout_s: float = 1800.0) -> Dist:
    """Rank and world from torchrun's environment (``RANK``, ``WORLD_SIZE``, ``LOCAL_RANK``)."""
    world = int(os.environ.get("WORLD_SIZE", "1") or 1)
    if world <= 1:
        return Dist(timeout_s=timeout_s)
    rank = int(os.environ["RANK"])
    local = int(os.environ.get("LOCAL_RANK", rank))
    return Dist(rank=rank, world=world, local_rank=local, timeout_s=timeout_s)


def rank_device(d: Dist, device: str) -> str:
    """The rank's device: ``cuda:LOCAL_RANK`` when the run asks for CUDA (``auto`` with CUDA
    present, or ``cuda``); anything explicit (``cpu``, ``cuda:N``) is kept."""
    if d.active and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{d.local_rank % torch.cuda.device_count()}"
    return device


@contextlib.contextmanager
def session(timeout_s: float = 1800.0, device: str = "auto") -> Iterator[Dist]:
    """The process group for one run (gloo on CPU; gloo for CPU tensors and NCCL for CUDA ones
    when the ranks use GPUs), created with ``timeout_s`` and destroyed on the way out. Nothing
    is created when ``WORLD_SIZE`` is unset or 1, or when a group already exists (the caller's)."""
    d = from_env(timeout_s)
    if not d.active:
        yield d
        return
    import torch.distributed as dist

    if dist.is_initialized():
        d.rank, d.world = dist.get_rank(), dist.get_world_size()
        yield d
        return
    cuda = torch.cuda.is_available() and rank_device(d, device).startswith("cuda")
    if cuda:
        torch.cuda.set_device(d.local_rank % torch.cuda.device_count())
    backend = "cpu:gloo,cuda:nccl" if cuda else "gloo"
    try:
        dist.init_process_group(backend=backend, timeout=timedelta(seconds=timeout_s))
    except Exception as e:
        raise RuntimeError(f"{d}: could not join the process group ({backend}) within {timeout_s:g} s: "
                           f"{type(e).__name__}: {e}") from e
    logger.info("distributed: %s (%s, timeout %g s)", d, backend, timeout_s)
    try:
        yield d
    finally:
        with contextlib.suppress(Exception):
            dist.destroy_process_group()
