"""Exact resume: a run restarted from an intermediate checkpoint of another run ends where that run ended.

Run A trains N=8 steps and checkpoints every k=4 (the ModelCheckpoint in train.py saves every
trainer.val_check_interval steps). An epoch is 6 batches (192 examples / 32), so step 4 is mid-epoch and the resumed
run C crosses an epoch boundary: equal losses after step k need the optimizer, LR scheduler and loop state restored
and the shuffling sampler to skip the 4 batches epoch 0 already consumed. C keeps max_steps=N, since the
warmup-stable-decay schedule depends on it.
"""
from __future__ import annotations

from pathlib import Path

import pytest
import torch

from lab_helpers import RUN_DIR_NAME, last_logged, metric_history, only_run, run_lab

N_STEPS, EVERY = 8, 4
COMMON = [f"trainer.max_steps={N_STEPS}", f"trainer.val_check_interval={EVERY}", "trainer.log_every_n_steps=1",
          "trainer.limit_val_batches=2", "data.train_examples=192", "data.test_examples=64",
          "eval.decode.enabled=false", "eval.analysis.enabled=false"]
REL = 1e-5


def _checkpoints(workdir: Path) -> Path:
    return workdir / RUN_DIR_NAME / "checkpoints"


@pytest.fixture(scope="module")
def runs(tmp_path_factory: pytest.TempPathFactory):
    a = tmp_path_factory.mktemp("uninterrupted")
    run_lab(COMMON, a)
    c = tmp_path_factory.mktemp("resumed")
    intermediate = _checkpoints(a) / f"epoch=0-step={EVERY}.ckpt"
    run_lab([*COMMON, f"ckpt_path='{intermediate}'"], c)  # quoted: Lightning's file names contain '='
    return (a, only_run(a)), (c, only_run(c))


def _by_step(workdir: Path, run, key: str, first_step: int) -> dict[int, float]:
    return {step: value for step, value in metric_history(workdir, run.info.run_id, key) if step >= first_step}


def test_resumed_run_repeats_the_uninterrupted_losses(runs):
    (a, run_a), (c, run_c) = runs
    assert run_a.info.status == run_c.info.status == "FINISHED"
    for key in ("train/loss", "train/lr", "epoch"):
        after_a = _by_step(a, run_a, key, EVERY)
        after_c = _by_step(c, run_c, key, 0)
        assert sorted(after_c) == list(range(EVERY, N_STEPS)), f"{key}: C logs only the steps after the checkpoint"
        assert after_c == pytest.approx(after_a, rel=REL), key
    assert _by_step(c, run_c, "epoch", 0)[N_STEPS - 1] == 1  # the resumed run crossed into epoch 1
    for key in ("train/final_loss", "recall/mqar_acc"):
        assert run_c.data.metrics[key] == pytest.approx(run_a.data.metrics[key], rel=REL), key
    assert last_logged(c, run_c.info.run_id, "val/loss") == pytest.approx(
        last_logged(a, run_a.info.run_id, "val/loss"), rel=REL)
    assert run_c.data.params["ckpt_path"] == f"<abs>/epoch=0-step={EVERY}.ckpt"


def test_resumed_weights_and_optimizer_state_match(runs):
    (a, _), (c, _) = runs
    final = f"epoch=1-step={N_STEPS}.ckpt"
    ckpt_a = torch.load(_checkpoints(a) / final, weights_only=True)
    ckpt_c = torch.load(_checkpoints(c) / final, weights_only=True)
    assert ckpt_a["global_step"] == ckpt_c["global_step"] == N_STEPS
    assert ckpt_a["state_dict"].keys() == ckpt_c["state_dict"].keys()
    for name, tensor in ckpt_a["state_dict"].items():
        torch.testing.assert_close(ckpt_c["state_dict"][name], tensor, rtol=REL, atol=1e-7, msg=name)
    states_a = ckpt_a["optimizer_states"][0]["state"]
    states_c = ckpt_c["optimizer_states"][0]["state"]
    assert states_a.keys() == states_c.keys()
    for index, state in states_a.items():
        for key in ("exp_avg", "exp_avg_sq"):
            torch.testing.assert_close(states_c[index][key], state[key], rtol=REL, atol=1e-9)
    assert ckpt_c["lr_schedulers"] == ckpt_a["lr_schedulers"]


def test_checkpoints_are_complete_and_load_with_weights_only(runs):
    for workdir, _ in runs:
        directory = _checkpoints(workdir)
        names = sorted(p.name for p in directory.iterdir())
        assert not [n for n in names if n.endswith(".tmp")], "a temporary file of an atomic save was left behind"
        expected = {"last.ckpt", f"epoch=1-step={N_STEPS}.ckpt"}
        assert expected <= set(names)
        for name in names:
            ckpt = torch.load(directory / name, weights_only=True)
            assert {"state_dict", "optimizer_states", "lr_schedulers", "loops", "hyper_parameters"} <= set(ckpt)
            assert ckpt["hyper_parameters"]["model_cfg"]["name"] == "roadmap_e_tiny"
    (a, _), _ = runs
    assert sorted(p.name for p in _checkpoints(a).iterdir()) == \
        [f"epoch=0-step={EVERY}.ckpt", f"epoch=1-step={N_STEPS}.ckpt", "last.ckpt"]
