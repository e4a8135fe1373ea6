"""Data parallel training: DDP over 2 CPU processes (gloo) trains on the same global batches, with the same losses, as
one process at twice the per-device batch, and tracks it as one MLflow run; and, unit by unit, the sharding, loss
scaling and optimizer grouping it rests on. (FSDP needs a GPU in Lightning and torch: experiments/performance/
ddp_check.sh covers it on two GPUs.)
"""
from __future__ import annotations

from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
from torch import nn

from arch_lab.data.datamodule import MQARDataModule
from arch_lab.data.sampler import ResumableShuffleSampler
from arch_lab.data.text import PackedTokenStream
from arch_lab.data.tokenizers import build_tokenizer
from arch_lab.optim import parameter_groups
from lab_helpers import RUN_DIR_NAME, lab_runs, last_logged, metric_history, run_lab, start_lab

# ------------------------------------------------------------------------------------------- sharding units


def _global_batches(length: int, seed: int, world: int, batch: int, skip: int = 0, epoch: int = 0) -> list[list[int]]:
    """Each step's examples over all ranks (sorted), with per-rank batch `batch` and full batches only."""
    per_rank = []
    for rank in range(world):
        sampler = ResumableShuffleSampler(length, seed, world, rank)
        sampler.set_epoch(epoch)
        sampler.skip_samples = skip
        per_rank.append(list(sampler))
    steps = min(len(indices) for indices in per_rank) // batch
    return [sorted(i for indices in per_rank for i in indices[k * batch:(k + 1) * batch]) for k in range(steps)]


@pytest.mark.parametrize("world", [2, 3])
@pytest.mark.parametrize("epoch", [0, 1])
def test_sharded_sampler_draws_the_global_batches_of_one_process(world: int, epoch: int):
    length, batch = 103, 4
    big = world * batch
    one = _global_batches(length, 7, 1, big, epoch=epoch)
    assert one == _global_batches(length, 7, world, batch, epoch=epoch)
    assert len(one) == length // big
    for rank in range(world):  # every rank gets equally many examples, none twice
        assert len(ResumableShuffleSampler(length, 7, world, rank)) == length // world
    shards = [set(ResumableShuffleSampler(length, 7, world, r)) for r in range(world)]
    assert sum(map(len, shards)) == len(set().union(*shards)) == length // world * world
    # A resumed run skips every rank's batches of the steps already done (skip_samples counts all ranks).
    assert _global_batches(length, 7, world, batch, skip=3 * big, epoch=epoch) == one[3:]


def test_datamodule_shards_training_and_batches_evaluation_globally():
    def module(world: int, rank: int, batch_size: int) -> MQARDataModule:
        dm = MQARDataModule(vocab_size=64, seq_len=32, train_examples=200, test_examples=64,
                            num_kv_pairs_train=[2, 4], num_kv_pairs_test=[2, 8], batch_size=batch_size)
        dm.trainer = SimpleNamespace(world_size=world, global_rank=rank)
        dm.setup("fit")
        return dm

    one = [b["input_ids"] for b in module(1, 0, 16).train_dataloader()]
    ranks = [[b["input_ids"] for b in module(2, r, 8).train_dataloader()] for r in range(2)]
    assert len(one) == len(ranks[0]) == len(ranks[1]) == 200 // 16  # the last partial batch is dropped
    for k, batch in enumerate(one):
        rows = lambda t: sorted(map(tuple, t.tolist()))  # noqa: E731
        assert rows(torch.cat([ranks[0][k], ranks[1][k]])) == rows(batch)
    assert module(2, 1, 8).val_dataloader().batch_size == module(1, 0, 16).val_dataloader().batch_size == 16
    with pytest.raises(ValueError, match="no full batch of data.batch_size=128 per device on 2 device"):
        module(2, 0, 128).train_dataloader()


