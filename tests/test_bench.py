"""arch_lab.bench: the Hydra app end to end (MLflow run, metrics, artifacts), OOM halving, FLOPs and byte counts.

The app runs once, in a subprocess, as a Hydra multirun over a Llama-style and a hybrid tiny model (two MLflow
runs in one SQLite store). No timing is asserted: values are checked for sign, for the batch actually used, and against
the formulas they come from.
"""
from __future__ import annotations

import json
import math
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from hydra import compose, initialize_config_dir

from arch_lab.bench.__main__ import BenchConfigError, BenchSettings
from arch_lab.bench.flops import (
    attention_context,
    decode_bandwidth_bound_tok_s,
    decode_bytes_per_step,
    kv_consumer_bytes,
    matmul_params,
    model_flops_utilization,
    scan_flops_per_token,
    train_flops_per_token,
    weight_bytes,
)
from arch_lab.bench.measure import BatchDoesNotFitError, halve_batch_on_oom
from arch_lab.bench.report import format_table, table_rows
from components.cache_accounting import cache_bytes, paper_cache_mb
from components.config import ModelConfig
from components.param_count import build_on_meta
from components.presets import preset

REPO = Path(__file__).resolve().parents[1]
CONTEXT, BATCH, NEW_TOKENS, TRAIN_SEQ_LEN = 24, 2, 4, 24
APP_OVERRIDES = [f"context={CONTEXT}", f"batch={BATCH}", f"new_tokens={NEW_TOKENS}", "recompute_new_tokens=2",
                 f"train_seq_len={TRAIN_SEQ_LEN}", "train_batch=2", "train_steps=1", "train_warmup_steps=1",
                 "warmup_steps=1", "measure=[decode,prefill,train,recompute,hf,train_profile]", "profile_steps=1"]
COMMON_METRICS = ["bench/decode_tok_s", "bench/decode_batch", "bench/prefill_tok_s", "bench/train_tok_s",
                  "bench/train_mfu", "bench/recompute_tok_s", "bench/decode_speedup_vs_recompute",
                  "bench/decode_bw_bound_tok_s", "bench/decode_bw_fraction", "bench/cache_mb_16k",
                  "bench/state_bytes", "bench/params", "bench/train_profile_wall_ms_per_step"]
HF_METRICS = ["bench/hf_decode_tok_s", "bench/decode_speedup_vs_hf"]


