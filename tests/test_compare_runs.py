"""`python -m arch_lab.compare_runs`: two runs' loss curves side by side (experiments/performance/ddp_check.sh compares
1 and 2 GPUs with it), their largest difference against a tolerance, and runs named by a tag."""
from __future__ import annotations

import re

import pytest

from arch_lab.compare_runs import main


@pytest.fixture
def store(tmp_path, monkeypatch) -> str:
    """Runs case=single and case=ddp: losses 3, 2, 1.5 and 3.01, 2.05 (step 2 not logged), and a case=ddp twin
    in another experiment, which the default experiment does not see."""
    import mlflow

    monkeypatch.chdir(tmp_path)
    uri = f"sqlite:///{tmp_path / 'ddp.db'}"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("arch_lab")
    for case, losses in (("single", (3.0, 2.0, 1.5)), ("ddp", (3.01, 2.05))):
        with mlflow.start_run(tags={"case": case}):
            for step, loss in enumerate(losses):
                mlflow.log_metric("train/loss", loss, step=step)
            mlflow.log_metric("train/tokens_per_s", 1000.0)
    mlflow.set_experiment("other")
    with mlflow.start_run(tags={"case": "ddp"}):
        mlflow.log_metric("train/loss", 9.0, step=0)
    return uri


def test_runs_within_the_tolerance_pass_and_beyond_it_fail(store, capsys):
    assert main(["--tracking-uri", store, "case=single", "case=ddp", "--tolerance", "0.06"]) == 0
    out = capsys.readouterr().out
    assert "max |case=ddp - case=single| over shared steps: 0.05" in out and "PASS" in out
    assert "train/loss 3.0000 (step 0) -> 1.5000 (step 2)" in out and "train/tokens_per_s=1000" in out
    assert main(["--tracking-uri", store, "case=single", "case=ddp", "--tolerance", "0.04"]) == 1
    assert "FAIL: curves within 0.04 of case=single" in capsys.readouterr().out


def test_a_tag_must_name_one_run_and_the_store_must_exist(store, tmp_path):
    with pytest.raises(SystemExit, match=r"^case=none: no run of experiment 'arch_lab' has that tag$"):
        main(["--tracking-uri", store, "case=single", "case=none"])
    with pytest.raises(SystemExit, match=r"^--tracking-uri sqlite:///.*typo\.db: no MLflow store there"):
        main(["--tracking-uri", f"sqlite:///{tmp_path / 'typo.db'}", "case=single", "case=ddp"])
    assert not (tmp_path / "typo.db").exists()
    bare = store.removeprefix("sqlite:///")  # the store's file without its scheme: MLflow would take a directory
    with pytest.raises(SystemExit, match=rf"^--tracking-uri {re.escape(bare)}: expected an MLflow store URI, e\.g\. "):
        main(["--tracking-uri", bare, "case=single", "case=ddp"])


def test_a_tag_that_several_runs_have_lists_them_and_a_run_id_names_one(store, capsys):
    import mlflow

    mlflow.set_experiment("arch_lab")
    with mlflow.start_run(tags={"case": "single"}, run_name="second-single") as second:
        mlflow.log_metric("train/loss", 3.0, step=0)
    with pytest.raises(SystemExit) as error:
        main(["--tracking-uri", store, "case=single", "case=ddp"])
    listed = rf"second-single {second.info.run_id}, \S+ [0-9a-f]{{32}}"
    assert re.fullmatch(rf"case=single: 2 runs have that tag \({listed}\); name one by its run id, or by a tag only it "
                        r"has", str(error.value)), error.value
    assert main(["--tracking-uri", store, second.info.run_id, "case=ddp"]) == 0
    assert f"\n{second.info.run_id} (second-single, FINISHED): train/loss 3.0000" in capsys.readouterr().out


def test_an_unknown_run_id_is_named(store):
    with pytest.raises(SystemExit, match=r"^0123abcd: no run with that id in this store \(or name one by tag, "
                                         r"e\.g\. case=ddp\)$"):
        main(["--tracking-uri", store, "case=single", "0123abcd"])


def test_a_key_no_run_logged_is_named_with_the_keys_they_have(store, capsys):
    with pytest.raises(SystemExit, match=r"^--key train/los: none of these runs logged it; their metric keys: "
                                         r"train/loss, train/tokens_per_s$"):
        main(["--tracking-uri", store, "case=single", "case=ddp", "--key", "train/los"])


@pytest.mark.parametrize("every", ["0", "-2", "x"])
def test_every_must_be_a_positive_integer(store, capsys, every):
    with pytest.raises(SystemExit) as stop:
        main(["--tracking-uri", store, "case=single", "case=ddp", "--every", every])
    assert stop.value.code == 2
    err = capsys.readouterr().err
    assert err.startswith("usage: python -m arch_lab.compare_runs ")  # how it is run, not compare_runs.py
    assert f"error: argument --every: must be an integer >= 1, got {every}" in err


@pytest.mark.parametrize("tolerance", ["-1", "nan", "x"])
def test_tolerance_must_be_a_number_at_least_zero(store, capsys, tolerance):
    """--tolerance -1 printed "PASS: curves within -1.0" for runs no tolerance below 0 can pass."""
    with pytest.raises(SystemExit) as stop:
        main(["--tracking-uri", store, "case=single", "case=ddp", "--tolerance", tolerance])
    assert stop.value.code == 2
    assert f"error: argument --tolerance: must be a number >= 0, got {tolerance}" in capsys.readouterr().err


@pytest.mark.parametrize("content, why", [("garbage", "file is not a database"), ("", "an empty database")])
def test_a_file_that_is_not_an_mlflow_store_is_named_and_left_as_it_was(tmp_path, content, why):
    """sqlalchemy's DatabaseError for a file that is not a database; MLflow's tables written into an empty one."""
    bad = tmp_path / "bad.db"
    bad.write_text(content)
    with pytest.raises(SystemExit, match=rf"^--tracking-uri sqlite:///.*bad\.db: .*bad\.db is not an MLflow SQLite "
                                         rf"store \({why}\)$"):
        main(["--tracking-uri", f"sqlite:///{bad}", "case=single"])
    assert bad.read_text() == content


def test_a_store_given_where_runs_go_names_the_flag(capsys):
    with pytest.raises(SystemExit) as stop:
        main(["sqlite:///ddp.db", "case=single", "case=ddp"])  # the command line before --tracking-uri
    assert stop.value.code == 2
    error = capsys.readouterr().err
    assert "sqlite:///ddp.db is a store, not a run: give it as --tracking-uri sqlite:///ddp.db" in error
