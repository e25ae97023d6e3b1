"""Load a local Hugging Face model directory and find every layer's MLP down-projection.

Safe by default: weights load from safetensors only (a directory with only pickled
``*.bin`` weights is refused unless ``allow_pickle=True``, which permits pickles but never
prefers them: safetensors load whenever present), ``trust_remote_code`` is off unless asked
for, nothing is downloaded (``local_files_only``).

The *coefficients* of layer ``l`` are the input of its down-projection (``act(gate x) * up x``
for gated MLPs, ``act(fc x + b)`` for classic ones), shape ``(batch, seq, d_ff)``; column
``i`` of the down-projection weight ``(d_model, d_ff)`` is value vector ``(l, i)``.

Where a layer's down-projection is comes from one table, the naming rules of
:mod:`specext.kernels.weights`: :func:`find_mlp_sites` applies them to the model's
parameter names (and checks the module it finds), the checkpoint reader to the tensor
names; :func:`load_model` binds each site to its checkpoint tensor (:attr:`MlpSite.tensor`)
after checking that both name the same layer's down-projection, so the value-vector norms
(:func:`value_norms`) can be streamed from the checkpoint one layer at a time.

One model over several devices: ``load_model(device_map="auto"|"balanced"|"sequential",
max_memory=..., offload_dir=...)`` hands placement to transformers' ``from_pretrained``
(accelerate's ``device_map``: layers on several GPUs, offloaded to the CPU or to disk).
:attr:`LoadedModel.layer_devices` then holds each layer's *execution device* (where its
down-projection's input is computed: for an offloaded layer, the device its weights are
streamed to), :attr:`LoadedModel.device` the input device (where the embeddings run), and
:attr:`LoadedModel.device_map` the placement transformers chose. Offloaded weights are
``meta`` tensors in the model: nothing reads them (the value norms come from the checkpoint).
"""

from __future__ import annotations

import logging
import math
import pickle
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import nn

from specext._deps import require
from specext.kernels import weights as _weights

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_CAUSAL_SUFFIXES = ("ForCausalLM", "LMHeadModel")


class ModelLoadError(ValueError):
    """The model directory cannot be used; the message says why and what to do."""


@dataclass
class MlpSite:
    """One layer's down-projection."""

    layer: int
    name: str  # module path, e.g. "model.layers.3.mlp.down_proj"
    module: nn.Module
    d_ff: int
    d_model: int
    conv1d: bool  # GPT-2 Conv1D: weight stored (d_ff, d_model)
    # The checkpoint tensor the weight was loaded from, set by load_model (None: the weights
    # exist only in memory, e.g. the random twin or a model given to wrap_model).
    tensor: Optional[str] = None
    file: Optional[str] = None
    # (data_ptr, version) of the weight when it was bound to ``tensor``: a weight changed
    # or replaced since then no longer is the checkpoint's.
    _bound: Optional[tuple] = field(default=None, repr=False, compare=False)

    def weight(self) -> torch.Tensor:
        """The down-projection as ``(d_model, d_ff)`` (a view for Conv1D)."""
        w = self.module.weight
        return w.t() if self.conv1d else w

    def from_checkpoint(self) -> bool:
        """Whether the module's weight still is the checkpoint tensor it was loaded from."""
        return self.tensor is not None and self._bound == _weight_state(self.module.weight)


def _weight_state(w: torch.Tensor) -> tuple:
    # An offloaded weight is a meta tensor (accelerate streams the checkpoint's values in for
    # each forward pass and puts a new meta tensor back, under inference mode: no version).
    if w.is_meta:
        return ("meta",)
    return (w.data_ptr(), None if w.is_inference() else w._version)


@dataclass
class LoadedModel:
    """A loaded model and where it runs.

    ``device``: the *input device*, where token ids, masks and positions go and where
    logits come back (for a model split by a device map: where its embeddings run; accelerate's
    top-level hook returns outputs to the inputs' device). ``layer_devices[l]``: where layer
    ``l``'s down-projection computes, so where its coefficients (hooks), prompt statistics,
    per-layer accumulators and PSS masks belong. ``device_map``: the placement of each
    module as transformers reported it (``hf_device_map``: a GPU index, ``"cpu"`` or
    ``"disk"``), ``None`` when the whole model is on ``device``.
    """

    model: nn.Module
    tokenizer: object
    path: Path
    model_type: str
    architecture: str
    has_lm_head: bool
    sites: List[MlpSite]
    device: torch.device
    dtype: torch.dtype
    info: Dict[str, object] = field(default_factory=dict)
    layer_devices: List[torch.device] = field(default_factory=list)
    device_map: Optional[Dict[str, str]] = None
    # What loading let through with allow_missing (missing or unexpected checkpoint tensors),
    # one sentence each; recorded in summary.json's warnings.
    warnings: List[str] = field(default_factory=list)
    # How load_model chose the dtype: {"requested", "checkpoint", "used", "reason"} (None: wrap_model)
    dtype_choice: Optional[Dict[str, object]] = None

    def __post_init__(self) -> None:
        if not self.layer_devices:
            self.layer_devices = [self.device] * len(self.sites)

    @property
    def split(self) -> bool:
        """Whether the layers run on more than one device (or on another than the input's)."""
        return any(d != self.device for d in self.layer_devices)

    def layer_placement(self) -> List[Dict[str, object]]:
        """Per layer: its down-projection module, where its weights are (a GPU index, ``cpu``,
        ``disk``; the device map's entry, else the weight's device) and its execution device
        (``config.json: model.layers``)."""
        out = []
        for s, dev in zip(self.sites, self.layer_devices):
            place = _placement(self.device_map, s.name) if self.device_map else str(dev)
            out.append({"layer": s.layer, "module": s.name, "placement": place, "device": str(dev)})
        return out

    @property
    def n_layers(self) -> int:
        return len(self.sites)

    @property
    def d_ff(self) -> int:
        return self.sites[0].d_ff

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def specext_run_source(path: Path) -> Optional[str]:
    """For a specext run directory (the ``--out`` of ``python -m specext.analyze``): the model
    directory it was run on (``""`` when its config.json does not say); ``None`` for any
    other directory."""
    import json

    cfg = path / "config.json"
    marks = (path / "summary.json").is_file() or (path / ".state").is_dir() or (path / "neurons.safetensors").is_file()
    try:
        doc = json.loads(cfg.read_text()) if cfg.is_file() else None
    except (OSError, ValueError, UnicodeDecodeError):
        doc = None
    ours = isinstance(doc, dict) and isinstance(doc.get("options"), dict) and "fingerprint" in doc
    if not (ours or marks):
        return None
    src = doc["options"].get("model_dir") if ours else None
    return str(src) if src else ""


