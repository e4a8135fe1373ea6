"""MQAR generator (Zoology's multiquery_ar), per-slice accuracy and the MQAR data module."""

import re

import numpy as np
import pytest
import torch

from arch_lab.data.datamodule import MQAR_TEST_SEED_OFFSET, MQARDataModule
from arch_lab.data.mqar import (
    IGNORE_INDEX,
    MQARConfig,
    count_shared_examples,
    generate_mqar,
    mqar_slice_counts,
)

VOCAB = 128
SEQ_LEN = 64
SLICES = [2, 4, 8, 16]


@pytest.fixture(scope="module", params=[False, True], ids=["zero_filler", "random_filler"])
def data(request):
    cfg = MQARConfig(
        vocab_size=VOCAB, seq_len=SEQ_LEN, num_kv_pairs=SLICES, num_examples=400, seed=3,
        random_non_queries=request.param,
    )
    return cfg, generate_mqar(cfg)


def test_shapes_and_slice_split(data):
    _, d = data
    assert d["input_ids"].shape == d["labels"].shape == (400, SEQ_LEN)
    assert d["input_ids"].dtype == d["labels"].dtype == torch.long
    assert {k: int((d["num_kv_pairs"] == k).sum()) for k in SLICES} == {2: 100, 4: 100, 8: 100, 16: 100}
    uneven = generate_mqar(MQARConfig(vocab_size=VOCAB, seq_len=SEQ_LEN, num_kv_pairs=[2, 4, 8], num_examples=10))
    assert uneven["num_kv_pairs"].tolist() == [2] * 4 + [4] * 3 + [8] * 3


def test_keys_and_values_come_from_disjoint_vocabulary_halves(data):
    _, d = data
    half = VOCAB // 2
    for ids, labels, k in zip(d["input_ids"], d["labels"], d["num_kv_pairs"].tolist()):
        keys, values = ids[0 : 2 * k : 2], ids[1 : 2 * k : 2]
        assert ((keys >= 1) & (keys < half)).all() and len(set(keys.tolist())) == k
        assert ((values >= half) & (values < VOCAB)).all() and len(set(values.tolist())) == k
        supervised = labels != IGNORE_INDEX
        assert ((ids[supervised] >= 1) & (ids[supervised] < half)).all()  # queries are keys
        assert ((labels[supervised] >= half) & (labels[supervised] < VOCAB)).all()  # answers are values


def test_every_query_is_answered_by_the_value_paired_with_its_key(data):
    _, d = data
    for ids, labels, k in zip(d["input_ids"], d["labels"], d["num_kv_pairs"].tolist()):
        pairs = dict(zip(ids[0 : 2 * k : 2].tolist(), ids[1 : 2 * k : 2].tolist()))
        positions = torch.nonzero(labels != IGNORE_INDEX).flatten().tolist()
        assert len(positions) == k  # one supervised position per key-value pair
        assert sorted(ids[positions].tolist()) == sorted(pairs)  # every key is queried exactly once
        for t in positions:
            assert labels[t].item() == pairs[ids[t].item()]
            assert t >= 2 * k and (t - 2 * k) % 2 == 0  # after the kv block, at even offsets


def test_short_weighted_slices_are_padded_and_answered_within_their_length():
    """Zoology's training mix: each slice has its own length and share of the examples. A short example is the
    task at its own length followed by unsupervised padding (token 0)."""
    cfg = MQARConfig(vocab_size=VOCAB, seq_len=SEQ_LEN, num_kv_pairs=[2, 4, 8], slice_seq_lens=[16, 32, 64],
                     slice_weights=[2, 1, 1], num_examples=41, seed=5)
    assert cfg.slice_rows() == [21, 10, 10]
    d = generate_mqar(cfg)
    assert d["input_ids"].shape == (41, SEQ_LEN)
    assert {k: int((d["num_kv_pairs"] == k).sum()) for k in (2, 4, 8)} == {2: 21, 4: 10, 8: 10}
    length = {2: 16, 4: 32, 8: 64}
    for ids, labels, k in zip(d["input_ids"], d["labels"], d["num_kv_pairs"].tolist()):
        assert (ids[length[k]:] == 0).all() and (labels[length[k]:] == IGNORE_INDEX).all()
        assert (ids[: length[k]] != 0).float().mean() > 0.9  # random filler inside the example
        pairs = dict(zip(ids[0 : 2 * k : 2].tolist(), ids[1 : 2 * k : 2].tolist()))
        positions = torch.nonzero(labels != IGNORE_INDEX).flatten().tolist()
        assert len(positions) == k and all(labels[t].item() == pairs[ids[t].item()] for t in positions)


