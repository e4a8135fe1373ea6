"""lm-evaluation-harness adapter: any ``model_fn(input_ids) -> logits`` as an lm-eval ``LM``.

``ArchLabLM`` scores requests the way lm-eval's Hugging Face model (``HFLM``) does: trailing
spaces of a context move into the continuation, the continuation's tokens are the whole text's
tokens after the context's, inputs are left-truncated to ``max_length`` tokens, rolling
log-likelihoods use lm-eval's own disjoint token windows, and generation is greedy.

lm-eval is imported only when an ``ArchLabLM`` is created, so this module imports without it.
``run_commonsense_suite`` runs the local commonsense tasks through lm-eval's own machinery
(``ConfigurableTask`` + ``evaluator.evaluate``): each task is an in-memory task config whose
``custom_dataset`` returns the locally built items, so nothing is downloaded and lm-eval's
``process_results`` computes acc / acc_norm / perplexity. The task index of ``TaskManager`` is
not built (it parses every bundled YAML, ~25 s) because the tasks are passed in directly.
"""

from __future__ import annotations

import functools
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, Protocol

import torch

from arch_lab.evaluation.commonsense import (
    COMMONSENSE_TASKS,
    CommonsenseTask,
    ContinuationItem,
    MultipleChoiceItem,
    get_commonsense_task,
)

LM_EVAL_INSTALL_HINT = "lm-evaluation-harness is not installed; run `pip install -e .[dev]` (it pins lm-eval==0.4.13)"

ModelFn = Callable[[torch.Tensor], torch.Tensor]
TokenPair = tuple[list[int], list[int]]


class Tokenizer(Protocol):
    """What ``ArchLabLM`` needs from a tokenizer. ``encode`` adds no special tokens."""

    eos_id: int
    bos_id: int | None
    vocab_size: int

    def encode(self, text: str) -> list[int]: ...

    def decode(self, ids: Sequence[int]) -> str: ...


