"""End to end: the default roadmap command learns MQAR and leaves a complete MLflow run; a text run logs
perplexity and passkey retrieval; `--help` and `--cfg job` describe the lab.

The default run keeps its default length (minutes on one core): the text run's fixture starts it in the background
first, so the text run and the cheap tests use the second core meanwhile.
"""
from __future__ import annotations

import math
import os
import subprocess
from pathlib import Path

import pytest
import torch
import yaml
from omegaconf import OmegaConf

from arch_lab.bench.flops import train_flops_per_token
from components.layer_plan import resolve_layer_plan
from components.model import HybridLM
from components.param_count import build_on_meta, count_parameters
from components.presets import preset, preset_values_to_config
from lab_helpers import (CONF_DIR, DATA_ROOT, EXPERIMENT_NAME, REPO, TINY_TEXT, artifact_paths, client, last_logged,
                         metric_history, mqar_acc_from_slices, only_run, read_artifact_text, run_lab, start_lab)

DEFAULT_COMMAND = ["experiment=roadmap_step3"]
EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))


# ------------------------------------------------------------------------------------ the default roadmap run


@pytest.fixture(scope="module")
def default_run_process(tmp_path_factory: pytest.TempPathFactory):
    workdir = tmp_path_factory.mktemp("default_run")
    proc = start_lab(DEFAULT_COMMAND, workdir)
    yield proc, workdir
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def default_run(default_run_process):
    proc, workdir = default_run_process
    returncode = proc.wait(timeout=900)
    assert returncode == 0, (workdir / "lab.log").read_text()[-6000:]
    return workdir, only_run(workdir)


# --------------------------------------------------------------------------------------------------- text run


@pytest.fixture(scope="module")
def text_run(tmp_path_factory: pytest.TempPathFactory, default_run_process):  # overlaps the default run
    workdir = tmp_path_factory.mktemp("text_run")
    run_lab([*TINY_TEXT, "trainer.max_steps=4", "trainer.val_check_interval=2", "trainer.limit_val_batches=2",
             "eval.decode.enabled=false"], workdir)
    return workdir, only_run(workdir)


@pytest.mark.slow
def test_text_run_logs_perplexity_and_passkey_by_depth(text_run):
    workdir, run = text_run
    m = run.data.metrics
    assert run.info.status == "FINISHED"
    eval_loss = last_logged(workdir, run.info.run_id, "val/loss")
    assert m["val/ppl"] == pytest.approx(math.exp(eval_loss), rel=1e-6)
    depths = {k: v for k, v in m.items() if k.startswith("recall/passkey_acc_depth")}
    assert sorted(depths) == [f"recall/passkey_acc_depth{d:03d}" for d in (0, 25, 50, 75, 100)]
    assert m["recall/passkey_acc"] == pytest.approx(sum(depths.values()) / len(depths))
    assert not any(k.startswith("recall/mqar") for k in m)
    assert "plots/passkey_by_depth.png" in artifact_paths(workdir, run.info.run_id, "plots")
    assert run.data.params["data.kind"] == "text" and run.data.params["data.train_path"] == \
        "<data_root>/tinyshakespeare/input.txt"
    # which text: the data config's name, in the tags and the run name
    assert run.data.tags["data"] == "text" and run.data.tags["data_config"] == "text_shakespeare"
    assert run.data.tags["mlflow.runName"].endswith("-text_shakespeare-s0")


# ------------------------------------------------ cheap, no training (they overlap the default run in a file run)


def test_help_names_searches_and_the_mlflow_ui(tmp_path: Path):
    proc = run_lab(["--help"], tmp_path)
    assert "hparams_search" in proc.stdout
    assert "mlflow ui" in proc.stdout
    assert f"experiment: {', '.join(EXPERIMENTS)}" in proc.stdout


def test_cfg_job_prints_the_composed_model(tmp_path: Path):
    proc = run_lab(["--cfg", "job", "experiment=roadmap_step2"], tmp_path)
    printed = OmegaConf.create(proc.stdout)
    assert OmegaConf.to_container(printed.model) == yaml.safe_load((CONF_DIR / "model" / "roadmap_d.yaml").read_text())
    assert printed.tags.row == "D"
    assert not (tmp_path / "mlruns").exists()  # printing the config runs nothing


# ------------------------------------------------------------------------------------ the default run's results


