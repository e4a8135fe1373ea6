"""End-of-run evaluation: every number a run reports, under stable metric names (README "Metrics")."""
from __future__ import annotations

import gzip
import math
from pathlib import Path
from typing import Any, Optional

import torch
import torch.nn.functional as F

from components.analysis import (attention_entropy_per_layer, attention_share, effective_receptive_field,
                                 layer_last_rows)
from components.attention_maps import collect_attention_maps
from components.cache_accounting import paper_cache_mb
from components.config import ConfigError, MissingInputError

from .data.mqar import mqar_slice_counts
from .data.passkey import PasskeyExample, make_passkey_examples, passkey_accuracy_by_depth


def _model_fn(model):
    device = next(model.parameters()).device
    return lambda ids: model(ids.to(device)).float().cpu()


@torch.no_grad()
def mean_loss(model, loader, max_batches: Optional[int] = None) -> float:
    device = next(model.parameters()).device
    total, count = 0.0, 0
    for i, batch in enumerate(loader):
        if max_batches is not None and i >= max_batches:
            break
        logits = model(batch["input_ids"].to(device)).float()
        labels = batch["labels"].to(device)
        total += F.cross_entropy(logits.flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="sum").item()
        count += int((labels != -100).sum())
    return total / max(count, 1)


@torch.no_grad()
def mqar_metrics(model, loader) -> dict[str, float]:
    """Argmax accuracy at the supervised positions, overall and per num_kv_pairs slice. Hits are counted batch by
    batch: the logits of a whole test set (examples x seq_len x vocab) need not fit in memory."""
    device = next(model.parameters()).device
    counts: dict[int, list[int]] = {}
    for batch in loader:
        logits = model(batch["input_ids"].to(device)).float()
        for k, (correct, total) in mqar_slice_counts(logits, batch["labels"].to(device),
                                                     batch["num_kv_pairs"].to(device)).items():
            slot = counts.setdefault(k, [0, 0])
            slot[0] += correct
            slot[1] += total
    correct, total = sum(c for c, _ in counts.values()), sum(t for _, t in counts.values())
    metrics = {"recall/mqar_acc": correct / max(total, 1)}
    metrics.update({f"recall/mqar_acc_kv{k}": c / t for k, (c, t) in sorted(counts.items())})
    return metrics


def perplexity_metrics(model, datamodule, max_batches: Optional[int]) -> dict[str, float]:
    """val/* over the batches validation reads during training (`max_batches`: trainer.limit_val_batches), so the
    final point continues its curve; test/<name>/* over each whole held-out set (up to data.max_eval_tokens), not
    just its first books."""
    loss = mean_loss(model, datamodule.val_dataloader(), max_batches)
    metrics = {"val/loss": loss, "val/ppl": math.exp(min(loss, 50.0))}
    datamodule.setup("test")
    for name, loader in zip(datamodule.test_names, datamodule.test_dataloader() or []):
        test_loss = mean_loss(model, loader, None)
        metrics[f"test/{name}/loss"] = test_loss
        metrics[f"test/{name}/ppl"] = math.exp(min(test_loss, 50.0))
    return metrics


def _read_text(path: str, max_chars: int = 2_000_000) -> str:
    p = Path(path)
    if not p.is_file():
        raise MissingInputError(f"eval.passkey.haystack_path: no such file {path}")
    opener = gzip.open if p.suffix == ".gz" else open
    try:
        with opener(p, "rt", encoding="utf-8", errors="replace") as f:
            return f.read(max_chars)
    except (OSError, EOFError) as error:  # a .gz that is not gzip, a truncated one
        raise ConfigError(f"eval.passkey.haystack_path: cannot read {path}: {error}") from None


def passkey_examples(cfg: dict[str, Any], tokenizer, seed: int) -> list[PasskeyExample]:
    """The passkey prompts of cfg (eval.passkey), built before training: a haystack or a length that cannot make
    them fails then, not after the run has trained."""
    return make_passkey_examples(_read_text(cfg["haystack_path"]), tokenizer, cfg["seq_len"], list(cfg["depths"]),
                                 cfg["num_per_depth"], seed)


def passkey_metrics(model, examples: list[PasskeyExample]) -> dict[str, float]:
    by_depth = passkey_accuracy_by_depth(_model_fn(model), examples)
    metrics = {"recall/passkey_acc": sum(by_depth.values()) / len(by_depth)}
    metrics.update({f"recall/passkey_acc_depth{int(round(d * 100)):03d}": v for d, v in sorted(by_depth.items())})
    return metrics


def cache_metrics(model, lengths: list[int]) -> dict[str, float]:
    return {f"cache/mb_{n // 1024}k": paper_cache_mb(model, n) for n in lengths}


def analysis_metrics(model, input_ids: torch.Tensor) -> dict[str, float]:
    """ERF, attention entropy and attention share (paper §2.2.2, Fig. 8, Fig. 9) on one batch."""
    maps = collect_attention_maps(model, input_ids)
    branches = [[m for m in (maps.attention.get(i), maps.ssm.get(i)) if m is not None]
                for i in sorted(set(maps.attention) | set(maps.ssm))]
    metrics: dict[str, float] = {"analysis/erf": effective_receptive_field([layer_last_rows(b) for b in branches])}
    if maps.attention:
        layers = [maps.attention[i] for i in sorted(maps.attention)]
        entropy = attention_entropy_per_layer(layers, num_meta=maps.num_meta)
        metrics["analysis/attn_entropy"] = entropy.mean().item()
        for i, layer_entropy in zip(sorted(maps.attention), entropy):
            metrics[f"analysis/attn_entropy_layer{i}"] = layer_entropy.mean().item()
        shares = [attention_share(m, maps.num_meta) for m in layers]
        for key in shares[0]:
            metrics[f"analysis/attn_share_{key}"] = sum(s[key] for s in shares) / len(shares)
    if maps.ssm:
        shares = [attention_share(maps.ssm[i], maps.num_meta) for i in sorted(maps.ssm)]
        for key in shares[0]:
            metrics[f"analysis/ssm_share_{key}"] = sum(s[key] for s in shares) / len(shares)
    return metrics
