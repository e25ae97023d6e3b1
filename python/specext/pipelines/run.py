"""The analysis run: probe inference, specialisation with its controls, PSS, and the run
directory, as one function call (:func:`run_analysis`); ``python -m specext.analyze`` is
its command line.

Run directory (DESIGN.md §4): ``config.json``, ``summary.json``, ``neurons.safetensors``
(``gini``, ``entropy``, ``norm_entropy``, ``top_category``, ``top_share``, ``total``,
``value_norms``, and the permutation null's ``gini_null``, ``excess_gini``, ``null_z``,
``above_null``, each ``(L, d_ff)``), ``mass.safetensors`` (concept sums and counts,
category mass), ``concepts.csv``, ``questions.jsonl``, ``pss.csv``, ``pss_curve.csv``,
``report.html`` with PNG plots. Every file is written atomically; a killed run restarted
with ``--resume`` continues from its last finished chunk and ends with the same results.
"""

from __future__ import annotations

import json
import logging
import os
import platform
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Callable, Dict, List, Optional

import torch

from specext import __version__, build_info
from specext.pipelines import distributed, rundir
from specext._deps import require
from specext._options import at_least, one_of
from specext.metrics.accuracy import accuracy_by_group
from specext.models.loading import (DEVICE_MAPS, LoadedModel, check_model_dir, load_model, parse_max_memory,
                                    quiet_transformers, value_norms)
from specext.models.loading import free_memory_bytes as _free_bytes
from specext.metrics.null_model import permutation_null
from specext.probes.probeset import ProbeSet, load_probe
from specext.metrics.pss import MaskedScorer, PSSConfig, compute_pss
from specext.pipelines.rundir import RunState
from specext.probes.scoring import POSITIONS, TRUNCATE, HalvingBatches, PromptStats, Scorer, identical_options
from specext.metrics.specialization import ConceptMass, neuron_table, summarize

logger = logging.getLogger("specext.analyze")

STATS = ("abs", "contribution")
ACCUMULATE_DEVICES = ("auto", "cpu")


@dataclass
class AnalyzeConfig:
    model_dir: str
    probe: str = "world"
    out: Optional[str] = None
    dtype: str = "auto"
    device: str = "auto"
    batch_size: int = 8
    max_concepts: Optional[int] = None
    positions: str = "question"
    stat: str = "abs"
    seed: int = 0
    resume: bool = False
    overwrite: bool = False  # clear a --out that holds a specext run (never a folder of other files)
    trust_remote_code: bool = False
    allow_pickle: bool = False
    allow_missing: bool = False  # missing/unexpected checkpoint tensors: a warning in summary.json, not an error
    open_ended: bool = True
    max_new_tokens: int = 12
    chunk_size: int = 64  # questions per unit of work (a checkpoint falls between chunks)
    checkpoint_every: float = 300.0  # seconds between checkpoints (0: after every chunk)
    report: bool = True
    pss: bool = True
    pss_config: PSSConfig = field(default_factory=PSSConfig)
    null_permutations: int = 8  # concept-to-category permutations of the Gini null (0: off)
    accumulate_device: str = "auto"  # where the concept sums live: the model's device (auto) or cpu
    random_twin: bool = False  # also run the architecture with seeded random weights (control)
    # One model over several devices (accelerate): auto | balanced | sequential, per-device
    # budgets "0=20GiB,cpu=100GiB", and the folder for layers offloaded to disk.
    device_map: Optional[str] = None
    max_memory: Optional[str] = None
    offload_dir: Optional[str] = None
    dist_timeout: float = 1800.0  # torchrun: seconds a rank waits for the others in a collective
    truncate: Optional[str] = None  # a prompt past the model's positions: an error (None), or "left": cut, warned, counted

    def __post_init__(self) -> None:
        self.validate()

    def validate(self) -> None:
        """The options' own checks; run once, when the config is built (the PSS options
        were checked when ``pss_config`` was built)."""
        one_of("--positions", self.positions, POSITIONS)
        one_of("--stat", self.stat, STATS)
        if self.resume and self.overwrite:
            raise ValueError("give --resume (continue the run in --out) or --overwrite (replace it), not both")
        at_least("--batch-size", self.batch_size, 1)
        at_least("--chunk-size", self.chunk_size, 1)
        at_least("--checkpoint-every", self.checkpoint_every, 0, unit=" seconds")
        at_least("--max-concepts", self.max_concepts, 1, optional=True)
        at_least("--max-new-tokens", self.max_new_tokens, 1)
        at_least("--null-permutations", self.null_permutations, 2, off=0)
        one_of("--accumulate-device", self.accumulate_device, ACCUMULATE_DEVICES)
        if self.device_map is not None:
            one_of("--device-map", self.device_map, DEVICE_MAPS)
            parse_max_memory(self.max_memory)
        elif self.max_memory is not None or self.offload_dir is not None:
            raise ValueError("--max-memory and --offload-dir need --device-map (auto, balanced or sequential)")
        at_least("--dist-timeout", self.dist_timeout, 1, unit=" seconds")
        if self.truncate is not None:
            one_of("--truncate", self.truncate, TRUNCATE)


