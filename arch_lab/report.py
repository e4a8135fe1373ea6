"""Rebuild the roadmap study's tables and plots from an MLflow store (so anyone's own runs give the same report).

    python -m arch_lab.report --tracking-uri sqlite:///mlruns.db [sqlite:///more.db ...] --experiment roadmap \
        [--bench-uri sqlite:///bench.db --bench-experiment arch_lab] --out experiments/roadmap/report

Several stores may be given (runs trained in parallel each keep their own SQLite file); their FINISHED runs are
pooled, but for those trained with trainer.fast_dev_run (smoke tests) and those a later run resumed from (its
continuation counts instead).
`--experiment` and `--bench-experiment` default to the lab's experiment (`logger.experiment_name`, arch_lab); the
roadmap study scripts log to `--experiment roadmap`. A run's task (its MQAR or text tables) is its `task` tag, else
the `data` tag every `python -m arch_lab` run carries.
Bench runs tagged `study=head_ratio` (with `n_heads`) feed Table 9's throughput and cache; the others Table 1.

Writes `tables.md` (Table 1 and Table 9 beside the paper's numbers, MQAR by slice with the losses and the attention
analysis; mean ± spread over seeds) and the plots
`fig1_accuracy_throughput_cache.png`, `fig3_erf_vs_cache.png`, `fig8_attention_share_<task>.png` and
`fig9_entropy_per_layer_<task>.png` (mqar, text),
and, per MQAR run, its validation accuracy by step (`mqar_learning_curves.png` and a table): MQAR is learned in a
sudden jump whose timing varies by seed, so a mean over seeds can hide whether any run learned at all. Table 1
counts the runs that learned, with the 95% Wilson interval of that success rate.
"""
from __future__ import annotations

import argparse
import math
import re
from pathlib import Path
from typing import Optional

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

from .tracking import RESUMED_FROM_TAG, existing_store, lab_experiment  # noqa: E402

# DESIGN.md §5 / paper Table 1 (300M, 100B tokens, A100; cache at 16k fp16).
PAPER_TABLE1 = {
    "transformer": ("Transformer (Llama)", 44.08, 39.98, 721.1, 829.4),
    "mamba": ("Mamba", 42.98, 19.23, 4720.8, 1.9),
    "roadmap_a": ("A + attention heads (sequential)", 44.07, 45.16, 776.3, 311.9),
    "roadmap_b": ("B + multi-head (parallel)", 45.19, 49.90, 876.7, 295.7),
    "roadmap_c": ("C + local/global attention", 44.56, 48.79, 2399.7, 78.1),
    "roadmap_d": ("D + KV sharing", 45.16, 48.04, 2756.5, 76.3),
    "roadmap_e": ("E + meta tokens", 45.59, 51.79, 2695.8, 76.9),
}
# Paper Table 9 rows 1-4 (attention heads at fixed size): ratio, recall, throughput, cache.
PAPER_TABLE9 = {0: ("0:1", 19.23, 4720.8, 1.87), 4: ("1:8.48", 44.65, 3278.1, 197.39),
                8: ("1:4.24", 52.53, 1816.5, 394.00), 16: ("1:2.12", 56.46, 656.6, 787.22)}


def _runs(tracking_uris: list[str], experiment: str):
    """FINISHED runs of `experiment`, pooled over every store."""
    import mlflow
    import pandas as pd

    frames = []
    for uri in tracking_uris:
        mlflow.set_tracking_uri(uri)
        if mlflow.get_experiment_by_name(experiment) is None:
            names = sorted(e.name for e in mlflow.search_experiments())
            raise SystemExit(f"{uri}: no experiment {experiment!r} in this store (it holds {names})")
        frame = mlflow.search_runs(experiment_names=[experiment], filter_string="attributes.status = 'FINISHED'")
        frames.append(_with_task(without_smoke_tests(frame)).assign(store=uri))  # where its metric history lives
    frames = [f for f in frames if not f.empty]
    return without_resumed_origins(pd.concat(frames, ignore_index=True)) if frames else pd.DataFrame()


