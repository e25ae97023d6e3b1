"""Causal fine-tuning (specext.finetune, issue 11): training touches only the selected value
vectors, the selections partition as they should, optimizer state scales with the selection,
the hallucination measures are wired in, and a killed ``--strategy all`` run resumes to the
uninterrupted table."""

import json
import os
import subprocess
import sys
import types
from pathlib import Path

import pytest
import torch

import tiny_models as T
from conftest import assert_equal
from specext.metrics import pss
from specext.models.deltas import ColumnDeltas
from specext.models.loading import load_model
from specext.pipelines import finetune as ft
from specext.pipelines import training
from specext.pipelines.rundir import read_safetensors

ROOT = Path(__file__).resolve().parents[1]
DEMO = ROOT / "python" / "specext" / "data" / "demo_model"
CONCEPTS = "Rimgeim Kreirekfou,Krezas Krorgru"


@pytest.fixture(scope="module", params=["llama", "gpt2"])
def tiny(request, tmp_path_factory):
    """A tiny random model of each down-projection layout: nn.Linear (Llama) and GPT-2's
    transposed Conv1D."""
    return T.save_tiny(request.param, tmp_path_factory.mktemp(request.param) / "model")


def _cfg(**kw):
    base = dict(steps=4, batch_size=3, lr=1e-2, seed=3, threads=1, log_every=1000)
    base.update(kw)
    return training.TrainConfig(**base)


def _examples(lm):
    return training.encode_texts(lm.tokenizer, T.CORPUS)


def _random_mask(L, D, n, seed=0):
    g = torch.Generator().manual_seed(seed)
    m = torch.zeros(L * D, dtype=torch.bool)
    m[torch.randperm(L * D, generator=g)[:n]] = True
    return m.view(L, D)


def _w(site):
    w = site.module.weight.detach()
    return (w.t() if site.conv1d else w).clone()  # (d_model, d_ff)


# --------------------------------------------------------------------------- training


def test_only_selected_columns_change(tiny):
    lm = load_model(tiny, device="cpu", dtype="float32")
    before = {n: p.detach().clone() for n, p in lm.model.named_parameters()}
    L, D = lm.n_layers, lm.d_ff
    sel = _random_mask(L, D, 7)
    deltas, res = ft.finetune_deltas(lm, _examples(lm), sel, _cfg())
    # During training the stored weights are never modified: the delta lives in the hook.
    for n, p in lm.model.named_parameters():
        assert_equal(p, before[n], what=f"{n} after training, before the merge")
        assert p.requires_grad, f"{n}: train() must restore requires_grad"
    assert res.n_trained_parameters == int(sel.sum()) * lm.sites[0].d_model
    # The hooked forward pass is the forward pass of the merged weights.
    ids = lm.tokenizer(T.CORPUS[0], return_tensors="pt")["input_ids"]
    with torch.no_grad(), deltas.attached():
        hooked = lm.model(input_ids=ids).logits
    snap = deltas.snapshot()
    deltas.merge_()
    with torch.no_grad():
        merged = lm.model(input_ids=ids).logits
    assert torch.allclose(hooked, merged, atol=1e-5, rtol=1e-4), (hooked - merged).abs().max()
    site_params = {s.name + ".weight" for s in lm.sites}
    for n, p in lm.model.named_parameters():
        if n not in site_params:
            assert_equal(p, before[n], what=f"{n} (not a down-projection) after the merge")
    for s in lm.sites:
        w0 = before[s.name + ".weight"]
        w0 = w0.t() if s.conv1d else w0
        w1 = _w(s)
        keep = ~sel[s.layer]
        assert_equal(w1[:, keep], w0[:, keep], what=f"layer {s.layer}: unselected columns")
        changed = (w1[:, sel[s.layer]] != w0[:, sel[s.layer]]).any(0)
        assert changed.all(), f"layer {s.layer}: selected columns {sel[s.layer].nonzero()[:, 0][~changed].tolist()} " \
                              "did not change"
    deltas.restore(snap)
    for n, p in lm.model.named_parameters():
        assert_equal(p, before[n], what=f"{n} after restore")


