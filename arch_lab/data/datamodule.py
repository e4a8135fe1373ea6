"""LightningDataModules for MQAR (synthetic recall) and plain-text language modelling.

Batches are dicts: input_ids (B, L), labels (B, L) shifted for next-token prediction
(-100 = ignored); MQAR batches also carry num_kv_pairs (B,) for per-slice accuracy.
Training order comes from ResumableShuffleSampler (depends only on seed and epoch, and can skip
what a resumed run already consumed) and num_workers defaults to 0, so runs are reproducible.
batch_size is per device. Under data parallelism (DDP/FSDP, W processes) the training loaders shard the
data themselves (the Trainer runs with use_distributed_sampler=False): the W ranks' batches at a step
together are the batch one process with batch_size * W draws at that step. Training loaders drop an epoch's
last partial batch. Validation and test loaders are not sharded: they batch by the global batch size
(batch_size * W) and every rank evaluates the same batches, so trainer.limit_val_batches covers the same
examples, and validation metrics come out the same, as on one device at batch_size * W.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Sequence
from functools import partial

import lightning as L
import torch
from torch.utils.data import DataLoader, Dataset

from arch_lab.data.mqar import MQARConfig, count_shared_examples, generate_mqar
from arch_lab.data.sampler import ResumableShuffleSampler
from arch_lab.data.text import (
    TEXT_SOURCES,
    PackedTokenStream,
    TextBlocks,
    iter_documents,
    iter_hf_documents,
    tokenize_corpus,
)
from arch_lab.data.tokenizers import Tokenizer
from arch_lab.run_checks import changed_settings, refuse_changed_resume
from components.config import ConfigError

# Validation and test sets are generated from seed + offset: far from any training seed a
# user would pick next to `seed`, so the three sets never share a random stream.
MQAR_VAL_SEED_OFFSET = 1_000_003
MQAR_TEST_SEED_OFFSET = 2_000_006


def data_parallel_shard(datamodule: L.LightningDataModule) -> tuple[int, int]:
    """(world size, global rank) of the Trainer that uses this datamodule; (1, 0) outside a Trainer."""
    trainer = datamodule.trainer
    return (trainer.world_size, trainer.global_rank) if trainer is not None else (1, 0)


def train_loader(dataset: Dataset, batch_size: int, sampler, num_workers: int, world: int, size: str) -> DataLoader:
    """A training DataLoader of full batches only; `size` names the config keys that set the dataset's size."""
    loader = DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=num_workers, drop_last=True)
    if sampler is not None and len(loader) == 0:
        raise ConfigError(f"the training set ({len(dataset)} examples, set by {size}) holds no full batch of "
                         f"data.batch_size={batch_size} per device on {world} device(s): lower data.batch_size")
    return loader


class TensorDictDataset(Dataset):
    """Rows of equally long tensors, served as dicts (the default collate stacks them)."""

    def __init__(self, tensors: dict[str, torch.Tensor]) -> None:
        lengths = {len(t) for t in tensors.values()}
        if len(lengths) != 1:
            raise ValueError(f"all tensors need the same first dimension, got {sorted(lengths)}")
        self.tensors = tensors

    def __len__(self) -> int:
        return len(next(iter(self.tensors.values())))

    def __getitem__(self, index: int) -> dict[str, torch.Tensor]:
        return {name: tensor[index] for name, tensor in self.tensors.items()}


def _optional_list(values: Sequence | None) -> list | None:
    return None if values is None else list(values)


class SettingsInCheckpoints:
    """Mixed into the datamodules: the data settings that decide the batches (`settings`, set by the lab's
    data_factory) and the seed go into every checkpoint, as Lightning saves a datamodule's state_dict, and resuming
    with others is refused naming them: the resumed sampler would skip into another stream of examples (and the
    seed also draws MQAR's examples and held-out sets)."""

    settings: dict = {}  # replaced per instance, never mutated
    seed: int

    def state_dict(self) -> dict:
        return {"settings": dict(self.settings), "seed": self.seed}

    def load_state_dict(self, state: dict) -> None:
        before = state.get("settings") or {}
        if before and self.settings:  # empty for a checkpoint or a datamodule from outside the lab's runs
            seeds = {"seed": state.get("seed", self.seed)}, {"seed": self.seed}  # none in older checkpoints
            refuse_changed_resume(changed_settings("", *seeds) + changed_settings("data.", before, self.settings))


