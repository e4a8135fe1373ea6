"""Exact resume: a run restarted from an intermediate checkpoint of another run ends where that run ended.

Run A trains N=8 steps and checkpoints every k=4 (the ModelCheckpoint in train.py saves every
trainer.val_check_interval steps). An epoch is 6 batches (192 examples / 32), so step 4 is mid-epoch and the resumed
run C crosses an epoch boundary: equal losses after step k need the optimizer, LR scheduler and loop state restored
and the shuffling sampler to skip the 4 batches epoch 0 already consumed. C keeps max_steps=N, since the
warmup-stable-decay schedule depends on it.
"""
from __future__ import annotations

import re
from pathlib import Path
from typing import Optional

import pytest
import torch

from lab_helpers import (RUN_DIR_NAME, client, error_messages, lab_runs, last_logged, metric_history, only_run, run_lab,
                         start_lab)

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
    assert run_c.data.tags["resumed_from_run"] == run_a.info.run_id


def test_a_resume_may_change_how_often_it_checkpoints(runs, tmp_path):
    """The checkpoint callback's state is restored whatever its interval: no warning that a callback is missing, and
    the new interval's checkpoints are written."""
    (a, run_a), _ = runs
    intermediate = _checkpoints(a) / f"epoch=0-step={EVERY}.ckpt"
    proc = run_lab([*COMMON, "trainer.val_check_interval=2", f"ckpt_path='{intermediate}'"], tmp_path)
    assert "callbacks used to create the checkpoint" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in _checkpoints(tmp_path).iterdir()) == [
        "epoch=0-step=6.ckpt", "epoch=1-step=8.ckpt", "last.ckpt"]
    assert only_run(tmp_path).data.metrics["train/final_loss"] == pytest.approx(
        run_a.data.metrics["train/final_loss"], rel=REL)


def test_a_checkpoint_from_before_the_callbacks_one_state_key_resumes_its_state(runs, tmp_path):
    (a, _), _ = runs
    ckpt = torch.load(_checkpoints(a) / f"epoch=0-step={EVERY}.ckpt", weights_only=True)
    state = ckpt["callbacks"].pop("StepCheckpoint")
    ckpt["callbacks"][f"StepCheckpoint{{'monitor': None, 'mode': 'min', 'every_n_train_steps': {EVERY}, "
                      "'every_n_epochs': 0, 'train_time_interval': None}"] = state  # Lightning's key, as written then
    torch.save(ckpt, tmp_path / "old.ckpt")
    proc = run_lab([*COMMON, f"ckpt_path={tmp_path / 'old.ckpt'}"], tmp_path / "resumed")
    assert "callbacks used to create the checkpoint" not in proc.stdout + proc.stderr


def test_resuming_with_other_model_optimizer_or_data_settings_is_refused(runs, tmp_path):
    (a, _), _ = runs
    intermediate = _checkpoints(a) / f"epoch=0-step={EVERY}.ckpt"
    proc = run_lab([*COMMON, f"ckpt_path='{intermediate}'", "optim.lr=0.01", "model.window=8"], tmp_path, check=False)
    assert proc.returncode != 0
    assert error_messages(proc) == [
        "ckpt_path: this run changes model.window=8 (checkpoint: 16), optim.lr=0.01 (checkpoint: 0.003); resume with "
        "the checkpoint's settings, or start a new run without ckpt_path"]
    # the data too: the resumed sampler would skip into another stream of examples
    proc = run_lab([*COMMON, f"ckpt_path='{intermediate}'", "data.batch_size=16"], tmp_path / "data", check=False)
    assert proc.returncode != 0
    assert error_messages(proc)[0].startswith("ckpt_path: this run changes data.batch_size=16 (checkpoint: 32); resume")
    # and the seed, which also draws MQAR's examples and held-out sets
    proc = run_lab([*COMMON, f"ckpt_path='{intermediate}'", "seed=5"], tmp_path / "seed", check=False)
    assert error_messages(proc)[0].startswith("ckpt_path: this run changes seed=5 (checkpoint: 0); resume")
    # and the batches a step takes: the sampler would skip as many batches a step as the resumed run takes
    proc = run_lab([*COMMON, f"ckpt_path='{intermediate}'", "trainer.accumulate_grad_batches=2"], tmp_path / "accum",
                   check=False)
    assert error_messages(proc)[0].startswith("ckpt_path: this run changes trainer.accumulate_grad_batches=2 "
                                              "(checkpoint: 1); resume")
    # or the devices: the checkpoint of a 2-device run, resumed on one
    ckpt = torch.load(intermediate, weights_only=True)
    assert ckpt["batches_per_step"] == {"accumulate_grad_batches": 1, "devices*num_nodes": 1}
    ckpt["batches_per_step"]["devices*num_nodes"] = 2
    torch.save(ckpt, tmp_path / "two_devices.ckpt")
    proc = run_lab([*COMMON, f"ckpt_path={tmp_path / 'two_devices.ckpt'}"], tmp_path / "devices", check=False)
    assert error_messages(proc)[0].startswith("ckpt_path: this run changes trainer.devices*num_nodes=1 (checkpoint: "
                                              "2); resume")
    # refused before the MLflow run opens: no FAILED run left behind
    assert lab_runs(tmp_path) == lab_runs(tmp_path / "data") == lab_runs(tmp_path / "seed") == []
    assert lab_runs(tmp_path / "accum") == lab_runs(tmp_path / "devices") == []


