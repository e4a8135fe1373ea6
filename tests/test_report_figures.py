"""The data behind the report's Fig. 8: each Table 1 row's attention shares, pooled over seeds, one bar per kind of
head that the row has."""
from __future__ import annotations

import pandas as pd
import pytest

from arch_lab.report import attention_shares, plot_attention_shares

CATEGORIES = ("meta", "bos", "self", "cross")


def _run(model: str, task: str, attn: tuple[float, ...] | None, ssm: tuple[float, ...] | None, **tags) -> dict:
    run = {"tags.model": model, "tags.task": task, **{f"tags.{k}": v for k, v in tags.items()}}
    for kind, shares in (("attn", attn), ("ssm", ssm)):
        run.update({f"metrics.analysis/{kind}_share_{c}": v for c, v in zip(CATEGORIES, shares or [float("nan")] * 4)})
    return run


def test_shares_are_seed_means_per_row_and_head_kind_in_the_papers_order(tmp_path) -> None:
    runs = pd.DataFrame([
        _run("roadmap_e_small", "text", (0.4, 0.0, 0.1, 0.5), (0.2, 0.0, 0.3, 0.5)),
        _run("roadmap_e_small", "text", (0.2, 0.2, 0.1, 0.5), (0.2, 0.0, 0.1, 0.7)),  # a second seed
        _run("transformer_small", "text", (0.0, 0.3, 0.2, 0.5), None),  # no SSM heads: no SSM bar
        _run("roadmap_d_small", "mqar", (0.0, 0.1, 0.1, 0.8), (0.0, 0.1, 0.1, 0.8)),  # another task
        _run("roadmap_b_small", "text", (0.0, 0.5, 0.0, 0.5), (0.0, 0.5, 0.0, 0.5), **{"sweep.study_name": "x"}),
    ])
    shares = attention_shares(runs, "text")
    assert list(shares) == ["Transformer\nattention", "E\nattention", "E\nSSM"]
    assert shares["E\nattention"] == pytest.approx({"meta": 0.3, "bos": 0.1, "self": 0.1, "cross": 0.5})
    assert shares["E\nSSM"] == pytest.approx({"meta": 0.2, "bos": 0.0, "self": 0.2, "cross": 0.6})
    assert plot_attention_shares(runs, "text", tmp_path / "fig8.png").read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert plot_attention_shares(runs.iloc[0:0], "text", tmp_path / "none.png") is None
    assert not (tmp_path / "none.png").exists()


def test_a_run_without_the_metric_counts_in_no_column() -> None:
    """A bench run (no task tag) serves every table with its own metrics, but is not one more seed of MQAR."""
    from arch_lab.report import collect, table1

    runs = pd.DataFrame([
        {"tags.model": "roadmap_e_tiny", "tags.task": "mqar", "metrics.recall/mqar_acc": 0.25},
        {"tags.model": "roadmap_e_tiny", "tags.task": "mqar", "metrics.recall/mqar_acc": 0.75},
        {"tags.model": "roadmap_e_tiny", "metrics.recall/mqar_acc": float("nan")},  # the bench's
    ])
    assert collect(runs, "recall/mqar_acc", "mqar") == {"roadmap_e": [0.25, 0.75]}
    row = next(line for line in table1(runs, None).splitlines() if line.startswith("| E + meta tokens"))
    assert row.split(" | ")[1:3] == ["50.0 ± 25.0", "1/2 (9–91%)"] and row.split(" | ")[-2] == "2"


def test_smoke_test_runs_are_no_results() -> None:
    from arch_lab.report import without_smoke_tests

    runs = pd.DataFrame({"params.trainer.fast_dev_run": ["False", "True", None, "0", "3"], "run": list("abcde")})
    assert list(without_smoke_tests(runs)["run"]) == ["a", "c", "d"]
    assert without_smoke_tests(runs.drop(columns="params.trainer.fast_dev_run")).equals(runs[["run"]])


def test_a_run_that_a_later_run_resumed_from_counts_once() -> None:
    from arch_lab.report import without_resumed_origins
    from arch_lab.tracking import RESUMED_FROM_TAG

    runs = pd.DataFrame({"run_id": ["a", "b", "c", "d", "e"], "start_time": [1, 2, 3, 4, 5],
                         f"tags.{RESUMED_FROM_TAG}": [None, "a", None, "a", "c"]})
    assert list(without_resumed_origins(runs)["run_id"]) == ["d", "e"]  # a resumed twice: the later resume counts
    assert without_resumed_origins(runs[["run_id"]]).equals(runs[["run_id"]])


def test_only_head_ratio_trials_are_labelled_by_their_head_count() -> None:
    from arch_lab.report import _run_label

    def label(study: str | None) -> str:
        run = pd.Series({"tags.model": "roadmap_e_tiny", "tags.seed": "0", "tags.sweep.study_name": study,
                         "params.model.n_heads": "2"})
        return _run_label(run)[1]

    assert label("head_ratio") == "E, 2 heads s0"
    assert label("meta_tokens") == label(None) == "E s0"  # another sweep's trial: its head count is not the point