def test_optimizer_state_scales_with_selection():
    """FT-PV's optimizer state is at most 2/8 of FT-FV's at the default fraction; the state is
    AdamW's two float32 moments of the deltas (plus a step counter per tensor)."""
    import transformers as tf

    with training.deterministic(0):
        model = tf.LlamaForCausalLM(T.config("llama"))
    from specext.models.loading import wrap_model

    lm = wrap_model(model, T.tokenizer())
    L, D, dm = lm.n_layers, lm.d_ff, lm.sites[0].d_model
    scores = torch.randn(L, D, dtype=torch.float64, generator=torch.Generator().manual_seed(1))
    k, n_pv = ft.pv_count(10.0, L, D, 0.125)
    assert k == pss.n_vectors(10.0, L, D, "global") and n_pv == max(1, round(k / 8))
    state = {}
    for strategy in ("fv", "pv", "cv", "rv"):
        sel = ft.select(strategy, scores, n_pv, seed=0)
        _, res = ft.finetune_deltas(lm, _examples(lm), sel, _cfg(steps=2))
        n_sel = int(sel.sum())
        layers = int(sel.any(1).sum())
        moments = 2 * 4 * n_sel * dm
        assert moments <= res.optimizer_state_bytes <= moments + 64 * layers, (strategy, res.optimizer_state_bytes)
        state[strategy] = res.optimizer_state_bytes
    assert state["pv"] <= 2 / 8 * state["fv"], state
    assert state["rv"] == state["pv"] and state["cv"] < state["fv"]


# --------------------------------------------------------------------------- selection


def test_selections_partition_and_sizes():
    L, D = 3, 40
    scores = torch.randn(L, D, dtype=torch.float64, generator=torch.Generator().manual_seed(0))
    scores[1, 5] = scores[2, 7] = scores.max() + 1  # a tie at the top: the lower flat index first
    n_pv = 9
    pv, cv, rv, fv = (ft.select(s, scores, n_pv, seed=4) for s in ("pv", "cv", "rv", "fv"))
    for m in (pv, cv, rv, fv):
        assert m.dtype == torch.bool and m.shape == (L, D)
    assert not (pv & cv).any() and (pv | cv).all(), "FT-CV must be exactly the complement of FT-PV"
    assert int(pv.sum()) == n_pv and int(rv.sum()) == n_pv and bool(fv.all())
    want = torch.sort(scores.reshape(-1), descending=True, stable=True).indices[:n_pv]
    assert sorted(pv.reshape(-1).nonzero()[:, 0].tolist()) == sorted(want.tolist())
    one = ft.select("pv", scores, 1, seed=0)
    assert one[1, 5] and not one[2, 7]
    assert torch.equal(ft.select("rv", scores, n_pv, seed=4), rv), "FT-RV must be seeded"
    assert not torch.equal(ft.select("rv", scores, n_pv, seed=5), rv)
    with pytest.raises(ValueError, match="FT-PV size"):
        ft.select("pv", scores, 0, seed=0)


def test_vector_scores_are_summed_differential_scores():
    K, L, D = 5, 2, 6
    mass = torch.rand(K, L, D, generator=torch.Generator().manual_seed(2))
    cats = [0, 0, 1, 1, 2]
    d = pss.differential_scores(mass, cats, "other")
    got = ft.vector_scores(mass, cats, [1, 3], "other")
    assert got.shape == (L, D) and got.dtype == torch.float64
    assert torch.allclose(got.reshape(-1), d[1] + d[3])


# --------------------------------------------------------------------------- the experiment


