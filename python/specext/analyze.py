"""``python -m specext.analyze MODEL_DIR``: probe accuracy and per-neuron specialisation.

One pass over a knowledge probe gives the model's multiple-choice and open-ended
accuracy and, from the same forward passes, the category entropy and Gini of every MLP
neuron. Everything the CLI does is :func:`run_analysis` for notebook use.

Run directory (DESIGN.md §4): ``config.json``, ``summary.json``, ``neurons.safetensors``
(``gini``, ``entropy``, ``norm_entropy``, ``top_category``, ``top_share``, ``total``,
``value_norms``, and the permutation null's ``gini_null``, ``excess_gini``, ``null_z``,
``above_null``, each ``(L, d_ff)``), ``mass.safetensors`` (concept sums and counts,
category mass), ``concepts.csv``, ``questions.jsonl``, ``report.html`` with PNG plots.
Every file is written atomically; a killed run restarted with ``--resume`` continues
from its last finished chunk and ends with the same results.
"""

from __future__ import annotations

import os

# torch's OpenMP threads spin-wait by default; on virtual machines with pause-loop exiting
# that costs ~8 ms per parallel region (a tiny model's forward pass becomes 50x slower).
# The policy is read once when libgomp loads, so it must be set before torch is imported;
# a user's own setting wins.
os.environ.setdefault("OMP_WAIT_POLICY", "PASSIVE")

import argparse
import csv
import io
import json
import logging
import platform
import signal
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Dict, List, Optional

import torch

from . import __version__, build_info
from . import runio
from .models import LoadedModel, load_model
from .probes import ProbeSet, load_probe
from .null_model import permutation_null
from .pss import DENOMINATORS, PSSConfig, RATIOS, SCORES, compute_pss
from .scoring import POSITIONS, PromptStats, Scorer
from .specialization import ConceptMass, accuracy_breakdown, neuron_table, summarize

logger = logging.getLogger("specext.analyze")

DEMO_MODEL = Path(__file__).resolve().parent / "data" / "demo_model"
STATS = ("abs", "contribution")
STATE = ".state"
# The demo evaluates PSS on a sample of concepts so that it stays within minutes on a CPU.
DEMO_PSS_CONCEPTS = 24


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
    trust_remote_code: bool = False
    allow_pickle: bool = False
    open_ended: bool = True
    max_new_tokens: int = 12
    chunk_size: int = 64  # questions per unit of work (a checkpoint falls between chunks)
    checkpoint_every: float = 300.0  # seconds between checkpoints (0: after every chunk)
    report: bool = True
    pss: bool = True
    pss_config: PSSConfig = field(default_factory=PSSConfig)
    null_permutations: int = 8  # concept-to-category permutations of the Gini null (0: off)
    random_twin: bool = False  # also run the architecture with seeded random weights (control)

    def validate(self) -> None:
        if self.positions not in POSITIONS:
            raise ValueError(f"--positions must be one of {', '.join(POSITIONS)}, got {self.positions!r}")
        if self.stat not in STATS:
            raise ValueError(f"--stat must be one of {', '.join(STATS)}, got {self.stat!r}")
        if self.batch_size < 1:
            raise ValueError(f"--batch-size must be >= 1, got {self.batch_size}")
        if self.chunk_size < 1:
            raise ValueError(f"--chunk-size must be >= 1, got {self.chunk_size}")
        if self.checkpoint_every < 0:
            raise ValueError(f"--checkpoint-every must be >= 0 seconds, got {self.checkpoint_every}")
        if self.max_concepts is not None and self.max_concepts < 1:
            raise ValueError(f"--max-concepts must be >= 1, got {self.max_concepts}")
        if self.max_new_tokens < 1:
            raise ValueError(f"--max-new-tokens must be >= 1, got {self.max_new_tokens}")
        if self.null_permutations != 0 and self.null_permutations < 2:
            raise ValueError(f"--null-permutations must be 0 (off) or >= 2, got {self.null_permutations}")
        if self.pss:
            self.pss_config.validate()


