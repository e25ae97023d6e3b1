"""PSS: vector selection, per-row masks, a hand-built model where one neuron carries each
concept, the empty-mask identity, correlations against scipy, and bad options."""

import json
import math

import numpy as np
import pytest
import torch

import tiny_models as T
from specext.metrics import bootstrap
from specext.metrics import correlation
from specext.analyze import AnalyzeConfig, main, run_analysis
from specext.models import load_model
from specext.probes import Question, load_probe, write_jsonl
from specext.metrics.pss import (MaskedScorer, PSSConfig, compute_pss, control_set, differential_scores, pss_delta_value,
                         pss_value, random_vectors, summarize_pss, top_vectors)

CONCEPTS = {"aldor": "ruby", "brenn": "opal", "cyrra": "jade"}
PHRASES = ["What is the treasure of {c} ?", "Which gem belongs to {c} ?", "Name the stone kept in {c} ."]


def hand_probe():
    qs = []
    answers = list(CONCEPTS.values())
    for i, (c, a) in enumerate(CONCEPTS.items()):
        for p in PHRASES:
            others = [x for x in answers if x != a]
            choices = ["onyx", a, others[0], others[1]] if i == 0 else ["onyx", others[0], a, others[1]]
            qs.append(Question(c, f"cat{i % 2}", p.format(c=c), tuple(choices), choices.index(a), tier="high"))
    return qs


def build_hand_model(path):
    """One layer; attention averages the (normalised) prefix; MLP neuron i fires only when
    concept i's word is in the prompt and writes its answer's direction; lm_head reads it."""
    import transformers as tf

    from specext.probes import MCQ_TEMPLATE
    from specext.probes.synthetic import build_tokenizer

    qs = hand_probe()
    texts = [MCQ_TEMPLATE.format(question=q.question) + " " + c for q in qs for c in q.choices]
    tok = build_tokenizer(texts)
    V, H = len(tok), 8
    cfg = tf.LlamaConfig(vocab_size=V, hidden_size=H, intermediate_size=3, num_hidden_layers=1, num_attention_heads=1,
                         num_key_value_heads=1, head_dim=H, tie_word_embeddings=False, rms_norm_eps=1e-6,
                         max_position_embeddings=64, bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id,
                         pad_token_id=tok.pad_token_id, architectures=["LlamaForCausalLM"])
    model = tf.LlamaForCausalLM(cfg)
    ids = {w: tok.convert_tokens_to_ids(w) for w in list(CONCEPTS) + list(CONCEPTS.values()) + ["onyx"]}
    with torch.no_grad():
        for p in model.parameters():
            p.zero_()
        E = model.model.embed_tokens.weight
        E[:, 0] = 1.0  # a constant feature in every token
        layer = model.model.layers[0]
        layer.self_attn.v_proj.weight.copy_(torch.eye(H))
        layer.self_attn.o_proj.weight.copy_(torch.eye(H))
        for norm in (layer.input_layernorm, layer.post_attention_layernorm, model.model.norm):
            norm.weight.fill_(1.0)
        for i, (c, a) in enumerate(CONCEPTS.items()):
            E[ids[c], 1 + i] = 1.0
            layer.mlp.gate_proj.weight[i, 1 + i] = 100.0
            layer.mlp.gate_proj.weight[i, 0] = -1.0
            layer.mlp.up_proj.weight[i, 0] = 1.0
            layer.mlp.down_proj.weight[4 + i, i] = 1.0
            model.lm_head.weight[ids[a], 4 + i] = 5.0
        model.lm_head.weight[ids["onyx"], 0] = 0.5  # wins the tie once the answer's neuron is gone
    model.save_pretrained(path)
    tok.save_pretrained(path)
    probe_path = path / "probe.jsonl"
    write_jsonl(qs, probe_path)
    return path, probe_path


