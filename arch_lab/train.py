"""One lab run: compose data + model, train with Lightning, evaluate, measure, and log it all to MLflow."""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import tempfile
from pathlib import Path
from typing import Any, Callable, Optional

import torch
from omegaconf import DictConfig, OmegaConf

from components.config import ConfigError, ModelConfig

from . import evaluate, tracking
from .data_factory import build_datamodule, build_tokenizer, data_vocab_size, tokenizer_spec
from .run_checks import check_compatible, check_inputs_exist, check_values, evaluations_on

log = logging.getLogger(__name__)


class GPURequiredError(ConfigError):
    pass


def _data_config_name(cfg: DictConfig) -> str:
    """Which data config the run composed (`data=text_gutenberg`), under Hydra; else the data's kind."""
    from hydra.core.hydra_config import HydraConfig

    choice = HydraConfig.get().runtime.choices.get("data") if HydraConfig.initialized() else None
    return choice or cfg.data.kind


def _in_multirun() -> bool:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    return HydraConfig.initialized() and HydraConfig.get().mode == RunMode.MULTIRUN


def _run_name(cfg: DictConfig, trial) -> str:
    name = str(cfg.run_name or f"{cfg.model.name}-{_data_config_name(cfg)}-s{cfg.seed}")  # run_name=2024 too
    return f"{name}-trial{trial.number}" if trial else name


def _launched_worker() -> bool:
    """True in a process that a multi-GPU launcher started as rank > 0.

    Lightning's DDP/FSDP launcher re-runs the user's command once per extra device, with LOCAL_RANK (and NODE_RANK)
    set; torchrun and SLURM-style launchers set RANK. Only the process of rank 0 tracks the run in MLflow.
    """
    return any(int(os.environ.get(key) or 0) > 0 for key in ("RANK", "LOCAL_RANK", "NODE_RANK"))


@contextlib.contextmanager
def float32_matmul_precision(cfg: DictConfig):
    """torch's float32 matmul precision set to cfg.float32_matmul_precision for a run on a CUDA GPU, and put back
    after it (other runs and tests in the process keep theirs). Left alone on a CPU, where "medium" would run
    float32 matmuls in bf16 and change the reference's results."""
    if not torch.cuda.is_available() or cfg.trainer.accelerator == "cpu":
        yield
        return
    before = torch.get_float32_matmul_precision()
    torch.set_float32_matmul_precision(cfg.float32_matmul_precision)
    try:
        yield
    finally:
        torch.set_float32_matmul_precision(before)


def _trainer_kwargs(cfg: DictConfig) -> dict[str, Any]:
    """cfg.trainer as Trainer arguments; a strategy given as a mapping with `_target_` is instantiated."""
    from hydra.utils import instantiate

    kwargs = OmegaConf.to_container(cfg.trainer, resolve=True)
    if isinstance(kwargs.get("strategy"), dict):
        kwargs["strategy"] = instantiate(cfg.trainer.strategy)
    if kwargs.pop("use_distributed_sampler", False):
        raise ConfigError("trainer.use_distributed_sampler: the datamodules shard the training data across devices "
                          "themselves (same global batches as one device); leave it unset")
    if isinstance(kwargs.get("val_check_interval"), int):
        # Count the interval in optimizer steps across epochs, as the recipes mean it: a training set shorter than
        # the interval then still validates (and checkpoints) on schedule instead of failing in Lightning.
        kwargs.setdefault("check_val_every_n_epoch", None)
    return kwargs


def _new_trainer(trainer_cfg: dict[str, Any], out: Path, logger, callbacks: list):
    """The run's Trainer, and the throwaway one its settings are checked on: built alike, so that both refuse alike."""
    import lightning as L

    from .checkpoints import AtomicCheckpointIO

    return L.Trainer(**trainer_cfg, logger=logger, callbacks=callbacks, default_root_dir=str(out),
                     plugins=[AtomicCheckpointIO()], max_epochs=-1, use_distributed_sampler=False)


