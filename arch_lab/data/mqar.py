"""Multi-Query Associative Recall (MQAR), as defined by Zoology (Arora, Eyuboglu et al. 2023,
"Zoology: Measuring and improving recall in efficient language models"), following
`multiquery_ar` in HazyResearch/zoology (zoology/data/associative_recall.py):

- keys are drawn from [1, vocab/2) and values from [vocab/2, vocab) (0 is the filler token);
  each example holds num_kv_pairs distinct keys, each paired with a value;
- the sequence starts with the pairs `k1 v1 k2 v2 ...` (2 * num_kv_pairs tokens);
- every key is queried once in the rest of the sequence, at even offsets 2 * gap after the pair
  block, with gaps drawn without replacement from a power law p(gap) ∝ (gap + 1) ** (power_a - 1);
- the label at a query position is that key's value (labels are already shifted: labels[:, t]
  is the target of position t), -100 everywhere else. As in Zoology the value itself is not
  written into the input after the query; that slot is filler like the rest;
- with random_non_queries, filler tokens are replaced by uniform draws from the whole vocabulary;
- a slice may be shorter than seq_len (Zoology's training mix puts 4 pairs in 64 tokens, 8 in 128 and
  more in 256): its examples are right-padded with token 0 and unsupervised there. A causal model's
  predictions before the padding do not see it, so a short example trains exactly as it would alone.

Zoology draws with numpy loops over examples (np.random.choice per row); here every draw
without replacement is vectorized over examples: keys and values by rejecting rows with a
repeat (or top-k of uniform noise when repeats are common), gaps by Gumbel top-k, which has the
distribution of sequential weighted sampling without replacement. Streams therefore differ from
Zoology's for the same seed; the distributions are the same.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from components.config import ConfigError

IGNORE_INDEX = -100
_MAX_NOISE_ELEMENTS = 1 << 24  # bound the (rows × choices) noise matrix of dense key sampling


@dataclass
class MQARConfig:
    """`num_kv_pairs` may be a list: the examples are then split over its values (slices), evenly or
    in proportion to `slice_weights`, earlier slices taking the remainder. `num_examples` is the total
    over all slices. `slice_seq_lens` gives each slice its own example length (<= seq_len; shorter
    examples are right-padded), as in Zoology's training mix; by default every slice is seq_len long."""

    vocab_size: int = 8192
    seq_len: int = 64
    num_kv_pairs: int | list[int] = 4
    num_examples: int = 1000
    power_a: float = 0.01
    seed: int = 0
    random_non_queries: bool = True
    slice_seq_lens: list[int] | None = None
    slice_weights: list[float] | None = None
    config_keys: str = "train"  # the data.* keys its errors name: "train", or "test" (the val and test sets)

    @property
    def slices(self) -> list[int]:
        return [self.num_kv_pairs] if isinstance(self.num_kv_pairs, int) else list(self.num_kv_pairs)

    @property
    def lengths(self) -> list[int]:
        """The example length of each slice, before padding to seq_len."""
        return list(self.slice_seq_lens) if self.slice_seq_lens is not None else [self.seq_len] * len(self.slices)

    def slice_rows(self) -> list[int]:
        """Examples per slice: num_examples split in proportion to the weights, remainder to the first slices."""
        weights = list(self.slice_weights) if self.slice_weights is not None else [1.0] * len(self.slices)
        rows = [int(self.num_examples * w // sum(weights)) for w in weights]
        for i in range(self.num_examples - sum(rows)):
            rows[i] += 1
        return rows

    def __post_init__(self) -> None:
        slices, pairs_key = self.slices, f"data.num_kv_pairs_{self.config_keys}"
        if not slices or any(not isinstance(k, int) or k < 1 for k in slices):
            raise ConfigError(
                f"{pairs_key} must be a positive int or a non-empty list of them, got {self.num_kv_pairs!r}"
            )
        # Only the training mixture takes per-slice lengths and weights, so errors name the data.train_* keys.
        for key, values in (("seq_lens", self.slice_seq_lens), ("weights", self.slice_weights)):
            if values is not None and len(values) != len(slices):
                raise ConfigError(
                    f"data.train_slice_{key} needs one entry per num_kv_pairs_train slice ({len(slices)}), "
                    f"got {list(values)!r}"
                )
        if self.slice_weights is not None and any(w <= 0 for w in self.slice_weights):
            raise ConfigError(f"data.train_slice_weights must all be > 0, got {list(self.slice_weights)!r}")
        if any(length > self.seq_len for length in self.lengths):
            raise ConfigError(
                f"data.train_slice_seq_lens must each be <= data.seq_len={self.seq_len}, got {self.lengths!r}"
            )
        length_key = "data.train_slice_seq_lens" if self.slice_seq_lens is not None else "data.seq_len"
        for k, length in zip(slices, self.lengths):
            if length < 4 * k:
                raise ConfigError(
                    f"{pairs_key}: {k} pairs need {length_key} >= 4 * {k} = {4 * k} (room for the pairs and "
                    f"their queries); {length_key}={length} allows at most {length // 4}"
                )
        most = max(slices)
        min_vocab = 2 * most + 2  # keys come from [1, vocab//2), values from [vocab//2, vocab)
        if self.vocab_size < min_vocab:
            raise ConfigError(
                f"data.vocab_size must be >= {min_vocab} to hold {most} distinct keys and values "
                f"in each half of the vocabulary, got {self.vocab_size}"
            )
        if self.num_examples < len(slices) or min(self.slice_rows()) < 1:
            raise ConfigError(
                f"data.{self.config_keys}_examples must give every {pairs_key} slice ({len(slices)}) at least "
                f"one example, got {self.num_examples}"
            )
        if self.power_a <= 0:
            raise ConfigError(f"data.power_a must be > 0 (1.0 = uniform gaps), got {self.power_a}")


def _has_duplicate(rows: torch.Tensor) -> torch.Tensor:
    ordered = rows.sort(dim=1).values
    return (ordered[:, 1:] == ordered[:, :-1]).any(dim=1)


def _sample_distinct(rows: int, low: int, high: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """(rows, k) ints from [low, high), distinct within each row, uniformly in random order."""
    choices = high - low
    if k * k <= choices:
        # Duplicates are rare (a row is clean with probability >= exp(-1/2)): draw with
        # replacement and redraw whole rows that repeat a value, which keeps rows uniform.
        out = torch.randint(low, high, (rows, k), generator=gen)
        redo = torch.nonzero(_has_duplicate(out)).flatten()
        while len(redo):
            out[redo] = torch.randint(low, high, (len(redo), k), generator=gen)
            redo = redo[_has_duplicate(out[redo])]
        return out
    # Dense case: the top-k of uniform noise over all choices, in row chunks to bound memory.
    chunk = max(1, _MAX_NOISE_ELEMENTS // choices)
    parts = [
        torch.rand(min(chunk, rows - start), choices, generator=gen).topk(k, dim=1).indices
        for start in range(0, rows, chunk)
    ]
    return torch.cat(parts) + low


def _sample_power_law_gaps(rows: int, space: int, k: int, power_a: float, gen: torch.Generator) -> torch.Tensor:
    """(rows, k) distinct gaps in [0, space), weighted by (gap + 1) ** (power_a - 1)."""
    log_p = (power_a - 1) * torch.log(torch.arange(1, space + 1, dtype=torch.float64))
    uniform = torch.rand(rows, space, generator=gen, dtype=torch.float64).clamp_min(1e-300)
    gumbel = -torch.log(-torch.log(uniform))
    return (log_p + gumbel).topk(k, dim=1).indices


def _generate_slice(
    rows: int, cfg: MQARConfig, num_kv_pairs: int, length: int, gen: torch.Generator
) -> tuple[torch.Tensor, torch.Tensor]:
    """Examples of `length` tokens, right-padded to cfg.seq_len (token 0, unsupervised)."""
    half = cfg.vocab_size // 2
    context = 2 * num_kv_pairs
    keys = _sample_distinct(rows, 1, half, num_kv_pairs, gen)
    values = _sample_distinct(rows, half, cfg.vocab_size, num_kv_pairs, gen)

    inputs = torch.zeros(rows, length, dtype=torch.long)
    inputs[:, 0:context:2] = keys
    inputs[:, 1:context:2] = values

    gaps = _sample_power_law_gaps(rows, (length - context) // 2, num_kv_pairs, cfg.power_a, gen)
    query_pos = context + 2 * gaps
    inputs.scatter_(1, query_pos, keys)
    labels = torch.full_like(inputs, IGNORE_INDEX)
    labels.scatter_(1, query_pos, values)

    if cfg.random_non_queries:
        filler = inputs == 0
        inputs[filler] = torch.randint(cfg.vocab_size, inputs.shape, generator=gen)[filler]
    pad = cfg.seq_len - length
    return torch.nn.functional.pad(inputs, (0, pad)), torch.nn.functional.pad(labels, (0, pad), value=IGNORE_INDEX)


def generate_mqar(cfg: MQARConfig) -> dict[str, torch.Tensor]:
    """input_ids (N, L), labels (N, L) and num_kv_pairs (N,): the slice each example belongs to."""
    gen = torch.Generator().manual_seed(cfg.seed)
    inputs, labels, slice_ids = [], [], []
    for rows, num_kv_pairs, length in zip(cfg.slice_rows(), cfg.slices, cfg.lengths):
        x, y = _generate_slice(rows, cfg, num_kv_pairs, length, gen)
        inputs.append(x)
        labels.append(y)
        slice_ids.append(torch.full((rows,), num_kv_pairs, dtype=torch.long))
    return {"input_ids": torch.cat(inputs), "labels": torch.cat(labels), "num_kv_pairs": torch.cat(slice_ids)}


def count_shared_examples(reference: torch.Tensor, candidates: torch.Tensor) -> int:
    """How many rows of `candidates` equal some row of `reference` (e.g. test examples seen in
    training). Rows are compared through a 64-bit hash first, then exactly on hash matches."""

    def row_hashes(rows: torch.Tensor) -> np.ndarray:
        odd = np.random.default_rng(0).integers(1, 2**63, size=rows.shape[1], dtype=np.uint64) | np.uint64(1)
        with np.errstate(over="ignore"):  # uint64 arithmetic wraps around, as a hash should
            return (rows.numpy().astype(np.uint64) * odd).sum(axis=1, dtype=np.uint64)

    if reference.shape[1] != candidates.shape[1]:
        return 0
    by_hash: dict[int, list[int]] = {}
    for index, h in enumerate(row_hashes(reference).tolist()):
        by_hash.setdefault(h, []).append(index)
    shared = 0
    for index, h in enumerate(row_hashes(candidates).tolist()):
        if any(torch.equal(reference[j], candidates[index]) for j in by_hash.get(h, ())):
            shared += 1
    return shared


def _check_shapes(logits: torch.Tensor, labels: torch.Tensor) -> None:
    if logits.dim() != 3 or logits.shape[:2] != labels.shape:
        raise ValueError(
            "logits must be (B, L, V) and labels (B, L) with the same B, L; "
            f"got {tuple(logits.shape)} and {tuple(labels.shape)}"
        )


def mqar_slice_counts(
    logits: torch.Tensor, labels: torch.Tensor, num_kv_pairs: torch.Tensor
) -> dict[int, tuple[int, int]]:
    """{num_kv_pairs: (correct, supervised positions)}: argmax hits at label != -100 positions.
    Counts (not ratios) so callers can sum them over batches before dividing."""
    _check_shapes(logits, labels)
    supervised = labels != IGNORE_INDEX
    correct = ((logits.argmax(dim=-1) == labels) & supervised).sum(dim=1)
    total = supervised.sum(dim=1)
    return {
        int(k): (int(correct[num_kv_pairs == k].sum()), int(total[num_kv_pairs == k].sum()))
        for k in torch.unique(num_kv_pairs).tolist()
    }