def test_hand_built_model_one_neuron_per_concept(tmp_path):
    model_dir, probe_path = build_hand_model(tmp_path / "hand")
    cfg = PSSConfig(ratios=(30.0,), control_size=9, random_control=False, batch_rows=7)
    s = run_analysis(AnalyzeConfig(model_dir=str(model_dir), probe=str(probe_path), out=str(tmp_path / "run"),
                                   device="cpu", open_ended=False, pss_config=cfg), progress=False)
    assert s["accuracy"]["mcq"] == 1.0
    rows = list(csv_rows(tmp_path / "run" / "pss.csv"))
    assert [r["concept"] for r in rows] == list(CONCEPTS)
    for r in rows:
        assert r["n_vectors"] == "1"
        assert float(r["cs"]) == 0.0  # the concept's own neuron is masked: its questions fail
        assert float(r["g"]) == 1.0  # every other concept keeps its neuron
        assert float(r["pss"]) == 1.0
    assert s["pss"]["peak"] == 1.0 and s["pss"]["peak_ratio"] == 30.0
    # the selected vector is the concept's own neuron
    from safetensors.torch import load_file

    m = load_file(str(tmp_path / "run" / "mass.safetensors"))
    cm = m["concept_sums"] / m["concept_counts"][..., None]
    d = differential_scores(cm, [0, 1, 0])
    assert [top_vectors(d[k], 30.0, 1, 3).tolist() for k in range(3)] == [[0], [1], [2]]


def csv_rows(path):
    import csv

    with open(path) as f:
        yield from csv.DictReader(f)


