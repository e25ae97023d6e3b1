"""Load a ``scripts/*.py`` file as a module for the tests of its functions."""

import importlib.util
import sys
from pathlib import Path


def load_script(path: Path, name: str):
    """``path`` executed as module ``name``, registered in ``sys.modules`` (dataclasses look
    their module up there). The scripts put the checkout's ``python/`` first on ``sys.path``
    (to run without an installed specext); that is undone, so later tests' child processes
    (spawn, forkserver) import the installed specext as before."""
    spec = importlib.util.spec_from_file_location(name, path)
    mod = importlib.util.module_from_spec(spec)
    saved = list(sys.path)
    sys.modules[name] = mod
    try:
        spec.loader.exec_module(mod)
    except BaseException:
        sys.modules.pop(name, None)
        raise
    finally:
        sys.path[:] = saved
    return mod
