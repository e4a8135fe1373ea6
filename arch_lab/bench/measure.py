"""Timed measurements on real inference and training code, device ceilings, and the out-of-memory batch halving.

Every timing synchronizes the device before reading the clock and keeps warm-up (kernel selection, allocator
growth, compilation) out of the timed region.
"""
from __future__ import annotations

import gc
import logging
import time
from dataclasses import dataclass
from typing import Callable, Optional, TypeVar

import torch
import torch.nn.functional as F

from components.generation import Generator

log = logging.getLogger(__name__)
T = TypeVar("T")

# Measured ceilings (../shared/ENVIRONMENT.md): bf16 8192^3 matmul on the H100.
KNOWN_PEAK_TFLOPS = {"H100": 790.0}


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _random_ids(vocab_size: int, shape: tuple[int, ...], device: torch.device, seed: int) -> torch.Tensor:
    return torch.randint(0, vocab_size, shape, device=device,
                         generator=torch.Generator(device=device).manual_seed(seed))


# ---- out-of-memory handling ------------------------------------------------------------------------------------
class BatchDoesNotFitError(RuntimeError):
    """A measurement ran out of memory at the smallest batch it was allowed to try."""


def is_out_of_memory(error: BaseException) -> bool:
    return isinstance(error, torch.cuda.OutOfMemoryError) or (
        isinstance(error, RuntimeError) and "out of memory" in str(error))


def free_device_memory() -> None:
    gc.collect()
    if torch.cuda.is_available():
        torch.cuda.empty_cache()


def halve_batch_on_oom(measure: Callable[[int], T], batch: int, what: str, enabled: bool = True) -> tuple[T, int]:
    """Run `measure(batch)`, halving the batch after each out-of-memory error (the paper's protocol).

    Returns the result and the batch that fitted. Raises BatchDoesNotFitError when batch 1 does not fit, or at
    the first out-of-memory error when halving is disabled.
    """
    while True:
        try:
            return measure(batch), batch
        except Exception as error:  # noqa: BLE001 - anything but an out-of-memory error is re-raised
            if not is_out_of_memory(error):
                raise
            reason = str(error).splitlines()[0] if str(error) else type(error).__name__
        # Outside the except block: the traceback (and the tensors its frames hold) is gone before freeing.
        free_device_memory()
        if not enabled:
            raise BatchDoesNotFitError(f"{what}: batch {batch} ran out of memory ({reason}) and halve_on_oom=false; "
                                       f"set halve_on_oom=true or lower the batch")
        if batch == 1:
            raise BatchDoesNotFitError(f"{what}: even batch 1 runs out of memory ({reason}); lower the context "
                                       f"length or benchmark a smaller model")
        log.warning("%s: batch %d ran out of memory (%s); retrying with batch %d", what, batch, reason, batch // 2)
        batch //= 2


# ---- inference --------------------------------------------------------------------------------------------------
@dataclass
class DecodeTiming:
    batch: int
    context: int
    new_tokens: int
    prefill_tokens_per_s: float
    decode_tokens_per_s: float
    decode_ms_per_step: float
    state_bytes: int = 0  # InferenceState.nbytes() of the timed run

    def as_metrics(self) -> dict[str, float]:
        return {"throughput/prefill_tok_s": self.prefill_tokens_per_s,
                "throughput/decode_tok_s": self.decode_tokens_per_s,
                "throughput/decode_ms_per_step": self.decode_ms_per_step,
                "throughput/decode_batch": self.batch}


@torch.no_grad()
def measure_cached_decode(model, batch: int, context: int, new_tokens: int, generator: Generator | None = None,
                          warmup_steps: int = 2, seed: int = 0, prefill_chunk: Optional[int] = None) -> DecodeTiming:
    """Prefill `context` random tokens for `batch` rows, then decode `new_tokens` greedily from the cache.

    Prefill and decoding run through `Generator.prefill` and `Generator.decoder`, i.e. exactly as generation does
    (the prompt in chunks, one CUDA-graph replay per step on a GPU), so the numbers are those of the lab's own
    generation path.
    """
    gen = generator or Generator(model)
    device = gen.device
    ids = _random_ids(model.cfg.vocab_size, (batch, context), device, seed)
    for _ in range(warmup_steps):  # kernels, allocator and autotuning out of the timed region
        state = gen.new_state(batch, context + new_tokens)
        logits = gen.prefill(state, ids[:, :prefill_chunk or context])
        model.forward_cached(logits.argmax(-1)[:, None], state)
        del state, logits  # before the timed state is allocated: two caches at once could run out of memory
    state = gen.new_state(batch, context + new_tokens)
    decode = gen.decoder(state)  # the Generator's decode step (a CUDA graph on GPUs); made before the prefill
    _sync(device)
    t0 = time.perf_counter()
    logits = gen.prefill(state, ids, chunk_size=prefill_chunk)
    _sync(device)
    t1 = time.perf_counter()
    for _ in range(new_tokens):
        logits = decode(logits.argmax(-1)[:, None])[:, -1]
    _sync(device)
    t2 = time.perf_counter()
    return DecodeTiming(batch, context, new_tokens, batch * context / (t1 - t0), batch * new_tokens / (t2 - t1),
                        1000 * (t2 - t1) / new_tokens, state.nbytes())


@dataclass
class StepProfile:
    steps: int
    wall_ms_per_step: float     # under the profiler, so above the unprofiled step time
    kernels_per_step: float     # GPU kernel launches per step (0 on a CPU)
    kernel_ms_per_step: float   # their summed run time per step (0 on a CPU)
    table: str                  # the profiler's operators and kernels, most expensive first
    timeline: str               # the last profiled step's kernels (or, on a CPU, top-level operators) in order


def profile_steps(step: Callable[[], None], steps: int, device: torch.device) -> StepProfile:
    """Run `step` `steps` times under torch.profiler: kernel launches and summed kernel time per step, and the
    table of operators and kernels. Summed kernel time against the wall time says whether a step waits on its
    kernels or on the host launching them; the table says which kernels dominate."""
    from torch.autograd import DeviceType
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if device.type == "cuda" else [])
    _sync(device)
    with profile(activities=activities) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            step()
        _sync(device)
        wall = time.perf_counter() - t0
    averages = prof.key_averages()
    kernels = [e for e in averages if e.device_type == DeviceType.CUDA]
    table = averages.table(sort_by="self_device_time_total" if kernels else "cpu_time_total", row_limit=30)
    return StepProfile(steps, 1000 * wall / steps, sum(e.count for e in kernels) / steps,
                       sum(e.self_device_time_total for e in kernels) / 1000 / steps, table,
                       _last_step_timeline(prof.events(), steps, bool(kernels)))