def without_smoke_tests(frame):
    """Runs trained with trainer.fast_dev_run left out: a batch or a few, then a full evaluation, is no result."""
    column = "params.trainer.fast_dev_run"
    if column not in frame:
        return frame
    return frame[frame[column].isna() | frame[column].isin(["False", "0"])]


def without_resumed_origins(frame):
    """One run per line of training: a run that a later run resumed from is left out, and of several runs resumed
    from one checkpoint's run only the last started counts (counting more would count one seed twice)."""
    column = f"tags.{RESUMED_FROM_TAG}"
    if column not in frame:
        return frame
    frame = frame[~frame["run_id"].isin(set(frame[column].dropna()))]
    resumed = frame[column].notna()
    latest = frame[resumed].sort_values("start_time").drop_duplicates(column, keep="last")
    return frame[~resumed | frame["run_id"].isin(set(latest["run_id"]))]


def _with_task(frame):
    """`tags.task` filled from `tags.data` (mqar or text, set by `python -m arch_lab`) where a run has no task tag:
    an untagged training run would otherwise be counted in both the MQAR and the text tables."""
    if "tags.data" not in frame:
        return frame
    task = frame["tags.task"].fillna(frame["tags.data"]) if "tags.task" in frame else frame["tags.data"]
    return frame.assign(**{"tags.task": task})


def _compiled_decode(bench):
    """Whether each bench run timed the compiled decode step (bench key compile_decode; older runs lack it)."""
    return bench["params.compile_decode"] == "True" if "params.compile_decode" in bench else False


def _split_bench(bench):
    """(Table 1 bench runs, head-ratio bench runs): the latter are tagged study=head_ratio. A row benched again
    (e.g. after a speed-up, in a later call) takes one run only, its newest with the compiled decode step if it
    has one (the faster step the lab ships), else its newest: averaging runs of older code or of the other step
    would describe neither. Runs that did not time decoding (training benches) are left out."""
    if bench is None:
        return None, None
    if "metrics.bench/decode_tok_s" in bench:
        bench = bench[bench["metrics.bench/decode_tok_s"].notna()]
    bench = bench.assign(compiled=_compiled_decode(bench)).sort_values(["compiled", "start_time"], ascending=False)
    if "tags.study" not in bench:
        return bench.drop_duplicates("tags.model"), bench.iloc[0:0]
    ratio = bench["tags.study"] == "head_ratio"
    return bench[~ratio].drop_duplicates("tags.model"), bench[ratio].drop_duplicates("tags.n_heads")


def _row_key(model_name: str) -> Optional[str]:
    for key in PAPER_TABLE1:
        if model_name.startswith(key + "_") or model_name == key:
            return key
    return None


def mean_spread(values: list[float]) -> tuple[float, float]:
    values = [v for v in values if v is not None and not math.isnan(v)]
    if not values:
        return float("nan"), float("nan")
    mean = sum(values) / len(values)
    spread = (max(values) - min(values)) / 2 if len(values) > 1 else 0.0
    return mean, spread


def _fmt(mean: float, spread: float, scale: float = 1.0, digits: int = 1) -> str:
    if math.isnan(mean):
        return "–"
    return f"{mean * scale:.{digits}f} ± {spread * scale:.{digits}f}" if spread else f"{mean * scale:.{digits}f}"


def collect(runs, metric: str, task: str) -> dict[str, list[float]]:
    out: dict[str, list[float]] = {}
    if runs.empty or f"metrics.{metric}" not in runs:
        return out
    for _, run in runs.iterrows():
        row, run_task = _row_key(str(run.get("tags.model", ""))), run.get("tags.task")
        if row is None or isinstance(run.get("tags.sweep.study_name"), str):
            continue  # sweep trials belong to Table 9, not to the roadmap rows
        if isinstance(run_task, str) and run_task != task:
            continue  # runs with neither a task nor a data tag (bench runs) serve every table
        value = run[f"metrics.{metric}"]
        if not math.isnan(value):  # a run without the metric: counted in no column (Table 1's seeds included)
            out.setdefault(row, []).append(value)
    return out