def check_model_dir(model_dir: Union[str, Path], allow_pickle: bool = False) -> bool:
    """Refuse a directory that cannot be a model (missing, a file, empty, no config.json, no
    weights, pickled weights without ``allow_pickle``, a specext run directory) with a
    message that says why; returns whether the weights load from safetensors. Cheap: file
    names and config.json only, nothing is loaded."""
    return _check_dir(Path(model_dir), allow_pickle, log=False)  # load_model logs it, once


def _check_dir(model_dir: Path, allow_pickle: bool, *, log: bool = True) -> bool:
    """Refuse unusable directories; returns whether the weights load from safetensors."""
    if not model_dir.exists():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir} is not a directory (expected a Hugging Face model directory)")
    src = specext_run_source(model_dir)
    if src is not None:
        raise ModelLoadError(f"{model_dir} is a specext run directory (the output of python -m specext.analyze), "
                             "not a model directory: pass the model directory itself"
                             + (f" (this run used {src})" if src else ""))
    files = [p.name for p in model_dir.iterdir()]
    if not files:
        raise ModelLoadError(f"model directory {model_dir} is empty")
    if "config.json" not in files:
        raise ModelLoadError(f"{model_dir} has no config.json (files: {', '.join(sorted(files)[:12])})")
    safe = [f for f in files if f.endswith(".safetensors")]
    pickled = [f for f in files if f.endswith(_PICKLE_SUFFIXES)]
    if not safe:
        if pickled and not allow_pickle:
            raise ModelLoadError(
                f"{model_dir} has only pickled weights ({', '.join(sorted(pickled)[:4])}); specext loads safetensors "
                "only, because unpickling can run arbitrary code. Convert the checkpoint to safetensors, or pass "
                "--allow-pickle (allow_pickle=True) if you trust its source."
            )
        if not pickled:
            raise ModelLoadError(f"{model_dir} has no weights (no *.safetensors file)")
        if log:
            logger.warning("%s: loading pickled weights (%s) because allow_pickle=True", model_dir,
                           ", ".join(sorted(pickled)[:4]))
        return False
    return True


def _d_ff_from_config(cfg) -> Optional[int]:
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is None:
            continue
        for key in ("intermediate_size", "n_inner", "ffn_hidden_size", "ffn_dim", "d_ff"):
            v = getattr(c, key, None)
            if isinstance(v, int) and v > 0:
                return v
        if getattr(c, "model_type", None) in ("gpt2", "falcon") or hasattr(c, "n_embd"):
            h = getattr(c, "n_embd", None) or getattr(c, "hidden_size", None)
            if isinstance(h, int):
                return 4 * h
    return None


def _in_out(mod: nn.Module):
    from transformers.pytorch_utils import Conv1D

    if isinstance(mod, nn.Linear):
        return mod.in_features, mod.out_features, False
    if isinstance(mod, Conv1D):
        return mod.weight.shape[0], mod.weight.shape[1], True
    return None


def _linear_modules_seen(model: nn.Module, limit: int = 24) -> str:
    seen = []
    for name, mod in model.named_modules():
        io = _in_out(mod)
        if io is not None:
            seen.append(f"{name} ({type(mod).__name__} {io[0]}->{io[1]})")
        if len(seen) >= limit:
            break
    return ", ".join(seen) or "none"


def find_mlp_sites(model: nn.Module, d_ff: Optional[int] = None, n_layers: Optional[int] = None) -> List[MlpSite]:
    """Find each transformer block's down-projection by the naming table of
    :mod:`specext.kernels.weights` (the same rules that find it among a checkpoint's tensor
    names), applied to the model's parameter names; then check each module: a Linear (or
    GPT-2 Conv1D, as the table's layout says) whose input width is the MLP width ``d_ff``
    (when given). ``n_layers``: the number of layers there must be (when given).

    Raises ``ModelLoadError`` saying why (no name, several, a missing layer, a module that
    is not what the table says) and listing the Linear modules seen.
    """
    config = getattr(model, "config", None)
    hint = {"model_type": getattr(config, "model_type", None), "num_hidden_layers": n_layers}
    names = [n for n, _ in model.named_parameters()]
    try:
        matches = _weights.find_down_proj_names(names, {k: v for k, v in hint.items() if v is not None})
    except ValueError as e:
        raise ModelLoadError(f"could not find one MLP down-projection per layer (d_ff={d_ff}): {e}. "
                             f"Linear modules seen: {_linear_modules_seen(model)}") from None
    sites = []
    for layer, pname, transposed in matches:
        path = pname[: -len(".weight")]
        sub = model.get_submodule(path)
        io = _in_out(sub)
        if io is None or io[2] != transposed:
            want = "a GPT-2 Conv1D" if transposed else "an nn.Linear"
            raise ModelLoadError(f"{path} is layer {layer}'s MLP down-projection by the naming table of "
                                 f"specext.kernels.weights, which expects {want}, but it is a {type(sub).__name__}")
        fin, fout, conv = io
        if d_ff is not None and fin != d_ff:
            raise ModelLoadError(f"{path} is layer {layer}'s MLP down-projection by the naming table of "
                                 f"specext.kernels.weights, but its input width is {fin}, not the config's MLP "
                                 f"width {d_ff}. Linear modules seen: {_linear_modules_seen(model)}")
        sites.append(MlpSite(layer=layer, name=path, module=sub, d_ff=fin, d_model=fout, conv1d=conv))
    return sites


