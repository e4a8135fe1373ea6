"""lm-eval adapter (arch_lab/evaluation/lm_eval_adapter.py) and local commonsense tasks (commonsense.py)."""

import math
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from torch import nn

from arch_lab.evaluation.commonsense import (
    CommonsenseDataError,
    MultipleChoiceItem,
    get_commonsense_task,
    load_arc_challenge,
    load_arc_easy,
    load_boolq,
    load_copa,
    load_lambada_openai,
    load_piqa,
    load_winogrande,
)
from commonsense_scoring import score_continuations, score_multiple_choice
from lab_helpers import DATA_ROOT

DATA_DIR = DATA_ROOT / "commonsense"
REPO_ROOT = Path(__file__).resolve().parents[1]


class ByteTokenizer:
    """Bytes 0..255 are tokens; 256 is EOS (also the prefix token, as there is no BOS)."""

    eos_id = 256
    bos_id = None
    vocab_size = 257

    def encode(self, text: str) -> list[int]:
        return list(text.encode("utf-8"))

    def decode(self, ids) -> str:
        return bytes(i for i in ids if i < 256).decode("utf-8", errors="replace")


class TinyCausalLM(nn.Module):
    """Embedding + running mean over the prefix + linear: causal, and it sees the whole context."""

    def __init__(self, vocab_size: int = 257, dim: int = 16, seed: int = 0):
        super().__init__()
        torch.manual_seed(seed)
        self.embed = nn.Embedding(vocab_size, dim)
        self.head = nn.Linear(2 * dim, vocab_size)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        x = self.embed(input_ids)
        positions = torch.arange(1, input_ids.shape[1] + 1, dtype=x.dtype)[None, :, None]
        return self.head(torch.cat([x, x.cumsum(dim=1) / positions], dim=-1))


def direct_loglik(model: nn.Module, tokens: list[int], num_scored: int) -> tuple[float, bool]:
    """Sum of log-softmax of the model's own logits over the last num_scored tokens of `tokens`."""
    with torch.no_grad():
        logprobs = model(torch.tensor([tokens[:-1]]))[0].log_softmax(dim=-1)
    targets = torch.tensor(tokens[-num_scored:])
    scored = logprobs[-num_scored:]
    return scored.gather(-1, targets[:, None]).sum().item(), bool((scored.argmax(-1) == targets).all())


@pytest.fixture(scope="module")
def lm_eval_api():
    return pytest.importorskip("lm_eval.api.instance")


def requests(lm_eval_api, request_type: str, args_list: list[tuple]):
    return [lm_eval_api.Instance(request_type, {}, args, idx) for idx, args in enumerate(args_list)]


def make_lm(model, max_length=64, batch_size=4):
    from arch_lab.evaluation.lm_eval_adapter import ArchLabLM

    return ArchLabLM(model, ByteTokenizer(), max_length=max_length, batch_size=batch_size)


# ---- ArchLabLM ----------------------------------------------------------------------------------
def test_archlablm_is_a_registered_lm_eval_model(lm_eval_api):
    from lm_eval.api.model import LM
    from lm_eval.api.registry import get_model

    lm = make_lm(TinyCausalLM())
    assert isinstance(lm, LM)
    assert isinstance(lm, get_model("arch_lab"))


def test_loglikelihood_matches_direct_log_softmax(lm_eval_api):
    model = TinyCausalLM()
    lm = make_lm(model)
    tokenizer = ByteTokenizer()
    pairs = [("Hello there", " world"), ("Hello there ", "world"), ("", "abc"), ("The cat sat on the", " mat.")]
    results = lm.loglikelihood(requests(lm_eval_api, "loglikelihood", pairs))
    expected = [
        direct_loglik(model, tokenizer.encode("Hello there world"), 6),
        direct_loglik(model, tokenizer.encode("Hello there world"), 6),  # trailing space moves to the continuation
        direct_loglik(model, [256, *tokenizer.encode("abc")], 3),  # empty context → the prefix token
        direct_loglik(model, tokenizer.encode("The cat sat on the mat."), 5),
    ]
    for (loglik, greedy), (expected_loglik, expected_greedy) in zip(results, expected):
        assert loglik == pytest.approx(expected_loglik, abs=1e-4)
        assert greedy == expected_greedy


class BosByteTokenizer(ByteTokenizer):
    bos_id = 257
    vocab_size = 258


