"""The benchmark's results as a table (rows = measurements) and as `bench_results.json`, both MLflow artifacts."""
from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

# metric name -> (row label, unit), in table order. Metrics not listed here (e.g. cache_mb at other lengths)
# are placed by `_row_spec`.
ROWS: dict[str, tuple[str, str]] = {
    "bench/decode_tok_s": ("decode, cached", "tok/s"),
    "bench/decode_batch": ("decode batch used", "sequences"),
    "bench/decode_ms_per_step": ("decode step", "ms"),
    "bench/decode_bw_bound_tok_s": ("decode, memory-bandwidth bound", "tok/s"),
    "bench/decode_bw_fraction": ("decode / bound", "fraction"),
    "bench/profile_kernel_ms_per_step": ("decode step, summed kernel time (profiled, no CUDA graph)", "ms"),
    "bench/profile_kernels_per_step": ("decode step, kernel launches (profiled, no CUDA graph)", "kernels"),
    "bench/profile_wall_ms_per_step": ("decode step under the profiler (no CUDA graph)", "ms"),
    "bench/profile_batch": ("profile batch used", "sequences"),
    "bench/prefill_tok_s": ("prefill, cached", "tok/s"),
    "bench/recompute_tok_s": ("decode, full recompute (no cache)", "tok/s"),
    "bench/recompute_batch": ("recompute batch used", "sequences"),
    "bench/decode_speedup_vs_recompute": ("cached decode speedup vs recompute", "x"),
    "bench/hf_decode_tok_s": ("decode, HF transformers generate", "tok/s"),
    "bench/hf_batch": ("HF batch used", "sequences"),
    "bench/decode_speedup_vs_hf": ("decode speedup vs HF generate", "x"),
    "bench/train_tok_s": ("training", "tok/s"),
    "bench/train_batch": ("training batch used", "sequences"),
    "bench/train_mfu": ("training MFU", "fraction"),
    "bench/train_flops_per_token": ("training FLOPs per token", "FLOP"),
    "bench/train_profile_kernel_ms_per_step": ("training step, summed kernel time (profiled)", "ms"),
    "bench/train_profile_kernels_per_step": ("training step, kernel launches (profiled)", "kernels"),
    "bench/train_profile_wall_ms_per_step": ("training step under the profiler", "ms"),
    "bench/train_profile_batch": ("train profile batch used", "sequences"),
    "bench/peak_tflops": ("peak matmul throughput", "TFLOP/s"),
    "bench/bandwidth_gbs": ("memory bandwidth (read + write)", "GB/s"),
    "bench/state_bytes": ("inference state allocated (decode run)", "bytes"),
    "bench/params": ("parameters", "count"),
}


@dataclass(frozen=True)
class Row:
    measurement: str
    value: float
    unit: str


def _row_spec(metric: str) -> tuple[str, str]:
    if metric in ROWS:
        return ROWS[metric]
    if metric.endswith("_peak_gib"):
        return f"{metric.removeprefix('bench/').removesuffix('_peak_gib')} peak GPU memory", "GiB"
    if metric.startswith("bench/cache_mb_"):
        return f"cache at {metric.rsplit('_', 1)[-1]} tokens (paper: fp16, no meta, batch 1)", "MB"
    return metric.removeprefix("bench/"), ""


def table_rows(metrics: dict[str, float]) -> list[Row]:
    order = list(ROWS)
    ranked = sorted(metrics, key=lambda k: (order.index(k) if k in ROWS else len(order), k))
    rows = []
    for key in ranked:
        label, unit = _row_spec(key)
        rows.append(Row(label, metrics[key], unit))
    return rows


def _format_value(value: float) -> str:
    if float(value).is_integer() and abs(value) < 1e15:
        return f"{int(value):,}"
    return f"{value:,.1f}" if abs(value) >= 1000 else f"{value:.4g}"


def format_table(rows: list[Row], title: str) -> str:
    cells = [("measurement", "value", "unit")] + [(r.measurement, _format_value(r.value), r.unit) for r in rows]
    widths = [max(len(c[i]) for c in cells) for i in range(3)]
    lines = [title, "-" * (sum(widths) + 4)]
    for i, (name, value, unit) in enumerate(cells):
        lines.append(f"{name:<{widths[0]}}  {value:>{widths[1]}}  {unit}".rstrip())
        if i == 0:
            lines.append("-" * (sum(widths) + 4))
    return "\n".join(lines)


def results_document(metrics: dict[str, float], info: dict[str, Any]) -> dict[str, Any]:
    """What `bench_results.json` holds: the run's description (model, device, settings, notes) and metrics."""
    return {**info, "metrics": dict(sorted(metrics.items()))}


def write_report(metrics: dict[str, float], info: dict[str, Any], title: str, out_dir: Path) -> tuple[Path, Path]:
    """Write `bench_results.json` and `bench_table.txt` to `out_dir`; returns their paths."""
    out_dir.mkdir(parents=True, exist_ok=True)
    json_path, table_path = out_dir / "bench_results.json", out_dir / "bench_table.txt"
    json_path.write_text(json.dumps(results_document(metrics, info), indent=2) + "\n")
    table_path.write_text(format_table(table_rows(metrics), title) + "\n")
    return json_path, table_path


def log_report(json_path: Path, table_path: Path) -> None:
    import mlflow

    mlflow.log_artifact(str(json_path))
    mlflow.log_artifact(str(table_path))
