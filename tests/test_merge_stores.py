"""`python -m arch_lab.merge_stores`: runs of several SQLite stores pooled into one, histories, nesting and
artifacts kept, and nothing copied twice."""
from __future__ import annotations

import os
from pathlib import Path

import pytest

from arch_lab.merge_stores import SOURCE_TAG, main

REPO = Path(__file__).resolve().parents[1]


def _store(tmp_path, name: str) -> str:
    return f"sqlite:///{tmp_path / name}"


@pytest.fixture
def sources(tmp_path, monkeypatch):
    """Store a: one finished run with a metric history and an artifact. Store b: a sweep parent and its killed
    trial (nested by MLflow's parent tag)."""
    import mlflow

    monkeypatch.chdir(tmp_path)  # a SQLite store keeps its artifacts under ./mlruns

    a, b = _store(tmp_path, "a.db"), _store(tmp_path, "b.db")
    mlflow.set_tracking_uri(a)
    mlflow.set_experiment("roadmap")
    with mlflow.start_run(run_name="row-e", tags={"row": "E", "seed": "1"}) as run:
        mlflow.log_params({"model.window": 128, "optim.lr": 0.001})
        for step, loss in enumerate((3.0, 2.0, 1.5)):
            mlflow.log_metric("train/loss", loss, step=step)
        mlflow.log_text("layer plan", "layer_plan.txt")
    plain = run.info.run_id
    mlflow.set_tracking_uri(b)
    mlflow.set_experiment("roadmap")
    with mlflow.start_run(run_name="head_ratio", tags={"sweep.study_name": "head_ratio"}) as parent:
        with mlflow.start_run(run_name="trial-0", nested=True) as trial:
            mlflow.log_metric("recall/mqar_acc", 0.25)
            mlflow.end_run(status="KILLED")
    return {"a": a, "b": b, "plain": plain, "parent": parent.info.run_id, "trial": trial.info.run_id}


def _runs(uri: str) -> list:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    return client.search_runs([client.get_experiment_by_name("roadmap").experiment_id])


def _copies(uri: str) -> dict[str, object]:
    from mlflow import MlflowClient

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("roadmap")
    return {run.data.tags[SOURCE_TAG]: run for run in client.search_runs([experiment.experiment_id])}


def test_merge_pools_runs_with_histories_nesting_and_artifacts(tmp_path, sources, capsys):
    from mlflow import MlflowClient

    dest = _store(tmp_path, "study.db")
    assert main(["--from", sources["a"], sources["b"], "--to", dest, "--experiment", "roadmap"]) == 0
    captured = capsys.readouterr()
    assert captured.out.strip() == f"copied 3 run(s) of experiment 'roadmap' into {dest}"
    assert "Downloading artifacts" not in captured.err  # MLflow's progress bar, once per copied run
    assert "MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR" not in os.environ  # the setting is put back
    copies = _copies(dest)
    assert set(copies) == {sources["plain"], sources["parent"], sources["trial"]}

    client = MlflowClient(dest)
    plain = copies[sources["plain"]]
    assert plain.info.run_name == "row-e" and plain.info.status == "FINISHED"
    assert {k: plain.data.tags[k] for k in ("row", "seed")} == {"row": "E", "seed": "1"}
    assert plain.data.params == {"model.window": "128", "optim.lr": "0.001"}
    history = sorted((m.step, m.value) for m in client.get_metric_history(plain.info.run_id, "train/loss"))
    assert history == [(0, 3.0), (1, 2.0), (2, 1.5)]
    assert [f.path for f in client.list_artifacts(plain.info.run_id)] == ["layer_plan.txt"]

    trial = copies[sources["trial"]]
    assert trial.info.status == "KILLED"
    assert trial.data.tags["mlflow.parentRunId"] == copies[sources["parent"]].info.run_id  # the new parent's id


def test_merging_again_copies_nothing_twice(tmp_path, sources, capsys):
    dest = _store(tmp_path, "study.db")
    main(["--from", sources["a"], "--to", dest, "--experiment", "roadmap"])
    main(["--from", sources["a"], sources["b"], "--to", dest, "--experiment", "roadmap"])
    assert capsys.readouterr().out.splitlines()[-1].startswith("copied 2 run(s)")
    assert len(_copies(dest)) == 3


def test_a_store_without_the_experiment_is_named_before_the_destination_is_made(tmp_path, sources):
    with pytest.raises(SystemExit, match=r"^--from .*b\.db: no MLflow experiment 'study' in this store$"):
        main(["--from", sources["b"], "--to", _store(tmp_path, "study.db"), "--experiment", "study"])
    assert not (tmp_path / "study.db").exists()