def test_contexts_start_with_bos_when_the_tokenizer_has_one(lm_eval_api):
    from arch_lab.evaluation.lm_eval_adapter import ArchLabLM

    model, tokenizer = TinyCausalLM(vocab_size=258), BosByteTokenizer()
    pair = requests(lm_eval_api, "loglikelihood", [("Hi", " there")])
    [(with_bos, _)] = ArchLabLM(model, tokenizer, max_length=32).loglikelihood(pair)
    [(without_bos, _)] = ArchLabLM(model, tokenizer, max_length=32, add_bos_token=False).loglikelihood(pair)
    assert with_bos == pytest.approx(direct_loglik(model, [257, *tokenizer.encode("Hi there")], 6)[0], abs=1e-4)
    assert without_bos == pytest.approx(direct_loglik(model, tokenizer.encode("Hi there"), 6)[0], abs=1e-4)


def test_loglikelihood_left_truncates_to_max_length(lm_eval_api):
    model = TinyCausalLM()
    context, continuation = "a fairly long context of many bytes", " end"
    tokens = ByteTokenizer().encode(context + continuation)
    max_length = 10
    [(loglik, _)] = make_lm(model, max_length=max_length).loglikelihood(
        requests(lm_eval_api, "loglikelihood", [(context, continuation)])
    )
    truncated, _ = direct_loglik(model, tokens[-(max_length + 1) :], 4)
    untruncated, _ = direct_loglik(model, tokens, 4)
    assert loglik == pytest.approx(truncated, abs=1e-4)
    assert abs(truncated - untruncated) > 1e-3  # the model sees its context, so truncation matters


def test_loglikelihood_is_independent_of_batching_and_padding(lm_eval_api):
    model = TinyCausalLM()
    pairs = [("short", " x"), ("a much longer context here", " yz"), ("mid length", " q"), ("", "solo")]
    batched = make_lm(model, batch_size=4).loglikelihood(requests(lm_eval_api, "loglikelihood", pairs))
    single = make_lm(model, batch_size=1).loglikelihood(requests(lm_eval_api, "loglikelihood", pairs))
    assert [ll for ll, _ in batched] == pytest.approx([ll for ll, _ in single], abs=1e-5)


def test_loglikelihood_refuses_a_continuation_longer_than_max_length(lm_eval_api):
    with pytest.raises(ValueError, match="a continuation of 12 tokens cannot be scored with max_length=8"):
        make_lm(TinyCausalLM(), max_length=8).loglikelihood(
            requests(lm_eval_api, "loglikelihood", [("ctx", " 12 bytes...")])
        )


def test_loglikelihood_rolling_is_total_token_loglikelihood(lm_eval_api):
    model = TinyCausalLM()
    text = "To be, or not to be."
    tokens = [256, *ByteTokenizer().encode(text)]
    expected, _ = direct_loglik(model, tokens, len(tokens) - 1)
    rolling = requests(lm_eval_api, "loglikelihood_rolling", [(text,)])
    [total] = make_lm(model, max_length=64).loglikelihood_rolling(rolling)
    assert total == pytest.approx(expected, abs=1e-4)


def test_loglikelihood_rolling_windows_follow_lm_eval_example(lm_eval_api):
    # lm_eval.api.model.LM.loglikelihood_rolling's docstring: tokens 0..9, max length 4 →
    # [BOS 0 1 2] predicts 0 1 2 3; [3 4 5 6] predicts 4 5 6 7; [5 6 7 8] predicts only 8 9.
    model = TinyCausalLM()
    text = "0123456789"
    t = ByteTokenizer().encode(text)
    expected = (
        direct_loglik(model, [256, *t[0:4]], 4)[0]
        + direct_loglik(model, t[3:8], 4)[0]
        + direct_loglik(model, t[5:10], 2)[0]
    )
    rolling = requests(lm_eval_api, "loglikelihood_rolling", [(text,)])
    [total] = make_lm(model, max_length=4).loglikelihood_rolling(rolling)
    assert total == pytest.approx(expected, abs=1e-4)


class NextByteLM(nn.Module):
    """Rigged bigram model: a→b, b→c, c→newline, newline→a, q→EOS, any other byte→a."""

    def __init__(self):
        super().__init__()
        successor = torch.full((257,), ord("a"))
        for current, following in (("a", "b"), ("b", "c"), ("c", "\n"), ("\n", "a")):
            successor[ord(current)] = ord(following)
        successor[ord("q")] = 256
        self.register_buffer("table", nn.functional.one_hot(successor, 257).float() * 10.0)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.table[input_ids]