# ---------------------------------------------------------------------------- fingerprint


def _fingerprint(cfg: AnalyzeConfig, probe: ProbeSet, model_dir: Path) -> Dict[str, object]:
    """What must match for --resume to continue a run (anything that changes results)."""
    files = sorted(model_dir.glob("*.safetensors"))
    probe_src = probe.questions[0].source.rsplit(":", 1)[0] if probe.questions else ""
    keys = ("probe", "dtype", "batch_size", "max_concepts", "positions", "stat", "seed", "open_ended",
            "max_new_tokens", "chunk_size", "null_permutations", "random_twin")
    opts = {k: getattr(cfg, k) for k in keys}
    opts["pss"] = asdict(cfg.pss_config) if cfg.pss else None
    fp = {
        "options": opts,
        "model_config_sha256": runio.sha256_file(model_dir / "config.json"),
        "weights_fingerprint": runio.safetensors_fingerprint(files) if files else None,
        "probe_sha256": runio.sha256_file(probe_src) if probe_src and Path(probe_src).is_file() else None,
        "questions": len(probe.questions),
    }
    return json.loads(json.dumps(fp))  # as it reads back from progress.json (tuples become lists)


# ---------------------------------------------------------------------------- state


class RunState:
    """Checkpoint of a run in ``OUT/.state``: the accumulators (one file per checkpoint) and
    an append-only ``rows.jsonl``, published by an atomic rewrite of ``progress.json``
    (which names the accumulator file and how many rows are valid) after both are on disk.
    Rows past that count (a write cut short by a kill) are dropped on resume."""

    def __init__(self, out: Path):
        self.dir = out / STATE
        self.progress = self.dir / "progress.json"
        self.rows_path = self.dir / "rows.jsonl"
        self.rows_written = 0

    def load(self, fingerprint: Dict[str, object]):
        if not self.progress.is_file():
            return None
        prog = json.loads(self.progress.read_text())
        if prog.get("fingerprint") != fingerprint:
            diff = [k for k in fingerprint if prog.get("fingerprint", {}).get(k) != fingerprint[k]]
            raise ValueError(f"--resume: the run in {self.dir.parent} was started with different inputs "
                             f"({', '.join(diff)} differ); use another --out or drop --resume")
        acc = runio.read_safetensors(self.dir / prog["accumulators"])
        n = prog["rows"]
        with open(self.rows_path, "rb") as f:
            lines = f.read().split(b"\n")[:n]
        rows = [json.loads(l) for l in lines]
        if len(rows) != n:
            raise ValueError(f"--resume: {self.rows_path} holds {len(rows)} rows, progress.json says {n}")
        runio.write_bytes(self.rows_path, b"".join(l + b"\n" for l in lines))  # drop a torn tail
        self.rows_written = n
        return prog["next_question"], acc, rows

    def save(self, k: int, next_question: int, fingerprint, accum: Dict[str, torch.Tensor], rows: List[dict]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        with open(self.rows_path, "a", encoding="utf-8") as f:
            f.write("".join(json.dumps(r) + "\n" for r in rows[self.rows_written:]))
            f.flush()
            os.fsync(f.fileno())
        self.rows_written = len(rows)
        acc_name = f"accum-{k:06d}.safetensors"
        runio.write_safetensors(self.dir / acc_name, accum)
        runio.write_json(self.progress, {"next_question": next_question, "chunk": k, "accumulators": acc_name,
                                         "rows": len(rows), "fingerprint": fingerprint})
        for p in self.dir.iterdir():  # older accumulators are no longer referenced
            if p.name.startswith("accum-") and p.name != acc_name:
                p.unlink(missing_ok=True)

    def load_pss(self) -> Dict[str, List[dict]]:
        p = self.dir / "pss.json"
        return json.loads(p.read_text()) if p.is_file() else {}

    def save_pss(self, done: Dict[str, List[dict]]) -> None:
        self.dir.mkdir(parents=True, exist_ok=True)
        runio.write_json(self.dir / "pss.json", done)

    def clear(self) -> None:
        if self.dir.is_dir():
            for p in self.dir.iterdir():
                p.unlink(missing_ok=True)
            self.dir.rmdir()


# ---------------------------------------------------------------------------- scoring loop


def _is_oom(e: BaseException) -> bool:
    return isinstance(e, torch.cuda.OutOfMemoryError) or "out of memory" in str(e).lower()


class _Runner:
    """Scores questions in batches, halving the batch on CUDA out-of-memory."""

    def __init__(self, lm: LoadedModel, scorer: Scorer, probe: ProbeSet, mass: ConceptMass, batch_size: int):
        self.lm, self.scorer, self.probe, self.mass = lm, scorer, probe, mass
        self.batch_size = batch_size
        self.stats = PromptStats(lm.n_layers, lm.d_ff)

    def run(self, questions, on_done) -> List[dict]:
        rows: List[dict] = []
        i = 0
        while i < len(questions):
            batch = questions[i : i + self.batch_size]
            try:
                results = self.scorer.score(batch, stats=self.stats)
            except (RuntimeError, torch.cuda.OutOfMemoryError) as e:
                if not _is_oom(e) or self.batch_size == 1:
                    raise
                self.batch_size = max(1, self.batch_size // 2)
                logger.warning("out of memory at batch size %d; retrying with %d", len(batch), self.batch_size)
                if self.lm.device.type == "cuda":
                    torch.cuda.empty_cache()
                continue
            # Fold only after the whole batch succeeded, so a retried batch never counts twice.
            idx = torch.tensor([self.probe.concept_index(q) for q in batch], device=self.stats.sums.device)
            self.mass.add(idx, self.stats.sums, getattr(self.stats, "valid", None))
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
            i += len(batch)
        return rows


# ---------------------------------------------------------------------------- main entry


def run_analysis(cfg: AnalyzeConfig, *, progress: bool = True) -> Dict[str, object]:
    """Run the whole analysis and write the run directory; returns ``summary.json``'s content."""
    cfg.validate()
    t_start = time.time()
    torch.manual_seed(cfg.seed)
    probe = load_probe(cfg.probe, max_concepts=cfg.max_concepts, seed=cfg.seed)
    if cfg.pss:
        cfg.pss_config.validate(probe)  # before minutes of scoring, not after
    lm = load_model(cfg.model_dir, dtype=cfg.dtype, device=cfg.device, trust_remote_code=cfg.trust_remote_code,
                    allow_pickle=cfg.allow_pickle)
    out = Path(cfg.out) if cfg.out else Path("specext-runs") / f"{Path(cfg.model_dir).name}-{probe.name}"
    out.mkdir(parents=True, exist_ok=True)
    fp = _fingerprint(cfg, probe, Path(cfg.model_dir))
    state = RunState(out)
    mass = ConceptMass(len(probe.concepts), lm.n_layers, lm.d_ff, device=lm.device)
    rows: List[dict] = []
    start = 0
    if cfg.resume:
        loaded = state.load(fp)
        if loaded is not None:
            start, acc, rows = loaded
            mass.load_state(acc)
            logger.info("resuming %s at question %d of %d", out, start, len(probe.questions))
        else:
            logger.info("--resume: no checkpoint in %s, starting from the beginning", out)
    else:
        state.clear()

    scorer = Scorer(lm, positions=cfg.positions, open_ended=cfg.open_ended, max_new_tokens=cfg.max_new_tokens)
    runner = _Runner(lm, scorer, probe, mass, cfg.batch_size)
    qs = probe.questions
    kill_after = int(os.environ.get("SPECEXT_TEST_KILL_AFTER_CHUNK", "-1"))  # tests: a real SIGKILL
    from tqdm.auto import tqdm

    with tqdm(total=len(qs), initial=start, desc="scoring", unit="q", disable=not progress) as bar:
        k = start // cfg.chunk_size
        last_save = time.time()
        for c0 in range(start, len(qs), cfg.chunk_size):
            rows += runner.run(qs[c0 : c0 + cfg.chunk_size], bar.update)
            end = min(c0 + cfg.chunk_size, len(qs))
            # Checkpoints cost a write of the accumulators (GBs for a 70B model with many
            # concepts), so they are spaced in time; the last chunk always checkpoints.
            if end == len(qs) or time.time() - last_save >= cfg.checkpoint_every:
                state.save(k, end, fp, mass.state(), rows)
                last_save = time.time()
                if k == kill_after:
                    os.kill(os.getpid(), signal.SIGKILL)
            k += 1

    norms = _value_norms(lm)  # (L, d_ff), used by --stat contribution and saved with the neurons
    pss = None
    if cfg.pss:
        if not lm.has_lm_head:
            logger.warning("PSS skipped: the model has no language-model head")
        else:
            pss = _run_pss(cfg, lm, probe, mass, rows, state, progress, norms)
    twin = _run_twin(cfg, lm, probe, progress) if cfg.random_twin else None
    summary = _finish(cfg, lm, probe, mass, rows, out, fp, time.time() - t_start, norms, pss, twin)
    state.clear()
    return summary


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


def _run_twin(cfg: AnalyzeConfig, lm: LoadedModel, probe: ProbeSet, progress: bool) -> Dict[str, object]:
    """The random-init twin on the same probe and positions: its specialisation and accuracy."""
    from tqdm.auto import tqdm

    from .twin import random_twin

    seed = cfg.seed + 1  # not the model's own sampling seed
    twin = random_twin(lm, seed)
    mass = ConceptMass(len(probe.concepts), twin.n_layers, twin.d_ff, device=twin.device)
    scorer = Scorer(twin, positions=cfg.positions, open_ended=False)
    runner = _Runner(twin, scorer, probe, mass, cfg.batch_size)
    with tqdm(total=len(probe.questions), desc="random twin", unit="q", disable=not progress) as bar:
        rows = runner.run(probe.questions, bar.update)
    norms = _value_norms(twin) if cfg.stat == "contribution" else None
    spec = specialisation(probe, mass, norms, null_permutations=cfg.null_permutations, seed=cfg.seed,
                          label="random twin")
    acc = accuracy_breakdown(rows)
    del twin, scorer, runner
    return {"seed": seed, "spec": spec, "accuracy": {"mcq": acc["mcq"], "mcq_norm": acc["mcq_norm"]}}


def _run_pss(cfg: AnalyzeConfig, lm, probe, mass: ConceptMass, rows, state: RunState, progress: bool,
             norms: torch.Tensor):
    pc = cfg.pss_config
    pc.validate(probe)
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
        kill = int(os.environ.get("SPECEXT_TEST_KILL_AFTER_PSS_CONCEPTS", "-1"))
        if kill >= 0 and len(done) > kill:
            os.kill(os.getpid(), signal.SIGKILL)

    return compute_pss(lm, probe, cm, pc, overall_accuracy=overall, progress=progress, done=done,
                       on_concept=checkpoint)


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


def _finish(cfg, lm, probe, mass: ConceptMass, rows, out: Path, fp, seconds: float, norms: torch.Tensor,
            pss=None, twin=None) -> Dict[str, object]:
    norms = norms.to(mass.sums.device)
    spec = specialisation(probe, mass, norms if cfg.stat == "contribution" else None,
                          null_permutations=cfg.null_permutations, seed=cfg.seed)
    table, cat_mass = spec.table, spec.category_mass
    acc = accuracy_breakdown(rows)
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
        "categories_used": [probe.categories[c] for c in keep],
        "empty_categories": spec.empty,
        "categories_dropped_by_layer": {str(l): v for l, v in spec.dropped_by_layer.items()},
        "nonfinite_prompt_layers": nonfinite,
        "prompts_without_positions": unselected,
        "pss": pss.summary if pss is not None else None,
        "random_twin": _twin_summary(spec.summary["neurons"], twin),
        "seconds": round(seconds, 2),
    }
    cfg_out = {
        "options": asdict(cfg),
        "fingerprint": fp,
        "versions": {"specext": __version__, **lm.info, "python": platform.python_version()},
        "build": build_info(),
        "model": {"architecture": lm.architecture, "model_type": lm.model_type, "dtype": str(lm.dtype),
                  "device": str(lm.device), "layers": lm.n_layers, "d_ff": lm.d_ff,
                  "down_proj": [s.name for s in lm.sites]},
        "definitions": DEFINITIONS | {
            "prompt_statistic": f"mean of |m| over the prompt's '{cfg.positions}' tokens",
            "mass": "mean over a category's prompts of the prompt statistic"
                    + (" times the value-vector norm" if cfg.stat == "contribution" else ""),
        },
    }
    meta = {"categories": json.dumps(probe.categories), "layers": str(lm.n_layers), "d_ff": str(lm.d_ff),
            "specext": __version__, "top_category": "index into 'categories'; -1 for dead neurons",
            "categories_used_by_layer": json.dumps(spec.usable.T.int().tolist())}
    tensors = {**table.as_dict(), "value_norms": norms.contiguous().cpu()}
    if spec.null is not None:
        tensors.update(spec.null.as_dict())
        meta["null_permutations"] = str(spec.null.permutations)
        meta["null_z_thresholds"] = json.dumps(spec.null.thresholds)
    if twin is not None:
        tensors["twin_gini"] = twin["spec"].table.gini.contiguous().cpu()
        if twin["spec"].null is not None:
            tensors["twin_excess_gini"] = twin["spec"].null.excess_gini.contiguous().cpu()
    runio.write_safetensors(out / "neurons.safetensors", tensors, metadata=meta)
    runio.write_safetensors(out / "mass.safetensors", {"concept_sums": mass.sums, "concept_counts": mass.counts,
                                                       "category_mass": cat_mass},
                            metadata={"concepts": json.dumps(probe.concepts),
                                      "categories": json.dumps(probe.categories)})
    runio.write_text(out / "concepts.csv", _concepts_csv(probe, acc))
    if pss is not None:
        runio.write_text(out / "pss.csv", _pss_csv(pss.rows))
        runio.write_text(out / "pss_curve.csv", _pss_curve_csv(pss.summary))
        runio.write_json(out / "pss_layers.json", {str(r): v for r, v in pss.layer_counts.items()})
    runio.write_text(out / "questions.jsonl", "".join(json.dumps(r) + "\n" for r in rows))
    runio.write_json(out / "config.json", cfg_out)
    runio.write_json(out / "summary.json", summary)
    if cfg.report:
        from .report import write_report

        write_report(out, summary, table, cat_mass[keep], [probe.categories[c] for c in keep],
                     pss_layers=pss.layer_counts if pss is not None else None, null=spec.null,
                     twin_gini=twin["spec"].table.gini if twin is not None else None)
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


def _value_norms(lm) -> torch.Tensor:
    """``(L, d_ff)`` L2 norms of every layer's value vectors (the model's own weights)."""
    from .ops import value_vector_norms

    return torch.stack([value_vector_norms(s.weight().detach()) for s in lm.sites])


PSS_COLUMNS = ["concept", "category", "tier", "ratio", "n_vectors", "cs", "g", "pss", "pss_delta", "pss_floor",
               "random_cs", "random_g", "random_pss", "random_pss_delta", "cs_before", "g_before", "denominator",
               "pss_general", "pss_overall"]


def _pss_csv(rows) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(PSS_COLUMNS)
    for r in rows:
        w.writerow(["" if r.get(c) is None else (f"{r[c]:.6f}" if isinstance(r[c], float) else r[c]) for c in PSS_COLUMNS])
    return buf.getvalue()


def _pss_curve_csv(p: Dict[str, object]) -> str:
    """The aggregates of pss.csv: mean over concepts with its 95% bootstrap interval, per
    score (paper, delta), vectors (top, random) and ratio; the ``peak`` and the paper
    score's ``floor`` (ratio 0) as rows of their own."""
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["score", "vectors", "ratio", "mean", "ci_low", "ci_high", "headline"])
    fmt = lambda v: "" if v is None or v != v else f"{v:.6f}"  # noqa: E731
    ci = lambda c, i: "" if c is None else fmt(c[i])  # noqa: E731
    w.writerow(["paper", "none", 0, fmt(p["floor"]), ci(p["floor_ci"], 0), ci(p["floor_ci"], 1), 0])
    for sc in SCORES:
        b = p[sc]
        head = int(sc == p["score"])
        for kind, pre in (("top", ""), ("random", "random_")):
            curve, cis = b[pre + "curve"], b[pre + "curve_ci"]
            if curve is None:
                continue
            for r, v, c in zip(p["ratios"], curve, cis):
                w.writerow([sc, kind, f"{r:g}", fmt(v), ci(c, 0), ci(c, 1), head])
            pk, pc = b[pre + "peak"], b[pre + "peak_ci"]
            w.writerow([sc, kind, "peak", fmt(pk), ci(pc, 0), ci(pc, 1), head])
    return buf.getvalue()


