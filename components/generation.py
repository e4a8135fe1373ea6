"""Batched generation: left-padded prefill from the learned cache initialization, then token-by-token decode."""
from __future__ import annotations

from dataclasses import dataclass, field
from functools import partial
from typing import Optional, Sequence

import torch

from .inference_state import InferenceState
from .ops.backend import describe_backends


@dataclass
class GenerationOutput:
    tokens: list[list[int]]  # generated continuation of each prompt (cut after eos when one is given)
    step_logits: list[torch.Tensor] = field(default_factory=list)  # (b, vocab) per generated token, if kept


def left_pad(prompts: Sequence[Sequence[int]], pad_id: int, device) -> tuple[torch.Tensor, torch.Tensor]:
    if not prompts or any(len(p) == 0 for p in prompts):
        raise ValueError("generation needs at least one prompt and every prompt needs >= 1 token")
    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad_id, dtype=torch.long, device=device)
    for row, p in enumerate(prompts):
        ids[row, width - len(p):] = torch.as_tensor(list(p), dtype=torch.long, device=device)
    pad = torch.tensor([width - len(p) for p in prompts], dtype=torch.long, device=device)
    return ids, pad


def sample_next(logits: torch.Tensor, greedy: bool, temperature: float, top_k: Optional[int],
                generator: Optional[torch.Generator]) -> torch.Tensor:
    if greedy:
        return logits.argmax(-1)
    if temperature <= 0:
        raise ValueError(f"temperature must be > 0 for sampling, got {temperature}")
    logits = logits.float() / temperature
    if top_k is not None:
        kth = logits.topk(top_k, dim=-1).values[..., -1:]
        logits = logits.masked_fill(logits < kth, float("-inf"))
    return torch.multinomial(logits.softmax(-1), 1, generator=generator).squeeze(-1)


class CUDAGraphDecoder:
    """One decode step captured as a CUDA graph, so each later step is one replay instead of hundreds of kernel
    launches (small-batch and SSM-heavy decoding is launch-bound otherwise).

    Capturing runs real steps on `state`, so the state is rewound to the learned initialization afterwards;
    create the decoder before the prefill. `step` is the model's `forward_cached`, or a compiled version of it.
    """

    capture_steps = 3  # two warm-up steps and the captured one, each run on the state

    def __init__(self, step, state: InferenceState, learned_init: InferenceState):
        if state.max_len < self.capture_steps:
            raise ValueError(f"capturing a decode step runs {self.capture_steps} steps on the inference state: give it "
                             f"max_len >= {self.capture_steps}, got {state.max_len}")
        self.state = state
        self.tokens = torch.zeros(state.batch, 1, dtype=torch.long, device=state.pad.device)
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        # Warm-up: autotuning, lazy initialisation and compilation stay out of the graph.
        with torch.cuda.stream(side):
            for _ in range(2):
                step(self.tokens, state)
        torch.cuda.current_stream().wait_stream(side)
        self.graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(self.graph):
            self.logits = step(self.tokens, state)
        state.load_learned_init(learned_init)

    def step(self, tokens: torch.Tensor) -> torch.Tensor:
        if self.state.seq_len + 1 > self.state.max_len:
            raise ValueError(f"{self.state.seq_len + 1} tokens exceed the inference state's max_len={self.state.max_len}")
        self.tokens.copy_(tokens)
        self.graph.replay()
        self.state.seq_len += 1
        return self.logits


