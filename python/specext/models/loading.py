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
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import nn

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
    return (w.data_ptr(), w._version)


@dataclass
class LoadedModel:
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

    @property
    def n_layers(self) -> int:
        return len(self.sites)

    @property
    def d_ff(self) -> int:
        return self.sites[0].d_ff

    def n_parameters(self) -> int:
        return sum(p.numel() for p in self.model.parameters())


def _check_dir(model_dir: Path, allow_pickle: bool) -> bool:
    """Refuse unusable directories; returns whether the weights load from safetensors."""
    if not model_dir.exists():
        raise FileNotFoundError(f"model directory {model_dir} does not exist")
    if not model_dir.is_dir():
        raise ModelLoadError(f"{model_dir} is not a directory (expected a Hugging Face model directory)")
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

        logger.debug("value-vector norms from the loaded modules")
        return torch.stack([value_vector_norms(s.weight().detach()).to(dev) for s in lm.sites])
    # Exactly the bound tensors, in the sites' (layer) order; the reader refuses any other.
    names = [s.tensor for s in lm.sites]
    rows = [n for _, n in _weights.iter_value_vector_norms(lm.path, device=dev, dtype=dtypes.pop(), names=names)]
    logger.debug("value-vector norms streamed from %d checkpoint tensors in %s", len(rows), lm.path)
    return torch.stack(rows)


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
) -> LoadedModel:
    """Load a local model directory (config.json, safetensors weights, tokenizer).

    ``dtype``: ``auto`` (the checkpoint's dtype), ``bfloat16``, ``float16``, ``float32``.
    Causal LMs (architectures ending in ``ForCausalLM``/``LMHeadModel``) load with their LM
    head; encoders and other bases load with ``AutoModel`` and get specialisation only.
    """
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM, AutoTokenizer

    model_dir = Path(model_dir)
    # allow_pickle permits a pickle-only checkpoint; it never forces one: safetensors win
    # whenever the directory has them.
    use_safetensors = _check_dir(model_dir, allow_pickle)
    if dtype != "auto" and dtype not in DTYPES:
        raise ValueError(f"--dtype must be auto, {', '.join(DTYPES)}; got {dtype!r}")
    dev = resolve_device(device)
    try:
        cfg = AutoConfig.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    except ValueError as e:
        raise ModelLoadError(f"{model_dir}/config.json: unsupported or unreadable config ({e})") from None
    if getattr(cfg, "is_encoder_decoder", False):
        raise ModelLoadError(f"{model_dir}: encoder-decoder models ({cfg.model_type}) are not supported")
    archs = list(getattr(cfg, "architectures", None) or [])
    causal = any(a.endswith(_CAUSAL_SUFFIXES) for a in archs)
    kwargs = dict(
        trust_remote_code=trust_remote_code,
        local_files_only=True,
        use_safetensors=use_safetensors,
        dtype=DTYPES.get(dtype, "auto"),
    )
    loader = AutoModelForCausalLM if causal else AutoModel
    try:
        model = loader.from_pretrained(model_dir, **kwargs)
    except ValueError as e:
        raise ModelLoadError(f"{model_dir}: cannot load {cfg.model_type} with {loader.__name__} ({e})") from None
    model.to(dev).eval()
    tok = AutoTokenizer.from_pretrained(model_dir, trust_remote_code=trust_remote_code, local_files_only=True)
    lm = wrap_model(model, tok, path=model_dir, has_lm_head=causal, device=dev)
    if use_safetensors:
        bind_checkpoint(lm.sites, model_dir)
    logger.info("loaded %s (%s, %d layers, d_ff %d, %s on %s, %.1fM parameters)", model_dir, lm.architecture,
                lm.n_layers, lm.d_ff, lm.dtype, dev, lm.n_parameters() / 1e6)
    return lm


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
    device of the first parameter. The model is used as it is: its mode (train/eval),
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
    return LoadedModel(
        model=model,
        tokenizer=tokenizer,
        path=Path(path) if path is not None else None,
        model_type=cfg.model_type,
        architecture=archs[0] if archs else type(model).__name__,
        has_lm_head=bool(has_lm_head),
        sites=find_mlp_sites(model, _d_ff_from_config(cfg), n_layers),
        device=first.device if device is None else torch.device(device),
        dtype=first.dtype,
        info={"transformers": transformers.__version__, "torch": torch.__version__},
    )
