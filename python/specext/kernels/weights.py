"""Where each layer's MLP down-projection is, and its weights streamed from safetensors.

The down-projection ("value") matrix of layer ``l`` maps the ``d_ff`` MLP neurons
back to the residual stream: ``W_out[l]`` has shape ``(d_model, d_ff)`` and column
``i`` is the value vector written by neuron ``i``.  This module yields those
matrices one layer at a time straight from the checkpoint files, so computing
per-neuron statistics for a 70B model needs roughly one layer of RAM
(``d_model * d_ff`` elements, ~0.5 GB in bf16 for Llama-70B) rather than the
whole model.

**The one table of where a down-projection is.** ``_RULES`` below, per architecture
family, names the down-projection of layer ``N`` (e.g. ``layers.N.mlp.down_proj`` for
Llama, ``h.N.mlp.c_proj`` for GPT-2, stored transposed).  Both sides read it: the
checkpoint side (:func:`find_down_proj_names` over tensor names) and the model side
(:func:`specext.models.loading.find_mlp_sites` over the loaded model's parameter
names), so a loaded module and a checkpoint tensor are the same layer's
down-projection exactly when they have the same name under the table, wrapper
prefixes (``model.``, ``bert.`` ...) aside (:func:`match_down_proj`).  A new
architecture is one row here.

Safety: only ``*.safetensors`` files are ever opened.  Pickled checkpoints
(``*.bin``, ``*.pt`` ...) are never loaded because unpickling executes code.

Public API: :class:`DownProj`, :class:`DownProjTensor`, :class:`DownProjName`,
:func:`match_down_proj`, :func:`find_down_proj_names`, :func:`down_proj_tensors`,
:func:`down_proj_shapes`, :func:`iter_down_proj`, :func:`iter_value_vector_norms`.
"""

from __future__ import annotations

import itertools
import json
import logging
import os
import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Dict, Iterable, Iterator, List, Mapping, NamedTuple, Optional, Sequence, Tuple, Union

import torch
from safetensors import safe_open

__all__ = [
    "DownProj", "DownProjTensor", "DownProjName", "match_down_proj", "find_down_proj_names", "down_proj_tensors",
    "down_proj_shapes", "iter_down_proj", "iter_value_vector_norms", "check_safetensors", "checkpoint_tensors",
]

logger = logging.getLogger(__name__)

PathLike = Union[str, "os.PathLike[str]"]

INDEX_NAME = "model.safetensors.index.json"
SINGLE_NAME = "model.safetensors"  # what transformers loads, before any index, when it exists
CONFIG_NAME = "config.json"
_PICKLE_SUFFIXES = (".bin", ".pt", ".pth", ".ckpt", ".pkl")
# Quantised or packed dtypes cannot be turned into real-valued vectors without
# their scale tensors, so they are rejected instead of silently misread.
_FLOAT_DTYPES = {"F16", "BF16", "F32", "F64"}

# Wrapper prefixes seen in HF checkpoints and module trees (CausalLM heads, multimodal
# wrappers, encoder heads).  A closed list rather than "any prefix" so that a vision tower,
# an encoder-decoder's encoder or an MTP head with a similarly named MLP is not mistaken
# for the LM's layers.
_PREFIX = (
    r"(?:(?:model|transformer|gpt_neox|language_model|bert|roberta|electra|deberta|distilbert"
    r"|base_model)\.)*"
)

