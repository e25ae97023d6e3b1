"""Scoring conventions a reviewer checks: lm-evaluation-harness acc_norm (characters of the
choice, not bytes), open-ended answers matched on the answer span (not anywhere in free
text), and the token positions (last non-special token, subject, subject-last)."""

import logging

import pytest
import torch

import tiny_models as T
from specext.models import capture, load_model
from specext.probes import MCQ_TEMPLATE, Question
from specext.probes.scoring import (POSITIONS, PromptStats, Scorer, acc_norm_scores, answer_span, encode_prompts,
                             open_answer_correct, pick, subject_span)


def _bytes_norm(lp, choices):
    """The old (wrong) definition: per UTF-8 byte of " " + choice."""
    return [v / len((" " + c).encode("utf-8")) for v, c in zip(lp, choices)]


# --------------------------------------------------------------------------- acc_norm


def test_acc_norm_divides_by_characters_of_the_choice():
    # "Zürich": 6 characters but 8 bytes with the leading space; "Berne": 5 and 6.
    lp, choices = [-6.0, -4.8], ["Zürich", "Berne"]
    assert acc_norm_scores(lp, choices) == pytest.approx([-1.0, -0.96])
    assert pick(acc_norm_scores(lp, choices)) == 1
    assert pick(_bytes_norm(lp, choices)) == 0  # the byte definition ranks the other way
    # CJK: "東京" is 2 characters, 7 bytes with the space.
    lp, choices = [-4.0, -5.5], ["東京", "Paris"]
    assert acc_norm_scores(lp, choices) == pytest.approx([-2.0, -1.1])
    assert pick(acc_norm_scores(lp, choices)) == 1 and pick(_bytes_norm(lp, choices)) == 0 and pick(lp) == 0
    with pytest.raises(ValueError, match="2 log-likelihoods for 3 choices"):
        acc_norm_scores([-1.0, -2.0], ["a", "b", "c"])


def test_pick_breaks_ties_to_the_first_option():
    assert pick([-2.0, -1.0, -1.0]) == 1
    assert pick([-1.0, -1.0]) == 0


@pytest.fixture(scope="module")
def llama(tmp_path_factory):
    return load_model(T.save_tiny("llama", tmp_path_factory.mktemp("conv") / "llama", seed=3), device="cpu")


def test_scorer_acc_norm_is_per_character(llama):
    qs = [
        Question("Zürich", "city", "Which city lies on the Limmat?", ("Zürich", "Genève", "東京", "Paris"), 0),
        Question("Tokyo", "city", "What is the capital of Japan?", ("東京", "Tallinn", "Velmora", "São Paulo"), 0),
        Question("Curie", "person", "Who won?", ("Marie Curie", "The quick brown fox", "Estonia"), 2),
        Question("Gold", "element", "Which element has the symbol Au?", ("Gold", "Tallinn", "Paris", "Estonia"), 0),
    ]
    res = Scorer(llama, open_ended=False).score(qs)
    flips = 0
    for q, r in zip(qs, res):
        want = max(range(len(q.choices)), key=lambda i: r.option_logprobs[i] / len(q.choices[i]))
        assert r.mcq_pred_norm == want, (q.choices, r.option_logprobs)
        assert r.mcq_norm_correct == (want == q.answer)
        flips += want != pick(_bytes_norm(r.option_logprobs, q.choices))
    assert flips > 0  # the seeded model separates the two definitions, so this test can fail


# --------------------------------------------------------------------------- open-ended


def _q(*answers):
    return Question("x", "c", "q?", (answers[0], "Zzyzx", "Lyon"), 0, aliases=tuple(answers[1:]))


PARIS, IODINE, HELIUM, IRON = _q("Paris"), _q("I"), _q("He"), _q("Fe")


def test_answer_span_strips_preambles():
    assert answer_span("The answer is: Paris, France\nQuestion: next") == "Paris, France"
    assert answer_span("Answer: It's Paris.") == "Paris."
    assert answer_span("  I think it is **Paris**") == "Paris**"
    assert answer_span("I think it\u2019s Paris") == "Paris"
    assert answer_span("\nParis") == "Paris"
    assert answer_span("Italy") == "Italy" and answer_span("Iodine") == "Iodine"  # word boundaries
    assert answer_span("A: Paris") == "Paris" and answer_span("A cat") == "A cat"
    assert answer_span("It is") == "It is"  # a preamble alone is kept, not stripped to nothing


@pytest.mark.parametrize("text", ["Paris", "Paris.", "Paris, France", "paris", "The answer is Paris",
                                  "Answer: Paris", "It's Paris.", "I think it is Paris", "**Paris**",
                                  "Paris is the capital of France.", "Paris\nQuestion: what else?",
                                  "The capital is Paris", "The capital of France is Paris."])