def test_a_saved_state_dict_is_not_a_checkpoint_to_resume(runs, tmp_path):
    (a, _), _ = runs
    weights = torch.load(_checkpoints(a) / "last.ckpt", weights_only=True)["state_dict"]
    torch.save(weights, tmp_path / "weights.pt")
    proc = run_lab([*COMMON, f"ckpt_path={tmp_path / 'weights.pt'}"], tmp_path, check=False)
    assert proc.returncode != 0
    assert "weights.pt is not a checkpoint written by `python -m arch_lab` (no hyper_parameters.model_cfg or " \
        "state_dict)" in error_messages(proc)[0]
    assert lab_runs(tmp_path) == []


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


# ---- a run stopped mid-epoch (Ctrl-C, trainer.max_time) ---------------------------------------------------------
def _batches_of_a_fit(workdir: Path, max_steps: int, stop_after: Optional[int] = None,
                      ckpt_path: Optional[str] = None) -> list[torch.Tensor]:
    """The input batches a fit of the tiny row-E model trains on (6 batches an epoch), stopped after optimizer step
    `stop_after` as Ctrl-C stops a run (arch_lab.interrupts), with last.ckpt saved where the stop leaves it."""
    import signal

    import lightning as L
    import yaml
    from lightning.pytorch.callbacks import ModelCheckpoint

    from arch_lab.data.datamodule import MQARDataModule
    from arch_lab.interrupts import StopRequested
    from arch_lab.lit_module import LitHybridLM
    from components.presets import preset
    from lab_helpers import CONF_DIR

    seen: list[torch.Tensor] = []
    stopper = StopRequested()

    class RecordAndSignal(L.Callback):
        def on_train_batch_start(self, trainer, module, batch, batch_idx) -> None:
            seen.append(batch["input_ids"].clone())

        def on_train_batch_end(self, trainer, *args) -> None:
            if trainer.global_step == stop_after:
                stopper.request(signal.SIGINT, None)

    optim_cfg = yaml.safe_load((CONF_DIR / "optim" / "adamw_wsd.yaml").read_text())
    lit = LitHybridLM(preset("roadmap_e").to_dict(), optim_cfg)
    data = MQARDataModule(vocab_size=64, seq_len=32, train_examples=192, test_examples=64, num_kv_pairs_train=[1, 2],
                          num_kv_pairs_test=[1], batch_size=32, seed=0)
    trainer = L.Trainer(accelerator="cpu", max_steps=max_steps, max_epochs=-1, logger=False, limit_val_batches=0,
                        num_sanity_val_steps=0, enable_progress_bar=False, enable_model_summary=False,
                        use_distributed_sampler=False, default_root_dir=workdir,
                        callbacks=[RecordAndSignal(), stopper,
                                   ModelCheckpoint(dirpath=workdir, save_last=True, every_n_train_steps=100)])
    trainer.fit(lit, datamodule=data, ckpt_path=ckpt_path)
    return seen