def test_generate_until_is_greedy_and_stops(lm_eval_api):
    lm = make_lm(NextByteLM())
    outputs = lm.generate_until(
        requests(
            lm_eval_api,
            "generate_until",
            [
                ("xyz a", {"until": ["\n"], "max_gen_toks": 20}),
                ("xyz a", {"until": ["zz"], "max_gen_toks": 5}),
                ("stop at q", {"until": ["\n"], "max_gen_toks": 20}),
            ],
        )
    )
    assert outputs == ["bc", "bc\nab", ""]


def test_generate_until_refuses_sampling(lm_eval_api):
    with pytest.raises(ValueError, match="ArchLabLM.generate_until decodes greedily"):
        make_lm(NextByteLM()).generate_until(requests(lm_eval_api, "generate_until", [("a", {"do_sample": True})]))


def test_model_fn_with_wrong_output_shape_is_refused(lm_eval_api):
    lm = make_lm(lambda ids: torch.zeros(ids.shape[0], ids.shape[1], 10))
    with pytest.raises(ValueError, match=r"model_fn must map input_ids .* V >= vocab_size=257; got \(1, 2, 10\)"):
        lm.loglikelihood(requests(lm_eval_api, "loglikelihood", [("ab", "c")]))


def test_module_imports_without_lm_eval_and_instantiation_explains_the_fix():
    script = (
        "import sys; sys.modules['lm_eval'] = None\n"
        "from arch_lab.evaluation.lm_eval_adapter import ArchLabLM\n"
        "try:\n    ArchLabLM(lambda ids: ids, None, max_length=8)\n"
        "except ImportError as error:\n    print(error)\n"
    )
    completed = subprocess.run(
        [sys.executable, "-c", script], cwd=REPO_ROOT, capture_output=True, text=True, check=True
    )
    assert "run `pip install -e .[dev]`" in completed.stdout


# ---- scoring ------------------------------------------------------------------------------------
class ConstantDistributionLM(nn.Module):
    """Every position predicts p(' ')=1/2, p(a)=1/4, p(b)=1/8, p(c)=1/16, 1/16 spread over the rest."""

    def __init__(self):
        super().__init__()
        probs = torch.full((257,), (1 / 16) / 253)
        for char, prob in ((" ", 1 / 2), ("a", 1 / 4), ("b", 1 / 8), ("c", 1 / 16)):
            probs[ord(char)] = prob
        self.register_buffer("logits", probs.log())

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.logits.expand(*input_ids.shape, 257)


def test_acc_and_acc_norm_on_rigged_items(lm_eval_api):
    # In bits: ' ' 1, a 2, b 3, c 4. Summed loglik and loglik / len(choice) per item:
    #   ["a", "bb"] gold 0:         −3, −7 → acc ✓ | −3, −3.5 → acc_norm ✓
    #   ["c", "aaa"] gold 1:        −5, −7 → acc ✗ | −5, −2.33 → acc_norm ✓
    #   ["b", "aaaa", "cc"] gold 2: −4, −9, −9 → ✗ | −4, −2.25, −4.5 → ✗
    items = [
        MultipleChoiceItem.shared_context("Q1", ["a", "bb"], 0),
        MultipleChoiceItem.shared_context("Q2", ["c", "aaa"], 1),
        MultipleChoiceItem.shared_context("Q3", ["b", "aaaa", "cc"], 2),
    ]
    lm = make_lm(ConstantDistributionLM())
    loglikelihoods = [
        [ll for ll, _ in lm.loglikelihood(requests(lm_eval_api, "loglikelihood", item.requests))] for item in items
    ]
    assert loglikelihoods[1] == pytest.approx([-5 * math.log(2), -7 * math.log(2)])
    assert score_multiple_choice(items, loglikelihoods) == pytest.approx({"acc": 1 / 3, "acc_norm": 2 / 3})


def test_score_continuations_gives_greedy_rate_and_perplexity():
    metrics = score_continuations([(-1.0, True), (-3.0, False)])
    assert metrics == pytest.approx({"acc": 0.5, "perplexity": math.exp(2.0)})