class _Runner:
    """Scores questions in batches (halving on out-of-memory) and folds each batch's prompt
    statistics into the concept mass."""

    def __init__(self, lm: LoadedModel, scorer: Scorer, probe: ProbeSet, mass: ConceptMass, batch_size: int):
        self.lm, self.scorer, self.probe, self.mass = lm, scorer, probe, mass
        self.batches = HalvingBatches(batch_size, lm.device, "scoring")
        # A model split over devices: each layer's statistics where the layer runs.
        self.stats = PromptStats(lm.n_layers, lm.d_ff, devices=lm.layer_devices if lm.device_map else None)

    def run(self, questions, on_done) -> List[dict]:
        rows: List[dict] = []

        def commit(batch, results):
            # Fold only after the whole batch succeeded, so a retried batch never counts twice.
            idx = torch.tensor([self.probe.concept_index(q) for q in batch])  # moved where each layer's sums are
            self.mass.add(idx, self.stats.layer_sums if self.stats.devices else self.stats.sums, self.stats.valid)
            for q, r in zip(batch, results):
                rows.append({
                    "concept": q.concept, "category": q.category, "tier": q.tier, "question": q.question,
                    "mcq": r.mcq_correct if self.lm.has_lm_head else None,
                    "mcq_norm": r.mcq_norm_correct if self.lm.has_lm_head else None,
                    "open": r.open_correct if (self.lm.has_lm_head and self.scorer.open_ended) else None,
                    "pred": r.mcq_pred, "pred_norm": r.mcq_pred_norm, "answer": q.answer,
                    "open_text": r.open_text, "logprobs": [round(x, 6) for x in r.option_logprobs],
                })
            on_done(len(batch))

        self.batches.run(questions, lambda batch: self.scorer.score(batch, stats=self.stats), commit)
        return rows


def run_analysis(cfg: AnalyzeConfig, *, progress: bool = True,
                 on_checkpoint: Optional[Callable[[str, int], None]] = None) -> Dict[str, object]:
    """Run the whole analysis and write the run directory; returns ``summary.json``'s content.

    ``on_checkpoint(stage, n)`` is called after every checkpoint is on disk: ``("scoring",
    chunk)`` and ``("pss", concepts_done)`` (the kill-and-resume tests use it).

    Under ``torchrun`` (``WORLD_SIZE`` > 1) each rank scores its block of whole chunks and its
    round-robin share of the PSS concepts; accumulators are summed and rows gathered over
    ranks, rank 0 alone writes the run directory, and every rank returns the summary
    (:mod:`specext.pipelines.distributed`)."""
    require("transformers", "tokenizers", "tqdm", *(("matplotlib",) if cfg.report else ()), what="run_analysis")
    # transformers' own bars (weight loading) and info logs are off in a notebook as on the command line
    with quiet_transformers(), distributed.session(cfg.dist_timeout, cfg.device, cfg.device_map) as dd:
        return _analysis(cfg, dd, progress=progress and dd.is_main, on_checkpoint=on_checkpoint)


def _analysis(cfg: AnalyzeConfig, dd: distributed.Dist, *, progress: bool,
              on_checkpoint: Optional[Callable[[str, int], None]]) -> Dict[str, object]:
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    check_model_dir(cfg.model_dir, cfg.allow_pickle)  # a wrong MODEL_DIR fails before the probe loads
    probe = load_probe(cfg.probe, max_concepts=cfg.max_concepts, seed=cfg.seed)
    if cfg.pss:
        cfg.pss_config.check_probe(probe)  # before minutes of scoring, not after
    out = Path(cfg.out) if cfg.out else Path("specext-runs") / f"{Path(cfg.model_dir).name}-{probe.name}"
    made = rundir.missing_root(out)  # the folder this run creates, if any: removed again if it fails early
    if dd.active:
        made = next((m for m in dd.all_gather(made, "whether --out exists") if m is not None), None)
    rundir.check_writable(out)  # before loading the model, not at the first checkpoint
    with _lock(out, dd, cfg) as lock:
        try:
            return _locked(cfg, dd, probe, out, t_start, progress=progress, on_checkpoint=on_checkpoint)
        except BaseException:
            if made is not None and dd.is_main:  # e.g. a damaged checkpoint: no run directory left behind
                rundir.discard_new(out, made, lock)
            raise


