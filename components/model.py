"""HybridLM: one model class for every architecture of the roadmap, built from one `ModelConfig`.

    tokens -> embedding -> [meta tokens ; x] -> N x (h += mixer(norm h); h += ffn(norm h)) -> norm
           -> drop meta positions -> tied LM head
"""
from __future__ import annotations

from typing import Callable, Optional

import torch
import torch.nn.functional as F
from torch import nn

from .config import ModelConfig
from .ffn import SwiGLU
from .hybrid_mixer import DECODE_BRANCHES, HybridHeadMixer
from .inference_state import InferenceState
from .kv_cache import StepInfo
from .layer_plan import LayerPlan, LayerSpec, resolve_layer_plan
from .meta_tokens import MetaTokens
from .norms import RMSNorm
from .ops.backend import BACKENDS, BackendError, describe_backends
from .ops.selective_scan import DEFAULT_SCAN_KERNEL, check_scan_kernel


class DecoderLayer(nn.Module):
    def __init__(self, spec: LayerSpec, cfg: ModelConfig):
        super().__init__()
        self.mixer_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.mixer = HybridHeadMixer(spec, cfg)
        self.ffn_norm = RMSNorm(cfg.d_model, cfg.norm_eps) if cfg.ffn_dim else None
        self.ffn = SwiGLU(cfg.d_model, cfg.ffn_dim) if cfg.ffn_dim else None

    def forward(self, h: torch.Tensor, step: StepInfo, kv_cache=None, ssm_state=None) -> torch.Tensor:
        h = h + self.mixer(self.mixer_norm(h), step, kv_cache, ssm_state)
        if self.ffn is not None:
            h = h + self.ffn(self.ffn_norm(h))
        return h