def bind_checkpoint(sites: List[MlpSite], model_dir: Union[str, Path]) -> None:
    """Record in each site the checkpoint tensor its weight was loaded from.

    The checkpoint's down-projections are found by the naming table of
    :mod:`specext.kernels.weights` (index and headers only). Site and tensor must be the same
    layer's down-projection by that table (same name up to wrapper prefixes such as
    ``model.`` or ``bert.``), with the same shape and layout; otherwise ``ModelLoadError``
    naming the tensor, its file and the module: the model's values would not be the
    checkpoint's (e.g. transformers initialised modules whose names it did not find).
    """
    try:
        tensors = _weights.down_proj_tensors(model_dir)
    except (ValueError, FileNotFoundError) as e:
        raise ModelLoadError(f"{model_dir}: cannot locate the MLP down-projections in the checkpoint: {e}") from None
    if len(tensors) != len(sites):
        t = tensors[0]
        raise ModelLoadError(f"{model_dir}: the checkpoint has {len(tensors)} MLP down-projections ({t.name!r} in "
                             f"{t.file} first) but the loaded model {len(sites)} ({sites[0].name!r} first)")
    for site, t in zip(sites, tensors):
        mine = _weights.match_down_proj(site.name + ".weight")
        theirs = _weights.match_down_proj(t.name)
        if (mine.relative != theirs.relative or t.shape != (site.d_model, site.d_ff)
                or t.transposed != site.conv1d):
            raise ModelLoadError(
                f"checkpoint tensor {t.name!r} in {t.file} (layer {t.layer}, {t.family} naming, (d_model, d_ff) = "
                f"{t.shape}{', stored transposed' if t.transposed else ''}) does not match the loaded model's layer "
                f"{site.layer} down-projection, module {site.name!r} ({type(site.module).__name__}, (d_model, d_ff) = "
                f"{(site.d_model, site.d_ff)}): the checkpoint's names do not match the loaded modules, so the "
                "model's weights are not this checkpoint's")
        site.tensor, site.file = t.name, str(t.file)
        site._bound = _weight_state(site.module.weight)


def value_norms(lm: "LoadedModel", device: Optional[Union[str, torch.device]] = None, *,
                source: str = "auto") -> torch.Tensor:
    """``(L, d_ff)`` float32 L2 norms of every layer's value vectors, in the model's layer order.

    The one function that chooses where the weights are read:

    - ``"checkpoint"``: streamed from the safetensors files through
      :func:`specext.kernels.weights.iter_value_vector_norms`, one layer in memory at a time,
      reading exactly the tensors :func:`load_model` bound to the sites
      (:attr:`MlpSite.tensor`), converted to the dtype the model's down-projections have (so
      the norms are those of the weights the coefficients were measured with, and equal the
      ``"modules"`` norms bit for bit);
    - ``"modules"``: the loaded modules' weights (``MlpSite.weight()``);
    - ``"auto"`` (default): the checkpoint when every site is still bound to its tensor (a
      model from :func:`load_model` on safetensors, weights unchanged since), else the
      modules: the random twin (its weights exist only in memory), a model given to
      :func:`wrap_model`, a pickled checkpoint, weights changed or moved after loading.

    ``device``: where the norms kernel runs and the result lives (default ``lm.device``, so
    CUDA when the model is there).
    """
    if source not in ("auto", "checkpoint", "modules"):
        raise ValueError(f"source must be auto, checkpoint or modules, got {source!r}")
    dev = torch.device(device) if device is not None else lm.device
    dtypes = {s.module.weight.dtype for s in lm.sites}
    bound = all(s.from_checkpoint() for s in lm.sites) and len(dtypes) == 1
    if source == "checkpoint" and not bound:
        raise ValueError("value_norms(source='checkpoint'): the model's down-projections are not bound to checkpoint "
                         "tensors (not loaded by load_model from safetensors, or changed since)")
    if source == "modules" or not bound:
        from specext.kernels.ops import value_vector_norms

        meta = [s.layer for s in lm.sites if s.module.weight.is_meta]
        if meta:
            raise ValueError(f"value_norms: the down-projections of layers {meta} are offloaded (meta tensors, "
                             "their values are not in the module) and not bound to checkpoint tensors; load the "
                             "model with load_model from safetensors so the norms are read from the checkpoint")

        logger.debug("value-vector norms from the loaded modules")
        return torch.stack([value_vector_norms(s.weight().detach()).to(dev) for s in lm.sites])
    # Exactly the bound tensors, in the sites' (layer) order; the reader refuses any other.
    names = [s.tensor for s in lm.sites]
    rows = [n for _, n in _weights.iter_value_vector_norms(lm.path, device=dev, dtype=dtypes.pop(), names=names)]
    logger.debug("value-vector norms streamed from %d checkpoint tensors in %s", len(rows), lm.path)
    return torch.stack(rows)


# x86 / Arm CPU flags (/proc/cpuinfo) for native arithmetic in each half-precision dtype: without
# them torch converts on every operation and a bfloat16 matrix product runs several times
# slower than float32 (measured 20.7 vs 110.5 GFLOP/s on a CPU without them, issue 12).
_NATIVE_HALF_FLAGS = {
    "x86": {torch.bfloat16: ("avx512_bf16", "amx_bf16"), torch.float16: ("avx512_fp16", "amx_fp16")},
    "arm": {torch.bfloat16: ("bf16",), torch.float16: ("fphp", "asimdhp")},
}
# float32 is chosen only when the weights take at most this share of the memory available.
FLOAT32_FIT = 0.8


def cpu_flags() -> Optional[set]:
    """The CPU's feature flags (``flags`` on x86, ``Features`` on Arm, from /proc/cpuinfo);
    None where there is no /proc/cpuinfo (macOS, Windows)."""
    try:
        with open("/proc/cpuinfo") as f:
            text = f.read()
    except OSError:
        return None
    flags: set = set()
    for line in text.splitlines():
        key, _, value = line.partition(":")
        if key.strip() in ("flags", "Features"):
            flags.update(value.split())
    return flags or None


def cpu_native_dtype(dtype: torch.dtype) -> Optional[bool]:
    """Whether this CPU computes in ``dtype`` (bfloat16 / float16) natively; None if unknown."""
    import platform

    flags = cpu_flags()
    if flags is None:
        return None
    arch = "arm" if platform.machine().lower() in ("aarch64", "arm64") else "x86"
    names = _NATIVE_HALF_FLAGS[arch].get(dtype)
    return None if names is None else any(f in flags for f in names)


