"""Time two pieces of a decode step side by side, each replayed from a CUDA graph as the compiled decode step is:

    python experiments/performance/decode_step_bench.py --out decode_step_bench.json

- the Mamba-1 heads' step of one layer (rows E and Mamba at 300M, bf16, batch 128; the first layer's heads, with the
  model's weights and float32 SSM state): arch_lab's fused Triton step (scan_kernel=triton, the default) against
  mamba_ssm's and causal_conv1d's step kernels with the matmuls and norms between them (scan_kernel=mamba_ssm);
  --variants adds the fused step's launcher with other blocks (StepBlocks: the conv kernel's rows x channels x warps,
  then the state update's, e.g. 32x64x8x16x16x4; the default is 16x64x8x16x16x4);
- the tied LM head on the last hidden states (batch 128, vocabulary 32,001), alone and followed by the greedy
  argmax: `logits` (rows of 32,001), the transposed product as a view, and `inference_logits` (the transposed
  product copied to rows, what the cached path uses).

Each time is the median over --repeats of --iters graph replays between CUDA events, per replay.
"""
from __future__ import annotations

import argparse
import json
import statistics
from typing import Callable

import torch

from components.kv_cache import StepInfo
from components.model import HybridLM
from components.ops.mamba1_step_triton import StepBlocks, mamba1_step
from components.presets import preset
from components.ssm_heads import Mamba1Heads, SSMState

BATCH = 128


def graph_time_us(fn: Callable[[], object], iters: int, repeats: int) -> float:
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # compiles the Triton kernels, warms cuBLAS
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        fn()
    times = []
    for _ in range(repeats):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        for _ in range(iters):
            graph.replay()
        end.record()
        torch.cuda.synchronize()
        times.append(start.elapsed_time(end) * 1e3 / iters)
    return statistics.median(times)


def ssm_step_times(row: str, iters: int, repeats: int, variants: list[str]) -> dict[str, float]:
    torch.manual_seed(0)
    model = HybridLM(preset(row, "300m")).to("cuda", torch.bfloat16)
    heads = next(m for m in model.modules() if isinstance(m, Mamba1Heads))
    g = torch.Generator(device="cuda").manual_seed(1)
    proj = torch.randn(BATCH, 1, heads.proj_width, device="cuda", generator=g, dtype=torch.bfloat16)
    (conv_shape, ssm_shape) = heads.state_shapes(BATCH)
    state = SSMState(conv=torch.randn(conv_shape, device="cuda", generator=g, dtype=torch.bfloat16),
                     ssm=torch.randn(ssm_shape, device="cuda", generator=g))
    step = StepInfo(positions=torch.zeros(BATCH, 1, dtype=torch.long, device="cuda"))
    out = {"d_inner": heads.d_inner}
    with torch.no_grad():
        for kernel in ("mamba_ssm", "triton"):
            heads.scan_kernel = kernel
            out[f"{kernel}_us"] = graph_time_us(lambda: heads(proj, step, state), iters, repeats)
        out["speedup"] = out["mamba_ssm_us"] / out["triton_us"]
        inputs = heads.decode_step_inputs(proj, state)
        for variant in variants:  # the fused step's launcher with other blocks
            blocks = StepBlocks.from_string(variant)
            out[f"triton {blocks}_us"] = graph_time_us(lambda: mamba1_step(*inputs, blocks=blocks), iters, repeats)
    return out


def lm_head_times(iters: int, repeats: int) -> dict[str, float]:
    """The LM head of one decode step, alone and with the greedy argmax that follows it, in three layouts: `logits`
    (rows of 32,001), the (vocab, batch) product seen as (batch, vocab) (inference_logits before 2026-11-28,
    session 14), and `inference_logits` (that product copied to rows)."""
    torch.manual_seed(0)
    model = HybridLM(preset("roadmap_e", "300m")).to("cuda", torch.bfloat16)
    h = torch.randn(BATCH, 1, model.cfg.d_model, device="cuda", dtype=torch.bfloat16)
    layouts = {"logits": model.logits, "inference_logits": model.inference_logits,
               "vocab_major_view": lambda h: (model.lm_head_weight @ model.final_norm(h)[:, -1].T).T[:, None]}
    out = {"vocab": model.cfg.vocab_size}
    with torch.no_grad():
        for name, head in layouts.items():
            torch.testing.assert_close(head(h), model.logits(h))
            out[f"{name}_us"] = graph_time_us(lambda: head(h), iters, repeats)
            out[f"{name}_argmax_us"] = graph_time_us(lambda: head(h)[:, -1].argmax(-1), iters, repeats)
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--rows", nargs="+", default=["roadmap_e", "mamba"])
    parser.add_argument("--variants", nargs="*", default=[],
                        help="more launches of the fused step (StepBlocks): conv rows x channels x warps, "
                             "then the state update's, e.g. 32x64x8x16x16x4")
    parser.add_argument("--iters", type=int, default=200)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--out", help="write the results as JSON here")
    args = parser.parse_args()
    results = {"device": torch.cuda.get_device_name(), "batch": BATCH,
               "ssm_step": {row: ssm_step_times(row, args.iters, args.repeats, args.variants) for row in args.rows},
               "lm_head": lm_head_times(args.iters, args.repeats)}
    for row, r in results["ssm_step"].items():
        print(f"Mamba-1 heads' step, {row} (d_inner {r['d_inner']}): mamba_ssm {r['mamba_ssm_us']:.1f} us, "
              f"fused triton {r['triton_us']:.1f} us, {r['speedup']:.2f}x")
        for name in (k for k in r if k.startswith("triton ")):
            print(f"  fused, launch {name[7:-3]}: {r[name]:.1f} us")
    r = results["lm_head"]
    print(f"LM head, vocabulary {r['vocab']}, alone / with the greedy argmax:")
    for name in ("logits", "vocab_major_view", "inference_logits"):
        print(f"  {name}: {r[name + '_us']:.1f} / {r[name + '_argmax_us']:.1f} us")
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
