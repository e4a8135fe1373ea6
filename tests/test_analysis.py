"""Attention analyses (components/analysis.py) on hand-made maps with known answers, and their plots."""

import math

import pytest
import torch

from components.analysis import (
    AttentionMapError,
    attention_entropy,
    attention_entropy_per_layer,
    attention_share,
    effective_receptive_field,
    layer_last_rows,
    normalize_implicit_attention,
)


def one_hot_rows(seq_len: int, key_index_per_row: list[int], heads: int = 1, batch: int = 1) -> torch.Tensor:
    attn = torch.zeros(batch, heads, seq_len, seq_len)
    attn[:, :, torch.arange(seq_len), torch.tensor(key_index_per_row)] = 1.0
    return attn


# ---- effective receptive field ----------------------------------------------------------------
def test_erf_is_zero_when_the_last_token_attends_only_to_itself():
    maps = [one_hot_rows(6, list(range(6)), heads=3) for _ in range(4)]
    assert effective_receptive_field(maps) == 0.0


def test_erf_is_last_index_when_all_mass_is_on_token_zero():
    # Σ_s M(S,s)(S−s) = S in every head and layer; the layer weights 2(N−n+1)/(N(N+1)) sum to 1.
    seq_len = 6
    maps = [one_hot_rows(seq_len, [0] * seq_len, heads=2, batch=3) for _ in range(3)]
    assert effective_receptive_field(maps) == pytest.approx(seq_len - 1)


def test_erf_two_layer_example_computed_by_hand():
    # N = 2, S = 3 (4 tokens). Layer weights: n=1 → 2·2/(2·3) = 2/3, n=2 → 2·1/(2·3) = 1/3.
    layer1 = torch.zeros(1, 2, 4, 4)
    layer1[:, :, :3] = torch.eye(4)[:3]  # earlier rows do not enter the formula
    layer1[0, 0, 3] = torch.tensor([0.5, 0.0, 0.0, 0.5])  # distance 0.5·3 = 1.5
    layer1[0, 1, 3] = torch.tensor([0.0, 0.25, 0.25, 0.5])  # 0.25·2 + 0.25·1 = 0.75
    layer2 = torch.zeros(2, 2, 4, 4)
    layer2[:, :, :3] = torch.eye(4)[:3]
    layer2[0, 0, 3] = torch.tensor([1.0, 0.0, 0.0, 0.0])  # batch mean of head 0: [0.5, 0, 0, 0.5] → 1.5
    layer2[1, 0, 3] = torch.tensor([0.0, 0.0, 0.0, 1.0])
    layer2[:, 1, 3] = torch.tensor([0.0, 0.0, 1.0, 0.0])  # distance 1
    expected = (2 / 3) * (1.5 + 0.75) / 2 + (1 / 3) * (1.5 + 1.0) / 2  # = 7/6
    assert effective_receptive_field([layer1, layer2]) == pytest.approx(expected)
    assert expected == pytest.approx(7 / 6)


def test_a_hybrid_layers_heads_are_averaged_per_branch_then_over_the_branches():
    attention = torch.zeros(1, 2, 4, 4)  # two heads: last rows on tokens 0 and 3
    attention[0, 0, 3, 0] = attention[0, 1, 3, 3] = 1.0
    ssm = one_hot_rows(4, [0, 0, 1, 1])  # one (channel-averaged) head: last row on token 1
    expected = torch.tensor([(0.5 + 0) / 2, (0 + 1) / 2, 0.0, (0.5 + 0) / 2]).view(1, 1, 1, 4)
    assert torch.equal(layer_last_rows([attention, ssm]), expected)
    assert torch.equal(layer_last_rows([ssm]), ssm[:, :, -1:])