def host_memory_available() -> Optional[int]:
    """Bytes of host memory available now (``MemAvailable`` of /proc/meminfo), or None."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024  # host: a line of /proc/meminfo
    except (OSError, ValueError, IndexError):
        return None
    return None


def free_memory_bytes(device: Union[str, torch.device]) -> Optional[int]:
    """Memory free now on ``device``: CUDA, the driver's free bytes; otherwise the host's
    ``MemAvailable`` (None when unknown). The one reading of free memory for the memory plan,
    the dtype choice and the benchmarks."""
    device = torch.device(device)
    if device.type == "cuda":
        return int(torch.cuda.mem_get_info(device)[0])
    return host_memory_available()


def checkpoint_numel(tensors: Dict[str, tuple]) -> Optional[int]:
    """Number of floating-point weights in a checkpoint, from the headers
    :func:`specext.kernels.weights.checkpoint_tensors` already read and validated
    (``{name: (file, dtype, shape)}``); None when it holds none."""
    total, seen = 0, False
    for _, dt, shape in tensors.values():
        if str(dt).startswith(("F", "BF")):
            total += math.prod(int(d) for d in shape)
            seen = True
    return total if seen else None


def _config_dtype(cfg) -> Optional[torch.dtype]:
    """The checkpoint's dtype as its config states it (``dtype``, formerly ``torch_dtype``)."""
    for key in ("dtype", "torch_dtype"):
        v = getattr(cfg, key, None)
        if isinstance(v, torch.dtype):
            return v
        if isinstance(v, str) and v.replace("torch.", "") in DTYPES:
            return DTYPES[v.replace("torch.", "")]
    return None


def _gib(n: Optional[float]) -> str:
    return "unknown" if n is None else f"{n / 2**30:.1f} GiB"


def choose_dtype(requested: str, checkpoint: Optional[torch.dtype], on_cpu: bool, numel: Optional[int],
                 available: Optional[int]) -> Dict[str, object]:
    """The dtype the model loads in and why: ``{"requested", "checkpoint", "used", "reason"}``
    (``used``: a name of :data:`DTYPES`, or ``"auto"`` when the checkpoint does not say).

    ``--dtype auto`` keeps the checkpoint's dtype, except on a CPU that lacks native
    arithmetic for a bfloat16 / float16 checkpoint (no ``avx512_bf16``/``amx_bf16``, resp.
    ``avx512_fp16``/``amx_fp16``; Arm ``bf16``/``fphp``), where float32 runs several times
    faster: float32 when its weights (``4 * numel`` bytes) fit in ``FLOAT32_FIT`` of the
    ``available`` host memory, else the checkpoint's dtype (said in the reason)."""
    name = {v: k for k, v in DTYPES.items()}
    ck = name.get(checkpoint) if checkpoint is not None else None
    out = {"requested": requested, "checkpoint": ck}
    if requested != "auto":
        return out | {"used": requested, "reason": f"--dtype {requested}"}
    if ck is None:
        return out | {"used": "auto", "reason": "--dtype auto: the checkpoint's config names no dtype; "
                                                "transformers' default"}
    keep = out | {"used": ck}
    if checkpoint not in (torch.bfloat16, torch.float16):
        return keep | {"reason": f"--dtype auto: the checkpoint's dtype ({ck})"}
    if not on_cpu:
        return keep | {"reason": f"--dtype auto: the checkpoint's dtype ({ck}) on an accelerator"}
    native = cpu_native_dtype(checkpoint)
    if native is None:
        return keep | {"reason": f"--dtype auto: the checkpoint's dtype ({ck}); whether this CPU computes in {ck} "
                                 f"natively is unknown"}
    if native:
        return keep | {"reason": f"--dtype auto: the checkpoint's dtype ({ck}); this CPU computes in {ck} natively"}
    flags = " / ".join(_NATIVE_HALF_FLAGS["x86"][checkpoint])
    need = 4 * numel if numel is not None else None
    # "reason" is the same on every run (summary.json is reproducible); "memory" says what was free
    memory = {"memory": f"{_gib(available)} available"} if available is not None else {}
    if need is not None and available is not None and need <= FLOAT32_FIT * available:
        return out | memory | {
            "used": "float32",
            "reason": f"--dtype auto: this CPU has no native {ck} arithmetic (no {flags}), where float32 runs "
                      f"several times faster; the float32 weights ({_gib(need)}) fit in {FLOAT32_FIT:.0%} of the "
                      f"available memory"}
    why = ("the weights' size is unknown" if need is None else "the available memory is unknown" if available is None
           else f"the float32 weights would need {_gib(need)}, more than {FLOAT32_FIT:.0%} of the available memory")
    return keep | memory | {"reason": f"--dtype auto: kept the checkpoint's {ck} although this CPU has no native "
                                      f"{ck} arithmetic (no {flags}; float32 would run several times faster): {why}"}


def _is_oom(e: BaseException) -> bool:
    if isinstance(e, MemoryError) or isinstance(e, getattr(torch, "OutOfMemoryError", ())):
        return True
    msg = str(e).lower()
    return any(s in msg for s in ("cannot allocate memory", "out of memory", "can't allocate memory",
                                  "unable to mmap", "failed to allocate"))


def _oom_error(model_dir: Path, e: BaseException, *, dtype_used: str, numel: Optional[int], device,
               device_map: Optional[str], offload_dir) -> "ModelLoadError":
    """The error for running out of memory while loading: what the weights need, what is
    free, and the options that help."""
    per = {"float32": 4, "bfloat16": 2, "float16": 2}.get(dtype_used)
    need = numel * per if numel is not None and per is not None else None
    dev = torch.device(device) if device is not None else torch.device("cpu")
    if dev.type == "cuda":
        try:
            free = int(torch.cuda.mem_get_info(dev)[0])
        except Exception:  # the device may be in a bad state after the failure
            free = None
        where = str(dev)
    else:
        free, where = host_memory_available(), "host memory"
    first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
    tips = []
    if dtype_used == "float32":
        tips.append("--dtype bfloat16 (or float16) halves the weights")
    if device_map is None:
        tips.append("--device-map auto with --max-memory (e.g. cpu=20GiB) and --offload-dir DIR keeps what does "
                    "not fit on disk" + ("; over several GPUs, --device-map auto alone" if dev.type == "cuda" else ""))
    else:
        tips.append("a smaller --max-memory budget" + ("" if offload_dir else " with --offload-dir DIR") +
                    " puts more layers on disk")
    tips.append("or free memory (other processes)")
    return ModelLoadError(
        f"{model_dir}: out of memory while loading the model ({type(e).__name__}: {first}). Its weights need about "
        f"{_gib(need)} in {dtype_used}; {_gib(free)} of {where} is free. Options: {'; '.join(tips)}.")


