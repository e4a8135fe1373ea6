"""`python -m arch_lab.bench [model=<preset>] [key=value ...]`: throughput and cache benchmark of one model.

Times cached prefill and decode, full-recompute generation, Hugging Face `generate` on the same Llama-style
weights, and training steps; compares decode with its memory-bandwidth bound and training with the device's
peak (MFU); logs everything as one MLflow run tagged bench=true (conf/bench.yaml lists the keys).

The paper's protocol (Table 1/2/9: 8k context, batch 128 halved until it fits; cache at 16k tokens fp16):
    python -m arch_lab.bench model=roadmap_e_300m context=8192 batch=128 new_tokens=64
"""
from __future__ import annotations

import importlib.util
import logging
import os
import platform
import signal
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Optional

import hydra
from omegaconf import DictConfig, OmegaConf

log = logging.getLogger("arch_lab.bench")

MEASUREMENTS = ("decode", "prefill", "train", "recompute", "hf", "profile", "train_profile")
DTYPES = ("float32", "bfloat16", "float16")
DTYPE_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


class BenchConfigError(ValueError):
    """A bench key with a value the benchmark cannot use; the message names the key and what is allowed."""


def _positive_int(cfg: DictConfig, key: str, minimum: int = 1) -> int:
    value = cfg[key]
    if not isinstance(value, int) or isinstance(value, bool) or value < minimum:
        raise BenchConfigError(f"{key} must be an integer >= {minimum}, got {value!r}")
    return value


def _bool(cfg: DictConfig, key: str) -> bool:
    value = cfg[key]
    if not isinstance(value, bool):  # bool() would take any string (maybe, no) for true
        raise BenchConfigError(f"{key} must be true or false; got {value!r}")
    return value


def _auto_or_positive(cfg: DictConfig, key: str) -> Optional[float]:
    value = cfg[key]
    if value == "auto":
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or value <= 0:
        raise BenchConfigError(f"{key} must be 'auto' or a positive number, got {value!r}")
    return float(value)


def _as_tuple(value: Any) -> tuple:
    """A list key given one bare value (measure=decode, cache_lengths=16384) as a one-item list: a string would
    otherwise be read letter by letter."""
    return (value,) if isinstance(value, (str, int, float)) else tuple(value)


def _resolve_device(requested: str, cuda_available: bool) -> str:
    if requested == "auto":
        return "cuda" if cuda_available else "cpu"
    if requested == "cpu" or requested == "cuda" or (requested.startswith("cuda:") and requested[5:].isdigit()):
        if requested.startswith("cuda") and not cuda_available:
            raise BenchConfigError(f"device={requested!r} but no CUDA device is visible; use device=auto or cpu")
        return requested
    raise BenchConfigError(f"device must be one of auto, cpu, cuda, cuda:<index>; got {requested!r}")


