"""The CUDA kernels of csrc/, run on the CPU under an emulation of the CUDA execution model.

No GPU is lent to most of this project's machines, CI's included, so the CUDA kernels would
otherwise never run before a device session. This module compiles the unchanged
``csrc/*_cuda.cu`` sources as C++ against ``tests/cuda_emu/cuda_runtime.h`` (launches
rewritten into calls of the emulator), together with the unchanged binding and CPU kernels,
into a private copy of ``specext._native``. :func:`emulated` then routes ``specext.ops``
through it, with every tensor's DLPack capsule relabelled as ``cuda:0``: the binding takes
its CUDA branch (device checks, device guard, stream argument) and the CUDA kernels run on
host memory. What this proves and what it cannot (timing, real concurrency, the hardware's
memory model) is written in docs/testing.md.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import importlib.util
import os
import re
import shutil
import subprocess
import sys
import sysconfig
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
CSRC = ROOT / "csrc"
EMU = Path(__file__).resolve().parent / "cuda_emu"

CPU_SOURCES = ["bindings.cpp", "cpu_dispatch.cpp", "parallel.cpp", "cpu_isa_scalar.cpp",
               "accumulate_cpu.cpp", "specialization_cpu.cpp", "norms_cpu.cpp"]
CUDA_SOURCES = ["cuda_common.cu", "accumulate_cuda.cu", "specialization_cuda.cu", "norms_cuda.cu"]
# Thread order between barriers; "shuffle-blocks" also runs the blocks in a seeded order.
SCHEDULES = {"forward": 0, "reverse": 1, "shuffle": 2, "shuffle-blocks": 3}

# kernel<T, S><<<grid, block[, shared[, stream]]>>>(args...)
_LAUNCH = re.compile(r"([A-Za-z_][\w:]*(?:<[^<>;(){}]*>)?)\s*<<<(.+?)>>>\s*\((\s*\))?")


def translate(source: str, name: str) -> str:
    """The .cu text with every kernel launch rewritten into ``::specext_emu::launch``."""
    expected = source.count("<<<")

    def launch(m: re.Match) -> str:
        kernel, config, empty = m.group(1), m.group(2), m.group(3)
        head = f"::specext_emu::launch(::specext_emu::Config({config}), {kernel}"
        return head + ")" if empty else head + ", "

    out, n = _LAUNCH.subn(launch, source)
    if n != expected or "<<<" in out:
        raise RuntimeError(f"{name}: rewrote {n} of {expected} kernel launches; extend the pattern in {__file__}")
    return f'#line 1 "{name}"\n' + out


def missing_tools() -> str:
    """What the emulator cannot be built without, or "" when everything is there: g++,
    pybind11's headers, and Linux (ucontext fibers, the ELF section of the shared arrays)."""
    missing = []
    if not sys.platform.startswith("linux"):
        missing.append("Linux")
    if shutil.which("g++") is None:
        missing.append("g++")
    if importlib.util.find_spec("pybind11") is None:
        missing.append("pybind11")
    return ", ".join(missing)


def _flags() -> list:
    import pybind11

    return ["-std=c++17", "-O1", "-g", "-fPIC", "-pthread", "-ffp-contract=off", "-fno-math-errno",
            "-fno-trapping-math", "-Wall", "-Wextra", "-Wno-unused-parameter", "-Wno-unknown-pragmas",
            f"-I{EMU}", f"-I{CSRC}", f"-I{pybind11.get_include()}", f"-I{sysconfig.get_paths()['include']}",
            "-DSPECEXT_WITH_CUDA=1", "-DSPECEXT_CUDA_ARCHS=emulated"]


def _inputs():
    files = [CSRC / f for f in CPU_SOURCES + CUDA_SOURCES] + sorted(CSRC.glob("*.h")) + sorted(CSRC.glob("*.cuh"))
    files += sorted(EMU.iterdir())
    return [f for f in files if f.is_file()]


def build(compiler: str = "g++", extra_flags: tuple = (), tag: str = "") -> Path:
    """Compile the emulated module (cached under build/cuda-emu/ by a hash of every input)
    and return its path. Raises RuntimeError with the compiler's output on failure."""
    flags = _flags() + list(extra_flags)
    h = hashlib.sha256()
    for f in _inputs():
        h.update(f.name.encode() + b"\0" + f.read_bytes() + b"\0")
    h.update(" ".join([compiler, sys.version] + flags).encode())
    out_dir = ROOT / "build" / "cuda-emu" / f"{tag}{h.hexdigest()[:16]}"
    so = out_dir / ("_native" + sysconfig.get_config_var("EXT_SUFFIX"))
    if so.exists():
        return so
    work = out_dir.with_name(out_dir.name + f".tmp{os.getpid()}")
    shutil.rmtree(work, ignore_errors=True)
    work.mkdir(parents=True)
    jobs = []
    for f in CPU_SOURCES:
        jobs.append((CSRC / f, work / (f + ".o")))
    for f in CUDA_SOURCES + ["selftest.cu"]:
        src = (EMU if f == "selftest.cu" else CSRC) / f
        cpp = work / (f + ".cpp")
        cpp.write_text(translate(src.read_text(), str(src.relative_to(ROOT))))
        jobs.append((cpp, work / (f + ".o")))
    jobs.append((EMU / "runtime.cpp", work / "runtime.o"))

    def compile_one(job):
        src, obj = job
        r = subprocess.run([compiler, *flags, "-c", str(src), "-o", str(obj)], capture_output=True, text=True)
        return src, r

    with ThreadPoolExecutor(max_workers=max(1, min(4, os.cpu_count() or 1))) as pool:
        for src, r in pool.map(compile_one, jobs):
            if r.returncode != 0:
                raise RuntimeError(f"compiling {src} for the CUDA emulator failed:\n{r.stdout}{r.stderr}")
    objs = [str(o) for _, o in jobs]
    r = subprocess.run([compiler, *flags, "-shared", *objs, "-o", str(work / so.name)], capture_output=True, text=True)
    if r.returncode != 0:
        raise RuntimeError(f"linking the CUDA emulator failed:\n{r.stdout}{r.stderr}")
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    try:
        work.rename(out_dir)
    except OSError:  # another process built the same inputs first
        shutil.rmtree(work, ignore_errors=True)
    return so