# The one table (see the module docstring): (family, path of layer N's down-projection
# after the wrapper prefix, without ".weight"; stored_transposed).  stored_transposed is
# True when the weight is stored (d_ff, d_model), i.e. GPT-2's Conv1D.
_RULES: Tuple[Tuple[str, str, bool], ...] = (
    ("llama", r"layers\.(\d+)\.mlp\.down_proj", False),  # + Qwen, Mistral, Gemma, OLMo, Phi-3, StableLM, Nemotron
    ("gpt2", r"h\.(\d+)\.mlp\.c_proj", True),
    ("gpt_neox", r"layers\.(\d+)\.mlp\.dense_4h_to_h", False),  # + Pythia, Persimmon
    ("falcon", r"h\.(\d+)\.mlp\.dense_4h_to_h", False),  # + BLOOM
    ("bert", r"encoder\.layer\.(\d+)\.output\.dense", False),  # + RoBERTa, ELECTRA
    ("phi", r"layers\.(\d+)\.mlp\.fc2", False),  # Phi-1, Phi-1.5, Phi-2
    ("opt", r"decoder\.layers\.(\d+)\.fc2", False),
    ("gptj", r"h\.(\d+)\.mlp\.fc_out", False),  # + CodeGen
    ("mpt", r"blocks\.(\d+)\.ffn\.down_proj", False),
    ("starcoder2", r"layers\.(\d+)\.mlp\.c_proj", False),
    ("distilbert", r"layer\.(\d+)\.ffn\.lin2", False),
)
_FAMILIES: Tuple[Tuple[str, "re.Pattern[str]", bool], ...] = tuple(
    (family, re.compile(rf"^{_PREFIX}(?P<rel>{path.replace('(' + chr(92) + 'd+)', '(?P<layer>' + chr(92) + 'd+)')}"
                        rf"\.weight)$"), transposed)
    for family, path, transposed in _RULES
)
# config model_type -> (family, stored_transposed): architectures that keep another
# family's names but store the matrix the other way (GPT-BigCode: GPT-2 names, nn.Linear).
_LAYOUT_BY_MODEL_TYPE = {"gpt_bigcode": ("gpt2", False)}
_SUPPORTED = ", ".join(f"*.{path.replace(chr(92), '').replace('(d+)', 'N')}.weight ({family})"
                       for family, path, _ in _RULES)

_MOE_RE = re.compile(r"(?:^|\.)(?:block_sparse_moe|experts|shared_experts?)\.")
_LAYER_RE = re.compile(r"(?:^|\.)(?:layers|layer|h|blocks)\.(\d+)\.")
# Sibling tensors that mark a quantised linear (bitsandbytes, FP8, GPTQ/AWQ).
_QUANT_SUFFIXES = (".weight_scale", ".weight_scale_inv", ".weight.absmax", ".SCB", ".qweight", ".scales")

_CONFIG_DFF_KEYS = ("intermediate_size", "n_inner", "ffn_hidden_size")
_CONFIG_DMODEL_KEYS = ("hidden_size", "n_embd", "d_model")
_CONFIG_NLAYER_KEYS = ("num_hidden_layers", "n_layer")


@dataclass(frozen=True, eq=False)
class DownProj:
    """One layer's MLP down-projection.

    Attributes:
        layer: 0-based layer index.
        name: tensor name in the checkpoint, e.g. ``"model.layers.3.mlp.down_proj.weight"``.
        file: path of the safetensors file the tensor was read from.
        weight: shape ``(d_model, d_ff)``; column ``i`` is the value vector of
            neuron ``i`` (units: the checkpoint's own, no rescaling).  For GPT-2
            Conv1D checkpoints (stored ``(d_ff, d_model)``) this is a transposed
            view of the stored tensor, not a copy, so it is not contiguous.
        transposed: True when ``weight`` is a transpose of the stored tensor.

    Equality and hashing are by identity: comparing tensors element-wise in
    ``__eq__`` would be ambiguous and expensive.
    """

    layer: int
    name: str
    file: str
    weight: torch.Tensor = field(repr=False)
    transposed: bool

    def __repr__(self) -> str:
        return (
            f"DownProj(layer={self.layer}, name={self.name!r}, file={self.file!r}, "
            f"shape={tuple(self.weight.shape)}, dtype={self.weight.dtype}, "
            f"transposed={self.transposed})"
        )


@dataclass(frozen=True)
class DownProjTensor:
    """Where one layer's down-projection is in a checkpoint (from the file headers only).

    Attributes:
        layer: 0-based layer index.
        name: tensor name, e.g. ``"model.layers.3.mlp.down_proj.weight"``.
        file: the safetensors file holding it.
        transposed: stored ``(d_ff, d_model)`` (GPT-2 Conv1D).
        stored_shape: the shape in the file.
        family: the row of the naming table that matched (``"llama"``, ``"gpt2"`` ...).
    """

    layer: int
    name: str
    file: Path
    transposed: bool
    stored_shape: Tuple[int, int]
    family: str = ""

    @property
    def shape(self) -> Tuple[int, int]:
        """(d_model, d_ff) after undoing the Conv1D layout."""
        a, b = self.stored_shape
        return (b, a) if self.transposed else (a, b)


class DownProjName(NamedTuple):
    """A name the naming table recognises (:func:`match_down_proj`)."""

    family: str
    layer: int
    transposed: bool
    relative: str  # the name without its wrapper prefix, e.g. "layers.3.mlp.down_proj.weight"


# --------------------------------------------------------------------------- names


def _sample(names: Sequence[str], k: int = 12) -> str:
    shown = ", ".join(repr(n) for n in names[:k])
    more = f", ... ({len(names) - k} more)" if len(names) > k else ""
    return f"[{shown}{more}]"