@pytest.mark.slow
def test_default_run_learns_mqar_well_above_chance(default_run):
    workdir, run = default_run
    assert run.info.status == "FINISHED"
    chance = 2 / int(run.data.params["data.vocab_size"])  # a query's value is one of the vocabulary's value half
    assert run.data.metrics["recall/mqar_acc"] >= 5 * chance
    by_slice = [run.data.metrics[f"recall/mqar_acc_kv{k}"] for k in (1, 2, 4, 8)]
    assert by_slice[0] > by_slice[-1]  # one pair is easier to recall than eight (never seen in training)
    # overall accuracy counts queries, so the 8-pair slice weighs most (not the mean of the slices)
    assert run.data.metrics["recall/mqar_acc"] == pytest.approx(mqar_acc_from_slices(run), abs=1e-9)


@pytest.mark.slow
def test_default_run_logs_training_history(default_run):
    workdir, run = default_run
    history = metric_history(workdir, run.info.run_id, "train/loss")
    steps = [step for step, _ in history]
    assert len(steps) >= 10 and steps == sorted(set(steps))
    assert history[-1][1] < history[0][1]
    assert run.data.metrics["train/final_loss"] == pytest.approx(history[-1][1])
    assert run.data.metrics["train/steps"] == 300  # the default trainer.max_steps
    validations = metric_history(workdir, run.info.run_id, "val/mqar_acc")
    assert len(validations) == 3  # every val_check_interval=100 steps of 300
    eval_loss = last_logged(workdir, run.info.run_id, "val/loss")
    assert math.isfinite(eval_loss) and eval_loss < history[0][1]


@pytest.mark.slow
def test_default_run_logs_size_cache_speed_and_analysis(default_run):
    workdir, run = default_run
    m = run.data.metrics
    counts = count_parameters(preset_values_to_config("roadmap_e", "tiny"))
    assert m["params/total"] == counts.total
    assert m["params/attention"] == pytest.approx(counts.attention)
    assert m["params/ssm"] == pytest.approx(counts.ssm)
    # the paper's cache accounting, counted here from the config: fp16 K/V of each KV-owning attention layer
    # (a global one holds every token, a local one its window; meta tokens not counted), and each SSM's scan and
    # conv state; MB = 1e6 bytes
    cfg = build_on_meta(preset_values_to_config("roadmap_e", "tiny")).cfg  # ssm_inner as model.param_budget sets it
    plan = resolve_layer_plan(cfg)

    def cache_mb(tokens: int) -> float:
        kv = sum((tokens if spec.scope == "global" else min(cfg.window, tokens)) * cfg.n_kv_heads
                 * (cfg.qk_head_dim + cfg.resolved_v_head_dim(spec.kind))
                 for spec in plan if spec.has_attention and spec.kv_owner == spec.index)
        ssm = sum(cfg.resolved_ssm_inner * (cfg.d_state + cfg.d_conv - 1) for spec in plan if spec.has_ssm)
        return 2 * (kv + ssm) / 1e6

    assert cfg.ssm == "mamba1"  # the state sizes above are Mamba-1's: (inner, d_state) and (inner, d_conv - 1)
    assert (m["cache/mb_8k"], m["cache/mb_16k"]) == pytest.approx((cache_mb(8192), cache_mb(16384)), rel=1e-6)
    # decode speed counts every row of the timed batch: eval.decode.batch tokens per step of decode_ms_per_step
    assert m["throughput/decode_batch"] == int(run.data.params["eval.decode.batch"])
    assert m["throughput/decode_tok_s"] == pytest.approx(
        m["throughput/decode_batch"] * 1000 / m["throughput/decode_ms_per_step"], rel=1e-6)
    assert 0 < m["analysis/erf"] <= 64  # analysis.seq_len
    assert run.data.metrics["val/loss"] > 0
    model = HybridLM(preset_values_to_config("roadmap_e", "tiny"))
    assert m["train/flops_per_token"] == pytest.approx(train_flops_per_token(model, 32))  # data.seq_len


