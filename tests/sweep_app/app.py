"""A tiny Hydra task for tests/test_sweep.py, following the task contract of `arch_lab.sweep`.

Its metrics are closed-form functions of the sampled values (nothing is trained); knobs in
conf/config.yaml make chosen trials raise, return NaN, drop a metric, get pruned or sleep.
"""

import math
import time

import hydra
from omegaconf import DictConfig

from arch_lab.sweep import current_trial, register_sweeper, start_run_for_job


def metrics(cfg: DictConfig) -> dict[str, float]:
    return {
        "loss": (cfg.x - 0.5) ** 2 + (cfg.y + 0.25) ** 2,
        "quality": cfg.model.n_heads / 16 - (math.log10(cfg.optim.lr) + 3) ** 2,
        "cost": cfg.model.n_heads * cfg.model.window / 1024,
        "size": cfg.model.n_heads + 1.0,
    }


register_sweeper()  # `-m hparams_search=...` uses arch_lab's Optuna sweeper


@hydra.main(version_base="1.3", config_path="conf", config_name="config")
def main(cfg: DictConfig) -> dict[str, float]:
    import mlflow  # here, not at the top: config errors are reported without paying its import

    trial = current_trial()
    number = trial.number if trial is not None else None
    knobs = cfg.knobs

    def hit(knob_trial: int | None) -> bool:
        return number is not None and number == knob_trial

    with start_run_for_job(experiment_name="sweep_app"):
        values = metrics(cfg)
        for step in range(cfg.steps):
            # The same learning curve for every trial, so that only the knob's trial is ever pruned.
            intermediate = 1e6 if hit(knobs.bad_intermediate_if_trial) else float(cfg.steps - step)
            mlflow.log_metric("intermediate", intermediate, step=step)
            if trial is not None:
                trial.report(intermediate, step)
        if hit(knobs.sleep_if_trial):
            time.sleep(knobs.sleep_s)
        if hit(knobs.fail_if_trial):
            raise RuntimeError("injected failure")
        if hit(knobs.nan_if_trial):
            values = {name: float("nan") for name in values}
        if hit(knobs.drop_metric_if_trial):
            del values["loss"]
        mlflow.log_metrics(values)
        return values


if __name__ == "__main__":
    main()
