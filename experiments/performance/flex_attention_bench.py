"""Time FlexAttention at row E's local layers' training shape with several kernel options, side by side.

    python experiments/performance/flex_attention_bench.py                     # torch's defaults and CONFIGS below
    python experiments/performance/flex_attention_bench.py --configs default "fwd_BLOCK_N=64,fwd_num_warps=8"

Inputs are what E's local layers pass in training at 300M: batch 8, 2,176 positions (2,048 + 128 meta tokens), 8
query heads and 2 key/value heads, keys of 64 and values of 128, bf16, as (b, l, h, d) projections viewed as
(b, h, l, d); the mask is the model's own block mask (components/ops/attention.py: causal, a 1,024 window, meta
tokens always visible). Each config is a FlexAttention `kernel_options` dict, KEY=VALUE pairs joined by commas
(integers, true or false; `fwd_` and `bwd_` prefixes pick a pass), or `default` for none; `max-autotune` compiles
with Inductor's autotuning over its own configs instead (its choices go to the log). Device time per call is
summed by torch.profiler over --iters calls: the forward's kernels (with autograd recording, as in training), and
the backward's as forward + backward less that; every config's output and gradients are compared with the
first's. TFLOP/s counts the pairs the mask allows.
"""
from __future__ import annotations

import argparse
from typing import Optional

import torch

from scan_kernel_bench import kernel_ms

# Kernel options tried by default: torch's own choice first (in torch 2.14's source, for Hopper at this dtype and
# head dim: forward 128 x 128 tiles, 4 warps, 3 stages; backward blocks 64/128/128/64, 8 warps, 3 stages), then
# smaller tiles and fewer warps for each pass.
CONFIGS = [
    "default",
    "fwd_BLOCK_M=128,fwd_BLOCK_N=64,fwd_num_warps=8,fwd_num_stages=3",
    "fwd_BLOCK_M=128,fwd_BLOCK_N=64,fwd_num_warps=4,fwd_num_stages=3",
    "fwd_BLOCK_M=64,fwd_BLOCK_N=64,fwd_num_warps=4,fwd_num_stages=3",
    "fwd_BLOCK_M=128,fwd_BLOCK_N=128,fwd_num_warps=8,fwd_num_stages=2",
    "bwd_BLOCK_M1=64,bwd_BLOCK_N1=64,bwd_BLOCK_M2=64,bwd_BLOCK_N2=64,bwd_num_warps=4,bwd_num_stages=3",
    "bwd_BLOCK_M1=32,bwd_BLOCK_N1=128,bwd_BLOCK_M2=128,bwd_BLOCK_N2=32,bwd_num_warps=4,bwd_num_stages=3",
    "bwd_BLOCK_M1=64,bwd_BLOCK_N1=128,bwd_BLOCK_M2=128,bwd_BLOCK_N2=64,bwd_num_warps=8,bwd_num_stages=2",
    "USE_TMA=true",
    "max-autotune",
]


def kernel_options(text: str) -> Optional[dict]:
    """A config's kernel_options (None for `default` and `max-autotune`)."""
    if text in ("default", "max-autotune"):
        return None
    options = {}
    for pair in text.split(","):
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise ValueError(f"expected KEY=VALUE pairs joined by commas, got {text!r}")
        lowered = value.lower()
        if lowered not in ("true", "false") and not value.lstrip("-").isdigit():
            raise ValueError(f"{key}={value!r} in {text!r} is neither an integer nor true/false")
        options[key] = lowered == "true" if lowered in ("true", "false") else int(value)
    return options


def make_inputs(batch: int, seqlen: int, heads: int, kv_heads: int, qk_dim: int, v_dim: int) -> list[torch.Tensor]:
    g = torch.Generator(device="cuda").manual_seed(0)
    shapes = [(heads, qk_dim), (kv_heads, qk_dim), (kv_heads, v_dim)]
    return [torch.randn(batch, seqlen, h, d, generator=g, device="cuda", dtype=torch.bfloat16).transpose(1, 2)
            for h, d in shapes]


def run_config(config: str, inputs: list[torch.Tensor], dout: torch.Tensor, block_mask, warmup: int, iters: int):
    import torch._inductor.config as inductor_config
    from torch.nn.attention.flex_attention import flex_attention

    torch._dynamo.reset()
    options = kernel_options(config)
    with inductor_config.patch(max_autotune=config == "max-autotune"):
        compiled = torch.compile(flex_attention, dynamic=False)
        leaves = [t.detach().requires_grad_(True) for t in inputs]

        def forward():
            return compiled(*leaves, block_mask=block_mask, enable_gqa=True, kernel_options=options)

        def forward_backward():
            for t in leaves:
                t.grad = None
            out = forward()
            out.backward(dout)
            return out

        for _ in range(max(1, warmup)):  # the first call compiles
            out = forward_backward()
        fwd = kernel_ms(forward, iters)[0]  # all kernels' device ms per call
        bwd = kernel_ms(forward_backward, iters)[0] - fwd
    return fwd, bwd, [out.detach(), *(t.grad for t in leaves)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--configs", nargs="*", default=CONFIGS, help="kernel options per config (see above)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seqlen", type=int, default=2176, help="positions, meta tokens included")
    parser.add_argument("--window", type=int, default=1024)
    parser.add_argument("--meta", type=int, default=128)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--iters", type=int, default=20)
    args = parser.parse_args()
    for config in args.configs:  # bad input fails before the GPU work
        try:
            kernel_options(config)
        except ValueError as error:
            parser.error(f"--configs: {error}")
    from components.ops.attention import _block_mask, allowed_keys

    heads, kv_heads, qk_dim, v_dim = 8, 2, 64, 128
    inputs = make_inputs(args.batch, args.seqlen, heads, kv_heads, qk_dim, v_dim)
    dout = torch.randn(args.batch, heads, args.seqlen, v_dim, device="cuda", dtype=torch.bfloat16)
    block_mask = _block_mask(args.seqlen, args.window, args.meta, "cuda")
    positions = torch.arange(args.seqlen, device="cuda")[None]
    pairs = int(allowed_keys(positions, positions, args.window, args.meta).sum())
    flops = 2 * args.batch * heads * pairs * (qk_dim + v_dim)  # forward; the backward does 2.5x
    print(f"{torch.cuda.get_device_name()}: FlexAttention, batch {args.batch}, {args.seqlen} positions, {heads}/"
          f"{kv_heads} heads, keys {qk_dim}, values {v_dim}, window {args.window} + {args.meta} meta tokens, bf16, "
          f"torch {torch.__version__}")
    print(f"{'config':<100}{'fwd ms':>8}{'bwd ms':>8}{'total':>8}{'fwd TF/s':>9}{'bwd TF/s':>9}{'max rel err':>12}")
    reference = None
    for config in args.configs:
        try:
            fwd, bwd, results = run_config(config, inputs, dout, block_mask, args.warmup, args.iters)
        except Exception as error:  # an option this torch rejects, or a config out of shared memory
            print(f"{config:<100} failed: {type(error).__name__}: {str(error).splitlines()[0][:160]}")
            continue
        reference = reference or results
        err = max(float((r.float() - ref.float()).norm() / ref.float().norm()) for r, ref in zip(results, reference))
        print(f"{config:<100}{fwd:>8.3f}{bwd:>8.3f}{fwd + bwd:>8.3f}{flops / fwd / 1e9:>9.1f}"
              f"{2.5 * flops / bwd / 1e9:>9.1f}{err:>12.2e}")


if __name__ == "__main__":
    main()
