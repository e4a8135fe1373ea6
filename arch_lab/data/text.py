"""Plain-text corpora: read documents (local files or a streaming HF dataset), tokenize, pack.

Local files and Hugging Face datasets both yield plain document strings, so the same
tokenizing and packing code (`tokenize_documents` → `TextBlocks` / `PackedTokenStream`) serves both.
"""

from __future__ import annotations

import gzip
import json
import os
from collections.abc import Callable, Iterable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING

import torch
from torch.utils.data import Dataset, IterableDataset, get_worker_info

from components.config import ConfigError, MissingInputError

if TYPE_CHECKING:
    from arch_lab.data.tokenizers import Tokenizer

DOC_SEPARATOR = "<|endoftext|>"
SUPPORTED_SUFFIXES = (".txt", ".txt.gz", ".raw", ".jsonl")  # .raw: WikiText raw files
_READ_CHUNK_CHARS = 1 << 20


def _corpus_files(path: Path) -> list[Path]:
    if not path.exists():
        raise MissingInputError(f"data.path: no such file or directory: {path}")
    if path.is_dir():
        files = sorted(p for p in path.rglob("*") if p.is_file() and p.name.endswith(SUPPORTED_SUFFIXES))
        if not files:
            raise ConfigError(f"data.path: directory {path} holds no {list(SUPPORTED_SUFFIXES)} files")
        return files
    if not path.name.endswith(SUPPORTED_SUFFIXES):
        raise ConfigError(f"data.path: {path} must end with one of {list(SUPPORTED_SUFFIXES)}")
    return [path]


def _split_documents(stream, path: Path) -> Iterator[str]:
    """Split a text stream on DOC_SEPARATOR chunk by chunk, without re-scanning or re-copying
    the text read so far (books and whole corpora can be hundreds of MB)."""
    keep = len(DOC_SEPARATOR) - 1  # a separator cut by a chunk border starts within these chars
    pending: list[str] = []  # pieces of the current document
    tail = ""
    try:
        while chunk := stream.read(_READ_CHUNK_CHARS):
            *complete, last = (tail + chunk).split(DOC_SEPARATOR)
            for piece in complete:
                pending.append(piece)
                yield "".join(pending)
                pending = []
            pending.append(last[:-keep])
            tail = last[-keep:]
    except (UnicodeDecodeError, OSError, EOFError) as err:
        raise ConfigError(f"data.path: cannot read {path} as UTF-8 text: {err}") from err
    pending.append(tail)
    yield "".join(pending)


def _iter_text_file(path: Path) -> Iterator[str]:
    opener = gzip.open if path.name.endswith(".gz") else open
    with opener(path, "rt", encoding="utf-8") as stream:
        yield from _split_documents(stream, path)


def _numbered_lines(stream, path: Path) -> Iterator[tuple[int, str]]:
    try:
        yield from enumerate(stream, start=1)
    except UnicodeDecodeError as err:
        raise ConfigError(f"data.path: cannot read {path} as UTF-8 text: {err}") from err


def _iter_jsonl_file(path: Path, text_field: str) -> Iterator[str]:
    with open(path, encoding="utf-8") as stream:
        for line_no, line in _numbered_lines(stream, path):
            if not line.strip():
                continue
            try:
                record = json.loads(line)
            except json.JSONDecodeError as err:
                raise ConfigError(f"data.path: {path} line {line_no} is not valid JSON: {err}") from err
            if not isinstance(record, dict) or not isinstance(record.get(text_field), str):
                fields = sorted(record) if isinstance(record, dict) else type(record).__name__
                raise ConfigError(
                    f"data.text_field: {path} line {line_no} has no string field {text_field!r} "
                    f"(fields: {fields})"
                )
            yield record[text_field]


def iter_documents(path: str | os.PathLike, text_field: str = "text") -> Iterator[str]:
    """Yield the documents of a .txt / .txt.gz / .raw file (split on <|endoftext|> when present), a
    .jsonl file (one document per line, field `text_field`), or every such file of a directory
    in sorted order. Documents are stripped of surrounding whitespace; blank ones are skipped."""
    for file in _corpus_files(Path(path)):
        docs = _iter_jsonl_file(file, text_field) if file.name.endswith(".jsonl") else _iter_text_file(file)
        found = False
        for doc in docs:
            doc = doc.strip()
            if doc:
                found = True
                yield doc
        if not found:
            raise ConfigError(f"data.path: {file} contains no text")


def iter_hf_documents(
    name: str,
    split: str,
    config_name: str | None = None,
    text_field: str = "text",
    streaming: bool = True,
    data_files: str | list[str] | None = None,
) -> Iterator[str]:
    """Yield the `text_field` of every record of a Hugging Face dataset split (streamed by default),
    stripped, blank ones skipped, exactly like iter_documents. `data_files` serves builders such
    as "json" that read local files."""
    try:
        import datasets
    except ImportError as err:
        raise ImportError("data.source=hf needs the `datasets` package: pip install -e .[hf]") from err
    dataset = datasets.load_dataset(name, config_name, split=split, streaming=streaming, data_files=data_files)
    for index, record in enumerate(dataset):
        text = record.get(text_field)
        if not isinstance(text, str):
            raise ConfigError(
                f"data.text_field: record {index} of dataset {name!r} split {split!r} has no string field "
                f"{text_field!r} (fields: {sorted(record)})"
            )
        text = text.strip()  # same normalisation as iter_documents
        if text:
            yield text


def tokenize_documents(docs: Iterable[str], tokenizer: Tokenizer) -> Iterator[list[int]]:
    """Token ids of each document followed by eos, so documents stay separated once concatenated."""
    for doc in docs:
        yield tokenizer.encode(doc) + [tokenizer.eos_id]