def _concepts_csv(probe: ProbeSet, acc) -> str:
    buf = io.StringIO()
    w = csv.writer(buf)
    w.writerow(["concept", "category", "tier", "questions", "mcq", "mcq_norm", "open"])
    by = acc["by_concept"]
    for c, k, t in zip(probe.concepts, probe.concept_category, probe.concept_tier):
        a = by.get(c, {})
        fmt = lambda v: "" if v is None else f"{v:.4f}"  # noqa: E731
        w.writerow([c, probe.categories[k], t or "", a.get("questions", 0), fmt(a.get("mcq")),
                    fmt(a.get("mcq_norm")), fmt(a.get("open"))])
    return buf.getvalue()


# ---------------------------------------------------------------------------- CLI


def _fmt(v) -> str:
    return "n/a" if v is None else (f"{v:.3f}" if isinstance(v, float) else str(v))


def print_summary(summary: Dict[str, object], out: Path, file=sys.stdout) -> None:
    a, n = summary["accuracy"], summary["neurons"]
    print(f"\nspecext: {summary['model']} ({summary['architecture']}) on probe '{summary['probe']['name']}' "
          f"({summary['probe']['questions']} questions, {summary['probe']['concepts']} concepts)", file=file)
    print(f"  accuracy      mcq {_fmt(a['mcq'])}   mcq_norm {_fmt(a['mcq_norm'])}   open {_fmt(a['open'])}", file=file)
    print(f"  neurons       {n['neurons']} ({n['dead']} dead)   mean Gini {_fmt(n['mean_gini'])}   "
          f"median Gini {_fmt(n['median_gini'])}   mean norm. entropy {_fmt(n['mean_norm_entropy'])}", file=file)
    if "mean_gini_null" in n:
        print(f"  null model    mean Gini under permuted categories {_fmt(n['mean_gini_null'])}   excess Gini "
              f"{_fmt(n['mean_excess_gini'])}   above the null's 99th percentile {_fmt(n['share_above_null'])} "
              f"(1% expected by chance)", file=file)
    tw = summary.get("random_twin")
    if tw:
        r = tw["model_over_twin"]
        print(f"  random twin   mean Gini {_fmt(tw['mean_gini'])}   excess Gini {_fmt(tw.get('mean_excess_gini'))}   "
              f"model/twin: Gini {_fmt(r['mean_gini'])}, excess {_fmt(r['mean_excess_gini'])}", file=file)
    has_null = "mean_excess_gini" in n
    print("  layer   mean Gini   >0.3   norm. entropy   dead" + ("   excess   >null" if has_null else ""), file=file)
    for l in summary["layers"]:
        extra = f"   {_fmt(l.get('mean_excess_gini')):>6}   {_fmt(l.get('share_above_null')):>5}" if has_null else ""
        print(f"  {l['layer']:>5}   {_fmt(l['mean_gini']):>9}   {_fmt(l['share_gini_above_0.3']):>5}   "
              f"{_fmt(l['mean_norm_entropy']):>13}   {l['dead']:>4}{extra}", file=file)
    p = summary.get("pss")
    if p:
        def ci(c):
            return "" if not c else f" [{c[0]:.3f}, {c[1]:.3f}]"

        name = {"paper": "PSS (paper)", "delta": "PSS delta"}
        print(f"  {name[p['score']]:<13} peak {_fmt(p['peak'])}{ci(p['peak_ci'])} at {p['peak_ratio']}% of vectors "
              f"({p['concepts']} concepts, 95% bootstrap intervals)", file=file)
        print(f"                floor (no mask) {_fmt(p['floor'])}{ci(p['floor_ci'])}", file=file)
        for sc in SCORES:
            b = p[sc]
            curve = "  ".join(f"{r:g}%:{v:.3f}" for r, v in zip(p["ratios"], b["curve"]))
            print(f"  {sc:>13} {curve}", file=file)
            if b.get("random_curve"):
                rc = "  ".join(f"{r:g}%:{v:.3f}" for r, v in zip(p["ratios"], b["random_curve"]))
                print(f"  {'random':>13} {rc}", file=file)
    print(f"  run directory {out}  ({summary['seconds']} s)", file=file)


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m specext.analyze", description=__doc__.split("\n\n")[0],
                                formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("model_dir", nargs="?", help="local Hugging Face model directory (config.json, *.safetensors, tokenizer)")
    p.add_argument("--demo", action="store_true", help="the shipped demo model with the synthetic probe")
    p.add_argument("--probe", default=None, help="world | synthetic | path to a JSONL probe (default: world; synthetic with --demo)")
    p.add_argument("--out", default=None, help="run directory (default: specext-runs/MODEL-PROBE)")
    p.add_argument("--dtype", default="auto", choices=["auto", "bfloat16", "float16", "float32"])
    p.add_argument("--device", default="auto", help="cpu | cuda | cuda:N | auto")
    p.add_argument("--batch-size", type=int, default=8)
    p.add_argument("--max-concepts", type=int, default=None, help="a seeded sample of this many concepts")
    p.add_argument("--positions", default="question", choices=list(POSITIONS),
                   help="tokens whose coefficients form a prompt's statistic")
    p.add_argument("--stat", default="abs", choices=list(STATS), help="abs: |m|; contribution: |m| * ||v||")
    p.add_argument("--resume", action="store_true", help="continue a killed run in --out")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--no-open", action="store_true", help="skip open-ended generation")
    p.add_argument("--max-new-tokens", type=int, default=12)
    p.add_argument("--chunk-size", type=int, default=64, help="questions per unit of work (checkpoints fall between chunks)")
    p.add_argument("--checkpoint-every", type=float, default=300.0,
                   help="seconds between checkpoints for --resume (0: after every chunk)")
    p.add_argument("--no-report", action="store_true", help="skip report.html")
    g = p.add_argument_group("Parameter Specialization Score (PSS)")
    g.add_argument("--no-pss", action="store_true", help="skip the masking experiment")
    g.add_argument("--ratios", default=",".join(f"{r:g}" for r in RATIOS),
                   help="percent of all L*d_ff value vectors to mask, comma-separated")
    g.add_argument("--pss-concepts", type=int, default=None, help="evaluate a seeded sample of N concepts")
    g.add_argument("--pss-unrelated", default="other", choices=["other", "same-category", "other-category"],
                   help="concepts whose mean mass is subtracted in the differential score")
    g.add_argument("--pss-selection", default="global", choices=["global", "per-layer"])
    g.add_argument("--pss-control", type=int, default=200, help="control questions (other concepts')")
    g.add_argument("--pss-denominator", default="overall", choices=list(DENOMINATORS),
                   help="overall: the model's overall accuracy before masking (the paper's); general: the control "
                        "set's accuracy without a mask")
    g.add_argument("--pss-score", default="paper", choices=list(SCORES),
                   help="the headline score: paper |G - CS| / A (has a floor at ratio 0), or delta "
                        "|dG - dCS| / A (baseline-corrected); both are always written")
    g.add_argument("--bootstrap", type=int, default=1000,
                   help="bootstrap resamples of concepts for the 95%% intervals (0: none)")
    g.add_argument("--pss-metric", default="mcq", choices=["mcq", "mcq_norm"])
    g.add_argument("--no-random-control", action="store_true", help="skip the random-vector control")
    g.add_argument("--pss-batch-rows", type=int, default=256, help="(question, mask) rows per forward pass")
    s = p.add_argument_group("specialisation controls")
    s.add_argument("--null-permutations", type=int, default=8,
                   help="random reassignments of concepts to categories for the Gini null model (0: off)")
    s.add_argument("--random-twin", action="store_true",
                   help="also run the same architecture with seeded random weights on the same probe (a control)")
    p.add_argument("--trust-remote-code", action="store_true", help="run the model directory's own Python code")
    p.add_argument("--allow-pickle", action="store_true", help="allow pickled *.bin weights (unsafe)")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress bar, warnings only")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    logging.basicConfig(level=logging.WARNING if args.quiet else logging.INFO, format="%(levelname)s %(name)s: %(message)s")
    try:
        import transformers

        transformers.utils.logging.disable_progress_bar()
        transformers.utils.logging.set_verbosity_error()
    except ImportError:
        pass
    if args.demo:
        if args.model_dir:
            print("error: give either MODEL_DIR or --demo, not both", file=sys.stderr)
            return 2
        args.model_dir = str(DEMO_MODEL)
        args.probe = args.probe or "synthetic"
        args.out = args.out or str(Path("specext-runs") / "demo")
    if not args.model_dir:
        print("error: MODEL_DIR is required (or --demo)", file=sys.stderr)
        return 2
    try:
        ratios = tuple(float(x) for x in args.ratios.split(",") if x.strip())
    except ValueError:
        print(f"error: --ratios must be comma-separated numbers, got {args.ratios!r}", file=sys.stderr)
        return 2
    if args.demo and args.pss_concepts is None:
        args.pss_concepts = DEMO_PSS_CONCEPTS
    if args.demo:
        args.random_twin = True  # seconds on the demo model; its report shows every control
    pss_cfg = PSSConfig(ratios=ratios, unrelated=args.pss_unrelated, selection=args.pss_selection,
                        control_size=args.pss_control, denominator=args.pss_denominator, concepts=args.pss_concepts,
                        metric=args.pss_metric, random_control=not args.no_random_control, seed=args.seed,
                        batch_rows=args.pss_batch_rows, score=args.pss_score, bootstrap=args.bootstrap)
    cfg = AnalyzeConfig(
        model_dir=args.model_dir, probe=args.probe or "world", out=args.out, dtype=args.dtype, device=args.device,
        batch_size=args.batch_size, max_concepts=args.max_concepts, positions=args.positions, stat=args.stat,
        seed=args.seed, resume=args.resume, trust_remote_code=args.trust_remote_code, allow_pickle=args.allow_pickle,
        open_ended=not args.no_open, max_new_tokens=args.max_new_tokens, chunk_size=args.chunk_size,
        checkpoint_every=args.checkpoint_every,
        report=not args.no_report, pss=not args.no_pss, pss_config=pss_cfg,
        null_permutations=args.null_permutations, random_twin=args.random_twin,
    )
    try:
        summary = run_analysis(cfg, progress=not args.quiet)
    except (ValueError, FileNotFoundError, OSError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    out = Path(cfg.out) if cfg.out else Path("specext-runs") / f"{Path(cfg.model_dir).name}-{summary['probe']['name']}"
    print_summary(summary, out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
