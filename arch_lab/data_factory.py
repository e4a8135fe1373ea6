"""Build the tokenizer and LightningDataModule that a `data` config describes, with errors naming its keys."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Optional

from components.config import ConfigError, MissingInputError

from .data import DATA_KINDS
from .data.datamodule import MQARDataModule, TextDataModule
from .data.tokenizers import Tokenizer
from .data.tokenizers import build_tokenizer as make_tokenizer



def tokenizer_spec(data_cfg: dict[str, Any], out_dir: Path) -> Optional[dict[str, Any]]:
    """How to rebuild this run's tokenizer later (stored in checkpoints): None for MQAR (token ids only)."""
    if data_cfg["kind"] != "text":
        return None
    kind = data_cfg.get("tokenizer", "byte")
    if kind == "bpe" and data_cfg["source"] != "files":
        raise ConfigError("data.tokenizer=bpe is trained on local files: use data.source=files")
    return {"kind": kind, "path": str(out_dir / "tokenizer.json") if kind == "bpe" else None}


def build_tokenizer(data_cfg: dict[str, Any], spec: Optional[dict[str, Any]]) -> Optional[Tokenizer]:
    """The tokenizer of a text run; a BPE one is trained on data.train_path once and saved at spec["path"]."""
    if spec is None:
        return None
    if spec["kind"] == "byte":
        return make_tokenizer("byte")
    return make_tokenizer(spec["kind"], path=spec["path"], train_source=data_cfg["train_path"],
                          vocab_size=data_cfg["bpe_vocab_size"])


def _check_path(key: str, path: Optional[str]) -> None:
    if path is not None and not Path(path).exists():
        raise MissingInputError(f"{key}: no such file or directory: {path} (set data_root=... or {key}=...)")


def build_datamodule(data_cfg: dict[str, Any], seed: int, tokenizer: Optional[Tokenizer]):
    """The datamodule, carrying the settings a resumed run must keep (SettingsInCheckpoints): all but where the
    files are (a run may resume on another machine) and how many loader workers fetch them."""
    datamodule = _datamodule(data_cfg, seed, tokenizer)
    datamodule.settings = {key: value for key, value in data_cfg.items()
                           if key != "num_workers" and not key.endswith(("_path", "_paths", "_dir"))}
    return datamodule


def _datamodule(data_cfg: dict[str, Any], seed: int, tokenizer: Optional[Tokenizer]):
    kind = data_cfg.get("kind")
    if kind not in DATA_KINDS:
        raise ConfigError(f"data.kind must be one of {', '.join(DATA_KINDS)}; got {kind!r}")
    if kind == "mqar":
        return MQARDataModule(vocab_size=data_cfg["vocab_size"], seq_len=data_cfg["seq_len"],
                              train_examples=data_cfg["train_examples"], test_examples=data_cfg["test_examples"],
                              num_kv_pairs_train=data_cfg["num_kv_pairs_train"],
                              num_kv_pairs_test=data_cfg["num_kv_pairs_test"],
                              train_slice_seq_lens=data_cfg.get("train_slice_seq_lens"),
                              train_slice_weights=data_cfg.get("train_slice_weights"), power_a=data_cfg["power_a"],
                              batch_size=data_cfg["batch_size"], seed=seed,
                              random_non_queries=data_cfg["random_non_queries"],
                              num_workers=data_cfg.get("num_workers", 0))
    if data_cfg["source"] == "files":
        _check_path("data.train_path", data_cfg["train_path"])
        _check_path("data.valid_path", data_cfg["valid_path"])
        for name, path in (data_cfg.get("test_paths") or {}).items():
            _check_path(f"data.test_paths.{name}", path)
    return TextDataModule(tokenizer=tokenizer, seq_len=data_cfg["seq_len"], batch_size=data_cfg["batch_size"],
                          train_path=data_cfg["train_path"], valid_path=data_cfg["valid_path"],
                          test_paths=data_cfg.get("test_paths") or {}, max_train_tokens=data_cfg["max_train_tokens"],
                          max_eval_tokens=data_cfg["max_eval_tokens"], source=data_cfg["source"],
                          hf_name=data_cfg.get("hf_name"), hf_config=data_cfg.get("hf_config"),
                          hf_train_split=data_cfg.get("hf_train_split", "train"),
                          hf_valid_split=data_cfg.get("hf_valid_split", "validation"),
                          text_field=data_cfg.get("text_field", "text"), seed=seed,
                          num_workers=data_cfg.get("num_workers", 0))


def data_vocab_size(data_cfg: dict[str, Any], tokenizer: Optional[Tokenizer]) -> int:
    return data_cfg["vocab_size"] if data_cfg["kind"] == "mqar" else tokenizer.vocab_size
