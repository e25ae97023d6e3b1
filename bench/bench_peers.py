"""Peers: per-neuron category entropy and Gini computed the way researchers do it today,
against specext, on the same model, prompts, token positions and batches:

- ``nnsight``: trace each batch, ``.save()`` every layer's down-projection input, then
  reduce with torch (mean |m| over the prompt's question tokens, per-concept sums,
  category mass, entropy and sort-based Gini in float64);
- ``hooks``: ``register_forward_pre_hook`` on each down-projection, the masked mean and an
  ``index_add_`` into per-concept sums inside the hook, then the same float64 statistics;
- ``specext``: ``Scorer`` + ``PromptStats`` (the kernel streams the statistic out of the
  forward pass) + ``ConceptMass`` + ``neuron_table``; the prompt pass only (multiple-choice
  scoring is not part of the peers' work);
- ``forward``: the same forward passes with no statistics, the floor every method pays.

    python bench/bench_peers.py                   # demo model + a random Llama (4 layers, d_ff 5632)
    python bench/bench_peers.py --quick           # 64 questions, 3 repeats
    python bench/bench_peers.py --models large --large-layers 8 --device cuda

Each method runs in its own process (its own copy of the model, built the same way); the
processes take turns, one full run at a time, in rounds whose order rotates, so drifting
machine load hits every method alike. Peak memory is the growth of the process's resident
set high-water mark (``VmHWM``, reset after loading) over its first full run, or of
``torch.cuda.max_memory_allocated`` on CUDA; that run and ``--warmup - 1`` more are
warm-up, then the median of ``--repeat`` timed runs is reported.

The *capture* cost, what a method adds to the forward pass, is measured inside each
process: every timed run times each batch of the method right next to a plain forward pass
of the same batch on a second copy of the model (which of the two goes first alternates),
and takes, per batch, the median difference over rounds, summed over batches (with a
bootstrap 95% interval over rounds). Subtracting whole runs of different processes instead
left +-100 ms of noise on a ~100 ms difference. The ``forward`` method, paired with itself, is
the null control: its capture is 0 up to the noise. Every method encodes its
batches itself (``encode_prompts(..., positions="question")``) and ends with the per-neuron
entropy and Gini; they are compared to specext's (max absolute difference).
"""

from __future__ import annotations

import argparse
import dataclasses
import importlib.util
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Callable, Dict, List, Optional, Sequence, Tuple

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402  (first: sets the OpenMP wait policy before torch loads)
import torch  # noqa: E402

from specext.analyze import DEMO_MODEL  # noqa: E402
from specext.metrics.specialization import ConceptMass, neuron_table  # noqa: E402
from specext.models import load_model  # noqa: E402
from specext.models.loading import LoadedModel, wrap_model  # noqa: E402
from specext.probes import Question, load_probe  # noqa: E402
from specext.probes.scoring import PromptStats, Scorer, encode_prompts  # noqa: E402

METHODS = ("forward", "nnsight", "hooks", "specext")
MODELS = ("demo", "large")
POSITIONS = "question"
NNSIGHT_MISSING = ("nnsight is not installed: the nnsight method is skipped "
                   "(pip install 'nnsight>=0.5' into the same environment; see bench/README.md)")

Stats = Tuple[torch.Tensor, torch.Tensor]  # entropy (L, d_ff), gini (L, d_ff)


def have_nnsight() -> bool:
    return importlib.util.find_spec("nnsight") is not None


# ---------------------------------------------------------------------------- models