def tokenize_corpus(docs: Iterable[str], tokenizer: Tokenizer, max_tokens: int | None = None) -> torch.Tensor:
    """Concatenate tokenized documents into one 1-D LongTensor, stopping after `max_tokens`."""
    pieces, total = [], 0
    for ids in tokenize_documents(docs, tokenizer):
        if max_tokens is not None:
            ids = ids[: max_tokens - total]
        pieces.append(torch.tensor(ids, dtype=torch.long))
        total += len(ids)
        if max_tokens is not None and total >= max_tokens:
            break
    if not pieces:
        raise ConfigError("data.path: the corpus yielded no documents")
    return torch.cat(pieces)


def _block_to_example(block: torch.Tensor) -> dict[str, torch.Tensor]:
    return {"input_ids": block[:-1], "labels": block[1:]}


def pack_tokens(
    docs: Iterable[str], tokenizer: Tokenizer, seq_len: int, max_tokens: int | None = None
) -> Iterator[dict[str, torch.Tensor]]:
    """Stream examples of seq_len tokens from documents: blocks of seq_len + 1 tokens, input =
    block[:-1], labels = block[1:]. Consecutive blocks share their boundary token, so every token
    after the first is a target exactly once (nothing is lost between blocks); a final partial
    block is dropped. Yields the same examples as `TextBlocks(tokenize_corpus(...), seq_len)`."""
    _check_seq_len(seq_len)
    buffer: list[int] = []
    taken = 0
    for ids in tokenize_documents(docs, tokenizer):
        if max_tokens is not None:
            ids = ids[: max_tokens - taken]
        taken += len(ids)
        buffer.extend(ids)
        start = 0  # move a start index instead of deleting from the front of a long list
        while len(buffer) - start >= seq_len + 1:
            yield _block_to_example(torch.tensor(buffer[start : start + seq_len + 1], dtype=torch.long))
            start += seq_len
        buffer = buffer[start:]
        if max_tokens is not None and taken >= max_tokens:
            return


TEXT_SOURCES = ("files", "hf")  # data.source: local files, or a Hugging Face dataset streamed


def _check_seq_len(seq_len: int) -> None:
    if seq_len < 1:
        raise ConfigError(f"data.seq_len must be >= 1, got {seq_len}")


class TextBlocks(Dataset):
    """Examples of seq_len tokens over a pre-tokenized 1-D LongTensor (see `pack_tokens` for the
    block layout); `tokenize_corpus(max_tokens=)` caps a big corpus."""

    def __init__(self, tokens: torch.Tensor, seq_len: int) -> None:
        _check_seq_len(seq_len)
        if tokens.dim() != 1:
            raise ValueError(f"TextBlocks needs a 1-D token tensor, got shape {tuple(tokens.shape)}")
        self.tokens = tokens.long()
        self.seq_len = seq_len
        if len(self.tokens) < seq_len + 1:
            raise ConfigError(  # "data.path" becomes the key that named the corpus (datamodule._naming)
                f"data.path: the corpus gives {len(self.tokens)} tokens (data.max_train_tokens / max_eval_tokens "
                f"cap them), fewer than one example of data.seq_len={seq_len} needs ({seq_len + 1})"
            )

    @classmethod
    def from_documents(
        cls, docs: Iterable[str], tokenizer: Tokenizer, seq_len: int
    ) -> TextBlocks:
        return cls(tokenize_corpus(docs, tokenizer), seq_len)

    def __len__(self) -> int:
        return (len(self.tokens) - 1) // self.seq_len

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        if not 0 <= index < len(self):
            raise IndexError(f"block {index} out of range for {len(self)} blocks")
        start = index * self.seq_len
        return _block_to_example(self.tokens[start : start + self.seq_len + 1])


class PackedTokenStream(IterableDataset):
    """Streaming counterpart of TextBlocks for corpora too big to tokenize up front.

    `make_docs` is called at every pass (epoch) to get a fresh document iterator. With several
    DataLoader workers each worker keeps every num_workers-th block, so no block is seen twice;
    with num_replicas > 1 (data parallel) each rank keeps its share of the blocks (see __iter__).
    """

    def __init__(
        self,
        make_docs: Callable[[], Iterable[str]],
        tokenizer: Tokenizer,
        seq_len: int,
        max_tokens: int | None = None,
        num_replicas: int = 1,
        rank: int = 0,
    ) -> None:
        _check_seq_len(seq_len)
        if not 0 <= rank < num_replicas:
            raise ValueError(f"rank {rank} is not in [0, {num_replicas})")
        self.make_docs = make_docs
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.max_tokens = max_tokens
        self.num_replicas, self.rank = num_replicas, rank

    def __iter__(self) -> Iterator[dict[str, torch.Tensor]]:
        # Data parallel over num_replicas ranks: blocks are dealt in groups of num_replicas, rank r keeping the r-th
        # block of every complete group. Every rank yields equally many blocks (a DDP step needs a batch on each
        # rank), and step k's batches of all ranks hold the blocks one process would batch at step k.
        worker = get_worker_info()
        num_workers, worker_id = (1, 0) if worker is None else (worker.num_workers, worker.id)
        blocks = pack_tokens(self.make_docs(), self.tokenizer, self.seq_len, self.max_tokens)
        mine = None
        for index, example in enumerate(blocks):
            group, position = divmod(index, self.num_replicas)
            if position == self.rank:
                mine = example
            if position == self.num_replicas - 1 and group % num_workers == worker_id:
                yield mine
