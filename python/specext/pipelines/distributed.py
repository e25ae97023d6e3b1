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
from pathlib import Path
from typing import Any, Dict, Iterator, List, Optional, Tuple, Union

import torch

logger = logging.getLogger(__name__)


@dataclass
class Dist:
    """This process's place in the run: ``rank`` of ``world`` (``local_rank`` on its node)."""

    rank: int = 0
    world: int = 1
    local_rank: int = 0
    timeout_s: float = 1800.0
    local_world: int = 1  # ranks on this node (LOCAL_WORLD_SIZE)

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
                elif t.device.type == "cuda" and t.device.index != torch.cuda.current_device():
                    # a rank with a device map holds tensors on several of its cards: NCCL
                    # reduces on the rank's own device (the first of its slice)
                    tmp = t.to(torch.device("cuda", torch.cuda.current_device()))
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
    local_world = int(os.environ.get("LOCAL_WORLD_SIZE", world) or world)
    return Dist(rank=rank, world=world, local_rank=local, timeout_s=timeout_s, local_world=local_world)


def rank_device(d: Dist, device: str, device_map: Optional[str] = None) -> str:
    """The rank's device: ``cuda:LOCAL_RANK`` when the run asks for CUDA (``auto`` with CUDA
    present, or ``cuda``); anything explicit (``cpu``, ``cuda:N``) is kept. With a device map
    (``device_map``): the first card of the rank's slice (:func:`rank_gpus`), where its NCCL
    collectives run, or ``cpu`` for a rank without GPUs."""
    if device_map is not None:
        gpus = rank_gpus(d, device, device_map)
        return f"cuda:{gpus[0]}" if gpus else "cpu"
    if d.active and device in ("auto", "cuda") and torch.cuda.is_available():
        return f"cuda:{d.local_rank % torch.cuda.device_count()}"
    return device


def rank_gpus(d: Dist, device: str, device_map: Optional[str]) -> Optional[List[int]]:
    """With ``--device-map`` under torchrun on GPUs (``--device auto``): this rank's cards,
    the contiguous slice ``[LOCAL_RANK * k, (LOCAL_RANK + 1) * k)`` of the node's
    ``torch.cuda.device_count()`` cards, ``k = device_count // LOCAL_WORLD_SIZE`` (8 cards, 2
    ranks a node: ranks 0 and 1 map over cards 0-3 and 4-7). None: no map, one process, the
    CPU (``--device cpu``, or no CUDA). Fewer cards than ranks on the node is an error."""
    if device_map is None or not d.active or device != "auto" or not torch.cuda.is_available():
        return None
    n = torch.cuda.device_count()
    k = n // max(d.local_world, 1)
    if k < 1:
        raise ValueError(f"--device-map under torchrun: {d.local_world} ranks on this node but {n} GPU(s); each rank "
                         "maps its model over its own cards, so give at most one rank per GPU (--nproc_per_node)")
    if d.local_rank == 0 and n % d.local_world:
        logger.warning("--device-map: %d GPUs for %d ranks a node: %d card(s) unused", n, d.local_world,
                       n % d.local_world)
    return list(range(d.local_rank * k, (d.local_rank + 1) * k))


def load_options(d: Dist, device: str, device_map: Optional[str], max_memory: Optional[Union[str, dict]],
                 offload_dir: Optional[Union[str, Path]]) -> Dict[str, Any]:
    """``load_model``'s placement options for this rank (``device``, ``device_map``,
    ``max_memory``, ``offload_dir``). One process, or no device map: as given (the device
    made the rank's own, :func:`rank_device`). Under torchrun with ``--device-map`` each rank
    maps its own model, within its own budget:

    - GPUs: its slice of the node's cards (:func:`rank_gpus`); ``--max-memory`` GPU keys are
      *relative to the slice* (``0`` is the slice's first card, on every rank) and are
      translated to the node's indices; a key past the slice is an error.
    - ``cpu=SIZE`` is each rank's own host budget. Without ``--max-memory`` a rank gets its
      cards' free memory and ``1 / LOCAL_WORLD_SIZE`` of the host memory available now (the
      ranks of a node share it).
    - ``--offload-dir DIR``: each rank offloads into ``DIR/rank-R`` (ranks never write the
      same files)."""
    if device_map is None or not d.active:
        dev = rank_device(d, device) if device_map is None else device
        return {"device": dev, "device_map": device_map, "max_memory": max_memory, "offload_dir": offload_dir}
    from specext.models.loading import parse_max_memory

    budget = parse_max_memory(max_memory) if max_memory is None or isinstance(max_memory, str) else dict(max_memory)
    gpus = rank_gpus(d, device, device_map)
    if budget is None:
        from accelerate.utils import get_max_memory

        free = get_max_memory()
        budget = {g: free[g] for g in (gpus or []) if g in free}
        budget["cpu"] = int(free["cpu"]) // max(d.local_world, 1)
    elif gpus is not None:
        rel = [k for k in budget if isinstance(k, int)]
        bad = [k for k in rel if k >= len(gpus)]
        if bad:
            raise ValueError(f"--max-memory under torchrun: GPU keys are relative to each rank's {len(gpus)} card(s) "
                             f"(0-{len(gpus) - 1}; rank {d.rank} has cards {gpus}), got {bad}")
        budget = {(gpus[k] if isinstance(k, int) else k): v for k, v in budget.items()}
    off = Path(offload_dir) / f"rank-{d.rank}" if offload_dir is not None else None
    logger.info("%s: device map over %s, budget %s%s", d, f"GPUs {gpus}" if gpus else "the CPU", budget,
                f", offload folder {off}" if off else "")
    return {"device": device, "device_map": device_map, "max_memory": budget, "offload_dir": off}


@contextlib.contextmanager
def session(timeout_s: float = 1800.0, device: str = "auto", device_map: Optional[str] = None) -> Iterator[Dist]:
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
    main = rank_device(d, device, device_map)  # with a device map: the first card of the rank's slice
    cuda = torch.cuda.is_available() and main.startswith("cuda")
    if cuda:
        torch.cuda.set_device(torch.device(main) if ":" in main else d.local_rank % torch.cuda.device_count())
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