def test_stream_shards_give_every_rank_equally_many_blocks_in_order():
    docs = ["".join(chr(97 + (i * 7 + j) % 26) for j in range(300)) for i in range(5)]
    byte = build_tokenizer("byte")
    single = [b["input_ids"] for b in PackedTokenStream(lambda: iter(docs), byte, seq_len=16)]
    shards = [[b["input_ids"] for b in PackedTokenStream(lambda: iter(docs), byte, seq_len=16, num_replicas=3,
                                                         rank=r)] for r in range(3)]
    assert len(single) % 3 != 0 and all(len(s) == len(single) // 3 for s in shards)
    dealt = [shards[i % 3][i // 3] for i in range(len(single) // 3 * 3)]
    assert all(torch.equal(a, b) for a, b in zip(dealt, single))


def test_weight_decay_groups_use_the_shapes_from_before_fsdp_flattened_them():
    wrapped = "layers.0._fsdp_wrapped_module._checkpoint_wrapped_module."
    flat = [(wrapped + "mixer.in_proj.weight", nn.Parameter(torch.zeros(12))),  # a matrix, flattened
            (wrapped + "mixer_norm.weight", nn.Parameter(torch.zeros(4))),
            (wrapped + "mixer.ssm.A_log", nn.Parameter(torch.zeros(8)))]
    ndims = {"layers.0.mixer.in_proj.weight": 2, "layers.0.mixer_norm.weight": 1, "layers.0.mixer.ssm.A_log": 2}
    decay, no_decay = parameter_groups(SimpleNamespace(named_parameters=lambda: iter(flat)), 0.1, ndims)
    assert [id(p) for p in decay["params"]] == [id(flat[0][1])]
    assert len(no_decay["params"]) == 2


def test_fsdp_config_instantiates_a_strategy_wrapping_and_checkpointing_each_decoder_block():
    from hydra import compose, initialize_config_dir
    from lightning.pytorch.strategies import FSDPStrategy

    from arch_lab.train import _trainer_kwargs
    from components.model import DecoderLayer
    from lab_helpers import CONF_DIR

    with initialize_config_dir(str(CONF_DIR), version_base="1.3"):
        fsdp = _trainer_kwargs(compose("train", overrides=["trainer=fsdp"]))
        ddp = _trainer_kwargs(compose("train", overrides=["trainer=ddp"]))
        with pytest.raises(ValueError, match="trainer.use_distributed_sampler"):
            _trainer_kwargs(compose("train", overrides=["+trainer.use_distributed_sampler=true"]))
    strategy = fsdp["strategy"]
    assert isinstance(strategy, FSDPStrategy) and fsdp["devices"] == 2 and fsdp["precision"] == "bf16-mixed"
    assert strategy.kwargs["auto_wrap_policy"]._module_classes == {DecoderLayer}
    assert strategy._activation_checkpointing_kwargs["auto_wrap_policy"]._module_classes == {DecoderLayer}
    assert (ddp["strategy"], ddp["devices"]) == ("ddp", 2)


# ------------------------------------------------------------------------------ 2-process DDP end to end

STEPS = 8  # 192 examples / global batch 32 = 6 steps an epoch: the runs cross into epoch 1
COMMON = [f"trainer.max_steps={STEPS}", "trainer.val_check_interval=4", "trainer.log_every_n_steps=1",
          "trainer.limit_val_batches=2", "data.train_examples=192", "data.test_examples=64",
          "eval.decode.enabled=false", "eval.analysis.enabled=false", "+tags.case=dp"]


@pytest.fixture(scope="module")
def dp_runs(tmp_path_factory: pytest.TempPathFactory):
    one = tmp_path_factory.mktemp("one_process")
    proc = start_lab([*COMMON, "data.batch_size=32"], one)  # beside the DDP run: the machine may have 2 cores
    try:
        ddp = tmp_path_factory.mktemp("ddp_two_processes")
        run_lab([*COMMON, "data.batch_size=16", "trainer.strategy=ddp", "trainer.devices=2"], ddp)
        assert proc.wait(timeout=600) == 0, (one / "lab.log").read_text()[-6000:]
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    return one, ddp


@pytest.mark.slow
def test_ddp_on_two_processes_repeats_the_one_process_losses(dp_runs: tuple[Path, Path]):
    (one, ddp) = dp_runs
    runs = {}
    for workdir in dp_runs:
        found = lab_runs(workdir)
        assert [r.info.status for r in found] == ["FINISHED"], "exactly one MLflow run, finished"
        runs[workdir] = found[0]
    curves = [metric_history(w, runs[w].info.run_id, "train/loss") for w in dp_runs]
    assert [s for s, _ in curves[1]] == [s for s, _ in curves[0]] == list(range(STEPS))
    assert [v for _, v in curves[1]] == pytest.approx([v for _, v in curves[0]], rel=1e-5, abs=1e-6)
    for key in ("val/loss", "recall/mqar_acc"):
        assert last_logged(ddp, runs[ddp].info.run_id, key) == pytest.approx(
            last_logged(one, runs[one].info.run_id, key), rel=1e-5), key
    assert runs[ddp].data.metrics["train/tokens_per_s"] > 0
    assert runs[ddp].data.params["trainer.strategy"] == "ddp"
    assert sorted(p.name for p in (ddp / RUN_DIR_NAME / "checkpoints").iterdir()) == [
        "epoch=0-step=4.ckpt", f"epoch=1-step={STEPS}.ckpt", "last.ckpt"]
