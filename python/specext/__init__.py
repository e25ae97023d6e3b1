"""specext: how specialised are the knowledge-storing parameters of a language model?

Kernels (``specext.ops``), plain-torch references (``specext.reference``), a streaming
safetensors reader of MLP down-projections (``specext.weights``).
"""

from __future__ import annotations

import logging

__version__ = "0.1.0"

logging.getLogger(__name__).addHandler(logging.NullHandler())


def _ext():
    """The compiled extension, imported on first use so pure-Python modules load without it."""
    try:
        from . import _native as mod
    except ImportError as e:  # pragma: no cover - depends on the install
        raise ImportError(
            "specext's compiled extension is missing: install the package with `pip install .` "
            f"(the build compiles csrc/); original error: {e}"
        ) from e
    return mod


def build_info() -> dict:
    """What the extension was built with and what it uses now.

    Keys: ``cuda`` (bool), ``cuda_archs`` (e.g. ``"80,86,89,90"``), ``cuda_devices`` (visible
    now), ``threads`` (CPU thread-pool size), ``simd`` (the level in use), ``simd_available``,
    ``compiler``, ``version``.
    """
    info = dict(_ext().build_info())
    info["version"] = __version__
    return info


def set_num_threads(n: int) -> None:
    """Number of threads the CPU kernels use (default: ``SPECEXT_NUM_THREADS``, else
    ``OMP_NUM_THREADS``, else the CPUs this process may run on)."""
    _ext().set_num_threads(int(n))


def set_simd_level(level: str) -> None:
    """Force the CPU kernels' instruction set: ``"scalar"``, ``"avx2"`` or ``"avx512"``
    (only levels in ``build_info()["simd_available"]``). The environment variable
    ``SPECEXT_SIMD`` sets the starting level. An unknown or unavailable level raises
    ``ValueError`` listing the valid ones."""
    avail = list(_ext().build_info().get("simd_available", ()))
    if avail and level not in avail:
        raise ValueError(f"SIMD level {level!r} is not available; valid levels on this CPU/build: "
                         f"{', '.join(repr(a) for a in avail)}")
    _ext().set_simd_level(level)


__all__ = ["build_info", "set_num_threads", "set_simd_level", "__version__"]
