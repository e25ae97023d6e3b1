"""Shared helpers for the ``bench_<kernel>.py`` scripts: timing, reference bandwidths,
table printing and the results CSV.

Run the scripts from anywhere (``python bench/bench_value_vector_norms.py``); each one
prints a header (machine, build, bandwidth), a table, and appends its rows to
``bench/results.csv`` unless ``--no-csv``.
"""

from __future__ import annotations

import argparse
import csv
import datetime as _dt
import os
import platform
import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Iterable, List, Mapping, Optional, Sequence

# torch's OpenMP threads spin-wait by default, which on virtual machines costs ~8 ms per
# parallel region (see docs/DESIGN-NOTES.md) and would slow the torch baselines unfairly.
# Read once when libgomp loads, so set before torch is imported; a user's setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import numpy as np
import torch

BENCH_DIR = Path(__file__).resolve().parent
DEFAULT_CSV = BENCH_DIR / "results.csv"

CSV_COLUMNS = (
    "date",
    "bench",
    "device_name",
    "device",
    "shape",
    "dtype",
    "extra",
    "ours_ms",
    "baseline_ms",
    "ratio",
    "gbps",
    "share_of_bw",
)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}


# ---------------------------------------------------------------------------- machine


def _cpu_count() -> int:
    try:
        return len(os.sched_getaffinity(0))  # cores this process may use, not the host's
    except AttributeError:  # pragma: no cover - not Linux
        return os.cpu_count() or 1


def machine_name(device) -> str:
    """Human-readable name of the device: the GPU's name, or the CPU model and core count."""
    device = torch.device(device)
    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    model = ""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    model = line.split(":", 1)[1].strip()
                    break
    except OSError:
        pass
    model = model or platform.processor() or platform.machine() or "unknown CPU"
    return f"{model} ({_cpu_count()} cores)"


def resolve_device(name: str) -> torch.device:
    """``"auto"`` -> cuda when torch sees a GPU, else cpu; ``"cuda"`` without a GPU raises."""
    if name == "auto":
        name = "cuda" if torch.cuda.is_available() else "cpu"
    if name == "cuda" and not torch.cuda.is_available():
        raise SystemExit("--device cuda: torch sees no CUDA device (torch %s)" % torch.__version__)
    return torch.device(name)


def available_memory_bytes(device) -> int:
    """Free memory on the device (CUDA) or MemAvailable (CPU), to skip runs that would not fit
    (:func:`specext.models.loading.free_memory_bytes`; unknown: a huge number, do not skip)."""
    from specext.models.loading import free_memory_bytes

    free = free_memory_bytes(device)
    return (1 << 62) if free is None else free


def cpu_busy_fraction(seconds: float = 1.0) -> Optional[float]:
    """Share of all CPUs busy over ``seconds`` while this process sleeps, from /proc/stat:
    the load that other processes put on the machine (None where unavailable)."""

    def read():
        with open("/proc/stat") as f:
            v = [int(x) for x in f.readline().split()[1:]]
        idle = v[3] + (v[4] if len(v) > 4 else 0)  # idle + iowait
        return sum(v[:8]), idle

    try:
        own0, (t0, i0) = time.process_time(), read()
        time.sleep(seconds)
        own1, (t1, i1) = time.process_time(), read()
    except (OSError, ValueError, IndexError):
        return None
    ticks = os.sysconf("SC_CLK_TCK")
    own = (own1 - own0) * ticks  # our own threads (e.g. OpenMP spin-waiting) do not count
    return max(0.0, 1.0 - (i1 - i0 + own) / max(t1 - t0, 1))


# ---------------------------------------------------------------------------- timing

_l2_flush_buffers: dict = {}


def _flush_l2(device: torch.device) -> None:
    # H100's L2 is 50 MB: inputs that fit would otherwise be read from cache after the
    # first repeat and report more than the memory bandwidth.
    buf = _l2_flush_buffers.get(device)
    if buf is None:
        buf = _l2_flush_buffers[device] = torch.empty(256 << 20, dtype=torch.uint8, device=device)
    buf.zero_()


