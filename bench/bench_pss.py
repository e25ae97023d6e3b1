"""Batched masked scoring for PSS vs the naive loop, on the demo model.

ours:    every (concept, ratio, top|random) mask is a row; rows grouped by question share
         forward passes (``--pss-batch-rows``), the question prefix is encoded once per row.
naive-1: one concept and one mask at a time (the mask applied to the whole batch), the
         same prefix-sharing scorer, batches of ``--batch-size`` questions.
naive-2: one concept and one mask at a time, every option scored as its own full
         sequence (prompt + option, as lm-evaluation-harness does), batches of questions.

All three must give the same PSS values (checked to 1e-6); the table gives the times.

    python bench/bench_pss.py --concepts 6
"""

from __future__ import annotations

import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _harness as h  # noqa: E402  (first: sets the OpenMP wait policy before torch loads)
import torch  # noqa: E402

from specext.analyze import DEMO_MODEL  # noqa: E402
from specext.models import load_model, mask  # noqa: E402
from specext.probes import MCQ_TEMPLATE, load_probe  # noqa: E402
from specext.metrics.pss import MaskedScorer, PSSConfig, compute_pss  # noqa: E402
from specext.probes.scoring import PromptStats, Scorer, continuation_ids  # noqa: E402
from specext.metrics.specialization import ConceptMass  # noqa: E402


class OneMaskAtATime(MaskedScorer):
    """naive-1: jobs grouped by mask; each mask broadcast over a batch of questions."""

    def correctness(self, jobs, masks, questions, progress=None):
        lm = self.lm
        L, D = lm.n_layers, lm.d_ff
        out = {}
        by_mask = {}
        for q, key in jobs:
            by_mask.setdefault(key, []).append(q)
        for key, qids in by_mask.items():
            m = torch.ones(L * D, dtype=lm.dtype, device=lm.device)
            if masks[key] is not None and masks[key].numel():
                m[masks[key].to(lm.device)] = 0
            m = m.view(L, D)
            for s in range(0, len(qids), self.batch_rows):
                b = qids[s : s + self.batch_rows]
                res = self._score([questions[q] for q in b], m)
                for q, ok in zip(b, res):
                    out[(q, key)] = ok
        return out

    def _score(self, qs, m):
        return [r.mcq_correct for r in self.scorer.score(qs, row_masks=lambda l: m[l])]


class FullSequences(OneMaskAtATime):
    """naive-2: every option is its own sequence (prompt + option), right-padded."""

    def _score(self, qs, m):
        lm, tok = self.lm, self.lm.tokenizer
        seqs, spans, owners = [], [], []
        for i, q in enumerate(qs):
            prompt = MCQ_TEMPLATE.format(question=q.question)
            ctx = tok(prompt)["input_ids"]
            for c in q.choices:
                cont = continuation_ids(tok, prompt, " " + c)
                seqs.append(ctx + cont)
                spans.append((len(ctx), len(cont)))
                owners.append(i)
        S = max(len(x) for x in seqs)
        pad = tok.pad_token_id or 0
        ids = torch.full((len(seqs), S), pad, dtype=torch.long)
        att = torch.zeros((len(seqs), S), dtype=torch.long)
        for r, x in enumerate(seqs):
            ids[r, : len(x)] = torch.tensor(x)
            att[r, : len(x)] = 1
        with torch.no_grad(), mask(lm.sites, lambda l: m[l]):
            logp = torch.log_softmax(lm.model(input_ids=ids.to(lm.device), attention_mask=att.to(lm.device)).logits.float(), -1)
        scores = []
        for r, (c0, n) in enumerate(spans):
            tgt = ids[r, c0 : c0 + n].to(lm.device)
            scores.append(logp[r, c0 - 1 : c0 - 1 + n].gather(-1, tgt[:, None]).sum().item())
        out, r = [], 0
        for q in qs:
            sc = scores[r : r + len(q.choices)]
            r += len(q.choices)
            out.append(max(range(len(sc)), key=lambda i: sc[i]) == q.answer)
        return out


def concept_mass(lm, probe, batch_size=32):
    scorer = Scorer(lm, open_ended=False)
    mass = ConceptMass(len(probe.concepts), lm.n_layers, lm.d_ff)
    st = PromptStats(lm.n_layers, lm.d_ff)
    qs = probe.questions
    for i in range(0, len(qs), batch_size):
        b = qs[i : i + batch_size]
        scorer.score(b, stats=st)
        mass.add(torch.tensor([probe.concept_index(q) for q in b]), st.sums)
    return mass.concept_mass()


def main():
    p = h.make_parser(__doc__.split("\n\n")[0])
    p.add_argument("--model", default=str(DEMO_MODEL))
    p.add_argument("--probe", default="synthetic")
    p.add_argument("--concepts", type=int, default=6, help="concepts to evaluate (seeded sample)")
    p.add_argument("--control", type=int, default=200)
    p.add_argument("--batch-size", type=int, default=8, help="questions per batch in the naive loops")
    p.add_argument("--batch-rows", type=int, default=256, help="rows per batch in ours")
    p.add_argument("--skip-naive2", action="store_true")
    args = p.parse_args()
    if args.quick:
        args.concepts, args.control = 2, 40
    device = h.resolve_device(args.device)
    h.start("PSS masked scoring: batched rows vs one mask at a time", device)
    lm = load_model(args.model, device=str(device))
    probe = load_probe(args.probe)
    cm = concept_mass(lm, probe)
    cfg = PSSConfig(concepts=args.concepts, control_size=args.control, batch_rows=args.batch_rows)
    runs = [("ours (rows of many masks)", MaskedScorer(lm, batch_rows=args.batch_rows)),
            ("naive-1 (one mask at a time)", OneMaskAtATime(lm, batch_rows=args.batch_size))]
    if not args.skip_naive2:
        runs.append(("naive-2 (one mask, full sequence per option)", FullSequences(lm, batch_rows=args.batch_size)))
    # The denominator (overall accuracy before masking) comes from analyze's scoring pass;
    # measured once here, outside the timed region.
    base = MaskedScorer(lm, batch_rows=args.batch_rows).correctness([(q, None) for q in range(len(probe.questions))],
                                                                   {None: None}, probe.questions)
    overall = sum(base.values()) / len(base)
    results = {}
    for name, scorer in runs:
        h.sync(device)
        t0 = time.perf_counter()
        res = compute_pss(lm, probe, cm, cfg, scorer=scorer, overall_accuracy=overall)
        h.sync(device)
        results[name] = (time.perf_counter() - t0, res)
    ours_t, ours = results[runs[0][0]]
    rows = []
    for name, (t, res) in results.items():
        diff = max(abs(a[k] - b[k]) for a, b in zip(ours.rows, res.rows) for k in ("pss", "random_pss"))
        rows.append({"bench": "pss_masked_scoring", "shape": f"{args.concepts} concepts x {len(cfg.ratios)} ratios x 2",
                     "extra": name, "ours_ms": ours_t * 1e3, "baseline_ms": t * 1e3, "ratio": t / ours_t,
                     "max_pss_diff": diff, "peak_pss": res.summary["peak"]})
    h.print_table(rows, ["extra", "baseline_ms", "ratio", "max_pss_diff", "peak_pss"])
    print(f"\nours: {ours_t:.1f} s; ratio = that approach's time / ours")
    if not args.no_csv:
        h.append_csv(args.csv, rows, device=device)
        print(f"appended {len(rows)} rows to {args.csv}")


if __name__ == "__main__":
    main()
