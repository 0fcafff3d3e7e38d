"""Byte-level BPE tokenizer trained by the project (Hugging Face ``tokenizers``).

Byte-level means every UTF-8 byte is in the base alphabet, so any text round-trips exactly.
The special tokens take the first ids: <pad>=0, <bos>=1, <eos>=2, <image>=3. Training, saving
and loading are separate functions; the wrapper itself does no file I/O.
"""

from __future__ import annotations

from collections.abc import Iterable, Sequence
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

from lineinspect.errors import LineInspectError

PAD, BOS, EOS, IMAGE = "<pad>", "<bos>", "<eos>", "<image>"
SPECIAL_TOKENS = (PAD, BOS, EOS, IMAGE)


class TextTokenizer:
    """Encodes text to ids and back; knows the special token ids."""

    def __init__(self, tokenizer: Tokenizer) -> None:
        ids = [tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if ids != list(range(len(SPECIAL_TOKENS))):
            raise LineInspectError(
                f"tokenizer: special tokens {SPECIAL_TOKENS} must have ids 0..{len(SPECIAL_TOKENS) - 1}, "
                f"got {ids}; train it with moe_lm.tokenizer.train_tokenizer"
            )
        self.backend = tokenizer
        self.pad_id, self.bos_id, self.eos_id, self.image_id = ids

    @property
    def vocab_size(self) -> int:
        return self.backend.get_vocab_size(with_added_tokens=True)

    def encode(self, text: str, add_bos: bool = True, add_eos: bool = False) -> list[int]:
        ids = self.backend.encode(text, add_special_tokens=False).ids
        return ([self.bos_id] if add_bos else []) + ids + ([self.eos_id] if add_eos else [])

    def encode_batch(self, texts: Sequence[str], add_bos: bool = True, add_eos: bool = False) -> list[list[int]]:
        encs = self.backend.encode_batch(list(texts), add_special_tokens=False)
        return [([self.bos_id] if add_bos else []) + e.ids + ([self.eos_id] if add_eos else []) for e in encs]

    def decode(self, ids: Sequence[int], skip_special: bool = True) -> str:
        return self.backend.decode(list(ids), skip_special_tokens=skip_special)


def train_tokenizer(texts: Iterable[str], vocab_size: int, min_frequency: int = 2) -> TextTokenizer:
    """Train a byte-level BPE on an iterator of strings (streamed; nothing is held in memory)."""
    base = len(pre_tokenizers.ByteLevel.alphabet()) + len(SPECIAL_TOKENS)
    if vocab_size < base:
        raise LineInspectError(f"tokenizer: vocab_size {vocab_size} is below the byte alphabet + specials ({base})")
    tok = Tokenizer(models.BPE())
    # No regex split beyond GPT-2's and no prefix space: decode(encode(s)) == s for every string s.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=list(SPECIAL_TOKENS),
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    return TextTokenizer(tok)


def save_tokenizer(tokenizer: TextTokenizer, path: str | Path) -> None:
    """Write the tokenizer as one JSON file (the ``tokenizers`` format)."""
    tokenizer.backend.save(str(path))


def load_tokenizer(path: str | Path) -> TextTokenizer:
    """Read a tokenizer JSON written by save_tokenizer."""
    path = Path(path)
    if not path.is_file():
        raise LineInspectError(f"tokenizer: {path} does not exist; train one with train_tokenizer and save it")
    try:
        backend = Tokenizer.from_file(str(path))
    except Exception as exc:  # the library raises a bare Exception on malformed JSON
        raise LineInspectError(f"tokenizer: {path} is not a tokenizers JSON file ({exc})") from exc
    return TextTokenizer(backend)
