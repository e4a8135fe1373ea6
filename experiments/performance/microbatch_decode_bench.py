"""Time a compiled decode step with its batch split into micro-batches that run side by side on CUDA streams.

    python experiments/performance/microbatch_decode_bench.py --rows roadmap_e mamba --splits 1 2

At batch 128 and an 8k context a row's decode step is two kinds of work in turn: attention (or the SSM state update)
reading the caches near the memory's bandwidth, and chains of small kernels (matmuls at M = 128, norms, RoPE) that
each take their fixed cost and leave most of the memory system idle. Split the batch in k slices with their own
states and run each slice's whole step on its own stream, and one slice's cache reads can overlap another's small
kernels (NanoFlow's nano-batching, Zhu et al., 2024; DeepSeek-V3's two micro-batches in decoding do the same). The
price: every weight is read k times and every kernel launched k times.

Each split is one CUDA graph holding the k steps (fork, k steps, join), replayed --steps times after a prefill of
--context random tokens; the time per replay is the step time of the whole batch. The logits of the first replay
are compared with split 1's (the same prompts). Rows are built at 300M in bf16 with random weights, as the bench's.
The timed replays' Unix start and end times are printed too, to line them up with a clock and power log.
"""
from __future__ import annotations

import argparse
import json
import time

import torch

from arch_lab.bench.flops import decode_bandwidth_bound_tok_s
from arch_lab.bench.measure import measure_copy_bandwidth_gbs
from components.generation import Generator
from components.model import HybridLM
from components.presets import preset


def capture(step, states, tokens) -> tuple[torch.cuda.CUDAGraph, list[torch.Tensor]]:
    """One graph running `step` on every state, each on its own stream; returns it with its logits outputs."""
    streams = [torch.cuda.Stream() for _ in states]
    warm = torch.cuda.Stream()
    warm.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(warm):
        for _ in range(2):
            for t, s in zip(tokens, states):
                step(t, s)
    torch.cuda.current_stream().wait_stream(warm)
    graph, logits = torch.cuda.CUDAGraph(), []
    with torch.cuda.graph(graph):
        main = torch.cuda.current_stream()
        for stream in streams:
            stream.wait_stream(main)
        for stream, t, s in zip(streams, tokens, states):
            with torch.cuda.stream(stream):
                logits.append(step(t, s))
        for stream in streams:
            main.wait_stream(stream)
    return graph, logits


def measure(model, split: int, batch: int, context: int, steps: int, chunk: int, ids: torch.Tensor) -> dict:
    torch._dynamo.reset()  # each split compiles for its own slice size, never a dynamic-shape graph
    gen = Generator(model, cuda_graph=False, compile=True, pdl=True)
    rows = batch // split
    states = [gen.new_state(rows, context + steps + 1) for _ in range(split)]
    tokens = [torch.zeros(rows, 1, dtype=torch.long, device="cuda") for _ in range(split)]
    t0 = time.perf_counter()
    graph, logits = capture(gen.decode_step, states, tokens)
    compile_s = time.perf_counter() - t0
    for i, state in enumerate(states):
        state.load_learned_init(gen.learned_init)
        last = gen.prefill(state, ids[i * rows:(i + 1) * rows], chunk_size=chunk)
        tokens[i].copy_(last.argmax(-1)[:, None])
    graph.replay()
    first = torch.cat([l[:, -1].float() for l in logits])
    start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
    torch.cuda.synchronize()
    wall = [time.time()]
    start.record()
    for _ in range(steps - 1):
        graph.replay()
    end.record()
    torch.cuda.synchronize()
    wall.append(time.time())  # Unix times of the timed replays, to find them among nvidia-smi's samples
    return {"split": split, "ms_per_step": start.elapsed_time(end) / (steps - 1), "compile_s": compile_s,
            "replays_wall_s": wall, "first_logits": first}


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", nargs="+", default=["roadmap_e", "mamba"])
    ap.add_argument("--splits", nargs="+", type=int, default=[1, 2])
    ap.add_argument("--branches", default="concurrent", choices=["concurrent", "sequential"])
    ap.add_argument("--batch", type=int, default=128)
    ap.add_argument("--context", type=int, default=8192)
    ap.add_argument("--steps", type=int, default=32)
    ap.add_argument("--prefill-chunk", type=int, default=1024)
    ap.add_argument("--out", default=None)
    args = ap.parse_args()
    bandwidth = measure_copy_bandwidth_gbs(torch.device("cuda"))
    print(f"copy bandwidth {bandwidth:.0f} GB/s; batch {args.batch}, context {args.context}, "
          f"branches {args.branches}", flush=True)
    results = []
    for row in args.rows:
        torch.manual_seed(0)
        model = HybridLM(preset(row, "300m")).to("cuda", torch.bfloat16).eval()
        model.set_backend("auto", "triton", args.branches)
        bound = decode_bandwidth_bound_tok_s(model, args.batch, args.context, args.steps, 2, bandwidth)
        ids = torch.randint(0, model.cfg.vocab_size, (args.batch, args.context), device="cuda",
                            generator=torch.Generator(device="cuda").manual_seed(0))
        reference = None
        with torch.no_grad():
            for split in args.splits:
                r = measure(model, split, args.batch, args.context, args.steps, args.prefill_chunk, ids)
                first = r.pop("first_logits")
                reference = first if reference is None else reference
                r["max_logit_diff_vs_first_split"] = float((first - reference).abs().max())
                r["fraction_of_bound"] = args.batch / (r["ms_per_step"] / 1e3) / bound
                r.update(row=row, bound_ms=args.batch / bound * 1e3)
                print(json.dumps(r), flush=True)
                results.append(r)
        del model
        torch.cuda.empty_cache()
    if args.out:
        with open(args.out, "w") as f:
            json.dump(results, f, indent=1)


if __name__ == "__main__":
    main()
