"""Bad input to `python -m arch_lab` fails with one clear message naming the offending key, before training when it
can; a run that fails or is interrupted after its MLflow run opened never stays RUNNING.

The commands are independent, so the module runs them all from the start, two at a time (the machine has two cores
and each process pays Python/Lightning start-up); every test reads its own command's result.
"""
from __future__ import annotations

import re
import signal
import subprocess
import time
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path

import pytest

from components.presets import preset
from lab_helpers import (CONF_DIR, TINY, TINY_TEXT, client, error_messages, lab_runs, metric_history,
                         run_lab, start_lab)

EMPTY_CORPUS = "empty.txt"
CASES: dict[str, list[str]] = {
    "missing_train_path": ["data=text_shakespeare", "data.train_path=/nope.txt"],
    "empty_corpus": ["data=text_shakespeare", f"data.train_path={{workdir}}/{EMPTY_CORPUS}"],
    "sequence_too_long": ["data.seq_len=4096", "model.max_seq_len=1024"],
    "unknown_experiment": ["experiment=nope"],
    "key_typo": ["model.windw=3"],
    "impossible_model": ["model.global_layers=[99]"],
    "missing_checkpoint": [*TINY, "ckpt_path=/nope/last.ckpt"],
    "unknown_commonsense_task": ["data=text_shakespeare", "eval.commonsense.enabled=true",
                                 "eval.commonsense.tasks=[piqa,nope]"],
    "diverges": [*TINY, "optim.lr=10000", "optim.warmup_steps=0", "trainer.gradient_clip_val=0",
                 "trainer.log_every_n_steps=1"],
    # the same, shorter than its logging interval: caught when training ends
    "diverges_between_logs": [*TINY, "optim.lr=10000", "optim.warmup_steps=0", "trainer.gradient_clip_val=0",
                              "trainer.log_every_n_steps=50"],
    # an evaluation input, refused before the run opens (not after training, when the passkey stage reads it)
    "missing_passkey_haystack": [*TINY_TEXT, "trainer.max_steps=2", "trainer.val_check_interval=2",
                                 "trainer.limit_val_batches=1", "eval.passkey.haystack_path=/nope"],
    # Lightning's and the data's own checks, run before the MLflow run opens (each used to leave a FAILED run)
    "trainer_refused": [*TINY, "trainer.accelerator=tpuu"],
    "trainer_without_its_package": [*TINY, "trainer.accelerator=tpu"],
    "batch_too_large": [*TINY, "data.batch_size=100000"],
    "passkey_too_short": [*TINY_TEXT, "eval.passkey.seq_len=64"],
    "search_without_multirun": ["hparams_search=head_ratio"],
    "multirun_on_two_devices": ["-m", "trainer.devices=2,1", *TINY],  # job 0 is refused, job 1 runs
    # MLflow would fail once the run opens (after the data and model are built), or retry a dead server for minutes
    "file_store_tracking_uri": [*TINY, "logger.tracking_uri=mlruns.db"],
    "unknown_tracking_scheme": [*TINY, "logger.tracking_uri=bogus://x"],
    "unreachable_tracking_server": [*TINY, "logger.tracking_uri=http://127.0.0.1:1"],
}
INTERRUPTED = "interrupted"  # the Ctrl-C cases, run in the same pool
INTERRUPTED_IN_EVALUATION = "interrupted_in_evaluation"
TERMINATED = "terminated"  # SIGTERM, as a scheduler stops a job
INTERRUPTED_TWICE = "interrupted_twice"  # the second Ctrl-C aborts at once (Lightning exits inside fit)
SWEEP_TERMINATED = "sweep_terminated"  # SIGTERM while a sweep's trial trains
MULTIRUN_TERMINATED = "multirun_terminated"  # and while a plain multirun's first job trains
MULTIRUN_INTERRUPTED = "multirun_interrupted"
# what each case runs, the metric whose first value tells that the run reached the phase to interrupt, the signal
# and how many times it is sent
LONG_RUN = ["trainer.max_steps=100000", "trainer.log_every_n_steps=1"]
INTERRUPTIONS = {
    INTERRUPTED: (LONG_RUN, "train/loss", signal.SIGINT, 1),
    TERMINATED: (LONG_RUN, "train/loss", signal.SIGTERM, 1),
    INTERRUPTED_TWICE: (LONG_RUN, "train/loss", signal.SIGINT, 2),
    SWEEP_TERMINATED: (["-m", "hparams_search=head_ratio", *LONG_RUN], "train/loss", signal.SIGTERM, 1),
    MULTIRUN_TERMINATED: (["-m", "seed=0,1", *LONG_RUN], "train/loss", signal.SIGTERM, 1),
    MULTIRUN_INTERRUPTED: (["-m", "seed=0,1", *LONG_RUN], "train/loss", signal.SIGINT, 1),
    # MQAR accuracy is the stage before decode timing, which takes seconds at this batch and length
    INTERRUPTED_IN_EVALUATION: (["trainer.max_steps=2", "trainer.val_check_interval=100", "eval.decode.batch=32",
                                 "eval.decode.new_tokens=850"], "recall/mqar_acc", signal.SIGINT, 1),
}


