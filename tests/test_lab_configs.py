"""The lab's Hydra configs: every roadmap experiment composes to the right model, conf/model/ matches the presets,
every hparams_search file selects arch_lab's Optuna sweeper, and every CPU experiment runs end to end (a fast dev
run: one training batch, then the whole evaluation) into a FINISHED MLflow run; roadmap_step4 (GPU-only) refuses to
start on CPU before any run opens."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from hydra import compose, initialize_config_dir
from omegaconf import OmegaConf

from arch_lab.model_configs import rendered_model_configs
from arch_lab.sweep import register_sweeper
from lab_helpers import CONF_DIR, TINY, error_messages, lab_runs, mqar_acc_from_slices, run_lab, start_lab

EXPERIMENTS = sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
HPARAMS_SEARCHES = sorted(p.stem for p in (CONF_DIR / "hparams_search").glob("*.yaml"))
GPU_ONLY = {"roadmap_step4"}

# experiment -> (model.name, tags.row, structural keys of the Table 1 row)
ROADMAP: dict[str, tuple[str, str, dict[str, Any]]] = {
    "roadmap_transformer": ("transformer_tiny", "Transformer",
                            dict(layers="attention", window=None, kv_share=None, n_meta_tokens=0)),
    "roadmap_mamba": ("mamba_tiny", "Mamba", dict(layers="ssm", n_heads=0, kv_share=None, n_meta_tokens=0)),
    "roadmap_step1_sequential": ("roadmap_a_tiny", "A",
                                 dict(layers="sequential", window=None, kv_share=None, n_meta_tokens=0)),
    "roadmap_step1": ("roadmap_b_tiny", "B", dict(layers="hybrid", window=None, kv_share=None, n_meta_tokens=0)),
    "roadmap_step2_local_global": ("roadmap_c_tiny", "C",
                                   dict(layers="hybrid", window=16, global_layers="first_middle_last",
                                        kv_share=None, n_meta_tokens=0)),
    "roadmap_step2": ("roadmap_d_tiny", "D", dict(layers="hybrid", window=16, global_layers="first_middle_last",
                                                   kv_share=2, n_meta_tokens=0)),
    "roadmap_step3": ("roadmap_e_tiny", "E", dict(layers="hybrid", window=16, global_layers="first_middle_last",
                                                   kv_share=2, n_meta_tokens=4)),
    "roadmap_step4": ("hymba_1_5b", "F", dict(layers="hybrid", window=1024, global_layers=[0, 15, 31],
                                               n_meta_tokens=128, n_layers=32)),
}


def _compose(overrides: list[str], return_hydra_config: bool = False):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=overrides, return_hydra_config=return_hydra_config)


def test_every_experiment_file_is_covered():
    assert set(EXPERIMENTS) == set(ROADMAP)


@pytest.mark.parametrize("experiment", sorted(ROADMAP))
def test_experiment_selects_its_roadmap_preset(experiment: str):
    cfg = _compose([f"experiment={experiment}"])
    name, row, structure = ROADMAP[experiment]
    assert cfg.model.name == name
    assert cfg.tags.row == row
    model = OmegaConf.to_container(cfg.model, resolve=True)
    assert {key: model[key] for key in structure} == structure
    assert cfg.gpu_only == (experiment in GPU_ONLY)


def test_step4_is_hymba_1_5b_on_streamed_text_on_gpu():
    cfg = _compose(["experiment=roadmap_step4"])
    assert cfg.data.kind == "text" and cfg.data.source == "hf"
    assert cfg.trainer.accelerator == "gpu"
    # Released Hymba-1.5B: consecutive local layers share KV, the 3 global layers (0, 15, 31) own theirs.
    groups = OmegaConf.to_container(cfg.model.kv_share)
    assert [1, 2] in groups and [16, 17, 18] in groups
    assert not {0, 15, 31} & {layer for group in groups for layer in group}


def test_default_config_is_row_e_on_mqar_on_cpu():
    cfg = _compose([])
    assert cfg.model.name == "roadmap_e_tiny"
    assert cfg.data.kind == "mqar" and cfg.trainer.accelerator == "cpu"
    assert "experiment" not in cfg and "hparams_search" not in cfg


def test_model_conf_files_match_the_presets():
    rendered = rendered_model_configs()
    on_disk = {p.name: p.read_text() for p in (CONF_DIR / "model").glob("*.yaml")}
    assert sorted(on_disk) == sorted(rendered)
    drifted = [name for name in rendered if on_disk[name] != rendered[name]]
    assert not drifted, f"conf/model/ drifted from components.presets: {drifted} (python -m arch_lab.model_configs)"


def test_model_configs_writes_the_preset_files_and_its_help_writes_nothing(tmp_path, monkeypatch, capsys):
    import arch_lab.model_configs as model_configs

    monkeypatch.setattr(model_configs, "CONF_MODEL_DIR", tmp_path / "model")
    with pytest.raises(SystemExit) as stop:
        model_configs.main(["--help"])
    assert stop.value.code == 0 and "Rewrite" in capsys.readouterr().out and not (tmp_path / "model").exists()
    model_configs.main([])
    assert {p.name: p.read_text() for p in (tmp_path / "model").iterdir()} == rendered_model_configs()


@pytest.mark.parametrize("search", HPARAMS_SEARCHES)
def test_hparams_search_selects_the_arch_lab_optuna_sweeper(search: str):
    register_sweeper()  # as `python -m arch_lab` does before Hydra composes
    cfg = _compose([f"hparams_search={search}", "experiment=roadmap_step3"], return_hydra_config=True)
    sweeper = cfg.hydra.sweeper
    assert "arch_lab_optuna" in sweeper._target_
    assert sweeper.study_name == search
    assert sweeper.params, "a search needs parameters"
    assert set(OmegaConf.to_container(sweeper.directions).values()) <= {"maximize", "minimize"}
    assert sweeper.tracking_uri == cfg.logger.tracking_uri  # trials and the parent run share one MLflow store


# ------------------------------------------------------------------------------------- dev runs (subprocess)

CPU_EXPERIMENTS = [e for e in EXPERIMENTS if e not in GPU_ONLY]


@pytest.fixture(scope="module")
def dev_runs_process(tmp_path_factory: pytest.TempPathFactory):
    """One fast dev run (one training batch, then the whole evaluation) per CPU experiment, as one Hydra
    multirun: each job is its own MLflow run, and the process pays Python/Lightning start-up only once."""
    workdir = tmp_path_factory.mktemp("dev_runs")
    proc = start_lab(["-m", f"experiment={','.join(CPU_EXPERIMENTS)}", "trainer.fast_dev_run=true", *TINY,
                      f"hydra.sweep.dir={workdir / 'multirun'}"], workdir)
    yield proc, workdir
    if proc.poll() is None:
        proc.kill()
        proc.wait()


@pytest.fixture(scope="module")
def dev_runs(dev_runs_process) -> dict[str, Any]:
    proc, workdir = dev_runs_process
    assert proc.wait(timeout=600) == 0, (workdir / "lab.log").read_text()[-6000:]
    runs = {run.data.tags["row"]: run for run in lab_runs(workdir)}
    assert len(runs) == len(CPU_EXPERIMENTS), "one MLflow run per job"
    return runs


@pytest.mark.skipif(torch.cuda.is_available(), reason="checks the CPU refusal of a GPU-only experiment")
def test_gpu_only_experiment_refuses_cpu_before_opening_a_run(tmp_path: Path, dev_runs_process):
    # dev_runs_process: the dev runs start first and use the second core meanwhile.
    proc = run_lab(["experiment=roadmap_step4"], tmp_path, check=False)
    assert proc.returncode != 0
    assert error_messages(proc) == [
        "model=hymba_1_5b is GPU-only (experiment sets gpu_only=true) and no "
        "CUDA device is visible"]
    assert lab_runs(tmp_path) == []  # refused before MLflow opened a run: nothing left RUNNING


def test_unknown_scan_kernel_is_refused_before_opening_a_run(tmp_path: Path, dev_runs_process):
    proc = run_lab(["scan_kernel=cuda", *TINY], tmp_path, check=False)
    assert proc.returncode != 0
    assert error_messages(proc) == [
        "scan_kernel must be one of ['mamba_ssm', 'triton'], got 'cuda'"]
    assert lab_runs(tmp_path) == []


@pytest.mark.parametrize("experiment", CPU_EXPERIMENTS)
def test_cpu_experiment_dev_run_finishes_with_recall_logged(experiment: str, dev_runs):
    runs = dev_runs
    name, row, structure = ROADMAP[experiment]
    run = runs[row]
    assert run.info.status == "FINISHED"
    assert run.data.params["model.name"] == name
    assert {key: run.data.params[f"model.{key}"] for key in structure} == {k: str(v) for k, v in structure.items()}
    assert run.data.params["trainer.fast_dev_run"] == "True"
    assert {f"recall/mqar_acc_kv{k}" for k in (1, 2, 4, 8)} <= set(run.data.metrics)
    # the whole test set was evaluated (fast_dev_run limits training only): overall = query-weighted slices
    assert run.data.metrics["recall/mqar_acc"] == pytest.approx(mqar_acc_from_slices(run), abs=1e-9)


@pytest.mark.parametrize("name", sorted(p.stem for p in (CONF_DIR / "data").glob("mqar*.yaml")))
def test_mqar_data_config_builds_its_task(name: str):
    """Every MQAR config (the CPU default, Zoology's scale, the GPU study's) yields its stated task: each example has
    one supervised answer per key-value pair, answers come from the value half of its vocabulary, and the training
    and test mixtures hold exactly the configured slices."""
    from arch_lab.data_factory import build_datamodule

    cfg = OmegaConf.to_container(OmegaConf.load(CONF_DIR / "data" / f"{name}.yaml"))
    slices = {"train": cfg["num_kv_pairs_train"], "test": cfg["num_kv_pairs_test"]}
    cfg.update(train_examples=2 * cfg["batch_size"], test_examples=10 * len(slices["test"]))  # small, full batches
    datamodule = build_datamodule(cfg, seed=0, tokenizer=None)
    datamodule.setup("fit")
    for split, loader in (("train", datamodule.train_dataloader()), ("test", datamodule.test_dataloader())):
        batches = list(loader)
        ids = torch.cat([b["input_ids"] for b in batches])
        labels = torch.cat([b["labels"] for b in batches])
        pairs = torch.cat([b["num_kv_pairs"] for b in batches])
        assert ids.shape[1] == cfg["seq_len"] and int(ids.max()) < cfg["vocab_size"]
        assert sorted(set(pairs.tolist())) == sorted(slices[split])
        assert ((labels != -100).sum(1) == pairs).all()
        answers = labels[labels != -100]
        assert int(answers.min()) >= cfg["vocab_size"] // 2 and int(answers.max()) < cfg["vocab_size"]


def test_a_lab_sweep_completes_its_trials_with_every_objective(tmp_path: Path):
    """The fusion search optimises params/total, which a run logs at its start: it must be among what the run
    returns to the sweeper too (it was not, and every trial failed)."""
    import optuna

    proc = run_lab(["-m", "hparams_search=fusion", "experiment=roadmap_step3", *TINY, "eval.analysis.enabled=false",
                    f"hydra.sweep.dir={tmp_path / 'multirun'}"], tmp_path)
    assert "fusion: FINISHED; 2 complete, 0 pruned, 0 failed of 2" in proc.stdout + proc.stderr
    study = optuna.load_study(study_name="fusion", storage=f"sqlite:///{tmp_path / 'optuna.db'}")
    assert sorted(t.params["model.fusion"] for t in study.trials) == ["concat", "mean"]
    assert all(t.state == optuna.trial.TrialState.COMPLETE and len(t.values) == 2 for t in study.trials)
