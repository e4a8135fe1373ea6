"""Passkey retrieval built from real text: needle placement, answers and depth-wise scoring."""

import re

import pytest
import torch

from arch_lab.data.passkey import (
    QUESTION_TEXT,
    answer_text,
    make_passkey_examples,
    needle_text,
    passkey_accuracy_by_depth,
)
from arch_lab.data.tokenizers import ByteTokenizer
from lab_helpers import DATA_ROOT as DATA

HAYSTACK = (DATA / "tinyshakespeare" / "input.txt").read_text(encoding="utf-8")
BYTE = ByteTokenizer()
SEQ_LEN = 1024
DEPTHS = [0.0, 0.25, 0.5, 0.75, 1.0]


@pytest.fixture(scope="module")
def examples():
    return make_passkey_examples(HAYSTACK, BYTE, SEQ_LEN, DEPTHS, num_per_depth=4, seed=0)


def _parts(ex):
    """(filler, needle, question, answer) token lists of an example."""
    ids = ex.input_ids.tolist()
    needle_len = len(BYTE.encode(needle_text(ex.passkey)))
    question_start = ex.answer_start - len(BYTE.encode(QUESTION_TEXT))
    filler = ids[: ex.needle_start] + ids[ex.needle_start + needle_len : question_start]
    return filler, ids[ex.needle_start : ex.needle_start + needle_len], ids[question_start : ex.answer_start], ids[ex.answer_start :]


def test_examples_are_exactly_seq_len_and_hold_needle_question_answer(examples):
    assert len(examples) == len(DEPTHS) * 4
    assert [ex.depth for ex in examples] == [d for d in DEPTHS for _ in range(4)]
    for ex in examples:
        assert ex.input_ids.shape == (SEQ_LEN,) and ex.input_ids.dtype == torch.long
        filler, needle, question, answer = _parts(ex)
        assert re.fullmatch(r"\d{5}", ex.passkey)
        assert BYTE.decode(needle) == f" The pass key is {ex.passkey}. Remember it. {ex.passkey} is the pass key."
        assert BYTE.decode(question) == " What is the pass key? The pass key is"
        assert BYTE.decode(answer) == answer_text(ex.passkey) == f" {ex.passkey}"
        assert BYTE.decode(filler) in HAYSTACK  # one contiguous window of the real text


def test_needle_sits_within_one_sentence_of_the_requested_depth(examples):
    for ex in examples:
        filler, *_ = _parts(ex)
        target = round(ex.depth * len(filler))
        between = BYTE.decode(filler[min(target, ex.needle_start) : max(target, ex.needle_start)])
        assert len(re.findall(r"[.!?](?=\s)", between)) <= 1, (ex.depth, between)
        if 0 < ex.needle_start < len(filler):  # inside the text it follows a sentence end
            assert BYTE.decode(filler[: ex.needle_start]).endswith((".", "!", "?"))
    mean_start = {d: sum(ex.needle_start for ex in examples if ex.depth == d) / 4 for d in DEPTHS}
    assert mean_start[0.0] == 0
    assert [mean_start[d] for d in DEPTHS] == sorted(mean_start.values())
    assert all(ex.needle_start == len(_parts(ex)[0]) for ex in examples if ex.depth == 1.0)


def oracle(input_ids):
    """One-hot logits of the true next token (the last position wraps around; it is never scored)."""
    next_token = torch.cat([input_ids[:, 1:], input_ids[:, :1]], dim=1)
    return torch.nn.functional.one_hot(next_token, num_classes=BYTE.vocab_size).float()


def uniform(input_ids):
    return torch.zeros(*input_ids.shape, BYTE.vocab_size)


def test_oracle_scores_one_and_uniform_scores_zero_at_every_depth(examples):
    assert passkey_accuracy_by_depth(oracle, examples) == {d: 1.0 for d in DEPTHS}
    assert passkey_accuracy_by_depth(uniform, examples, batch_size=3) == {d: 0.0 for d in DEPTHS}


def test_one_wrong_answer_token_fails_the_example(examples):
    def last_digit_wrong(input_ids):
        logits = oracle(input_ids)
        logits[:, -2] = torch.nn.functional.one_hot(torch.tensor(ord("x")), BYTE.vocab_size).float()
        return logits

    assert passkey_accuracy_by_depth(last_digit_wrong, examples) == {d: 0.0 for d in DEPTHS}


def test_generation_is_deterministic_given_the_seed(examples):
    again = make_passkey_examples(HAYSTACK, BYTE, SEQ_LEN, DEPTHS, num_per_depth=4, seed=0)
    assert all(torch.equal(a.input_ids, b.input_ids) for a, b in zip(examples, again))
    other = make_passkey_examples(HAYSTACK, BYTE, SEQ_LEN, DEPTHS, num_per_depth=4, seed=1)
    assert [a.passkey for a in examples] != [b.passkey for b in other]


def test_too_short_seq_len_names_the_key_and_minimum():
    minimum = len(BYTE.encode(needle_text("12345") + QUESTION_TEXT + answer_text("12345"))) + 1
    message = f"eval.passkey.seq_len must be >= {minimum} to hold the needle, the question, the answer and some filler, got 64"
    with pytest.raises(ValueError, match=re.escape(message)):
        make_passkey_examples(HAYSTACK, BYTE, 64, DEPTHS, num_per_depth=1, seed=0)
    make_passkey_examples(HAYSTACK, BYTE, minimum, DEPTHS, num_per_depth=1, seed=0)


def test_bad_depths_and_short_haystack_raise():
    with pytest.raises(ValueError, match=re.escape("eval.passkey.depths must be a non-empty list of values in [0, 1], got [1.5]")):
        make_passkey_examples(HAYSTACK, BYTE, SEQ_LEN, [1.5], num_per_depth=1, seed=0)
    with pytest.raises(ValueError, match=re.escape("eval.passkey.haystack_path: the haystack text has 11 tokens")):
        make_passkey_examples("Short text.", BYTE, SEQ_LEN, [0.5], num_per_depth=1, seed=0)
