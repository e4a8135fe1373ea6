"""Pool the runs of several MLflow stores into one, so a study trained in parallel opens in one MLflow UI.

Parallel runs each keep their own SQLite store (SQLite takes one writer at a time); the UI shows one store. This
copies every run of an experiment (tags, params, full metric histories, status, times, artifacts where the source
still has them) into the destination, keeping sweep trials nested under their parent run:

    python -m arch_lab.merge_stores --from sqlite:///stores/a.db sqlite:///stores/b.db --to sqlite:///study.db
    mlflow ui --backend-store-uri sqlite:///study.db        # binds 127.0.0.1

Merging again adds nothing twice: a copied run carries the tag `arch_lab.source_run` once its copy is complete, and
runs already copied are skipped. A copy cut short (an error, Ctrl-C) is deleted; one left by a killed merge still
carries the tag `arch_lab.copying`, and the next merge deletes it and copies its run again. Stores are MLflow
tracking URIs (a SQLite file is `sqlite:///mlruns.db`, not `mlruns.db`); the destination must not be one of the
sources. The experiment defaults to the lab's (`logger.experiment_name` in
conf/logger/mlflow.yaml); the roadmap study scripts log to `--experiment roadmap`.
"""
from __future__ import annotations

import argparse
import os
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator, Sequence

from .tracking import RESUMED_FROM_TAG, check_sqlite_store, existing_store, lab_experiment, sqlite_path

SOURCE_TAG = "arch_lab.source_run"
COPYING_TAG = "arch_lab.copying"  # on a copy while it is made: one that still has it was cut short
PARENT_TAG = "mlflow.parentRunId"
_PARAMS_PER_BATCH, _METRICS_PER_BATCH = 100, 1000  # MLflow's log_batch limits


def _all_runs(client, experiment_id: str) -> list:
    from mlflow.entities import ViewType

    runs, token = [], None
    while True:
        page = client.search_runs([experiment_id], run_view_type=ViewType.ALL, max_results=1000, page_token=token)
        runs.extend(page)
        token = page.token
        if not token:
            return runs


def _copy_run(source, dest, run, experiment_id: str, parent: str | None) -> str:
    """The copy's id. It is marked copied (SOURCE_TAG) only once complete; a copy cut short by an error or Ctrl-C
    is deleted, since the next merge would otherwise never finish it."""
    tags = {k: v for k, v in run.data.tags.items() if k not in (PARENT_TAG, SOURCE_TAG, COPYING_TAG)}
    tags[COPYING_TAG] = run.info.run_id
    if parent is not None:
        tags[PARENT_TAG] = parent
    new_id = dest.create_run(experiment_id, start_time=run.info.start_time, tags=tags,
                             run_name=run.info.run_name).info.run_id
    try:
        _copy_contents(source, dest, run, new_id)
        dest.set_terminated(new_id, status=run.info.status, end_time=run.info.end_time)
        dest.set_tag(new_id, SOURCE_TAG, run.info.run_id)
        dest.delete_tag(new_id, COPYING_TAG)
    except BaseException:
        dest.delete_run(new_id)
        raise
    return new_id


def _copy_contents(source, dest, run, new_id: str) -> None:
    """Params, full metric histories and artifacts of `run` into the run `new_id`."""
    from mlflow.entities import Metric, Param

    params = [Param(k, v) for k, v in run.data.params.items()]
    for i in range(0, len(params), _PARAMS_PER_BATCH):
        dest.log_batch(new_id, params=params[i:i + _PARAMS_PER_BATCH])
    metrics = [Metric(m.key, m.value, m.timestamp, m.step) for key in run.data.metrics
               for m in source.get_metric_history(run.info.run_id, key)]
    for i in range(0, len(metrics), _METRICS_PER_BATCH):
        dest.log_batch(new_id, metrics=metrics[i:i + _METRICS_PER_BATCH])
    if source.list_artifacts(run.info.run_id):
        with tempfile.TemporaryDirectory() as tmp:
            dest.log_artifacts(new_id, source.download_artifacts(run.info.run_id, "", tmp))


@contextmanager
def _no_artifact_progress_bars() -> Iterator[None]:
    """MLflow draws a "Downloading artifacts" bar for every run copied: noise when merging hundreds of runs."""
    name = "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR"
    before = os.environ.get(name)
    os.environ[name] = "false"
    try:
        yield
    finally:
        if before is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = before