@dataclass(frozen=True)
class BenchSettings:
    """The validated bench keys of conf/bench.yaml (device and dtype resolved; None = 'auto' measured)."""
    device: str
    dtype: str
    context: int
    batch: int
    new_tokens: int
    prefill_chunk: Optional[int]
    warmup_steps: int
    halve_on_oom: bool
    measure: tuple[str, ...]
    recompute_new_tokens: int
    train_seq_len: int
    train_batch: int
    train_steps: int
    train_warmup_steps: int
    peak_tflops: Optional[float]
    bandwidth_gbs: Optional[float]
    cache_lengths: tuple[int, ...]
    compile: bool
    compile_decode: bool
    decode_pdl: bool
    cuda_graph: Optional[bool]
    profile_steps: int

    @classmethod
    def from_cfg(cls, cfg: DictConfig, cuda_available: bool) -> "BenchSettings":
        measure = _as_tuple(cfg.measure)
        unknown = [m for m in measure if m not in MEASUREMENTS]
        if unknown:
            raise BenchConfigError(f"measure: unknown measurement(s) {unknown}; allowed: {', '.join(MEASUREMENTS)}")
        device = _resolve_device(str(cfg.device), cuda_available)
        dtype = str(cfg.dtype)
        if dtype == "auto":
            dtype = "bfloat16" if device.startswith("cuda") else "float32"
        elif dtype not in DTYPES:
            raise BenchConfigError(f"dtype must be one of auto, {', '.join(DTYPES)}; got {dtype!r}")
        if cfg.prefill_chunk is not None:
            _positive_int(cfg, "prefill_chunk")
        if cfg.cuda_graph not in ("auto", True, False):
            raise BenchConfigError(f"cuda_graph must be auto, true or false; got {cfg.cuda_graph!r}")
        if cfg.logger.get("log_checkpoints"):  # logger: mlflow brings the key; the bench saves no checkpoint
            raise BenchConfigError("logger.log_checkpoints: the bench trains no model to checkpoint; leave it false")
        lengths = _as_tuple(cfg.cache_lengths)
        if any(not isinstance(n, int) or n < 1 for n in lengths):
            raise BenchConfigError(f"cache_lengths must be a list of positive token counts, got {list(lengths)}")
        settings = cls(
            device=device, dtype=dtype, context=_positive_int(cfg, "context"), batch=_positive_int(cfg, "batch"),
            new_tokens=_positive_int(cfg, "new_tokens"), prefill_chunk=cfg.prefill_chunk,
            warmup_steps=_positive_int(cfg, "warmup_steps", 0), halve_on_oom=_bool(cfg, "halve_on_oom"),
            measure=measure, recompute_new_tokens=_positive_int(cfg, "recompute_new_tokens"),
            train_seq_len=_positive_int(cfg, "train_seq_len"), train_batch=_positive_int(cfg, "train_batch"),
            train_steps=_positive_int(cfg, "train_steps"),
            train_warmup_steps=_positive_int(cfg, "train_warmup_steps", 0),
            peak_tflops=_auto_or_positive(cfg, "peak_tflops"), bandwidth_gbs=_auto_or_positive(cfg, "bandwidth_gbs"),
            cache_lengths=lengths, compile=_bool(cfg, "compile"), compile_decode=_bool(cfg, "compile_decode"),
            decode_pdl=_bool(cfg, "decode_pdl"),
            cuda_graph=None if cfg.cuda_graph == "auto" else cfg.cuda_graph,
            profile_steps=_positive_int(cfg, "profile_steps"),
        )
        if "hf" in measure and settings.new_tokens < 2:
            raise BenchConfigError(f"new_tokens must be >= 2 when measure includes hf (its decode is timed from "
                                   f"the first generated token), got {settings.new_tokens}")
        return settings

    def check_lengths(self, max_seq_len: int) -> None:
        """Every measured sequence must fit the model's `max_seq_len`."""
        from .measure import PROFILE_WARMUP_STEPS

        wanted = {}
        if {"decode", "prefill", "hf"} & set(self.measure):
            wanted["context + new_tokens"] = self.context + self.new_tokens
        if "profile" in self.measure:
            wanted[f"context + profile_steps + {PROFILE_WARMUP_STEPS}"] = (self.context + self.profile_steps
                                                                             + PROFILE_WARMUP_STEPS)
        if "recompute" in self.measure:
            wanted["context + recompute_new_tokens - 1"] = self.context + self.recompute_new_tokens - 1
        if {"train", "train_profile"} & set(self.measure):
            wanted["train_seq_len"] = self.train_seq_len
        for what, length in wanted.items():
            if length > max_seq_len:
                raise BenchConfigError(f"{what} = {length} is longer than model.max_seq_len={max_seq_len}; "
                                       f"shorten it or raise model.max_seq_len")


def describe_device(device) -> str:
    import torch

    if device.type == "cuda":
        return torch.cuda.get_device_name(device)
    return f"{platform.processor() or platform.machine()} CPU"


def hf_skip_reason(model_cfg) -> Optional[str]:
    """Why the Hugging Face measurement cannot run for this model (None: it can)."""
    from .hf_llama import llama_incompatibility

    reason = llama_incompatibility(model_cfg)
    if reason:
        return f"not Llama-style: {reason}"
    if importlib.util.find_spec("transformers") is None:
        return "transformers is not installed (pip install transformers)"
    return None