@pytest.fixture(scope="module")
def probe8(tmp_path_factory):
    """The two trained concepts and the first concept of every category of the synthetic world
    (70 questions): the demo model's probe, small enough that an experiment of five evaluations
    takes seconds."""
    from specext.probes.probeset import load_probe, write_jsonl

    probe = load_probe("synthetic")
    first = {}
    for c, k in zip(probe.concepts, probe.concept_category):
        first.setdefault(k, c)
    keep = CONCEPTS.split(",") + [c for c in first.values() if c not in CONCEPTS.split(",")]
    path = tmp_path_factory.mktemp("probe") / "synthetic7.jsonl"
    write_jsonl(probe.subset_concepts(keep).questions, path)
    return path


def _base_args(probe, *extra):
    return [str(DEMO), "--probe", str(probe), "--concepts", CONCEPTS, "--steps", "3", "--batch-size", "2",
            "--pss-ratios", "1,10", "--pss-control", "24", "--control-size", "24", *extra]


def _run_args(probe, out, *extra):
    return _base_args(probe, *extra) + ["--out", str(out), "-q"]


def _fake_hallucination(monkeypatch, calls):
    """Stand-ins for specext.metrics.hallucination / specext.probes.sampling (another change of
    issue 11): answers are the correct choice or, for control questions, three distinct ones."""
    hall = types.ModuleType("specext.metrics.hallucination")
    sampling = types.ModuleType("specext.probes.sampling")

    def sample_answers(lm, questions, n, temperature, seed, max_new_tokens=12, batch_size=8):
        calls.append(("sample", len(questions), n, temperature, seed))
        return [[q.correct] * n if q.concept in CONCEPTS.split(",") else [f"a{j % 3}" for j in range(n)]
                for q in questions]

    def semantic_entropy(answers, question, nli=None):
        import math
        from collections import Counter

        c = Counter(answers)
        return -sum(v / len(answers) * math.log(v / len(answers)) for v in c.values())

    def answer_hidden_states(lm, questions, batch_size=8):
        calls.append(("hidden", len(questions)))
        return torch.randn(len(questions), 8, generator=torch.Generator().manual_seed(len(questions)))

    def lid_mean(points, k):
        calls.append(("lid", points.shape[0], k))
        return 3.5

    hall.semantic_entropy, hall.lid_mean = semantic_entropy, lid_mean
    sampling.sample_answers, sampling.answer_hidden_states = sample_answers, answer_hidden_states
    import specext.metrics
    import specext.probes

    monkeypatch.setitem(sys.modules, "specext.metrics.hallucination", hall)
    monkeypatch.setitem(sys.modules, "specext.probes.sampling", sampling)
    monkeypatch.setattr(specext.metrics, "hallucination", hall, raising=False)
    monkeypatch.setattr(specext.probes, "sampling", sampling, raising=False)