@pytest.mark.parametrize("name", ["roadmap_a", "roadmap_e", "mamba", "mamba2", "transformer"])
def test_a_runs_erf_counts_every_layer_with_both_kinds_of_heads(name):
    """Paper §2.2.2 sums over all N layers and Fig. 3 gives Mamba an ERF: the SSM heads count through their
    implicit attention, and row A's attention layers (1, 3, 5 of 6) keep their places among the 6."""
    from arch_lab.evaluate import analysis_metrics
    from components.attention_maps import collect_attention_maps
    from model_factories import build_model, cpu_config, random_tokens

    model = build_model(cpu_config(name), dtype=torch.float32)
    ids = random_tokens(model.cfg.vocab_size, 2, 12)
    maps = collect_attention_maps(model, ids)
    n_layers = len(model.layers)
    assert sorted(set(maps.attention) | set(maps.ssm)) == list(range(n_layers))
    last_rows = []
    for i in range(n_layers):
        branches = [m[:, :, -1].mean(dim=1) for m in (maps.attention.get(i), maps.ssm.get(i)) if m is not None]
        last_rows.append(sum(branches) / len(branches))  # (b, keys)
    distance = torch.arange(last_rows[0].shape[-1] - 1, -1, -1, dtype=torch.float32)
    expected = sum(2 * (n_layers - n) / (n_layers * (n_layers + 1)) * (rows.mean(0) * distance).sum()
                   for n, rows in enumerate(last_rows))
    assert analysis_metrics(model, ids)["analysis/erf"] == pytest.approx(expected.item(), rel=1e-5)


def test_erf_rejects_bad_input():
    with pytest.raises(AttentionMapError, match="attn_maps must hold at least one layer"):
        effective_receptive_field([])
    with pytest.raises(AttentionMapError, match=r"attn_maps\[1\] has 5 keys but attn_maps\[0\] has 4"):
        effective_receptive_field([one_hot_rows(4, [0] * 4), one_hot_rows(5, [0] * 5)])
    with pytest.raises(AttentionMapError, match=r"attn_maps\[0\] rows must sum to 1"):
        effective_receptive_field([torch.full((1, 1, 4, 4), 0.5)])


# ---- entropy ------------------------------------------------------------------------------------
@pytest.mark.parametrize("num_keys", [1, 4, 16])
def test_entropy_of_uniform_rows_is_log_k(num_keys):
    attn = torch.full((2, 3, num_keys, num_keys), 1.0 / num_keys)  # non-causal: every row sees all k keys
    torch.testing.assert_close(attention_entropy(attn), torch.full((3,), math.log(num_keys)))


def test_entropy_of_one_hot_rows_is_zero_and_causal_uniform_rows_average_log_q():
    assert torch.equal(attention_entropy(one_hot_rows(5, [0, 0, 1, 2, 4], heads=2)), torch.zeros(2))
    causal_uniform = torch.tril(torch.ones(4, 4)) / torch.arange(1, 5)[:, None]
    expected = sum(math.log(q) for q in range(1, 5)) / 4
    torch.testing.assert_close(attention_entropy(causal_uniform[None, None]), torch.tensor([expected]))


def test_entropy_skips_meta_query_rows_and_stacks_per_layer():
    # 2 meta tokens (one-hot rows, entropy 0) followed by 2 real rows uniform over all 4 keys.
    attn = torch.zeros(1, 2, 4, 4)
    attn[:, :, 0, 0] = 1.0
    attn[:, :, 1, 1] = 1.0
    attn[:, :, 2:] = 0.25
    torch.testing.assert_close(attention_entropy(attn, num_meta=2), torch.full((2,), math.log(4)))
    torch.testing.assert_close(attention_entropy(attn), torch.full((2,), math.log(4) / 2))
    table = attention_entropy_per_layer([attn, one_hot_rows(4, [0, 1, 2, 3], heads=2)], num_meta=2)
    torch.testing.assert_close(table, torch.tensor([[math.log(4)] * 2, [0.0, 0.0]]))


# ---- attention share ----------------------------------------------------------------------------
def share_example_map() -> torch.Tensor:
    """2 meta tokens then BOS (column 2) and two more real tokens; rows are queries 0..4."""
    return torch.tensor(
        [
            [1.0, 0.0, 0.0, 0.0, 0.0],
            [0.5, 0.5, 0.0, 0.0, 0.0],
            [0.6, 0.2, 0.2, 0.0, 0.0],  # BOS row: meta 0.8, its own diagonal is BOS 0.2
            [0.1, 0.1, 0.3, 0.5, 0.0],  # meta 0.2, BOS 0.3, self 0.5
            [0.2, 0.0, 0.2, 0.2, 0.4],  # meta 0.2, BOS 0.2, cross 0.2, self 0.4
        ]
    )[None, None]


def test_attention_share_of_hand_made_map():
    shares = attention_share(share_example_map(), num_meta=2)
    expected = {"meta": 1.2 / 3, "bos": 0.7 / 3, "self": 0.9 / 3, "cross": 0.2 / 3}
    assert shares == pytest.approx(expected)
    assert sum(shares.values()) == pytest.approx(1.0)


