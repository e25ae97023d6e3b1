"""Hostile and careless inputs (issue 13, items 12-14): each case ends in a clear error
naming the file, line or option, or in a recorded warning, never in a silent result."""

import json
import os

import pytest

from specext.probes import ProbeError, load_probe, read_jsonl

GOOD = {"concept": "Aldoria", "category": "country", "question": "What is the capital of Aldoria?",
        "choices": ["Velmora", "Paris", "Tallinn", "Gold"], "answer": 0}
GOOD2 = dict(GOOD, concept="Bexland", question="What is the capital of Bexland?")


def _text(lines):
    return "".join(json.dumps(l, ensure_ascii=False) + "\n" for l in lines)


# ---------------------------------------------------------------- 12: probe files


def test_utf8_bom_accepted(tmp_path):
    p = tmp_path / "bom.jsonl"
    p.write_bytes(_text([GOOD, GOOD2]).encode("utf-8-sig"))
    qs = read_jsonl(p)
    assert [q.concept for q in qs] == ["Aldoria", "Bexland"]


def test_utf16_names_file_and_encoding(tmp_path):
    p = tmp_path / "u16.jsonl"
    p.write_bytes(_text([GOOD]).encode("utf-16"))
    with pytest.raises(ProbeError, match=rf"{p}:1: .*UTF-16.*must be UTF-8"):
        read_jsonl(p)
    p.write_bytes(_text([GOOD]).encode("utf-16-le"))  # no BOM
    with pytest.raises(ProbeError, match=rf"{p}:1: NUL bytes \(UTF-16"):
        read_jsonl(p)


def test_latin1_names_file_and_line(tmp_path):
    p = tmp_path / "l1.jsonl"
    p.write_bytes(_text([GOOD, dict(GOOD2, concept="Bexländ")]).encode("latin-1"))
    with pytest.raises(ProbeError, match=rf"{p}:2: not valid UTF-8 .*Latin-1.*must be UTF-8"):
        read_jsonl(p)


def test_probe_directory(tmp_path):
    with pytest.raises(ProbeError, match=rf"probe '{tmp_path}' is a directory"):
        load_probe(tmp_path)


def test_duplicate_choices_named(tmp_path):
    p = tmp_path / "dup.jsonl"
    p.write_text(_text([dict(GOOD, choices=["The Velmora", "velmora!", "Paris"])]))
    with pytest.raises(ProbeError, match=rf"{p}:1: 'choices' must be distinct, but 'The Velmora' and 'velmora!'"):
        read_jsonl(p)


def test_missing_tokenizer_names_directory(tmp_path):
    from tiny_models import save_tiny

    from specext.models.loading import ModelLoadError, load_model

    d = save_tiny("gpt2", tmp_path / "m")
    for f in os.listdir(d):
        if "token" in f or f in ("vocab.json", "merges.txt", "special_tokens_map.json"):
            os.remove(d / f)
    with pytest.raises(ModelLoadError, match=rf"{d}: no usable tokenizer \(expected tokenizer.json"):
        load_model(d, device="cpu")
