"""Optuna sweeps as a Hydra sweeper, tracked in MLflow.

    python -m arch_lab -m hparams_search=head_ratio experiment=roadmap_step3

An `hparams_search/<name>.yaml` (`# @package _global_`) selects the sweeper with
`defaults: [override /hydra/sweeper: arch_lab_optuna]` and fills `hydra.sweeper` (fields and
defaults: `optuna_sweeper.OptunaSweeperConf`; parameter syntax: `search_space`). Hydra only
instantiates sweepers from the `hydra_plugins` namespace: the package installs
`hydra_plugins.arch_lab_optuna_sweeper`, and an app calls `register_sweeper()` before `hydra.main`.

Study and storage. `n_trials` is the study's target of COMPLETE + PRUNED trials: re-running the
command with the same `study_name` resumes and runs only the missing trials; several workers
(processes, machines) started on one storage share the work and stop together at the target.
A study whose trials all failed holds no result: a command with other fixed overrides (or objectives) starts
it again instead of being refused, and the old parent run gets the tag `sweep.superseded_by`.
The storage defaults to the SQLite file `optuna.db` in the launch directory (beside MLflow's
`mlruns.db`); any SQLAlchemy URL works (`hydra.sweeper.storage=postgresql://...`). A trial whose
job raises, returns NaN or lacks an objective metric, breaks a constraint or repeats the values of
another trial is recorded FAIL with the Optuna user attr `fail_reason`; the sweep goes on (up to
`max_failed_trials`, default n_trials, then it stops FAILED; so does a grid whose every point failed).
A run that lacks an objective before any trial
of the study completed stops the sweep FAILED at once: its config, not the trial, dropped the metric (e.g.
eval.decode.enabled=false drops throughput/decode_tok_s). With sampler kind grid, the grid points
that differ only in an inactive conditional parameter repeat a trial and are recorded FAIL as such.
A worker that dies without cleaning up (SIGKILL) stops its heartbeat; after `grace_period` its
trial turns FAIL and the next ask re-runs its values. SQLite stores get `<file>.lock` beside them.

MLflow. One parent run per study (run name = study name; tags `sweep.study_name`,
`sweep.storage` with the password and any absolute path hidden, `sweep.sampler`, ...), reused when the study is
resumed or joined. When the study is done the parent run gets `pareto/pareto_front.csv`,
`pareto/pareto_front.json` (mlflow table) and `pareto/pareto_front.png`, the best (Pareto-front)
trials' child runs get `sweep.best=true`, and the parent run ends FINISHED; a sweep that
crashes ends it FAILED, Ctrl-C or SIGTERM ends it KILLED.

Contract with the task (the job function a sweep launches)
-----------------------------------------------------------
The sweeper sets, around every launch, the environment variables
    ARCH_LAB_SWEEP_STUDY_NAME, ARCH_LAB_SWEEP_STORAGE (URL), ARCH_LAB_SWEEP_PARENT_RUN_ID,
    ARCH_LAB_SWEEP_EXPERIMENT_ID (the parent run's), ARCH_LAB_SWEEP_TRACKING_URI,
    ARCH_LAB_SWEEP_PRUNER (JSON), and MLFLOW_TRACKING_URI (= the sweep's tracking URI),
and adds to each job's overrides the sampled values (`model.n_heads=8`, ...) plus
    ++hydra.job.env_set.ARCH_LAB_SWEEP_TRIAL_NUMBER=<trial number>
which Hydra turns into an environment variable inside the job, whichever launcher runs it.

The task
1. opens its MLflow run with `with start_run_for_job(run_name, experiment_name=...) as run:`:
   inside a sweep this is the trial's child run (nested under the parent run, in the parent's
   experiment, tagged `trial.number`, `sweep.study_name`, with the sampled values as params);
   outside a sweep a top-level run. The run ends FINISHED, FAILED if the body raises, KILLED on
   KeyboardInterrupt; a pruned trial's run ends FINISHED. A task that opens its run by other
   means passes `current_trial().mlflow_tags()` as its tags instead;
2. may call `current_trial().report(value, step)` after each evaluation; it raises
   `optuna.TrialPruned` when the pruner says so, and the task lets it propagate (trial PRUNED);
3. logs its metrics and RETURNS a mapping {metric name: float} holding every metric named in
   `hydra.sweeper.directions`.
`current_trial()` is None outside a sweep.
"""

from arch_lab.sweep.study_tracking import SweepTrial, current_trial, start_child_run, start_run_for_job


def register_sweeper() -> None:
    """Make `hydra/sweeper=arch_lab_optuna` usable in this process, however arch_lab was installed.

    Hydra finds plugins by scanning the `hydra_plugins` namespace on disk, which an editable install's import
    hook hides; registering the class explicitly works for every install mode.
    """
    from hydra.core.plugins import Plugins

    from hydra_plugins.arch_lab_optuna_sweeper import ArchLabOptunaSweeper

    Plugins.instance().register(ArchLabOptunaSweeper)


__all__ = ["SweepTrial", "current_trial", "register_sweeper", "start_child_run", "start_run_for_job"]