def _step_checkpoint(trainer_cfg: dict[str, Any], out: Path):
    from .checkpoints import StepCheckpoint

    return StepCheckpoint(dirpath=out / "checkpoints", save_last=True, save_top_k=-1,
                          every_n_train_steps=trainer_cfg["val_check_interval"])


def _probe_trainer(cfg: DictConfig, out: Path):
    """A throwaway Trainer: Lightning's own checks of trainer.* (accelerator, devices, precision, strategy,
    max_time, a key the Trainer does not take) run on it, so that a bad value fails before the MLflow run opens;
    its world size tells how the data will be sharded."""
    from lightning.fabric.utilities.exceptions import MisconfigurationException

    device_report = logging.getLogger("lightning.pytorch.utilities.rank_zero")
    device_report.disabled = True  # "GPU available: ..." is printed by the run's own Trainer
    try:
        trainer_cfg = _trainer_kwargs(cfg)
        return _new_trainer(trainer_cfg, out, False, [_step_checkpoint(trainer_cfg, out)])
    except (MisconfigurationException, TypeError, ValueError, RuntimeError, ImportError) as error:
        # ImportError: an accelerator without its package (tpu without torch_xla)
        raise ConfigError(f"trainer: Lightning refuses these settings: {error}") from None
    finally:
        device_report.disabled = False


@dataclasses.dataclass
class _Prepared:
    """What a run builds and checks before its MLflow run opens."""

    data_cfg: dict[str, Any]
    model_cfg: dict[str, Any]
    tokenizer: Any
    passkey: Optional[list]  # the passkey prompts (text data), built up front so a bad setting fails now
    datamodule: Any
    lit: Any
    trial: Any


def _prepare(cfg: DictConfig, out: Path) -> _Prepared:
    """Every check that can fail on the run's inputs, before the run opens: a refused run leaves no FAILED run."""
    import lightning as L

    from .checkpoints import check_resumable
    from .lit_module import LitHybridLM
    from .sweep import current_trial
    from .sweep_callbacks import check_prune_metric

    if cfg.get("gpu_only") and not torch.cuda.is_available():
        raise GPURequiredError(f"model={cfg.model.name} is GPU-only (experiment sets gpu_only=true) and no CUDA "
                               f"device is visible")
    tracking.check_tracking_uri(cfg.logger.tracking_uri, "logger.tracking_uri",  # the sweeper probed a trial's server
                                probe_server=current_trial() is None and not _launched_worker())
    data_cfg = OmegaConf.to_container(cfg.data, resolve=True)
    model_cfg = OmegaConf.to_container(cfg.model, resolve=True)
    ModelConfig.from_dict(model_cfg).validate()
    check_values(cfg)
    spec = tokenizer_spec(data_cfg, out)
    tokenizer = build_tokenizer(data_cfg, spec)
    check_compatible(model_cfg, data_cfg, data_vocab_size(data_cfg, tokenizer))
    L.seed_everything(cfg.seed, workers=True)
    datamodule = build_datamodule(data_cfg, cfg.seed, tokenizer)  # names a missing corpus (under data_root) first
    check_inputs_exist(cfg, data_cfg)
    passkey = evaluate.passkey_examples(OmegaConf.to_container(cfg.eval.passkey, resolve=True), tokenizer, cfg.seed) \
        if evaluations_on(cfg)["passkey"] else None
    lit = LitHybridLM(model_cfg, OmegaConf.to_container(cfg.optim, resolve=True), cfg.backend, cfg.compile, spec,
                      cfg.scan_kernel)
    probe = _probe_trainer(cfg, out)
    check_resumable(cfg.ckpt_path, lit, datamodule, probe, OmegaConf.to_container(cfg.trainer, resolve=True))
    trial = current_trial()
    check_prune_metric(cfg.prune_metric, data_cfg["kind"], trial.directions if trial else None)
    if probe.world_size > 1 and _in_multirun():  # Lightning's launcher would re-run the whole multirun command
        raise ConfigError("trainer.devices: a multirun (-m) trains each job in one process: use a single-device "
                          "trainer (trainer=cpu or trainer=gpu) with -m")
    datamodule.setup("fit")  # the data is read, and a batch per device checked, as the run's Trainer will shard it
    datamodule.trainer = probe
    try:
        datamodule.train_dataloader()
    finally:
        datamodule.trainer = None
    if cfg.optim.warmup_steps > cfg.trainer.max_steps:  # a debug-sized run with the recipe's warmup, say
        log.warning("optim.warmup_steps=%d > trainer.max_steps=%d: the learning rate never reaches optim.lr=%g",
                    cfg.optim.warmup_steps, cfg.trainer.max_steps, cfg.optim.lr)
    if model_cfg.get("window") and model_cfg["window"] >= data_cfg["seq_len"]:  # the plan still says local(window)
        log.warning("model.window=%d >= data.seq_len=%d: the local layers see every token of a training sequence, "
                    "as the global ones do", model_cfg["window"], data_cfg["seq_len"])
    return _Prepared(data_cfg, model_cfg, tokenizer, passkey, datamodule, lit, trial)