class MQARDataModule(SettingsInCheckpoints, L.LightningDataModule):
    """MQAR (Zoology, Arora et al. 2023): a training mixture over num_kv_pairs_train (optionally with
    per-slice lengths and weights, as Zoology's mix) and held-out val/test sets over num_kv_pairs_test
    at seq_len, each from its own seed; setup() checks that no held-out example also occurs in the
    training set."""

    def __init__(
        self,
        vocab_size: int = 8192,
        seq_len: int = 64,
        train_examples: int = 100_000,
        test_examples: int = 3_000,
        num_kv_pairs_train: Sequence[int] = (4, 8, 16),
        num_kv_pairs_test: Sequence[int] = (4, 8, 16, 32),
        train_slice_seq_lens: Sequence[int] | None = None,
        train_slice_weights: Sequence[float] | None = None,
        power_a: float = 0.01,
        batch_size: int = 64,
        seed: int = 0,
        random_non_queries: bool = True,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        split = partial(
            MQARConfig,
            vocab_size=vocab_size,
            seq_len=seq_len,
            power_a=power_a,
            random_non_queries=random_non_queries,
        )
        held_out = partial(split, num_kv_pairs=list(num_kv_pairs_test), num_examples=test_examples,
                           config_keys="test")
        # Build the configs here so that bad settings fail at construction, not inside fit().
        self.configs = {
            "train": split(num_kv_pairs=list(num_kv_pairs_train), num_examples=train_examples, seed=seed,
                           slice_seq_lens=_optional_list(train_slice_seq_lens),
                           slice_weights=_optional_list(train_slice_weights)),
            "val": held_out(seed=seed + MQAR_VAL_SEED_OFFSET),
            "test": held_out(seed=seed + MQAR_TEST_SEED_OFFSET),
        }
        self.batch_size = batch_size
        self.seed = seed
        self.num_workers = num_workers
        self.datasets: dict[str, TensorDictDataset] = {}

    def setup(self, stage: str | None = None) -> None:
        if self.datasets:
            return
        data = {name: generate_mqar(cfg) for name, cfg in self.configs.items()}
        for held_out in ("val", "test"):
            # generate_mqar returns slices in order; mix them once so that any prefix of the
            # held-out batches (e.g. limit_val_batches) covers every slice.
            order = torch.randperm(len(data[held_out]["input_ids"]), generator=torch.Generator().manual_seed(0))
            data[held_out] = {name: tensor[order] for name, tensor in data[held_out].items()}
        for held_out in ("val", "test"):
            shared = count_shared_examples(data["train"]["input_ids"], data[held_out]["input_ids"])
            if shared:
                raise ConfigError(
                    f"{shared} MQAR {held_out} examples also occur in the training set; raise data.vocab_size "
                    "or data.seq_len (or set data.random_non_queries) so examples stay distinct"
                )
        self.datasets = {name: TensorDictDataset(tensors) for name, tensors in data.items()}

    def _eval_loader(self, split: str) -> DataLoader:
        world, _ = data_parallel_shard(self)
        return DataLoader(self.datasets[split], batch_size=self.batch_size * world, num_workers=self.num_workers)

    def train_dataloader(self) -> DataLoader:
        world, rank = data_parallel_shard(self)
        sampler = ResumableShuffleSampler(len(self.datasets["train"]), self.seed, world, rank)
        return train_loader(self.datasets["train"], self.batch_size, sampler, self.num_workers, world,
                            "data.train_examples")

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader("val")

    def test_dataloader(self) -> DataLoader:
        return self._eval_loader("test")


def _naming(key: str, read: Callable[[], TextBlocks]) -> TextBlocks:
    """`read()`, its errors naming the config key that gave the corpus (the text readers say data.path)."""
    try:
        return read()
    except (FileNotFoundError, ValueError) as err:
        raise type(err)(str(err).replace("data.path", key, 1)) from None  # one message, the right key


class TextDataModule(SettingsInCheckpoints, L.LightningDataModule):
    """Next-token prediction on plain text.

    source="files": train_path / valid_path are local files or directories (see iter_documents),
    tokenized up front (the first max_train_tokens / max_eval_tokens tokens).
    source="hf": training streams from the Hugging Face dataset hf_name (split hf_train_split)
    and validation comes from hf_valid_split; both go through the same tokenizing/packing code.
    test_paths are always local files, one test dataloader per name, in `test_names` order.
    """

    def __init__(
        self,
        tokenizer: Tokenizer,
        seq_len: int,
        batch_size: int,
        train_path: str | None = None,
        valid_path: str | None = None,
        test_paths: dict[str, str] | None = None,
        max_train_tokens: int | None = None,
        max_eval_tokens: int | None = None,
        source: str = "files",
        hf_name: str | None = None,
        hf_config: str | None = None,
        hf_train_split: str = "train",
        hf_valid_split: str = "validation",
        text_field: str = "text",
        seed: int = 0,
        num_workers: int = 0,
    ) -> None:
        super().__init__()
        if source not in TEXT_SOURCES:
            raise ConfigError(f"data.source must be one of {list(TEXT_SOURCES)}, got {source!r}")
        if source == "files" and (train_path is None or valid_path is None):
            raise ConfigError("data.source=files needs data.train_path and data.valid_path")
        if source == "hf" and hf_name is None:
            raise ConfigError("data.source=hf needs data.hf_name (a Hugging Face dataset name)")
        self.tokenizer = tokenizer
        self.seq_len = seq_len
        self.batch_size = batch_size
        self.train_path = train_path
        self.valid_path = valid_path
        self.test_paths = dict(test_paths or {})
        self.max_train_tokens = max_train_tokens
        self.max_eval_tokens = max_eval_tokens
        self.source = source
        self.hf_name = hf_name
        self.hf_config = hf_config
        self.hf_train_split = hf_train_split
        self.hf_valid_split = hf_valid_split
        self.text_field = text_field
        self.seed = seed
        self.num_workers = num_workers
        self.train_set: Dataset | None = None
        self.val_set: TextBlocks | None = None
        self.test_sets: dict[str, TextBlocks] = {}

    @property
    def test_names(self) -> list[str]:
        return list(self.test_paths)

    def _hf_documents(self, split: str) -> Iterable[str]:
        return iter_hf_documents(self.hf_name, split, config_name=self.hf_config, text_field=self.text_field)

    def _file_blocks(self, path: str, max_tokens: int | None, key: str) -> TextBlocks:
        """Blocks of one corpus; reader errors name the config key (`key`) that pointed at it."""
        return _naming(key, lambda: TextBlocks(tokenize_corpus(iter_documents(path, text_field=self.text_field),
                                                               self.tokenizer, max_tokens), self.seq_len))

    def setup(self, stage: str | None = None) -> None:
        if stage in (None, "fit", "validate") and self.val_set is None:
            if self.source == "files":
                self.train_set = self._file_blocks(self.train_path, self.max_train_tokens, "data.train_path")
                self.val_set = self._file_blocks(self.valid_path, self.max_eval_tokens, "data.valid_path")
            else:
                make_docs = partial(self._hf_documents, self.hf_train_split)
                self.train_set = PackedTokenStream(make_docs, self.tokenizer, self.seq_len, self.max_train_tokens)
                valid_tokens = tokenize_corpus(
                    self._hf_documents(self.hf_valid_split), self.tokenizer, self.max_eval_tokens
                )
                self.val_set = _naming("data.hf_valid_split", lambda: TextBlocks(valid_tokens, self.seq_len))
        if stage in (None, "test") and not self.test_sets:
            self.test_sets = {
                name: self._file_blocks(path, self.max_eval_tokens, f"data.test_paths.{name}")
                for name, path in self.test_paths.items()
            }

    def train_dataloader(self) -> DataLoader:
        # A stream keeps its order (each rank keeping its share); blocks of a tokenized corpus are shuffled.
        world, rank = data_parallel_shard(self)
        if isinstance(self.train_set, PackedTokenStream):
            self.train_set.num_replicas, self.train_set.rank = world, rank
            sampler = None
        else:
            sampler = ResumableShuffleSampler(len(self.train_set), self.seed, world, rank)
        return train_loader(self.train_set, self.batch_size, sampler, self.num_workers, world,
                            "data.max_train_tokens and data.seq_len")

    def _eval_loader(self, dataset: TextBlocks) -> DataLoader:
        world, _ = data_parallel_shard(self)
        return DataLoader(dataset, batch_size=self.batch_size * world, shuffle=False, num_workers=self.num_workers)

    def val_dataloader(self) -> DataLoader:
        return self._eval_loader(self.val_set)

    def test_dataloader(self) -> list[DataLoader]:
        return [self._eval_loader(self.test_sets[name]) for name in self.test_names]