class ArchLabLM:
    """lm-eval ``LM`` around ``model_fn(input_ids (B, L) long) -> logits (B, L, V)``.

    ``model_fn`` must be causal (position t sees positions ≤ t only): batches are right-padded
    with ``eos_id``. Put the model in eval mode first; calls run under ``torch.inference_mode``.
    ``add_bos_token`` prefixes every context with the tokenizer's BOS (when it has one), as the
    lab's models see BOS first; an empty context is always replaced by the prefix token (BOS,
    else EOS). Greedy choices (``is_greedy``, generation) range over the tokenizer's vocabulary.

    Creating one returns an instance of a subclass that also derives from
    ``lm_eval.api.model.LM`` and is registered in lm-eval as model ``"arch_lab"``; without
    lm-eval installed, creating one raises ImportError.
    """

    def __new__(cls, *args: Any, **kwargs: Any) -> ArchLabLM:
        if cls is ArchLabLM:
            cls = _registered_lm_eval_class()
        return super().__new__(cls)

    def __init__(
        self,
        model_fn: ModelFn,
        tokenizer: Tokenizer,
        max_length: int,
        batch_size: int = 16,
        device: str | torch.device = "cpu",
        add_bos_token: bool = True,
    ) -> None:
        super().__init__()
        if max_length < 2:
            raise ValueError(f"max_length must be at least 2 tokens; got {max_length}")
        if batch_size < 1:
            raise ValueError(f"batch_size must be at least 1; got {batch_size}")
        self.model_fn = model_fn
        self.tokenizer = tokenizer
        self.max_length = max_length
        self.batch_size = batch_size
        self._device = torch.device(device)
        self.add_bos_token = add_bos_token
        self.prefix_token_id = tokenizer.bos_id if tokenizer.bos_id is not None else tokenizer.eos_id

    # ---- lm-eval LM interface -------------------------------------------------------------
    def loglikelihood(self, requests: list[Any]) -> list[tuple[float, bool]]:
        """(log p(continuation | context), is_greedy) for each ``Instance.args = (context, continuation)``."""
        results = self._score_token_pairs([self._encode_pair(*request.args) for request in requests])
        for request, result in zip(requests, results):
            self.cache_hook.add_partial("loglikelihood", request.args, result)
        return results

    def loglikelihood_rolling(self, requests: list[Any]) -> list[float]:
        """Total log-likelihood of each ``Instance.args = (text,)``, conditioned on the prefix token."""
        from lm_eval.utils import get_rolling_token_windows, make_disjoint_window

        totals = []
        for request in requests:
            (text,) = request.args
            windows = [
                make_disjoint_window(window)
                for window in get_rolling_token_windows(
                    token_list=self.tokenizer.encode(text),
                    prefix_token=self.prefix_token_id,
                    max_seq_len=self.max_length,
                    context_len=1,
                )
            ]
            total = sum(loglik for loglik, _ in self._score_token_pairs(windows))
            self.cache_hook.add_partial("loglikelihood_rolling", request.args, total)
            totals.append(total)
        return totals

    def generate_until(self, requests: list[Any]) -> list[str]:
        """Greedy continuation of each ``Instance.args = (context, gen_kwargs)``.

        Stops at EOS, after ``gen_kwargs["max_gen_toks"]`` tokens (default 256), or at the first
        of ``gen_kwargs["until"]``, which is cut off the returned text.
        """
        outputs = []
        for request in requests:
            context, gen_kwargs = request.args
            until, max_gen_toks = self._parse_gen_kwargs(gen_kwargs)
            prompt = self._with_prefix(self.tokenizer.encode(context) if context else [])
            generated: list[int] = []
            text = ""
            for _ in range(max_gen_toks):
                window = (prompt + generated)[-self.max_length :]
                logits = self._forward(torch.tensor([window]))[0, -1, : self.tokenizer.vocab_size]
                next_token = int(logits.argmax())
                if next_token == self.tokenizer.eos_id:
                    break
                generated.append(next_token)
                text = self.tokenizer.decode(generated)
                if any(stop in text for stop in until):
                    break
            for stop in until:
                text = text.split(stop)[0]
            self.cache_hook.add_partial("generate_until", request.args, text)
            outputs.append(text)
        return outputs

    # ---- tokenization ----------------------------------------------------------------------
    def _with_prefix(self, context_tokens: list[int]) -> list[int]:
        """Context tokens as the model sees them: BOS first (if asked for), never empty."""
        if not context_tokens:
            return [self.prefix_token_id]
        if self.add_bos_token and self.tokenizer.bos_id is not None:
            return [self.tokenizer.bos_id, *context_tokens]
        return context_tokens

    def _encode_pair(self, context: str, continuation: str) -> TokenPair:
        # As HFLM._encode_pair: a context's trailing spaces belong to the continuation's first token.
        trailing_spaces = len(context) - len(context.rstrip())
        if trailing_spaces:
            continuation = context[-trailing_spaces:] + continuation
            context = context[:-trailing_spaces]
        context_tokens = self.tokenizer.encode(context) if context else []
        if context_tokens:
            continuation_tokens = self.tokenizer.encode(context + continuation)[len(context_tokens) :]
        else:
            continuation_tokens = self.tokenizer.encode(continuation)
        if not continuation_tokens:
            raise ValueError(f"continuation {continuation!r} encodes to no tokens after context {context[-40:]!r}")
        return self._with_prefix(context_tokens), continuation_tokens

    @staticmethod
    def _parse_gen_kwargs(gen_kwargs: dict[str, Any]) -> tuple[list[str], int]:
        if gen_kwargs.get("do_sample") or float(gen_kwargs.get("temperature", 0.0)) > 0.0:
            raise ValueError(
                f"ArchLabLM.generate_until decodes greedily; gen_kwargs asks for sampling "
                f"(do_sample={gen_kwargs.get('do_sample')}, temperature={gen_kwargs.get('temperature')})"
            )
        until = gen_kwargs.get("until", [])
        until = [until] if isinstance(until, str) else list(until)
        return until, int(gen_kwargs.get("max_gen_toks", 256))

    # ---- scoring ---------------------------------------------------------------------------
    def _forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        with torch.inference_mode():
            logits = self.model_fn(input_ids.to(self._device))
        if (
            logits.dim() != 3
            or tuple(logits.shape[:2]) != tuple(input_ids.shape)
            or logits.shape[-1] < self.tokenizer.vocab_size
        ):
            raise ValueError(
                f"model_fn must map input_ids {tuple(input_ids.shape)} to logits (B, L, V) with "
                f"V >= vocab_size={self.tokenizer.vocab_size}; got {tuple(logits.shape)}"
            )
        return logits

    def _score_token_pairs(self, pairs: Sequence[TokenPair]) -> list[tuple[float, bool]]:
        """(sum log p(cont | ctx), all-greedy) per (context tokens, continuation tokens) pair.

        Inputs are the last ``max_length + 1`` tokens of context + continuation minus the final
        one (left truncation, as HFLM). Pairs are batched longest first to limit padding.
        """
        inputs = []
        for context_tokens, continuation_tokens in pairs:
            if len(continuation_tokens) > self.max_length:
                raise ValueError(
                    f"a continuation of {len(continuation_tokens)} tokens cannot be scored with "
                    f"max_length={self.max_length}"
                )
            inputs.append((context_tokens + continuation_tokens)[-(self.max_length + 1) : -1])
        order = sorted(range(len(pairs)), key=lambda index: -len(inputs[index]))
        results: list[tuple[float, bool]] = [(0.0, False)] * len(pairs)
        for start in range(0, len(order), self.batch_size):
            batch = order[start : start + self.batch_size]
            padded = torch.full((len(batch), len(inputs[batch[0]])), self.tokenizer.eos_id, dtype=torch.long)
            for row, index in enumerate(batch):
                padded[row, : len(inputs[index])] = torch.tensor(inputs[index])
            logits = self._forward(padded)
            for row, index in enumerate(batch):
                input_length, targets = len(inputs[index]), torch.tensor(pairs[index][1])
                # Position p predicts token p + 1: the continuation is predicted by the last len(targets) positions.
                logprobs = logits[row, input_length - len(targets) : input_length].float().log_softmax(dim=-1).cpu()
                loglik = logprobs.gather(-1, targets[:, None]).sum().item()
                is_greedy = bool((logprobs[:, : self.tokenizer.vocab_size].argmax(dim=-1) == targets).all())
                results[index] = (loglik, is_greedy)
        return results