def large_llama(hidden: int = 512, d_ff: int = 5632, layers: int = 4, *, device="cpu",
                dtype: torch.dtype = torch.float32, seed: int = 0) -> LoadedModel:
    """A random-weights Llama (seeded, transformers' default init) with the demo model's
    tokenizer: the shape of a small real model's MLP without downloading one."""
    from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM

    tok = AutoTokenizer.from_pretrained(DEMO_MODEL, local_files_only=True)
    heads = max(1, hidden // 64)
    cfg = LlamaConfig(vocab_size=len(tok), hidden_size=hidden, intermediate_size=d_ff, num_hidden_layers=layers,
                      num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=256,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    cfg.architectures = ["LlamaForCausalLM"]
    torch.manual_seed(seed)
    model = LlamaForCausalLM(cfg).to(device=device, dtype=dtype).eval()
    return wrap_model(model, tok, device=torch.device(device))


def build_model(kind: str, args, device: torch.device) -> LoadedModel:
    if kind == "demo":
        return load_model(DEMO_MODEL, device=str(device), dtype=args.dtype)
    dtype = torch.float32 if args.dtype == "auto" else h.DTYPES[args.dtype]
    return large_llama(args.large_hidden, args.large_d_ff, args.large_layers, device=device, dtype=dtype)


def questions_of(args) -> Tuple[object, List[Question]]:
    """The probe and the questions to run: all of them, or ``--questions N`` spread evenly
    over the probe (so every category keeps prompts)."""
    probe = load_probe(args.probe)
    qs = probe.questions
    n = args.questions
    if n and n < len(qs):
        qs = [qs[i * len(qs) // n] for i in range(n)]
    return probe, list(qs)


def batches(qs: Sequence[Question], batch_size: int) -> List[Sequence[Question]]:
    return [qs[i : i + batch_size] for i in range(0, len(qs), batch_size)]


def _forward(lm: LoadedModel, enc):
    # The prompt pass specext's Scorer makes for a model scored without an LM head: every
    # method runs exactly this call.
    return lm.model(input_ids=enc.input_ids, attention_mask=enc.attention_mask, position_ids=enc.position_ids,
                    use_cache=False)


# ---------------------------------------------------------------------------- plain torch


def prompt_means(m: torch.Tensor, select: torch.Tensor) -> torch.Tensor:
    """``(B, d_ff)`` float32: mean of ``|m|`` over each prompt's selected tokens.
    ``m: (B, S, d_ff)`` coefficients, ``select: (B, S)`` bool."""
    w = select.to(torch.float32)
    return (m.float().abs() * w[..., None]).sum(1) / w.sum(1, keepdim=True).clamp_min(1)


def torch_specialisation(concept_sums: torch.Tensor, concept_counts: torch.Tensor,
                         concept_category: Sequence[int], n_categories: int) -> Stats:
    """Category mass -> per-neuron entropy (nats) and Gini, in float64 torch.

    ``concept_sums (K, L, d_ff)`` sums of prompt statistics per concept, ``concept_counts
    (K,)`` prompts per concept. Mass ``M[c] = sum of c's concepts' sums / their prompts``;
    ``p = M / sum_c M``, ``H = -sum p ln p``, ``G = sum_i (2i - C - 1) x_(i) / (C sum x)`` over
    the sorted masses, over the categories that have prompts. Neurons with zero total mass
    are NaN."""
    dev = concept_sums.device
    cat = torch.as_tensor(list(concept_category), dtype=torch.long, device=dev)
    sums = torch.zeros((n_categories,) + tuple(concept_sums.shape[1:]), dtype=torch.float64, device=dev)
    sums.index_add_(0, cat, concept_sums.double())
    counts = torch.zeros(n_categories, dtype=torch.float64, device=dev).index_add_(0, cat, concept_counts.double())
    keep = counts > 0
    mass = sums[keep] / counts[keep][:, None, None]
    C = mass.shape[0]
    total = mass.sum(0)
    entropy = torch.special.entr(mass / total).sum(0)
    s = mass.sort(0).values
    i = torch.arange(1, C + 1, dtype=torch.float64, device=dev)[:, None, None]
    gini = ((2 * i - C - 1) * s).sum(0) / (C * total)
    dead = ~(total > 0)
    nan = torch.full_like(total, float("nan"))
    return torch.where(dead, nan, entropy), torch.where(dead, nan, gini)


def _concept_idx(probe, batch, device) -> torch.Tensor:
    return torch.tensor([probe.concept_index(q) for q in batch], device=device)


# ---------------------------------------------------------------------------- methods


def _envoy(root, name: str):
    """The nnsight envoy of module path ``name`` ("model.layers.3.mlp.down_proj")."""
    e = root
    for part in name.split("."):
        e = e[int(part)] if part.isdigit() else getattr(e, part)
    return e


def nnsight_model(lm: LoadedModel):
    """Wrap the loaded model the way nnsight's docs do for a causal LM (``TransformersModel``
    since 0.8, ``LanguageModel`` before)."""
    import warnings

    import nnsight

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # LanguageModel's deprecation notice on 0.8
        cls = getattr(nnsight, "TransformersModel", None)
        if cls is not None:
            return cls(lm.model, tokenizer=lm.tokenizer, task="text-generation")
        return nnsight.LanguageModel(lm.model, tokenizer=lm.tokenizer)


class Steps:
    """One method's work on the probe, cut at batch boundaries so that a worker can time
    each batch next to a plain forward pass of the same batch: ``begin()``, ``step(i)`` for
    every batch ``i``, ``finish()`` (the statistics, or None) and ``close()`` (cleanup,
    always). Calling it runs them all once and returns what ``finish`` returns. Every part
    runs under ``torch.inference_mode``."""

    def __init__(self, n: int, step: Callable[[int], None], finish: Callable[[], Optional[Stats]] = lambda: None,
                 begin: Callable[[], None] = lambda: None, close: Callable[[], None] = lambda: None):
        mode = torch.inference_mode()
        self.n = n
        self.begin, self.step, self.finish, self.close = mode(begin), mode(step), mode(finish), mode(close)

    def __call__(self) -> Optional[Stats]:
        try:
            self.begin()
            for i in range(self.n):
                self.step(i)
            return self.finish()
        finally:
            self.close()


def make_nnsight(lm: LoadedModel, probe, qs: Sequence[Question], batch_size: int) -> Steps:
    model = nnsight_model(lm)
    envoys = [_envoy(model, s.name) for s in lm.sites]
    K, L, D = len(probe.concepts), lm.n_layers, lm.d_ff
    bs = batches(qs, batch_size)
    acc = {}

    def begin() -> None:
        acc["sums"] = torch.zeros((K, L, D), dtype=torch.float32, device=lm.device)
        acc["counts"] = torch.zeros(K, dtype=torch.float32, device=lm.device)

    def step(i: int) -> None:
        b = bs[i]
        enc = encode_prompts(lm.tokenizer, b, POSITIONS, device=lm.device)
        saved = []
        with model.trace(input_ids=enc.input_ids, attention_mask=enc.attention_mask,
                         position_ids=enc.position_ids, use_cache=False):
            for e in envoys:
                saved.append(e.input.save())
        saved = [getattr(m, "value", m) for m in saved]  # nnsight < 0.5 returns proxies
        stats = torch.stack([prompt_means(m, enc.select) for m in saved], 1)  # (B, L, D)
        idx = _concept_idx(probe, b, lm.device)
        acc["sums"].index_add_(0, idx, stats)
        acc["counts"].index_add_(0, idx, enc.valid.float())

    def finish() -> Stats:
        return torch_specialisation(acc["sums"], acc["counts"], probe.concept_category, len(probe.categories))

    return Steps(len(bs), step, finish, begin)


def make_hooks(lm: LoadedModel, probe, qs: Sequence[Question], batch_size: int) -> Steps:
    K, L, D = len(probe.concepts), lm.n_layers, lm.d_ff
    bs = batches(qs, batch_size)
    acc, cur, handles = {}, {}, []

    def hook(module, args, layer):
        acc["sums"][layer].index_add_(0, cur["idx"], prompt_means(args[0], cur["select"]))

    def begin() -> None:
        acc["sums"] = torch.zeros((L, K, D), dtype=torch.float32, device=lm.device)  # sums[l] contiguous
        acc["counts"] = torch.zeros(K, dtype=torch.float32, device=lm.device)
        handles[:] = [s.module.register_forward_pre_hook(lambda mod, a, layer=s.layer: hook(mod, a, layer))
                      for s in lm.sites]

    def step(i: int) -> None:
        b = bs[i]
        enc = encode_prompts(lm.tokenizer, b, POSITIONS, device=lm.device)
        cur["idx"], cur["select"] = _concept_idx(probe, b, lm.device), enc.select
        _forward(lm, enc)
        acc["counts"].index_add_(0, cur["idx"], enc.valid.float())

    def finish() -> Stats:
        close()
        return torch_specialisation(acc["sums"].transpose(0, 1), acc["counts"], probe.concept_category,
                                    len(probe.categories))

    def close() -> None:
        for hd in handles:
            hd.remove()
        handles.clear()

    # The hooks stay registered from begin() to finish(): a plain forward pass timed next
    # to this method in the same process must not run them, so the worker pairs it with
    # a second copy of the model (see worker()).
    return Steps(len(bs), step, finish, begin, close)


def make_specext(lm: LoadedModel, probe, qs: Sequence[Question], batch_size: int) -> Steps:
    # Scoring a model without an LM head is exactly the pipeline's prompt pass with the
    # statistics streamed out, and nothing else (no options, no generation).
    scorer = Scorer(dataclasses.replace(lm, has_lm_head=False), positions=POSITIONS, open_ended=False)
    stats = PromptStats(lm.n_layers, lm.d_ff)
    K, C = len(probe.concepts), len(probe.categories)
    bs = batches(qs, batch_size)
    acc = {}

    def begin() -> None:
        acc["mass"] = ConceptMass(K, lm.n_layers, lm.d_ff, device=lm.device)

    def step(i: int) -> None:
        b = bs[i]
        scorer.score(b, stats=stats)
        acc["mass"].add(_concept_idx(probe, b, lm.device), stats.sums, stats.valid)

    def finish() -> Stats:
        mass = acc["mass"]
        usable = (mass.category_counts(probe.concept_category, C) > 0).cpu()
        table = neuron_table(mass.category_mass(probe.concept_category, C), None, usable)
        return table.entropy, table.gini

    return Steps(len(bs), step, finish, begin)


def make_forward(lm: LoadedModel, probe, qs: Sequence[Question], batch_size: int) -> Steps:
    bs = batches(qs, batch_size)

    def step(i: int) -> None:
        _forward(lm, encode_prompts(lm.tokenizer, bs[i], POSITIONS, device=lm.device))

    return Steps(len(bs), step)


MAKERS: Dict[str, Callable[..., Steps]] = {"forward": make_forward, "nnsight": make_nnsight, "hooks": make_hooks,
                                          "specext": make_specext}


def max_abs_diff(a: torch.Tensor, b: torch.Tensor) -> float:
    """Largest ``|a - b|`` over elements finite in both; ``inf`` where only one is NaN."""
    a, b = a.detach().cpu().double(), b.detach().cpu().double()
    if a.shape != b.shape or bool((a.isnan() != b.isnan()).any()):
        return float("inf")
    ok = ~a.isnan()
    return float((a[ok] - b[ok]).abs().max()) if ok.any() else 0.0


# ---------------------------------------------------------------------------- worker


def _status_mib(key: str) -> float:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(key + ":"):
                return int(line.split()[1]) / 1024.0
    raise KeyError(key)


def _memory_start(device: torch.device) -> Tuple[float, bool]:
    """Reset the peak; returns the current usage in MiB and whether the peak was reset."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        return torch.cuda.memory_allocated(device) / 2**20, True
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # resets VmHWM to the current RSS (Linux >= 4.0)
        return _status_mib("VmRSS"), True
    except OSError:
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0, False


def _memory_peak(device: torch.device) -> float:
    if device.type == "cuda":
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) / 2**20
    try:
        return _status_mib("VmHWM")
    except (OSError, KeyError):
        import resource

        return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024.0


def _paired_run(fn: Steps, floor: Steps, rnd: int, device: torch.device) -> Tuple[List[float], List[float], float]:
    """One timed run of ``fn`` with ``floor``'s plain forward pass of each batch timed right
    next to it (which goes first alternates by batch and round): per-batch ms of each, and
    the ms of ``fn.finish()``."""
    def timed(call) -> float:
        return h.time_fn(call, warmup=0, repeat=1, device=device, flush_l2=False) * 1e3

    try:
        fn.begin()
        floor.begin()
        own, base = h.time_pairs(fn.n, rnd, fn.step, floor.step, timed)
        fin = timed(fn.finish)
    finally:
        fn.close()
        floor.close()
    return own, base, fin


def worker(args) -> None:
    """One method in its own process, driven by the main process over stdin/stdout: ``run``
    runs it once and answers its time; ``exit`` saves the result file and ends. The first
    run measures the peak memory (the method alone); every later run times each batch of
    the method next to a plain forward pass of the same batch on a second copy of the model
    (the *floor*: built the same way, never hooked or wrapped), so that the method's cost
    over the forward pass is measured batch by batch in one process, not as a difference
    of two processes' totals."""
    device = h.resolve_device(args.device)
    h.seed_all(0)
    lm = build_model(args.models, args, device)
    twin = build_model(args.models, args, device)
    probe, qs = questions_of(args)
    fn = MAKERS[args.worker](lm, probe, qs, args.batch_size)
    floor = make_forward(twin, probe, qs, args.batch_size)
    enc = encode_prompts(lm.tokenizer, qs, POSITIONS)
    res = {"n_layers": lm.n_layers, "d_ff": lm.d_ff, "params": lm.n_parameters(), "dtype": h.dtype_str(lm.dtype),
           "tokens": int(enc.lengths.sum()), "selected": int(enc.select.sum()), "times_ms": [], "batch_ms": [],
           "floor_ms": [], "finish_ms": []}
    del enc
    _say("ready")
    rnd = 0
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "exit":
            break
        if cmd != "run":
            raise SystemExit(f"worker: unknown command {cmd!r}")
        if "peak_mib" not in res:
            mem0, reset = _memory_start(device)
            out = fn()
            peak = _memory_peak(device)
            res.update(peak_mib=peak, growth_mib=peak - mem0, peak_reset=reset)
            if out is not None:
                res["entropy"], res["gini"] = out[0].cpu(), out[1].cpu()
            _say("0")
            continue
        own, base, fin = _paired_run(fn, floor, rnd, device)
        rnd += 1
        total = sum(own) + fin
        res["times_ms"].append(total)
        res["batch_ms"].append(own)
        res["floor_ms"].append(base)
        res["finish_ms"].append(fin)
        _say(f"{total:.6f}")
    torch.save(res, args.result)
    _say("saved")


_PROTO = "@@peers "


def _say(msg: str) -> None:
    sys.stdout.write(_PROTO + msg + "\n")
    sys.stdout.flush()


class Worker:
    """A running worker process (see :func:`worker`)."""

    def __init__(self, method: str, kind: str, args, tmp: Path):
        self.method, self.kind = method, kind
        self.result = tmp / f"{kind}-{method}.pt"
        self.log = open(tmp / f"{kind}-{method}.log", "w+")
        cmd = [sys.executable, str(Path(__file__).resolve()), "--worker", method, "--result", str(self.result),
               "--models", kind, "--device", args.device, "--dtype", args.dtype, "--probe", args.probe,
               "--batch-size", str(args.batch_size), "--large-hidden", str(args.large_hidden),
               "--large-d-ff", str(args.large_d_ff), "--large-layers", str(args.large_layers), "--no-csv"]
        if args.questions:
            cmd += ["--questions", str(args.questions)]
        self.p = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=self.log, text=True)
        self._expect()  # ready

    def _expect(self) -> str:
        for line in self.p.stdout:
            if line.startswith(_PROTO):
                return line[len(_PROTO):].strip()
        self.p.wait()
        self.log.seek(0)
        raise RuntimeError(f"{self.method} on {self.kind} failed ({self.p.returncode}):\n{self.log.read()[-3000:]}")

    def run(self) -> float:
        self.p.stdin.write("run\n")
        self.p.stdin.flush()
        return float(self._expect())

    def finish(self) -> dict:
        self.p.stdin.write("exit\n")
        self.p.stdin.flush()
        self._expect()  # saved
        self.p.wait()
        self.log.close()
        res = torch.load(self.result, weights_only=False)
        res["ms"] = statistics.median(res["times_ms"])
        return res

    def kill(self) -> None:
        if self.p.poll() is None:
            self.p.kill()
            self.p.wait()


def measure(kind: str, methods: Sequence[str], args, tmp: Path) -> Dict[str, dict]:
    """Start one worker per method (each loads its own model), then run warm-up and timed
    rounds, every method once per round in a rotating order, so drifting machine load hits
    all of them alike."""
    workers: Dict[str, Worker] = {}
    try:
        for m in methods:
            workers[m] = Worker(m, kind, args, tmp)
        order = list(methods)
        for r in range(max(1, args.warmup) + args.repeat):
            for m in order:
                workers[m].run()
            order = order[1:] + order[:1]
        return {m: w.finish() for m, w in workers.items()}
    finally:
        for w in workers.values():
            w.kill()


# ---------------------------------------------------------------------------- main


def capture_ms(r: dict, rounds: Optional[Sequence[int]] = None) -> float:
    """The ms a method spends beyond the plain forward passes (:func:`_harness.paired_excess`
    of its batches against the floor's) plus the median time of its final reduction.
    ``rounds``: the rounds to use (a bootstrap resample), default all."""
    rounds = range(len(r["batch_ms"])) if rounds is None else rounds
    return (h.paired_excess(r["batch_ms"], r["floor_ms"], rounds)
            + statistics.median(r["finish_ms"][k] for k in rounds))



def compare(kind: str, res: Dict[str, Optional[dict]], args) -> List[dict]:
    ref = res["specext"]
    info = next(r for r in res.values() if r is not None)
    desc = (f"{kind}: {info['params'] / 1e6:.1f} M parameters, L={info['n_layers']} d_ff={info['d_ff']} "
            f"{info['dtype']}; {args.n_questions} prompts, {info['tokens']} tokens ({info['selected']} selected)")
    print(desc)
    rows = []
    for method in METHODS:
        r = res.get(method)
        row = {"model": kind, "method": method, "bench": "peers", "shape": f"{args.n_questions} questions",
               "dtype": info["dtype"], "extra": f"model={kind} L={info['n_layers']} d_ff={info['d_ff']} "
                                                f"method={method} batch={args.batch_size}"}
        if r is None:
            row.update(ms=None, equal="skipped: not installed")
            rows.append(row)
            continue
        # Paired per round (the runs of one round are adjacent in time, so they share the
        # machine's load at that moment), then the median over rounds.
        paired = statistics.median(a / b for a, b in zip(r["times_ms"], ref["times_ms"]))
        R = min(len(r["batch_ms"]), len(ref["batch_ms"]))
        lo, hi = h.bootstrap(lambda k: capture_ms(r, k), R)
        row.update(ms=r["ms"], peak=r["growth_mib"], baseline_ms=r["ms"], ours_ms=ref["ms"],
                   vs_specext=paired, mem_vs=r["growth_mib"] / max(ref["growth_mib"], 1e-9),
                   floor=statistics.median(sum(b) for b in r["floor_ms"]),
                   cap=capture_ms(r), cap_range=f"{lo:.0f}..{hi:.0f}")
        row["ratio"] = r["ms"] / ref["ms"]  # the CSV's definition: baseline_ms / ours_ms
        ref_cap = capture_ms(ref)
        if method not in ("forward", "specext") and ref_cap > 0:
            def ratio(k):  # a resample where specext's capture is 0 or less: unbounded
                den = capture_ms(ref, k)
                return capture_ms(r, k) / den if den > 0 else float("inf")

            lo, hi = h.bootstrap(ratio, R)
            row["cap_vs"], row["cap_vs_range"] = row["cap"] / ref_cap, f"{lo:.2f}..{hi:.2f}"
        if "gini" in r:
            row["dgini"] = max_abs_diff(r["gini"], ref["gini"])
            row["dh"] = max_abs_diff(r["entropy"], ref["entropy"])
            row["equal"] = ("reference" if method == "specext"
                            else "yes" if max(row["dgini"], row["dh"]) <= args.tol else "NO")
            row["dgini_s"], row["dh_s"] = f"{row['dgini']:.1e}", f"{row['dh']:.1e}"
        else:
            row["equal"] = "-"
        row["extra"] += (f" paired_ratio={paired:.3g} capture_ms={row['cap']:.4g}"
                         + (f" capture_ratio={row['cap_vs']:.3g}" if "cap_vs" in row else "")
                         + f" peak_growth_mib={r['growth_mib']:.1f} specext_peak_growth_mib={ref['growth_mib']:.1f}"
                         + (f" max_dgini={row['dgini']:.3g} max_dentropy={row['dh']:.3g}" if "dgini" in row else ""))
        rows.append(row)
    return rows


def main():
    p = h.make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--models", default="demo,large", help="comma list of: demo, large (default: %(default)s)")
    p.add_argument("--methods", default=",".join(METHODS), help="comma list of: " + ", ".join(METHODS))
    p.add_argument("--probe", default="synthetic")
    p.add_argument("--questions", type=int, default=None,
                   help="use N questions spread evenly over the probe (every category keeps prompts)")
    p.add_argument("--batch-size", type=int, default=16)
    p.add_argument("--dtype", default="auto",
                   help="auto (demo: its checkpoint's; large: float32), float32, float16, bfloat16")
    p.add_argument("--repeat", type=int, default=5)
    p.add_argument("--warmup", type=int, default=1, help="untimed rounds first (the first one measures peak memory)")
    p.add_argument("--large-hidden", type=int, default=512)
    p.add_argument("--large-d-ff", type=int, default=5632)
    p.add_argument("--large-layers", type=int, default=4)
    p.add_argument("--tol", type=float, default=1e-5, help="max |difference| of Gini and entropy called equal")
    p.add_argument("--worker", choices=METHODS, help=argparse.SUPPRESS)  # internal: one method's process
    p.add_argument("--result", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        args.questions, args.repeat = args.questions or 64, min(args.repeat, 3)
    if args.worker:
        return worker(args)
    device = h.resolve_device(args.device)
    args.device = device.type
    kinds = [k for k in args.models.split(",") if k]
    methods = [m for m in args.methods.split(",") if m]
    for name, allowed in ((kinds, MODELS), (methods, METHODS)):
        bad = [x for x in name if x not in allowed]
        if bad:
            raise SystemExit(f"unknown {', '.join(bad)}; choose from {', '.join(allowed)}")
    if "specext" not in methods:
        methods.append("specext")  # the reference of every comparison
    h.start("peers: per-neuron category statistics with nnsight / forward hooks / specext", device)
    if have_nnsight():
        import nnsight

        print(f"nnsight:      {getattr(nnsight, '__version__', '?')}")
    else:
        print(NNSIGHT_MISSING)
    args.n_questions = len(questions_of(args)[1])
    print(f"workload:     probe {args.probe}, {args.n_questions} questions, batches of {args.batch_size}, "
          f"positions={POSITIONS}; median of {args.repeat} rounds after {args.warmup} warm-up "
          f"(each method in its own process, one run each per round)\n")
    rows = []
    run_methods = [m for m in methods if m != "nnsight" or have_nnsight()]
    with tempfile.TemporaryDirectory() as tmp:
        for kind in kinds:
            res: Dict[str, Optional[dict]] = dict.fromkeys(methods)
            res.update(measure(kind, run_methods, args, Path(tmp)))
            rows += compare(kind, res, args)
    print()
    for r in rows:
        if "cap_vs" in r:
            r["cap_vs_s"] = f"{r['cap_vs']:.2f} ({r['cap_vs_range']})"
        if "cap" in r:
            r["cap_s"] = f"{r['cap']:.1f} ({r['cap_range']})"
    h.print_table(rows, [("model", "model"), ("method", "method"), ("ms", "ms"), ("vs_specext", "time / specext"),
                         ("floor", "floor ms"), ("cap_s", "capture ms (95% CI)"),
                         ("cap_vs_s", "capture / specext's (95% CI)"), ("peak", "peak MiB"),
                         ("mem_vs", "mem / specext"), ("dgini_s", "max |dGini|"), ("dh_s", "max |dH|"),
                         ("equal", "equal")], missing="-")
    print("\n(ms: median over rounds of the method's time (its batches and final reduction); time / specext: median "
          "over rounds of the time ratio within a round, > 1 means specext is that many times faster; floor ms: "
          "the plain forward passes timed next to the method's batches in its process, on a second copy of the "
          "model; capture ms: the method's time beyond the floor, per batch the median over rounds, summed, plus its "
          "final reduction; the forward row is the null control (forward vs forward, 0 up to noise); capture / "
          "specext's: their ratio; 95% CI: bootstrap over rounds (1000 resamples); peak MiB: growth of peak "
          + ("CUDA memory allocated" if device.type == "cuda" else "RSS (VmHWM)")
          + " over one run; differences against specext's Gini and entropy)")
    if not have_nnsight():
        print(NNSIGHT_MISSING)
    csv_rows = [r for r in rows if r["method"] != "specext" and r.get("ms") is not None]
    if not args.no_csv:
        h.append_csv(args.csv, csv_rows, device=device)
        print(f"\nappended {len(csv_rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