def test_right_padding_leaves_a_causal_models_predictions_unchanged():
    """Why short slices may be padded: every roadmap row (meta tokens, SSM heads, sliding windows) is causal, so
    the logits over an example's own tokens are the same with and without the padding after it."""
    from components.model import HybridLM
    from model_factories import cpu_config

    torch.manual_seed(0)
    model = HybridLM(cpu_config("roadmap_e", vocab_size=VOCAB)).eval()
    example = torch.randint(1, VOCAB, (2, 24))
    padded = torch.nn.functional.pad(example, (0, 40))
    with torch.no_grad():
        torch.testing.assert_close(model(padded)[:, :24], model(example), atol=1e-5, rtol=1e-5)


def test_labels_are_ignored_exactly_outside_query_positions():
    cfg = MQARConfig(vocab_size=VOCAB, seq_len=SEQ_LEN, num_kv_pairs=SLICES, num_examples=200, random_non_queries=False)
    d = generate_mqar(cfg)
    positions = torch.arange(SEQ_LEN)
    for ids, labels, k in zip(d["input_ids"], d["labels"], d["num_kv_pairs"].tolist()):
        # With zero filler, the queries are exactly the non-zero tokens after the kv block.
        is_query = (positions >= 2 * k) & (ids != 0)
        assert torch.equal(labels != IGNORE_INDEX, is_query)


def test_random_non_queries_replaces_the_zero_filler():
    kwargs = dict(vocab_size=VOCAB, seq_len=SEQ_LEN, num_kv_pairs=4, num_examples=200, seed=0)
    plain = generate_mqar(MQARConfig(**kwargs, random_non_queries=False))
    noisy = generate_mqar(MQARConfig(**kwargs, random_non_queries=True))
    filler = plain["input_ids"] == 0
    assert filler.float().mean() > 0.8
    assert (noisy["input_ids"][filler] == 0).float().mean() < 0.05
    assert len(torch.unique(noisy["input_ids"][filler])) > VOCAB * 0.9  # drawn from the whole vocabulary


def test_query_gaps_follow_zoologys_power_law():
    # One pair: the only query sits at 2 + 2 * gap, and gap ~ p(g) ∝ (g + 1) ** (power_a - 1).
    power_a, n = 0.01, 20_000
    d = generate_mqar(MQARConfig(vocab_size=VOCAB, seq_len=SEQ_LEN, num_kv_pairs=1, num_examples=n, power_a=power_a))
    gaps = (torch.nonzero(d["labels"] != IGNORE_INDEX)[:, 1] - 2) // 2
    space = (SEQ_LEN - 2) // 2
    p = power_a * np.arange(1, space + 1) ** (power_a - 1)  # Zoology's formula
    p = p / p.sum()
    empirical = np.bincount(gaps.numpy(), minlength=space) / n
    assert np.abs(empirical - p).max() < 0.015


def test_generation_is_deterministic_given_the_seed():
    cfg = dict(vocab_size=VOCAB, seq_len=SEQ_LEN, num_kv_pairs=[2, 8], num_examples=50)
    a, b = generate_mqar(MQARConfig(**cfg, seed=7)), generate_mqar(MQARConfig(**cfg, seed=7))
    c = generate_mqar(MQARConfig(**cfg, seed=8))
    assert all(torch.equal(a[key], b[key]) for key in a)
    assert not torch.equal(a["input_ids"], c["input_ids"])


def test_accuracy_by_slice_on_hand_made_logits():
    labels = torch.tensor([[-100, 5, -100, 6], [-100, 7, -100, 5], [5, 6, 7, 5]])
    predictions = torch.tensor([[0, 5, 0, 0], [0, 7, 0, 5], [5, 6, 0, 0]])
    logits = torch.nn.functional.one_hot(predictions, num_classes=8).float()
    num_kv_pairs = torch.tensor([2, 2, 4])
    assert mqar_slice_counts(logits, labels, num_kv_pairs) == {2: (3, 4), 4: (2, 4)}


def test_accuracy_of_an_oracle_is_one_per_slice(data):
    _, d = data
    logits = torch.nn.functional.one_hot(d["labels"].clamp_min(0), num_classes=VOCAB).float()
    counts = mqar_slice_counts(logits, d["labels"], d["num_kv_pairs"])
    assert sorted(counts) == list(SLICES) and all(correct == total > 0 for correct, total in counts.values())


def test_count_shared_examples_finds_exact_copies():
    reference = torch.randint(0, 50, (100, 16), generator=torch.Generator().manual_seed(0))
    candidates = torch.cat([reference[[3, 77]], reference[:2] + 1])
    assert count_shared_examples(reference, candidates) == 2


def test_datamodule_train_val_test_are_disjoint_and_test_uses_an_offset_seed():
    dm = MQARDataModule(
        vocab_size=VOCAB, seq_len=SEQ_LEN, train_examples=2000, test_examples=300,
        num_kv_pairs_train=[2, 4], num_kv_pairs_test=[2, 4, 8], batch_size=32, seed=11,
    )
    dm.setup("fit")
    rows = {split: {tuple(r) for r in dm.datasets[split].tensors["input_ids"].tolist()} for split in dm.datasets}
    assert not rows["test"] & rows["train"]
    assert not rows["val"] & rows["train"]
    assert dm.configs["test"].seed == 11 + MQAR_TEST_SEED_OFFSET
    expected_test = {tuple(r) for r in generate_mqar(dm.configs["test"])["input_ids"].tolist()}
    assert rows["test"] == expected_test