def test_a_run_stopped_mid_epoch_resumes_on_the_same_data(tmp_path):
    steps, stopped_at = 16, 8  # epochs of 6 batches: stopped 2 batches into epoch 1
    uninterrupted = _batches_of_a_fit(tmp_path / "a", steps)
    assert len(_batches_of_a_fit(tmp_path / "b", steps, stop_after=stopped_at)) == stopped_at
    last = tmp_path / "b" / "last.ckpt"
    # why this case: Lightning counts the stopped epoch as finished, so the resumed Trainer starts epoch 2
    assert torch.load(last, weights_only=True)["loops"]["fit_loop"]["epoch_progress"]["current"]["completed"] == 2
    resumed = _batches_of_a_fit(tmp_path / "c", steps, ckpt_path=str(last))
    assert len(resumed) == steps - stopped_at
    for step, (batch, expected) in enumerate(zip(resumed, uninterrupted[stopped_at:]), start=stopped_at):
        assert torch.equal(batch, expected), f"step {step} trained on other examples than the uninterrupted run"


def test_a_checkpoint_gets_the_permissions_of_any_file_the_user_writes(tmp_path):
    import os

    from arch_lab.checkpoints import AtomicCheckpointIO

    previous = os.umask(0o022)
    try:
        AtomicCheckpointIO().save_checkpoint({"step": 1}, tmp_path / "last.ckpt")
    finally:
        os.umask(previous)
    assert (tmp_path / "last.ckpt").stat().st_mode & 0o777 == 0o644  # mkstemp alone leaves 0o600


def test_a_checkpoint_with_damaged_bytes_is_refused_not_loaded(runs, tmp_path):
    # the zip index intact, a tensor's bytes zeroed: torch loads it without a word (its reader skips the CRCs)
    from arch_lab.checkpoints import CheckpointError, read_lab_checkpoint

    (a, _), _ = runs
    data = bytearray((_checkpoints(a) / "last.ckpt").read_bytes())
    start = data.index(b"archive/data/0") + 200  # inside the first tensor's bytes, past its local header
    data[start:start + 64] = bytes(64)
    damaged = tmp_path / "damaged.ckpt"
    damaged.write_bytes(bytes(data))
    assert torch.load(damaged, weights_only=True)["state_dict"]  # what the check guards against
    with pytest.raises(CheckpointError, match=r"^ckpt_path: .*damaged.ckpt is damaged \(archive/data/\d+ fails its "
                                              r"CRC check\)$"):
        read_lab_checkpoint(str(damaged), "ckpt_path")


def test_resuming_a_run_whose_max_time_is_used_up_is_refused(tmp_path):
    """Lightning's Timer resumes from the time the checkpoint trained: the same trainer.max_time has none left (the
    resumed run used to train no step and end FINISHED with a NaN loss)."""
    timed = [*COMMON, "trainer.max_steps=100000", "trainer.max_time=00:00:00:02"]
    run_lab(timed, tmp_path / "timed")
    last = _checkpoints(tmp_path / "timed") / "last.ckpt"
    proc = run_lab([*timed, f"ckpt_path='{last}'"], tmp_path / "resumed", check=False)
    messages = error_messages(proc)
    assert len(messages) == 1 and re.fullmatch(
        r"ckpt_path: the checkpoint has trained for \d+ s and trainer.max_time allows 2 s in all: nothing is left to "
        r"train; raise trainer.max_time \(or set it to null\) to train on", messages[0]), messages
    assert lab_runs(tmp_path / "resumed") == []
    # what a Ctrl-C in that run's evaluation says: not to resume from a checkpoint that would be refused
    from arch_lab.checkpoints import resume_hint

    assert resume_hint(last, {"max_steps": 100000, "max_time": "00:00:00:02"}).startswith(
        "; training had finished (the checkpoint has trained for ")
    assert resume_hint(last, {"max_steps": 100000, "max_time": None}) == f"; resume with ckpt_path='{last}'"


