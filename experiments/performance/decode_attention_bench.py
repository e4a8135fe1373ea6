"""Time one decode step's attention at row E's shapes (300M, 8k context, batch 128), several ways, side by side.

    python experiments/performance/decode_attention_bench.py
    python experiments/performance/decode_attention_bench.py --batch 64 --context 16384

One query per sequence, 8 query heads over 2 key/value heads, keys of 64 and values of 128, bf16, against the
two caches a decode step reads, the lab's own (components/kv_cache.py) after they take the token at --context: a
local layer's 128 meta slots + a ring of 1,024, and a global layer's 128 meta slots + every position up to the
context plus the new tokens, with the mask the model builds from their key positions (allowed_keys), as the
additive bias the model attends with (additive_mask). Ways, each but triton compiled with torch.compile as the
compiled decode step would be:
  sdpa     the reference (attention_reference): SDPA with the bias, GQA by enable_gqa (cuDNN's kernel on an H200
           with torch 2.11)
  sdpa_mem the same held to SDPA's memory-efficient kernel (torch 2.11 has none for GQA with a mask: it reports
           the failure, as on the H200)
  matmul   the 4 query heads of a key/value head as the rows of one matmul against its keys, a float32 softmax
           with the bias, then one against its values: every key and value read once
  flex     FlexAttention with the bias as a score_mod (no block mask: a decode step's keys are nearly all allowed)
  triton   a split-KV Triton kernel (split_kv_attention.py), launched as it is, once for each of --triton-blocks
           (keys per split x keys per block x warps x stages)
Device time per call is summed by torch.profiler over calls that take turns over --copies copies of the cache
(with --between-mb, each after a matmul streaming that many MB of weights, whose kernels are left out of the sum);
GB/s counts the cache's K and V bytes once. Every way's output is compared with sdpa's.
"""
from __future__ import annotations

import argparse
import itertools
from typing import Callable

import torch

from components.kv_cache import GlobalKVCache, SlidingWindowKVCache, StepInfo
from components.ops.attention import additive_mask, allowed_keys, attention_reference
from scan_kernel_bench import kernel_times


