"""Probes and scoring: the probe format and the built-in sets (:mod:`.probeset`), the
fictional world of the demo (:mod:`.synthetic`), and batched multiple-choice and open-ended
scoring with the coefficients streamed out of the same forward pass (:mod:`.scoring`).
May import ``kernels`` and ``models``."""

from specext.probes.probeset import (BUILTIN, DATA_DIR, MCQ_TEMPLATE, OPEN_TEMPLATE, ProbeError, ProbeSet,  # noqa: F401
                                     Question, check_probe, load_probe, normalize_answer, parse_question,
                                     read_jsonl, sample_concepts, stratified_sample, write_jsonl)