def _last_step_timeline(events, steps: int, on_gpu: bool) -> str:
    """One line per kernel of the last profiled step, in launch order, with its run time: where the table sums a
    kernel over every layer, this tells the layers apart (a global layer's attention from a local one's). Every
    profiled step launches the same kernels, so the last step is the last 1/steps of them. On a CPU: the top-level
    operators and their CPU time."""
    from torch.autograd import DeviceType

    if on_gpu:
        rows = [e for e in events if e.device_type == DeviceType.CUDA]
    else:
        rows = [e for e in events if e.device_type == DeviceType.CPU and e.cpu_parent is None]
    rows.sort(key=lambda e: e.time_range.start)
    rows = rows[len(rows) - len(rows) // steps:]
    what = "kernels, device time" if on_gpu else "top-level operators, CPU time"
    lines = [f"# the last of {steps} profiled steps: {len(rows)} {what} in us, in launch order"]
    lines += [f"{i:5d} {e.time_range.elapsed_us():10.1f}  {e.name}" for i, e in enumerate(rows)]
    return "\n".join(lines) + "\n"


# Decode steps before the profiled ones: lazy initialisation and, with compile, the compilation.
PROFILE_WARMUP_STEPS = 1


@torch.no_grad()
def profile_decode_steps(model, batch: int, context: int, steps: int, seed: int = 0,
                         prefill_chunk: Optional[int] = None, compile: bool = False, pdl: bool = True) -> StepProfile:
    """Profile `steps` cached decode steps after a `context`-token prefill. The steps run outside a CUDA graph,
    because a replay shows up as one opaque launch (`compile`, `pdl`: through torch.compile, as the timed decode
    with compile_decode=true and its decode_pdl); set against the bandwidth bound, the summed kernel time says
    whether a step is limited by its bytes or by the count and size of its kernels."""
    gen = Generator(model, cuda_graph=False, compile=compile, pdl=pdl)
    ids = _random_ids(model.cfg.vocab_size, (batch, context), gen.device, seed)
    state = gen.new_state(batch, context + steps + PROFILE_WARMUP_STEPS)
    decode = gen.decoder(state)
    last = [gen.prefill(state, ids, chunk_size=prefill_chunk)]
    for _ in range(PROFILE_WARMUP_STEPS):
        last[0] = decode(last[0].argmax(-1)[:, None])[:, -1]

    def step() -> None:
        last[0] = decode(last[0].argmax(-1)[:, None])[:, -1]

    return profile_steps(step, steps, gen.device)


def _last_logits(model, ids: torch.Tensor) -> torch.Tensor:
    """Full forward without a cache, projecting only the last position (all a generation step needs)."""
    h = model.meta.strip(model.hidden_states(ids))[:, -1:]
    return model.logits(h)[:, -1]


@torch.no_grad()
def measure_recompute_decode(model, batch: int, context: int, new_tokens: int, seed: int = 0) -> float:
    """Tokens/s of generation without a cache: every step re-runs the full forward over the whole prefix."""
    device = next(model.parameters()).device
    prompt = _random_ids(model.cfg.vocab_size, (batch, context), device, seed)

    def generate() -> None:
        ids = prompt
        for _ in range(new_tokens):
            nxt = _last_logits(model, ids).argmax(-1)
            ids = torch.cat([ids, nxt[:, None]], dim=1)

    generate()  # warm-up at the very lengths timed (compiled kernels specialize on the length)
    _sync(device)
    t0 = time.perf_counter()
    generate()
    _sync(device)
    return batch * new_tokens / (time.perf_counter() - t0)


# ---- training ---------------------------------------------------------------------------------------------------
class TrainingStep:
    """One AdamW step on fixed random tokens (forward, next-token loss, backward, update), as a training run takes.

    `autocast_dtype` (e.g. bfloat16) runs the forward under autocast with float32 master weights, as bf16-mixed
    training does; `compile` compiles the model in place, as a training run with compile=true does. Used as a
    context manager, it leaves the model without gradients and in eval mode, so an out-of-memory retry at a
    smaller batch does not inherit this batch's gradients.
    """

    def __init__(self, model, batch: int, seq_len: int, autocast_dtype: Optional[torch.dtype] = None,
                 compile: bool = False, seed: int = 0):
        self.model, self.autocast_dtype = model, autocast_dtype
        self.device = next(model.parameters()).device
        if compile:
            model.compile()
        self.optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4, fused=self.device.type == "cuda")
        ids = _random_ids(model.cfg.vocab_size, (batch, seq_len + 1), self.device, seed)
        self.inputs, self.labels = ids[:, :-1], ids[:, 1:]
        self.tokens = batch * seq_len

    def __enter__(self) -> "TrainingStep":
        self.model.train()
        return self

    def __exit__(self, *exc) -> None:
        self.model.zero_grad(set_to_none=True)
        self.model.eval()

    def __call__(self) -> None:
        dtype = self.autocast_dtype
        with torch.autocast(self.device.type, dtype=dtype, enabled=dtype is not None):
            logits = self.model(self.inputs)
        F.cross_entropy(logits.float().flatten(0, 1), self.labels.flatten()).backward()
        self.optimizer.step()
        self.optimizer.zero_grad(set_to_none=True)