def _lock(out: Path, dd: distributed.Dist, cfg: Optional[AnalyzeConfig] = None) -> rundir.RunLock:
    """The run directory's lock (:class:`rundir.RunLock`), then the check that ``out`` holds no
    other run (:func:`rundir.prepare_out`: ``--resume``, ``--overwrite``). Under torchrun
    rank 0 does both and tells every rank whether they succeeded, before any rank writes its
    checkpoint folder."""
    lock, err = rundir.RunLock(out), None
    if dd.is_main:
        try:
            lock.acquire()
            if cfg is not None:
                rundir.prepare_out(out, resume=cfg.resume, overwrite=cfg.overwrite)
        except (ValueError, OSError) as e:
            err = str(e)
    if dd.active:
        err = dd.broadcast(err, "the run directory lock")
    if err:
        lock.release(remove=lock.created)  # refused: leave the folder as it was
        raise ValueError(err)
    return lock


def _locked(cfg: AnalyzeConfig, dd: distributed.Dist, probe: ProbeSet, out: Path, t_start: float, *, progress: bool,
            on_checkpoint: Optional[Callable[[str, int], None]]) -> Dict[str, object]:
    if dd.is_main:
        # summary.json marks a complete run (written last): a run in progress has none
        (out / "summary.json").unlink(missing_ok=True)
    # under torchrun with --device-map: the rank's own cards, budget and offload folder
    place = distributed.load_options(dd, cfg.device, cfg.device_map, cfg.max_memory, cfg.offload_dir)
    lm = load_model(cfg.model_dir, dtype=cfg.dtype, trust_remote_code=cfg.trust_remote_code,
                    allow_pickle=cfg.allow_pickle, allow_missing=cfg.allow_missing, **place)
    fp = rundir.fingerprint(cfg, probe, Path(cfg.model_dir), cache=out / rundir.WEIGHTS_CACHE)
    fp["model_dtype"] = str(lm.dtype).replace("torch.", "")  # --dtype auto may choose differently elsewhere
    if dd.active:
        fp["world_size"] = dd.world  # each rank's checkpoint holds its share, which depends on it
    state = RunState(out, rank=dd.rank if dd.active else None)
    acc_dev = accumulate_devices(cfg.accumulate_device, lm)
    plan = memory_plan(cfg, probe, lm, acc_dev, out)
    mass = ConceptMass(len(probe.concepts), lm.n_layers, lm.d_ff, device=acc_dev)
    rows: List[dict] = []
    qs = probe.questions
    lo, hi = dd.chunk_range(len(qs), cfg.chunk_size)  # this rank's questions (all of them alone)
    start = lo
    if cfg.resume:
        # Every rank checks its checkpoint (and the layout: one process or N ranks) and the
        # ranks agree before any of them scores or saves: a rank without a checkpoint of its
        # own would otherwise start over and write one while another rank refuses.
        err, loaded = None, None
        try:
            problem = state.layout_problem(dd.world if dd.active else None)
            if problem:
                raise ValueError(problem)
            loaded = state.load(fp, qs[lo:hi], lo)
        except ValueError as e:
            err = str(e)
        if dd.active:
            bad = [(r, e) for r, e in enumerate(dd.all_gather(err, "the checkpoints' check")) if e]
            if bad:
                r, e = bad[0]
                raise ValueError(e if r == dd.rank else f"rank {r} refused the checkpoint: {e}")
        elif err:
            raise ValueError(err)
        if loaded is not None:
            start, acc, rows = loaded
            mass.load_state(acc)
            logger.info("resuming %s at question %d of %d%s", out, start, len(probe.questions),
                        f" ({dd}: questions {lo}-{hi})" if dd.active else "")
        else:
            logger.info("--resume: no checkpoint in %s, starting from the beginning", out)
    else:
        state.clear()

    scorer = Scorer(lm, positions=cfg.positions, open_ended=cfg.open_ended, max_new_tokens=cfg.max_new_tokens,
                    truncate=cfg.truncate)
    truncated = scorer.check(probe.questions)  # every prompt against the model's positions, before any forward pass
    runner = _Runner(lm, scorer, probe, mass, cfg.batch_size)
    from specext._progress import progress as tqdm

    with tqdm(total=hi - lo, initial=start - lo, desc="scoring", unit="q", disable=not progress) as bar:
        k = start // cfg.chunk_size
        last_save = time.time()
        for c0 in range(start, hi, cfg.chunk_size):
            rows += runner.run(qs[c0 : c0 + cfg.chunk_size], bar.update)
            end = min(c0 + cfg.chunk_size, hi)
            # Checkpoints cost a write of the accumulators (GBs for a 70B model with many
            # concepts), so they are spaced in time; the last chunk always checkpoints.
            if end == hi or time.time() - last_save >= cfg.checkpoint_every:
                state.save(k, end, fp, mass.state(), rows)
                last_save = time.time()
                if on_checkpoint:
                    on_checkpoint("scoring", k)
            k += 1
    if dd.active:  # the ranks' shares merged: summed accumulators, rows in probe order
        acc = mass.state()
        dd.all_reduce_(acc, "the concept accumulators")
        mass.load_state(acc)
        rows = [r for part in dd.all_gather(rows, "the per-question rows") for r in part]

    # (L, d_ff), used by --stat contribution and saved with the neurons; streamed from the checkpoint
    # (models.loading.value_norms chooses)
    norms = value_norms(lm)
    pss = None
    if cfg.pss:
        if not lm.has_lm_head:
            logger.warning("PSS skipped: the model has no language-model head")
        else:
            pss = _run_pss(cfg, lm, probe, mass, rows, state, progress, norms, on_checkpoint, dd)
    twin = _run_twin(cfg, lm, probe, progress, dd) if cfg.random_twin else None
    summary = None
    if dd.is_main:
        summary = _finish(cfg, lm, probe, mass, rows, out, fp, time.time() - t_start, norms, pss, twin, plan=plan,
                          truncated=truncated)
    dd.barrier("rank 0 writes the run directory")  # every rank's checkpoint stays until it is written
    state.clear()
    return dd.broadcast(summary, "the summary")