def test_open_accepts_the_answer_at_the_head(text):
    assert open_answer_correct(text, PARIS)


@pytest.mark.parametrize("text", ["Parisian", "Lyon\nParis", "Lyon, not Paris", "Paris or Lyon", "", "   "])
def test_open_rejects_the_answer_elsewhere(text):
    assert not open_answer_correct(text, PARIS)


@pytest.mark.parametrize("q,text", [(IODINE, "I"), (IODINE, "I."), (IODINE, "The answer is I"), (IODINE, "I (iodine)"),
                                    (HELIUM, "He"), (HELIUM, "He."), (HELIUM, "It's He"), (HELIUM, "He, helium"),
                                    (IRON, "Fe"), (IRON, "Fe (iron)"), (IRON, '"Fe"')])
def test_open_short_answers_accepted_exactly(q, text):
    assert open_answer_correct(text, q)


@pytest.mark.parametrize("q,text", [(IODINE, "I think so"), (IODINE, "I am not sure"), (IODINE, "i"),
                                    (IODINE, "It is not I"), (HELIUM, "He said no"), (HELIUM, "he"),
                                    (HELIUM, "He is a noble gas"), (IRON, "fe"), (IRON, "FE"), (IRON, "Iron")])
def test_open_short_answers_reject_pronouns_and_case(q, text):
    assert not open_answer_correct(text, q)


def test_open_longer_answers_keep_accent_and_case_normalisation():
    zurich = _q("Zürich", "Zurich city")
    assert open_answer_correct("zurich", zurich) and open_answer_correct("ZÜRICH, Switzerland", zurich)
    assert open_answer_correct("Zurich City", zurich)
    us = _q("United States", "US")
    assert open_answer_correct("the United States.", us) and open_answer_correct("US", us)
    assert not open_answer_correct("us", us)  # a short alias stays case-sensitive


def test_open_numbers_are_whole():
    three, hundred = _q("3"), _q("100")
    assert open_answer_correct("3", three) and open_answer_correct("3.", three)
    assert not open_answer_correct("3.5", three)
    assert open_answer_correct("100 meters", hundred) and not open_answer_correct("100.5 meters", hundred)


# --------------------------------------------------------------------------- positions


def _bert_vocab():
    words = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "question", ":", "answer", "what", "is", "the", "capital",
             "of", "aldoria", "?", "which", "river", "flows", "through", "velmora"]
    return {w: i for i, w in enumerate(words)}


BERT_QS = [Question("Aldoria", "country", "What is the capital of Aldoria?", ("Velmora", "Paris"), 0),
           Question("Velmora", "city", "Which river flows through Velmora?", ("the Sarn", "Physics"), 0)]


def test_last_skips_a_trailing_special_token():
    from transformers import BertTokenizer

    tok = BertTokenizer(vocab=_bert_vocab())
    b = encode_prompts(tok, BERT_QS, "last")
    assert b.select.sum(1).tolist() == [1, 1]
    for row in range(len(BERT_QS)):
        ids = b.input_ids[row].tolist()
        pos = int(b.select[row].nonzero()[0, 0])
        assert ids[-1] == tok.sep_token_id and pos == len(ids) - 2  # not [SEP]
        assert ids[pos] == tok.convert_tokens_to_ids(":")


def test_last_on_tiny_bert_reduces_the_last_real_token(tmp_path):
    from transformers import BertTokenizer

    path = T.save_tiny("bert", tmp_path / "bert", seed=5)
    for f in path.glob("*token*"):
        f.unlink()
    BertTokenizer(vocab=_bert_vocab()).save_pretrained(path)
    lm = load_model(path, device="cpu")
    st = PromptStats(lm.n_layers, lm.d_ff)
    Scorer(lm, positions="last").score(BERT_QS, stats=st)
    for row, q in enumerate(BERT_QS):
        ids = lm.tokenizer(MCQ_TEMPLATE.format(question=q.question))["input_ids"]
        assert ids[-1] == lm.tokenizer.sep_token_id
        got = {}
        with torch.no_grad(), capture(lm.sites, lambda l, m: got.__setitem__(l, m[0].abs())):
            lm.model(input_ids=torch.tensor([ids]))
        want = torch.stack([got[l][len(ids) - 2] for l in range(lm.n_layers)])
        torch.testing.assert_close(st.sums[row], want, rtol=1e-5, atol=1e-6)


SUBJECT_QS = [
    Question("Aldoria", "country", "What is the capital of Aldoria?", ("Velmora", "Paris"), 0),
    Question("United States", "country", "Which river flows through the united states?", ("Hudson", "Sarn"), 0),
    Question("Sarn", "river", "Does the Sarn flow into the Sarn delta?", ("yes", "no"), 0),
    Question("Curie", "person", "Who won?", ("Marie Curie", "Estonia"), 0),
    Question("Gold", "element", "Which element has the symbol Au?", ("Gold", "Tallinn"), 0),
]


