"""Tests for specext.pipelines.training on a tiny Llama: determinism, learning, which parameters move,
gradient accumulation, the loss mask, the schedule and saving."""

import json
import math

import pytest
import torch

import tiny_models as T
from specext.pipelines import training
from specext.pipelines.training import IGNORE_INDEX, TrainConfig

TEXTS = T.CORPUS[:4]


def _model(seed=0):
    import transformers as tf

    with training.deterministic(seed):
        return tf.LlamaForCausalLM(T.config("llama"))


@pytest.fixture(scope="module")
def tok():
    return T.tokenizer()


@pytest.fixture(scope="module")
def examples(tok):
    return training.encode_texts(tok, TEXTS)


def _cfg(**kw):
    base = dict(steps=6, batch_size=3, lr=3e-3, warmup=2, seed=5, threads=1, log_every=1000)
    base.update(kw)
    return TrainConfig(**base)


def _state(model):
    return {n: p.detach().clone() for n, p in model.named_parameters()}


def _mismatch(a, b, what):
    bad = a != b
    return f"{what}: {int(bad.sum())} of {bad.numel()} elements differ"


# --------------------------------------------------------------------------- data


def test_encode_and_collate(tok):
    ex = training.encode_texts(tok, ["In which city", "Paris"])
    assert [list(e.input_ids) for e in ex] == [tok(t)["input_ids"] + [tok.eos_token_id] for t in ["In which city", "Paris"]]
    assert all(all(e.loss_mask) for e in ex)
    pairs = training.encode_pairs(tok, ["Question: capital?\nAnswer:"], [" Velmora"])
    (e,) = pairs
    ctx = tok("Question: capital?\nAnswer:")["input_ids"]
    assert list(e.input_ids[:len(ctx)]) == ctx and not any(e.loss_mask[:len(ctx)])
    assert all(e.loss_mask[len(ctx):]) and e.input_ids[-1] == tok.eos_token_id
    assert e.n_targets == len(e.input_ids) - len(ctx)

    b = training.collate(ex + pairs, pad_id=tok.pad_token_id)
    lengths = [len(x.input_ids) for x in ex + pairs]
    assert b.input_ids.shape == (3, max(lengths)) and b.input_ids.dtype == torch.long
    for i, (x, n) in enumerate(zip(ex + pairs, lengths)):
        assert b.input_ids[i, :n].tolist() == list(x.input_ids)
        assert (b.input_ids[i, n:] == tok.pad_token_id).all() and (b.attention_mask[i, n:] == 0).all()
        assert b.attention_mask[i, :n].tolist() == [1] * n
        want = [t if m else IGNORE_INDEX for t, m in zip(x.input_ids, x.loss_mask)] + [IGNORE_INDEX] * (b.input_ids.shape[1] - n)
        assert b.labels[i].tolist() == want
    assert b.n_targets == sum(x.n_targets for x in ex + pairs)
    with pytest.raises(ValueError, match="loss_mask"):
        training.Example((1, 2), (True,))
    with pytest.raises(ValueError, match="2 prompts but 1 targets"):
        training.encode_pairs(tok, ["a", "b"], ["c"])


def test_example_order_is_seeded_epochs():
    a = training.example_order(5, 7)
    first = [next(a) for _ in range(15)]
    for k in range(3):
        assert sorted(first[5 * k:5 * k + 5]) == list(range(5))
    b = training.example_order(5, 7)
    assert [next(b) for _ in range(15)] == first
    c = training.example_order(5, 8)
    assert [next(c) for _ in range(15)] != first


def test_lr_schedule():
    cfg = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1)
    assert training.lr_at(0, cfg) == pytest.approx(0.1) and training.lr_at(9, cfg) == pytest.approx(1.0)
    assert training.lr_at(10, cfg) == pytest.approx(1.0)
    t = 45 / 90
    assert training.lr_at(55, cfg) == pytest.approx(0.1 + 0.9 * 0.5 * (1 + math.cos(math.pi * t)))
    assert training.lr_at(100, cfg) == pytest.approx(0.1)  # the end of the decay
    lin = TrainConfig(steps=100, lr=1.0, warmup=10, min_lr_ratio=0.1, schedule="linear")
    assert training.lr_at(55, lin) == pytest.approx(0.1 + 0.9 * 0.5)
    const = TrainConfig(steps=100, lr=2.0, warmup=0, schedule="constant")
    assert {training.lr_at(s, const) for s in range(100)} == {2.0}
    lrs = [training.lr_at(s, cfg) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(lrs, lrs[1:]))
    with pytest.raises(ValueError, match="schedule"):
        training.train(_model(), [training.Example((1, 2), (True, True))], TrainConfig(steps=1, schedule="step"),
                       pad_id=2)


