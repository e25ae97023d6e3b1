"""Optional dependencies, grouped by use (``pyproject.toml`` extras):

- the kernels (``specext.ops``, ``reference``, ``weights``): numpy, safetensors and the
  compiled extension; torch is the user's choice (any version: the extension does not link it);
- ``[analyze]``: transformers, tokenizers, matplotlib, tqdm (models, probes, scoring,
  the analysis, compare, the report), accelerate (``--device-map``: one model over several
  devices, CPU and disk offload);
- ``[bench]``: the analysis dependencies (the benchmarks load models);
- ``[test]``: pytest, scipy and ``[analyze]``.

:func:`require` turns a missing one into a one-line error that names the extra.
"""

from __future__ import annotations

import importlib
from typing import Dict

EXTRA: Dict[str, str] = {"transformers": "analyze", "tokenizers": "analyze", "matplotlib": "analyze",
                         "tqdm": "analyze", "accelerate": "analyze", "torch": "torch", "scipy": "test", "pytest": "test"}


def require(*modules: str, what: str) -> None:
    """Import each module or raise ``ImportError`` naming what needs it and how to install it."""
    for name in modules:
        try:
            importlib.import_module(name)
        except ImportError:
            extra = EXTRA.get(name, "analyze")
            how = ("install the torch build you want first, e.g. pip install torch" if extra == "torch"
                   else f"pip install 'specext[{extra}]'")
            raise ImportError(f"{what} needs {name}, which is not installed: {how}") from None
