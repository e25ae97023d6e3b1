"""Batched scoring equals one-question-at-a-time scoring and a no-cache recomputation."""

import pytest
import torch

import tiny_models as T
from specext.models import load_model
from specext.probes import MCQ_TEMPLATE, Question
from specext.probes.scoring import PromptStats, Scorer, continuation_ids, encode_prompts, open_answer_correct

QUESTIONS = [
    Question("Aldoria", "country", "What is the capital of Aldoria?", ("Velmora", "Paris", "Tallinn", "Gold"), 0,
             aliases=("Velmora City",)),
    Question("Sarn", "river", "Which river flows through Velmora and past the lazy dog?", ("the Sarn", "Physics"), 1),
    Question("Curie", "person", "Who won?", ("Marie Curie", "The quick brown fox", "Estonia"), 2),
    Question("Gold", "element", "Which element has the symbol Au?", ("Gold", "Tallinn", "Paris", "Estonia"), 0),
]


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("scoring")
    return {a: load_model(T.save_tiny(a, root / a, seed=3), device="cpu")
            for a in ("llama", "gpt2", "gpt_neox", "falcon", "gemma2", "gemma3", "qwen3", "phi3")}


@pytest.mark.parametrize("arch", ["llama", "gpt2", "gpt_neox", "falcon", "gemma2", "gemma3", "qwen3", "phi3"])
@pytest.mark.parametrize("padding_side", ["left", "right"])
def test_batched_equals_unbatched(models, arch, padding_side):
    lm = models[arch]
    lm.tokenizer.padding_side = padding_side  # specext pads itself: the tokenizer's side must not matter
    sc = Scorer(lm, max_new_tokens=5)
    st = PromptStats(lm.n_layers, lm.d_ff)
    batched = sc.score(QUESTIONS, stats=st)
    batched_stats = st.sums.clone()
    for i, q in enumerate(QUESTIONS):
        st1 = PromptStats(lm.n_layers, lm.d_ff)
        one = sc.score([q], stats=st1)[0]
        assert one.mcq_pred == batched[i].mcq_pred and one.mcq_pred_norm == batched[i].mcq_pred_norm
        assert one.open_text == batched[i].open_text
        torch.testing.assert_close(torch.tensor(one.option_logprobs), torch.tensor(batched[i].option_logprobs),
                                   rtol=0, atol=2e-4)
        torch.testing.assert_close(st1.sums[0], batched_stats[i], rtol=1e-5, atol=1e-6)


@pytest.mark.parametrize("arch", ["llama", "gpt2", "falcon"])
def test_option_logprobs_equal_full_recomputation(models, arch):
    """The cached-prefix scores equal log p(continuation | prompt) from plain forward passes."""
    lm = models[arch]
    res = Scorer(lm, open_ended=False).score(QUESTIONS)
    tok = lm.tokenizer
    for q, r in zip(QUESTIONS, res):
        prompt = MCQ_TEMPLATE.format(question=q.question)
        ctx = tok(prompt)["input_ids"]
        for j, choice in enumerate(q.choices):
            cont = continuation_ids(tok, prompt, " " + choice)
            ids = torch.tensor([ctx + cont])
            with torch.no_grad():
                logp = torch.log_softmax(lm.model(input_ids=ids).logits[0].float(), -1)
            want = sum(logp[len(ctx) - 1 + k, t].item() for k, t in enumerate(cont))
            assert r.option_logprobs[j] == pytest.approx(want, abs=2e-4)
        norm = [lp / len(c) for lp, c in zip(r.option_logprobs, q.choices)]  # lm-eval: characters of the choice
        assert r.mcq_pred == max(range(len(q.choices)), key=lambda i: r.option_logprobs[i])
        assert r.mcq_pred_norm == max(range(len(q.choices)), key=lambda i: norm[i])
        assert r.mcq_correct == (r.mcq_pred == q.answer)


def test_prefix_encoded_once_per_question(models):
    """One full-prompt pass per batch; the options' pass sees only continuation tokens."""
    lm = models["llama"]
    lengths = []
    h = lm.model.get_input_embeddings().register_forward_hook(lambda m, a, o: lengths.append(tuple(a[0].shape)))
    try:
        Scorer(lm, open_ended=False).score(QUESTIONS)
    finally:
        h.remove()
    batch = encode_prompts(lm.tokenizer, QUESTIONS, "question")
    assert lengths[0] == tuple(batch.input_ids.shape)  # prompts once
    n_opts = sum(len(q.choices) for q in QUESTIONS)
    assert len(lengths) == 2 and lengths[1][0] == n_opts and lengths[1][1] < batch.input_ids.shape[1]


def test_question_positions(models):
    tok = models["llama"].tokenizer
    b = encode_prompts(tok, QUESTIONS[:2], "question")
    for row, q in enumerate(QUESTIONS[:2]):
        ids = b.input_ids[row][b.select[row]].tolist()
        assert tok.decode(ids).strip() == q.question
    last = encode_prompts(tok, QUESTIONS[:2], "last")
    assert last.select.sum(1).tolist() == [1, 1] and last.select[:, -1].all()
    allp = encode_prompts(tok, QUESTIONS[:2], "all")
    assert (allp.select.sum(1) == allp.attention_mask.sum(1) - 1).all()  # all but BOS
    with pytest.raises(ValueError, match="positions must be one of"):
        encode_prompts(tok, QUESTIONS[:1], "middle")


def test_open_answer_matching():
    q = QUESTIONS[0]
    assert open_answer_correct("Velmora", q)
    assert open_answer_correct("Answer: velmora.", q)
    assert open_answer_correct("the capital is velmora.", q)  # a restated question before the answer
    assert not open_answer_correct(f"velmora or {q.choices[1]}", q)  # a hedge naming a distractor
    assert open_answer_correct("Velmora City", q)
    assert not open_answer_correct("Velmorax", q)
    assert not open_answer_correct("", q)