@pytest.mark.slow
def test_default_run_logs_its_flattened_config_as_params(default_run):
    workdir, run = default_run
    params = run.data.params
    cfg = OmegaConf.load(CONF_DIR / "model" / "roadmap_e.yaml")
    assert {k: params[f"model.{k}"] for k in ("name", "n_meta_tokens", "window", "kv_share")} == \
        {k: str(cfg[k]) for k in ("name", "n_meta_tokens", "window", "kv_share")}
    assert params["data.vocab_size"] == "64" and params["data.kind"] == "mqar"
    assert params["optim.lr"] == "0.003" and params["optim.schedule"] == "wsd"
    assert params["trainer.max_steps"] == "300"  # the default length
    assert params["data_root"] == "<data_root>"
    assert params["eval.passkey.haystack_path"] == "<data_root>/gutenberg/valid.txt.gz"


def _holds_absolute_path(value: str, workdir: Path) -> bool:
    places = {str(workdir), str(workdir.resolve()), str(DATA_ROOT), str(DATA_ROOT.resolve()), str(REPO),
              str(Path.home())}
    return os.path.isabs(value) or any(place in value for place in places)


@pytest.mark.slow
def test_default_run_params_hold_no_absolute_paths(default_run):
    workdir, run = default_run
    leaking = {k: v for k, v in run.data.params.items()
               if _holds_absolute_path(v, workdir)}
    assert not leaking
    # nor the tags: MLflow's own name the script and the repository by absolute path
    assert not {k: v for k, v in run.data.tags.items() if v.startswith("/") or str(REPO) in v}
    assert run.data.tags["mlflow.source.name"] == "<abs>/__main__.py"


@pytest.mark.slow
def test_default_run_tracking_uri_param_hides_its_absolute_path(default_run):
    workdir, run = default_run
    assert not _holds_absolute_path(run.data.params["logger.tracking_uri"], workdir)


@pytest.mark.slow
def test_default_run_summary_val_loss_is_the_final_evaluation(default_run):
    workdir, run = default_run
    assert run.data.metrics["val/loss"] == last_logged(workdir, run.info.run_id, "val/loss")


@pytest.mark.slow
def test_default_run_logs_config_and_layer_plan(default_run):
    workdir, run = default_run
    config = OmegaConf.create(read_artifact_text(workdir, run.info.run_id, "config.yaml"))
    assert config.model.name == "roadmap_e_tiny" and config.tags.row == "E"
    plan = resolve_layer_plan(preset("roadmap_e"))
    assert read_artifact_text(workdir, run.info.run_id, "layer_plan.txt") == plan.to_table()
    assert yaml.safe_load(read_artifact_text(workdir, run.info.run_id, "layer_plan.json")) == \
        {"layers": plan.as_records()}


@pytest.mark.slow
def test_default_run_logs_plots(default_run):
    workdir, run = default_run
    plots = artifact_paths(workdir, run.info.run_id, "plots")
    maps = {f"plots/{kind}_map_layer{i}.png" for kind in ("attention", "ssm") for i in range(6)}  # every layer: both
    expected = {"plots/training_curves.png", "plots/mqar_by_slice.png", *maps}
    assert plots == expected
    local = Path(client(workdir).download_artifacts(run.info.run_id, "plots/training_curves.png", str(workdir)))
    assert local.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


@pytest.mark.slow
def test_default_run_prints_each_lightning_message_once_and_no_noise(default_run):
    """Lightning's own console handler printed its messages a second time beside Hydra's ("INFO: GPU available"),
    with an advertisement; the MQAR bars made matplotlib log its categorical units."""
    workdir, _ = default_run
    log = (workdir / "lab.log").read_text()
    assert log.count("GPU available:") == 1 and "INFO: GPU available" not in log
    assert "Tip:" not in log and "categorical units" not in log
    # torch 2.13's warning about Lightning's LeafSpec; Lightning's summary (FLOPs 0); its bar's "Epoch 0/-2"
    assert "LeafSpec" not in log and "Total FLOPs" not in log and "/-2" not in log
    assert "FLOPs a training token at length 32" in log


@pytest.mark.slow
def test_default_run_tags_row_and_commit(default_run):
    workdir, run = default_run
    head = subprocess.run(["git", "rev-parse", "HEAD"], cwd=REPO, capture_output=True, text=True).stdout.strip()
    assert run.data.tags["row"] == "E"
    assert run.data.tags["backend"] == "auto" and "cuda=" in run.data.tags["backends"]
    assert run.data.tags["git_commit"] in (head, f"{head}-dirty")
    assert run.data.tags["mlflow.runName"] == "roadmap_e_tiny-mqar-s0" and run.data.tags["data_config"] == "mqar"
    assert client(workdir).get_experiment(run.info.experiment_id).name == EXPERIMENT_NAME


