"""`python -m arch_lab [overrides]`: train, evaluate and log one run (or a sweep with -m)."""
import logging
from pathlib import Path

import hydra
from omegaconf import DictConfig, OmegaConf

from arch_lab.sweep import current_trial, register_sweeper

register_sweeper()  # `-m hparams_search=...` uses arch_lab's Optuna sweeper
log = logging.getLogger("arch_lab")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from arch_lab.checkpoints import resume_hint
    from arch_lab.errors import exit_with_message, failed_job
    from arch_lab.interrupts import InterruptedBeforeRun, interrupt_exit_status, is_interrupt
    from arch_lab.train import train
    from components.config import ConfigError

    output_dir = HydraConfig.get().runtime.output_dir
    search = HydraConfig.get().runtime.choices.get("hparams_search")
    try:
        if search and HydraConfig.get().mode == RunMode.RUN:  # it would quietly be one run with the study's settings
            raise ConfigError(f"hparams_search={search} is an Optuna study: run it with -m "
                              f"(python -m arch_lab -m hparams_search={search} ...)")
        metrics = train(cfg, output_dir=output_dir)
    except (KeyboardInterrupt, SystemExit) as stop:  # in fit, Lightning turns a SIGTERM and a second Ctrl-C into these
        if current_trial() is not None or not is_interrupt(stop):
            raise  # the sweeper marks the trial and its study's parent run KILLED
        resume = resume_hint(Path(output_dir) / "checkpoints" / "last.ckpt",
                             OmegaConf.to_container(cfg.trainer, resolve=True))
        status = interrupt_exit_status(stop)
        outcome = "before the MLflow run opened" if isinstance(stop, InterruptedBeforeRun) else \
            f"the MLflow run ended KILLED{resume}"
        multirun = HydraConfig.get().mode == RunMode.MULTIRUN
        job, rest = (f"job {HydraConfig.get().job.num}: ", "; the jobs after it do not run") if multirun else ("", "")
        log.error("interrupted (%s): %s%s%s", "SIGTERM" if status == 143 else "Ctrl-C", job, outcome, rest)
        raise SystemExit(status) from None  # the shell's codes, no traceback; a multirun's later jobs do not run
    except (ConfigError, FloatingPointError) as error:  # a bad value's key, or a diverged loss's step, is the news
        if current_trial() is not None:
            raise  # the sweeper records the trial's reason
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise failed_job(log, error)  # the other jobs still run; Hydra raises it once they have
        exit_with_message(log, error)
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


if __name__ == "__main__":
    main()