# --------------------------------------------------------------------------- the loop


def test_seeded_runs_are_identical(examples, tok):
    prev = (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled())
    runs = []
    for _ in range(2):
        m = _model(0)
        res = training.train(m, examples, _cfg(), pad_id=tok.pad_token_id, progress=False)
        runs.append((res.losses, _state(m)))
    assert (torch.get_num_threads(), torch.are_deterministic_algorithms_enabled()) == prev
    assert runs[0][0] == runs[1][0]
    for n, p in runs[0][1].items():
        assert torch.equal(p, runs[1][1][n]), _mismatch(p, runs[1][1][n], n)
    m = _model(0)
    other = training.train(m, examples, _cfg(seed=6), pad_id=tok.pad_token_id, progress=False)
    assert other.losses != runs[0][0]


def test_loss_decreases_on_memorisation(examples, tok):
    m = _model(1)
    res = training.train(m, examples, _cfg(steps=60, lr=1e-2, warmup=5, batch_size=4), pad_id=tok.pad_token_id,
                         progress=False)
    assert len(res.losses) == 60 and res.steps == 60
    assert res.initial_loss == res.losses[0] and res.final_loss == pytest.approx(sum(res.losses[-3:]) / 3)
    assert res.final_loss < 0.3 * res.initial_loss, (res.initial_loss, res.final_loss)
    assert res.n_trained_parameters == sum(p.numel() for p in m.parameters())
    order = training.example_order(len(examples), 5 + 1)
    assert res.n_targets == sum(examples[next(order)].n_targets for _ in range(60 * 4))
    for mode in (True, False):  # the model's mode is restored
        m.train(mode)
        training.train(m, examples, _cfg(steps=1), pad_id=tok.pad_token_id, progress=False)
        assert m.training == mode


@pytest.mark.parametrize("how", ["callable", "list"])
def test_only_chosen_parameters_change(examples, tok, how):
    m = _model(2)
    before = _state(m)
    chosen = {n for n in before if ".mlp.down_proj." in n}
    spec = (lambda n, p: n in chosen) if how == "callable" else [p for n, p in m.named_parameters() if n in chosen]
    res = training.train(m, examples, _cfg(weight_decay=0.1), pad_id=tok.pad_token_id, params=spec, progress=False)
    assert res.n_trained_parameters == sum(before[n].numel() for n in chosen)
    for n, p in m.named_parameters():
        if n in chosen:
            assert not torch.equal(p, before[n]), n
        else:
            assert torch.equal(p, before[n]), _mismatch(p, before[n], n)
            assert p.grad is None, n
        assert p.requires_grad, n  # frozen parameters are released after the loop


def test_external_delta_parameter(examples, tok):
    """A tensor outside the model (a dense delta added to a down-projection's output by a
    hook, as the fine-tuning experiments do) trains while the model stays unchanged."""
    m = _model(3)
    before = _state(m)
    site = m.model.layers[1].mlp.down_proj
    delta = torch.zeros(site.out_features, site.in_features, requires_grad=True)
    h = site.register_forward_hook(lambda mod, args, out: out + args[0] @ delta.t())
    try:
        res = training.train(m, examples, _cfg(), pad_id=tok.pad_token_id, params=[delta], progress=False)
    finally:
        h.remove()
    assert res.n_trained_parameters == delta.numel() and delta.abs().sum() > 0
    for n, p in m.named_parameters():
        assert torch.equal(p, before[n]), _mismatch(p, before[n], n)