def test_single_strategy_run_directory(tmp_path, monkeypatch, capsys, probe8):
    """One strategy and seed: --out is the fine-tuned model (analyze loads it), with
    selected.safetensors and results.json; every weight outside the selection is bitwise the
    original checkpoint's; semantic entropy and LID come from the hallucination modules."""
    calls = []
    _fake_hallucination(monkeypatch, calls)
    pss_controls = []  # G's control questions of every PSS evaluation: no trained concept's among them
    real_pss = ft.compute_pss
    monkeypatch.setattr(ft, "compute_pss", lambda lm, probe, *a, **k: (
        pss_controls.append([probe.questions[i].concept for i in k["control"]]), real_pss(lm, probe, *a, **k))[1])
    out = tmp_path / "pv"
    assert ft.main(_run_args(probe8, out, "--strategy", "pv", "--se-samples", "3", "--lid-k", "30")) == 0
    assert len(pss_controls) == 2 and all(len(c) == 24 for c in pss_controls)  # the original model and FT-PV
    assert not set(CONCEPTS.split(",")) & {c for cs in pss_controls for c in cs}
    printed = capsys.readouterr().out
    assert "FT-PV" in printed and "original" in printed
    assert "(results.csv, results.json, results.html, results.png;" in printed, printed
    res = json.loads((out / "results.json").read_text())
    assert res["strategy"] == "pv" and [r["strategy"] for r in res["table"]] == ["original", "FT-PV"]
    sel = read_safetensors(out / "selected.safetensors")["selected"]
    lm = load_model(out, device="cpu")
    assert sel.dtype == torch.bool and tuple(sel.shape) == (lm.n_layers, lm.d_ff)
    assert int(sel.sum()) == res["selection"]["n_pv"] == res["vectors"]
    orig = read_safetensors(DEMO / "model.safetensors")
    new = read_safetensors(out / "model.safetensors")
    assert set(orig) == set(new)
    downs = {s.tensor: s.layer for s in lm.sites}
    for name, t in orig.items():
        if name not in downs:
            assert_equal(new[name], t, what=name)
        else:
            keep = ~sel[downs[name]]
            assert_equal(new[name][:, keep], t[:, keep], what=f"{name}: unselected columns")
            assert (new[name][:, ~keep] != t[:, ~keep]).any(0).all(), f"{name}: a selected column did not change"
    # The hallucination measures: sampled with --seed for every model, on both sets.
    trained_q, control_q = 20, 24
    assert ("sample", trained_q, 3, 1.0, 0) in calls and ("sample", control_q, 3, 1.0, 0) in calls
    assert ("lid", trained_q, trained_q - 1) in calls and ("lid", control_q, 23) in calls  # k clamped to N - 1
    row = res["table"][1]
    assert row["trained_se"] == 0.0 and row["trained_lid"] == 3.5
    assert abs(row["control_se"] - 1.0986) < 1e-3  # three equally frequent answers: ln 3
    assert any("normalised match" in n for n in res["notes"])


def test_resume_refuses_other_inputs(tmp_path, probe8, capsys):
    out = tmp_path / "run"
    args = _run_args(probe8, out, "--strategy", "rv", "--se-samples", "0", "--lid-k", "0", "--steps", "2")
    assert ft.main(args) == 0
    first = (out / "results.csv").read_text()
    assert ft.main(args + ["--resume"]) == 0  # nothing to redo
    assert (out / "results.csv").read_text() == first
    capsys.readouterr()
    assert ft.main(args + ["--resume", "--lr", "0.01"]) == 2
    err = capsys.readouterr().err
    assert "different inputs" in err and "--lr: 0.001 in the checkpoint, 0.01 now" in err and "original.json" in err, err
    # refused before anything was removed: the finished experiment is intact
    assert (out / "results.csv").read_text() == first and (out / "results.json").is_file()
    # --resume keeps the run's layout: one strategy's files in --out itself, not per-strategy folders
    assert ft.main(_run_args(probe8, out, "--strategy", "all", "--seeds", "1", "--se-samples", "0", "--lid-k", "0",
                             "--steps", "2", "--resume")) == 2
    assert "single strategy's run" in capsys.readouterr().err and not (out / "fv").exists()


def _cli(args, kill_after=None):
    # the same interpreter and sys.path as this test (the installed specext, or a developer's PYTHONPATH)
    env = dict(os.environ, OMP_NUM_THREADS="1")
    cmd = [sys.executable, "-m", "specext.finetune"] if kill_after is None else \
        [sys.executable, str(ROOT / "tests" / "kill_finetune.py"), str(kill_after), "--"]
    return subprocess.run(cmd + [str(a) for a in args], capture_output=True, text=True, env=env, timeout=600)