class Generator:
    """Holds a model and its learned cache initialization (computed once, reused for every batch).

    `compile=True` runs the tensor work of each decode step through torch.compile, which fuses the step's many
    small element-wise kernels (norms, RoPE, gates, casts); the compiled code is kept here, so every decoder of
    this Generator reuses it. Prefill stays eager.

    With `pdl` (and compile) each of the compiled step's Triton kernels is launched with programmatic dependent
    launch on GPUs that have it (Hopper on; Inductor's triton.enable_pdl, off by default there): it starts while the
    kernel before it drains and waits inside for what it reads, which hides part of each of a step's hundreds of
    launches. On an H200 it made the 300M rows' decode steps 1.7-6.7% faster. Compiled training keeps Inductor's
    defaults: with PDL passed the same way, row E's once ran 3.8x slower (experiments/performance/RESULTS.md,
    twenty-second and twenty-third sessions).
    """

    def __init__(self, model, cuda_graph: Optional[bool] = None, compile: bool = False, pdl: bool = True):
        self.model = model
        param = next(model.parameters())
        self.dtype = param.dtype  # the caches' too: a cast model decodes in its own dtype
        self.device = param.device
        self.cuda_graph = self.device.type == "cuda" if cuda_graph is None else cuda_graph
        self.learned_init: InferenceState = model.learned_cache_init(self.dtype, self.device)
        self.decode_step = model.forward_cached
        if compile:
            describe_backends()  # kernel imports resolved before tracing, as HybridLM.compile does
            self.decode_step = partial(model.forward_cached,
                                       layers_and_logits=torch.compile(model.cached_layers_and_logits,
                                                                       options={"triton.enable_pdl": pdl}))

    def new_state(self, batch: int, max_len: int) -> InferenceState:
        return self.model.new_inference_state(batch, max_len, self.dtype, self.device, self.learned_init)

    def prefill(self, state: InferenceState, ids: torch.Tensor, pad: Optional[torch.Tensor] = None,
                chunk_size: Optional[int] = None) -> torch.Tensor:
        """Feed a (left-padded) prompt batch into `state`, `chunk_size` tokens at a time; returns the last logits.

        Chunking bounds the attention mask and activations to (batch, chunk, keys), which is what lets an 8k-token,
        batch-128 prompt fit on one GPU (a serving engine prefills in chunks for the same reason); the result equals
        a single-chunk prefill.
        """
        step = chunk_size or ids.shape[1]
        logits = None
        for i in range(0, ids.shape[1], step):
            logits = self.model.forward_cached(ids[:, i:i + step], state, pad if i == 0 else None,
                                               last_only=True)[:, -1]
        return logits

    def decoder(self, state: InferenceState):
        """A callable running one decode step on `state`: a CUDA-graph replay on GPUs, eager otherwise."""
        if self.cuda_graph:
            return CUDAGraphDecoder(self.decode_step, state, self.learned_init).step
        return lambda tokens: self.decode_step(tokens, state)

    @torch.no_grad()
    def generate(self, prompts: Sequence[Sequence[int]], max_new_tokens: int, *, greedy: bool = True,
                 temperature: float = 1.0, top_k: Optional[int] = None, eos_id: Optional[int] = None,
                 seed: Optional[int] = None, keep_logits: bool = False,
                 prefill_chunk: Optional[int] = None, vocab_limit: Optional[int] = None) -> GenerationOutput:
        """`vocab_limit`: only ids below it may be produced (a tokenizer smaller than the embedding table)."""
        ids, pad = left_pad(prompts, 0, self.device)  # any id: the padding is masked out
        length = ids.shape[1] + max_new_tokens  # room for the decoder's capture, however short the request
        state = self.new_state(len(prompts), max(length, CUDAGraphDecoder.capture_steps) if self.cuda_graph else length)
        decode = self.decoder(state)
        gen = torch.Generator(device=self.device).manual_seed(seed) if seed is not None else None
        logits = self.prefill(state, ids, pad, prefill_chunk)
        out, kept = [], []
        for step in range(max_new_tokens):
            if keep_logits:
                kept.append(logits.float().cpu())
            if vocab_limit is not None:
                logits = logits.clone()
                logits[..., vocab_limit:] = float("-inf")
            nxt = sample_next(logits, greedy, temperature, top_k, gen)
            out.append(nxt)
            if step + 1 < max_new_tokens:
                logits = decode(nxt[:, None])[:, -1]
        tokens = torch.stack(out, dim=1).tolist() if out else [[] for _ in prompts]
        if eos_id is not None:
            tokens = [row[:row.index(eos_id) + 1] if eos_id in row else row for row in tokens]
        return GenerationOutput(tokens, kept)
