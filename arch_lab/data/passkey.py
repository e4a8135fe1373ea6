"""Passkey retrieval (needle in a haystack), in the style of Mohtashami & Jaggi 2023
("Landmark Attention"), with real text as the haystack instead of repeated filler sentences.

Each example is exactly seq_len tokens: filler text with the needle
" The pass key is 73914. Remember it. 73914 is the pass key." inserted at a sentence boundary
near relative depth d of the filler, then " What is the pass key? The pass key is", then the
answer " 73914". Scoring uses teacher forcing: an example counts as retrieved when the argmax at
every answer position is the answer token (equal to exact match of the greedy continuation).
"""

from __future__ import annotations

import random
from collections.abc import Callable, Sequence
from dataclasses import dataclass

import torch

from arch_lab.data.tokenizers import Tokenizer
from components.config import ConfigError

SENTENCE_ENDS = (".", "!", "?")
QUESTION_TEXT = " What is the pass key? The pass key is"


def needle_text(passkey: str) -> str:
    return f" The pass key is {passkey}. Remember it. {passkey} is the pass key."


def answer_text(passkey: str) -> str:
    return f" {passkey}"


@dataclass
class PasskeyExample:
    input_ids: torch.Tensor  # (seq_len,) prompt followed by the answer tokens
    answer_start: int  # index of the first answer token in input_ids
    needle_start: int  # index of the first needle token in input_ids
    depth: float
    passkey: str


def _sentence_boundaries(filler: Sequence[int], token_text: list[str]) -> list[int]:
    """Indices i where a sentence ends just before filler[i] (token i-1 ends with . ! ? and
    token i starts with whitespace), plus both ends of the filler."""
    inner = [
        i
        for i in range(1, len(filler))
        if token_text[filler[i - 1]].endswith(SENTENCE_ENDS) and token_text[filler[i]][:1].isspace()
    ]
    return [0, *inner, len(filler)]


def make_passkey_examples(
    haystack_text: str,
    tokenizer: Tokenizer,
    seq_len: int,
    depths: list[float],
    num_per_depth: int,
    seed: int,
) -> list[PasskeyExample]:
    """num_per_depth examples per depth, each with a random 5-digit passkey and filler taken
    from a random window of the haystack."""
    bad_depths = [d for d in depths if not 0.0 <= d <= 1.0]
    if not depths or bad_depths:
        raise ConfigError(f"eval.passkey.depths must be a non-empty list of values in [0, 1], got {depths}")
    if num_per_depth < 1:
        raise ConfigError(f"eval.passkey.num_per_depth must be >= 1, got {num_per_depth}")
    rng = random.Random(seed)
    plan = [(depth, str(rng.randint(10_000, 99_999))) for depth in depths for _ in range(num_per_depth)]
    question = tokenizer.encode(QUESTION_TEXT)
    parts = {
        key: (tokenizer.encode(needle_text(key)), tokenizer.encode(answer_text(key))) for _, key in plan
    }
    fixed = max(len(needle) + len(question) + len(answer) for needle, answer in parts.values())
    if seq_len < fixed + 1:
        raise ConfigError(
            f"eval.passkey.seq_len must be >= {fixed + 1} to hold the needle, the question, the answer "
            f"and some filler, got {seq_len}"
        )
    haystack = tokenizer.encode(haystack_text)
    # Text of every token id, to find sentence ends without decoding the filler again and again.
    token_text = [tokenizer.decode([i]) for i in range(tokenizer.vocab_size)]

    examples = []
    for depth, key in plan:
        needle, answer = parts[key]
        filler_len = seq_len - len(needle) - len(question) - len(answer)
        if len(haystack) < filler_len:
            raise ConfigError(
                f"eval.passkey.haystack_path: the haystack text has {len(haystack)} tokens, "
                f"eval.passkey.seq_len={seq_len} needs {filler_len} tokens of filler"
            )
        offset = rng.randint(0, len(haystack) - filler_len)
        filler = haystack[offset : offset + filler_len]
        target = depth * filler_len
        insert_at = min(_sentence_boundaries(filler, token_text), key=lambda i: abs(i - target))
        prompt = filler[:insert_at] + needle + filler[insert_at:] + question
        examples.append(
            PasskeyExample(
                input_ids=torch.tensor(prompt + answer, dtype=torch.long),
                answer_start=len(prompt),
                needle_start=insert_at,
                depth=depth,
                passkey=key,
            )
        )
    return examples


@torch.no_grad()
def passkey_accuracy_by_depth(
    model_fn: Callable[[torch.Tensor], torch.Tensor],
    examples: list[PasskeyExample],
    batch_size: int = 8,
) -> dict[float, float]:
    """Fraction of examples per depth whose answer tokens are all argmax predictions under
    teacher forcing. model_fn maps input_ids (B, L) to logits (B, L, V)."""
    hits: dict[float, list[bool]] = {}
    for start in range(0, len(examples), batch_size):
        batch = examples[start : start + batch_size]
        input_ids = torch.stack([ex.input_ids for ex in batch])
        predictions = model_fn(input_ids).argmax(dim=-1)
        for row, ex in enumerate(batch):
            # Position t predicts token t + 1, so the answer is predicted from answer_start - 1 on.
            predicted = predictions[row, ex.answer_start - 1 : -1]
            hits.setdefault(ex.depth, []).append(bool(torch.equal(predicted, ex.input_ids[ex.answer_start :])))
    return {depth: sum(h) / len(h) for depth, h in hits.items()}
