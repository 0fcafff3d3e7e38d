"""Byte-level BPE tokenizer: training, special ids, exact round trip, save/load."""

from __future__ import annotations

from pathlib import Path

import pytest

from lineinspect.errors import LineInspectError
from lineinspect.moe_lm.tokenizer import load_tokenizer, save_tokenizer, train_tokenizer

CORPUS = [
    "Scratch 3 mm long near the left edge of the housing.",
    "No defect found. Surface finish within tolerance.",
    "Crack across the weld seam, 12 mm; reject the part.",
    "Missing screw at position 4. Dent on the cover.",
] * 20

ODD = [
    "Kratzer 3 mm — Ø 12 µm, Oberfläche i.O.",
    "缺陷: 划痕 (scratch)\tline 2\n\n  double  spaces  ",
    "emoji 🔧⚙️ and control \x00\x7f bytes",
    "",
]


def test_train_round_trip_and_special_ids() -> None:
    tok = train_tokenizer(iter(CORPUS), vocab_size=320)
    assert (tok.pad_id, tok.bos_id, tok.eos_id, tok.image_id) == (0, 1, 2, 3)
    assert 260 < tok.vocab_size <= 320
    for text in CORPUS[:4] + ODD:
        ids = tok.encode(text, add_bos=True, add_eos=True)
        assert ids[0] == tok.bos_id and ids[-1] == tok.eos_id
        assert tok.decode(ids) == text
    # BPE merges compress the training domain below one token per byte
    sample = CORPUS[0]
    assert len(tok.encode(sample, add_bos=False)) < len(sample.encode()) // 2
    batch = tok.encode_batch(ODD[:2], add_bos=False)
    assert batch == [tok.encode(t, add_bos=False) for t in ODD[:2]]


def test_save_load(tmp_path: Path) -> None:
    tok = train_tokenizer(CORPUS, vocab_size=300)
    path = tmp_path / "tokenizer.json"
    save_tokenizer(tok, path)
    again = load_tokenizer(path)
    assert again.vocab_size == tok.vocab_size
    for text in ODD:
        assert again.encode(text) == tok.encode(text)
        assert again.decode(again.encode(text)) == text


def test_load_errors(tmp_path: Path) -> None:
    with pytest.raises(LineInspectError, match="does not exist"):
        load_tokenizer(tmp_path / "missing.json")
    bad = tmp_path / "bad.json"
    bad.write_text("{not json")
    with pytest.raises(LineInspectError, match="not a tokenizers JSON"):
        load_tokenizer(bad)
    with pytest.raises(LineInspectError, match="vocab_size"):
        train_tokenizer(CORPUS, vocab_size=100)
