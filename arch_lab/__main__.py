"""`python -m arch_lab [overrides]`: train, evaluate and log one run (or a sweep with -m)."""
import logging
import os
from pathlib import Path

import hydra
from omegaconf import DictConfig

from arch_lab.sweep import register_sweeper

register_sweeper()  # `-m hparams_search=...` uses arch_lab's Optuna sweeper
log = logging.getLogger("arch_lab")


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from arch_lab.train import train
    from components.config import ConfigError

    output_dir = HydraConfig.get().runtime.output_dir
    try:
        metrics = train(cfg, output_dir=output_dir)
    except (KeyboardInterrupt, SIGTERMException) as stop:  # Lightning turns a SIGTERM in fit into SystemExit(0)
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise  # the sweeper marks the trial and its study's parent run KILLED
        last = Path(output_dir) / "checkpoints" / "last.ckpt"
        resume = f"; resume with ckpt_path='{last}'" if last.is_file() else ""
        sigterm = isinstance(stop, SIGTERMException) or "signal 15" in str(stop)
        log.error("interrupted (%s): the MLflow run ended KILLED%s", "SIGTERM" if sigterm else stop, resume)
        raise SystemExit(143 if sigterm else 130) from None  # the shell's codes for them, without a traceback
    except (ConfigError, FloatingPointError) as error:  # a bad value's key, or a diverged loss's step, is the news
        if HydraConfig.get().mode == RunMode.MULTIRUN or os.environ.get("HYDRA_FULL_ERROR") == "1":
            raise  # the sweeper records the trial's reason
        log.error("%s", error)
        raise SystemExit(1) from None  # as Hydra's own override errors
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


if __name__ == "__main__":
    main()