def test_subject_span():
    q = "Which river flows through the united states?"
    assert subject_span(q, "United States") == (q.index("united"), q.index("?"))  # case-insensitive
    q = "Does the Sarn flow into the Sarn delta?"
    assert subject_span(q, "Sarn") == (q.index("Sarn"), q.index("Sarn") + 4)  # first occurrence
    q = "Who were the Aldorians?"
    assert subject_span(q, "Aldoria") == (q.index("Ald"), q.index("ns?"))  # inside a word when no whole word
    q = "Is Sarnia near the Sarn?"
    assert subject_span(q, "Sarn") == (q.index("Sarn?"), q.index("?"))  # a whole word first
    assert subject_span("Who won?", "Curie") is None


def test_subject_positions_cover_the_concept_name(llama, caplog):
    import specext.probes.scoring as scoring

    scoring._WARNED_MISSING.clear()
    tok = llama.tokenizer
    with caplog.at_level(logging.WARNING, logger="specext.probes.scoring"):
        b = encode_prompts(tok, SUBJECT_QS, "subject")
        encode_prompts(tok, SUBJECT_QS, "subject")  # the same prompts again (as PSS does): no new warning
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 1 and "2 of 5 prompts" in warnings[0].getMessage()  # one summary, not one per prompt
    assert b.valid.tolist() == [True, True, True, False, False]
    for row, q in enumerate(SUBJECT_QS[:3]):
        idx = b.select[row].nonzero()[:, 0]
        assert (idx[1:] - idx[:-1] == 1).all()  # one contiguous span
        lo, hi = subject_span(q.question, q.concept)
        assert tok.decode(b.input_ids[row][idx].tolist()).strip() == q.question[lo:hi]
    assert not b.select[3:].any()

    last = encode_prompts(tok, SUBJECT_QS, "subject-last")
    assert last.select.sum(1).tolist() == [1, 1, 1, 0, 0]
    assert last.valid.tolist() == b.valid.tolist()
    for row in range(3):
        assert int(last.select[row].nonzero()[0, 0]) == int(b.select[row].nonzero()[-1, 0])


def test_subject_selection_depends_on_the_concept(llama):
    # One prompt, two concepts it names: the selection follows each question's concept.
    q1 = Question("Aldoria", "country", "Is Velmora in Aldoria?", ("yes", "no"), 0)
    q2 = Question("Velmora", "city", "Is Velmora in Aldoria?", ("yes", "no"), 0)
    b = encode_prompts(llama.tokenizer, [q1, q2], "subject")
    assert llama.tokenizer.decode(b.input_ids[0][b.select[0]].tolist()).strip() == "Aldoria"
    assert llama.tokenizer.decode(b.input_ids[1][b.select[1]].tolist()).strip() == "Velmora"


def test_prompt_stats_valid_and_subject_last_statistic(llama):
    st = PromptStats(llama.n_layers, llama.d_ff)
    Scorer(llama, positions="subject-last", open_ended=False).score(SUBJECT_QS, stats=st)
    assert st.valid.tolist() == [True, True, True, False, False]
    assert (st.sums[3:] == 0).all()
    tok = llama.tokenizer
    batch = encode_prompts(tok, SUBJECT_QS, "subject-last")
    for row, q in enumerate(SUBJECT_QS[:3]):
        ids = tok(MCQ_TEMPLATE.format(question=q.question))["input_ids"]
        pos = int(batch.select[row].nonzero()[0, 0]) - (batch.input_ids.shape[1] - len(ids))  # unpadded index
        got = {}
        with torch.no_grad(), capture(llama.sites, lambda l, m: got.__setitem__(l, m[0].abs())):
            llama.model(input_ids=torch.tensor([ids]))
        want = torch.stack([got[l][pos] for l in range(llama.n_layers)])
        torch.testing.assert_close(st.sums[row], want, rtol=1e-5, atol=1e-6)


def test_subject_needs_offsets(tmp_path, caplog):
    from transformers import BertTokenizerLegacy

    vocab = tmp_path / "vocab.txt"
    vocab.write_text("\n".join(_bert_vocab()) + "\n")
    slow = BertTokenizerLegacy(vocab_file=str(vocab))
    for positions in ("subject", "subject-last"):
        with pytest.raises(ValueError, match="needs character offsets"):
            encode_prompts(slow, BERT_QS, positions)
    with caplog.at_level(logging.WARNING, logger="specext.probes.scoring"):
        b = encode_prompts(slow, BERT_QS, "question")  # falls back to the last real token, with a warning
    assert "falls back" in caplog.text
    assert b.select.sum(1).tolist() == [1, 1] and not b.select[:, -1].any()


def test_positions_offered_to_the_cli():
    assert {"question", "last", "all", "subject", "subject-last"} <= set(POSITIONS)