@dataclass
class TrainTiming:
    tokens_per_s: float
    profile: Optional[StepProfile] = None  # of further steps after the timed ones, when asked for


def measure_train_throughput(model, batch: int, seq_len: int, steps: int, warmup_steps: int = 2,
                             autocast_dtype: Optional[torch.dtype] = None, compile: bool = False,
                             seed: int = 0, profile: int = 0) -> TrainTiming:
    """Training tokens/s over `steps` timed steps after `warmup_steps` (compilation and autotuning), then, when
    `profile` > 0, that many steps under the profiler (the same compiled model and optimizer, so the kernels
    profiled are the kernels timed)."""
    with TrainingStep(model, batch, seq_len, autocast_dtype, compile, seed) as train_step:
        for _ in range(warmup_steps):
            train_step()
        _sync(train_step.device)
        t0 = time.perf_counter()
        for _ in range(steps):
            train_step()
        _sync(train_step.device)
        tok_s = train_step.tokens * steps / (time.perf_counter() - t0)
        return TrainTiming(tok_s, profile_steps(train_step, profile, train_step.device) if profile else None)


# ---- device ceilings --------------------------------------------------------------------------------------------
def measure_copy_bandwidth_gbs(device: torch.device) -> float:
    """Device memory bandwidth (1e9 B/s) of a large device-to-device copy, counting bytes read + written."""
    nbytes, repeats = (1 << 30 if device.type == "cuda" else 1 << 26), 10
    src = torch.ones(nbytes, dtype=torch.uint8, device=device)
    dst = torch.empty_like(src)
    dst.copy_(src)
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        dst.copy_(src)
    _sync(device)
    return 2 * nbytes * repeats / (time.perf_counter() - t0) / 1e9


def measure_matmul_tflops(device: torch.device, dtype: torch.dtype) -> float:
    """Dense n x n x n matmul throughput in TFLOP/s (2 n^3 FLOPs each)."""
    n, repeats = (8192 if device.type == "cuda" else 512), 10
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    a @ b
    _sync(device)
    t0 = time.perf_counter()
    for _ in range(repeats):
        a @ b
    _sync(device)
    return 2 * n ** 3 * repeats / (time.perf_counter() - t0) / 1e12


def peak_tflops(device: torch.device, dtype: torch.dtype, device_name: str) -> float:
    """The dense matmul ceiling for `dtype`: the recorded value for known GPUs in half precision, else measured."""
    if device.type == "cuda" and dtype in (torch.bfloat16, torch.float16):
        for chip, tflops in KNOWN_PEAK_TFLOPS.items():
            if chip in device_name:
                return tflops
    return measure_matmul_tflops(device, dtype)
