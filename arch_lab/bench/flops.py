"""Analytic work counts: model FLOPs per training token (for MFU) and the byte bound of cached decoding.

Training FLOPs per token (forward + backward), counted per real token (meta positions are extra work the
model does, like padding, and are not credited):

    flops/token = 6 * N_matmul                                              (weights; PaLM App. B, Chinchilla)
                + 3 * sum over attention layers  2 * n_heads * (qk_dim + v_dim) * ctx_eff
                + 3 * sum over SSM layers        c_scan * d_inner * d_state

- N_matmul: every weight element that does one multiply-add per token, i.e. the weights of all nn.Linear and
  nn.Conv1d (depthwise: d_conv multiply-adds per channel) inside the decoder layers, plus the LM head
  (vocab x d_model, counted whether or not it is tied to the embedding; the embedding lookup is no matmul).
  Norm weights, biases, A_log, D and meta tokens are not counted. 6 = 2 (multiply-add) x 3 (forward, and a
  backward pass that costs twice the forward): the "6N" rule of Chowdhery et al. 2022 (PaLM, App. B) and
  Hoffmann et al. 2022 (Chinchilla, App. F).
- Attention scores and values: a query against ctx_eff keys costs 2 * qk_dim (QK^T) + 2 * v_dim (AV) FLOPs per
  head; forward, times 3 for forward + backward. KV-consumer layers compute attention too, so they count.
  ctx_eff = the mean over queries i = 1..L of the keys each sees, itself included: min(i, window), which is
  (L + 1) / 2 for full causal attention and w - w(w - 1) / (2L) for a window w < L; plus the meta tokens, which
  every query sees.
- SSM scan: c_scan * d_inner * d_state per token forward, times 3. Mamba-1: c_scan = 9 (the selective scan's
  9·B·L·D·N count in Gu & Dao 2023, §3.3: discretize with exp, update, read out). Mamba-2: c_scan = 6 (the decay
  is one scalar per head, so only the x·B outer product, the decay-and-add and the C readout, 2 each, remain).

Decode bytes per step (the memory-bandwidth bound of cached decoding, batch b, cache length L):

    bytes/step  = weight_bytes + cache_bytes(L) + kv_consumer_bytes
    bound tok/s = b / (bytes/step / bandwidth)     (summed over the decode's steps, as their L grows)

- weight_bytes: every parameter in the run dtype (each decode step streams all weights once).
- cache_bytes(L) (`components.cache_accounting.cache_bytes`, batch b, run dtype, SSM scan state float32): the
  K/V of global layers up to the current length L (+ meta tokens), the full ring (+ meta) of every
  sliding-window KV owner, and each SSM layer's scan and conv state.
- kv_consumer_bytes: a KV-consumer layer (cross-layer KV sharing) owns no cache but reads its producer's ring
  (+ meta; a global producer's buffer, were one shared) again in its own attention. Its queries exist only once
  the layers before it have run, so the two reads cannot be one, and at the measured sizes a ring is larger than
  the GPU's L2 (row E at batch 128: 113 MB a ring, against the H200's 50 MB), so the second read comes from
  memory too. Before 2026-11-28 (nineteenth session) these reads were left out, which put rows D's and E's bounds
  1.23x and 1.25x too high (300M, 8k context, batch 128).
- Over a decode of n tokens after a `context`-token prefill, step t (0-based) reads L = context + t + 1 keys;
  the bound divides the n steps' summed bytes by the bandwidth.
This is the minimum any implementation must read: it counts state once (reads, not the writes back), and our
global-layer cache attends over its whole preallocated buffer, so our decode reads more than this bound.
"""
from __future__ import annotations

from torch import nn

from components.cache_accounting import cache_bytes, kv_bytes

SCAN_FLOPS_PER_STATE_ELEMENT = {"mamba1": 9, "mamba2": 6}


def matmul_params(model) -> int:
    """N_matmul: nn.Linear / nn.Conv1d weights inside the decoder layers + the LM head (vocab x d_model)."""
    layer_weights = sum(m.weight.numel() for m in model.layers.modules() if isinstance(m, (nn.Linear, nn.Conv1d)))
    return layer_weights + model.cfg.vocab_size * model.cfg.d_model


def attention_context(seq_len: int, window: int | None, num_meta: int) -> float:
    """Keys an average query attends to: query i (from 1) sees min(i, window) of the sequence's keys, itself
    included, plus the meta tokens."""
    span = seq_len if window is None else min(window, seq_len)
    return span - span * (span - 1) / (2 * seq_len) + num_meta  # the mean of min(i, span) over i = 1..seq_len


def attention_flops_per_token(model, seq_len: int) -> float:
    """Forward attention score + value FLOPs per token, summed over layers."""
    total = 0.0
    for layer in model.layers:
        attn = layer.mixer.attn
        if attn is not None:
            ctx = attention_context(seq_len, attn.window, model.cfg.n_meta_tokens)
            total += 2 * attn.n_heads * (attn.qk_dim + attn.v_dim) * ctx
    return total


def scan_flops_per_token(model) -> float:
    """Forward SSM scan FLOPs per token, summed over layers."""
    heads = [layer.mixer.ssm for layer in model.layers if layer.mixer.ssm is not None]
    if not heads:
        return 0.0
    return float(SCAN_FLOPS_PER_STATE_ELEMENT[model.cfg.ssm] * sum(h.d_inner * h.d_state for h in heads))


def train_flops_per_token(model, seq_len: int) -> float:
    """Model FLOPs per trained token (forward + backward) at sequence length `seq_len` (module docstring)."""
    return 6 * matmul_params(model) + 3 * (attention_flops_per_token(model, seq_len) + scan_flops_per_token(model))


def model_flops_utilization(tokens_per_s: float, flops_per_token: float, peak_tflops: float) -> float:
    """MFU: achieved model FLOPs per second over the device's peak."""
    return tokens_per_s * flops_per_token / (peak_tflops * 1e12)


def weight_bytes(model, dtype_bytes: int) -> int:
    return sum(p.numel() for p in model.parameters()) * dtype_bytes


def kv_consumer_bytes(model, batch: int, length: int, dtype_bytes: int) -> int:
    """Bytes the KV-consumer layers of one decode step read from their producers' caches (module docstring)."""
    return batch * sum(kv_bytes(model, spec, layer.mixer.attn, length, dtype_bytes)
                       for spec, layer in zip(model.plan, model.layers)
                       if layer.mixer.attn is not None and not layer.mixer.attn.owns_kv)


def decode_bytes_per_step(model, batch: int, length: int, dtype_bytes: int) -> int:
    """Bytes one decode step must read with `length` tokens in the cache (module docstring)."""
    return (weight_bytes(model, dtype_bytes) + cache_bytes(model, length, batch, dtype_bytes).total
            + kv_consumer_bytes(model, batch, length, dtype_bytes))


def decode_bandwidth_bound_tok_s(model, batch: int, context: int, new_tokens: int, dtype_bytes: int,
                                 bandwidth_gbs: float) -> float:
    """Upper bound on decode tokens/s if every step only streamed its bytes at `bandwidth_gbs` (1e9 B/s)."""
    total = sum(decode_bytes_per_step(model, batch, context + t + 1, dtype_bytes) for t in range(new_tokens))
    return batch * new_tokens * bandwidth_gbs * 1e9 / total