def _speed_and_cache(runs, bench) -> tuple[dict[str, list[float]], dict[str, list[float]]]:
    """Decode tok/s and cache MB per row: from bench runs when a bench store is given (the paper's protocol at
    300M), else from the training runs' own end-of-run measurements (their size, their device)."""
    if bench is not None:
        return collect(bench, "bench/decode_tok_s", "mqar"), collect(bench, "bench/cache_mb_16k", "mqar")
    return collect(runs, "throughput/decode_tok_s", "mqar"), collect(runs, "cache/mb_16k", "mqar")


def table1(runs, bench) -> str:
    mqar = collect(runs, "recall/mqar_acc", "mqar")
    ppl = collect(runs, "val/ppl", "text")
    gut = collect(runs, "test/gutenberg_test/ppl", "text")
    wiki = collect(runs, "test/wikitext2/ppl", "text")
    passkey = collect(runs, "recall/passkey_acc", "text")
    decode, cache = _speed_and_cache(runs, bench)
    steps = {task: collect(runs, "train/steps", task) for task in ("mqar", "text")}
    seeds = {r: len(v) for r, v in mqar.items()}
    base = mean_spread(decode.get("transformer", []))[0]
    paper_base = PAPER_TABLE1["transformer"][3]
    lines = ["| row | MQAR acc % | MQAR runs learned (95% CI) | val ppl | gutenberg test ppl | wikitext2 ppl | passkey % "
             "| decode tok/s (× Transformer) | paper tok/s (×) | cache MB @16k | paper cache MB | paper recall % "
             "| seeds | steps (MQAR / text) |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for row, (label, _, recall, tok_s, cache_mb) in PAPER_TABLE1.items():
        d = mean_spread(decode.get(row, []))[0]
        ratio = f"{d:.0f} ({d / base:.2f}×)" if not math.isnan(d) and base and not math.isnan(base) else "–"
        lines.append(
            f"| {label} | {_fmt(*mean_spread(mqar.get(row, [])), 100)} | {_learned(mqar.get(row, []))} "
            f"| {_fmt(*mean_spread(ppl.get(row, [])), 1, 2)} "
            f"| {_fmt(*mean_spread(gut.get(row, [])), 1, 2)} | {_fmt(*mean_spread(wiki.get(row, [])), 1, 2)} "
            f"| {_fmt(*mean_spread(passkey.get(row, [])), 100)} | {ratio} | {tok_s} ({tok_s / paper_base:.2f}×) "
            f"| {_fmt(*mean_spread(cache.get(row, [])), 1, 1)} | {cache_mb} | {recall} | {seeds.get(row, 0)} "
            f"| {_step_range(steps['mqar'].get(row))} / {_step_range(steps['text'].get(row))} |")
    if bench is not None and not bench.empty:
        lines += ["", _decode_steps_note(bench)]
    return "\n".join(lines)


def _decode_steps_note(bench) -> str:
    """Which decode step (compiled or eager) each row's tok/s was timed with: they differ by up to 2.3×."""
    compiled = {_row_key(str(model)): flag for model, flag in zip(bench["tags.model"], bench["compiled"])}
    modes = {}
    for row in PAPER_TABLE1:
        if row in compiled:
            modes.setdefault("compiled" if compiled[row] else "eager", []).append(_short_label(row))
    return "Decode tok/s timed with " + "; ".join(f"the {mode} step: {', '.join(rows)}"
                                                   for mode, rows in sorted(modes.items())) + "."


def _learned(accuracies: list[float]) -> str:
    """How many runs learned MQAR (test accuracy above 50%), with the 95% Wilson interval of the success rate:
    runs jump from the in-context-guess plateau to ~100% or stay, so this count says more than a mean over seeds,
    and the interval says how little a handful of seeds can rank."""
    runs = [a for a in accuracies if not math.isnan(a)]
    if not runs:
        return "–"
    learned = sum(a > 0.5 for a in runs)
    low, high = wilson_interval(learned, len(runs))
    return f"{learned}/{len(runs)} ({100 * low:.0f}–{100 * high:.0f}%)"


def wilson_interval(successes: int, trials: int, z: float = 1.96) -> tuple[float, float]:
    """Wilson score interval of a binomial rate (95% for z = 1.96); sound at 0 or n successes out of few trials,
    where the normal approximation collapses to a point."""
    p, z2 = successes / trials, z * z
    center = (p + z2 / (2 * trials)) / (1 + z2 / trials)
    half = z * math.sqrt(p * (1 - p) / trials + z2 / (4 * trials * trials)) / (1 + z2 / trials)
    return max(0.0, center - half), min(1.0, center + half)


def _mqar_vocabularies(runs) -> list[int]:
    column = "params.data.vocab_size"
    if runs.empty or column not in runs or "tags.task" not in runs:
        return []
    return sorted({int(v) for v in runs.loc[runs["tags.task"] == "mqar", column].dropna()})


def mqar_chance(runs) -> str:
    """The MQAR accuracy of a uniform guess among the values (half the task's vocabulary; Zoology's layout)."""
    vocabs = _mqar_vocabularies(runs)
    return "MQAR chance (a uniform guess among the vocab/2 values): " + ", ".join(
        f"{100 * 2 / v:.2f}% at vocabulary {v}" for v in vocabs) if vocabs else "MQAR chance: –"


def slice_table(runs) -> str:
    """Per row: MQAR accuracy by number of key-value pairs, validation loss on each task, and the attention analysis
    (entropy and share of attention on meta tokens per task; effective receptive field on MQAR)."""
    slices = sorted({int(c.rsplit("kv", 1)[1]) for c in runs.columns if c.startswith("metrics.recall/mqar_acc_kv")})
    columns = [(f"{k} pairs %", f"recall/mqar_acc_kv{k}", "mqar", 100, 1) for k in slices] + [
        ("MQAR val loss", "val/loss", "mqar", 1, 2), ("text val loss", "val/loss", "text", 1, 3),
        ("attention entropy MQAR (nats)", "analysis/attn_entropy", "mqar", 1, 2),
        ("attention entropy text (nats)", "analysis/attn_entropy", "text", 1, 2),
        ("attention on meta tokens MQAR %", "analysis/attn_share_meta", "mqar", 100, 0),
        ("attention on meta tokens text %", "analysis/attn_share_meta", "text", 100, 0),
        ("ERF (tokens)", "analysis/erf", "mqar", 1, 1)]
    values = [collect(runs, metric, task) for _, metric, task, _, _ in columns]
    lines = ["| row | " + " | ".join(c[0] for c in columns) + " |", "|---" * (len(columns) + 1) + "|"]
    for row, paper in PAPER_TABLE1.items():
        cells = [_fmt(*mean_spread(v.get(row, [])), scale, digits) for v, (_, _, _, scale, digits)
                 in zip(values, columns)]
        lines.append(f"| {paper[0]} | " + " | ".join(cells) + " |")
    return "\n".join(lines)


def _step_range(values: Optional[list[float]]) -> str:
    """Optimizer steps of a row's runs ("–" for runs that predate the train/steps metric)."""
    values = sorted({int(v) for v in values or [] if not math.isnan(v)})
    return "–" if not values else str(values[0]) if len(values) == 1 else f"{values[0]}–{values[-1]}"


def table9(runs, ratio_bench=None) -> str:
    """Recall per head count from the head_ratio sweep; decode tok/s and cache from bench runs tagged
    study=head_ratio (the 300M protocol) when given, else from the trials' own measurements."""
    lines = ["| attention heads | Attn:SSM params (ours) | MQAR acc % | MQAR answer ppl | seeds | decode tok/s "
             "| cache MB @16k | paper ratio | paper recall % | paper tok/s | paper cache MB |",
             "|---|---|---|---|---|---|---|---|---|---|---|"]
    if runs.empty or "tags.sweep.study_name" not in runs:
        return "\n".join(lines + ["| (no head_ratio sweep in this store) |||||||||||"])
    sweep = runs[runs["tags.sweep.study_name"] == "head_ratio"]
    sweep = sweep[sweep["params.model.n_heads"].notna()] if "params.model.n_heads" in sweep else sweep.iloc[0:0]
    heads = sorted({int(h) for h in sweep["params.model.n_heads"]})
    paper_rows = list(PAPER_TABLE9.values())
    for h in heads:
        sub = sweep[sweep["params.model.n_heads"].astype(int) == h]
        # Our head counts scale with the model (tiny: 0,1,2,4); pair them with the paper's rows by rank.
        rank = 0 if h == 0 else 1 + sorted(x for x in heads if x > 0).index(h)
        paper = paper_rows[rank] if rank < len(paper_rows) else ("–",) * 4
        speed, cache = list(sub["metrics.throughput/decode_tok_s"]), list(sub["metrics.cache/mb_16k"])
        if ratio_bench is not None and not ratio_bench.empty:
            at = ratio_bench[ratio_bench["tags.n_heads"].astype(int) == paper_heads(rank)]
            speed, cache = list(at.get("metrics.bench/decode_tok_s", [])), list(at.get("metrics.bench/cache_mb_16k", []))
        answer_ppl = [math.exp(v) for v in sub.get("metrics.val/loss", []) if not math.isnan(v)]
        lines.append(f"| {h} | {sub['tags.params.attn_to_ssm'].iloc[0]} "
                     f"| {_fmt(*mean_spread(list(sub['metrics.recall/mqar_acc'])), 100)} "
                     f"| {_fmt(*mean_spread(answer_ppl), 1, 1)} | {len(sub)} "
                     f"| {_fmt(*mean_spread(speed), 1, 0)} | {_fmt(*mean_spread(cache), 1, 3)} "
                     f"| {paper[0]} | {paper[1]} | {paper[2]} | {paper[3]} |")
    return "\n".join(lines)


def paper_heads(rank: int) -> int:
    """The paper's head count (0, 4, 8, 16 at 300M) of a Table 9 row, by rank."""
    return sorted(PAPER_TABLE9)[rank] if rank < len(PAPER_TABLE9) else -1


def _short_label(row: str) -> str:
    """A Table 1 row's letter or name for plots and per-run listings ("A", "Transformer", ...)."""
    return PAPER_TABLE1[row][0].split(" ")[0]


def _run_label(run) -> Optional[tuple[tuple, str]]:
    """(sort key, name) of a run in per-run listings: its Table 1 row, or its head count for head-ratio trials, and
    its seed. Table 1 rows sort in the paper's order, then the trials by head count."""
    row = _row_key(str(run.get("tags.model", "")))
    if row is None:
        return None
    seed = run.get("tags.seed")
    seed = f" s{seed}" if isinstance(seed, str) else ""
    heads = int(run["params.model.n_heads"]) if run.get("tags.sweep.study_name") == "head_ratio" else None
    key = (heads is not None, list(PAPER_TABLE1).index(row), heads or 0, seed)
    return key, _short_label(row) + (f", {heads} heads" if heads is not None else "") + seed


def mqar_curves(runs) -> list[tuple[str, list[tuple[int, float]]]]:
    """(label, [(step, validation MQAR accuracy)]) for every MQAR run, in `_run_label`'s order."""
    from mlflow.tracking import MlflowClient

    if runs.empty or "tags.task" not in runs:
        return []
    mqar = runs[runs["tags.task"] == "mqar"]
    name_lr = "params.optim.lr" in mqar and mqar["params.optim.lr"].nunique() > 1  # e.g. a learning-rate probe
    curves = []
    for _, run in mqar.iterrows():
        keyed = _run_label(run)
        if keyed is None:
            continue
        key, label = keyed
        if name_lr:
            label = f"{label} lr {run['params.optim.lr']}"
        history = MlflowClient(tracking_uri=run["store"]).get_metric_history(run["run_id"], "val/mqar_acc")
        if history:
            curves.append(((key, label), label, sorted((m.step, m.value) for m in history)))
    return [(label, points) for _, label, points in sorted(curves)]


def curves_table(curves) -> str:
    steps = sorted({step for _, points in curves for step, _ in points})
    lines = ["| run | " + " | ".join(str(s) for s in steps) + " |", "|---" * (len(steps) + 1) + "|"]
    for label, points in curves:
        at = dict(points)
        lines.append(f"| {label} | " + " | ".join(f"{100 * at[s]:.1f}" if s in at else "–" for s in steps) + " |")
    return "\n".join(lines)


def plot_curves(curves, path: Path) -> Optional[Path]:
    if not curves:
        return None
    fig, ax = plt.subplots(figsize=(7, 4.5))
    colours: dict[str, str] = {}
    for label, points in curves:
        kind = re.sub(r" s\d+", "", label)  # one colour and legend entry per row (or head count), one line per seed
        first = kind not in colours
        colour = colours.setdefault(kind, plt.get_cmap("tab20")(len(colours) % 20))
        ax.plot(*zip(*[(s, 100 * v) for s, v in points]), marker="o", markersize=3, color=colour,
                label=kind if first else None)
    ax.set_xlabel("training step")
    ax.set_ylabel("validation MQAR accuracy %")
    ax.set_title("MQAR learning curves, one line per run")
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_fig1(runs, bench, path: Path) -> Path:
    """Accuracy vs decode throughput, point size = cache (the paper's Fig. 1 view)."""
    mqar = collect(runs, "recall/mqar_acc", "mqar")
    decode, cache = _speed_and_cache(runs, bench)
    fig, ax = plt.subplots(figsize=(6.5, 4.5))
    for row in PAPER_TABLE1:
        acc, tok = mean_spread(mqar.get(row, []))[0], mean_spread(decode.get(row, []))[0]
        if math.isnan(acc) or math.isnan(tok):
            continue
        mb = mean_spread(cache.get(row, []))[0]
        # Named in the legend, not beside the point: rows of about the same speed and accuracy (C and E) overlap.
        ax.scatter(tok, 100 * acc, s=20 + (0 if math.isnan(mb) else 3 * math.sqrt(mb)), alpha=0.6,
                   label=_short_label(row))
    for vocab in _mqar_vocabularies(runs):
        ax.axhline(100 * 2 / vocab, color="grey", linestyle="--", linewidth=0.8, label=f"chance (vocabulary {vocab})")
    if ax.get_legend_handles_labels()[0]:
        ax.legend(fontsize=8, markerscale=0.6)
    ax.set_xscale("log")
    ax.set_xlabel("decode tokens/s")
    ax.set_ylabel("MQAR accuracy %")
    ax.set_title("Accuracy vs throughput; point area ~ cache at 16k")
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
    return path


def plot_erf_vs_cache(runs, bench, path: Path) -> Optional[Path]:
    from .evaluation.plots import plot_erf_vs_cache as draw

    erf = collect(runs, "analysis/erf", "mqar")
    cache = _speed_and_cache(runs, bench)[1]
    points = [(_short_label(r), mean_spread(cache.get(r, []))[0], mean_spread(erf[r])[0])
              for r in erf if r in cache]
    return draw(points, path) if points else None


def attention_shares(runs, task: str) -> dict[str, dict[str, float]]:
    """The mean share of attention on meta, BOS, self and cross keys (over seeds) of each Table 1 row's attention
    heads and SSM heads on one task (Fig. 8), in the paper's row order; rows or kinds without the metrics are left
    out."""
    from .evaluation.plots import SHARE_CATEGORIES

    kinds = (("attn", "attention"), ("ssm", "SSM"))
    by_row = {(kind, c): collect(runs, f"analysis/{kind}_share_{c}", task)
              for kind, _ in kinds for c in SHARE_CATEGORIES}
    shares: dict[str, dict[str, float]] = {}
    for row in PAPER_TABLE1:
        for kind, heads in kinds:
            means = {c: mean_spread(by_row[kind, c].get(row, []))[0] for c in SHARE_CATEGORIES}
            if not any(math.isnan(mean) for mean in means.values()):
                shares[f"{_short_label(row)}\n{heads}"] = means  # two lines: the bars are narrow
    return shares


def plot_attention_shares(runs, task: str, path: Path) -> Optional[Path]:
    from .evaluation.plots import plot_attention_share

    shares = attention_shares(runs, task)
    return plot_attention_share(shares, path) if shares else None


def plot_entropy(runs, task: str, path: Path) -> Optional[Path]:
    """Attention entropy per layer of the trained E (meta tokens) and D (none) models on one task (Fig. 9)."""
    import pandas as pd
    import torch

    from .evaluation.plots import plot_entropy_per_layer

    def per_layer(row: str) -> Optional[torch.Tensor]:
        if runs.empty:
            return None
        in_sweep = runs.get("tags.sweep.study_name", pd.Series(None, index=runs.index)).notna()
        on_task = runs.get("tags.task", pd.Series(task, index=runs.index)) == task
        sub = runs[runs.get("tags.model", pd.Series("", index=runs.index)).map(lambda m: _row_key(str(m)) == row)
                   & ~in_sweep & on_task]
        cols = sorted((c for c in sub.columns if c.startswith("metrics.analysis/attn_entropy_layer")),
                      key=lambda c: int(c.rsplit("layer", 1)[1]))
        if sub.empty or not cols:
            return None
        return torch.tensor([[sub[c].mean()] for c in cols if not math.isnan(sub[c].mean())])

    with_meta, without = per_layer("roadmap_e"), per_layer("roadmap_d")
    if with_meta is None or without is None:
        return None
    return plot_entropy_per_layer(with_meta, without, path)


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arch_lab.report", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--tracking-uri", nargs="+", default=["sqlite:///mlruns.db"],
                        help="one or more MLflow stores holding the study's training runs")
    parser.add_argument("--experiment", default=lab_experiment(),
                        help="the training runs' experiment (default: %(default)s, the lab's; the roadmap study: "
                             "roadmap)")
    parser.add_argument("--bench-uri", nargs="+", default=None,
                        help="MLflow store(s) holding `python -m arch_lab.bench` runs")
    parser.add_argument("--bench-experiment", default=lab_experiment(), help="default: %(default)s")
    parser.add_argument("--out", default="roadmap_report")
    args = parser.parse_args(argv)
    for flag, uris in (("--tracking-uri", args.tracking_uri), ("--bench-uri", args.bench_uri or [])):
        for uri in uris:
            existing_store(uri, flag)
    runs = _runs(args.tracking_uri, args.experiment)
    bench, ratio_bench = _split_bench(_runs(args.bench_uri, args.bench_experiment) if args.bench_uri else None)
    out = Path(args.out)
    text = ["# Roadmap study (generated by `python -m arch_lab.report`)", "", "## Table 1", "", table1(runs, bench),
            "", mqar_chance(runs), "", "## MQAR by slice, losses and attention analysis (Table 1 rows)", "",
            slice_table(runs), "", "## Table 9 rows 1–4 (head ratio at fixed size)", "",
            table9(runs, ratio_bench), ""]
    curves = mqar_curves(runs)
    if curves:
        text += ["## MQAR validation accuracy % by step, per run", "",
                 "Steps as Lightning logs them: validation after 200 training steps is logged at step 199.", "",
                 curves_table(curves), ""]
    try:
        out.mkdir(parents=True, exist_ok=True)
        (out / "tables.md").write_text("\n".join(text))
    except OSError as error:  # the plots go to the same folder
        raise SystemExit(f"--out {args.out}: cannot write the report there ({error.strerror}: "
                         f"{error.filename})") from None
    plot_fig1(runs, bench, out / "fig1_accuracy_throughput_cache.png")
    plot_erf_vs_cache(runs, bench, out / "fig3_erf_vs_cache.png")
    plot_curves(curves, out / "mqar_learning_curves.png")
    for task in ("mqar", "text"):
        plot_attention_shares(runs, task, out / f"fig8_attention_share_{task}.png")
        plot_entropy(runs, task, out / f"fig9_entropy_per_layer_{task}.png")
    print("\n".join(text))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