DEVICE_MAPS = ("auto", "balanced", "sequential")


def parse_max_memory(spec: Optional[str]) -> Optional[Dict[Union[int, str], Union[int, str]]]:
    """``"0=20GiB,cpu=100GiB"`` -> ``{0: "20GiB", "cpu": "100GiB"}`` (accelerate's
    ``max_memory``): keys are GPU indices (``0``, ``cuda:0``), ``cpu`` or ``mps``/``xpu``;
    sizes an integer number of bytes (kept as an int) or a number with a unit (``200MB``,
    ``1.5GiB``).
    ``None``/empty -> ``None`` (accelerate uses what is free)."""
    if spec is None or not str(spec).strip():
        return None
    out: Dict[Union[int, str], Union[int, str]] = {}
    for part in str(spec).split(","):
        part = part.strip()
        if not part:
            continue
        key, sep, size = part.partition("=")
        key, size = key.strip().lower(), size.strip()
        if not sep or not key or not size:
            raise ValueError(f"--max-memory: expected DEVICE=SIZE[,DEVICE=SIZE...] (e.g. 0=20GiB,cpu=100GiB), "
                             f"got {part!r}")
        if key.startswith("cuda:"):
            key = key[5:]
        k: Union[int, str] = int(key) if key.isdigit() else key
        if isinstance(k, str) and k not in ("cpu", "mps", "xpu"):
            raise ValueError(f"--max-memory: device {key!r} is not a GPU index, cuda:N, cpu, mps or xpu")
        if k in out:
            raise ValueError(f"--max-memory: device {key!r} given twice")
        try:
            _size_bytes(size)
        except ValueError:
            raise ValueError(f"--max-memory: {size!r} for {key} is not a size (bytes, or a number with a unit such "
                             f"as 200MB or 20GiB)") from None
        out[k] = int(size) if size.isdigit() else size  # accelerate takes bytes as an int
    return out or None


def _size_bytes(size: str) -> int:
    require("accelerate", what="--max-memory")
    from accelerate.utils import convert_file_size_to_int

    return int(size) if size.isdigit() else convert_file_size_to_int(size)


def _placement(device_map: Dict[str, str], name: str) -> str:
    """The device map's entry for module ``name`` (its longest prefix in the map)."""
    parts = name.split(".")
    for i in range(len(parts), -1, -1):
        key = ".".join(parts[:i])
        if key in device_map:
            return str(device_map[key])
    return "?"


def _execution_device(model: nn.Module, name: str) -> Optional[torch.device]:
    """The device accelerate runs module ``name`` on: the ``execution_device`` of the
    nearest ``_hf_hook`` on it or on a parent (an offloaded module has its own hook that
    streams its weights there; a placed block has one on the block). ``None`` without hooks."""
    parts = name.split(".") if name else []
    for i in range(len(parts), -1, -1):
        mod = model.get_submodule(".".join(parts[:i]))
        hook = getattr(mod, "_hf_hook", None)
        for h in (getattr(hook, "hooks", None) or [hook]):
            dev = getattr(h, "execution_device", None)
            if dev is not None:
                return torch.device(f"cuda:{dev}" if isinstance(dev, int) else dev)
    return None


def _module_device(mod: nn.Module) -> Optional[torch.device]:
    for t in list(mod.parameters(recurse=False)) + list(mod.buffers(recurse=False)):
        if t.device.type != "meta":
            return t.device
    return None


def _input_embeddings_name(model: nn.Module) -> Optional[str]:
    try:
        emb = model.get_input_embeddings()
    except (AttributeError, NotImplementedError):
        return None
    for name, mod in model.named_modules():
        if mod is emb:
            return name
    return None


def _mapped_devices(model: nn.Module, sites: List[MlpSite]) -> tuple:
    """(input device, per-layer execution devices) of a model dispatched by accelerate."""
    fallback = torch.device("cpu")
    emb = _input_embeddings_name(model)
    dev_in = (_execution_device(model, emb) if emb is not None else None) or _execution_device(model, "")
    if dev_in is None and emb is not None:
        dev_in = _module_device(model.get_submodule(emb))
    dev_in = dev_in or fallback
    layers = []
    for s in sites:
        d = _execution_device(model, s.name) or _module_device(s.module)
        layers.append(d if d is not None else dev_in)
    return dev_in, layers


class quiet_transformers:
    """Within ``with quiet_transformers():`` transformers shows no progress bars (the
    weight-loading bar) and logs errors only; its settings are restored afterwards. The
    command line and a notebook's :func:`run_analysis` load models the same way."""

    def __enter__(self):
        try:
            from transformers.utils import logging as tl
        except ImportError:  # pragma: no cover - transformers is required to load
            self.tl = None
            return self
        self.tl = tl
        self.verbosity, self.bars = tl.get_verbosity(), tl.is_progress_bar_enabled()
        tl.set_verbosity_error()
        tl.disable_progress_bar()
        return self

    def __exit__(self, *exc) -> None:
        if self.tl is None:
            return
        self.tl.set_verbosity(self.verbosity)
        if self.bars:
            self.tl.enable_progress_bar()


def resolve_device(device: str) -> torch.device:
    if device == "auto":
        return torch.device("cuda" if torch.cuda.is_available() else "cpu")
    if device not in ("cpu", "cuda") and not device.startswith("cuda:"):
        raise ValueError(f"--device must be cpu, cuda, cuda:N or auto, got {device!r}")
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ValueError(f"--device {device} requested but torch sees no CUDA device")
    return torch.device(device)