class Emulator:
    """The loaded emulated module, its ctypes controls, and the DLPack relabelling."""

    def __init__(self, so: Path):
        spec = importlib.util.spec_from_file_location("specext_cuda_emulator._native", so)
        self.native = importlib.util.module_from_spec(spec)
        spec.loader.exec_module(self.native)
        self.lib = ctypes.CDLL(str(so))  # the same loaded image: its globals are the module's
        self.lib.specext_emu_set_schedule.argtypes = [ctypes.c_int, ctypes.c_ulonglong]
        self.lib.specext_emu_set_max_grid_y.argtypes = [ctypes.c_uint]
        self.lib.specext_emu_counters.argtypes = [ctypes.POINTER(ctypes.c_longlong)]
        self.lib.specext_emu_last_grid.argtypes = [ctypes.POINTER(ctypes.c_uint)]
        self.lib.specext_emu_selftest_exchange.argtypes = [ctypes.c_void_p, ctypes.c_int, ctypes.c_int]
        self.lib.specext_emu_selftest_bad_launch.argtypes = [ctypes.c_void_p]

    def schedule(self, order: str = "forward", seed: int = 1) -> None:
        self.lib.specext_emu_set_schedule(SCHEDULES[order], seed)

    def max_grid_y(self, y: int) -> None:
        self.lib.specext_emu_set_max_grid_y(y)

    def counters(self) -> dict:
        buf = (ctypes.c_longlong * 6)()
        self.lib.specext_emu_counters(buf)
        return dict(zip(["launches", "syncs", "mallocs", "copies", "memsets", "barriers"], list(buf)))

    def last_grid(self) -> tuple:
        """(x, y, z) of the last kernel launch, as its launcher sized it."""
        buf = (ctypes.c_uint * 3)()
        self.lib.specext_emu_last_grid(buf)
        return tuple(buf)

    def reset_counters(self) -> None:
        self.lib.specext_emu_reset_counters()

    @contextlib.contextmanager
    def routing(self):
        """Within the block, ``specext.ops`` on CPU tensors runs the emulated CUDA kernels."""
        from specext.kernels import ops

        orig_load, orig_capsule = ops._load_native, ops._capsule

        def capsule(x):
            cap = orig_capsule(x)
            _relabel_cuda(cap)
            return cap

        ops._load_native, ops._capsule = (lambda: self.native), capsule
        try:
            yield self
        finally:
            ops._load_native, ops._capsule = orig_load, orig_capsule
            self.schedule("forward")
            self.max_grid_y(0)


_get_pointer = ctypes.pythonapi.PyCapsule_GetPointer
_get_pointer.restype = ctypes.c_void_p
_get_pointer.argtypes = [ctypes.py_object, ctypes.c_char_p]
_get_name = ctypes.pythonapi.PyCapsule_GetName
_get_name.restype = ctypes.c_char_p
_get_name.argtypes = [ctypes.py_object]

# Offset of DLTensor.device.device_type in each capsule kind (csrc/dlpack.h): DLTensor is
# first in DLManagedTensor, after version, manager_ctx, deleter and flags in the versioned one.
_DEVICE_TYPE_OFFSET = {b"dltensor": 8, b"dltensor_versioned": 32 + 8}
_KDLCPU, _KDLCUDA = 1, 2


def _relabel_cuda(cap, device_id: int = 0) -> None:
    """Marks a CPU tensor's capsule as ``cuda:device_id`` (the emulator has one device, 0)."""
    name = _get_name(cap)
    ptr = _get_pointer(cap, name)
    field = ctypes.c_int32.from_address(ptr + _DEVICE_TYPE_OFFSET[name])
    if field.value != _KDLCPU:
        raise ValueError(f"the CUDA emulator takes CPU tensors, got DLPack device type {field.value}")
    field.value = _KDLCUDA
    ctypes.c_int32.from_address(ptr + _DEVICE_TYPE_OFFSET[name] + 4).value = device_id


_EMULATOR = None


# SPECEXT_EMU_SANITIZE=address builds the module with AddressSanitizer (the emulator's
# memcheck: an out-of-bounds read or write of any kernel aborts with a report). The process
# must then preload the sanitizer runtime: see scripts/cuda_emulator_memcheck.sh.
SANITIZE = os.environ.get("SPECEXT_EMU_SANITIZE", "")


def load() -> Emulator:
    global _EMULATOR
    if _EMULATOR is None:
        if SANITIZE not in ("", "address"):
            raise ValueError(f"SPECEXT_EMU_SANITIZE must be empty or 'address', got {SANITIZE!r}")
        extra = ("-fsanitize=address", "-fno-omit-frame-pointer") if SANITIZE else ()
        _EMULATOR = Emulator(build(extra_flags=extra, tag=f"{SANITIZE}-" if SANITIZE else ""))
    return _EMULATOR
