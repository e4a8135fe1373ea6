"""Data layer: tokenizers, MQAR and passkey recall tasks, plain-text corpora.

The LightningDataModules live in `arch_lab.data.datamodule` (not imported here, since
importing lightning takes seconds).
"""

from arch_lab.data.mqar import (
    MQARConfig,
    count_shared_examples,
    generate_mqar,
    mqar_slice_counts,
)
from arch_lab.data.passkey import PasskeyExample, make_passkey_examples, passkey_accuracy_by_depth
from arch_lab.data.text import (
    PackedTokenStream,
    TextBlocks,
    iter_documents,
    iter_hf_documents,
    pack_tokens,
    tokenize_corpus,
    tokenize_documents,
)
from arch_lab.data.tokenizers import BPETokenizer, ByteTokenizer, Tokenizer, build_tokenizer

DATA_KINDS = ("mqar", "text")  # data.kind: the synthetic recall task, or a text corpus

__all__ = [
    "DATA_KINDS",
    "BPETokenizer",
    "ByteTokenizer",
    "MQARConfig",
    "PackedTokenStream",
    "PasskeyExample",
    "TextBlocks",
    "Tokenizer",
    "build_tokenizer",
    "count_shared_examples",
    "generate_mqar",
    "iter_documents",
    "iter_hf_documents",
    "make_passkey_examples",
    "mqar_slice_counts",
    "pack_tokens",
    "passkey_accuracy_by_depth",
    "tokenize_corpus",
    "tokenize_documents",
]