def test_attention_share_accepts_real_query_rows_only():
    square = share_example_map()
    real_rows_only = square[:, :, 2:]  # (queries 3, keys 5): queries are the last 3 key positions
    assert attention_share(real_rows_only, num_meta=2) == pytest.approx(attention_share(square, num_meta=2))


def test_attention_share_without_meta_tokens_rows_sum_to_one():
    torch.manual_seed(0)
    scores = torch.randn(2, 3, 6, 6).masked_fill(~torch.tril(torch.ones(6, 6, dtype=torch.bool)), float("-inf"))
    shares = attention_share(scores.softmax(dim=-1), num_meta=0)
    assert shares["meta"] == 0.0
    assert sum(shares.values()) == pytest.approx(1.0)


def test_attention_share_rejects_bad_bos_index():
    with pytest.raises(AttentionMapError, match=r"bos_index must be a real-token key column in \[2, 5\); got 1"):
        attention_share(share_example_map(), num_meta=2, bos_index=1)


# ---- SSM implicit attention ---------------------------------------------------------------------
def test_normalize_implicit_attention_gives_causal_rows_summing_to_one():
    torch.manual_seed(0)
    alpha = torch.randn(2, 3, 5, 5).tril()  # signed, unnormalized, causal
    normalized = normalize_implicit_attention(alpha)
    torch.testing.assert_close(normalized.sum(dim=-1), torch.ones(2, 3, 5))
    assert torch.equal(normalized.triu(diagonal=1), torch.zeros_like(normalized))
    torch.testing.assert_close(normalized, alpha.abs() / alpha.abs().sum(dim=-1, keepdim=True))
    assert sum(attention_share(normalized, num_meta=0).values()) == pytest.approx(1.0)


def test_raw_implicit_attention_is_refused_with_a_pointer_to_normalization():
    alpha = torch.full((1, 1, 3, 3), -2.0).tril()
    with pytest.raises(AttentionMapError, match="normalize_implicit_attention"):
        attention_entropy(alpha)


# ---- plots --------------------------------------------------------------------------------------
PNG_SIGNATURE = b"\x89PNG\r\n\x1a\n"


def test_plots_write_png_files(tmp_path):
    from arch_lab.evaluation.plots import (
        plot_attention_map,
        plot_attention_share,
        plot_entropy_per_layer,
        plot_erf_vs_cache,
    )

    attn = share_example_map()
    written = [
        plot_attention_map(attn[0, 0], "example", tmp_path / "map.png"),
        plot_entropy_per_layer(torch.rand(4, 3), torch.rand(4, 3), tmp_path / "nested" / "entropy.png"),
        plot_attention_share({"hymba": attention_share(attn, num_meta=2)}, tmp_path / "share.png"),
        plot_erf_vs_cache([("llama", 829.4, 12.0), ("hymba", 76.9, 40.0)], tmp_path / "erf.png"),
    ]
    names = ["map.png", "nested/entropy.png", "share.png", "erf.png"]
    assert written == [tmp_path / name for name in names]
    for path in written:
        assert path.read_bytes()[:8] == PNG_SIGNATURE


def test_plots_reject_bad_input(tmp_path):
    from arch_lab.evaluation.plots import plot_attention_map, plot_attention_share

    with pytest.raises(ValueError, match=r"path must end in \.png; got '.*map\.jpg'"):
        plot_attention_map(torch.eye(3), "x", tmp_path / "map.jpg")
    with pytest.raises(ValueError, match=r"shares_by_model\['m'\] must have exactly the keys"):
        plot_attention_share({"m": {"meta": 1.0}}, tmp_path / "share.png")


def test_a_forward_that_fails_while_maps_are_collected_raises_its_own_error_and_stops_recording():
    from components.attention_maps import collect_attention_maps
    from model_factories import build_model, cpu_config, random_tokens

    model = build_model(cpu_config("roadmap_e"), dtype=torch.float32)
    ids = random_tokens(model.cfg.vocab_size, 1, 12)
    assert set(collect_attention_maps(model, ids).attention)  # recorded when the forward pass succeeds
    last = model.layers[-1]
    last.forward = lambda *args, **kwargs: (_ for _ in ()).throw(RuntimeError("kernel failed"))
    with pytest.raises(RuntimeError, match="^kernel failed$"):  # not an IndexError over the empty recordings
        collect_attention_maps(model, ids)
    assert all(getattr(layer.mixer.attn, "captured_maps", None) is None and
               getattr(layer.mixer.ssm, "captured_maps", None) is None for layer in model.layers)