def _model_type(config: Any) -> Optional[str]:
    if config is None:
        return None
    mt = _as_dict(config).get("model_type")
    return mt if isinstance(mt, str) else None


def match_down_proj(name: str, model_type: Optional[str] = None) -> Optional[DownProjName]:
    """The naming table's verdict on one tensor or parameter name.

    Args:
        name: a checkpoint tensor name or a model's parameter name (``....weight``).
        model_type: the config's ``model_type``, which picks the layout where one
            naming has two (GPT-2's Conv1D and GPT-BigCode's Linear ``c_proj``).

    Returns:
        :class:`DownProjName` when ``name`` is some layer's down-projection weight,
        else None.  Two names denote the same layer's down-projection exactly when
        their ``relative`` parts are equal.
    """
    for family, rx, transposed in _FAMILIES:
        m = rx.match(name)
        if m:
            layout = _LAYOUT_BY_MODEL_TYPE.get(model_type or "")
            if layout is not None and layout[0] == family:
                transposed = layout[1]
            return DownProjName(family, int(m.group("layer")), transposed, m.group("rel"))
    return None


def find_down_proj_names(
    names: Iterable[str], config: Optional[Mapping[str, Any]] = None
) -> List[Tuple[int, str, bool]]:
    """Pick the MLP down-projection weight of every layer out of a checkpoint's tensor names.

    Args:
        names: all tensor names of the checkpoint.
        config: parsed ``config.json`` (optional).  When it has
            ``num_hidden_layers`` / ``n_layer`` (top level, or in ``text_config``
            for multimodal wrappers) the number of layers found must equal it.

    Returns:
        ``(layer, tensor_name, stored_transposed)`` sorted by layer, one per layer,
        layers numbered ``0 .. n_layers-1``.  ``stored_transposed`` is True for
        GPT-2 Conv1D tensors stored as ``(d_ff, d_model)``.

    Raises:
        ValueError: no recognised name (the message lists a sample of the names
            seen), a mixture-of-experts or quantised checkpoint, several
            candidates for one layer, or a layer count that is not contiguous or
            disagrees with ``config``.
    """
    all_names = sorted(set(names))
    cfg = None if config is None else _as_dict(config)
    if cfg is not None and cfg.get("is_encoder_decoder"):
        raise ValueError(f"encoder-decoder models ({cfg.get('model_type')}) are not supported: their decoder "
                         "layers would be read without the encoder's")
    model_type = _model_type(cfg)
    by_family: Dict[str, Dict[int, List[str]]] = {}
    transposed_of: Dict[str, bool] = {}
    for n in all_names:
        hit = match_down_proj(n, model_type)
        if hit is not None:
            by_family.setdefault(hit.family, {}).setdefault(hit.layer, []).append(n)
            transposed_of[hit.family] = hit.transposed

    moe_names = [n for n in all_names if _MOE_RE.search(n)]
    dense_layers = {layer for fam in by_family.values() for layer in fam}
    # A MoE model may still have a few dense layers (DeepSeek's first_k_dense),
    # so experts in any layer without a dense match mean we would miss FFNs.
    moe_layers = set()
    for n in moe_names:
        m = _LAYER_RE.search(n)
        moe_layers.add(int(m.group(1)) if m else -1)
    if moe_names and (not by_family or moe_layers - dense_layers):
        raise ValueError(
            "mixture-of-experts models are not supported yet (found expert tensors "
            f"such as {_sample(moe_names, 4)}); only dense MLP down-projections can be read"
        )

    if not by_family:
        raise ValueError(
            f"no MLP down-projection weight recognised among {len(all_names)} tensor names "
            f"{_sample(all_names)}; supported (the table in specext.kernels.weights): {_SUPPORTED}"
        )
    if len(by_family) > 1:
        examples = {f: next(iter(d.values()))[0] for f, d in by_family.items()}
        raise ValueError(
            f"ambiguous checkpoint: tensor names of several model families match {examples}"
        )

    (family, layers), = by_family.items()
    dupes = {layer: ns for layer, ns in layers.items() if len(ns) > 1}
    if dupes:
        layer = min(dupes)
        raise ValueError(
            f"several down-projection candidates for layer {layer}: {dupes[layer]} "
            f"({len(dupes)} layer(s) affected); expected exactly one per layer"
        )

    name_set = set(all_names)
    for ns in layers.values():
        base = ns[0][: -len(".weight")]
        quant = [base + s for s in _QUANT_SUFFIXES if base + s in name_set]
        if quant:
            raise ValueError(
                f"quantised checkpoints are not supported: {ns[0]!r} comes with {quant}; "
                "use an unquantised (fp16/bf16/fp32) checkpoint"
            )

    found = sorted(layers)
    missing = sorted(set(range(found[-1] + 1)) - set(found))
    if missing:
        raise ValueError(
            f"down-projection weights missing for layer(s) {missing[:20]} "
            f"(found {len(found)} layers up to {found[-1]}); is a shard missing?"
        )
    if cfg is not None:
        key, n_cfg = _config_int(cfg, _CONFIG_NLAYER_KEYS)
        if isinstance(n_cfg, int) and n_cfg != len(found):
            raise ValueError(
                f"found {len(found)} down-projection layers ({family} naming) but config "
                f"{key} = {n_cfg}"
            )

    transposed = transposed_of[family]
    logger.debug("matched %d layers with %s naming", len(found), family)
    return [(layer, layers[layer][0], transposed) for layer in found]