def test_a_resume_whose_max_steps_moves_the_schedule_says_so(runs, caplog):
    from arch_lab.checkpoints import _point_out_a_moved_schedule

    (a, _), _ = runs
    ckpt = torch.load(_checkpoints(a) / "last.ckpt", weights_only=True)  # step 8 of 8, still warming up
    optim = ckpt["hyper_parameters"]["optim_cfg"]
    with caplog.at_level("WARNING", logger="arch_lab.checkpoints"):
        _point_out_a_moved_schedule(ckpt, optim, N_STEPS)  # the checkpoint's own schedule: its own lr
        _point_out_a_moved_schedule(ckpt, optim, 10 * N_STEPS)  # a longer run, still in its warmup: the same lr
        assert caplog.messages == []
        finished = {"global_step": 8, "lr_schedulers": [{"_last_lr": [0.0003, 0.0003]}]}  # decayed to 10%
        _point_out_a_moved_schedule(finished, {**optim, "warmup_steps": 0, "schedule": "wsd"}, 16)
    assert caplog.messages == ["trainer.max_steps=16 lays the wsd schedule out anew: step 8 trains at the "
                               "checkpoint's lr 0.0003, step 9 at 0.003"]


def test_resuming_a_checkpoint_at_max_steps_is_refused(runs, tmp_path):
    (a, _), _ = runs
    intermediate = _checkpoints(a) / f"epoch=0-step={EVERY}.ckpt"
    args = [*COMMON, f"ckpt_path='{intermediate}'", f"trainer.max_steps={EVERY}"]  # it used to finish, NaN loss
    proc = run_lab(args, tmp_path, check=False)
    assert error_messages(proc) == [f"ckpt_path: the checkpoint is at step {EVERY} and trainer.max_steps={EVERY}: "
                                    f"nothing is left to train; raise trainer.max_steps to train on"]
    assert lab_runs(tmp_path) == []


def test_a_resume_marks_killed_the_run_whose_process_was_killed(tmp_path):
    """SIGKILL ends a run's process without a word to MLflow, which keeps the run RUNNING; a resume of its checkpoint
    finds the process gone and marks the run KILLED."""
    import signal
    import time

    killed = tmp_path / "killed"
    proc = start_lab([*COMMON, "trainer.max_steps=100000", "trainer.val_check_interval=2"], killed)
    last = _checkpoints(killed) / "last.ckpt"
    deadline = time.monotonic() + 300
    while not last.is_file():
        assert proc.poll() is None and time.monotonic() < deadline, (killed / "lab.log").read_text()[-3000:]
        time.sleep(0.5)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    (origin,) = lab_runs(killed)
    assert origin.info.status == "RUNNING"  # what MLflow keeps after a SIGKILL
    step = torch.load(last, weights_only=True)["global_step"]
    resumed = tmp_path / "resumed"
    proc = run_lab([*COMMON, f"trainer.max_steps={step + 2}", f"ckpt_path='{last}'",
                    f"logger.tracking_uri=sqlite:///{killed / 'mlruns.db'}"], resumed)
    assert f"run {origin.info.run_id}, whose checkpoint this run resumes, was still RUNNING though its process is " \
           "gone (killed): it is marked KILLED" in proc.stdout
    runs = {run.info.run_id: run for run in lab_runs(killed)}
    assert runs[origin.info.run_id].info.status == "KILLED"
    (new,) = [run for run_id, run in runs.items() if run_id != origin.info.run_id]
    assert new.info.status == "FINISHED" and new.data.tags["resumed_from_run"] == origin.info.run_id
    assert runs[origin.info.run_id].data.tags["ended_by"] == \
        f"its process was gone when run {new.info.run_id} resumed it"
    # a finished origin is left as it is
    proc = run_lab([*COMMON, f"trainer.max_steps={step + 2}", f"ckpt_path='{last}'",
                    f"logger.tracking_uri=sqlite:///{killed / 'mlruns.db'}"], tmp_path / "again")
    assert "was still RUNNING" not in proc.stdout