# ---- local commonsense files --------------------------------------------------------------------
def test_builders_read_every_local_item_in_lm_eval_format():
    arc_easy, arc_challenge = load_arc_easy(DATA_DIR), load_arc_challenge(DATA_DIR)
    piqa, winogrande, lambada = load_piqa(DATA_DIR), load_winogrande(DATA_DIR), load_lambada_openai(DATA_DIR)
    counts = [len(arc_easy), len(arc_challenge), len(piqa), len(winogrande), len(lambada)]
    assert counts == [2376, 1172, 1838, 1267, 5153]
    assert (len(load_copa(DATA_DIR)), len(load_boolq(DATA_DIR))) == (100, 3270)

    assert arc_easy[0].requests[0] == (
        "Question: Which statement best explains why photosynthesis is the foundation of most food webs?\nAnswer:",
        " Sunlight is the source of energy for nearly all ecosystems.",
    )
    assert winogrande[0].requests == [
        ("Sarah was a much better surgeon than Maria so Sarah", " always got the easier cases."),
        ("Sarah was a much better surgeon than Maria so Maria", " always got the easier cases."),
    ]
    assert winogrande[0].gold == 1
    assert lambada[0].continuation == " signs" and lambada[0].context.endswith("I don't care about")
    # lm-eval splits LAMBADA at the last ' ': a last "word" spanning a line break stays whole.
    assert any(item.continuation == " the\n\nrecorder" for item in lambada)
    assert load_boolq(DATA_DIR, limit=1)[0].contexts[0].endswith("\nAnswer:")


def test_piqa_labels_are_line_aligned():
    piqa = load_piqa(DATA_DIR)
    labels = [int(line) for line in (DATA_DIR / "piqa_valid-labels.lst").read_text().split()]
    assert [item.gold for item in piqa] == labels
    assert piqa[0].contexts[0] == "Question: How do I ready a guinea pig cage for it's new occupants?\nAnswer:"
    assert "ripped paper strips" in piqa[0].choices[piqa[0].gold]


def test_unknown_task_and_missing_files_are_explained(tmp_path):
    with pytest.raises(ValueError, match=r"unknown commonsense task 'hellaswag'; allowed tasks: \['arc_challenge'"):
        get_commonsense_task("hellaswag")
    with pytest.raises(CommonsenseDataError, match="missing commonsense file .*llmfoundry_arc_easy.jsonl"):
        load_arc_easy(tmp_path)


# ---- the suite through lm-eval's machinery ------------------------------------------------------
class RecordingModel:
    """Wraps a model_fn and records every unpadded input row it is given (padding is trailing EOS)."""

    def __init__(self, model: nn.Module):
        self.model, self.rows = model, set()

    def __call__(self, input_ids: torch.Tensor) -> torch.Tensor:
        for row in input_ids.tolist():
            while len(row) > 1 and row[-1] == ByteTokenizer.eos_id:
                row.pop()
            self.rows.add(tuple(row))
        return self.model(input_ids)


def test_commonsense_suite_through_lm_eval_matches_direct_scoring(lm_eval_api):
    from arch_lab.evaluation.lm_eval_adapter import run_commonsense_suite

    model, limit = TinyCausalLM(seed=3), 6
    tasks = ["arc_easy", "piqa", "winogrande", "lambada_openai", "copa", "boolq"]
    through_lm_eval = RecordingModel(model)
    metrics = run_commonsense_suite(through_lm_eval, ByteTokenizer(), tasks, limit, DATA_DIR, max_length=512)

    direct = RecordingModel(model)
    lm = make_lm(direct, max_length=512, batch_size=16)
    expected = {}
    for name in tasks:
        task = get_commonsense_task(name)
        items = task.build(DATA_DIR, limit)
        if task.kind == "continuation":
            pairs = [(item.context, item.continuation) for item in items]
            scores = score_continuations(lm.loglikelihood(requests(lm_eval_api, "loglikelihood", pairs)))
        else:
            lls = [
                [ll for ll, _ in lm.loglikelihood(requests(lm_eval_api, "loglikelihood", item.requests))]
                for item in items
            ]
            scores = score_multiple_choice(items, lls)
        expected.update({f"commonsense/{name}/{metric}": scores[metric] for metric in task.metrics})
    expected["commonsense/avg_acc"] = sum(expected[f"commonsense/{name}/acc"] for name in tasks) / len(tasks)

    # lm-eval built exactly our prompts (same model inputs) and scored them as our helpers do.
    assert through_lm_eval.rows == direct.rows
    assert metrics.keys() == expected.keys()
    assert metrics == pytest.approx(expected, rel=1e-5)
    assert "commonsense/arc_easy/acc_norm" in metrics and "commonsense/lambada_openai/perplexity" in metrics