def load_model(
    model_dir: Union[str, Path],
    *,
    dtype: str = "auto",
    device: str = "auto",
    trust_remote_code: bool = False,
    allow_pickle: bool = False,
    device_map: Optional[str] = None,
    max_memory: Optional[Union[str, Dict[Union[int, str], Union[int, str]]]] = None,
    offload_dir: Optional[Union[str, Path]] = None,
    allow_missing: bool = False,
) -> LoadedModel:
    """Load a local model directory (config.json, safetensors weights, tokenizer).

    The checkpoint must be the model the config describes, tensor for tensor: every
    safetensors file is validated from its header before loading
    (:func:`specext.kernels.weights.checkpoint_tensors`: a file cut short, a garbage header,
    a shape that does not fit its offsets), and a tensor the model needs that the checkpoint
    lacks (*missing*: transformers would initialise it at random), one the model has no
    place for (*unexpected*: e.g. layers past the config's count) or one of another shape
    (*mismatched*) is a ``ModelLoadError`` naming the tensors. Tied weights (an LM head tied
    to the embeddings) and non-persistent buffers (rotary ``inv_freq``) are not missing.
    ``allow_missing``: missing and unexpected tensors are logged and kept in
    :attr:`LoadedModel.warnings` instead (for heads that are tied or unused); a mismatched
    shape and a missing MLP down-projection (what specext measures) stay errors.

    ``dtype``: ``auto`` (the checkpoint's dtype), ``bfloat16``, ``float16``, ``float32``.
    Causal LMs (architectures ending in ``ForCausalLM``/``LMHeadModel``) load with their LM
    head; encoders and other bases load with ``AutoModel`` and get specialisation only.

    ``device_map`` (``auto``, ``balanced``, ``sequential``): split the model over devices
    with accelerate, through ``from_pretrained(device_map=, max_memory=, offload_folder=)``.
    ``max_memory``: per-device budget, ``"0=20GiB,cpu=100GiB"`` or accelerate's dict; what
    does not fit goes to ``offload_dir`` on disk. ``device`` then only restricts the map:
    ``auto`` (every GPU, the CPU, disk) or ``cpu`` (the CPU and disk only).
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    # allow_pickle permits a pickle-only checkpoint; it never forces one: safetensors win
    # whenever the directory has them.
    use_safetensors = _check_dir(model_dir, allow_pickle)
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"--dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    if device_map is not None:
        max_memory = _map_budget(device, device_map, max_memory)
        dev = None
    else:
        if max_memory is not None or offload_dir is not None:
            raise ValueError("--max-memory and --offload-dir need --device-map (auto, balanced or sequential)")
        dev = resolve_device(device)
    try:  # the raw config.json, for auto_map; when it is no JSON object, AutoConfig says why below
        raw_cfg = _weights._load_config(model_dir) or {}
    except ValueError:
        raw_cfg = {}
    try:
        cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    except ValueError as e:
        if not trust_remote_code and (raw_cfg.get("auto_map") or "trust_remote_code" in str(e)):
            raise ModelLoadError(
                f"{model_dir}/config.json: model_type {raw_cfg.get('model_type')!r} is not one transformers knows, and "
                f"the directory declares its own code (auto_map: {sorted(raw_cfg.get('auto_map') or {}) or 'none'}). "
                "specext does not run a checkpoint's code unless asked: pass --trust-remote-code "
                "(trust_remote_code=True) only if you trust its source") from None
        raise ModelLoadError(f"{model_dir}/config.json: unsupported or unreadable config ({e})") from None
    remote_note = []
    if raw_cfg.get("auto_map") and not trust_remote_code:
        remote_note.append(
            f"{model_dir}/config.json declares custom code (auto_map: {', '.join(sorted(raw_cfg['auto_map']))}) "
            f"that was not run (no --trust-remote-code): the model was built with transformers' own "
            f"{cfg.model_type!r} classes, which may differ from the checkpoint author's code")
        logger.warning(remote_note[0])
    if getattr(cfg, "is_encoder_decoder", False):
        raise ModelLoadError(f"{model_dir}: encoder-decoder models ({cfg.model_type}) are not supported")
    ckpt = {}
    if use_safetensors:
        try:  # every header and offset, before transformers reads (and dies on) a damaged file
            ckpt = _weights.checkpoint_tensors(model_dir)
        except (ValueError, OSError) as e:
            raise ModelLoadError(f"damaged checkpoint: {e}") from None
    archs = list(getattr(cfg, "architectures", None) or [])
    causal = any(a.endswith(_CAUSAL_SUFFIXES) for a in archs)
    on_cpu = (dev.type == "cpu") if dev is not None else (device == "cpu" or not torch.cuda.is_available())
    numel = checkpoint_numel(ckpt) if use_safetensors else None
    choice = choose_dtype(dtype, _config_dtype(cfg), on_cpu, numel,
                          host_memory_available() if on_cpu and dtype == "auto" else None)
    (logger.warning if "kept the checkpoint's" in choice["reason"] else logger.info)(
        "dtype %s: %s%s", choice["used"], choice["reason"], f" ({choice['memory']})" if "memory" in choice else "")
    kwargs = dict(
        trust_remote_code=trust_remote_code,
        local_files_only=True,
        use_safetensors=use_safetensors,
        dtype=DTYPES.get(choice["used"], "auto"),
        output_loading_info=True,  # missing / unexpected / mismatched tensors: checked below
        ignore_mismatched_sizes=True,  # reported in the loading info, refused below with the tensor's name
    )
    if device_map is not None:
        kwargs.update(device_map=device_map, max_memory=max_memory,
                      offload_folder=str(offload_dir) if offload_dir is not None else None)
    loader = AutoModelForCausalLM if causal else AutoModel

    def oom(e):
        used = choice["used"] if choice["used"] != "auto" else str(_config_dtype(cfg) or torch.float32).replace("torch.", "")
        return _oom_error(model_dir, e, dtype_used=used, numel=numel, device=dev, device_map=device_map,
                          offload_dir=offload_dir)

    try:
        with quiet_transformers():
            model, loading = loader.from_pretrained(model_dir, **kwargs)
    except pickle.UnpicklingError as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelLoadError(
            f"{model_dir}: torch's safe unpickler (weights_only=True) refused the pickled weights: they hold objects "
            f"other than tensors, whose loading could run code ({first}). specext never loads such a pickle, even "
            "with --allow-pickle; convert the checkpoint to safetensors with code you trust") from None
    except ValueError as e:
        hint = (" (a layer that does not fit --max-memory goes to disk: give --offload-dir DIR)"
                if device_map is not None and offload_dir is None and "offload" in str(e) else "")
        raise ModelLoadError(f"{model_dir}: cannot load {cfg.model_type} with {loader.__name__} ({e}){hint}") from None
    except (RuntimeError, MemoryError, OSError) as e:
        if _is_oom(e):
            raise oom(e) from None
        raise
    load_warnings = _check_loading(model_dir, loading, ckpt, allow_missing, model=model, causal=causal,
                                   arch=archs[0] if archs else None)
    hf_map = getattr(model, "hf_device_map", None) if device_map is not None else None
    if device_map is None:
        try:
            model.to(dev)
        except (RuntimeError, MemoryError) as e:
            if _is_oom(e):
                del model
                raise oom(e) from None
            raise
    model.eval()
    try:
        tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    except (OSError, ValueError, TypeError) as e:
        tok, why = None, str(e)
    if tok is None or len(tok) < 2:  # transformers may build an empty tokenizer when the files are missing
        why = why if tok is None else f"the tokenizer it builds has {len(tok)} token(s)"
        raise ModelLoadError(f"{model_dir}: no usable tokenizer (expected tokenizer.json, or tokenizer_config.json "
                             f"with vocab.json + merges.txt, tokenizer.model or vocab.txt): {why}")
    _check_tokenizer_fits(model_dir, model, tok)
    lm = wrap_model(model, tok, path=model_dir, has_lm_head=causal, device=dev)
    lm.warnings = remote_note + load_warnings
    lm.dtype_choice = choice | {"used": str(lm.dtype).replace("torch.", "")}
    if use_safetensors:
        bind_checkpoint(lm.sites, model_dir)
    elif any(s.module.weight.is_meta for s in lm.sites):
        raise ModelLoadError(f"{model_dir}: offloaded (meta) down-projections need a safetensors checkpoint, from "
                             "which their value-vector norms are read; this one is pickled")
    if device_map is not None:
        lm.device_map = {k: str(v) for k, v in (hf_map or {"": str(lm.device)}).items()}
        places = [p["placement"] for p in lm.layer_placement()]
        logger.info("device map %s: input on %s; layers %s", device_map, lm.device,
                    ", ".join(f"{p} x{places.count(p)}" for p in dict.fromkeys(places)))
    logger.info("loaded %s (%s, %d layers, d_ff %d, %s on %s, %.1fM parameters)", model_dir, lm.architecture,
                lm.n_layers, lm.d_ff, lm.dtype, lm.device, lm.n_parameters() / 1e6)
    return lm


def _check_tokenizer_fits(model_dir: Path, model: nn.Module, tok) -> None:
    """Refuse a tokenizer whose token ids run past the model's embedding rows: it is another
    model's tokenizer, and the first prompt with such a token would fail deep inside the
    embedding lookup (``IndexError: index out of range in self``)."""
    emb = model.get_input_embeddings() if hasattr(model, "get_input_embeddings") else None
    rows = getattr(emb, "num_embeddings", None)
    if rows is None:
        return
    vocab = tok.get_vocab()
    top = max(vocab.values(), default=-1)
    if top >= rows:
        over = [t for _, t in sorted((i, t) for t, i in vocab.items() if i >= rows)]
        raise ModelLoadError(
            f"{model_dir}: the tokenizer has token ids up to {top} but the model's input embedding has {rows} rows "
            f"(config.json vocab_size {getattr(model.config, 'vocab_size', '?')}): {len(over)} token(s) would index "
            f"past it (first: {over[:3]}). The tokenizer files do not belong to this model's weights; put the "
            "model's own tokenizer in the directory")


def _grouped(names) -> str:
    """Tensor names, layers folded: ``model.layers.{4, 5}.mlp.up_proj.weight`` (as transformers'
    load report writes them); at most 12 groups, then a count."""
    groups: Dict[str, List[int]] = {}
    for n in sorted(names):
        m = re.search(r"\.(\d+)\.", n)
        key = n if m is None else n[: m.start()] + ".{}." + n[m.end():]
        groups.setdefault(key, []).append(int(m.group(1)) if m else -1)
    out = []
    for key, layers in groups.items():
        if "{}" in key:
            ls = sorted(set(layers))
            key = key.replace("{}", str(ls[0]) if len(ls) == 1 else "{" + ", ".join(map(str, ls)) + "}")
        out.append(key)
    more = f" ... ({len(out) - 12} more)" if len(out) > 12 else ""
    return ", ".join(out[:12]) + more


# Buffers older transformers versions saved in checkpoints (causal masks, rotary tables) that
# today's models compute from the config: a checkpoint that has them is not another model.
_DERIVED_BUFFER = re.compile(
    r"(?:^|\.)(?:(?:attn|attention)\.(?:masked_bias|bias)|rotary_emb\.(?:inv_freq|cos_cached|sin_cached))$")


def _check_loading(model_dir: Path, info: Dict[str, object], ckpt: Dict[str, tuple], allow_missing: bool, *,
                   model: Optional[nn.Module] = None, causal: bool = True, arch: Optional[str] = None) -> List[str]:
    """Refuse a checkpoint that is not the config's model, from transformers' loading info
    (``output_loading_info=True``): missing, unexpected and mismatched tensors, named (and
    for a mismatch its file and both shapes). ``allow_missing`` turns missing and unexpected
    tensors into warnings (returned), except a missing MLP down-projection.

    An encoder saved with a task head (``BertForMaskedLM``) and loaded as its base model
    (``AutoModel``: specialisation only) is the one expected disagreement, and is not one:
    the head's tensors (outside the base model's ``base_model_prefix``) are dropped on
    purpose, and a pooler the task model never had reads only the last layer's output,
    which specext never uses; both are logged, not refused."""
    missing = sorted(info.get("missing_keys") or ())
    unexpected = sorted(info.get("unexpected_keys") or ())
    stale = [n for n in unexpected if _DERIVED_BUFFER.search(n)]
    if stale:  # masks and rotary tables older code saved as buffers; computed from the config now
        logger.info("%s: buffers saved by older code, recomputed from the config: %s", model_dir, _grouped(stale))
        unexpected = [n for n in unexpected if not _DERIVED_BUFFER.search(n)]
    if model is not None and not causal and arch and arch != type(model).__name__:
        prefix = f"{getattr(model, 'base_model_prefix', '')}."
        if prefix != "." and any(n.startswith(prefix) for n in ckpt):
            head = [n for n in unexpected if not n.startswith(prefix)]
            unexpected = [n for n in unexpected if n.startswith(prefix)]
            if head:
                logger.info("%s: %s's task head is not loaded (specialisation only): %s", model_dir, arch,
                            _grouped(head))
        pooler = [n for n in missing if n.startswith("pooler.")]
        missing = [n for n in missing if not n.startswith("pooler.")]
        if pooler:
            logger.info("%s: %s has no pooler; the base model's is initialised but never read", model_dir, arch)
    mismatched = sorted(info.get("mismatched_keys") or (), key=lambda m: m[0])
    if mismatched:
        parts = []
        for name, theirs, mine in mismatched[:8]:
            f = ckpt.get(name, (None,))[0]
            parts.append(f"{name!r}{f' in {f.name}' if f is not None else ''} has shape {tuple(theirs)}, the model "
                         f"(config.json) needs {tuple(mine)}")
        more = f" ... ({len(mismatched) - 8} more)" if len(mismatched) > 8 else ""
        raise ModelLoadError(f"{model_dir}: the checkpoint does not fit config.json: {'; '.join(parts)}{more}. "
                             "A tensor of the wrong shape would be initialised at random; fix the config or the "
                             "checkpoint")
    down = [n for n in missing if _weights.match_down_proj(n) is not None]
    found = []
    if missing:
        found.append(f"{len(missing)} tensor(s) the model needs are not in the checkpoint (transformers would "
                     f"initialise them at random): {_grouped(missing)}")
    if unexpected:
        files = sorted({str(ckpt[n][0]) for n in unexpected if n in ckpt})
        found.append(f"{len(unexpected)} checkpoint tensor(s) have no place in the model config.json describes "
                     f"(they would be ignored): {_grouped(unexpected)}" + (f" (in {', '.join(files)})" if files else ""))
    if not found:
        return []
    what = "; ".join(found)
    if not allow_missing or down:
        hint = (" MLP down-projections are measured and are never allowed to be missing." if down and allow_missing
                else " If these are heads that are tied or unused, --allow-missing (allow_missing=True) downgrades "
                     "this to a warning recorded in summary.json.")
        raise ModelLoadError(f"{model_dir}: config.json and the weights disagree (e.g. num_hidden_layers, or a "
                             f"shard or tensor missing): {what}.{hint}")
    msg = f"{model_dir}: --allow-missing: {what}"
    logger.warning("%s", msg)
    return [msg]


def _map_budget(device: str, device_map: str, max_memory):
    """Checks the device-map options; ``--device cpu`` restricts the map to the CPU (and disk)."""
    require("accelerate", what="--device-map")
    if device_map not in DEVICE_MAPS:
        raise ValueError(f"--device-map must be one of {', '.join(DEVICE_MAPS)}, got {device_map!r}")
    if isinstance(max_memory, str) or max_memory is None:
        max_memory = parse_max_memory(max_memory)
    if device not in ("auto", "cpu"):
        raise ValueError(f"--device {device} with --device-map: the map chooses the devices; give --device auto "
                         "(GPUs, CPU, disk) or cpu (CPU and disk), and --max-memory to choose GPUs or budgets")
    if device == "cpu":
        gpus = [k for k in (max_memory or {}) if k != "cpu"]
        if gpus:
            raise ValueError(f"--device cpu with --max-memory for {gpus}: the map may use the CPU (and disk) only")
        if max_memory is None:
            from accelerate.utils import get_max_memory

            max_memory = {"cpu": get_max_memory()["cpu"]}
    return max_memory


def wrap_model(
    model: nn.Module,
    tokenizer,
    path: Optional[Union[str, Path]] = None,
    *,
    has_lm_head: Optional[bool] = None,
    device: Optional[torch.device] = None,
) -> LoadedModel:
    """Wrap an in-memory transformers model and its tokenizer into a :class:`LoadedModel`.

    The MLP down-projections are found with :func:`find_mlp_sites`, hinted by the config's
    MLP width and layer count. The tokenizer gets a pad token (EOS, else UNK) when it has
    none. ``path``: where the model came from, if anywhere (``None`` for a model built in
    memory). ``has_lm_head``: default, whether the model's class is a causal LM
    (``...ForCausalLM``/``...LMHeadModel``). ``device``: where inputs go; default, the
    device of the first parameter, or for a model dispatched by accelerate (``device_map``)
    the execution device of its input embeddings; each layer's execution device goes to
    :attr:`LoadedModel.layer_devices`. The model is used as it is: its mode (train/eval),
    device and dtype are left alone.
    """
    import transformers

    cfg = model.config
    archs = list(getattr(cfg, "architectures", None) or [])
    if has_lm_head is None:
        has_lm_head = type(model).__name__.endswith(_CAUSAL_SUFFIXES)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token if tokenizer.eos_token is not None else tokenizer.unk_token
    n_layers = None
    for c in (cfg, getattr(cfg, "text_config", None)):
        if c is not None and n_layers is None:
            n_layers = getattr(c, "num_hidden_layers", None) or getattr(c, "n_layer", None)
    first = next(model.parameters())
    sites = find_mlp_sites(model, _d_ff_from_config(cfg), n_layers)
    if getattr(model, "hf_device_map", None) is not None or any(
            hasattr(m, "_hf_hook") for m in (model, *(s.module for s in sites))):
        # Dispatched by accelerate: inputs go where the embeddings run, each layer computes
        # on its execution device (its weights may be meta: offloaded).
        dev_in, layer_devices = _mapped_devices(model, sites)
        device = dev_in if device is None else torch.device(device)
    else:
        device = first.device if device is None else torch.device(device)
        layer_devices = [device] * len(sites)
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        path=Path(path) if path is not None else None,
        model_type=cfg.model_type,
        architecture=archs[0] if archs else type(model).__name__,
        has_lm_head=bool(has_lm_head),
        sites=sites,
        device=device,
        dtype=first.dtype,
        info={"transformers": transformers.__version__, "torch": torch.__version__},
        layer_devices=layer_devices,
    )