# ---------------------------------------------------------------------------- the app, end to end
@pytest.fixture(scope="module")
def bench_runs(tmp_path_factory: pytest.TempPathFactory) -> dict[str, dict]:
    """One `python -m arch_lab.bench -m model=transformer,roadmap_e ...` (a Hydra multirun: one process, two runs)."""
    root = tmp_path_factory.mktemp("bench")
    env = {k: v for k, v in os.environ.items() if not k.startswith("MLFLOW_")}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1")
    models = ("transformer", "roadmap_e")
    cmd = [sys.executable, "-m", "arch_lab.bench", "-m", f"model={','.join(models)}", *APP_OVERRIDES,
           f"logger.tracking_uri=sqlite:///{root / 'mlruns.db'}", f"hydra.sweep.dir={root / 'multirun'}"]
    proc = subprocess.run(cmd, cwd=root, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    from mlflow import MlflowClient

    client = MlflowClient(f"sqlite:///{root / 'mlruns.db'}")
    found = client.search_runs([client.get_experiment_by_name("arch_lab").experiment_id],
                               filter_string="tags.bench = 'true'")
    assert sorted(run.data.tags["model"] for run in found) == sorted(f"{m}_tiny" for m in models)
    runs = {}
    for job, model in enumerate(models):
        run = next(r for r in found if r.data.tags["model"] == f"{model}_tiny")
        artifacts = Path(client.download_artifacts(run.info.run_id, "", str(root / f"artifacts_{model}")))
        runs[model] = {"run": run, "artifacts": artifacts, "stdout": proc.stdout, "out": root / "multirun" / str(job)}
    return runs


@pytest.mark.slow
@pytest.mark.parametrize("model_name", ["transformer", "roadmap_e"])
def test_bench_run_logs_sane_metrics(bench_runs: dict[str, dict], model_name: str):
    run = bench_runs[model_name]["run"]
    metrics, tags = run.data.metrics, run.data.tags
    assert run.info.status == "FINISHED"
    assert tags["bench"] == "true" and tags["model"] == f"{model_name}_tiny" and tags["dtype"] == "float32"
    assert tags["device"].endswith("CPU")
    # the kernel-or-reference choice is logged: no CUDA here, so every op ran its reference
    assert "cuda=unavailable" in tags["backends"] and "mamba_ssm=" in tags["backends"]
    expected = COMMON_METRICS + (HF_METRICS if model_name == "transformer" else [])
    missing = [name for name in expected if name not in metrics]
    assert not missing
    assert all(metrics[name] > 0 for name in expected)
    assert metrics["bench/decode_batch"] == BATCH
    assert 0 < metrics["bench/decode_bw_fraction"] < 1.5

    model = build_on_meta(preset(model_name, "tiny"))
    assert metrics["bench/params"] == sum(p.numel() for p in model.parameters())
    assert metrics["bench/state_bytes"] == cache_bytes(model, CONTEXT + NEW_TOKENS, BATCH, 4).total
    assert metrics["bench/cache_mb_16k"] == pytest.approx(paper_cache_mb(model, 16384))
    # Derived metrics follow from the measured ones by the documented formulas.
    assert metrics["bench/decode_bw_fraction"] == pytest.approx(
        metrics["bench/decode_tok_s"] / metrics["bench/decode_bw_bound_tok_s"])
    assert metrics["bench/decode_bw_bound_tok_s"] == pytest.approx(decode_bandwidth_bound_tok_s(
        model, BATCH, CONTEXT, NEW_TOKENS, 4, metrics["bench/bandwidth_gbs"]))
    assert metrics["bench/decode_speedup_vs_recompute"] == pytest.approx(
        metrics["bench/decode_tok_s"] / metrics["bench/recompute_tok_s"])
    assert metrics["bench/train_mfu"] == pytest.approx(model_flops_utilization(
        metrics["bench/train_tok_s"], train_flops_per_token(model, TRAIN_SEQ_LEN), metrics["bench/peak_tflops"]))


@pytest.mark.slow
def test_llama_style_run_times_hf_generate_and_non_llama_run_skips_it(bench_runs: dict[str, dict]):
    llama, hybrid = bench_runs["transformer"]["run"], bench_runs["roadmap_e"]["run"]
    assert "bench.hf_skipped" not in llama.data.tags
    assert llama.data.metrics["bench/hf_batch"] == BATCH
    assert llama.data.metrics["bench/decode_speedup_vs_hf"] == pytest.approx(
        llama.data.metrics["bench/decode_tok_s"] / llama.data.metrics["bench/hf_decode_tok_s"])
    assert hybrid.data.tags["bench.hf_skipped"].startswith("not Llama-style: model.layers='hybrid'")
    assert not any(name.startswith("bench/hf_") for name in hybrid.data.metrics)


@pytest.mark.slow
def test_results_json_and_table_are_artifacts(bench_runs: dict[str, dict]):
    info = bench_runs["transformer"]
    results = json.loads((info["artifacts"] / "bench_results.json").read_text())
    assert results["mlflow_run_id"] == info["run"].info.run_id
    assert results["metrics"] == pytest.approx(info["run"].data.metrics)
    assert results["settings"]["batch"] == BATCH and results["settings"]["measure"] == list(
        ("decode", "prefill", "train", "recompute", "hf", "train_profile"))
    table = (info["artifacts"] / "bench_table.txt").read_text()
    assert table == (info["out"] / "bench_table.txt").read_text()
    assert table.splitlines()[2].split() == ["measurement", "value", "unit"]
    assert table.strip() in info["stdout"]
    assert {"config.yaml", "layer_plan.txt"} <= {p.name for p in info["artifacts"].iterdir()}
    # measure=[train_profile]: the profiled training step's operators, AdamW's update among them, and the step's
    # top-level operators in order (one profiled step: one update, after the forward)
    assert "Optimizer.step#AdamW.step" in (info["artifacts"] / "train_profile.txt").read_text()
    timeline = [line.split(maxsplit=2)[2] for line in
                (info["artifacts"] / "train_profile_timeline.txt").read_text().splitlines()[1:]]
    assert timeline.count("Optimizer.step#AdamW.step") == 1
    assert timeline.index("aten::embedding") < timeline.index("Optimizer.step#AdamW.step")


# ---------------------------------------------------------------------------- config validation
def _settings(*overrides: str, cuda: bool = False) -> BenchSettings:
    with initialize_config_dir(config_dir=str(REPO / "conf"), version_base="1.3"):
        cfg = compose(config_name="bench", overrides=list(overrides))
    return BenchSettings.from_cfg(cfg, cuda_available=cuda)


def test_defaults_resolve_per_device():
    cpu, gpu = _settings(), _settings(cuda=True)
    assert (cpu.device, cpu.dtype, gpu.device, gpu.dtype) == ("cpu", "float32", "cuda", "bfloat16")
    assert cpu.measure == ("decode", "prefill", "train", "recompute", "hf")
    assert cpu.peak_tflops is None and _settings("peak_tflops=989").peak_tflops == 989.0
    assert cpu.decode_pdl is True and _settings("decode_pdl=false").decode_pdl is False


def test_a_list_key_given_one_bare_value_is_a_one_item_list():
    """measure=decode is read as measure=[decode], not letter by letter (unknown measurement(s) ['d', 'e', ...])."""
    assert _settings("measure=decode").measure == ("decode",)
    assert _settings("cache_lengths=16384").cache_lengths == (16384,)
    with pytest.raises(BenchConfigError, match=r"^measure: unknown measurement\(s\) \['speed'\]; allowed: decode,"):
        _settings("measure=speed")


@pytest.mark.parametrize("override, message", [
    ("measure=[decode,speed]", "measure: unknown measurement(s) ['speed']; allowed: decode, prefill, train, "
                               "recompute, hf, profile, train_profile"),
    ("profile_steps=0", "profile_steps must be an integer >= 1, got 0"),
    ("dtype=int8", "dtype must be one of auto, float32, bfloat16, float16; got 'int8'"),
    ("device=tpu", "device must be one of auto, cpu, cuda, cuda:<index>; got 'tpu'"),
    ("device=cuda", "device='cuda' but no CUDA device is visible; use device=auto or cpu"),
    ("batch=0", "batch must be an integer >= 1, got 0"),
    ("bandwidth_gbs=-3", "bandwidth_gbs must be 'auto' or a positive number, got -3"),
    ("new_tokens=1", "new_tokens must be >= 2 when measure includes hf"),
    ("cuda_graph=sometimes", "cuda_graph must be auto, true or false; got 'sometimes'"),
    ("decode_pdl=yes", "decode_pdl must be true or false; got 'yes'"),
    ("compile_decode=maybe", "compile_decode must be true or false; got 'maybe'"),  # bool('maybe') was true
    ("halve_on_oom=maybe", "halve_on_oom must be true or false; got 'maybe'"),
    ("compile=1", "compile must be true or false; got 1"),
    ("logger.log_checkpoints=true", "logger.log_checkpoints: the bench trains no model to checkpoint; leave it false"),
])
def test_bad_bench_keys_are_named(override: str, message: str):
    with pytest.raises(BenchConfigError) as error:
        _settings(override)
    assert str(error.value).startswith(message)


@pytest.mark.parametrize("override, message", [("batch=0", "batch must be an integer >= 1, got 0"),
                                               ("model.window=-3", "model.window: must be an int >= 1 or null"),
                                               ("logger.tracking_uri=bogus://x", "logger.tracking_uri=bogus://x: "
                                                                                "MLflow has no store for bogus://")])
@pytest.mark.parametrize("full_error", [False, True])
def test_a_bad_key_is_one_line_unless_hydra_full_error(tmp_path: Path, override: str, message: str,
                                                       full_error: bool):
    """As `python -m arch_lab`: a BenchConfigError or the lab's ConfigError is logged as its message with exit
    status 1 (Hydra printed it with a traceback of 14 to 35 lines); HYDRA_FULL_ERROR=1 keeps the traceback."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "HYDRA_"))}
    env.update(PYTHONPATH=os.pathsep.join([str(REPO), env.get("PYTHONPATH", "")]), OMP_NUM_THREADS="1",
               **({"HYDRA_FULL_ERROR": "1"} if full_error else {}))
    proc = subprocess.run([sys.executable, "-m", "arch_lab.bench", f"hydra.run.dir={tmp_path / 'run'}",
                           f"logger.tracking_uri=sqlite:///{tmp_path / 'mlruns.db'}", override],  # the last value wins
                          cwd=tmp_path, env=env, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 1
    output = proc.stdout + proc.stderr
    assert message in output
    assert ("Traceback" in output) == full_error
    if not full_error:
        assert len(output.strip().splitlines()) == 1


def test_sequences_longer_than_the_model_are_refused():
    settings = _settings("context=1000", "new_tokens=30")
    with pytest.raises(BenchConfigError, match=r"^context \+ new_tokens = 1030 is longer than model.max_seq_len=1024"):
        settings.check_lengths(1024)
    _settings("context=1000", "new_tokens=24").check_lengths(1024)
    with pytest.raises(BenchConfigError, match=r"^context \+ profile_steps \+ 1 = 1025 is longer than model"):
        _settings("context=1000", "new_tokens=2", "measure=[profile]", "profile_steps=24").check_lengths(1024)


@pytest.mark.parametrize("compile", [False, pytest.param(True, marks=pytest.mark.slow)])
def test_decode_profile_covers_exactly_the_profiled_steps(compile):
    from arch_lab.bench.measure import profile_decode_steps
    from components.model import HybridLM

    torch.manual_seed(0)
    layers = 2 if compile else 6  # compiling is the slow part
    model = HybridLM(preset("roadmap_e", "tiny", n_layers=layers, param_budget=None)).eval()
    result = profile_decode_steps(model, batch=2, context=8, steps=3, compile=compile)
    # each layer attends once per profiled step (eager), or each step enters the compiled graph once; the prefill
    # and the warm-up step (which compiles) are left out
    calls = {re.split(r"\s{2,}", line.strip())[0]: int(line.split()[-1]) for line in result.table.splitlines()[3:-3]}
    # the timeline: the last step alone, its top-level operators in order, each with its CPU time
    header, *rows = result.timeline.splitlines()
    assert header.startswith("# the last of 3 profiled steps:")
    names = [row.split(maxsplit=2)[2] for row in rows]
    assert [int(row.split()[0]) for row in rows] == list(range(len(rows)))
    assert all(float(row.split()[1]) >= 0 for row in rows)
    if compile:  # one compiled region (its frame number depends on what this process compiled before)
        regions = [n for name, n in calls.items() if name.startswith("Torch-Compiled Region")]
        assert regions == [3] and "aten::scaled_dot_product_attention" not in calls
        assert sum(name.startswith("Torch-Compiled Region") for name in names) == 1
    else:
        assert calls["aten::scaled_dot_product_attention"] == layers * 3
        assert names.count("aten::scaled_dot_product_attention") == layers
    assert (result.steps, result.kernels_per_step, result.kernel_ms_per_step) == (3, 0, 0)  # a CPU has no kernels
    assert result.wall_ms_per_step > 0


def test_train_profile_covers_exactly_the_profiled_steps_and_leaves_the_model_clean():
    from arch_lab.bench.measure import measure_train_throughput
    from components.model import HybridLM

    torch.manual_seed(0)
    model = HybridLM(preset("roadmap_e", "tiny"))
    timing = measure_train_throughput(model, batch=2, seq_len=16, steps=1, warmup_steps=1, profile=2)
    assert timing.tokens_per_s > 0 and timing.profile.steps == 2
    # one AdamW update per profiled step: the warm-up and the timed step are outside the profile
    update = next(line for line in timing.profile.table.splitlines()
                  if line.split() and line.split()[0] == "Optimizer.step#AdamW.step")
    assert int(update.split()[-1]) == 2
    # a retry at a smaller batch (out of memory) starts from a model without gradients, in eval mode
    assert not model.training and all(p.grad is None for p in model.parameters())
    assert measure_train_throughput(model, batch=1, seq_len=8, steps=1, warmup_steps=0).profile is None


# ---------------------------------------------------------------------------- out-of-memory halving
class FakeMeasurement:
    """Raises out-of-memory above `fits` rows and records every batch it was called with."""

    def __init__(self, fits: int, error: type[BaseException] = torch.cuda.OutOfMemoryError):
        self.fits, self.error, self.tried = fits, error, []

    def __call__(self, batch: int) -> str:
        self.tried.append(batch)
        if batch > self.fits:
            raise self.error("CUDA out of memory. Tried to allocate 2.00 GiB")
        return f"measured at {batch}"


@pytest.fixture
def frees(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """Counts the memory releases between attempts (a full gc.collect() takes seconds in a big test process)."""
    calls: list[int] = []
    monkeypatch.setattr("arch_lab.bench.measure.free_device_memory", lambda: calls.append(1))
    return calls


def test_oom_halves_until_the_batch_fits(frees: list[int]):
    fake = FakeMeasurement(fits=40)
    assert halve_batch_on_oom(fake, 128, "decode") == ("measured at 32", 32)
    assert fake.tried == [128, 64, 32]
    assert len(frees) == 2  # memory is released after each out-of-memory attempt


def test_runtime_error_saying_out_of_memory_also_halves(frees: list[int]):
    fake = FakeMeasurement(fits=5, error=RuntimeError)
    assert halve_batch_on_oom(fake, 12, "hf") == ("measured at 3", 3)
    assert fake.tried == [12, 6, 3]


def test_batch_one_out_of_memory_is_a_clear_error(frees: list[int]):
    fake = FakeMeasurement(fits=0)
    with pytest.raises(BatchDoesNotFitError, match=r"^train: even batch 1 runs out of memory \(CUDA out of memory"):
        halve_batch_on_oom(fake, 4, "train")
    assert fake.tried == [4, 2, 1]


def test_without_halving_the_first_out_of_memory_is_an_error(frees: list[int]):
    fake = FakeMeasurement(fits=8)
    with pytest.raises(BatchDoesNotFitError, match="decode: batch 16 ran out of memory .* and halve_on_oom=false"):
        halve_batch_on_oom(fake, 16, "decode", enabled=False)
    assert fake.tried == [16]


def test_other_errors_are_not_mistaken_for_out_of_memory():
    def broken(batch: int):
        raise RuntimeError("shape mismatch")

    with pytest.raises(RuntimeError, match="shape mismatch"):
        halve_batch_on_oom(broken, 8, "decode")


# ---------------------------------------------------------------------------- FLOPs and bytes by hand
# Two hybrid layers: layer 0 global, layer 1 sliding window 6; 2 query heads, 1 KV head, qk 4, v 8 (= 16 / 2),
# Mamba-1 d_inner 16, d_state 4, d_conv 3, dt_rank 2; SwiGLU 12; 2 meta tokens; vocab 10, d_model 8.
HAND_CONFIG = ModelConfig(vocab_size=10, d_model=8, n_layers=2, layers="hybrid", n_heads=2, n_kv_heads=1,
                          qk_head_dim=4, ssm_inner=16, d_state=4, d_conv=3, dt_rank=2, ffn_dim=12, window=6,
                          global_layers="first", n_meta_tokens=2, max_seq_len=64)


def test_train_flops_per_token_by_hand():
    model = build_on_meta(HAND_CONFIG)
    in_proj = 8 * ((2 * 4 + 1 * (4 + 8)) + 2 * 16)  # [q | k v] attention slice + [x | z] SSM slice
    out_proj = 16 * 8
    conv, x_proj, dt_proj = 16 * 3, 16 * (2 + 2 * 4), 2 * 16
    ffn = 8 * 2 * 12 + 12 * 8
    n_matmul = 2 * (in_proj + out_proj + conv + x_proj + dt_proj + ffn) + 10 * 8  # + LM head
    assert matmul_params(model) == n_matmul == 2224
    seq = 20
    # query i of 20 sees i keys (global layer) or min(i, 6) (window 6), plus the 2 meta tokens
    ctx_global, ctx_local = 210 / seq + 2, (21 + 6 * 14) / seq + 2
    attention = 2 * 2 * (4 + 8) * (ctx_global + ctx_local)
    scan = 2 * 9 * 16 * 4
    assert train_flops_per_token(model, seq) == pytest.approx(6 * n_matmul + 3 * (attention + scan)) == 19644
    for length, window in ((100, 6), (8, 6), (8, None), (1, 4), (2048, 1024)):
        seen = sum(min(i, window or length) for i in range(1, length + 1)) / length
        assert attention_context(length, window, 2) == pytest.approx(seen + 2)
    mamba2 = build_on_meta(preset("mamba2", "tiny"))
    assert scan_flops_per_token(mamba2) == sum(6 * l.mixer.ssm.d_inner * l.mixer.ssm.d_state for l in mamba2.layers)
    assert scan_flops_per_token(build_on_meta(preset("transformer", "tiny"))) == 0
    assert model_flops_utilization(1000.0, 2e9, 4.0) == 0.5


def test_decode_bandwidth_bound_by_hand():
    # Two global attention layers, 2 query heads, 1 KV head of 4 + 4, SwiGLU 12, vocab 10, d_model 8.
    model = build_on_meta(ModelConfig(vocab_size=10, d_model=8, n_layers=2, layers="attention", n_heads=2,
                                      n_kv_heads=1, qk_head_dim=4, ffn_dim=12, max_seq_len=64))
    per_layer = 8 * (2 * 4 + 1 * (4 + 4)) + 8 * 8 + 8 * 2 * 12 + 12 * 8 + 2 * 8  # in/out proj, FFN, two norms
    weights = (2 * per_layer + 10 * 8 + 8) * 2  # + tied embedding, final norm; bf16
    kv_per_token = 2 * 1 * (4 + 4) * 2  # layers x KV heads x (k + v) x bf16
    batch, context = 3, 10
    assert decode_bytes_per_step(model, batch, 11, 2) == weights + batch * 11 * kv_per_token
    total = sum(weights + batch * length * kv_per_token for length in (11, 12))  # 2 steps read 11 then 12 keys
    assert decode_bandwidth_bound_tok_s(model, batch, context, 2, 2, 100.0) == pytest.approx(
        batch * 2 * 100e9 / total)


def test_decode_bound_counts_a_kv_consumers_read_of_its_producers_ring():
    """Two local layers sharing one ring: the step reads the ring (+ meta) twice, once per layer's attention."""
    shared = dict(vocab_size=10, d_model=8, n_layers=2, layers="attention", n_heads=2, n_kv_heads=1, qk_head_dim=4,
                  ffn_dim=12, max_seq_len=64, window=6, global_layers="none", n_meta_tokens=3)
    model = build_on_meta(ModelConfig(**shared, kv_share=2))
    unshared = build_on_meta(ModelConfig(**shared))
    ring = (3 + 6) * 1 * (4 + 4) * 2  # (meta + window) x KV heads x (k + v) x bf16, per row
    batch = 5
    assert kv_consumer_bytes(model, batch, 11, 2) == batch * ring and kv_consumer_bytes(unshared, batch, 11, 2) == 0
    # The consumer owns no K/V projection and no cache; it reads its producer's ring as the owner of its own would.
    assert decode_bytes_per_step(unshared, batch, 11, 2) - decode_bytes_per_step(model, batch, 11, 2) == (
        weight_bytes(unshared, 2) - weight_bytes(model, 2))


# ---------------------------------------------------------------------------- report
def test_table_rows_follow_the_documented_order_and_units():
    metrics = {"bench/params": 1234.0, "bench/cache_mb_16k": 16.78, "bench/decode_tok_s": 1500.5,
               "bench/train_mfu": 0.25}
    rows = table_rows(metrics)
    assert [(r.measurement, r.unit) for r in rows] == [
        ("decode, cached", "tok/s"), ("training MFU", "fraction"), ("parameters", "count"),
        ("cache at 16k tokens (paper: fp16, no meta, batch 1)", "MB")]
    lines = format_table(rows, "title").splitlines()
    assert lines[0] == "title" and lines[2].split() == ["measurement", "value", "unit"]
    assert lines[4].split()[-2:] == ["1,500.5", "tok/s"] and lines[-2].split()[-2:] == ["1,234", "count"]
    assert math.isclose(float(lines[-1].split()[-2]), 16.78)


def test_missing_transformers_skips_hf_with_a_reason(monkeypatch: pytest.MonkeyPatch):
    import arch_lab.bench.__main__ as app

    monkeypatch.setattr(app.importlib.util, "find_spec", lambda name: None)
    assert app.hf_skip_reason(preset("transformer", "tiny")) == \
        "transformers is not installed (pip install transformers)"
    assert app.hf_skip_reason(preset("roadmap_e", "tiny")).startswith("not Llama-style: ")


def test_help_lists_the_groups_the_bench_reads_and_not_the_training_runs():
    """The bench shares conf/ with `python -m arch_lab`; Hydra's default help listed all its groups, and
    experiment=... then failed in the bench with "Could not override 'experiment'"."""
    out = subprocess.run([sys.executable, "-m", "arch_lab.bench", "--help"], capture_output=True, text=True,
                         check=True).stdout
    assert out.startswith("arch_lab.bench: throughput, cache and MFU of a model preset")
    assert "Groups: model=<preset>" in out and "measure:" in out
    assert "experiment:" not in out and "hparams_search" not in out and "powered by Hydra" not in out
