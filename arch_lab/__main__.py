"""`python -m arch_lab [overrides]`: train, evaluate and log one run (or a sweep with -m)."""
import hydra
from omegaconf import DictConfig

from arch_lab.sweep import register_sweeper

register_sweeper()  # `-m hparams_search=...` uses arch_lab's Optuna sweeper


@hydra.main(version_base="1.3", config_path="../conf", config_name="train")
def main(cfg: DictConfig):
    from hydra.core.hydra_config import HydraConfig

    from arch_lab.train import train

    metrics = train(cfg, output_dir=HydraConfig.get().runtime.output_dir)
    return {k: v for k, v in metrics.items() if isinstance(v, (int, float))}


if __name__ == "__main__":
    main()