def _source_experiments(sources: Sequence[str], experiment: str) -> list[tuple[object, str]]:
    """(client, experiment id) of every source: all are checked before the destination is opened, since opening
    a SQLite store creates its file."""
    from mlflow import MlflowClient

    found = []
    for uri in sources:
        source = MlflowClient(uri)
        exp = source.get_experiment_by_name(experiment)
        if exp is None:
            raise SystemExit(f"--from {uri}: no MLflow experiment {experiment!r} in this store")
        found.append((source, exp.experiment_id))
    return found


def merge_stores(sources: Sequence[str], destination: str, experiment: str) -> int:
    """Copy `experiment`'s runs from every source store into `destination`; returns how many runs were copied."""
    from mlflow import MlflowClient

    found = _source_experiments(sources, experiment)
    dest = MlflowClient(destination)
    target = dest.get_experiment_by_name(experiment)
    experiment_id = target.experiment_id if target else dest.create_experiment(experiment)
    done = {}
    for run in _all_runs(dest, experiment_id):
        if COPYING_TAG in run.data.tags:  # left by a merge that was killed while copying it: copied again below
            if run.info.lifecycle_stage == "active":
                dest.delete_run(run.info.run_id)
        elif SOURCE_TAG in run.data.tags:
            done[run.data.tags[SOURCE_TAG]] = run.info.run_id
    copied = 0
    with _no_artifact_progress_bars():
        for source, source_experiment in found:
            # Parents before their trials, so each trial can point at its parent's new id.
            for run in sorted(_all_runs(source, source_experiment), key=lambda r: PARENT_TAG in r.data.tags):
                if run.info.run_id in done:
                    continue
                parent = run.data.tags.get(PARENT_TAG)
                done[run.info.run_id] = _copy_run(source, dest, run, experiment_id, done.get(parent, parent))
                copied += 1
    # A resumed run names the run it resumed, whose copy here has a new id (and may come from a later source).
    for run in _all_runs(dest, experiment_id):
        origin = run.data.tags.get(RESUMED_FROM_TAG)
        if origin in done and run.info.lifecycle_stage == "active":  # MLflow refuses tags on deleted runs
            dest.set_tag(run.info.run_id, RESUMED_FROM_TAG, done[origin])
    return copied


def _store_file(uri: str) -> Path | None:
    """The file or directory a local store URI names, resolved (None for servers and other databases)."""
    if uri.startswith("sqlite:"):
        path = sqlite_path(uri)
    elif uri.startswith("file://"):
        path = Path(uri.removeprefix("file://"))
    else:
        path = Path(uri) if "://" not in uri else None
    return path.resolve() if path is not None else None


def _check_uri(parser: argparse.ArgumentParser, flag: str, uri: str) -> None:
    """A bare SQLite file name is refused: MLflow would take it for a file store (a directory) and fail, or, as
    --to, create a directory of that name."""
    if "://" not in uri and (Path(uri).is_file() or uri.endswith(".db")):
        parser.error(f"{flag} {uri}: expected an MLflow store URI, e.g. sqlite:///{uri} for a SQLite file")


def _check_arguments(parser: argparse.ArgumentParser, args: argparse.Namespace) -> None:
    for uri in args.sources:
        _check_uri(parser, "--from", uri)
    _check_uri(parser, "--to", args.destination)
    dest = _store_file(args.destination)
    same = [uri for uri in args.sources if dest is not None and _store_file(uri) == dest]
    if same:
        parser.error(f"--to {args.destination}: the same store as --from {same[0]}, whose runs would be copied into "
                     "it again on every call; give another store (a new file is fine)")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arch_lab.merge_stores", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--from", dest="sources", nargs="+", required=True, help="source tracking URIs")
    parser.add_argument("--to", dest="destination", required=True, help="destination tracking URI")
    parser.add_argument("--experiment", default=lab_experiment(),
                        help="the experiment to copy (default: %(default)s, the lab's; the roadmap study: roadmap)")
    args = parser.parse_args(argv)
    _check_arguments(parser, args)
    sources = [existing_store(uri, "--from") for uri in args.sources]
    check_sqlite_store(args.destination, "--to", empty_ok=True)  # a new store is made in an empty file
    copied = merge_stores(sources, args.destination, args.experiment)
    print(f"copied {copied} run(s) of experiment {args.experiment!r} into {args.destination}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