class _Bench:
    """One benchmark run: the model, the settings, and the metrics gathered so far."""

    def __init__(self, cfg: DictConfig, settings: BenchSettings, model, device_name: str):
        import torch

        self.cfg, self.s, self.model, self.device_name = cfg, settings, model, device_name
        self.device, self.dtype = torch.device(settings.device), getattr(torch, settings.dtype)
        self.metrics: dict[str, float] = {}
        self.notes: dict[str, str] = {}

    def _fit(self, what: str, measure, batch: int):
        """`measure(batch)` with the out-of-memory halving; on CUDA also records the peak memory of the attempt
        that fitted as bench/<what>_peak_gib (so a halved batch can be traced to what filled the device)."""
        import torch

        from .measure import halve_batch_on_oom

        cuda = self.device.type == "cuda"
        if cuda:
            log.info("%s: %.2f GiB allocated before the measurement", what,
                     torch.cuda.memory_allocated(self.device) / 2 ** 30)

        def attempt(b: int):
            if cuda:
                torch.cuda.reset_peak_memory_stats(self.device)
            return measure(b)

        result, used = halve_batch_on_oom(attempt, batch, what, self.s.halve_on_oom)
        if cuda:
            self._record({f"bench/{what}_peak_gib": torch.cuda.max_memory_allocated(self.device) / 2 ** 30})
        return result, used

    def _record(self, metrics: dict[str, float]) -> None:
        from .. import tracking

        self.metrics.update(metrics)
        tracking.log_metrics(metrics)

    def static(self) -> None:
        from components.cache_accounting import paper_cache_mb

        self._record({"bench/params": sum(p.numel() for p in self.model.parameters()),
                      **{f"bench/cache_mb_{n // 1024}k": paper_cache_mb(self.model, n) for n in self.s.cache_lengths}})

    def cached(self) -> None:
        from components.generation import Generator

        from .flops import decode_bandwidth_bound_tok_s
        from .measure import measure_cached_decode, measure_copy_bandwidth_gbs

        s = self.s
        timing, batch = self._fit("decode", lambda b: measure_cached_decode(
            self.model, b, s.context, s.new_tokens,
            Generator(self.model, cuda_graph=s.cuda_graph, compile=s.compile_decode, pdl=s.decode_pdl),
            warmup_steps=s.warmup_steps, seed=self.cfg.seed, prefill_chunk=s.prefill_chunk), s.batch)
        out = {"bench/state_bytes": timing.state_bytes, "bench/decode_batch": batch}
        if "prefill" in s.measure:
            out["bench/prefill_tok_s"] = timing.prefill_tokens_per_s
        if "decode" in s.measure:
            bandwidth = s.bandwidth_gbs or measure_copy_bandwidth_gbs(self.device)
            bound = decode_bandwidth_bound_tok_s(self.model, batch, s.context, s.new_tokens,
                                                 DTYPE_BYTES[s.dtype], bandwidth)
            out.update({"bench/decode_tok_s": timing.decode_tokens_per_s,
                        "bench/decode_ms_per_step": timing.decode_ms_per_step,
                        "bench/bandwidth_gbs": bandwidth, "bench/decode_bw_bound_tok_s": bound,
                        "bench/decode_bw_fraction": timing.decode_tokens_per_s / bound})
        self._record(out)

    def _record_profile(self, what: str, artifact: str, result, batch: int) -> None:
        """A StepProfile as bench/<what>_* metrics, with its table and its last step's timeline as MLflow
        artifacts (`<what>.txt`, `<what>_timeline.txt`)."""
        from .. import tracking

        tracking.log_text_artifact(result.table, f"{artifact}.txt")
        tracking.log_text_artifact(result.timeline, f"{artifact}_timeline.txt")
        log.info("%s (batch %d, %d steps):\n%s", what, batch, result.steps, result.table)
        self._record({f"bench/{what}_batch": batch, f"bench/{what}_wall_ms_per_step": result.wall_ms_per_step,
                      f"bench/{what}_kernels_per_step": result.kernels_per_step,
                      f"bench/{what}_kernel_ms_per_step": result.kernel_ms_per_step})

    def profile(self) -> None:
        """Kernels of decode steps outside a CUDA graph (compiled with compile_decode), at the batch the timed
        decode used when it ran first."""
        from .measure import profile_decode_steps

        s = self.s
        batch = int(self.metrics.get("bench/decode_batch", s.batch))
        result, batch = self._fit("profile", lambda b: profile_decode_steps(
            self.model, b, s.context, s.profile_steps, seed=self.cfg.seed, prefill_chunk=s.prefill_chunk,
            compile=s.compile_decode, pdl=s.decode_pdl), batch)
        self._record_profile("profile", "decode_profile", result, batch)

    def recompute(self) -> None:
        from .measure import measure_recompute_decode

        s = self.s
        tok_s, batch = self._fit("recompute", lambda b: measure_recompute_decode(
            self.model, b, s.context, s.recompute_new_tokens, seed=self.cfg.seed), s.batch)
        out = {"bench/recompute_tok_s": tok_s, "bench/recompute_batch": batch}
        if "bench/decode_tok_s" in self.metrics:
            out["bench/decode_speedup_vs_recompute"] = self.metrics["bench/decode_tok_s"] / tok_s
        self._record(out)

    def hf(self) -> None:
        import mlflow

        from .hf_llama import measure_hf_decode, to_hf_llama
        from .measure import free_device_memory

        reason = hf_skip_reason(self.model.cfg)
        if reason:
            log.info("hf measurement skipped: %s", reason)
            self.notes["hf_skipped"] = reason
            mlflow.set_tag("bench.hf_skipped", reason)
            return
        import transformers

        mlflow.set_tag("bench.transformers_version", transformers.__version__)
        s = self.s
        hf_model = to_hf_llama(self.model)
        tok_s, batch = self._fit("hf", lambda b: measure_hf_decode(
            hf_model, b, s.context, s.new_tokens, seed=self.cfg.seed), s.batch)
        del hf_model
        free_device_memory()
        out = {"bench/hf_decode_tok_s": tok_s, "bench/hf_batch": batch}
        if "bench/decode_tok_s" in self.metrics:
            out["bench/decode_speedup_vs_hf"] = self.metrics["bench/decode_tok_s"] / tok_s
        self._record(out)

    def train(self) -> None:
        import torch

        from components.model import HybridLM

        from .flops import model_flops_utilization, train_flops_per_token
        from .measure import free_device_memory, measure_train_throughput, peak_tflops

        s = self.s
        torch.manual_seed(self.cfg.seed)
        model = HybridLM(self.model.cfg).to(self.device)  # float32 master weights, as mixed-precision training
        model.set_backend(self.cfg.backend, self.cfg.scan_kernel, self.cfg.decode_branches)
        autocast = None if self.dtype == torch.float32 else self.dtype
        profile = s.profile_steps if "train_profile" in s.measure else 0
        timing, batch = self._fit("train", lambda b: measure_train_throughput(
            model, b, s.train_seq_len, s.train_steps, s.train_warmup_steps, autocast, s.compile,
            seed=self.cfg.seed, profile=profile), s.train_batch)
        del model
        free_device_memory()
        peak = s.peak_tflops or peak_tflops(self.device, self.dtype, self.device_name)
        flops = train_flops_per_token(self.model, s.train_seq_len)
        self._record({"bench/train_tok_s": timing.tokens_per_s, "bench/train_batch": batch,
                      "bench/peak_tflops": peak, "bench/train_flops_per_token": flops,
                      "bench/train_mfu": model_flops_utilization(timing.tokens_per_s, flops, peak)})
        if timing.profile:
            self._record_profile("train_profile", "train_profile", timing.profile, batch)


