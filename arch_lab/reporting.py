"""Plots logged as MLflow artifacts with every run: training curves, recall by slice/depth, attention maps."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .evaluation.plots import plot_attention_map  # noqa: E402


def _metric_history(run_id: str, key: str) -> tuple[list[int], list[float]]:
    from mlflow.tracking import MlflowClient

    history = sorted(MlflowClient().get_metric_history(run_id, key), key=lambda m: m.step)
    return [m.step for m in history], [m.value for m in history]


def plot_training_curves(run_id: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 4))
    for key in ("train/loss", "val/loss"):
        steps, values = _metric_history(run_id, key)
        if steps:
            ax.plot(steps, values, marker="." if key.startswith("val") else None, label=key)
    ax.set_xlabel("step")
    ax.set_ylabel("cross-entropy (nats/token)")
    ax.legend()
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_bars(values: dict[str, float], title: str, xlabel: str, path: Path) -> Path:
    fig, ax = plt.subplots(figsize=(6, 3.5))
    # Bars at positions with the keys as tick labels: string x values (e.g. "1", "2") made matplotlib log that it
    # took them as categories at every run.
    ax.bar(range(len(values)), list(values.values()), color="tab:blue", tick_label=list(values))
    ax.set_ylim(0, 1)
    ax.set_ylabel("accuracy")
    ax.set_xlabel(xlabel)
    ax.set_title(title)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def _plot_attention_maps(model, datamodule, out_dir: Path) -> list[Path]:
    from components.attention_maps import collect_attention_maps

    batch = next(iter(datamodule.val_dataloader()))["input_ids"][:1, :64]
    maps = collect_attention_maps(model, batch.to(next(model.parameters()).device))
    paths = []
    for kind, by_layer in (("attention", maps.attention), ("ssm", maps.ssm)):
        for layer, probs in by_layer.items():
            head_mean = probs[0].mean(0).float().cpu()
            paths.append(plot_attention_map(head_mean, f"{kind} layer {layer} (mean over heads)",
                                            out_dir / f"{kind}_map_layer{layer}.png"))
    return paths


def log_run_plots(run_id: str, model, datamodule, data_cfg: dict[str, Any], metrics: dict[str, float],
                  out_dir: Path, attention_maps: bool = True) -> list[Path]:
    """Training curves, MQAR by slice, passkey by depth and, with `attention_maps` (eval.analysis.enabled: a
    forward pass and a plot per layer), each layer's attention map; logged under the run's plots/."""
    import mlflow

    out_dir.mkdir(parents=True, exist_ok=True)
    paths = [plot_training_curves(run_id, out_dir / "training_curves.png")]
    mqar = {k.removeprefix("recall/mqar_acc_kv"): v for k, v in metrics.items() if k.startswith("recall/mqar_acc_kv")}
    if mqar:
        paths.append(plot_bars(mqar, "MQAR accuracy by number of key-value pairs", "key-value pairs",
                               out_dir / "mqar_by_slice.png"))
    passkey = {k.removeprefix("recall/passkey_acc_depth"): v for k, v in metrics.items()
               if k.startswith("recall/passkey_acc_depth")}
    if passkey:
        paths.append(plot_bars(passkey, "Passkey retrieval by needle depth (%)", "depth (%)",
                               out_dir / "passkey_by_depth.png"))
    if attention_maps:
        paths += _plot_attention_maps(model, datamodule, out_dir)
    for p in paths:
        mlflow.log_artifact(str(p), "plots")
    return paths