def _model_for_evaluation(trainer, lit, model_cfg: dict[str, Any], backend: str, scan_kernel: str):
    """The trained HybridLM on rank 0's device for the final evaluation; None on the other ranks.

    After fit Lightning has moved the model to the CPU (DDP and one device). Under FSDP every rank holds a shard
    of it: all ranks take part in gathering the full weights, and rank 0 evaluates an unsharded copy.
    """
    from lightning.pytorch.strategies import FSDPStrategy

    from components.model import HybridLM

    from .checkpoints import hybrid_lm_state
    from .optim import unwrapped_name

    device = trainer.strategy.root_device
    if isinstance(trainer.strategy, FSDPStrategy):
        state = trainer.strategy.lightning_module_state_dict()  # a collective; the full weights land on rank 0
        if not trainer.is_global_zero:
            return None
        with torch.device(device):
            model = HybridLM(ModelConfig.from_dict(model_cfg))
        model.set_backend(backend, scan_kernel)
        state = {unwrapped_name(k): v for k, v in state.items()}
        model.load_state_dict(hybrid_lm_state(state))
        return model
    return lit.model.to(device) if trainer.is_global_zero else None


def train(cfg: DictConfig, output_dir: Optional[str] = None) -> dict[str, float]:
    """Run one experiment; returns every final metric (the sweeper reads its objectives from here).

    Multi-GPU (trainer.strategy=ddp/fsdp): Lightning re-runs this command for ranks > 0. Every rank trains; only
    rank 0 opens the MLflow run, logs, writes checkpoints and evaluates; the other ranks return {} after fit.
    """
    from .console import progress_bar, quiet_lightning_console
    from .interrupts import InterruptedBeforeRun, graceful_stop
    from .lit_module import DivergenceCheck, TrainingThroughput
    from .reporting import log_run_plots
    from .run_logger import OpenRunMLFlowLogger
    from .sweep import start_run_for_job
    from .sweep_callbacks import TrialPruningCallback

    quiet_lightning_console()
    out = Path(output_dir or tempfile.mkdtemp(prefix="arch_lab_"))
    try:
        prepared = _prepare(cfg, out)
    except KeyboardInterrupt:
        raise InterruptedBeforeRun() from None
    data_cfg, model_cfg, datamodule, lit = prepared.data_cfg, prepared.model_cfg, prepared.datamodule, prepared.lit
    tokenizer, trial, model = prepared.tokenizer, prepared.trial, prepared.lit.model
    tags = {"model": cfg.model.name, "data": cfg.data.kind, "data_config": _data_config_name(cfg),
            "seed": str(cfg.seed), "git_commit": tracking.git_commit(),
            tracking.PROCESS_TAG: tracking.this_process(),  # a resume marks the run KILLED if this process is gone
            "backend": cfg.backend,  # the choice; the `backends` tag says which kernels could run here
            **{str(k): str(v) for k, v in (cfg.tags or {}).items()}}
    worker = _launched_worker()
    with graceful_stop() as stopper, float32_matmul_precision(cfg):
        import mlflow

        mlflow.set_tracking_uri(cfg.logger.tracking_uri)
        run_context = contextlib.nullcontext() if worker else start_run_for_job(
            _run_name(cfg, trial), experiment_name=cfg.logger.experiment_name, tags=tags)
        with run_context as run:
            setup = {} if worker else _log_setup(cfg, model, data_cfg["seq_len"])
            logger = False if worker else OpenRunMLFlowLogger(experiment_name=cfg.logger.experiment_name,
                                                              tracking_uri=cfg.logger.tracking_uri,
                                                              run_id=run.info.run_id)
            trainer_cfg = _trainer_kwargs(cfg)
            checkpoint = _step_checkpoint(trainer_cfg, out)
            throughput = TrainingThroughput(skip=max(0, min(10, trainer_cfg["max_steps"] // 5)))
            callbacks = [checkpoint, stopper, throughput, DivergenceCheck()]
            if trial and cfg.prune_metric:
                callbacks.append(TrialPruningCallback(trial, cfg.prune_metric))
            bar = progress_bar(trainer_cfg.get("enable_progress_bar", True))
            if bar:
                callbacks.append(bar)
            trainer = _new_trainer(trainer_cfg, out, logger, callbacks)
            trainer.fit(lit, datamodule=datamodule, ckpt_path=cfg.ckpt_path)
            stopper.raise_if_requested()  # interrupted: the run ends KILLED, without evaluating a partial model
            stopper.stage = "evaluation stage"
            model = _model_for_evaluation(trainer, lit, model_cfg, cfg.backend, cfg.scan_kernel)
            if model is None:  # rank > 0: rank 0 evaluates and logs
                return {}

            def record(stage_metrics: dict[str, float]) -> None:
                # logged as each stage ends (a later stage's failure keeps them; the latest value is what the UI
                # shows), then a Ctrl-C received meanwhile ends the run KILLED
                tracking.log_metrics(stage_metrics, step=trainer.global_step)
                stopper.raise_if_requested()

            trained = {"train/final_loss": float(trainer.callback_metrics.get("train/loss", float("nan"))),
                       "train/steps": trainer.global_step,  # below trainer.max_steps when max_time stopped the run
                       **throughput.metrics()}
            record(trained)
            metrics = {**trained, **_evaluate(cfg, model, datamodule, tokenizer, data_cfg, prepared.passkey, record)}
            log_run_plots(run.info.run_id, model, datamodule, data_cfg, metrics, out / "plots",
                          attention_maps=cfg.eval.analysis.enabled)
            stopper.raise_if_requested()
            if cfg.logger.log_checkpoints and checkpoint.last_model_path:
                mlflow.log_artifact(checkpoint.last_model_path, "checkpoints")
            log.info("run %s finished: %s", run.info.run_id,
                     ", ".join(f"{k}={v:.4g}" for k, v in sorted(metrics.items()) if "/" in k and "layer" not in k))
            # the setup's metrics too (params/total, cache/mb_*): a sweep may optimise any logged metric
            return {**setup, **metrics, "mlflow_run_id": run.info.run_id, "checkpoint": checkpoint.last_model_path}


def _log_setup(cfg: DictConfig, model, seq_len: int) -> dict[str, float]:
    import mlflow

    from components.param_count import counts_of

    from .bench.flops import train_flops_per_token

    mlflow.log_params(tracking.loggable_params(cfg))
    context = mlflow.active_run().data.tags  # MLflow's own: the script's and the repository's absolute paths
    mlflow.set_tags({key: tracking.hide_absolute_path(context[key])
                     for key in ("mlflow.source.name", "mlflow.source.git.repoURL") if key in context})
    tracking.log_text_artifact(tracking.loggable_config_yaml(cfg), "config.yaml")
    tracking.log_text_artifact(model.plan.to_table(), "layer_plan.txt")
    mlflow.log_dict({"layers": model.plan.as_records()}, "layer_plan.json")
    counts = counts_of(model)
    flops = train_flops_per_token(model, seq_len)
    metrics = {**counts.as_metrics(), "train/flops_per_token": flops,
               **evaluate.cache_metrics(model, list(cfg.eval.cache_lengths))}
    mlflow.log_metrics(metrics)
    mlflow.set_tags({"params.attn_to_ssm": counts.attn_to_ssm,
                     "backends": tracking.backends_tag()})
    log.info("layer plan:\n%s", model.plan.to_table())
    log.info("parameters: %s total (attention %s, SSM %s, FFN %s, embedding %s, other %s), Attn:SSM %s; "
             "%s FLOPs a training token at length %d (forward + backward: 6N + attention + scan)",
             f"{counts.total:,}", f"{round(counts.attention):,}", f"{round(counts.ssm):,}", f"{counts.ffn:,}",
             f"{counts.embedding:,}", f"{counts.other:,}", counts.attn_to_ssm, f"{flops:.3g}", seq_len)
    return metrics


def _evaluate(cfg: DictConfig, model, datamodule, tokenizer, data_cfg: dict[str, Any], passkey: Optional[list],
              record: Callable[[dict[str, float]], None]) -> dict[str, float]:
    """The evaluations cfg.eval enables (with the passkey prompts built before training), each stage's metrics
    handed to `record` as soon as it ends."""
    from .bench.measure import measure_cached_decode

    model.eval()
    ev = cfg.eval
    metrics: dict[str, float] = {}

    def stage(what: str, compute: Callable[[], dict[str, float]]) -> None:
        log.info("evaluating: %s", what)  # some stages take minutes on a CPU (a text test set, say)
        stage_metrics = compute()
        metrics.update(stage_metrics)
        record(stage_metrics)

    device = next(model.parameters()).device
    max_batches = cfg.trainer.limit_val_batches if isinstance(cfg.trainer.limit_val_batches, int) else None
    if data_cfg["kind"] == "mqar":
        stage("validation loss", lambda: {"val/loss": evaluate.mean_loss(model, datamodule.val_dataloader(),
                                                                          max_batches)})
        if ev.mqar:
            datamodule.setup("test")
            stage("MQAR accuracy on the test set", lambda: evaluate.mqar_metrics(model, datamodule.test_dataloader()))
    else:
        if ev.perplexity:
            stage("perplexity on the validation batches and the test sets",
                  lambda: evaluate.perplexity_metrics(model, datamodule, max_batches))
        if passkey is not None:
            stage(f"passkey retrieval ({len(passkey)} prompts)", lambda: evaluate.passkey_metrics(model, passkey))
        if ev.commonsense.enabled:
            from .evaluation.lm_eval_adapter import run_commonsense_suite

            stage(f"commonsense tasks {list(ev.commonsense.tasks)}", lambda: run_commonsense_suite(
                lambda ids: model(ids.to(device)), tokenizer, list(ev.commonsense.tasks), ev.commonsense.limit,
                ev.commonsense.data_dir, max_length=cfg.model.max_seq_len, device=device))
    if ev.decode.enabled:
        stage(f"cached decoding (batch {ev.decode.batch}, context {ev.decode.context})", lambda: measure_cached_decode(
            model, ev.decode.batch, ev.decode.context, ev.decode.new_tokens).as_metrics())
    if ev.analysis.enabled:
        batch = next(iter(datamodule.val_dataloader()))["input_ids"][:2, :ev.analysis.seq_len]
        stage("attention analysis", lambda: evaluate.analysis_metrics(model, batch.to(device)))
    return metrics