def test_killed_all_run_resumes_to_the_uninterrupted_table(tmp_path, probe8):
    args = _base_args(probe8, "--strategy", "all", "--seeds", "1", "--se-samples", "0", "--lid-k", "0")
    full, killed = tmp_path / "full", tmp_path / "killed"
    r = _cli(args + ["--out", full, "-q"])
    assert r.returncode == 0, r.stderr
    r = _cli(args + ["--out", killed, "-q"], kill_after=2)
    assert r.returncode == -9, (r.returncode, r.stderr)
    assert not (killed / "results.csv").exists() and (killed / "pv" / "seed-0" / "results.json").exists()
    assert not (killed / "cv" / "seed-0" / "results.json").exists()
    done = (killed / "fv" / "seed-0" / "results.json").stat().st_mtime_ns
    r = _cli(args + ["--out", killed, "-q", "--resume"])
    assert r.returncode == 0, r.stderr
    assert (killed / "fv" / "seed-0" / "results.json").stat().st_mtime_ns == done, "a finished run was redone"
    assert (killed / "results.csv").read_text() == (full / "results.csv").read_text()
    a, b = (json.loads((d / "results.json").read_text()) for d in (full, killed))
    assert a["table"] == b["table"] and [r["strategy"] for r in a["table"]] == ["original", "FT-FV", "FT-PV",
                                                                                "FT-CV", "FT-RV"]
    for s in ("fv", "pv", "cv", "rv"):
        assert (full / s / "seed-0" / "model.safetensors").read_bytes() == \
            (killed / s / "seed-0" / "model.safetensors").read_bytes()
    assert (killed / "results.html").is_file() and (killed / "results.png").is_file()


@pytest.fixture(scope="module")
def analysis(tmp_path_factory):
    """A finished analyze run of the demo model on the synthetic probe (12 concepts, PSS)."""
    from specext.analyze import AnalyzeConfig, PSSConfig, run_analysis

    run = tmp_path_factory.mktemp("analysis") / "run"
    run_analysis(AnalyzeConfig(model_dir=str(DEMO), probe="synthetic", out=str(run), max_concepts=12, report=False,
                               null_permutations=0, open_ended=False,
                               pss_config=PSSConfig(ratios=(1.0, 5.0), concepts=2, control_size=20, bootstrap=0)),
                 progress=False)
    return run


def _files(d: Path):
    """Every file under ``d`` (hidden ones too) with its bytes."""
    return {str(p.relative_to(d)): p.read_bytes() for p in sorted(d.rglob("*")) if p.is_file()}


