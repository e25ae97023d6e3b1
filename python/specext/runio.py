"""Atomic file writes and hashing for run directories: nothing is ever written half."""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Dict, Iterable, Union

import torch

PathLike = Union[str, os.PathLike]


def _tmp(path: Path) -> Path:
    return path.with_name(f".{path.name}.tmp{os.getpid()}")


def write_bytes(path: PathLike, data: bytes) -> None:
    path = Path(path)
    tmp = _tmp(path)
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def write_text(path: PathLike, text: str) -> None:
    write_bytes(path, text.encode("utf-8"))


def write_json(path: PathLike, obj) -> None:
    write_text(path, json.dumps(obj, indent=2, sort_keys=False, default=_json_default, allow_nan=True) + "\n")


def _json_default(o):
    if isinstance(o, Path):
        return str(o)
    if hasattr(o, "tolist"):
        return o.tolist()
    raise TypeError(f"cannot serialise {type(o).__name__}")


def write_safetensors(path: PathLike, tensors: Dict[str, torch.Tensor], metadata: Dict[str, str] = None) -> None:
    from safetensors.torch import save

    data = save({k: v.detach().contiguous().cpu() for k, v in tensors.items()}, metadata=metadata)
    write_bytes(path, data)


def read_safetensors(path: PathLike) -> Dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(str(path))


def sha256_file(path: PathLike, limit: int = None) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        remaining = limit
        while True:
            n = 1 << 20 if remaining is None else min(1 << 20, remaining)
            if n == 0:
                break
            b = f.read(n)
            if not b:
                break
            h.update(b)
            if remaining is not None:
                remaining -= len(b)
    return h.hexdigest()


def safetensors_fingerprint(files: Iterable[Path]) -> str:
    """Hash of each safetensors file's name, size and header (tensor names, dtypes, shapes,
    offsets): cheap for a 70B checkpoint, and changes whenever the weights' layout does."""
    h = hashlib.sha256()
    for p in sorted(files):
        with open(p, "rb") as f:
            n = int.from_bytes(f.read(8), "little")
            h.update(p.name.encode())
            h.update(str(p.stat().st_size).encode())
            h.update(f.read(min(n, 100 << 20)))
    return h.hexdigest()