# -------------------------------------------------------------------------- config


def _as_dict(config: Any) -> Dict[str, Any]:
    if isinstance(config, Mapping):
        return dict(config)
    to_dict = getattr(config, "to_dict", None)  # a transformers PretrainedConfig
    if callable(to_dict):
        return to_dict()
    raise ValueError(f"config must be a mapping (parsed config.json), got {type(config).__name__}")


def _config_int(cfg: Mapping[str, Any], keys: Sequence[str]) -> Tuple[Optional[str], Any]:
    """First non-null value of ``keys``, top level first, then ``text_config``.

    Returns ``(key_path, value)`` or ``(None, None)``; ``key_path`` is e.g.
    ``"text_config.intermediate_size"`` so errors point at the right field.
    """
    scopes: List[Tuple[str, Mapping[str, Any]]] = [("", cfg)]
    text = cfg.get("text_config")
    if isinstance(text, Mapping):
        scopes.append(("text_config.", text))
    for prefix, scope in scopes:
        for k in keys:
            v = scope.get(k)
            if v is not None:
                return prefix + k, v
    return None, None


def _load_config(model_dir: Path) -> Optional[Dict[str, Any]]:
    path = model_dir / CONFIG_NAME
    if not path.is_file():
        return None
    try:
        with open(path, "r", encoding="utf-8") as fh:
            cfg = json.load(fh)
    except (OSError, json.JSONDecodeError) as exc:
        raise ValueError(f"cannot parse {path}: {exc}") from exc
    if not isinstance(cfg, dict):
        raise ValueError(f"{path} does not hold a JSON object")
    return cfg


def _check_shapes(entries: Sequence[DownProjTensor], cfg: Optional[Mapping[str, Any]], family_gpt2: bool) -> None:
    if cfg is None:
        return
    dff_key, dff = _config_int(cfg, _CONFIG_DFF_KEYS)
    dm_key, dm = _config_int(cfg, _CONFIG_DMODEL_KEYS)
    if dff is None and family_gpt2 and isinstance(dm, int):
        # GPT-2 configs leave n_inner null and mean 4 * n_embd.
        dff_key, dff = f"4 * {dm_key}", 4 * dm
    for e in entries:
        d_model, d_ff = e.shape
        want = dff
        if isinstance(dff, (list, tuple)):  # per-layer widths (Gemma 3n, OpenELM)
            want = dff[e.layer] if e.layer < len(dff) else None
        if isinstance(want, int) and d_ff != want:
            raise ValueError(
                f"{e.name!r} has shape {e.stored_shape} (stored), i.e. d_ff = {d_ff}, but "
                f"config {dff_key} = {want}"
            )
        if isinstance(dm, int) and d_model != dm:
            raise ValueError(
                f"{e.name!r} has shape {e.stored_shape} (stored), i.e. d_model = {d_model}, "
                f"but config {dm_key} = {dm}"
            )


# --------------------------------------------------------------------------- files


def _resolve_inside(model_dir: Path, rel: str, index_path: Path) -> Path:
    # The index is untrusted input: keep it from pointing outside the model
    # directory or at a non-safetensors (possibly pickled) file.
    p = Path(rel)
    if p.is_absolute() or ".." in p.parts or not rel.endswith(".safetensors"):
        raise ValueError(f"{index_path} maps tensors to {rel!r}, which is not a .safetensors file inside {model_dir}")
    return model_dir / p


