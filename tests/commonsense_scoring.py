"""lm-eval's commonsense metrics computed directly from log-likelihoods: the oracle that the suite's results
through lm-eval's machinery (arch_lab/evaluation/lm_eval_adapter.py) are checked against."""
from __future__ import annotations

import math
from collections.abc import Sequence

from arch_lab.evaluation.commonsense import MultipleChoiceItem


def _argmax(values: Sequence[float]) -> int:
    # First maximum wins, like numpy.argmax in lm-eval.
    return max(range(len(values)), key=lambda i: (values[i], -i))


def score_multiple_choice(
    items: Sequence[MultipleChoiceItem], loglikelihoods: Sequence[Sequence[float]]
) -> dict[str, float]:
    """acc (argmax of summed loglik) and acc_norm (argmax of loglik / len(choice)) over items.

    As lm-eval's ``ConfigurableTask.process_results`` does, acc_norm divides by the character
    length of the choice text, without the target delimiter (lm-eval's ``acc_bytes`` would use
    UTF-8 bytes; both agree on ASCII choices). For partial-evaluation items (WinoGrande) the
    options share their choice text, so acc_norm equals acc; lm-eval does not report it there.
    """
    if len(items) != len(loglikelihoods) or len(items) == 0:
        raise ValueError(
            f"loglikelihoods must hold one list per item for a non-empty item list; "
            f"got {len(loglikelihoods)} for {len(items)} items"
        )
    correct = correct_norm = 0
    for index, (item, lls) in enumerate(zip(items, loglikelihoods)):
        if len(lls) != len(item.choices):
            raise ValueError(f"loglikelihoods[{index}] has {len(lls)} values for {len(item.choices)} choices")
        normalized = [ll / max(len(choice), 1) for ll, choice in zip(lls, item.choices)]
        correct += _argmax(lls) == item.gold
        correct_norm += _argmax(normalized) == item.gold
    return {"acc": correct / len(items), "acc_norm": correct_norm / len(items)}


def score_continuations(results: Sequence[tuple[float, bool]]) -> dict[str, float]:
    """LAMBADA metrics from (loglik, is_greedy) pairs: acc = greedy-match rate, perplexity = exp(−mean loglik)."""
    if len(results) == 0:
        raise ValueError("results must hold at least one (loglikelihood, is_greedy) pair")
    mean_loglik = sum(ll for ll, _ in results) / len(results)
    return {"acc": sum(bool(greedy) for _, greedy in results) / len(results), "perplexity": math.exp(-mean_loglik)}
