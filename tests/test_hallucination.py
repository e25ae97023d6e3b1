"""Hallucination measures (issue 11): semantic entropy, LID, the NLI plumbing."""

import json
import math

import pytest
import torch

from specext.metrics.hallucination import (cluster_answers, entailment_label, knn_distances, lid_mean, lid_mle,
                                           load_nli, semantic_entropy)
from specext.probes.probeset import Question

Q = Question(concept="Tavo Brenn", category="person", question="In which city was Tavo Brenn born?",
             choices=("Velmora", "Sarnet", "Kuldra", "Ostrel"), answer=0, aliases=("the city of Velmora",))


# ------------------------------------------------------------------ semantic entropy

def test_identical_answers_have_zero_entropy():
    assert semantic_entropy(["Sarnet"] * 7, Q) == 0.0
    assert semantic_entropy(["Velmora"], Q) == 0.0


@pytest.mark.parametrize("n", [2, 3, 5, 10])
def test_n_distinct_answers_have_entropy_ln_n(n):
    answers = [f"Name{i}x" for i in range(n)]
    assert len(set(cluster_answers(answers, Q))) == n
    assert semantic_entropy(answers, Q) == pytest.approx(math.log(n), abs=1e-12)


def test_aliases_and_phrasings_cluster_with_the_answer():
    answers = ["Velmora", "the city of Velmora", "It is Velmora.", "velmora", "Answer: Velmora"]
    assert cluster_answers(answers, Q) == [0] * 5
    assert semantic_entropy(answers, Q) == 0.0
    # a hedge naming a distractor is not the answer (the scorer's rule), nor is a longer word
    labels = cluster_answers(["Velmora", "Velmora or Sarnet", "Velmoran"], Q)
    assert labels[0] == 0 and labels[1] != 0 and labels[2] != 0


def test_wrong_answers_cluster_by_normalised_equality():
    labels = cluster_answers(["Sarnet", "sarnet.", "The Sarnet", "Kuldra", "Velmora", "Kuldra!"], Q)
    assert labels == [0, 0, 0, 1, 2, 1]
    # two clusters of 3 and 3 of 6 answers -> ln 2 ... here: {Sarnet:3, Kuldra:2, Velmora:1}
    p = [3 / 6, 2 / 6, 1 / 6]
    assert semantic_entropy(["Sarnet", "sarnet.", "The Sarnet", "Kuldra", "Velmora", "Kuldra!"], Q) == pytest.approx(
        -sum(x * math.log(x) for x in p))


def test_nli_merges_clusters_against_the_first_member():
    calls = []

    def nli(a, b):  # "equivalent" when the first letters agree
        calls.append((a, b))
        return a[:1].lower() == b[:1].lower()

    answers = ["Sarnet", "Sorrow", "Kuldra", "Velmora", "Vast plains", "Kite"]
    # Sarnet, Sorrow -> 0; Kuldra, Kite -> 1; Velmora (correct) -> 2 with Vast plains by entailment
    assert cluster_answers(answers, Q, nli=nli) == [0, 0, 1, 2, 2, 1]
    assert all(isinstance(a, str) and isinstance(b, str) for a, b in calls)
    # equal answers never reach the model; without nli they stay apart
    calls.clear()
    cluster_answers(["Sarnet", "sarnet"], Q, nli=nli)
    assert calls == []
    assert cluster_answers(answers, Q) == [0, 1, 2, 3, 4, 5]


def test_semantic_entropy_rejects_no_answers():
    with pytest.raises(ValueError, match="at least one answer"):
        semantic_entropy([], Q)


# ------------------------------------------------------------------ LID

def _linear_manifold(n, d, D, seed):
    g = torch.Generator().manual_seed(seed)
    z = torch.randn(n, d, generator=g, dtype=torch.float64)
    basis = torch.linalg.qr(torch.randn(D, d, generator=g, dtype=torch.float64))[0]  # orthonormal columns
    return (z @ basis.T + 5.0).float()


@pytest.mark.parametrize("d", [2, 5, 10])
def test_lid_of_a_linear_manifold_is_its_dimension(d):
    x = _linear_manifold(1500, d, 48, seed=d)
    est = lid_mean(x, k=20)
    assert abs(est - d) <= 0.2 * d, est
    per_point = lid_mle(x, k=20)
    assert per_point.shape == (1500,) and per_point.dtype == torch.float64
    assert abs(per_point.median().item() - d) <= 0.2 * d


def test_lid_separates_dimensions():
    low, high = lid_mean(_linear_manifold(800, 3, 32, 1), 15), lid_mean(_linear_manifold(800, 9, 32, 1), 15)
    assert low < high


def test_knn_blocks_equal_the_dense_computation():
    x = torch.randn(157, 11, generator=torch.Generator().manual_seed(3))
    dense = torch.cdist(x.double(), x.double())
    dense.fill_diagonal_(math.inf)
    want = dense.sort(1).values[:, :7]
    for block in (64, 200, 1 << 23):  # tiny blocks: many row and column blocks
        got = knn_distances(x, 7, block_elements=block)
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(lid_mle(x, 7, block_elements=64), lid_mle(x, 7))