def test_datamodule_batches_and_seeded_shuffling():
    def first_train_batch(seed):
        dm = MQARDataModule(
            vocab_size=VOCAB, seq_len=SEQ_LEN, train_examples=256, test_examples=64,
            num_kv_pairs_train=[2, 4], num_kv_pairs_test=[2, 8], batch_size=16, seed=seed,
        )
        dm.setup("fit")
        return dm, next(iter(dm.train_dataloader()))

    dm, batch = first_train_batch(0)
    assert set(batch) == {"input_ids", "labels", "num_kv_pairs"}
    assert batch["input_ids"].shape == batch["labels"].shape == (16, SEQ_LEN)
    test_batches = list(dm.test_dataloader())
    assert set(test_batches[0]["num_kv_pairs"].tolist()) == {2, 8}  # slices mixed, so any prefix covers all
    assert torch.equal(torch.cat([b["input_ids"] for b in test_batches]), dm.datasets["test"].tensors["input_ids"])
    _, again = first_train_batch(0)
    assert torch.equal(batch["input_ids"], again["input_ids"])
    # A resumed run skips what the epoch already consumed and continues with the same order.
    loader = dm.train_dataloader()
    full = [b["input_ids"] for b in loader]
    loader.sampler.skip_samples = 2 * 16
    assert torch.equal(next(iter(loader))["input_ids"], full[2])
    _, other = first_train_batch(1)
    assert not torch.equal(batch["input_ids"], other["input_ids"])


def test_datamodule_refuses_a_test_set_that_leaks_into_training():
    dm = MQARDataModule(
        vocab_size=8, seq_len=8, train_examples=300, test_examples=50, num_kv_pairs_train=[2],
        num_kv_pairs_test=[2], random_non_queries=False,
    )
    with pytest.raises(ValueError, match=r"MQAR val examples also occur in the training set; raise data\.vocab_size"):
        dm.setup("fit")


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        (
            dict(seq_len=32, num_kv_pairs=9),
            "data.num_kv_pairs_train: 9 pairs need data.seq_len >= 4 * 9 = 36 (room for the pairs and their "
            "queries); data.seq_len=32 allows at most 8",
        ),
        (
            dict(seq_len=64, num_kv_pairs=[4, 20]),
            "data.num_kv_pairs_train: 20 pairs need data.seq_len >= 4 * 20 = 80",
        ),
        (
            dict(vocab_size=16, num_kv_pairs=8),
            "data.vocab_size must be >= 18 to hold 8 distinct keys and values in each half of the vocabulary, got 16",
        ),
        (dict(num_kv_pairs=[]), "data.num_kv_pairs_train must be a positive int or a non-empty list of them, got []"),
        (dict(num_kv_pairs=[2, 4, 8], num_examples=2),
         "data.train_examples must give every data.num_kv_pairs_train slice (3) at least one example, got 2"),
        (dict(num_kv_pairs=[2, 4], num_examples=5, slice_weights=[9, 1]),
         "data.train_examples must give every data.num_kv_pairs_train slice (2) at least one example, got 5"),
        (dict(num_kv_pairs=[2, 4], slice_seq_lens=[16]),
         "data.train_slice_seq_lens needs one entry per num_kv_pairs_train slice (2), got [16]"),
        (dict(num_kv_pairs=[2, 4], slice_weights=[1, 0]), "data.train_slice_weights must all be > 0, got [1, 0]"),
        (dict(num_kv_pairs=[2, 4], slice_seq_lens=[16, 128]),
         "data.train_slice_seq_lens must each be <= data.seq_len=64, got [16, 128]"),
        (dict(num_kv_pairs=[2, 8], slice_seq_lens=[16, 16]),
         "data.num_kv_pairs_train: 8 pairs need data.train_slice_seq_lens >= 4 * 8 = 32 (room for the pairs and "
         "their queries); data.train_slice_seq_lens=16 allows at most 4"),
        (dict(num_kv_pairs=[2, 4], num_examples=1, config_keys="test"),  # the val and test sets' keys
         "data.test_examples must give every data.num_kv_pairs_test slice (2) at least one example, got 1"),
        (dict(power_a=0.0), "data.power_a must be > 0 (1.0 = uniform gaps), got 0.0"),
    ],
)
def test_bad_config_errors_name_the_key(kwargs, message):
    base = dict(vocab_size=VOCAB, seq_len=SEQ_LEN, num_kv_pairs=4, num_examples=10)
    with pytest.raises(ValueError, match=re.escape(message)):
        MQARConfig(**{**base, **kwargs})