class HybridLM(nn.Module):
    def __init__(self, cfg: ModelConfig):
        super().__init__()
        if cfg.param_budget is not None:
            from .param_count import solve_param_budget

            cfg = solve_param_budget(cfg)
        self.cfg = cfg.validate()
        self.plan: LayerPlan = resolve_layer_plan(cfg)
        self.embed = nn.Embedding(cfg.vocab_size, cfg.d_model)
        self.meta = MetaTokens(cfg.n_meta_tokens, cfg.d_model, cfg.init_std)
        self.layers = nn.ModuleList(DecoderLayer(spec, cfg) for spec in self.plan)
        self.final_norm = RMSNorm(cfg.d_model, cfg.norm_eps)
        self.lm_head = None if cfg.tie_embeddings else nn.Linear(cfg.d_model, cfg.vocab_size, bias=False)
        self._init_weights()

    def _init_weights(self) -> None:
        for name, module in self.named_modules():
            if isinstance(module, nn.Linear) and not name.endswith("dt_proj"):
                nn.init.normal_(module.weight, std=self.cfg.init_std)
            elif isinstance(module, nn.Embedding):
                nn.init.normal_(module.weight, std=self.cfg.init_std)

    def set_backend(self, backend: str, scan_kernel: str = DEFAULT_SCAN_KERNEL,
                    decode_branches: str = "concurrent") -> None:
        """Choose "auto" (kernels on CUDA when installed), "reference" or "kernel" for every compute op, the
        Mamba-1 selective scan's kernel ("mamba_ssm" or "triton": ops/selective_scan.py), and whether a hybrid
        layer's branches decode side by side on the GPU ("concurrent") or one after the other ("sequential")."""
        if backend not in BACKENDS:  # an op would only fail when it resolves the name, mid-run
            raise BackendError(f"backend must be one of {list(BACKENDS)}, got {backend!r}")
        check_scan_kernel(scan_kernel)
        if decode_branches not in DECODE_BRANCHES:
            raise BackendError(f"decode_branches must be one of {list(DECODE_BRANCHES)}, got {decode_branches!r}")
        for module in self.modules():
            if hasattr(module, "backend"):
                module.backend = backend
            if hasattr(module, "scan_kernel"):
                module.scan_kernel = scan_kernel
            if hasattr(module, "decode_branches"):
                module.decode_branches = decode_branches

    def compile(self, *args, **kwargs) -> None:
        """nn.Module.compile (in place: parameter names and checkpoints stay as they are), with the kernel packages
        imported first, so that the compiled code finds their import outcome cached and never traces an import."""
        describe_backends()
        super().compile(*args, **kwargs)

    def logits(self, h: torch.Tensor) -> torch.Tensor:
        """Final norm + LM head on hidden states (meta positions already removed)."""
        h = self.final_norm(h)
        return self.lm_head(h) if self.lm_head is not None else F.linear(h, self.embed.weight)

    @property
    def lm_head_weight(self) -> torch.Tensor:
        """The output projection's (vocab, d_model) weight: the embedding's when tied."""
        return self.lm_head.weight if self.lm_head is not None else self.embed.weight

    def inference_logits(self, h: torch.Tensor) -> torch.Tensor:
        """`logits`, computed as (W h^T)^T. With a vocabulary that is not a multiple of 8 (32,001 here),
        (b * l, vocab) rows are not 16-byte aligned, and cuBLAS runs an old sm75 kernel for them on the H200: 119 us
        at batch 128 for 66 MB of weights, against 44 us this way (experiments/performance/RESULTS.md). Training
        keeps `logits`, whose contiguous rows the loss reads.

        A decode step (l == 1) gets contiguous rows, which its sampler reduces over: the greedy argmax took 100 us
        on the (vocab, b) layout, 10 us on rows, and the copy 30 us (eager, batch 128). A prefill chunk keeps the
        (b, l, vocab) view of the (vocab, b * l) product: copying it would double a tensor of gigabytes."""
        logits = (self.lm_head_weight @ self.final_norm(h).flatten(0, 1).T).T.view(*h.shape[:-1], -1)
        return logits.contiguous() if h.shape[1] == 1 else logits

    def _check_ids(self, input_ids: torch.Tensor) -> None:
        if input_ids.dim() != 2:
            raise ValueError(f"input_ids must be (batch, length) token ids, got shape {tuple(input_ids.shape)}")
        length = input_ids.shape[1]
        if length > self.cfg.max_seq_len:
            raise ValueError(f"sequence of {length} tokens is longer than model.max_seq_len={self.cfg.max_seq_len}; "
                             f"raise model.max_seq_len or shorten data.seq_len")

    def hidden_states(self, input_ids: torch.Tensor) -> torch.Tensor:
        """Full forward (training): (b, L) -> (b, m + L, d) final hidden states, meta positions included."""
        self._check_ids(input_ids)
        h = self.meta.prepend(self.embed(input_ids))
        positions = torch.arange(h.shape[1], device=h.device).expand(h.shape[0], -1)
        step = StepInfo(positions=positions)
        for layer in self.layers:
            h = layer(h, step)
        return h

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits(self.meta.strip(self.hidden_states(input_ids)))

    def loss(self, input_ids: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        logits = self(input_ids)
        return F.cross_entropy(logits.float().flatten(0, 1), labels.flatten(), ignore_index=-100)

    # ---- inference -----------------------------------------------------------------------------------------
    def _run_cached(self, h: torch.Tensor, step: StepInfo, state: InferenceState) -> torch.Tensor:
        for i, layer in enumerate(self.layers):
            h = layer(h, step, state.kv[i], state.ssm[i])
        return h

    @torch.no_grad()
    def learned_cache_init(self, dtype: torch.dtype, device) -> InferenceState:
        """Meta-token K/V and the SSM state after the meta tokens: the same for every prompt (paper §2.4)."""
        state = InferenceState.allocate(self, 1, 0, dtype, device)
        m = self.cfg.n_meta_tokens
        if m:
            h = self.meta.embeddings.to(dtype=dtype, device=device)[None]
            step = StepInfo(positions=torch.arange(m, device=device)[None], start=state.position, pad=state.pad,
                            meta_phase=True)
            self._run_cached(h, step, state)
        return state

    def new_inference_state(self, batch: int, max_len: int, dtype: torch.dtype, device,
                            learned_init: Optional[InferenceState] = None) -> InferenceState:
        state = InferenceState.allocate(self, batch, max_len, dtype, device)
        state.load_learned_init(learned_init or self.learned_cache_init(dtype, device))
        return state

    def forward_cached(self, input_ids: torch.Tensor, state: InferenceState, pad: Optional[torch.Tensor] = None,
                       layers_and_logits: Optional[Callable] = None, last_only: bool = False) -> torch.Tensor:
        """Prefill (l > 1) or decode (l == 1) from `state`; `pad` (b,) = left padding of a prefill chunk.
        Returns the logits of every position, or with `last_only` of the last, (b, 1, vocab): all that a prompt's
        prefill needs, where (b, l, vocab) logits are the largest tensor of a long chunk (8.4 GB in bf16 at batch
        128 x 1,024 tokens and 32,001 words).

        The Python bookkeeping (lengths, padding) happens here; the tensor work is `cached_layers_and_logits`, or
        `layers_and_logits` in its place (a compiled version of it: it reads no per-step Python value, so one
        compilation serves every step).
        """
        if input_ids.dim() != 2 or input_ids.shape[0] != state.batch:
            raise ValueError(f"input_ids must be (batch, length) token ids for the inference state's batch of "
                             f"{state.batch}, got shape {tuple(input_ids.shape)}")
        b, l = input_ids.shape
        start = state.seq_len
        if start + l > state.max_len:
            raise ValueError(f"{start + l} tokens exceed the inference state's max_len={state.max_len}")
        if pad is not None:
            state.pad.copy_(pad)
            state.max_pad = int(pad.max())
        idx = state.position + torch.arange(l, device=input_ids.device)
        real = idx[None, :] >= state.pad[:, None]
        positions = torch.where(real, self.cfg.n_meta_tokens + idx[None, :] - state.pad[:, None], 0)
        token_mask = real if start < state.max_pad else None
        step = StepInfo(positions=positions, start=state.position.clone(), pad=state.pad, token_mask=token_mask,
                        fresh_ssm_state=start == 0 and self.cfg.n_meta_tokens == 0)
        logits = (layers_and_logits or self.cached_layers_and_logits)(input_ids, step, state, last_only)
        state.seq_len += l
        state.position += l
        return logits

    def cached_layers_and_logits(self, input_ids: torch.Tensor, step: StepInfo, state: InferenceState,
                                 last_only: bool = False) -> torch.Tensor:
        h = self._run_cached(self.embed(input_ids), step, state)
        return self.inference_logits(h[:, -1:] if last_only else h)