@pytest.mark.slow
def test_default_run_checkpoints_every_validation(default_run):
    workdir, run = default_run
    names = sorted(p.name for p in (workdir / "out" / "checkpoints").iterdir())
    assert names == ["epoch=0-step=100.ckpt", "epoch=0-step=200.ckpt", "epoch=0-step=300.ckpt", "last.ckpt"]


def test_validation_interval_counts_steps_across_epochs(tmp_path):
    # 2 batches per epoch and an interval of 3 steps: validation and checkpoints keep the step schedule over epoch
    # boundaries (Lightning alone would refuse an interval longer than an epoch).
    run_lab(["data.train_examples=64", "data.batch_size=32", "trainer.max_steps=6", "trainer.val_check_interval=3",
             "trainer.limit_val_batches=1", "eval.decode.enabled=false", "eval.analysis.enabled=false"], tmp_path)
    run = only_run(tmp_path)
    assert [step for step, _ in metric_history(tmp_path, run.info.run_id, "val/mqar_acc")] == [2, 5]
    names = sorted(p.name for p in (tmp_path / "out" / "checkpoints").iterdir())
    assert names == ["epoch=1-step=3.ckpt", "epoch=2-step=6.ckpt", "last.ckpt"]


@pytest.mark.parametrize("accelerator, inside", [("gpu", "medium"), ("cpu", "highest")])
def test_float32_matmul_precision_holds_for_a_cuda_run_only_and_is_put_back(monkeypatch, accelerator, inside):
    import torch

    from arch_lab.train import float32_matmul_precision

    monkeypatch.setattr(torch.cuda, "is_available", lambda: True)
    cfg = OmegaConf.create({"float32_matmul_precision": "medium", "trainer": {"accelerator": accelerator}})
    assert torch.get_float32_matmul_precision() == "highest"
    with float32_matmul_precision(cfg):
        assert torch.get_float32_matmul_precision() == inside
    assert torch.get_float32_matmul_precision() == "highest"


def test_logged_params_hide_a_password_in_a_url():
    from arch_lab.tracking import loggable_params

    cfg = OmegaConf.create({"data_root": None, "logger": {"tracking_uri": "postgresql://alice:s3cret@db.example/ml"},
                            "paths": ["rel/a.txt", "/home/me/b.txt", 3]})
    params = loggable_params(cfg)
    assert params["logger.tracking_uri"] == "postgresql://alice:***@db.example/ml"
    assert params["paths"] == "['rel/a.txt', '<abs>/b.txt', 3]"  # every element, not the first one only


def test_the_config_artifact_hides_passwords_and_absolute_paths_and_keeps_interpolations():
    from arch_lab.tracking import loggable_config_yaml

    cfg = OmegaConf.create({"data_root": "/data/shared", "data": {"train_path": "${data_root}/input.txt"},
                            "ckpt_path": "/home/me/run/last.ckpt", "mlruns": "file:///home/me/mlruns",
                            "logger": {"tracking_uri": "postgresql://alice:s3cret@db.example/ml"}})
    assert yaml.safe_load(loggable_config_yaml(cfg)) == {
        "data_root": "<data_root>", "data": {"train_path": "${data_root}/input.txt"},
        "ckpt_path": "<abs>/last.ckpt", "mlruns": "file:///<abs>/mlruns",
        "logger": {"tracking_uri": "postgresql://alice:***@db.example/ml"}}


def test_training_that_ends_between_two_checkpoint_steps_is_checkpointed_where_it_ends(tmp_path):
    run_lab(["trainer.max_steps=6", "trainer.val_check_interval=4", "trainer.limit_val_batches=1",
             "data.train_examples=192", "eval.decode.enabled=false", "eval.analysis.enabled=false"], tmp_path)
    checkpoints = tmp_path / "out" / "checkpoints"
    assert sorted(p.name for p in checkpoints.iterdir()) == ["epoch=0-step=4.ckpt", "epoch=1-step=6.ckpt",
                                                            "last.ckpt"]
    assert torch.load(checkpoints / "last.ckpt", weights_only=True)["global_step"] == 6  # was 4: a stale model