def test_the_default_experiment_is_the_labs(tmp_path, sources):
    """`python -m arch_lab` logs to logger.experiment_name (arch_lab); the fixture's runs are in 'roadmap'."""
    from omegaconf import OmegaConf

    from arch_lab.tracking import lab_experiment

    assert lab_experiment() == OmegaConf.load(REPO / "conf/logger/mlflow.yaml").experiment_name == "arch_lab"
    with pytest.raises(SystemExit, match=r"^--from .*a\.db: no MLflow experiment 'arch_lab' in this store$"):
        main(["--from", sources["a"], "--to", _store(tmp_path, "study.db")])


def test_a_destination_that_is_also_a_source_is_refused(tmp_path, sources, capsys):
    """Its runs would be copied into it again on every call; the same file is found however it is spelled."""
    with pytest.raises(SystemExit) as stop:
        main(["--from", sources["a"], sources["b"], "--to", "sqlite:///./a.db", "--experiment", "roadmap"])
    assert stop.value.code == 2
    assert (f"error: --to sqlite:///./a.db: the same store as --from {sources['a']}, whose runs would be copied "
            "into it again on every call; give another store (a new file is fine)") in capsys.readouterr().err
    assert len(_runs(sources["a"])) == 1


@pytest.mark.parametrize("flag", ["--from", "--to"])
def test_a_bare_sqlite_file_name_asks_for_a_uri(tmp_path, sources, capsys, flag):
    """MLflow takes a bare path for a file store (a directory): a .db file fails inside MLflow, or is made a dir."""
    args = {"--from": ["--from", "a.db", "--to", _store(tmp_path, "study.db")],
            "--to": ["--from", sources["a"], "--to", "study.db"]}[flag]
    with pytest.raises(SystemExit) as stop:
        main(args + ["--experiment", "roadmap"])
    assert stop.value.code == 2
    name = "a.db" if flag == "--from" else "study.db"
    assert (f"error: {flag} {name}: expected an MLflow store URI, e.g. sqlite:///{name} for a SQLite file"
            in capsys.readouterr().err)
    assert not (tmp_path / "study.db").exists()


def test_a_missing_store_is_named_and_nothing_is_created(tmp_path):
    """A mistyped --from path: MLflow would create an empty store there (and the destination) and copy nothing."""
    with pytest.raises(SystemExit, match=r"^--from sqlite:///.*typo\.db: no MLflow store there \(.*typo\.db does "
                                         r"not exist\)$"):
        main(["--from", _store(tmp_path, "typo.db"), "--to", _store(tmp_path, "study.db")])
    assert not list(tmp_path.iterdir())


def test_existing_store_reads_sqlite_file_and_directory_uris(tmp_path, sources):
    import threading
    from http.server import BaseHTTPRequestHandler, HTTPServer

    from arch_lab.tracking import existing_store

    server = HTTPServer(("127.0.0.1", 0), BaseHTTPRequestHandler)  # answers every request with an error status
    threading.Thread(target=server.serve_forever, daemon=True).start()
    (tmp_path / "mlruns").mkdir(exist_ok=True)
    try:
        for uri in (sources["a"], f"file://{tmp_path / 'mlruns'}", str(tmp_path / "mlruns"),
                    f"http://127.0.0.1:{server.server_port}"):  # a server that answers: the rest is MLflow's
            assert existing_store(uri, "--from") == uri
    finally:
        server.shutdown()
        server.server_close()
    for uri in (f"sqlite:///{tmp_path / 'c.db'}", f"file://{tmp_path / 'runs'}", str(tmp_path / "runs")):
        with pytest.raises(SystemExit, match="no MLflow store there"):
            existing_store(uri, "--from")
    for uri, message in (("http://127.0.0.1:1", r"^--from=http://127.0.0.1:1: no server takes connections there \("),
                         ("bogus://x", r"^--from=bogus://x: MLflow has no store for bogus:// URIs; allowed schemes")):
        with pytest.raises(SystemExit, match=message):
            existing_store(uri, "--from")


NOT_A_STORE = {"text": r"\(file is not a database\)", "empty": r"\(an empty database\)",
               "other-tables": r"\(its tables: notes\)"}


def _not_a_store(tmp_path, kind: str) -> Path:
    """bad.db, a file that is not an MLflow SQLite store: text, an empty file, or a SQLite database of other tables."""
    import sqlite3

    path = tmp_path / "bad.db"
    path.unlink(missing_ok=True)
    if kind == "other-tables":
        with sqlite3.connect(path) as db:
            db.execute("CREATE TABLE notes (text)")
    else:
        path.write_text("garbage" if kind == "text" else "")
    return path


