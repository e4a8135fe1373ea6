"""Tokenizers: a byte-level default (no training, vocab 259) and a locally trained byte-level BPE.

Both share the special tokens <bos>, <|endoftext|> (eos) and <pad>.
"""

from __future__ import annotations

import os
from collections.abc import Iterable, Iterator, Sequence
from pathlib import Path
from typing import Protocol, runtime_checkable

from arch_lab.data.text import iter_documents
from components.config import ConfigError

BOS_TOKEN = "<bos>"
EOS_TOKEN = "<|endoftext|>"
PAD_TOKEN = "<pad>"
SPECIAL_TOKENS = (BOS_TOKEN, EOS_TOKEN, PAD_TOKEN)
TOKENIZER_KINDS = ("byte", "bpe")


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    bos_id: int
    eos_id: int
    pad_id: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ByteTokenizer:
    """UTF-8 bytes are ids 0..255; 256 = <bos>, 257 = <|endoftext|>, 258 = <pad>."""

    vocab_size = 259
    bos_id = 256
    eos_id = 257
    pad_id = 258

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids: Sequence[int]) -> str:
        bad = [i for i in ids if not 0 <= int(i) < self.vocab_size]
        if bad:
            raise ValueError(f"ByteTokenizer.decode: ids must be in [0, {self.vocab_size}), got {bad[:5]}")
        return bytes(int(i) for i in ids if int(i) < 256).decode("utf-8", errors="replace")


PathLike = str | os.PathLike
TrainingSource = PathLike | Sequence[PathLike] | Iterable[str]


def _training_texts(source: TrainingSource) -> Iterator[str]:
    """A path or a sequence of paths (list, tuple, OmegaConf ListConfig) is read as files
    (anything iter_documents reads); any other iterable, e.g. a generator, yields the texts."""
    if isinstance(source, (str, os.PathLike)):
        yield from iter_documents(source)
    elif isinstance(source, Sequence):
        for path in source:
            yield from iter_documents(path)
    else:
        yield from source


class BPETokenizer:
    """Byte-level BPE trained locally with the Hugging Face `tokenizers` library."""

    def __init__(self, hf_tokenizer) -> None:
        ids = [hf_tokenizer.token_to_id(t) for t in SPECIAL_TOKENS]
        if None in ids:
            raise ValueError(f"BPE tokenizer lacks one of the special tokens {list(SPECIAL_TOKENS)}")
        self._tok = hf_tokenizer
        self.bos_id, self.eos_id, self.pad_id = ids
        self.vocab_size = hf_tokenizer.get_vocab_size(with_added_tokens=True)

    @classmethod
    def train(cls, source: TrainingSource, vocab_size: int) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer
        from tokenizers import decoders, models, pre_tokenizers, trainers

        min_size = 256 + len(SPECIAL_TOKENS)
        if vocab_size <= min_size:
            raise ConfigError(
                f"data.bpe_vocab_size must be > {min_size} (256 byte symbols + "
                f"{len(SPECIAL_TOKENS)} special tokens) for a BPE tokenizer, got {vocab_size}"
            )
        tok = HFTokenizer(models.BPE())
        # No prefix space, so encode/decode round-trips text exactly.
        tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
        tok.decoder = decoders.ByteLevel()
        trainer = trainers.BpeTrainer(
            vocab_size=vocab_size,
            special_tokens=list(SPECIAL_TOKENS),
            initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
            show_progress=False,
        )
        tok.train_from_iterator(_training_texts(source), trainer=trainer)
        return cls(tok)

    def encode(self, text: str) -> list[int]:
        return self._tok.encode(text, add_special_tokens=False).ids

    def decode(self, ids: Sequence[int]) -> str:
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=True)

    def save(self, path: PathLike) -> None:
        Path(path).parent.mkdir(parents=True, exist_ok=True)
        self._tok.save(str(path))

    @classmethod
    def load(cls, path: PathLike) -> BPETokenizer:
        from tokenizers import Tokenizer as HFTokenizer

        if not Path(path).is_file():
            raise FileNotFoundError(f"no tokenizer file at {path}")
        return cls(HFTokenizer.from_file(str(path)))


def build_tokenizer(
    kind: str,
    *,
    path: PathLike | None = None,
    train_source: TrainingSource | None = None,
    vocab_size: int | None = None,
) -> Tokenizer:
    """`byte` takes no options. `bpe` loads `path` if that file exists; otherwise it trains on
    `train_source` with `vocab_size` and, when `path` is given, saves there for the next run."""
    if kind == "byte":
        options = {"path": path, "train_source": train_source, "vocab_size": vocab_size}
        given = sorted(name for name, value in options.items() if value is not None)
        if given:
            raise ConfigError(f"data.tokenizer=byte takes no options, got {given}")
        return ByteTokenizer()
    if kind == "bpe":
        if path is not None and Path(path).is_file():
            return BPETokenizer.load(path)
        if train_source is None or vocab_size is None:
            raise ConfigError(
                f"data.tokenizer=bpe needs data.train_path and data.bpe_vocab_size to train a tokenizer (no "
                f"tokenizer file at {path!r} to load)"
            )
        tokenizer = BPETokenizer.train(train_source, vocab_size)
        if path is not None:
            tokenizer.save(path)
        return tokenizer
    raise ConfigError(f"data.tokenizer must be one of {list(TOKENIZER_KINDS)}, got {kind!r}")