def grouped_matmul_attention(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, bias: torch.Tensor
                             ) -> torch.Tensor:
    """q (b, hq, 1, d), k (b, hkv, lk, d), v (b, hkv, lk, dv), bias (b, 1, 1, lk) -> (b, hq, 1, dv)."""
    b, hq, _, d = q.shape
    hkv = k.shape[1]
    rows = q.reshape(b, hkv, hq // hkv, d)  # query head h reads key/value head h // (hq / hkv), as enable_gqa
    scores = (rows @ k.transpose(-1, -2)).float() * d ** -0.5
    probs = (scores + bias).softmax(-1)
    return (probs.to(v.dtype) @ v).reshape(b, hq, 1, v.shape[-1])


def memory_efficient_sdpa(q, k, v, bias):
    from torch.nn.attention import SDPBackend, sdpa_kernel

    with sdpa_kernel(SDPBackend.EFFICIENT_ATTENTION):
        return attention_reference(q, k, v, bias)


def flex_biased(bias: torch.Tensor) -> Callable:
    from torch.nn.attention.flex_attention import flex_attention

    def score_mod(score, b, h, q_idx, kv_idx):
        return score + bias[b, 0, q_idx, kv_idx]

    def attend(q, k, v, _bias):
        return flex_attention(q, k, v, score_mod=score_mod, enable_gqa=True)
    return attend


def triton_split_kv(blocks: str) -> Callable:
    from split_kv_attention import decode_attention, parse_launch

    launch = parse_launch(blocks)
    return lambda q, k, v, bias: decode_attention(q, k, v, bias, **launch)


COMPILED_WAYS = {"sdpa": lambda bias: attention_reference, "sdpa_mem": lambda bias: memory_efficient_sdpa,
                 "matmul": lambda bias: grouped_matmul_attention, "flex": flex_biased}


def cache_inputs(cache, batch: int, heads: int, context: int, window, meta: int) -> tuple:
    """(q, k, v, mask) as a decode step's attention gets them: the lab's cache, filled with random K/V, takes the
    token at `context` (after the meta tokens), and the mask comes from the key positions it reports."""
    device = cache.k.device
    g = torch.Generator(device=device).manual_seed(cache.k.shape[2])
    for buffer in cache.tensors():
        buffer.copy_(torch.randn(buffer.shape, generator=g, device=device, dtype=buffer.dtype))
    kv_heads, qk_dim, v_dim = cache.k.shape[1], cache.k.shape[3], cache.v.shape[3]
    step = StepInfo(positions=torch.full((batch, 1), meta + context, device=device),
                    start=torch.tensor(context, device=device), pad=torch.zeros(batch, dtype=torch.long, device=device))
    new = [torch.randn(batch, 1, kv_heads, d, generator=g, device=device, dtype=cache.k.dtype)
           for d in (qk_dim, v_dim)]
    view = cache.update(*new, step)
    q = torch.randn(batch, 1, heads, qk_dim, generator=g, device=device, dtype=cache.k.dtype).transpose(1, 2)
    return q, view.k, view.v, additive_mask(allowed_keys(step.positions, view.positions, window, meta), q.dtype)


def weight_stream(batch: int, megabytes: float, pool: int = 8) -> Callable[[], torch.Tensor]:
    """A decode step's projection: (batch, 1024) activations by a (1024, n) bf16 weight of `megabytes`, taking turns
    over `pool` such weights so that each call streams its weight from memory, as a layer's in_proj before its
    attention does."""
    columns = max(64, round(megabytes * 1e6 / (1024 * 2) / 64) * 64)  # a multiple of 64, as a model's widths
    x = torch.randn(batch, 1024, device="cuda", dtype=torch.bfloat16)
    weights = itertools.cycle([torch.randn(1024, columns, device="cuda", dtype=torch.bfloat16) for _ in range(pool)])
    return lambda: x @ next(weights)


def failure_reason(fn: Callable, inputs: tuple, error: Exception) -> str:
    """The error of the uncompiled call where it fails too: a compiled call's names Dynamo's graph node and its
    arguments, and puts the reason at the end of a long first line."""
    try:
        with torch.no_grad():
            fn(*inputs)
    except Exception as eager_error:  # noqa: BLE001 - whatever it is, it is the reason to report
        error = eager_error
    first_line = (str(error).strip().splitlines() or [""])[0]
    return f"{type(error).__name__}: {first_line[:120]}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--context", type=int, default=8192)
    parser.add_argument("--new-tokens", type=int, default=32, help="the global cache holds context + new tokens")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--meta", type=int, default=128)
    parser.add_argument("--ways", nargs="*", default=[*COMPILED_WAYS, "triton"], choices=[*COMPILED_WAYS, "triton"])
    parser.add_argument("--triton-blocks", nargs="*", default=["1152x64x4x3", "384x64x4x3"],
                        help="launches of the triton way: keys per split x keys per block x warps x stages")
    parser.add_argument("--iters", type=int, default=20)
    parser.add_argument("--copies", type=int, default=8,
                        help="timed calls take turns over this many copies of each cache, so that none finds in L2 "
                             "what the call before read, as in a decode step, where each layer reads its own cache "
                             "(on an H200, 1 and 8 copies timed the same)")
    parser.add_argument("--between-mb", type=float, default=0,
                        help="before each timed call, a decode-step matmul streaming this many MB of weights "
                             "(weight_stream), as in a decode step, where a layer's in_proj runs just before its "
                             "attention; the time is then the attention's kernels alone (0: none)")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        parser.error("needs a CUDA GPU")
    heads, kv_heads, qk_dim, v_dim, meta = 8, 2, 64, 128, args.meta
    shared = dict(batch=args.batch, n_kv=kv_heads, qk_dim=qk_dim, v_dim=v_dim, num_meta=meta, dtype=torch.bfloat16,
                  device="cuda")
    local = SlidingWindowKVCache(window=args.window, **shared)
    full = GlobalKVCache(max_len=args.context + args.new_tokens, **shared)
    caches = {"local": cache_inputs(local, args.batch, heads, args.context, args.window, meta),
              "global": cache_inputs(full, args.batch, heads, args.context, None, meta)}
    print(f"{torch.cuda.get_device_name()}: decode attention, batch {args.batch}, {heads}/{kv_heads} heads, keys "
          f"{qk_dim}, values {v_dim}, bf16, torch {torch.__version__}")
    print(f"{'cache':<8}{'keys':>7}{'way':>22}{'us':>9}{'GB/s':>8}{'rel err':>10}")
    between = weight_stream(args.batch, args.between_mb) if args.between_mb else None
    between_kernels = set(kernel_times(between, 2)) if between else set()  # to leave out of the attention's time
    ways = [(way, None) for way in args.ways if way != "triton"]
    ways += [(f"triton {blocks}", triton_split_kv(blocks)) for blocks in args.triton_blocks if "triton" in args.ways]
    for name, (q, k, v, bias) in caches.items():
        nbytes = k.numel() * k.element_size() + v.numel() * v.element_size()
        copies = [(k, v)] + [(k.clone(), v.clone()) for _ in range(args.copies - 1)]
        turns = itertools.cycle(copies)
        reference = None
        for way, fn in ways:
            launch = fn
            if fn is None:
                fn = COMPILED_WAYS[way](bias)
                torch._dynamo.reset()
                launch = torch.compile(fn, dynamic=False)
            try:
                with torch.no_grad():
                    out = launch(q, k, v, bias)
                    times = kernel_times(lambda: (between and between(), launch(q, *next(turns), bias)), args.iters)
                    ms = sum(t for kernel, t in times.items() if kernel not in between_kernels)
            except Exception as error:  # e.g. no SDPA kernel for these inputs (sdpa_mem with GQA and a mask)
                print(f"{name:<8}{k.shape[2]:>7}{way:>22}  failed: {failure_reason(fn, (q, k, v, bias), error)}")
                continue
            reference = out if reference is None else reference
            err = float((out.float() - reference.float()).norm() / reference.float().norm())
            print(f"{name:<8}{k.shape[2]:>7}{way:>22}{ms * 1000:>9.1f}{nbytes / ms / 1e6:>8.0f}{err:>10.2e}")


if __name__ == "__main__":
    main()