@pytest.mark.parametrize("kind", NOT_A_STORE)
def test_a_source_that_is_not_an_mlflow_store_is_named_and_left_as_it_was(tmp_path, sources, kind):
    """MLflow raised sqlalchemy's DatabaseError for a file that is not a database, and wrote its tables into an
    empty one (a reading tool must not change a file it was given)."""
    bad = _not_a_store(tmp_path, kind)
    before = bad.read_bytes()
    with pytest.raises(SystemExit, match=rf"^--from sqlite:///.*bad\.db: .*bad\.db is not an MLflow SQLite store "
                                         rf"{NOT_A_STORE[kind]}$"):
        main(["--from", sources["a"], f"sqlite:///{bad}", "--to", _store(tmp_path, "study.db")])
    assert bad.read_bytes() == before and not (tmp_path / "study.db").exists()


def test_a_destination_that_is_not_an_mlflow_store_is_named_and_an_empty_file_becomes_one(tmp_path, sources):
    dest = _store(tmp_path, "bad.db")
    for kind in ("text", "other-tables"):
        _not_a_store(tmp_path, kind)
        with pytest.raises(SystemExit, match=rf"^--to sqlite:///.*bad\.db: .*bad\.db is not an MLflow SQLite store "
                                             rf"{NOT_A_STORE[kind]}$"):
            main(["--from", sources["a"], "--to", dest, "--experiment", "roadmap"])
    _not_a_store(tmp_path, "empty")
    assert main(["--from", sources["a"], "--to", dest, "--experiment", "roadmap"]) == 0
    assert set(_copies(dest)) == {sources["plain"]}


def test_a_resumed_runs_origin_points_at_the_origins_copy(tmp_path, sources):
    import mlflow

    mlflow.set_tracking_uri(sources["b"])
    mlflow.set_experiment("roadmap")
    with mlflow.start_run(run_name="row-e", tags={"resumed_from_run": sources["plain"]}) as resumed:
        mlflow.log_metric("train/loss", 1.4, step=3)
    dest = _store(tmp_path, "study.db")
    assert main(["--from", sources["b"], sources["a"], "--to", dest, "--experiment", "roadmap"]) == 0  # origin last
    copies = _copies(dest)
    assert copies[resumed.info.run_id].data.tags["resumed_from_run"] == copies[sources["plain"]].info.run_id


def _active_runs(uri: str) -> list:
    return [run for run in _runs(uri) if run.info.lifecycle_stage == "active"]


@pytest.mark.parametrize("killed", [False, True], ids=["ctrl-c", "killed"])
def test_a_merge_cut_short_leaves_no_partial_copy_and_merging_again_completes_it(tmp_path, sources, monkeypatch,
                                                                                  killed):
    """Ctrl-C while copying the second run deletes its partial copy; a merge killed outright (no clean-up) leaves it
    tagged arch_lab.copying, and the next merge deletes it: either way, re-merging gives one complete copy of each
    run (the partial copy used to carry arch_lab.source_run from the start, so it stayed RUNNING and empty)."""
    from mlflow import MlflowClient

    dest = _store(tmp_path, "study.db")
    terminated = MlflowClient.set_terminated

    def interrupt_the_second(self, run_id, *args, **kwargs):
        if len(_active_runs(dest)) == 2:
            raise KeyboardInterrupt
        return terminated(self, run_id, *args, **kwargs)

    with monkeypatch.context() as patch, pytest.raises(KeyboardInterrupt):
        patch.setattr(MlflowClient, "set_terminated", interrupt_the_second)
        if killed:  # no clean-up: the process is gone
            patch.setattr(MlflowClient, "delete_run", lambda self, run_id: None)
        main(["--from", sources["a"], sources["b"], "--to", dest, "--experiment", "roadmap"])
    assert len(_active_runs(dest)) == (2 if killed else 1)
    assert main(["--from", sources["a"], sources["b"], "--to", dest, "--experiment", "roadmap"]) == 0
    runs = _active_runs(dest)
    assert sorted(run.data.tags[SOURCE_TAG] for run in runs) == sorted((sources["plain"], sources["parent"],
                                                                        sources["trial"]))
    assert all("arch_lab.copying" not in run.data.tags and run.info.status != "RUNNING" for run in runs)
    trial = _copies(dest)[sources["trial"]]
    assert trial.data.metrics == {"recall/mqar_acc": 0.25}
    assert trial.data.tags["mlflow.parentRunId"] == _copies(dest)[sources["parent"]].info.run_id
