"""Training curves of MLflow runs side by side: `python -m arch_lab.compare_runs [--tracking-uri URI] RUN [RUN ...]`.

A RUN is a run id, or `tag=value` naming the one run of the experiment with that tag (e.g. `case=ddp`). Prints the
metric (`--key`, default train/loss) of every run at every step any of them logged it, the largest absolute
difference of each later run from the first over the steps both logged, and for each run its first and last value,
training throughput and peak GPU memory. With `--tolerance T` the exit status is 1 when a difference exceeds T (or
no step is shared). `--tracking-uri` defaults to sqlite:///mlruns.db and `--experiment` (where tag=value selectors
look) to the lab's (logger.experiment_name), as for report.

    python -m arch_lab.compare_runs --tracking-uri sqlite:///ddp.db case=single case=ddp --tolerance 0.05
"""
from __future__ import annotations

import argparse
import math
import sys
from typing import Optional, Sequence

from .tracking import existing_store, lab_experiment

SUMMARY_KEYS = ("train/tokens_per_s", "train/peak_gpu_mem_gb")


def find_run(client, experiment_name: str, ref: str):
    from mlflow.exceptions import MlflowException

    if "=" not in ref:
        try:
            return client.get_run(ref)
        except MlflowException as error:
            if error.error_code != "RESOURCE_DOES_NOT_EXIST":  # e.g. a server that does not answer: MLflow's words
                raise
            raise SystemExit(f"{ref}: no run with that id in this store (or name one by tag, e.g. case=ddp)") from None
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise SystemExit(f"no MLflow experiment {experiment_name!r}")
    key, value = ref.split("=", 1)
    runs = client.search_runs([experiment.experiment_id], filter_string=f"tags.`{key}` = '{value}'")
    if not runs:
        raise SystemExit(f"{ref}: no run of experiment {experiment_name!r} has that tag")
    if len(runs) > 1:  # say which, so that one can be named by its id
        listed = ", ".join(f"{run.info.run_name} {run.info.run_id}" for run in runs[:5])
        raise SystemExit(f"{ref}: {len(runs)} runs have that tag ({listed}{', ...' if len(runs) > 5 else ''}); "
                         f"name one by its run id, or by a tag only it has")
    return runs[0]


def curve(client, run_id: str, key: str) -> dict[int, float]:
    """{step: value}; a step logged twice keeps its latest value."""
    return {m.step: m.value for m in sorted(client.get_metric_history(run_id, key), key=lambda m: m.timestamp)}


def max_abs_difference(a: dict[int, float], b: dict[int, float]) -> Optional[float]:
    shared = sorted(set(a) & set(b))
    return max(abs(a[s] - b[s]) for s in shared) if shared else None


def _check_key(runs, curves: list[dict[int, float]], key: str) -> None:
    """A key no run logged is a typo (or the wrong runs): say which keys they have rather than compare nothing."""
    if not any(curves):
        logged = sorted(set().union(*(run.data.metrics for run in runs)))
        raise SystemExit(f"--key {key}: none of these runs logged it; their metric keys: {', '.join(logged)}")


def compare(tracking_uri: str, refs: Sequence[str], key: str = "train/loss", experiment_name: Optional[str] = None,
            every: int = 1) -> list[Optional[float]]:
    """Print the comparison; returns the largest difference of each run after the first from the first."""
    from mlflow import MlflowClient

    client = MlflowClient(tracking_uri)
    runs = [find_run(client, experiment_name or lab_experiment(), ref) for ref in refs]
    curves = [curve(client, run.info.run_id, key) for run in runs]
    _check_key(runs, curves, key)
    steps = sorted(set().union(*curves))
    width = max(12, *(len(ref) for ref in refs))
    print(f"{key} by step\n{'step':>6} " + " ".join(f"{ref:>{width}}" for ref in refs))
    for i, step in enumerate(steps):
        if i % every == 0 or i == len(steps) - 1:
            print(f"{step:>6} " + " ".join(f"{c[step]:>{width}.6f}" if step in c else " " * (width - 1) + "-"
                                           for c in curves))
    diffs = [max_abs_difference(curves[0], c) for c in curves[1:]]
    for ref, diff in zip(refs[1:], diffs):
        print(f"max |{ref} - {refs[0]}| over shared steps: " + ("no shared step" if diff is None else f"{diff:.3g}"))
    for ref, run, c in zip(refs, runs, curves):
        found = {k: v for k, v in run.data.metrics.items() if k.startswith(SUMMARY_KEYS)}
        ends = f"{key} {c[min(c)]:.4f} (step {min(c)}) -> {c[max(c)]:.4f} (step {max(c)})" if c else f"no {key}"
        named = [run.info.run_name] + ([run.info.run_id] if ref != run.info.run_id else [])
        print(f"{ref} ({', '.join(named)}, {run.info.status}): {ends}; "
              + (", ".join(f"{k}={v:.4g}" for k, v in sorted(found.items())) or "no throughput metrics"))
    return diffs


def positive_int(text: str) -> int:
    if not text.strip().isdigit() or int(text) < 1:
        raise argparse.ArgumentTypeError(f"must be an integer >= 1, got {text}")
    return int(text)


def non_negative_float(text: str) -> float:
    """--tolerance: no difference is within a negative one (or nan), and text that is no number is named alike."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not value >= 0:
        raise argparse.ArgumentTypeError(f"must be a number >= 0, got {text}")
    return value


def main(argv: Optional[Sequence[str]] = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arch_lab.compare_runs", description=__doc__.split("\n")[0])
    parser.add_argument("--tracking-uri", default="sqlite:///mlruns.db", help="default: %(default)s")
    parser.add_argument("runs", nargs="+", help="run ids or tag=value selectors")
    parser.add_argument("--key", default="train/loss")
    parser.add_argument("--experiment", default=lab_experiment(), help="default: %(default)s")
    parser.add_argument("--every", type=positive_int, default=1, help="print every n-th step (the last always)")
    parser.add_argument("--tolerance", type=non_negative_float, default=None)
    args = parser.parse_args(argv)
    stores = [ref for ref in args.runs if "://" in ref]
    if stores:  # the store used to be the first positional argument
        parser.error(f"{stores[0]} is a store, not a run: give it as --tracking-uri {stores[0]}")
    diffs = compare(existing_store(args.tracking_uri, "--tracking-uri"), args.runs, args.key, args.experiment,
                    args.every)
    if args.tolerance is None:
        return 0
    ok = all(d is not None and not math.isnan(d) and d <= args.tolerance for d in diffs)
    print(f"{'PASS' if ok else 'FAIL'}: curves within {args.tolerance} of {args.runs[0]}")
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