def test_lid_formula_on_a_hand_example():
    # points on a line at 0, 1, 2, 4: for the point 0 with k=3: T = (1, 2, 4)
    x = torch.tensor([[0.0], [1.0], [2.0], [4.0]])
    lid = lid_mle(x, k=3)
    want0 = 1.0 / ((math.log(4 / 1) + math.log(4 / 2)) / 2)
    assert lid[0].item() == pytest.approx(want0)


def test_duplicates_are_not_neighbours():
    x = _linear_manifold(300, 3, 10, seed=7)
    dup = torch.cat([x, x[:50]])  # 50 exact duplicates
    lid = lid_mle(dup, k=10)
    assert torch.isfinite(lid).all() and (lid > 0).all()
    torch.testing.assert_close(lid[300:], lid[:50])
    # other points may see a duplicated point twice among their neighbours (a tie, which moves
    # their estimate); the set's dimension stays about the same
    assert lid_mean(dup, k=10) == pytest.approx(lid_mean(x, k=10), rel=0.3)
    # fewer than k distinct points: NaN for those, and lid_mean skips them
    few = torch.cat([torch.zeros(5, 3), torch.tensor([[1.0, 0, 0], [0, 2.0, 0], [0, 0, 3.5]])])
    got = lid_mle(few, k=4)
    assert torch.isnan(got[:5]).all() and not torch.isnan(got[5:]).any()  # [1,0,0]: 4 tied neighbours, inf
    assert lid_mean(few, k=4) == math.inf  # the estimates that exist are all inf (tied neighbours)


def test_lid_errors():
    x = torch.randn(10, 4)
    with pytest.raises(ValueError, match=r"k must be in \[1, N-1\]"):
        lid_mle(x, k=10)
    with pytest.raises(ValueError, match="k must be >= 2"):
        lid_mle(x, k=1)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        lid_mle(torch.randn(10), k=3)
    with pytest.raises(ValueError, match="NaN or inf"):
        lid_mle(torch.tensor([[0.0, 1.0], [math.nan, 0.0], [1.0, 1.0]]), k=2)
    with pytest.raises(ValueError, match="no point has an LID"):
        lid_mean(torch.zeros(6, 2), k=2)


# ------------------------------------------------------------------ NLI plumbing

def _save_nli(path, id2label):
    from tokenizers import Tokenizer, models, pre_tokenizers, processors
    from transformers import BertConfig, BertForSequenceClassification, PreTrainedTokenizerFast

    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]"] + "velmora sarnet the city of it is a b".split()
    tok = Tokenizer(models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.post_processor = processors.TemplateProcessing(single="[CLS] $A [SEP]", pair="[CLS] $A [SEP] $B:1 [SEP]:1",
                                                       special_tokens=[("[CLS]", 2), ("[SEP]", 3)])
    fast = PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="[PAD]", unk_token="[UNK]", cls_token="[CLS]",
                                   sep_token="[SEP]")
    torch.manual_seed(0)
    cfg = BertConfig(vocab_size=len(words), hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=64, num_labels=len(id2label),
                     id2label=id2label, label2id={v: k for k, v in id2label.items()})
    model = BertForSequenceClassification(cfg)
    model.save_pretrained(path, safe_serialization=True)
    fast.save_pretrained(path)
    return model, fast


def test_load_nli_runs_a_local_classifier(tmp_path):
    model, tok = _save_nli(tmp_path / "nli", {0: "ENTAILMENT", 1: "neutral", 2: "contradiction"})
    pred = load_nli(tmp_path / "nli")
    assert pred.entail_index == 0
    a, b = "the city of velmora", "velmora"
    got = pred(a, b)
    with torch.no_grad():
        enc = tok([a, b], [b, a], padding=True, return_tensors="pt")
        want = bool((model.eval()(**enc).logits.argmax(-1) == 0).all())
    assert got is want
    assert pred(b, a) is got and pred.calls == 1  # symmetric, cached
    # usable as cluster_answers' nli
    labels = cluster_answers(["Sarnet", "a b", "it is"], Q, nli=pred)
    assert len(labels) == 3 and labels[0] == 0


def test_load_nli_refuses_models_without_an_entailment_label(tmp_path):
    _save_nli(tmp_path / "sst", {0: "negative", 1: "positive"})
    with pytest.raises(ValueError, match="entailment label"):
        load_nli(tmp_path / "sst")
    assert entailment_label({0: "not_entailment", 1: "entailment"}) == 1
    with pytest.raises(ValueError):
        entailment_label({0: "not_entailment", 1: "neutral"})


def test_load_nli_refuses_pickled_weights(tmp_path):
    d = tmp_path / "pickled"
    d.mkdir()
    (d / "config.json").write_text(json.dumps({"model_type": "bert", "id2label": {"0": "entailment"}}))
    (d / "pytorch_model.bin").write_bytes(b"not loaded")
    with pytest.raises(ValueError, match="safetensors only"):
        load_nli(d)
    with pytest.raises(FileNotFoundError):
        load_nli(tmp_path / "missing")