def test_from_run_selection(tmp_path, monkeypatch, analysis):
    """--from-run reads the run's concept mass and peak ratio; the vectors are ranked by the
    differential score summed over the trained concepts on that mass."""
    run = analysis
    info = ft.load_run(run)
    summary = json.loads((run / "summary.json").read_text())
    assert info.peak_ratio == summary["pss"]["peak_ratio"] and info.mass.shape[0] == 12
    trained = info.concepts[:2]
    out = tmp_path / "ft"
    assert ft.main([str(DEMO), "--probe", "synthetic", "--concepts", ",".join(trained), "--from-run", str(run),
                    "--strategy", "pv", "--steps", "2", "--se-samples", "0", "--lid-k", "0", "--pss-ratios", "1",
                    "--pss-control", "20", "--control-size", "20", "--no-save-model", "--out", str(out), "-q"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["selection"]["ratio"] == info.peak_ratio
    cat_index = {}
    cats = [cat_index.setdefault(c, len(cat_index)) for c in info.categories]
    scores = ft.vector_scores(info.mass, cats, [0, 1])
    want = ft.select("pv", scores, res["selection"]["n_pv"], 0)
    assert torch.equal(read_safetensors(out / "selected.safetensors")["selected"], want)
    assert not (out / "model.safetensors").exists()
    with pytest.raises(ValueError, match="incomplete run directory"):
        ft.load_run(tmp_path)
    # A trained concept the run did not analyse: refused before the original is evaluated.
    from specext.probes.probeset import load_probe

    absent = next(c for c in load_probe("synthetic").concepts if c not in info.concepts)
    cfg = ft.FinetuneConfig(model_dir=str(DEMO), probe="synthetic", concepts=(absent,), from_run=str(run),
                            strategy="pv", se_samples=0, lid_k=0, out=str(tmp_path / "ft2"))
    called = []
    monkeypatch.setattr(ft, "evaluate", lambda *a, **k: called.append(1))
    with pytest.raises(ValueError, match="not among the run's 12 concepts"):
        ft.run_finetune(cfg, progress=False)
    assert not called


def test_options_are_checked():
    with pytest.raises(ValueError, match="--concepts A,B,... or --top-concepts"):
        ft.FinetuneConfig(model_dir="x")
    with pytest.raises(ValueError, match="--pv-fraction"):
        ft.FinetuneConfig(model_dir="x", concepts=("a",), pv_fraction=0)
    with pytest.raises(ValueError, match="--strategy"):
        ft.FinetuneConfig(model_dir="x", concepts=("a",), strategy="xv")
    with pytest.raises(ValueError, match="--se-samples"):
        ft.FinetuneConfig(model_dir="x", concepts=("a",), se_samples=1)
    cfg = ft.FinetuneConfig(model_dir="x", concepts=("a",))
    assert cfg.seed_list == [0, 1, 2] and ft.FinetuneConfig(model_dir="x", concepts=("a",), strategy="pv").seed_list == [0]


def test_concepts_must_exist_and_have_facts(tmp_path):
    from specext.probes.probeset import load_probe

    probe = load_probe("synthetic")
    with pytest.raises(ValueError, match="not in probe"):
        ft.choose_concepts(probe, ft.FinetuneConfig(model_dir="x", concepts=("Nobody",)))
    got = ft.choose_concepts(probe, ft.FinetuneConfig(model_dir="x", top_concepts=3, tier="high"))
    assert len(got) == 3 and all(probe.concept_tier[probe.concepts.index(c)] == "high" for c in got)
    ctl = ft.control_questions(probe, got, 30, 0)
    assert len(ctl) == 30 and not {probe.questions[i].concept for i in ctl} & set(got)
    assert len({probe.questions[i].category for i in ctl}) == len(probe.categories)


def test_device_map_model_trains_like_the_plain_one(tmp_path):
    """--device-map: the deltas live where each layer runs (here all on the CPU through
    accelerate's dispatch) and train exactly as on the plainly loaded model; a layer offloaded
    to disk (a meta weight) is refused with a message naming it."""
    pytest.importorskip("accelerate")
    path = T.save_tiny("llama", tmp_path / "m", seed=1, layers=4)
    plain = load_model(path, device="cpu")
    mapped = load_model(path, device="cpu", device_map="auto")
    assert mapped.device_map is not None
    sel = _random_mask(plain.n_layers, plain.d_ff, 11)
    (_, a), (_, b) = (ft.finetune_deltas(lm, _examples(lm), sel, _cfg()) for lm in (plain, mapped))
    assert a.losses == b.losses
    off = load_model(path, device="cpu", device_map="auto", max_memory="cpu=150KB", offload_dir=tmp_path / "off")
    with pytest.raises(ValueError, match="offloaded"):
        ColumnDeltas(off.sites, sel)


def _quick(*extra):
    return ["--strategy", "pv", "--steps", "1", "--se-samples", "0", "--lid-k", "0", "--pss-ratios", "1",
            "--pss-control", "20", "--control-size", "20", "--no-save-model", "-q", *extra]


def test_out_follows_analyze_rules(tmp_path, analysis, probe8, capsys):
    """One run, of one kind, per directory: a finished analyze run, a folder of other files and
    a finished finetune run are refused, byte for byte untouched, with the flag to pass;
    --overwrite replaces a specext run of either kind (never other files); --resume continues
    only a finetune run; --no-report's closing line names only the files written."""
    import shutil

    from specext.pipelines import analyze

    an = tmp_path / "an"
    shutil.copytree(analysis, an)
    before = _files(an)
    args = _run_args(probe8, an, *_quick("--no-report"))
    assert ft.main(args) == 2
    err = capsys.readouterr().err
    assert str(an) in err and "a finished python -m specext.analyze run (summary.json)" in err, err
    assert "--overwrite" in err, err
    assert ft.main(args + ["--resume"]) == 2
    assert "--resume continues only a python -m specext.finetune run" in capsys.readouterr().err
    assert _files(an) == before, "a refused finetune wrote into the analyze run"

    notes = tmp_path / "notes"
    notes.mkdir()
    (notes / "notes.txt").write_text("keep me")
    for extra, want in (([], "not a specext run directory"), (["--overwrite"], "refusing to delete"),
                        (["--resume"], "not a specext run directory")):
        assert ft.main(_run_args(probe8, notes, *_quick(*extra))) == 2
        err = capsys.readouterr().err
        assert want in err and "notes.txt" in err and str(notes) in err, (extra, err)
    assert sorted(p.name for p in notes.iterdir()) == ["notes.txt"] and (notes / "notes.txt").read_text() == "keep me"

    # --overwrite replaces the analyze run: none of its files stay next to the fine-tuning's
    assert ft.main(args + ["--overwrite"]) == 0
    printed = capsys.readouterr().out
    assert "(results.csv, results.json;" in printed and "results.html" not in printed, printed
    left = {p.name for p in an.iterdir()}
    assert not left & {"summary.json", "mass.safetensors", "concepts.csv", "pss.csv", "neurons.safetensors"}, left
    assert "results.html" not in left and "results.png" not in left and "results.json" in left

    # a finished finetune run: refused without a flag (and by analyze), untouched
    done = _files(an)
    assert ft.main(args) == 2
    err = capsys.readouterr().err
    assert "finished python -m specext.finetune run" in err and "--overwrite" in err and "--resume" in err, err
    assert analyze.main([str(DEMO), "--probe", str(probe8), "--out", str(an), "-q", "--no-pss", "--no-report"]) == 2
    err = capsys.readouterr().err
    assert "holds a finished python -m specext.finetune run" in err and "--overwrite" in err, err
    assert ft.main(args + ["--resume", "--overwrite"]) == 2
    assert "not both" in capsys.readouterr().err
    assert _files(an) == done


def _other_model(tmp_path: Path) -> Path:
    """The demo model with one tensor scaled: the same config.json, other weights (a
    fine-tune of the same base)."""
    import shutil

    from safetensors.torch import save_file

    d = tmp_path / "other-model"
    shutil.copytree(DEMO, d)
    w = read_safetensors(d / "model.safetensors")
    name = next(k for k in sorted(w) if "down_proj" in k)
    w[name] = w[name] * 1.5
    save_file(w, str(d / "model.safetensors"), metadata={"format": "pt"})
    return d


def test_from_run_of_another_model_is_refused(tmp_path, analysis, capsys):
    """--from-run's run records its model's config and weight hashes: a MODEL_DIR with other
    weights is an error naming both models and the field, before anything is written;
    --allow-run-mismatch runs with the difference recorded in results.json's warnings."""
    other = _other_model(tmp_path)
    trained = ",".join(ft.load_run(analysis).concepts[:2])
    out = tmp_path / "ft"
    args = [str(other), "--probe", "synthetic", "--concepts", trained, "--from-run", str(analysis), "--out", str(out),
            *_quick("--no-report")]
    assert ft.main(args) == 2
    err = capsys.readouterr().err
    assert "weights_sha256" in err and str(DEMO) in err and str(other) in err and "--allow-run-mismatch" in err, err
    assert "model_config_sha256" not in err  # the config is the same: only the weights differ
    assert not out.exists(), "a refused run left its --out behind"
    assert ft.main(args + ["--allow-run-mismatch"]) == 0
    res = json.loads((out / "results.json").read_text())
    assert len(res["warnings"]) == 1 and "weights_sha256" in res["warnings"][0], res["warnings"]
    assert "warning: --allow-run-mismatch" in capsys.readouterr().out
    with pytest.raises(ValueError, match="--allow-run-mismatch applies to --from-run"):
        ft.FinetuneConfig(model_dir="x", concepts=("a",), allow_run_mismatch=True)


def test_from_run_probe_must_hold_the_trained_questions(tmp_path, analysis):
    """The selection comes from the run's mass of each trained concept: a probe whose questions
    (or category) for a trained concept differ from the run's is reported; the same probe
    file, or another file with the same questions, is not; a config.json without the model's
    hashes cannot be checked."""
    from specext.probes.probeset import load_probe, write_jsonl

    info = ft.load_run(analysis)
    trained = info.concepts[:2]
    fp = {**{k: info.made_on[k] for k in ("model_config_sha256", "weights_sha256")}, "probe_sha256": None}
    probe = load_probe("synthetic")
    assert ft.check_from_run(info, DEMO, {**fp, "probe_sha256": info.made_on["probe_sha256"]}, probe, trained) == []
    same = tmp_path / "same.jsonl"
    write_jsonl(probe.subset_concepts(trained).questions, same)
    assert ft.check_from_run(info, DEMO, fp, load_probe(str(same)), trained) == []
    qs = probe.subset_concepts(trained).questions
    i = next(j for j, q in enumerate(qs) if q.concept == trained[1])
    import dataclasses

    qs[i] = dataclasses.replace(qs[i], question=qs[i].question + " (reworded)")
    changed = tmp_path / "changed.jsonl"
    write_jsonl(qs, changed)
    got = ft.check_from_run(info, DEMO, fp, load_probe(str(changed)), trained)
    assert len(got) == 1 and repr(trained[1]) in got[0] and "questions.jsonl" in got[0] and "reworded" in got[0], got
    blank = dataclasses.replace(info, made_on={})
    got = ft.check_from_run(blank, DEMO, fp, probe, trained)
    assert got and "records no model identity" in got[0], got


def test_allow_pickle(tmp_path, probe8, capsys):
    """finetune's pickle error names --allow-pickle, which finetune accepts (as analyze does):
    a checkpoint of only pickled weights then trains; without it nothing is written."""
    import shutil

    d = tmp_path / "pickled"
    shutil.copytree(DEMO, d)
    torch.save(read_safetensors(d / "model.safetensors"), d / "pytorch_model.bin")
    (d / "model.safetensors").unlink()
    out = tmp_path / "ft"
    args = [str(d), "--probe", str(probe8), "--concepts", CONCEPTS, "--out", str(out), *_quick("--no-report")]
    assert ft.main(args) == 2
    err = capsys.readouterr().err
    assert "pickled" in err and "--allow-pickle" in err and not out.exists(), err
    assert ft.main(args + ["--allow-pickle"]) == 0
    assert json.loads((out / "results.json").read_text())["table"][1]["strategy"] == "FT-PV"


def test_demo_replaces_its_own_folder_only(monkeypatch):
    """--demo without --out replaces its own specext-runs/finetune-demo (as analyze --demo);
    a folder of yours, or --resume, is not replaced."""
    from specext.pipelines import demo_models

    monkeypatch.setattr(demo_models, "holdout_model_dir", lambda: DEMO)
    monkeypatch.setattr(demo_models, "held_out_concepts", lambda d: CONCEPTS.split(","))
    seen = {}

    def fake_run(cfg, **kw):
        seen["cfg"] = cfg
        raise ValueError("stop here")

    monkeypatch.setattr(ft, "run_finetune", fake_run)
    assert ft.main(["--demo", "-q"]) == 2
    assert Path(seen["cfg"].out) == Path("specext-runs") / "finetune-demo" and seen["cfg"].overwrite
    assert ft.main(["--demo", "-q", "--out", "x"]) == 2 and not seen["cfg"].overwrite
    assert ft.main(["--demo", "-q", "--resume"]) == 2 and not seen["cfg"].overwrite and seen["cfg"].resume