def test_gradient_accumulation_matches_one_large_batch(examples, tok):
    big, acc = _model(4), _model(4)
    r_big = training.train(big, examples, _cfg(steps=1, batch_size=6, max_grad_norm=None), pad_id=tok.pad_token_id,
                           progress=False)
    r_acc = training.train(acc, examples, _cfg(steps=1, batch_size=2, accumulation=3, max_grad_norm=None),
                           pad_id=tok.pad_token_id, progress=False)
    assert r_acc.n_targets == r_big.n_targets
    assert r_acc.losses[0] == pytest.approx(r_big.losses[0], rel=1e-6)
    # The gradients of the (only) step are left in .grad: compare them, not Adam's sign-like first update.
    for (n, p), q in zip(big.named_parameters(), acc.parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{n}: {m}")


def test_dropout_off_makes_accumulation_exact_for_a_model_with_dropout(examples, tok):
    """GPT-2's config has dropout 0.1: in train mode each micro-batch draws its own masks, so
    split batches train differently; finetune trains with dropout off (TrainConfig(dropout=
    False)), where 2 x 3 equals 6 x 1 again, and the model's mode is restored after."""
    import transformers as tf

    def gpt2(seed):
        with training.deterministic(seed):
            cfg = T.config("gpt2")
            assert cfg.resid_pdrop > 0 and cfg.attn_pdrop > 0
            return tf.GPT2LMHeadModel(cfg)

    runs = {}
    for dropout in (True, False):
        big, acc = gpt2(4), gpt2(4)
        big.eval()
        r_big = training.train(big, examples, _cfg(steps=1, batch_size=6, max_grad_norm=None, dropout=dropout),
                               pad_id=tok.pad_token_id, progress=False)
        r_acc = training.train(acc, examples, _cfg(steps=1, batch_size=2, accumulation=3, max_grad_norm=None,
                                                   dropout=dropout), pad_id=tok.pad_token_id, progress=False)
        assert not big.training  # restored
        runs[dropout] = abs(r_acc.losses[0] - r_big.losses[0])
        if not dropout:
            for (n, p), q in zip(big.named_parameters(), acc.parameters()):
                torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-7, msg=lambda m: f"{n}: {m}")
    assert runs[False] < 1e-5 * max(1.0, runs[True]) and runs[True] > 1e-3, runs


def test_loss_mask_excludes_masked_tokens(tok):
    prompts = ["Question: What is the capital of Aldoria?\nAnswer:", "Question: Which river flows through Velmora?\nAnswer:"]
    targets = [" Velmora", " the Sarn"]
    ex = training.encode_pairs(tok, prompts, targets)
    m = _model(5)
    ref = _model(5)
    training.train(m, ex, _cfg(steps=1, batch_size=2, max_grad_norm=None), pad_id=tok.pad_token_id, progress=False)

    # Manual reference: mean cross-entropy over the target tokens only, the same two examples
    # in the trainer's order.
    order = training.example_order(len(ex), 5 + 1)
    batch = [ex[next(order)] for _ in range(2)]
    nll, count = 0.0, 0
    for e in batch:
        ids = torch.tensor([e.input_ids])
        logp = torch.log_softmax(ref(input_ids=ids).logits.float()[0], -1)
        for t in range(1, len(e.input_ids)):
            if e.loss_mask[t]:
                nll = nll - logp[t - 1, e.input_ids[t]]
                count += 1
    assert count == sum(e.n_targets for e in batch) and count < sum(len(e.input_ids) - 1 for e in batch)
    (nll / count).backward()
    for (n, p), q in zip(m.named_parameters(), ref.parameters()):
        torch.testing.assert_close(p.grad, q.grad, rtol=1e-4, atol=1e-7, msg=lambda s: f"{n}: {s}")

    no_targets = [training.Example(e.input_ids, (False,) * len(e.input_ids)) for e in ex]
    with pytest.raises(ValueError, match="no target tokens"):
        training.train(_model(5), no_targets, _cfg(steps=1), pad_id=tok.pad_token_id, progress=False)


# --------------------------------------------------------------------------- saving


def test_save_round_trips(tmp_path, tok, examples):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    m = _model(6)
    training.train(m, examples, _cfg(steps=2), pad_id=tok.pad_token_id, progress=False)
    out = tmp_path / "model"
    out.mkdir()
    (out / "stale.bin").write_text("old")  # replaced as a whole
    meta = {"seed": 5, "losses": [1.5, 0.25], "name": "tiny"}
    training.save(m, tok, out, meta, metadata_name="meta.json")
    names = sorted(p.name for p in out.iterdir())
    assert "model.safetensors" in names and "tokenizer.json" in names and "config.json" in names
    assert "stale.bin" not in names and not list(tmp_path.glob("model.*"))  # no temporary leftovers
    assert json.loads((out / "meta.json").read_text()) == meta

    back = AutoModelForCausalLM.from_pretrained(out)
    for (n, p), (n2, q) in zip(m.named_parameters(), back.named_parameters()):
        assert n == n2 and torch.equal(p, q), _mismatch(p, q, n)
    tok2 = AutoTokenizer.from_pretrained(out)
    for text in TEXTS:
        assert tok2(text)["input_ids"] == tok(text)["input_ids"]

    training.save(m, tok, out, None, dtype="bfloat16")
    assert AutoModelForCausalLM.from_pretrained(out).dtype == torch.bfloat16
    assert not (out / "meta.json").exists()
    with pytest.raises(ValueError, match="dtype"):
        training.save(m, tok, out, dtype="int8")