def _index_map(directory: Path) -> Optional[Dict[str, Path]]:
    """``{tensor name: file}`` from the directory's ``model.safetensors.index.json`` (files
    resolved inside the directory), or None without one. A folder with an index *and* a
    ``model.safetensors`` the index does not name holds two checkpoints: transformers loads
    ``model.safetensors`` (it wins over the index) while the index names other shards, so the
    weights specext reads (value-vector norms, validation) would not be the weights that ran:
    a ``ValueError``."""
    index = directory / INDEX_NAME
    if not index.is_file():
        return None
    try:
        with open(index, "r", encoding="utf-8") as fh:
            weight_map = json.load(fh).get("weight_map")
    except (OSError, ValueError, AttributeError) as exc:
        raise ValueError(f"cannot parse {index}: {exc}") from None
    if not isinstance(weight_map, dict) or not weight_map:
        raise ValueError(f"{index} has no 'weight_map' object")
    mapping = {n: _resolve_inside(directory, f, index) for n, f in weight_map.items()}
    files = set(mapping.values())
    single = directory / SINGLE_NAME
    if single.is_file() and single.resolve() not in {f.resolve() for f in files}:
        raise ValueError(f"{directory} holds two checkpoints: {SINGLE_NAME} and {index.name}, which names other "
                         f"files ({', '.join(sorted(f.name for f in files)[:3])}...). transformers would "
                         f"load {SINGLE_NAME} and ignore the index; remove the one that is not this model's")
    return mapping


def _name_to_file(model_dir: PathLike) -> Tuple[Path, Dict[str, Path], Optional[Dict[str, List[Path]]]]:
    """Map every tensor name to its safetensors file.

    Returns ``(directory, {name: file}, conflicts)`` where ``conflicts`` maps names
    found in several files (no index to arbitrate) to those files, and is None
    when the mapping came from an index.  Reads only the index or the file
    headers, never tensor data.
    """
    path = Path(model_dir).expanduser()
    if not path.exists():
        raise FileNotFoundError(f"model directory {path} does not exist")
    if path.is_file():
        if path.suffix != ".safetensors":
            raise FileNotFoundError(
                f"{path} is not a directory or a .safetensors file; safetensors weights are required"
            )
        files, directory = [path], path.parent
    else:
        directory = path
        mapping = _index_map(directory)
        if mapping is not None:
            return directory, mapping, None
        files = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
        if not files:
            pickled = sorted(p.name for p in directory.iterdir() if p.suffix in _PICKLE_SUFFIXES)
            if pickled:
                raise FileNotFoundError(
                    f"safetensors weights are required but {directory} holds only pickled "
                    f"weights {pickled[:5]}, which are never loaded because unpickling can "
                    "execute code; convert the checkpoint to safetensors first"
                )
            raise FileNotFoundError(f"no *.safetensors files in {directory}")

    mapping: Dict[str, Path] = {}
    conflicts: Dict[str, List[Path]] = {}
    for f in files:
        with safe_open(str(f), framework="pt") as h:
            for n in h.keys():
                if n in mapping:
                    # Only fatal if it is a tensor we read; checked by the caller.
                    conflicts.setdefault(n, [mapping[n]]).append(f)
                else:
                    mapping[n] = f
    return directory, mapping, conflicts


# Bits per element of every safetensors dtype (the format's own list; sub-byte floats pack).
_DTYPE_BITS = {"BOOL": 8, "U8": 8, "I8": 8, "F8_E5M2": 8, "F8_E4M3": 8, "F8_E8M0": 8, "I16": 16, "U16": 16,
               "F16": 16, "BF16": 16, "I32": 32, "U32": 32, "F32": 32, "I64": 64, "U64": 64, "F64": 64,
               "C64": 64, "F4": 4, "F6_E2M3": 6, "F6_E3M2": 6}
_MAX_HEADER = 100_000_000  # safetensors' own limit on the JSON header