def test_differential_scores_and_selection():
    torch.manual_seed(0)
    mass = torch.rand(5, 3, 7)
    cat = [0, 0, 1, 1, 1]
    d = differential_scores(mass, cat, "other")
    m = mass.reshape(5, -1).double()
    for k in range(5):
        others = [j for j in range(5) if j != k]
        torch.testing.assert_close(d[k].double(), m[k] - m[others].mean(0), rtol=1e-6, atol=1e-6)
    d_same = differential_scores(mass, cat, "same-category")
    torch.testing.assert_close(d_same[0].double(), m[0] - m[1], rtol=1e-6, atol=1e-6)
    d_other = differential_scores(mass, cat, "other-category")
    torch.testing.assert_close(d_other[0].double(), m[0] - m[2:].mean(0), rtol=1e-6, atol=1e-6)
    top = top_vectors(d[0], 10.0, 3, 7)  # round(2.1) = 2 vectors
    assert top.tolist() == sorted(torch.argsort(-d[0].double(), stable=True)[:2].tolist())
    per = top_vectors(d[0], 30.0, 3, 7, "per-layer")  # 2 per layer
    assert len(per) == 6 and sorted(set((per // 7).tolist())) == [0, 1, 2]
    r1, r2 = random_vectors(10.0, 3, 7, "global", 5), random_vectors(10.0, 3, 7, "global", 5)
    assert torch.equal(r1, r2) and len(r1) == 2
    # a concept without prompts gets NaN scores and is left out of the others' means
    mass[4] = float("nan")
    d = differential_scores(mass, cat)
    assert d[4].isnan().all() and torch.isfinite(d[:4]).all()
    torch.testing.assert_close(d[0].double(), m[0] - m[1:4].mean(0), rtol=1e-6, atol=1e-6)


def test_stratified_concept_sample():
    from specext.probes import stratified_sample

    cats = [0] * 10 + [1] * 3 + [2] * 7
    s = stratified_sample(list(range(20)), cats, 9, seed=1)
    assert stratified_sample(list(range(20)), cats, 25, seed=1) == list(range(20))
    assert len(s) == 9 and s == sorted(s) and s == stratified_sample(list(range(20)), cats, 9, seed=1)
    assert [sum(cats[k] == c for k in s) for c in range(3)] == [3, 3, 3]


def test_control_set_covers_every_category():
    probe = load_probe("synthetic")
    c = control_set(probe, 10, seed=3)
    assert len(c) == 10 and c == sorted(c) and c == control_set(probe, 10, seed=3)
    assert {probe.questions[i].category for i in c} == set(probe.categories)


def test_per_row_masks_equal_one_row_at_a_time(tmp_path):
    lm = load_model(T.save_tiny("llama", tmp_path / "m", seed=4), device="cpu")
    qs = [Question("a", "x", "What is the capital of Aldoria?", ("Velmora", "Paris", "Tallinn", "Gold"), 0),
          Question("b", "x", "Which river flows through Velmora?", ("the Sarn", "Physics"), 1)]
    g = torch.Generator().manual_seed(0)
    masks = {None: None, "m1": torch.randperm(96, generator=g)[:20], "m2": torch.randperm(96, generator=g)[:40],
             "empty": torch.zeros(0, dtype=torch.long)}
    jobs = [(q, k) for q in range(2) for k in masks]
    ms = MaskedScorer(lm, batch_rows=8)
    together = {}
    orig = ms.scorer.score

    def spy(questions, **kw):
        res = orig(questions, **kw)
        for q, r in zip(questions, res):
            together.setdefault(q.question, []).append(r.option_logprobs)
        return res

    ms.scorer.score = spy
    ms.correctness(jobs, masks, qs)  # all 8 rows in one forward pass
    batched = dict(together)
    together.clear()
    ms.batch_rows = 1
    ms.correctness(jobs, masks, qs)  # one row at a time
    for q in batched:
        for a, b in zip(batched[q], together[q]):
            assert a == pytest.approx(b, abs=1e-5)
    # an empty mask is no mask, and different masks really differ
    logps = dict(zip([k for _, k in sorted(jobs, key=lambda j: (j[0], str(j[1])))][:4], batched[qs[0].question]))
    assert logps["empty"] == pytest.approx(logps[None], abs=1e-6) and logps["m2"] != pytest.approx(logps[None], abs=1e-3)


def test_empty_mask_pss_is_the_unmasked_gap(tmp_path):
    lm = load_model(T.save_tiny("llama", tmp_path / "m", seed=5), device="cpu")
    probe = load_probe("synthetic", max_concepts=6)
    cfg = PSSConfig(ratios=(0.1,), control_size=12, random_control=False, denominator="general")

    class EmptyMasks(MaskedScorer):
        def correctness(self, jobs, masks, questions, progress=None):
            empty = {k: (None if v is None else v[:0]) for k, v in masks.items()}
            return super().correctness(jobs, empty, questions, progress)

    mass = torch.rand(len(probe.concepts), lm.n_layers, lm.d_ff)
    res = compute_pss(lm, probe, mass, cfg, scorer=EmptyMasks(lm))
    for r in res.rows:
        assert r["cs"] == r["cs_before"] and r["g"] == r["g_before"]
        assert r["pss"] == pytest.approx(abs(r["g_before"] - r["cs_before"]) / r["g_before"])
        assert r["pss"] == r["pss_floor"] and r["pss_delta"] == 0.0  # nothing masked: the floor, no delta
    assert pss_value(0.5, 0.25, 0.5) == 0.5 and np.isnan(pss_value(0.5, 0.2, 0.0))
    assert pss_delta_value(0.6, 0.3, 0.8, 0.5, 0.5) == pytest.approx(0.0)
    assert pss_delta_value(0.8, 0.3, 0.8, 0.5, 0.5) == pytest.approx(0.4)  # only the concept lost 0.2


class EqualHarm(MaskedScorer):
    """Ignores the model: question correctness is set by hand so that every mask costs the
    concept and the control set exactly the same accuracy (0.1 per ratio step)."""

    def __init__(self, lm, probe, before, ratios):
        super().__init__(lm)
        self.probe, self.before, self.ratios, self.calls = probe, before, list(ratios), 0

    def correctness(self, jobs, masks, questions, progress=None):
        self.calls += 1
        if set(masks) == {None}:
            return {(q, k): self.before[q] for q, k in jobs}
        own_concept = self.probe.concepts[self.calls - 2]  # one call per concept, in probe order
        out = {}
        for key in masks:
            qs = sorted({q for q, k in jobs if k == key})
            own = [q for q in qs if questions[q].concept == own_concept]
            ctrl = [q for q in qs if questions[q].concept != own_concept]
            step = self.ratios.index(key[1]) + 1
            flip = set([q for q in own if self.before[q]][:step * len(own) // 10]
                       + [q for q in ctrl if self.before[q]][:step * len(ctrl) // 10])
            for q in qs:
                out[(q, key)] = self.before[q] and q not in flip
        return out


def test_equal_harm_gives_zero_delta_and_the_paper_score_stays_at_its_floor(tmp_path):
    lm = load_model(T.save_tiny("llama", tmp_path / "m", seed=5), device="cpu")
    probe = load_probe("synthetic", max_concepts=6)
    n_correct = {c: n for c, n in zip(probe.concepts, (10, 8, 6, 6, 8, 10))}
    seen = {}
    before = []
    for q in probe.questions:
        j = seen[q.concept] = seen.get(q.concept, -1) + 1
        before.append(j < n_correct[q.concept])
    ratios = (0.5, 1.0, 2.0)
    cfg = PSSConfig(ratios=ratios, control_size=len(probe.questions), bootstrap=200)
    overall = float(np.mean(before))
    res = compute_pss(lm, probe, torch.rand(len(probe.concepts), lm.n_layers, lm.d_ff), cfg,
                      overall_accuracy=overall, scorer=EqualHarm(lm, probe, before, ratios))
    floors = set()
    for r in res.rows:
        step = ratios.index(r["ratio"]) + 1
        assert r["cs"] == pytest.approx(r["cs_before"] - step / 10) and r["g"] == pytest.approx(r["g_before"] - step / 10)
        assert r["pss_delta"] == pytest.approx(0.0, abs=1e-12) and r["random_pss_delta"] == pytest.approx(0.0, abs=1e-12)
        assert r["pss_delta_signed"] == pytest.approx(0.0, abs=1e-12)
        assert r["pss"] == pytest.approx(r["pss_floor"], abs=1e-12)
        assert r["pss_floor"] == pytest.approx(abs(r["g_before"] - r["cs_before"]) / overall)
        assert r["denominator"] == overall
        floors.add(round(r["pss_floor"], 9))
    assert len(floors) > 1 and max(floors) > 0.1  # concepts differ from the control: a real floor
    s = res.summary
    assert s["delta"]["curve"] == pytest.approx([0.0] * 3, abs=1e-12) and s["delta"]["peak"] == pytest.approx(0.0, abs=1e-12)
    assert s["delta_signed"]["curve"] == pytest.approx([0.0] * 3, abs=1e-12)
    # every ratio ties at the floor, so the first (not the largest) is the peak
    assert s["paper"]["peak_ratio"] == 0.5 and not s["peak_at_largest_ratio"]
    assert s["paper"]["curve"] == pytest.approx([s["floor"]] * 3) and s["score"] == "paper" and s["peak"] == s["paper"]["peak"]
    lo, hi = s["floor_ci"]
    assert lo <= s["floor"] <= hi and lo < hi
    # --pss-score delta makes the delta score the headline
    cfg_d = PSSConfig(ratios=ratios, control_size=len(probe.questions), bootstrap=200, score="delta")
    res_d = compute_pss(lm, probe, torch.rand(len(probe.concepts), lm.n_layers, lm.d_ff), cfg_d,
                        overall_accuracy=overall, scorer=EqualHarm(lm, probe, before, ratios))
    assert res_d.summary["peak"] == pytest.approx(0.0, abs=1e-12) and res_d.summary["curve"] == res_d.summary["delta"]["curve"]


def test_bootstrap_intervals_contain_the_estimate_and_shrink_with_more_concepts():
    rng = np.random.default_rng(0)
    widths = []
    for K in (20, 80, 320):
        v = rng.normal(loc=[0.05, 0.1, 0.2], scale=0.1, size=(K, 3))
        v[rng.random(v.shape) < 0.05] = np.nan  # missing values are left out
        b = bootstrap.bootstrap_curve(v, 1000, seed=1)
        assert b == bootstrap.bootstrap_curve(v, 1000, seed=1)  # seeded
        for c, ci in zip(b["curve"], b["curve_ci"]):
            assert ci[0] < c < ci[1]
        assert b["peak_index"] == 2 and b["peak_ci"][0] < b["peak"] < b["peak_ci"][1]
        widths.append(b["curve_ci"][2][1] - b["curve_ci"][2][0])
    assert widths[0] > widths[1] > widths[2]
    assert widths[0] / widths[2] == pytest.approx(4.0, rel=0.25)  # ~ 1/sqrt(K)
    none = bootstrap.bootstrap_curve(rng.normal(size=(5, 2)), 0)
    assert none["curve_ci"] == [None, None] and none["peak_ci"] is None


def test_correlations_match_scipy():
    scipy_stats = pytest.importorskip("scipy.stats")  # the [test] extra; not needed to collect
    rng = np.random.default_rng(1)
    for n in (3, 4, 7, 20, 57):
        x = rng.normal(size=n)
        y = 0.7 * x + rng.normal(size=n)
        y[0] = y[1]  # a tie for the ranks
        r, p = correlation.pearson(list(x), list(y))
        ref = scipy_stats.pearsonr(x, y)
        assert r == pytest.approx(ref.statistic, abs=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-15)
        r, p = correlation.spearman(list(x), list(y))
        ref = scipy_stats.spearmanr(x, y)
        assert r == pytest.approx(ref.statistic, abs=1e-12) and p == pytest.approx(ref.pvalue, rel=1e-9, abs=1e-15)
    assert all(np.isnan(v) for v in correlation.pearson([1, 2], [3, 4]))
    assert all(np.isnan(v) for v in correlation.pearson([1, 1, 1], [3, 4, 5]))


def test_compare_runs(tmp_path):
    scipy_stats = pytest.importorskip("scipy.stats")  # the [test] extra; not needed to collect
    rng = np.random.default_rng(2)
    dirs = []
    for i in range(5):
        d = tmp_path / f"run{i}"
        d.mkdir()
        acc, pss, gini = rng.uniform(0.3, 0.9), rng.uniform(0.01, 0.2), rng.uniform(0.1, 0.3)
        delta = pss / 2
        (d / "summary.json").write_text(json.dumps({
            "model": f"m{i}", "architecture": "X", "parameters": 10 ** (6 + i), "accuracy": {"mcq": acc, "mcq_norm": acc, "open": 0.1},
            "pss": {"score": "paper", "peak": pss, "peak_ratio": 1.0, "floor": 0.01,
                    "paper": {"peak": pss, "peak_ratio": 1.0, "peak_ci": [pss - 0.01, pss + 0.02]},
                    "delta": {"peak": delta, "peak_ratio": 2.0, "peak_ci": [delta - 0.01, delta + 0.01]}},
            "neurons": {"mean_gini": gini, "mean_norm_entropy": 0.9, "mean_gini_null": 0.05,
                        "mean_excess_gini": gini - 0.05, "share_above_null": 0.5},
            "random_twin": {"mean_gini": 0.07, "mean_excess_gini": 0.02,
                            "model_over_twin": {"mean_gini": gini / 0.07, "mean_excess_gini": (gini - 0.05) / 0.02}},
            "probe": {"name": "world", "questions": 100}, "positions": "question"}))
        dirs.append(str(d))
    out = tmp_path / "cmp"
    assert main_compare(dirs + ["--out", str(out)]) == 0
    res = json.loads((out / "compare.json").read_text())
    x = [r["peak_pss"] for r in res["runs"]]
    y = [r["mcq"] for r in res["runs"]]
    c = res["correlations"]["peak_pss_vs_mcq"]
    assert c["n"] == 5 and c["pearson"] == pytest.approx(scipy_stats.pearsonr(x, y).statistic)
    # 5 runs: the exact permutation test over all 5! orderings (scipy's, on |rho|), not the t approximation
    rx = scipy_stats.rankdata(x)
    exact = scipy_stats.permutation_test((scipy_stats.rankdata(y),),
                                         lambda v: abs(scipy_stats.pearsonr(rx, v).statistic),
                                         permutation_type="pairings", n_resamples=np.inf, alternative="greater")
    assert c["spearman_p"] == pytest.approx(exact.pvalue) and c["spearman_p_method"] == "exact permutation"
    assert c["pearson_ci"][0] <= c["pearson"] <= c["pearson_ci"][1] and c["bootstrap_resamples"] > 900
    assert set(res["correlations"]) == {"peak_pss_vs_mcq", "mean_gini_vs_mcq", "mean_excess_gini_vs_mcq"}
    r0 = res["runs"][0]
    assert r0["pss_score"] == "paper" and r0["peak_pss_ci_low"] < r0["peak_pss"] < r0["peak_pss_ci_high"]
    assert r0["gini_over_twin"] == pytest.approx(r0["mean_gini"] / 0.07)
    header = (out / "compare.csv").read_text().splitlines()[0]
    assert header.startswith("label,run,model,architecture,parameters,mcq") and "mean_excess_gini" in header
    assert "<img" in (out / "compare.html").read_text() and (out / "compare.png").is_file()
    assert main_compare([str(tmp_path / "nope"), "--out", str(out)]) == 2
    # the delta score on request
    assert main_compare(dirs + ["--out", str(out), "--pss-score", "delta"]) == 0
    res = json.loads((out / "compare.json").read_text())
    assert res["pss_score"] == "delta" and res["runs"][0]["peak_pss"] == pytest.approx(x[0] / 2)
    # runs whose headline scores differ are not mixed silently
    s0 = json.loads((tmp_path / "run0" / "summary.json").read_text())
    s0["pss"]["score"] = "delta"
    (tmp_path / "run0" / "summary.json").write_text(json.dumps(s0))
    assert main_compare(dirs + ["--out", str(out)]) == 2


def main_compare(argv):
    from specext.compare import main as cmain

    return cmain(argv)


@pytest.mark.parametrize("kw, msg", [
    (dict(ratios=(0.0,)), r"each ratio is a percentage in \(0, 100\]"),
    (dict(ratios=(150.0,)), r"each ratio is a percentage in \(0, 100\]"),
    (dict(ratios=()), "needs at least one ratio"),
    (dict(denominator="median"), "--pss-denominator must be one of general, overall"),
    (dict(unrelated="some"), "--pss-unrelated must be one of"),
    (dict(selection="local"), "--pss-selection must be one of"),
    (dict(control_size=0), "--pss-control must be >= 1"),
    (dict(score="both"), "--pss-score must be one of paper, delta"),
    (dict(bootstrap=5), "--bootstrap must be 0 \\(off\\) or >= 10"),
])
def test_bad_options(kw, msg):
    with pytest.raises(ValueError, match=msg):
        PSSConfig(**kw)


def test_probe_with_one_concept_is_refused(tmp_path):
    p = tmp_path / "one.jsonl"
    write_jsonl([q for q in hand_probe() if q.concept == "aldor"], p)
    with pytest.raises(ValueError, match="PSS needs at least 2 concepts"):
        PSSConfig().check_probe(load_probe(p))
    r = main(["--demo", "--probe", str(p), "--out", str(tmp_path / "o"), "-q"])
    assert r == 2


def test_cli_ratio_errors(tmp_path, capsys):
    assert main(["--demo", "--ratios", "0.5,abc", "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "--ratios: item 2 of '0.5,abc', 'abc', is not a number" in capsys.readouterr().err
    for text in ("1,,2", "1,2,"):  # an empty item used to be dropped silently
        assert main(["--demo", "--ratios", text, "--out", str(tmp_path / "o"), "-q"]) == 2
        assert f"--ratios: item {2 if text == '1,,2' else 3} of '{text}' is empty" in capsys.readouterr().err
    assert main(["--demo", "--checkpoint-every", "nan", "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "--checkpoint-every must be a finite number, got nan" in capsys.readouterr().err
    assert main(["--demo", "--ratios", "0,5", "--out", str(tmp_path / "o"), "-q"]) == 2
    assert "percentage in (0, 100]" in capsys.readouterr().err


@pytest.mark.parametrize("selection", ["global", "per-layer"])
@pytest.mark.parametrize("unrelated", ["other", "same-category", "other-category"])
def test_streaming_selection_equals_the_dense_one(selection, unrelated):
    """One topk of the largest ratio with prefixes, per concept, equals a stable argsort of
    the dense K x L*d_ff score matrix, ties (integer-valued masses make many) included."""
    from specext.metrics.pss import DifferentialScores, top_vectors_all

    g = torch.Generator().manual_seed(3)
    K, L, D = 9, 3, 37
    cat = [0, 0, 1, 1, 1, 2, 2, 0, 1]
    for mass in (torch.rand((K, L, D), generator=g), torch.randint(0, 3, (K, L, D), generator=g).float()):
        mass[4] = float("nan")  # a concept without prompts
        m = mass.reshape(K, -1).double()
        ok = torch.isfinite(m).all(1)
        ds = DifferentialScores(mass, cat, unrelated)
        ratios = (1.0, 5.0, 10.0, 30.0)
        for k in range(K):
            c = torch.tensor(cat)
            rel = {"other": torch.ones(K, dtype=torch.bool), "same-category": c == cat[k],
                   "other-category": c != cat[k]}[unrelated] & ok
            rel[k] = False
            if not ok[k] or not rel.any():
                assert not ds.valid(k) and ds(k).isnan().all()
                continue
            dense = m[k] - m[rel].mean(0)  # the definition, computed densely
            torch.testing.assert_close(ds(k), dense, rtol=0, atol=1e-12)
            got = top_vectors_all(ds(k), ratios, L, D, selection)
            for r in ratios:
                d = ds(k).reshape(L, D)
                if selection == "global":
                    n = max(1, round(r / 100 * L * D))
                    want = torch.argsort(-d.reshape(-1), stable=True)[:n].sort().values
                else:
                    n = max(1, round(r / 100 * D))
                    want = (torch.argsort(-d, dim=1, stable=True)[:, :n] + torch.arange(L)[:, None] * D).reshape(-1).sort().values
                assert torch.equal(got[r], want), (k, r)


class Recording(MaskedScorer):
    """Ignores the model: every answer is right; records which questions each call scored."""

    def __init__(self, lm):
        super().__init__(lm)
        self.asked = []

    def correctness(self, jobs, masks, questions, progress=None):
        self.asked.append(sorted({q for q, _ in jobs}))
        return {(q, k): True for q, k in jobs}


def test_explicit_control_questions_replace_the_sample(tmp_path):
    """Fine-tuning passes G's control set without any trained concept: exactly those
    questions (minus the concept's own) are scored as the control, and bad indices are
    refused before anything is scored."""
    lm = load_model(T.save_tiny("llama", tmp_path / "m", seed=5), device="cpu")
    probe = load_probe("synthetic", max_concepts=6)
    mass = torch.rand(len(probe.concepts), lm.n_layers, lm.d_ff)
    cfg = PSSConfig(ratios=(1.0,), control_size=len(probe.questions), bootstrap=0, random_control=False)
    trained = probe.concepts[:2]
    control = [i for i, q in enumerate(probe.questions) if q.concept not in trained][::3]
    rec = Recording(lm)
    res = compute_pss(lm, probe, mass, cfg, overall_accuracy=1.0, scorer=rec, concepts=trained, control=control)
    own = {c: [i for i, q in enumerate(probe.questions) if q.concept == c] for c in trained}
    assert rec.asked[0] == sorted(set(control) | set(own[trained[0]]) | set(own[trained[1]]))  # unmasked baseline
    for c, asked in zip(trained, rec.asked[1:]):
        assert asked == sorted(set(control) | set(own[c]))
    assert res.summary["control_questions"] == len(control)
    for bad in ([], [-1], [len(probe.questions)]):
        rec = Recording(lm)
        with pytest.raises(ValueError, match="control question indices must be a non-empty subset"):
            compute_pss(lm, probe, mass, cfg, overall_accuracy=1.0, scorer=rec, concepts=trained, control=bad)
        assert not rec.asked


def test_signed_delta_is_the_concept_specific_loss_and_centred_under_noise():
    from specext.metrics.pss import pss_delta_signed_value

    # the concept lost 0.3, the control 0.1: +0.2 / A; the other way round: -0.2 / A
    assert pss_delta_signed_value(0.7, 0.5, 0.8, 0.8, 0.5) == pytest.approx(0.4)
    assert pss_delta_signed_value(0.5, 0.7, 0.8, 0.8, 0.5) == pytest.approx(-0.4)
    assert math.isnan(pss_delta_signed_value(0.5, 0.7, 0.8, 0.8, 0.0))
    # masks that move the concept and the control by independent noise: the absolute delta
    # is biased above 0, the signed one is centred on it
    rng = np.random.default_rng(0)
    cs, g = 0.8 - rng.binomial(10, 0.2, 4000) / 10, 0.8 - rng.binomial(10, 0.2, 4000) / 10
    signed = [pss_delta_signed_value(b, a, 0.8, 0.8, 1.0) for a, b in zip(cs, g)]
    absolute = [pss_delta_value(b, a, 0.8, 0.8, 1.0) for a, b in zip(cs, g)]
    assert abs(np.mean(signed)) < 0.01 and np.mean(absolute) > 0.1


def test_peak_at_the_largest_ratio_is_flagged():
    rows = []
    for c in range(4):
        for j, r in enumerate((1.0, 2.0, 5.0)):
            v = 0.1 * (j + 1) + 0.01 * c
            rows.append({"concept": f"c{c}", "category": "person", "tier": None, "ratio": r, "pss": v, "pss_delta": v, "pss_delta_signed": v,
                         "random_pss": 0.0, "random_pss_delta": 0.0, "random_pss_delta_signed": 0.0,
                         "pss_floor": 0.05, "pss_general": v, "pss_overall": v, "cs": 0.5, "g": 0.6,
                         "cs_before": 0.8, "g_before": 0.8})
    s = summarize_pss(rows, PSSConfig(ratios=(1.0, 2.0, 5.0), bootstrap=0), 4, 10, 0.8)
    assert s["peak_ratio"] == 5.0 and s["peak_at_largest_ratio"] and s["delta_signed"]["peak_at_largest_ratio"]


def test_skipped_concepts_are_named_in_the_summary_and_the_run_warnings(tmp_path, caplog):
    from specext.metrics.pss import PSSResult
    from specext.pipelines.run import _pss_warnings

    lm = load_model(T.save_tiny("llama", tmp_path / "m", seed=5), device="cpu")
    probe = load_probe("synthetic", max_concepts=6)
    mass = torch.rand(len(probe.concepts), lm.n_layers, lm.d_ff)
    mass[2] = float("nan")  # concept 2 had no usable prompt
    cfg = PSSConfig(ratios=(1.0,), control_size=30, bootstrap=0, random_control=False)
    with caplog.at_level("WARNING"):
        res = compute_pss(lm, probe, mass, cfg, overall_accuracy=1.0, scorer=Recording(lm))
    name, cat = probe.concepts[2], probe.categories[probe.concept_category[2]]
    assert res.summary["skipped_concepts"] == [{"concept": name, "category": cat,
                                                "reason": "no usable prompt (no question with finite activations "
                                                          "at its positions)"}]
    assert name in caplog.text and res.summary["concepts"] == len(probe.concepts) - 1
    warnings = _pss_warnings(PSSResult(rows=res.rows, summary=res.summary))
    assert any(f"PSS skipped concept '{name}' (category '{cat}')" in w for w in warnings)


def test_layer_matched_random_control(tmp_path):
    from specext.metrics.pss import random_like

    L, D = 5, 40
    top = torch.tensor([0, 3, 41, 42, 43, 44, 160, 199])  # layers 0 x2, 1 x4, 4 x2
    r = random_like(top, L, D, seed=7)
    assert torch.equal(torch.bincount(r // D, minlength=L), torch.bincount(top // D, minlength=L))
    assert torch.equal(r, r.unique()) and torch.equal(r, random_like(top, L, D, seed=7))  # distinct, sorted, seeded
    assert not torch.equal(r, random_like(top, L, D, seed=8))
    assert random_like(torch.empty(0, dtype=torch.long), L, D, 1).numel() == 0
    # through compute_pss: every concept's random mask has its top mask's layer counts
    lm = load_model(T.save_tiny("llama", tmp_path / "m", seed=5), device="cpu")
    probe = load_probe("synthetic", max_concepts=6)
    mass = torch.rand(len(probe.concepts), lm.n_layers, lm.d_ff)
    seen = []

    class Masks(Recording):
        def correctness(self, jobs, masks, questions, progress=None):
            seen.append(dict(masks))
            return super().correctness(jobs, masks, questions, progress)

    cfg = PSSConfig(ratios=(2.0, 10.0), control_size=30, bootstrap=0, random_match="layers")
    res = compute_pss(lm, probe, mass, cfg, overall_accuracy=1.0, scorer=Masks(lm))
    assert res.summary["random_match"] == "layers"
    for masks in seen[1:]:
        for r in cfg.ratios:
            t, rnd = masks[("top", r)], masks[("random", r)]
            assert torch.equal(torch.bincount(t // lm.d_ff, minlength=lm.n_layers),
                               torch.bincount(rnd // lm.d_ff, minlength=lm.n_layers))
    with pytest.raises(ValueError, match="--pss-random-match"):
        PSSConfig(random_match="per-layer")
