"""A study's Pareto front (its best trials, for one objective) as a table and a scatter plot.

The plot follows Fig. 1 of the Hymba paper (Dong et al. 2024), which puts accuracy against
throughput with cache size as the point size: objective 1 is x, objective 2 is y and objective
3, when there is one, sets the point size. With one objective it plots value against trial number.
"""

from __future__ import annotations

import csv
import tempfile
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Mapping, Sequence

import optuna
import pandas as pd
from optuna.trial import FrozenTrial, TrialState

FRONT_DIR = "pareto"
FRONT_CSV = "pareto_front.csv"
FRONT_TABLE = "pareto_front.json"
FRONT_PNG = "pareto_front.png"
_SIZE_RANGE = (30.0, 400.0)


@dataclass(frozen=True)
class Objective:
    name: str
    direction: str  # "maximize" | "minimize"


def front_trials(study: optuna.Study) -> list[FrozenTrial]:
    """COMPLETE trials no other COMPLETE trial dominates, by trial number."""
    return sorted(study.best_trials, key=lambda trial: trial.number)


def front_table(
    trials: Sequence[FrozenTrial], objectives: Sequence[Objective], run_ids: Mapping[int, str]
) -> dict[str, list[Any]]:
    """Columns: trial, one per objective, params.<name> for every sampled name, mlflow_run_id."""
    param_names = sorted({name for trial in trials for name in trial.params})
    table: dict[str, list[Any]] = {"trial": [trial.number for trial in trials]}
    for index, objective in enumerate(objectives):
        table[objective.name] = [trial.values[index] for trial in trials]
    for name in param_names:
        table[f"params.{name}"] = [trial.params.get(name) for trial in trials]
    table["mlflow_run_id"] = [run_ids.get(trial.number, "") for trial in trials]
    return table


def describe_trial(trial: FrozenTrial, objectives: Sequence[Objective]) -> str:
    """One line for the console: "#3 model.n_heads=4: recall/mqar_acc=0.41, cache/mb_16k=9.45"."""
    params = ", ".join(f"{name}={value}" for name, value in sorted(trial.params.items()))
    values = ", ".join(f"{o.name}={value:.4g}" for o, value in zip(objectives, trial.values))
    return f"#{trial.number} {params or '(no params)'}: {values}"


def write_csv(table: Mapping[str, Sequence[Any]], path: Path) -> None:
    columns = list(table)
    rows = zip(*(table[column] for column in columns))
    with open(path, "w", newline="") as handle:
        writer = csv.writer(handle)
        writer.writerow(columns)
        writer.writerows(rows)


def plot_front(
    complete: Sequence[FrozenTrial], front: Sequence[FrozenTrial], objectives: Sequence[Objective], path: Path
) -> None:
    """Scatter of every COMPLETE trial, the front highlighted and labelled with trial numbers."""
    # Figure + Agg canvas directly: no pyplot, so the process-wide backend is left alone.
    from matplotlib.backends.backend_agg import FigureCanvasAgg
    from matplotlib.figure import Figure

    figure = Figure(figsize=(6.4, 4.8), dpi=120)
    FigureCanvasAgg(figure)
    axes = figure.add_subplot()
    front_numbers = {trial.number for trial in front}
    rest = [trial for trial in complete if trial.number not in front_numbers]

    if len(objectives) == 1:
        def coordinates(trials: Sequence[FrozenTrial]) -> tuple[list[float], list[float]]:
            return [t.number for t in trials], [t.values[0] for t in trials]

        axes.set_xlabel("trial")
        axes.set_ylabel(_label(objectives[0]))
    else:
        def coordinates(trials: Sequence[FrozenTrial]) -> tuple[list[float], list[float]]:
            return [t.values[0] for t in trials], [t.values[1] for t in trials]

        axes.set_xlabel(_label(objectives[0]))
        axes.set_ylabel(_label(objectives[1]))

    sizes = _point_sizes(complete, objectives)
    x, y = coordinates(rest)
    axes.scatter(x, y, s=[sizes[t.number] for t in rest], c="0.7", alpha=0.7, label="trials")
    x, y = coordinates(front)
    axes.scatter(x, y, s=[sizes[t.number] for t in front], c="tab:red", alpha=0.85, label="Pareto front")
    for trial, x_value, y_value in zip(front, x, y):
        axes.annotate(str(trial.number), (x_value, y_value), textcoords="offset points", xytext=(5, 5), fontsize=8)
    title = "best trial" if len(objectives) == 1 else "Pareto front"
    if len(objectives) >= 3:
        title += f" (point size: {objectives[2].name})"
    axes.set_title(title)
    legend = axes.legend(loc="best", fontsize=8)
    for handle in legend.legend_handles:
        handle.set_sizes([40.0])  # legend markers stay readable whatever the size objective is
    axes.grid(alpha=0.3)
    figure.tight_layout()
    figure.savefig(path)


def log_front(
    client: Any, run_id: str, study: optuna.Study, objectives: Sequence[Objective], run_ids: Mapping[int, str]
) -> list[FrozenTrial]:
    """Log the front as CSV, as an MLflow table and as a PNG on `run_id`; returns the front."""
    front = front_trials(study)
    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    table = front_table(front, objectives, run_ids)
    logged_before = f"{FRONT_DIR}/{FRONT_TABLE}" in {f.path for f in client.list_artifacts(run_id, FRONT_DIR)}
    with tempfile.TemporaryDirectory() as tmp:
        write_csv(table, Path(tmp) / FRONT_CSV)
        plot_front(complete, front, objectives, Path(tmp) / FRONT_PNG)
        client.log_artifact(run_id, str(Path(tmp) / FRONT_CSV), FRONT_DIR)
        client.log_artifact(run_id, str(Path(tmp) / FRONT_PNG), FRONT_DIR)
        if logged_before:  # a resumed study: log_table would append this front to the one logged before
            pd.DataFrame(table).to_json(Path(tmp) / FRONT_TABLE, orient="split", index=False)  # log_table's format
            client.log_artifact(run_id, str(Path(tmp) / FRONT_TABLE), FRONT_DIR)
    if not logged_before:
        client.log_table(run_id, data=table, artifact_file=f"{FRONT_DIR}/{FRONT_TABLE}")  # shown as a table by the UI
    return front


def _label(objective: Objective) -> str:
    better = "higher" if objective.direction == "maximize" else "lower"
    return f"{objective.name} ({better} is better)"


def _point_sizes(trials: Sequence[FrozenTrial], objectives: Sequence[Objective]) -> dict[int, float]:
    if len(objectives) < 3 or not trials:
        return {trial.number: 60.0 for trial in trials}
    values = [trial.values[2] for trial in trials]
    low, high = min(values), max(values)
    span = (high - low) or 1.0
    smallest, largest = _SIZE_RANGE
    return {t.number: smallest + (t.values[2] - low) / span * (largest - smallest) for t in trials}