def _wait_for_metric(workdir: Path, proc: subprocess.Popen, key: str, timeout: float = 300) -> str:
    """The id of the RUNNING run once it has logged `key` (a sweep's trial run: its parent logs nothing)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        assert proc.poll() is None, (workdir / "lab.log").read_text()[-4000:]
        for run in lab_runs(workdir):
            if run.info.status == "RUNNING" and metric_history(workdir, run.info.run_id, key):
                return run.info.run_id
        time.sleep(0.5)
    raise AssertionError(f"the run never logged {key}")


def interrupt(workdir: Path, case: str) -> tuple[int, str]:
    """Start a run, send the case's signal once it has logged the case's metric; its exit status and run id."""
    args, key, signum, times = INTERRUPTIONS[case]
    proc = start_lab(args, workdir)
    try:
        run_id = _wait_for_metric(workdir, proc, key)
        for _ in range(times):
            proc.send_signal(signum)
            time.sleep(0.3)
        return proc.wait(timeout=120), run_id
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.fixture(scope="module")
def outcomes(tmp_path_factory: pytest.TempPathFactory):
    pool = ThreadPoolExecutor(max_workers=2)
    futures: dict[str, tuple[Path, Future]] = {}
    for case in INTERRUPTIONS:
        workdir = tmp_path_factory.mktemp(case)
        futures[case] = workdir, pool.submit(interrupt, workdir, case)
    for name, args in CASES.items():
        workdir = tmp_path_factory.mktemp(name)
        if name == "empty_corpus":
            (workdir / EMPTY_CORPUS).write_text("")
        futures[name] = workdir, pool.submit(run_lab, [a.format(workdir=workdir) for a in args], workdir, False)
    yield futures
    pool.shutdown(wait=True, cancel_futures=True)


def _result(outcomes, name: str) -> tuple[Path, subprocess.CompletedProcess[str]]:
    workdir, future = outcomes[name]
    proc = future.result()
    assert proc.returncode != 0, proc.stdout[-2000:]
    return workdir, proc


def _only_error(proc: subprocess.CompletedProcess[str]) -> str:
    assert proc.returncode == 1, proc.stdout[-2000:]
    lines = error_messages(proc)
    assert len(lines) == 1, proc.stdout[-4000:]
    return lines[0]


# ---------------------------------------------------------------------------- rejected before a run opens


def test_missing_data_path_names_the_key(outcomes):
    workdir, proc = _result(outcomes, "missing_train_path")
    assert _only_error(proc) == ("data.train_path: no such file or directory: /nope.txt "
                                     "(set data_root=... or data.train_path=...)")
    assert lab_runs(workdir) == []


def test_sequence_longer_than_the_model_is_rejected(outcomes):
    workdir, proc = _result(outcomes, "sequence_too_long")
    assert _only_error(proc) == ("data.seq_len=4096 is longer than the model supports "
                                     "(model.max_seq_len=1024)")
    assert lab_runs(workdir) == []


def test_impossible_model_names_the_key_and_the_allowed_range(outcomes):
    workdir, proc = _result(outcomes, "impossible_model")
    message = "model.global_layers: layer indices [99] out of range; allowed: 0..5"
    assert _only_error(proc) == message
    assert lab_runs(workdir) == []
    # the preset behind the default model raises it as a ValueError too, for callers outside the lab
    with pytest.raises(ValueError, match=f"^{re.escape(message)}$"):
        preset("roadmap_e", "tiny", global_layers=[99])


def test_unknown_experiment_lists_the_available_ones(outcomes):
    workdir, proc = _result(outcomes, "unknown_experiment")
    assert "Could not find 'experiment/nope'" in proc.stderr
    listed = proc.stderr.split("Available options in 'experiment':")[1].split("Config search path")[0].split()
    assert listed == sorted(p.stem for p in (CONF_DIR / "experiment").glob("*.yaml"))
    assert "Traceback" not in proc.stderr
    assert lab_runs(workdir) == []


def test_key_typo_names_the_key(outcomes):
    workdir, proc = _result(outcomes, "key_typo")
    assert "Could not override 'model.windw'." in proc.stderr
    assert "Key 'windw' is not in struct" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert lab_runs(workdir) == []


def test_empty_corpus_is_rejected_naming_the_key_before_the_run_opens(outcomes):
    workdir, proc = _result(outcomes, "empty_corpus")  # the corpus is read before the run opens, as in training
    assert _only_error(proc) == f"data.train_path: {workdir / EMPTY_CORPUS} contains no text"
    assert lab_runs(workdir) == []


def test_missing_checkpoint_names_ckpt_path(outcomes):
    workdir, proc = _result(outcomes, "missing_checkpoint")
    assert _only_error(proc) == "ckpt_path: no checkpoint at /nope/last.ckpt"
    assert lab_runs(workdir) == []  # checked before the run opens: no half-made run


def test_a_multirun_job_on_two_devices_is_refused_before_lightning_relaunches_the_command(outcomes):
    """The refused job gets one line and no run; the next job still runs; the multirun exits 1 with the job named."""
    workdir, proc = _result(outcomes, "multirun_on_two_devices")
    refusal = "trainer.devices: a multirun (-m) trains each job in one process: use a single-device trainer"
    messages = error_messages(proc)
    assert proc.returncode == 1 and len(messages) == 1 and messages[0].startswith(f"job 0 failed: {refusal}")
    assert f"job 0 failed: {refusal}" in proc.stderr.splitlines()[-3]  # Hydra's last words: the message, no traceback
    assert [(r.data.params["trainer.devices"], r.info.status) for r in lab_runs(workdir)] == [("1", "FINISHED")]
    assert not list(workdir.rglob("train_ddp_process_1.log"))


def test_a_warmup_longer_than_the_run_is_pointed_out_once_the_run_passed_its_checks(outcomes):
    warning = "optim.warmup_steps=30 > trainer.max_steps=6: the learning rate never reaches optim.lr=0.003"
    _, proc = _result(outcomes, "multirun_on_two_devices")  # TINY: 6 steps, the recipe's 30 warmup steps
    assert proc.stdout.count(warning) == 1  # job 1's; job 0 is refused before it, as a bad resume is
    _, proc = _result(outcomes, "missing_checkpoint")
    assert warning not in proc.stdout


def test_a_window_as_long_as_the_training_sequences_is_pointed_out(tmp_path):
    proc = run_lab([*TINY, "model.window=32", "trainer.max_steps=1", "eval.decode.enabled=false",
                    "eval.analysis.enabled=false"], tmp_path)
    assert proc.stdout.count("model.window=32 >= data.seq_len=32: the local layers see every token of a training "
                             "sequence, as the global ones do") == 1
    assert "model.window=" not in run_lab([*TINY, "trainer.max_steps=1", "eval.decode.enabled=false",
                                           "eval.analysis.enabled=false"], tmp_path / "default").stdout


def test_unknown_commonsense_task_is_caught_before_training(outcomes):
    workdir, proc = _result(outcomes, "unknown_commonsense_task")
    assert _only_error(proc).startswith("eval.commonsense.tasks: unknown task(s) ['nope']; allowed: [")
    assert lab_runs(workdir) == []


@pytest.mark.parametrize("case, message", [
    ("trainer_refused", "trainer: Lightning refuses these settings: You selected an invalid accelerator name: "
                        "`accelerator='tpuu'`. Available names are: "),
    ("trainer_without_its_package", "trainer: Lightning refuses these settings: Requirement 'torch_xla"),
    ("batch_too_large", "the training set (192 examples, set by data.train_examples) holds no full batch of "
                        "data.batch_size=100000 per device on 1 device(s): lower data.batch_size"),
    ("passkey_too_short", "eval.passkey.seq_len must be >= 104 to hold the needle, the question, the answer and "
                          "some filler, got 64"),
    ("search_without_multirun", "hparams_search=head_ratio is an Optuna study: run it with -m (python -m arch_lab -m "
                                "hparams_search=head_ratio ...)"),
])
def test_what_lightning_the_data_or_the_search_refuse_fails_before_the_run_opens(outcomes, case, message):
    workdir, proc = _result(outcomes, case)
    assert _only_error(proc).startswith(message)
    assert lab_runs(workdir) == []


@pytest.mark.parametrize("case, message", [
    ("file_store_tracking_uri", "logger.tracking_uri=mlruns.db: MLflow refuses file stores (a path or file: URI) "
                                "unless MLFLOW_ALLOW_FILE_STORE=true; use sqlite:///mlruns.db for a local store, or "
                                "http(s)://<host>:<port> for a server"),
    ("unknown_tracking_scheme", "logger.tracking_uri=bogus://x: MLflow has no store for bogus:// URIs; allowed "
                                "schemes: databricks, "),
    ("unreachable_tracking_server", "logger.tracking_uri=http://127.0.0.1:1: no server takes connections there ("),
])
def test_a_tracking_uri_mlflow_cannot_use_is_refused_before_the_run(outcomes, case, message):
    workdir, proc = _result(outcomes, case)
    assert _only_error(proc).startswith(message)
    assert lab_runs(workdir) == [] and not (workdir / "mlruns").exists()


def test_missing_passkey_haystack_is_caught_before_training(outcomes):
    workdir, proc = _result(outcomes, "missing_passkey_haystack")
    assert _only_error(proc) == "eval.passkey.haystack_path: no such file /nope"
    assert lab_runs(workdir) == []  # evaluation inputs are checked up front, not after a wasted training run


# --------------------------------------------------------------------- failing after the MLflow run opened


@pytest.mark.parametrize("case, steps", [("diverges", r"\d"), ("diverges_between_logs", "6")])
def test_a_diverged_run_ends_failed_naming_the_loss(outcomes, case, steps):
    workdir, proc = _result(outcomes, case)
    assert re.match(rf"train/loss is (nan|inf) at step {steps}: training diverged; lower optim.lr",
                    _only_error(proc))
    assert [run.info.status for run in lab_runs(workdir)] == ["FAILED"]


# ------------------------------------------------------------------------------------------------ Ctrl-C


def test_interrupted_run_ends_killed(outcomes):
    workdir, future = outcomes[INTERRUPTED]
    returncode, run_id = future.result()
    assert returncode == 130
    assert client(workdir).get_run(run_id).info.status == "KILLED"
    assert [run.info.status for run in lab_runs(workdir)] == ["KILLED"]
    console = (workdir / "lab.log").read_text()
    assert "Traceback" not in console
    assert re.search(r"interrupted \(Ctrl-C\): the MLflow run ended KILLED; resume with ckpt_path='.*last.ckpt'",
                     console)


def test_a_terminated_run_ends_killed_with_the_shells_code_for_sigterm(outcomes):
    workdir, future = outcomes[TERMINATED]
    returncode, run_id = future.result()
    assert returncode == 143  # Lightning's own SIGTERM handling would exit 0: a scheduler would see success
    assert client(workdir).get_run(run_id).info.status == "KILLED"
    assert re.search(r"interrupted \(SIGTERM\): the MLflow run ended KILLED; resume with ckpt_path=",
                     (workdir / "lab.log").read_text())


def test_a_second_ctrl_c_aborts_at_once_and_still_ends_killed_with_the_shells_code(outcomes):
    workdir, future = outcomes[INTERRUPTED_TWICE]
    returncode, run_id = future.result()
    assert returncode == 130  # Lightning's own handling of the second one exits 1
    assert client(workdir).get_run(run_id).info.status == "KILLED"
    console = (workdir / "lab.log").read_text()
    assert "Traceback" not in console and "interrupted (Ctrl-C): the MLflow run ended KILLED" in console


def test_a_sweep_terminated_while_a_trial_trains_records_the_trial_interrupted(outcomes):
    import optuna

    workdir, future = outcomes[SWEEP_TERMINATED]
    returncode, run_id = future.result()
    assert returncode == 143  # Lightning's SIGTERMException used to end the sweep with status 0
    trial = optuna.load_study(study_name="head_ratio", storage=f"sqlite:///{workdir / 'optuna.db'}").trials[0]
    # interrupted, not failed by its values: a resumed grid sweep runs this point again
    assert trial.state == optuna.trial.TrialState.FAIL and trial.user_attrs["interrupted"] is True
    statuses = {run.info.run_id: run.info.status for run in lab_runs(workdir)}
    assert statuses == {run_id: "KILLED", client(workdir).get_run(run_id).data.tags["mlflow.parentRunId"]: "KILLED"}
    console = (workdir / "lab.log").read_text()
    assert "Traceback" not in console and "interrupted (SIGTERM): the trials in flight are recorded" in console


@pytest.mark.parametrize("case, status, name", [(MULTIRUN_TERMINATED, 143, "SIGTERM"),
                                                (MULTIRUN_INTERRUPTED, 130, "Ctrl-C")])
def test_a_plain_multirun_stopped_while_a_job_trains_exits_with_the_shells_code_naming_the_job(outcomes, case,
                                                                                                status, name):
    workdir, future = outcomes[case]
    returncode, run_id = future.result()
    assert returncode == status  # a SIGTERM's multirun used to exit 0, a Ctrl-C's with Hydra's traceback
    assert [(run.info.run_id, run.info.status) for run in lab_runs(workdir)] == [(run_id, "KILLED")]  # job 1 never ran
    console = (workdir / "lab.log").read_text()
    assert "Traceback" not in console
    assert re.search(rf"interrupted \({name}\): job 0: the MLflow run ended KILLED; resume with "
                     rf"ckpt_path='.*last.ckpt'; the jobs after it do not run", console)


def test_run_interrupted_in_evaluation_ends_killed_after_the_stage_and_keeps_what_it_measured(outcomes):
    workdir, future = outcomes[INTERRUPTED_IN_EVALUATION]
    returncode, run_id = future.result()
    assert returncode == 130  # the shell's code for Ctrl-C, as when training is interrupted
    run = client(workdir).get_run(run_id)
    assert run.info.status == "KILLED"
    console = (workdir / "lab.log").read_text()
    assert "Traceback" not in console and ("interrupted (Ctrl-C): the MLflow run ended KILLED; training had finished "
                                           "(the checkpoint is at step 2 and trainer.max_steps=2), only its evaluation "
                                           "was cut short") in console
    assert {"train/final_loss", "train/steps", "val/loss", "recall/mqar_acc", "throughput/decode_tok_s"} <= \
        set(run.data.metrics)
    assert "analysis/erf" not in run.data.metrics  # the stage after decode timing never ran
    assert "stopping after this evaluation stage" in console


def test_only_ctrl_c_and_sigterm_count_as_interrupts():
    from lightning.pytorch.utilities.exceptions import SIGTERMException

    from arch_lab.interrupts import is_interrupt

    assert is_interrupt(KeyboardInterrupt()) and is_interrupt(SIGTERMException())
    try:
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt:
            raise SystemExit(1)  # what Lightning's fit does on a second Ctrl-C
    except SystemExit as lightning_exit:
        assert is_interrupt(lightning_exit)
    assert not is_interrupt(SystemExit(1))  # a program's own exit (a bench trial's config error): not Ctrl-C