def _raise_keyboard_interrupt(signum, frame):
    raise KeyboardInterrupt(f"signal {signum}")


def run_bench(cfg: DictConfig, output_dir: Path) -> dict[str, float]:
    """Build the model from cfg.model, measure what cfg.measure asks for, log one MLflow run; returns the metrics."""
    import mlflow
    import torch

    from components.config import ModelConfig
    from components.model import HybridLM

    from .. import tracking
    from ..sweep import start_run_for_job
    from .measure import free_device_memory
    from .report import format_table, log_report, table_rows, write_report

    settings = BenchSettings.from_cfg(cfg, torch.cuda.is_available())
    model_cfg = ModelConfig.from_dict(OmegaConf.to_container(cfg.model, resolve=True)).validate()
    settings.check_lengths(model_cfg.max_seq_len)
    tracking.check_tracking_uri(cfg.logger.tracking_uri, "logger.tracking_uri")
    device = torch.device(settings.device)
    device_name = describe_device(device)
    torch.manual_seed(cfg.seed)
    model = HybridLM(model_cfg).to(device=device, dtype=getattr(torch, settings.dtype)).eval()
    model.set_backend(cfg.backend, cfg.scan_kernel, cfg.decode_branches)
    bench = _Bench(cfg, settings, model, device_name)
    run_name = cfg.run_name or f"bench-{model.cfg.name}-ctx{settings.context}-b{settings.batch}"
    tags = {"bench": "true", "model": model.cfg.name, "device": device_name, "dtype": settings.dtype,
            "git_commit": tracking.git_commit(), "backends": tracking.backends_tag(),
            **{str(k): str(v) for k, v in (cfg.tags or {}).items()}}
    previous_sigterm = signal.signal(signal.SIGTERM, _raise_keyboard_interrupt)
    try:
        mlflow.set_tracking_uri(cfg.logger.tracking_uri)
        with start_run_for_job(run_name, experiment_name=cfg.logger.experiment_name, tags=tags) as run:
            mlflow.log_params(tracking.loggable_params(cfg))
            tracking.log_text_artifact(OmegaConf.to_yaml(cfg, resolve=False), "config.yaml")
            tracking.log_text_artifact(model.plan.to_table(), "layer_plan.txt")
            log.info("benchmarking %s on %s (%s, backend=%s: %s)\n%s", model.cfg.name, device_name, settings.dtype,
                     cfg.backend, tags["backends"], model.plan.to_table())
            bench.static()
            steps = [("decode", bench.cached), ("profile", bench.profile), ("recompute", bench.recompute),
                     ("hf", bench.hf), ("train", bench.train)]
            for name, step in steps:
                implied = {"decode": "prefill", "train": "train_profile"}.get(name)  # measured within the step
                if name in settings.measure or implied in settings.measure:
                    step()
                    free_device_memory()
            title = f"arch_lab.bench: {model.cfg.name} on {device_name} ({settings.dtype})"
            info: dict[str, Any] = {"model": model.cfg.name, "device": device_name, "mlflow_run_id": run.info.run_id,
                                    "settings": asdict(settings), "notes": bench.notes}
            json_path, table_path = write_report(bench.metrics, info, title, output_dir)
            log_report(json_path, table_path)
            print(format_table(table_rows(bench.metrics), title))
            return bench.metrics
    finally:
        signal.signal(signal.SIGTERM, previous_sigterm)


@hydra.main(version_base="1.3", config_path="../../conf", config_name="bench")
def main(cfg: DictConfig) -> dict[str, float]:
    from hydra.core.hydra_config import HydraConfig
    from hydra.types import RunMode

    from arch_lab.errors import exit_with_message, failed_job
    from components.config import ConfigError

    # Read when CUDA first allocates. Without it, the caching allocator's fragmentation decides the halved batch:
    # on an H100 at 8k context, HF generate then fits batch 32 instead of 64 (61.8 GiB peak either way).
    os.environ.setdefault("PYTORCH_CUDA_ALLOC_CONF", "expandable_segments:True")
    try:
        return run_bench(cfg, Path(HydraConfig.get().runtime.output_dir))
    except (BenchConfigError, ConfigError) as error:  # the bad key and what it allows are the news
        if HydraConfig.get().mode == RunMode.MULTIRUN:
            raise failed_job(log, error)  # the other jobs still run; Hydra raises it once they have
        exit_with_message(log, error)


if __name__ == "__main__":
    main()