def check_safetensors(path: PathLike) -> Dict[str, Tuple[str, Tuple[int, ...]]]:
    """Validate one safetensors file from its header and size alone (no tensor data read):
    the 8-byte header length fits the file, the header is a JSON object, every tensor has a
    known dtype, a shape of non-negative ints and offsets ``[begin, end]`` whose length is
    exactly what dtype and shape need, the tensors tile the data area without gap or
    overlap, and the file ends where the last tensor does (not cut short, nothing after).

    Returns ``{name: (dtype, shape)}``. Raises ``ValueError`` naming the file and what is
    wrong (and the tensor, where one is), e.g. for a file cut short by a copy."""
    path = Path(path)
    size = path.stat().st_size
    bad = f"{path} is not a valid safetensors file"
    if size < 8:
        raise ValueError(f"{bad}: it has {size} bytes, fewer than the 8 of the header length (empty or cut short)")
    with open(path, "rb") as fh:
        n = int.from_bytes(fh.read(8), "little")
        if n > size - 8 or n > _MAX_HEADER:
            raise ValueError(f"{bad}: its first 8 bytes give a header of {n} bytes, but the file has {size} bytes "
                             f"in all ({'cut short, or ' if n <= _MAX_HEADER else ''}not a safetensors file)")
        raw = fh.read(n)
    try:
        head = json.loads(raw.decode("utf-8"))
    except (UnicodeDecodeError, ValueError) as exc:
        raise ValueError(f"{bad}: its {n}-byte header is not JSON (garbage or overwritten header: {exc})") from None
    if not isinstance(head, dict):
        raise ValueError(f"{bad}: its header is a JSON {type(head).__name__}, not an object")
    data = size - 8 - n
    out: Dict[str, Tuple[str, Tuple[int, ...]]] = {}
    spans = []
    for name, e in head.items():
        if name == "__metadata__":
            continue
        where = f"{path}: tensor {name!r}"
        if not isinstance(e, dict):
            raise ValueError(f"{where}: header entry is not an object ({e!r:.80})")
        dt, shape, offs = e.get("dtype"), e.get("shape"), e.get("data_offsets")
        if dt not in _DTYPE_BITS:
            raise ValueError(f"{where}: unknown dtype {dt!r} (garbage header?)")
        if not (isinstance(shape, list) and all(isinstance(d, int) and not isinstance(d, bool) and d >= 0
                                                for d in shape)):
            raise ValueError(f"{where}: shape {shape!r} is not a list of non-negative integers")
        if not (isinstance(offs, list) and len(offs) == 2 and all(isinstance(o, int) and not isinstance(o, bool)
                                                                  for o in offs) and 0 <= offs[0] <= offs[1]):
            raise ValueError(f"{where}: data_offsets {offs!r} are not [begin, end] with 0 <= begin <= end")
        numel = 1
        for d in shape:
            numel *= d
        need = -(-numel * _DTYPE_BITS[dt] // 8)
        if offs[1] - offs[0] != need:
            raise ValueError(f"{where}: shape {tuple(shape)} of {dt} needs {need} bytes but its data_offsets "
                             f"{offs} hold {offs[1] - offs[0]}: the shape does not fit the offsets")
        out[name] = (dt, tuple(shape))
        spans.append((offs[0], offs[1], name))
    spans.sort()
    pos = 0
    for b, e, name in spans:
        if b != pos:
            what = "overlaps the previous tensor" if b < pos else f"leaves a gap of {b - pos} bytes before it"
            raise ValueError(f"{path}: tensor {name!r} starts at data byte {b}, which {what} (ends at {pos})")
        pos = e
    if pos > data:
        last = spans[-1][2]
        raise ValueError(f"{path} is cut short: its tensors need {pos} bytes of data (up to the end of {last!r}) "
                         f"but the file holds {data} after its header ({size} bytes in all; "
                         f"{pos - data} missing): truncated download or copy?")
    if pos < data:
        raise ValueError(f"{bad}: {data - pos} bytes follow the last tensor's data (damaged or not one file)")
    return out


def checkpoint_tensors(model_dir: PathLike) -> Dict[str, Tuple[Path, str, Tuple[int, ...]]]:
    """Validate every safetensors file a model directory loads from (those its index names,
    else every ``*.safetensors``) with :func:`check_safetensors`, before anything loads them.

    Returns ``{tensor name: (file, dtype, shape)}``; raises ``ValueError`` naming the file
    (a damaged one, a tensor in two files, an index entry that its file does not hold) or
    ``FileNotFoundError`` (a file the index names is missing)."""
    directory = Path(model_dir)
    index = directory / INDEX_NAME
    wanted = _index_map(directory)
    if wanted is not None:
        files = sorted(set(wanted.values()))
        for f in files:
            if not f.is_file():
                raise FileNotFoundError(f"{index} maps tensors to {f.name}, which does not exist in {directory}")
    else:
        files = sorted(p for p in directory.glob("*.safetensors") if p.is_file())
    out: Dict[str, Tuple[Path, str, Tuple[int, ...]]] = {}
    for f in files:
        for name, (dt, shape) in check_safetensors(f).items():
            if name in out and out[name][0] != f:
                raise ValueError(f"tensor {name!r} is in two files of {directory}: {out[name][0].name} and {f.name}")
            out[name] = (f, dt, shape)
    if wanted is not None:
        for name, f in wanted.items():
            if name not in out or out[name][0] != f:
                raise ValueError(f"{index} lists tensor {name!r} in {f.name}, but {f} does not hold it")
    return out


def _plan(model_dir: PathLike) -> Tuple[Path, List[DownProjTensor], Dict[str, Path]]:
    directory, mapping, conflicts = _name_to_file(model_dir)
    from_index = conflicts is None
    cfg = _load_config(directory)
    matches = find_down_proj_names(mapping.keys(), cfg)
    model_type = _model_type(cfg)

    for _, name, _ in matches:
        f = mapping[name]
        if conflicts and name in conflicts:
            raise ValueError(f"tensor {name!r} appears in several files {[str(p) for p in conflicts[name]]}")
        if not f.is_file():
            raise FileNotFoundError(f"{directory / INDEX_NAME} maps {name!r} to {f}, which does not exist")

    entries: List[DownProjTensor] = []
    # Header reads only: get_slice exposes shape and dtype without touching data.
    for f, group in itertools.groupby(matches, key=lambda m: mapping[m[1]]):
        with safe_open(str(f), framework="pt") as h:
            keys = set(h.keys())
            for layer, name, transposed in group:
                if name not in keys:
                    raise ValueError(
                        f"tensor {name!r} is listed in {directory / INDEX_NAME} under {f.name} "
                        f"but {f} does not contain it"
                    )
                sl = h.get_slice(name)
                shape, dt = tuple(sl.get_shape()), sl.get_dtype()
                if len(shape) != 2:
                    raise ValueError(f"{name!r} in {f} has shape {shape}; expected a 2-D matrix")
                if dt not in _FLOAT_DTYPES:
                    raise ValueError(
                        f"{name!r} in {f} has dtype {dt}; only unquantised F16/BF16/F32/F64 weights are supported"
                    )
                family = match_down_proj(name, model_type).family
                entries.append(DownProjTensor(layer, name, Path(f), transposed, (int(shape[0]), int(shape[1])), family))

    _check_shapes(entries, cfg, family_gpt2=bool(entries) and entries[0].family == "gpt2")
    logger.debug("%s: %d down-projection layers (%s)", directory, len(entries), "index" if from_index else "headers")
    return directory, entries, mapping


def _check_names(directory: Path, entries: List[DownProjTensor], names: Sequence[str],
                 mapping: Mapping[str, Path]) -> None:
    """The caller's tensor names must be exactly the ones the naming table picks, layer by layer."""
    if len(names) != len(entries):
        raise ValueError(
            f"{len(names)} down-projection tensor names were asked for (first {names[0] if names else None!r}), "
            f"but the checkpoint {directory} has {len(entries)} ({entries[0].name!r} in {entries[0].file} first)"
        )
    for e, n in zip(entries, names):
        if n != e.name:
            where = f"{n!r} is in {mapping[n]}" if n in mapping else f"{n!r} is in no file of {directory}"
            raise ValueError(
                f"layer {e.layer}: the checkpoint's down-projection is {e.name!r} in {e.file} (naming table of "
                f"specext.kernels.weights), but {n!r} was asked for ({where}); refusing to read a different tensor"
            )


# ---------------------------------------------------------------------------- API


def down_proj_tensors(model_dir: PathLike) -> List[DownProjTensor]:
    """Every layer's down-projection tensor: name, file, stored shape and layout, in layer
    order, read from the index and file headers only (no tensor data).

    Raises:
        FileNotFoundError / ValueError: as :func:`iter_down_proj`.
    """
    return _plan(model_dir)[1]


def down_proj_shapes(model_dir: PathLike) -> List[Tuple[int, Tuple[int, int]]]:
    """Shapes of all down-projection weights, read from file headers only.

    Args:
        model_dir: checkpoint directory (or a single ``.safetensors`` file).

    Returns:
        ``[(layer, (d_model, d_ff)), ...]`` in layer order, already in the
        ``(d_model, d_ff)`` orientation that :func:`iter_down_proj` yields.

    Raises:
        FileNotFoundError / ValueError: as :func:`iter_down_proj`.
    """
    return [(e.layer, e.shape) for e in down_proj_tensors(model_dir)]


def iter_down_proj(
    model_dir: PathLike,
    *,
    dtype: Optional[torch.dtype] = None,
    device: Union[str, torch.device] = "cpu",
    names: Optional[Sequence[str]] = None,
) -> Iterator[DownProj]:
    """Yield each layer's down-projection weight in layer order, one layer in memory at a time.

    The whole checkpoint is validated (names, files, header shapes against
    ``config.json`` when present) before the first layer is read, so a broken
    checkpoint fails fast.  Each tensor is read with ``safe_open(...).get_tensor``
    from a handle opened for that tensor alone: safetensors maps the file and the
    tensor's pages stay resident (and count in the process's RSS) while a handle is
    open, so one handle per shard would accumulate every layer of the shard.  Other
    tensors are never loaded.  The generator keeps no reference to a yielded layer,
    so memory is bounded by what the consumer keeps.

    Args:
        model_dir: checkpoint directory holding ``model.safetensors``, or shards
            with ``model.safetensors.index.json``, or shards without an index;
            or a single ``.safetensors`` file.
        dtype: if given, each weight is converted with ``.to(dtype)`` after loading.
        device: the weight is moved there after loading (before any conversion).
        names: the tensor names the caller expects, one per layer in layer order
            (e.g. those :func:`specext.models.load_model` bound to the loaded
            modules).  They must be exactly the tensors the naming table picks;
            otherwise ValueError naming both tensors and their files, and nothing
            is read.

    Yields:
        :class:`DownProj` with ``weight`` of shape ``(d_model, d_ff)``.

    Raises:
        FileNotFoundError: missing directory, no safetensors files (including a
            directory with only pickled ``.bin``/``.pt`` weights), or an index
            entry pointing at a missing file.
        ValueError: unrecognised/ambiguous names, MoE or quantised checkpoints,
            a tensor missing from the file the index names, shapes / layer
            counts that disagree with the config, or ``names`` that are not the
            checkpoint's down-projections.
    """
    # Validation runs eagerly (not at first next()) so errors surface at the call site.
    directory, entries, mapping = _plan(model_dir)
    if names is not None:
        _check_names(directory, entries, list(names), mapping)
    return _stream(entries, dtype, torch.device(device))


def _stream(entries: List[DownProjTensor], dtype: Optional[torch.dtype], device: torch.device) -> Iterator[DownProj]:
    for e in entries:
        # Built inside the yield expression so the suspended frame holds no
        # reference to the tensor (or its file handle) once the consumer drops it.
        yield _load(e, dtype, device)


def _load(e: DownProjTensor, dtype: Optional[torch.dtype], device: torch.device) -> DownProj:
    with safe_open(str(e.file), framework="pt") as h:
        t = h.get_tensor(e.name)
    if tuple(t.shape) != e.stored_shape:
        raise ValueError(f"{e.name!r} in {e.file}: header shape {e.stored_shape} but loaded {tuple(t.shape)}")
    t = t.to(device)
    if dtype is not None:
        t = t.to(dtype)
    if e.transposed:
        t = t.T
    logger.debug(
        "layer %d: %s from %s, shape (d_model, d_ff) = %s, %s%s",
        e.layer, e.name, e.file.name, tuple(t.shape), t.dtype, " (transposed view)" if e.transposed else "",
    )
    return DownProj(layer=e.layer, name=e.name, file=str(e.file), weight=t, transposed=e.transposed)


def iter_value_vector_norms(
    model_dir: PathLike,
    *,
    device: Union[str, torch.device] = "cpu",
    dtype: Optional[torch.dtype] = None,
    names: Optional[Sequence[str]] = None,
) -> Iterator[Tuple[int, torch.Tensor]]:
    """Yield ``(layer, norms)`` with the L2 norm of every value vector of each layer.

    Streams :func:`iter_down_proj` (one layer in memory at a time) through
    :func:`specext.ops.value_vector_norms` on ``device`` (CPU or CUDA), so the norms
    of a 70B model need about one layer of memory.  ``dtype``: convert each layer
    first (default: as stored), e.g. to the dtype a model was loaded in, so that
    the norms are those of the weights it runs with.  ``names``: as
    :func:`iter_down_proj`.  ``norms`` is ``(d_ff,)`` float32 on ``device``.
    """
    # Validation is eager, as in iter_down_proj.
    return _norms(iter_down_proj(model_dir, device=device, dtype=dtype, names=names))


def _norms(layers: Iterator[DownProj]) -> Iterator[Tuple[int, torch.Tensor]]:
    from specext.kernels.ops import value_vector_norms

    for dp in layers:
        layer, norms = dp.layer, value_vector_norms(dp.weight)
        # Dropped before the next layer is read, so two layers are never held at once.
        del dp
        yield layer, norms
