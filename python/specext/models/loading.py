"""Load a local Hugging Face model directory and find every layer's MLP down-projection.

Safe by default: weights load from safetensors only (a directory with only pickled
``*.bin`` weights is refused unless ``allow_pickle=True``, which permits pickles but never
prefers them: safetensors load whenever present), ``trust_remote_code`` is off unless asked
for, nothing is downloaded (``local_files_only``).

The *coefficients* of layer ``l`` are the input of its down-projection (``act(gate x) * up x``
for gated MLPs, ``act(fc x + b)`` for classic ones), shape ``(batch, seq, d_ff)``; column
``i`` of the down-projection weight ``(d_model, d_ff)`` is value vector ``(l, i)``.
"""

from __future__ import annotations

import logging
from dataclasses import dataclass, field
from pathlib import Path
from typing import Dict, List, Optional, Union

import torch
from torch import nn

logger = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "float16": torch.float16, "bfloat16": torch.bfloat16}
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
_ATTN_WORDS = ("attn", "attention", "self_attn")
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

    def weight(self) -> torch.Tensor:
        """The down-projection as ``(d_model, d_ff)`` (a view for Conv1D)."""
        w = self.module.weight
        return w.t() if self.conv1d else w


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


def _layer_lists(model: nn.Module) -> List[tuple]:
    """Candidate (name, ModuleList) of transformer blocks: lists of >= 1 same-class blocks."""
    out = []
    for name, mod in model.named_modules():
        if isinstance(mod, nn.ModuleList) and len(mod) > 0:
            kinds = {type(m).__name__ for m in mod}
            if len(kinds) == 1:
                out.append((name, mod))
    return out


def find_mlp_sites(model: nn.Module, d_ff: Optional[int] = None, n_layers: Optional[int] = None) -> List[MlpSite]:
    """Find each transformer block's down-projection: the Linear (or GPT-2 Conv1D) inside
    the block, outside attention, whose input width is the MLP width ``d_ff``.

    Raises ``ModelLoadError`` listing the modules seen when none or several match.
    """
    lists = _layer_lists(model)
    if n_layers is not None:
        exact = [(n, m) for n, m in lists if len(m) == n_layers]
        lists = exact or lists
    best: List[MlpSite] = []
    problems = []
    for list_name, blocks in sorted(lists, key=lambda nm: -len(nm[1])):
        sites = []
        for i, block in enumerate(blocks):
            cands = []
            for sub_name, sub in block.named_modules():
                io = _in_out(sub)
                if io is None or any(w in sub_name.lower().split(".") or w in sub_name.lower() for w in _ATTN_WORDS):
                    continue
                fin, fout, conv = io
                if d_ff is not None and fin != d_ff:
                    continue
                if d_ff is None and not fin > fout:
                    continue
                cands.append((sub_name, sub, fin, fout, conv))
            if d_ff is None and len(cands) > 1:  # widest input wins without a config hint
                top = max(c[2] for c in cands)
                cands = [c for c in cands if c[2] == top]
            if len(cands) != 1:
                problems.append((list_name, i, [c[0] for c in cands]))
                sites = []
                break
            sub_name, sub, fin, fout, conv = cands[0]
            prefix = f"{list_name}.{i}." if list_name else f"{i}."
            sites.append(MlpSite(layer=i, name=prefix + sub_name, module=sub, d_ff=fin, d_model=fout, conv1d=conv))
        if sites and len(sites) > len(best):
            best = sites
    if not best:
        seen = []
        for name, mod in model.named_modules():
            io = _in_out(mod)
            if io is not None:
                seen.append(f"{name} ({type(mod).__name__} {io[0]}->{io[1]})")
            if len(seen) >= 24:
                break
        detail = "; ".join(f"{ln}[{i}] candidates {c}" for ln, i, c in problems[:3]) or "no block list found"
        raise ModelLoadError(
            f"could not find one MLP down-projection per layer (d_ff={d_ff}): {detail}. "
            f"Linear modules seen: {', '.join(seen) or 'none'}"
        )
    return best


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