def accumulate_devices(option: str, lm: LoadedModel):
    """Where the concept accumulators live: ``cpu``; or (``auto``) the model's device, and for
    a model loaded with a device map each layer's execution device (a list), so that every
    layer folds its statistics where they are computed and the accumulators are spread like
    the layers."""
    if option != "auto":
        return torch.device(option)
    return list(lm.layer_devices) if lm.device_map else lm.device


def _where(acc_device) -> str:
    """``cpu``, or for per-layer accumulators each device with its layer count (``cuda:0 x40, cpu x40``)."""
    if not isinstance(acc_device, (list, tuple)):
        return str(acc_device)
    names = [str(d) for d in acc_device]
    return "each layer's device (" + ", ".join(f"{d} x{names.count(d)}" for d in dict.fromkeys(names)) + ")"


def memory_plan(cfg: AnalyzeConfig, probe: ProbeSet, lm: LoadedModel, acc_device: torch.device,
                out: Path) -> Dict[str, object]:
    """What the run will hold, printed before it starts: the concept accumulators (on
    ``acc_device``), one batch's prompt statistics and the PSS selection's working set (on
    the model's device), and each checkpoint on disk (two while one replaces the other).
    Warns when a figure exceeds what is free now."""
    import shutil

    K, L, D = len(probe.concepts), lm.n_layers, lm.d_ff
    C = len(probe.categories)
    accum = K * L * D * 4 + K * L * 4
    batch = cfg.batch_size * L * D * 4
    selection = (C + 2) * L * D * 8 if cfg.pss else 0
    per_layer = isinstance(acc_device, (list, tuple))
    plan = {"accumulators_bytes": accum, "accumulate_device": "per-layer" if per_layer else str(acc_device),
            "batch_statistics_bytes": batch,
            "pss_selection_bytes": selection, "checkpoint_bytes": accum, "model_device": str(lm.device)}
    gib = lambda b: f"{b / 2**30:.2f} GiB"  # noqa: E731
    logger.info("memory plan: accumulators %s on %s (%d concepts x %d layers x %d), batch statistics %s and PSS "
                "selection %s on %s, checkpoints %s each on disk", gib(accum), _where(acc_device), K, L, D, gib(batch),
                gib(selection), lm.device, gib(accum))
    need: Dict[torch.device, int] = {}
    for dev, n in ([(d, accum // L) for d in acc_device] if per_layer else [(acc_device, accum)]):
        need[dev] = need.get(dev, 0) + n
    need[lm.device] = need.get(lm.device, 0) + batch + selection
    # torchrun's ranks on this host each hold all of it: host memory and the disk are shared
    # (each rank's GPU is its own)
    try:
        local = max(1, int(os.environ.get("LOCAL_WORLD_SIZE", "1")))
    except ValueError:
        local = 1
    plan["ranks_on_host"] = local
    if local > 1:
        need = {d: n * local if d.type == "cpu" else n for d, n in need.items()}
    for dev, n in need.items():
        free = _free_bytes(dev)
        plan[f"free_{dev}"] = free
        if free is not None and n > free:
            hint = " (try --accumulate-device cpu)" if dev.type == "cuda" else " (sample concepts with --max-concepts)"
            logger.warning("memory: the run needs %s on %s but %s is free%s%s", gib(n), dev, gib(free),
                           f" ({local} ranks on this host, each with its own)" if local > 1 and dev.type == "cpu"
                           else "", hint)
    disk = shutil.disk_usage(out).free
    plan["free_disk"] = disk
    if 2 * accum * local > disk:
        logger.warning("disk: checkpoints need %s in %s but %s is free%s", gib(2 * accum * local), out, gib(disk),
                       f" ({local} ranks on this host, each with its own)" if local > 1 else "")
    return plan


@dataclass
class Specialisation:
    """Per-neuron results of one model on one probe (see :func:`specialisation`)."""

    category_mass: torch.Tensor  # (C, L, d_ff), NaN where a category has no usable prompt
    usable: torch.Tensor  # (C, L) bool
    table: object  # specialization.NeuronTable
    null: object  # null_model.NullResult or None
    summary: Dict[str, object]  # specialization.summarize(...)
    empty: List[str]  # categories without a usable prompt at every layer
    dropped_by_layer: Dict[int, List[str]]  # categories left out at some layers only


def specialisation(probe: ProbeSet, mass: ConceptMass, norms: Optional[torch.Tensor], *, null_permutations: int,
                   seed: int, label: str = "") -> Specialisation:
    """Category mass, per-neuron entropy/Gini and the permutation null from accumulated sums.

    A category without a usable prompt at a layer (every prompt's activations non-finite,
    or no selected token) is left out *at that layer*, counted and warned about; one
    without any usable prompt anywhere is left out everywhere."""
    C = len(probe.categories)
    cat_mass = mass.category_mass(probe.concept_category, C)
    usable = (mass.category_counts(probe.concept_category, C) > 0).cpu()  # (C, L)
    empty = [probe.categories[c] for c in range(C) if not usable[c].any()]
    dropped = {l: [probe.categories[c] for c in range(C) if not usable[c, l] and probe.categories[c] not in empty]
               for l in range(usable.shape[1])}
    dropped = {l: v for l, v in dropped.items() if v}
    what = f"{label}: " if label else ""
    if empty:
        logger.warning("%scategories with no usable prompt (left out of specialisation): %s", what, ", ".join(empty))
    if dropped:
        logger.warning("%scategories without a usable prompt at some layers, left out at those layers only: %s", what,
                       "; ".join(f"layer {l}: {', '.join(v)}" for l, v in dropped.items()))
    if not usable.any():
        raise ValueError("no category has a usable prompt: every activation was NaN/inf or the probe is empty")
    table = neuron_table(cat_mass, norms, usable)
    null = None
    if null_permutations:
        null = permutation_null(mass.sums, mass.counts, probe.concept_category, C, table.gini,
                                permutations=null_permutations, seed=seed)
    summ = summarize(table, null)
    for l, d in enumerate(summ["layers"]):
        d["categories_used"] = int(usable[:, l].sum())
    return Specialisation(cat_mass, usable, table, null, summ, empty, dropped)


def _run_twin(cfg: AnalyzeConfig, lm: LoadedModel, probe: ProbeSet, progress: bool,
              dd: Optional[distributed.Dist] = None) -> Optional[Dict[str, object]]:
    """The random-init twin on the same probe and positions: its specialisation and accuracy
    (under torchrun each rank scores its share; rank 0 gets the result, the others None)."""
    from specext._progress import progress as tqdm
    from specext.models.twin import random_twin

    seed = cfg.seed + 1  # not the model's own sampling seed
    twin = random_twin(lm, seed)
    mass = ConceptMass(len(probe.concepts), twin.n_layers, twin.d_ff, device=twin.device)
    scorer = Scorer(twin, positions=cfg.positions, open_ended=False, truncate=cfg.truncate)
    runner = _Runner(twin, scorer, probe, mass, cfg.batch_size)
    dd = dd or distributed.Dist()
    lo, hi = dd.chunk_range(len(probe.questions), cfg.chunk_size)
    with tqdm(total=hi - lo, desc="random twin", unit="q", disable=not progress) as bar:
        rows = runner.run(probe.questions[lo:hi], bar.update)
    if dd.active:
        acc = mass.state()
        dd.all_reduce_(acc, "the random twin's accumulators")
        mass.load_state(acc)
        rows = [r for part in dd.all_gather(rows, "the random twin's rows") for r in part]
        if not dd.is_main:
            return None
    norms = value_norms(twin) if cfg.stat == "contribution" else None  # the twin's own (in-memory) weights
    spec = specialisation(probe, mass, norms, null_permutations=cfg.null_permutations, seed=cfg.seed,
                          label="random twin")
    acc = accuracy_by_group(rows)
    del twin, scorer, runner
    return {"seed": seed, "spec": spec, "accuracy": {"mcq": acc["mcq"], "mcq_norm": acc["mcq_norm"]}}


def _run_pss(cfg: AnalyzeConfig, lm, probe, mass: ConceptMass, rows, state: RunState, progress: bool,
             norms: torch.Tensor, on_checkpoint=None, dd: Optional[distributed.Dist] = None):
    pc = cfg.pss_config
    cm = mass.concept_mass()
    if cfg.stat == "contribution":
        cm = cm * norms.to(cm.device)[None]
    metric_rows = [r[pc.metric] for r in rows if r.get(pc.metric) is not None]
    overall = float(sum(metric_rows) / len(metric_rows)) if metric_rows else None
    done = state.load_pss()
    if done:
        logger.info("PSS: resuming, %d concept(s) already done", len(done))

    def checkpoint(name, crow):
        done[name] = crow
        state.save_pss(done)
        if on_checkpoint:
            on_checkpoint("pss", len(done))

    dd = dd or distributed.Dist()
    ms = MaskedScorer(lm, batch_rows=pc.batch_rows, metric=pc.metric, scorer=Scorer(lm, open_ended=False,
                                                                                   truncate=cfg.truncate))
    return compute_pss(lm, probe, cm, pc, overall_accuracy=overall, progress=progress, done=done, scorer=ms,
                       on_concept=checkpoint, share=dd.share if dd.active else None,
                       gather=(lambda part: dd.all_gather(part, "the PSS rows")) if dd.active else None)


def _ratio(a, b):
    return a / b if isinstance(a, float) and isinstance(b, float) and b > 0 and a == a else None


def _twin_summary(model_neurons: Dict[str, object], twin) -> Optional[Dict[str, object]]:
    if twin is None:
        return None
    tn = twin["spec"].summary["neurons"]
    out = {"seed": twin["seed"], "accuracy": twin["accuracy"]}
    for k in ("mean_gini", "median_gini", "mean_gini_null", "mean_excess_gini", "share_above_null",
              "mean_norm_entropy", "dead"):
        if k in tn:
            out[k] = tn[k]
    out["model_over_twin"] = {k: _ratio(model_neurons.get(k), tn.get(k)) for k in ("mean_gini", "mean_excess_gini")}
    out["layers"] = [{k: l.get(k) for k in ("layer", "mean_gini", "mean_excess_gini", "share_above_null")}
                     for l in twin["spec"].summary["layers"]]
    return out


def _pss_warnings(pss) -> List[str]:
    """Logged and recorded in ``summary.json`` (``warnings``): concepts PSS skipped (no
    differential score: their category's PSS is then short of them), and a headline peak at
    the largest ratio of the sweep, which is only a lower bound on the peak."""
    if pss is None:
        return []
    s, out = pss.summary, []
    for x in s.get("skipped_concepts") or []:
        out.append(f"PSS skipped concept '{x['concept']}' (category '{x['category']}'): {x['reason']}; "
                   "it is in no PSS number")
    if s.get("peak_at_largest_ratio"):
        msg = (f"PSS ({s['score']}): the peak is at the largest ratio tried ({max(s['ratios']):g}% of vectors), so "
               "it is a lower bound: a larger ratio might score higher (add ratios with --ratios)")
        logger.warning(msg)
        out.append(msg)
    return out


def _degenerate_probe(lm, probe: ProbeSet) -> List[str]:
    """Warnings for a probe that runs but cannot mean much, logged and recorded in
    ``summary.json`` (``warnings``): one category (every neuron's Gini is 0), and questions
    whose options tokenize identically (the scorer can only pick the first of them)."""
    found = []
    if len(probe.categories) < 2:
        found.append(f"probe '{probe.name}' has one category ({probe.categories[0]!r}): specialisation across "
                     f"categories is undefined and every neuron's Gini is 0")
    # the same question text under concepts of different categories: its activations count
    # for both categories, which blurs the very difference the Gini measures
    where: Dict[str, List[object]] = {}
    for q in probe.questions:
        where.setdefault(" ".join(q.question.split()).casefold(), []).append(q)
    shared = [qs for qs in where.values() if len({q.category for q in qs}) > 1]
    if shared:
        ex = "; ".join(f"{qs[0].question!r} under " + ", ".join(f"{q.concept!r} ({q.category}, {q.source})" for q in qs)
                       for qs in shared[:3])
        found.append(f"{len(shared)} question(s) appear under concepts of different categories (their activations "
                     f"count for each category): {ex}" + (" ..." if len(shared) > 3 else ""))
    same = identical_options(lm.tokenizer, probe.questions) if lm.has_lm_head else {}
    if same:
        allsame = [src for src, n in same.items() if n == 1]
        found.append(f"{len(same)} of {len(probe.questions)} question(s) have options that tokenize identically "
                     f"(e.g. to the unknown token; the first of them is always chosen), {len(allsame)} with all "
                     f"options identical (always answered with option A): {', '.join(list(same)[:5])}"
                     + (" ..." if len(same) > 5 else ""))
    for w in found:
        logger.warning("%s", w)
    return found


def _finish(cfg, lm, probe, mass: ConceptMass, rows, out: Path, fp, seconds: float, norms: torch.Tensor,
            pss=None, twin=None, plan=None, truncated: int = 0) -> Dict[str, object]:
    norms = norms.to(mass.sums.device)
    spec = specialisation(probe, mass, norms if cfg.stat == "contribution" else None,
                          null_permutations=cfg.null_permutations, seed=cfg.seed)
    table, cat_mass = spec.table, spec.category_mass
    acc = accuracy_by_group(rows)
    nonfinite = mass.nonfinite.cpu().tolist()
    if any(nonfinite):
        logger.warning("non-finite activations in %d prompt-layer(s), left out of the mass: %s", sum(nonfinite),
                       nonfinite)
    unselected = int(mass.unselected)
    if unselected:
        logger.warning("%d of %d prompts have no token at --positions %s (e.g. the concept's name does not occur "
                       "in the question) and are left out of the mass", unselected, len(rows), cfg.positions)
    keep = [c for c in range(len(probe.categories)) if probe.categories[c] not in spec.empty]
    summary = {
        "model": str(cfg.model_dir),
        "architecture": lm.architecture,
        "parameters": lm.n_parameters(),
        "layers": spec.summary["layers"],
        "neurons": spec.summary["neurons"],
        "accuracy": {"mcq": acc["mcq"], "mcq_norm": acc["mcq_norm"], "open": acc["open"],
                     "applicable": lm.has_lm_head},
        "accuracy_by_category": acc["by_category"],
        "accuracy_by_tier": acc["by_tier"],
        "probe": {"name": probe.name, "questions": len(probe.questions), "concepts": len(probe.concepts),
                  "categories": probe.categories, "tiers": probe.tiers},
        "positions": cfg.positions,
        # the dtype the model ran in and why (--dtype auto on a CPU without bfloat16 arithmetic: float32)
        "dtype": {k: v for k, v in (lm.dtype_choice or {"requested": cfg.dtype,
                                                         "used": str(lm.dtype).replace("torch.", "")}).items()
                  if k != "memory"},  # config.json's model.dtype_choice has the free memory too
        "categories_used": [probe.categories[c] for c in keep],
        "empty_categories": spec.empty,
        "categories_dropped_by_layer": {str(l): v for l, v in spec.dropped_by_layer.items()},
        "nonfinite_prompt_layers": nonfinite,
        "prompts_without_positions": unselected,
        "truncated_prompts": truncated,  # --truncate left: prompts cut to the model's positions
        "warnings": lm.warnings + _degenerate_probe(lm, probe) + _pss_warnings(pss),  # lm.warnings: what --allow-missing let through
        "pss": pss.summary if pss is not None else None,
        "random_twin": _twin_summary(spec.summary["neurons"], twin),
        "seconds": round(seconds, 2),
    }
    cfg_out = {
        "options": asdict(cfg),
        "fingerprint": fp,
        "memory_plan": plan,
        "versions": {"specext": __version__, **lm.info, "python": platform.python_version()},
        "build": build_info(),
        "model": {"architecture": lm.architecture, "model_type": lm.model_type, "dtype": str(lm.dtype),
                  "dtype_choice": lm.dtype_choice,
                  "device": str(lm.device), "layers": lm.n_layers, "d_ff": lm.d_ff,
                  "down_proj": [s.name for s in lm.sites],
                  # --device-map: transformers' placement of each module and each layer's device
                  "device_map": lm.device_map, "layers_placement": lm.layer_placement() if lm.device_map else None},
        "definitions": DEFINITIONS | {
            "prompt_statistic": f"mean of |m| over the prompt's '{cfg.positions}' tokens",
            "mass": "mean over a category's prompts of the prompt statistic"
                    + (" times the value-vector norm" if cfg.stat == "contribution" else ""),
        },
    }
    meta = {"categories": json.dumps(probe.categories), "layers": str(lm.n_layers), "d_ff": str(lm.d_ff),
            "specext": __version__, "top_category": "index into 'categories'; -1 for dead neurons",
            "categories_used_by_layer": json.dumps(spec.usable.T.int().tolist())}  # host: usable is on the CPU
    tensors = {**table.as_dict(), "value_norms": norms.contiguous().cpu()}
    if spec.null is not None:
        tensors.update(spec.null.as_dict())
        meta["null_permutations"] = str(spec.null.permutations)
        meta["null_z_thresholds"] = json.dumps(spec.null.thresholds)
    if twin is not None:
        tensors["twin_gini"] = twin["spec"].table.gini.contiguous().cpu()
        if twin["spec"].null is not None:
            tensors["twin_excess_gini"] = twin["spec"].null.excess_gini.contiguous().cpu()
    rundir.write_safetensors(out / "neurons.safetensors", tensors, metadata=meta)
    rundir.write_safetensors(out / "mass.safetensors", {"concept_sums": mass.sums, "concept_counts": mass.counts,
                                                       "category_mass": cat_mass},
                            metadata={"concepts": json.dumps(probe.concepts),
                                      "categories": json.dumps(probe.categories)})
    rundir.write_text(out / "concepts.csv", rundir.concepts_csv(probe, acc))
    if pss is not None:
        rundir.write_text(out / "pss.csv", rundir.pss_csv(pss.rows))
        rundir.write_text(out / "pss_curve.csv", rundir.pss_curve_csv(pss.summary))
        rundir.write_json(out / "pss_layers.json", {str(r): v for r, v in pss.layer_counts.items()})
    rundir.write_text(out / "questions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    rundir.write_json(out / "config.json", cfg_out)
    if cfg.report:
        from specext.report.html import write_report

        write_report(out, summary, table, cat_mass[keep], [probe.categories[c] for c in keep],
                     pss_layers=pss.layer_counts if pss is not None else None, null=spec.null,
                     twin_gini=twin["spec"].table.gini if twin is not None else None,
                     concepts=probe.concepts, concept_sums=mass.layer_sums, concept_counts=mass.layer_counts)
    rundir.write_json(out / "summary.json", summary)  # last: its presence marks a complete run
    logger.info("wrote %s", out)
    return summary


DEFINITIONS = {
    "gini": "sum_i (2i - C - 1) x_(i) / (C sum x) over categories",
    "gini_null": "mean Gini over random reassignments of concepts to categories (category sizes kept)",
    "excess_gini": "gini - gini_null",
    "above_null": "observed Gini, standardised by the other permutation draws, above the 99th percentile of the "
                  "layer's pooled standardised null draws",
    "mcq": "lm-evaluation-harness acc (summed option log-likelihood)",
    "mcq_norm": "lm-evaluation-harness acc_norm (log-likelihood / number of characters of the choice text)",
    "open": "the answer span of the greedy generation (first line, preamble stripped) matches the answer or an "
            "alias (normalised; case-sensitive for answers of at most two characters)",
    "pss": "|G(r) - CS(r)| / denominator (the paper's)",
    "pss_floor": "|G_before - CS_before| / denominator (the paper's score with nothing masked)",
    "pss_delta": "|(G_before - G(r)) - (CS_before - CS(r))| / denominator (baseline-corrected)",
    "intervals": "95% percentile bootstrap over concepts (PSS) or runs (compare correlations)",
}