@functools.cache
def _registered_lm_eval_class() -> type[ArchLabLM]:
    try:
        from lm_eval.api.model import LM
        from lm_eval.api.registry import register_model
    except ImportError as error:
        raise ImportError(LM_EVAL_INSTALL_HINT) from error

    @register_model("arch_lab")
    class LmEvalArchLabLM(ArchLabLM, LM):
        """``ArchLabLM`` as an ``lm_eval.api.model.LM``, registered as lm-eval model "arch_lab"."""

    return LmEvalArchLabLM


# ---- local commonsense suite through lm-eval -----------------------------------------------
def _multiple_choice_config(task: CommonsenseTask, items: list[MultipleChoiceItem]) -> tuple[list[dict], dict]:
    if task.partial_evaluation:
        # lm-eval's "multiple input" mode (as its WinoGrande task): doc_to_text gives the gold
        # index, doc_to_choice the per-option contexts, doc_to_target the shared continuation.
        docs = [{"contexts": list(item.contexts), "target": item.choices[0], "gold": item.gold} for item in items]
        return docs, {
            "doc_to_text": lambda doc: doc["gold"],
            "doc_to_choice": lambda doc: doc["contexts"],
            "doc_to_target": lambda doc: doc["target"],
        }
    docs = [{"context": item.contexts[0], "choices": list(item.choices), "gold": item.gold} for item in items]
    return docs, {
        "doc_to_text": lambda doc: doc["context"],
        "doc_to_choice": lambda doc: doc["choices"],
        "doc_to_target": lambda doc: doc["gold"],
    }


def _continuation_config(items: list[ContinuationItem]) -> tuple[list[dict], dict]:
    docs = [{"context": item.context, "continuation": item.continuation} for item in items]
    return docs, {"doc_to_text": lambda doc: doc["context"], "doc_to_target": lambda doc: doc["continuation"]}


def build_lm_eval_task(task: CommonsenseTask, data_dir: Path, limit: int | None = None) -> Any:
    """An in-memory lm-eval ``ConfigurableTask`` serving ``task``'s locally built items (zero-shot)."""
    try:
        import datasets
        from lm_eval.api.task import ConfigurableTask
    except ImportError as error:
        raise ImportError(LM_EVAL_INSTALL_HINT) from error

    items = task.build(Path(data_dir), limit)
    if task.kind == "multiple_choice":
        docs, fields = _multiple_choice_config(task, items)
    else:
        docs, fields = _continuation_config(items)
    metric_list = [
        {
            "metric": metric,
            "aggregation": "perplexity" if metric == "perplexity" else "mean",
            "higher_is_better": metric != "perplexity",
        }
        for metric in task.metrics
    ]
    config = {
        "task": task.name,
        "custom_dataset": lambda **_: datasets.DatasetDict({"test": datasets.Dataset.from_list(docs)}),
        "test_split": "test",
        "output_type": "multiple_choice" if task.kind == "multiple_choice" else "loglikelihood",
        "num_fewshot": 0,
        "metric_list": metric_list,
        **fields,
    }
    return ConfigurableTask(config=config)


def run_commonsense_suite(
    model_fn: ModelFn,
    tokenizer: Tokenizer,
    tasks: Sequence[str],
    limit: int | None,
    data_dir: str | Path,
    *,
    max_length: int,
    device: str | torch.device = "cpu",
) -> dict[str, float]:
    """Zero-shot local commonsense tasks through lm-eval; returns flat metric names.

    Keys are ``commonsense/<task>/<metric>`` with lm-eval's metrics per task (acc, acc_norm,
    perplexity) plus ``commonsense/avg_acc``, the mean acc over the evaluated tasks. ``limit``
    keeps the first ``limit`` items of every task.
    """
    if len(tasks) == 0:
        raise ValueError(f"tasks must name at least one task; allowed tasks: {sorted(COMMONSENSE_TASKS)}")
    if limit is not None and limit < 1:
        raise ValueError(f"limit must be a positive number of items or None; got {limit}")
    specs = [get_commonsense_task(name) for name in tasks]
    lm = ArchLabLM(model_fn, tokenizer, max_length, device=device)
    from lm_eval.evaluator import evaluate

    task_dict = {spec.name: build_lm_eval_task(spec, Path(data_dir), limit) for spec in specs}
    output = evaluate(lm=lm, task_dict={"tasks": task_dict}, bootstrap_iters=0, log_samples=False)
    metrics = {
        f"commonsense/{spec.name}/{metric}": float(output["results"][spec.name][f"{metric},none"])
        for spec in specs
        for metric in spec.metrics
    }
    metrics["commonsense/avg_acc"] = sum(metrics[f"commonsense/{spec.name}/acc"] for spec in specs) / len(specs)
    return metrics