def time_fn(
    fn: Callable[[], object],
    *,
    warmup: int = 2,
    repeat: int = 7,
    device,
    flush_l2: bool = True,
) -> float:
    """Median wall time of ``fn()`` in seconds over ``repeat`` runs after ``warmup`` runs.

    On CUDA each run is timed with a pair of events on the current stream (after a
    synchronize, and after overwriting L2 unless ``flush_l2=False``); on CPU with
    ``time.perf_counter``.
    """
    device = torch.device(device)
    if repeat < 1:
        raise ValueError(f"repeat must be >= 1, got {repeat}")
    for _ in range(warmup):
        fn()
    times: List[float] = []
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        for _ in range(repeat):
            if flush_l2:
                _flush_l2(device)
            start = torch.cuda.Event(enable_timing=True)
            end = torch.cuda.Event(enable_timing=True)
            start.record()
            fn()
            end.record()
            end.synchronize()
            times.append(start.elapsed_time(end) / 1e3)
    else:
        for _ in range(repeat):
            t0 = time.perf_counter()
            fn()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


# ---------------------------------------------------------------------------- bandwidths


def cpu_read_bandwidth(nbytes: int = 256 << 20, repeat: int = 5) -> float:
    """Read bandwidth in GB/s (1e9 bytes/s) of ``numpy.sum`` over a float32 array of
    ``nbytes``, median of ``repeat`` runs after one warm-up.

    numpy's sum is single-threaded whatever OPENBLAS_NUM_THREADS / OMP_NUM_THREADS say (it
    does not go through BLAS), so this is one core's streaming read rate; kernels using
    several threads can exceed it on a many-core machine (see
    :func:`cpu_read_bandwidth_threads`).
    """
    a = np.ones(nbytes // 4, dtype=np.float32)  # ones, not empty: the pages must be touched
    return _read_rate(a.sum, a.nbytes, repeat)


def _read_rate(read: Callable[[], object], nbytes: int, repeat: int) -> float:
    """GB/s of ``read()`` over ``nbytes``: one warm-up, then the median of ``repeat`` runs."""
    read()
    times = []
    for _ in range(repeat):
        t0 = time.perf_counter()
        read()
        times.append(time.perf_counter() - t0)
    return nbytes / statistics.median(times) / 1e9


def cpu_read_bandwidth_threads(nbytes: int = 256 << 20, repeat: int = 5) -> float:
    """Like :func:`cpu_read_bandwidth` but with ``torch.sum``, which uses all of torch's
    intra-op threads: the read rate a multi-threaded kernel can hope for. Informational."""
    a = torch.ones(nbytes // 4, dtype=torch.float32)
    return _read_rate(a.sum, a.numel() * 4, repeat)


def gpu_copy_bandwidth(device, nbytes: int = 1 << 30, repeat: int = 10) -> float:
    """Device-to-device copy bandwidth in GB/s of a ``nbytes`` tensor, counting the bytes
    read and the bytes written (``2 * nbytes / time``)."""
    device = torch.device(device)
    src = torch.empty(nbytes, dtype=torch.uint8, device=device).fill_(1)
    dst = torch.empty_like(src)
    t = time_fn(lambda: dst.copy_(src), warmup=3, repeat=repeat, device=device, flush_l2=False)
    del src, dst
    torch.cuda.empty_cache()
    return 2 * nbytes / t / 1e9


@dataclass
class Bandwidth:
    """The machine's reference bandwidth for the ``share_of_bw`` column, in GB/s."""

    gbps: float
    what: str  # how it was measured, for the header


def reference_bandwidth(device) -> Bandwidth:
    device = torch.device(device)
    if device.type == "cuda":
        return Bandwidth(gpu_copy_bandwidth(device), "device-to-device copy of 1 GiB, read+write bytes")
    return Bandwidth(cpu_read_bandwidth(), "numpy float32 sum of 256 MiB, single-threaded")


# ---------------------------------------------------------------------------- output


def source_revision() -> str:
    """``git describe`` of the checkout the benchmark runs from (``-dirty`` when edited),
    or ``"unknown"``: the numbers belong to that state of csrc/."""
    import subprocess

    try:
        out = subprocess.run(
            ["git", "describe", "--always", "--dirty", "--abbrev=12"],
            cwd=BENCH_DIR, capture_output=True, text=True, timeout=10, check=True,
        )
        return out.stdout.strip() or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"


def time_pairs(n: int, rnd: int, own: Callable[[int], object], base: Callable[[int], object],
               timed: Callable[[Callable[[], object]], float]) -> tuple:
    """One round of paired timing: for each batch ``i < n``, ``own(i)`` and ``base(i)`` timed
    back to back by ``timed``, which one goes first alternating with ``i + rnd`` (so that
    neither always meets the caches the other left). Returns the two lists of times, the
    ``own[r]`` / ``base[r]`` of :func:`paired_excess`."""
    o, b = [], []
    for i in range(n):
        if (i + rnd) % 2 == 0:
            b.append(timed(lambda: base(i)))
            o.append(timed(lambda: own(i)))
        else:
            o.append(timed(lambda: own(i)))
            b.append(timed(lambda: base(i)))
    return o, b


def paired_excess(own: Sequence[Sequence[float]], base: Sequence[Sequence[float]],
                  rounds: Optional[Sequence[int]] = None) -> float:
    """What ``own`` costs beyond ``base``, measured in pairs: ``own[r][i]`` and ``base[r][i]``
    are the times of batch ``i`` in round ``r``, timed next to each other. Per batch the
    median over rounds of the difference, summed over batches: a stall of the machine in one
    batch of one round does not move it. ``rounds``: the rounds to use (a bootstrap
    resample, repeats allowed), default all."""
    rounds = range(len(own)) if rounds is None else rounds
    n = len(own[0])
    return sum(statistics.median(own[k][i] - base[k][i] for k in rounds) for i in range(n))


def paired_total(times: Sequence[Sequence[float]], rounds: Optional[Sequence[int]] = None) -> float:
    """Per batch the median over rounds, summed: the total that :func:`paired_excess` is
    an excess over."""
    rounds = range(len(times)) if rounds is None else rounds
    return sum(statistics.median(times[k][i] for k in rounds) for i in range(len(times[0])))


def bootstrap(stat: Callable[[Sequence[int]], float], rounds: int, n: int = 1000, seed: int = 0):
    """95% interval ``(lo, hi)`` of ``stat(rounds resampled with replacement)``; quantities
    resampled together share the same rounds (their runs of a round are adjacent in time)."""
    import random

    rng = random.Random(seed)
    vals = sorted(stat([rng.randrange(rounds) for _ in range(rounds)]) for _ in range(n))
    return vals[int(0.025 * n)], vals[int(0.975 * n) - 1]


@dataclass
class KernelBench:
    """What every kernel benchmark's ``main()`` starts from (:func:`start_kernel_bench`)."""

    device: torch.device
    bw: "Bandwidth"
    cpu: bool
    base_warmup: int  # runs of the torch baseline: fewer on a CPU, where its float64
    base_repeat: int  # accumulation is slow, than on a GPU


def start_kernel_bench(args, title: str) -> KernelBench:
    """Resolve ``--device``, seed everything, print the header (:func:`start`) and pick the
    baseline's warm-up and timed runs: (1, 3) on a CPU, (2, 7) on a GPU."""
    device = resolve_device(args.device)
    seed_all(0)
    bw = start(title, device)
    cpu = device.type == "cpu"
    warmup, repeat = (1, 3) if cpu else (2, 7)
    return KernelBench(device, bw, cpu, warmup, repeat)


def start(title: str, device: torch.device) -> Bandwidth:
    """Measure the background load and the reference bandwidth, print the header (machine,
    versions, build, bandwidth) and return the bandwidth for the ``share_of_bw`` column."""
    import specext

    try:  # model-loading progress bars would interleave with the tables
        import transformers

        transformers.utils.logging.disable_progress_bar()
    except ImportError:
        pass
    # Another process on the same cores stalls every OpenMP barrier for a scheduler time
    # slice (milliseconds): measured first, before this process starts any threads.
    busy = cpu_busy_fraction() if device.type == "cpu" else None
    bw = reference_bandwidth(device)
    print(f"# {title}")
    print(f"device:       {device.type} - {machine_name(device)}")
    print(f"torch:        {torch.__version__} (intra-op threads {torch.get_num_threads()})")
    print(f"numpy:        {np.__version__}")
    print(f"build_info(): {specext.build_info()}")
    print(f"source:       {source_revision()}")
    print(f"bandwidth:    {bw.gbps:.1f} GB/s ({bw.what})")
    if device.type == "cpu":
        print(f"              {cpu_read_bandwidth_threads():.1f} GB/s (torch.sum, {torch.get_num_threads()} threads; informational)")
        load = "%.2f %.2f %.2f" % os.getloadavg() if hasattr(os, "getloadavg") else "?"
        busy_s = "?" if busy is None else f"{100 * busy:.0f}%"
        print(f"other load:   {busy_s} of all cores busy in the 1 s before the run; load avg {load}")
    print(f"date:         {_dt.datetime.now().isoformat(timespec='seconds')}")
    print()
    sys.stdout.flush()
    return bw


def _fmt(v, missing: str) -> str:
    if v is None:
        return missing
    if isinstance(v, float):
        if v != v:
            return "nan"
        if abs(v) >= 100:
            return f"{v:.0f}"
        if abs(v) >= 10:
            return f"{v:.1f}"
        if abs(v) >= 1:
            return f"{v:.2f}"
        return f"{v:.3f}"
    return str(v)


def print_table(rows: Sequence[Mapping], columns: Sequence, *, missing: str = "skipped") -> None:
    """Print ``rows`` (dicts) as an aligned text table.

    ``columns``: keys, or ``(key, heading)`` pairs. Numbers are right-aligned, text
    left-aligned; ``None`` prints as ``missing``.
    """
    cols = [(c, c) if isinstance(c, str) else tuple(c) for c in columns]
    cells = [[_fmt(r.get(k), missing) for k, _ in cols] for r in rows]
    numeric = [all(isinstance(r.get(k), (int, float)) or r.get(k) is None for r in rows) for k, _ in cols]
    widths = [max([len(h)] + [len(row[i]) for row in cells]) for i, (_, h) in enumerate(cols)]

    def line(items):
        return "  ".join(s.rjust(w) if num else s.ljust(w) for s, w, num in zip(items, widths, numeric)).rstrip()

    print(line([h for _, h in cols]))
    print("  ".join("-" * w for w in widths))
    for row in cells:
        print(line(row))
    sys.stdout.flush()
    save_table_cells(rows, cols)


_TABLES_WRITTEN = 0


def save_table_cells(rows: Sequence[Mapping], columns: Sequence) -> None:
    """When ``$SPECEXT_TABLES_CSV`` names a file, append every cell of a printed table to it,
    one a row (``source, table, row, column, value``: the script, the table's number within
    this process, the row's number, the column's heading): scripts/gpu_check.sh sets it so
    that everything a device run prints comes back as CSV, whatever each table's columns."""
    global _TABLES_WRITTEN
    path = os.environ.get("SPECEXT_TABLES_CSV")
    if not path:
        return
    from specext.pipelines.rundir import csv_cell

    cols = [(c, c) if isinstance(c, str) else tuple(c) for c in columns]
    _TABLES_WRITTEN += 1
    source = Path(sys.argv[0]).stem or "python"
    new = not os.path.exists(path) or os.path.getsize(path) == 0
    with open(path, "a", newline="") as f:
        w = csv.writer(f)
        if new:
            w.writerow(["source", "table", "row", "column", "value"])
        for i, r in enumerate(rows):
            for k, heading in cols:
                w.writerow([source, _TABLES_WRITTEN, i, heading, csv_cell(_csv_value(r.get(k)))])


def _csv_value(v):
    if v is None:
        return ""
    if isinstance(v, float):
        return f"{v:.6g}"
    return v


def append_csv(path, rows: Iterable[Mapping], *, device: Optional[torch.device] = None) -> None:
    """Append ``rows`` to the CSV at ``path`` (header written when the file is new or empty).

    Each row supplies the :data:`CSV_COLUMNS` it knows; ``date``, ``device`` and
    ``device_name`` are filled in from ``device`` where missing. Other keys are ignored.
    Cells go through specext's one CSV-injection guard (``rundir.csv_cell``): the rows are
    our own fields, but a method or device name is a string from elsewhere.
    """
    from specext.pipelines.rundir import csv_cell

    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    new = not path.exists() or path.stat().st_size == 0
    now = _dt.datetime.now().isoformat(timespec="seconds")
    defaults = {"date": now}
    if device is not None:
        defaults["device"] = torch.device(device).type
        defaults["device_name"] = machine_name(device)
    with path.open("a", newline="") as f:
        w = csv.DictWriter(f, fieldnames=CSV_COLUMNS, extrasaction="ignore")
        if new:
            w.writeheader()
        for r in rows:
            w.writerow({k: csv_cell(_csv_value(v)) for k, v in {**defaults, **r}.items()})


# ---------------------------------------------------------------------------- rows


@dataclass
class Measurement:
    """One benchmark row. Times in milliseconds; ``gbps`` is bytes read by our kernel per
    second (1e9); ``baseline_ms`` is ``None`` when the baseline was skipped."""

    bench: str
    shape: str
    dtype: str
    extra: str
    ours_ms: float
    baseline_ms: Optional[float]
    bytes_read: int
    bw_gbps: float

    @property
    def ratio(self) -> Optional[float]:
        return None if self.baseline_ms is None else self.baseline_ms / self.ours_ms

    @property
    def gbps(self) -> float:
        return self.bytes_read / (self.ours_ms / 1e3) / 1e9

    def as_row(self, **display) -> dict:
        """The CSV columns plus any display-only ``display`` columns."""
        return {
            "bench": self.bench,
            "shape": self.shape,
            "dtype": self.dtype,
            "extra": self.extra,
            "ours_ms": self.ours_ms,
            "baseline_ms": self.baseline_ms,
            "ratio": self.ratio,
            "gbps": self.gbps,
            "share_of_bw": self.gbps / self.bw_gbps,
            **display,
        }


def shape_str(shape) -> str:
    return "x".join(str(int(s)) for s in shape)


def dtype_str(dtype: torch.dtype) -> str:
    return str(dtype).replace("torch.", "")


def seed_all(seed: int = 0) -> None:
    torch.manual_seed(seed)  # seeds CUDA too
    np.random.seed(seed)


def sync(device) -> None:
    if torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)


# ---------------------------------------------------------------------------- CLI


# The columns every kernel benchmark ends its table with.
RESULT_COLUMNS = [
    ("ours_ms", "ours ms"),
    ("baseline_ms", "torch ms"),
    ("ratio", "torch/ours"),
    ("gbps", "GB/s"),
    ("share_of_bw", "share of bw"),
]


def make_parser(description: str) -> argparse.ArgumentParser:
    """The options every benchmark takes; scripts may add their own."""
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--device", choices=("cpu", "cuda", "auto"), default="auto",
                   help="where to run (auto: cuda when torch sees a GPU, else cpu)")
    p.add_argument("--quick", action="store_true", help="small shapes, for a smoke run")
    p.add_argument("--csv", default=str(DEFAULT_CSV), metavar="PATH",
                   help="append results here (default: %(default)s)")
    p.add_argument("--no-csv", action="store_true", help="do not write the CSV")
    return p


def finish(args, device: torch.device, rows: Sequence[Mapping], columns: Sequence) -> None:
    """Print the table and append the rows to the CSV (unless ``--no-csv``)."""
    print_table(rows, columns)
    if not args.no_csv:
        append_csv(args.csv, rows, device=device)
        print(f"\nappended {len(rows)} rows to {args.csv}")


def progress(iterable, **kw):
    """tqdm on stderr when it is installed and stderr is a terminal; the bare iterable otherwise."""
    try:
        from tqdm import tqdm
    except ImportError:  # pragma: no cover
        return iterable
    return tqdm(iterable, file=sys.stderr, disable=None, leave=False, **kw)
