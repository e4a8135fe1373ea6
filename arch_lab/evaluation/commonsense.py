"""Local commonsense-reasoning tasks in lm-evaluation-harness's own prompt formats, plus scoring.

The files live in ``shared/data/commonsense`` (see its README): PIQA validation with a separate
labels file, and llmfoundry-format ARC-Easy, ARC-Challenge, WinoGrande, LAMBADA, COPA and BoolQ.
Each builder rebuilds the prompts of lm-eval 0.4.13's task YAMLs (``lm_eval/tasks/...``):

- arc_easy / arc_challenge (arc/arc_easy.yaml): "Question: {question}\\nAnswer:" + " {choice}"
- piqa (piqa/piqa.yaml): "Question: {goal}\\nAnswer:" + " {sol}"
- winogrande (winogrande/preprocess_winogrande.py): partial evaluation, option i's context is the
  sentence up to the blank with option i filled in; the shared continuation is " " + the rest
- lambada_openai (lambada/lambada_openai.yaml): text minus its last space-separated word,
  continuation " " + that word; acc = greedy match, perplexity = exp(−mean loglik)
- copa (super_glue/copa/utils.py): "{premise} because|therefore" + " {choice, first letter lowercased}"
- boolq (super_glue/boolq/default.yaml): "{passage}\\nQuestion: {question}?\\nAnswer:" + " no|yes"

Every multiple-choice continuation is lm-eval's target delimiter " " followed by the choice text.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Literal

from components.config import ConfigError

TARGET_DELIMITER = " "


@dataclass(frozen=True)
class MultipleChoiceItem:
    """One question; option i is scored as log p(TARGET_DELIMITER + choices[i] | contexts[i]).

    ``contexts`` holds one context per option: the same string repeated, except for partial
    evaluation (WinoGrande), where the options differ in the context and share the choice text.
    """

    contexts: tuple[str, ...]
    choices: tuple[str, ...]
    gold: int

    def __post_init__(self) -> None:
        if len(self.contexts) != len(self.choices) or len(self.choices) < 2:
            raise ValueError(
                f"MultipleChoiceItem needs one context per choice and at least 2 options; "
                f"got {len(self.contexts)} contexts and {len(self.choices)} choices"
            )
        if not 0 <= self.gold < len(self.choices):
            raise ValueError(f"MultipleChoiceItem.gold must be in [0, {len(self.choices)}); got {self.gold}")

    @classmethod
    def shared_context(cls, context: str, choices: Sequence[str], gold: int) -> MultipleChoiceItem:
        return cls(contexts=(context,) * len(choices), choices=tuple(choices), gold=gold)

    @property
    def requests(self) -> list[tuple[str, str]]:
        """The (context, continuation) pairs lm-eval scores for this item, in option order."""
        return [(context, TARGET_DELIMITER + choice) for context, choice in zip(self.contexts, self.choices)]


@dataclass(frozen=True)
class ContinuationItem:
    """A context whose continuation (including its leading space) is scored: LAMBADA."""

    context: str
    continuation: str


TaskKind = Literal["multiple_choice", "continuation"]


@dataclass(frozen=True)
class CommonsenseTask:
    """A local task: how to build its items and which metrics lm-eval reports for it.

    ``partial_evaluation``: the options differ in their contexts and share one continuation.
    """

    name: str
    kind: TaskKind
    build: Callable[[Path, int | None], list[MultipleChoiceItem] | list[ContinuationItem]]
    metrics: tuple[str, ...]
    partial_evaluation: bool = False


class CommonsenseDataError(ConfigError):
    """A local commonsense file is missing or does not match what the builder expects."""


def _read_jsonl(path: Path, limit: int | None) -> list[dict]:
    if not path.is_file():
        raise CommonsenseDataError(
            f"eval.commonsense.data_dir: missing commonsense file {path}; the folder must be "
            f"shared/data/commonsense's copy"
        )
    rows = []
    with path.open(encoding="utf-8") as lines:
        for line in lines:
            if limit is not None and len(rows) >= limit:
                break
            if line.strip():
                rows.append(json.loads(line))
    return rows


def _shared_context_items(
    rows: Sequence[dict], to_context: Callable[[dict], str], to_choices: Callable[[dict], list[str]]
) -> list[MultipleChoiceItem]:
    return [MultipleChoiceItem.shared_context(to_context(row), to_choices(row), int(row["gold"])) for row in rows]


def load_arc(
    data_dir: Path, limit: int | None = None, *, subset: Literal["easy", "challenge"]
) -> list[MultipleChoiceItem]:
    """ARC test set; the llmfoundry ``query`` already reads "Question: {question}"."""
    rows = _read_jsonl(Path(data_dir) / f"llmfoundry_arc_{subset}.jsonl", limit)
    return _shared_context_items(rows, lambda row: row["query"] + "\nAnswer:", lambda row: row["choices"])


def load_arc_easy(data_dir: Path, limit: int | None = None) -> list[MultipleChoiceItem]:
    return load_arc(data_dir, limit, subset="easy")


def load_arc_challenge(data_dir: Path, limit: int | None = None) -> list[MultipleChoiceItem]:
    return load_arc(data_dir, limit, subset="challenge")


def load_piqa(data_dir: Path, limit: int | None = None) -> list[MultipleChoiceItem]:
    """PIQA validation; labels come from the line-aligned ``piqa_valid-labels.lst``."""
    rows = _read_jsonl(Path(data_dir) / "piqa_valid.jsonl", None)
    labels_path = Path(data_dir) / "piqa_valid-labels.lst"
    if not labels_path.is_file():
        raise CommonsenseDataError(f"missing commonsense file {labels_path}; PIQA needs its labels file")
    labels = [int(line) for line in labels_path.read_text(encoding="utf-8").split()]
    if len(labels) != len(rows):
        raise CommonsenseDataError(
            f"{labels_path} has {len(labels)} labels but piqa_valid.jsonl has {len(rows)} questions"
        )
    items = [
        MultipleChoiceItem.shared_context(f"Question: {row['goal']}\nAnswer:", [row["sol1"], row["sol2"]], label)
        for row, label in zip(rows, labels)
    ]
    return items if limit is None else items[:limit]


def load_winogrande(data_dir: Path, limit: int | None = None) -> list[MultipleChoiceItem]:
    """WinoGrande dev with partial evaluation; llmfoundry's ``context_options`` are the filled-in prefixes."""
    rows = _read_jsonl(Path(data_dir) / "llmfoundry_winogrande.jsonl", limit)
    return [
        MultipleChoiceItem(
            contexts=tuple(row["context_options"]),
            choices=(row["continuation"].strip(),) * len(row["context_options"]),
            gold=int(row["gold"]),
        )
        for row in rows
    ]


def _copa_choice(choice: str) -> str:
    # lm-eval's super_glue/copa/utils.py convert_choice: the choice continues the premise sentence.
    return choice[0].lower() + choice[1:]


def load_copa(data_dir: Path, limit: int | None = None) -> list[MultipleChoiceItem]:
    """COPA; llmfoundry's ``query`` is already "{premise without period} because|therefore"."""
    rows = _read_jsonl(Path(data_dir) / "llmfoundry_copa.jsonl", limit)
    return _shared_context_items(rows, lambda row: row["query"], lambda row: [_copa_choice(c) for c in row["choices"]])


def load_boolq(data_dir: Path, limit: int | None = None) -> list[MultipleChoiceItem]:
    """BoolQ validation; llmfoundry's ``query`` is "Passage: {passage}\\nQuestion: {question}?"."""
    rows = _read_jsonl(Path(data_dir) / "llmfoundry_boolq.jsonl", limit)
    return _shared_context_items(
        rows, lambda row: row["query"].removeprefix("Passage: ") + "\nAnswer:", lambda row: row["choices"]
    )


def load_lambada_openai(data_dir: Path, limit: int | None = None) -> list[ContinuationItem]:
    """LAMBADA (OpenAI detokenised), split as lm-eval does: at the last space of the full text."""
    items = []
    for row in _read_jsonl(Path(data_dir) / "llmfoundry_lambada_openai.jsonl", limit):
        # llmfoundry split at the last whitespace run; rebuild the text and split on ' ' like lm-eval.
        continuation = row["continuation"]
        separator = "" if continuation[:1].isspace() else " "
        words = (row["context"] + separator + continuation).split(" ")
        items.append(ContinuationItem(context=" ".join(words[:-1]), continuation=" " + words[-1]))
    return items


COMMONSENSE_TASKS: dict[str, CommonsenseTask] = {
    task.name: task
    for task in (
        CommonsenseTask("arc_easy", "multiple_choice", load_arc_easy, ("acc", "acc_norm")),
        CommonsenseTask("arc_challenge", "multiple_choice", load_arc_challenge, ("acc", "acc_norm")),
        CommonsenseTask("piqa", "multiple_choice", load_piqa, ("acc", "acc_norm")),
        CommonsenseTask("winogrande", "multiple_choice", load_winogrande, ("acc",), partial_evaluation=True),
        CommonsenseTask("lambada_openai", "continuation", load_lambada_openai, ("acc", "perplexity")),
        CommonsenseTask("copa", "multiple_choice", load_copa, ("acc",)),
        CommonsenseTask("boolq", "multiple_choice", load_boolq, ("acc",)),
    )
}


def get_commonsense_task(name: str) -> CommonsenseTask:
    if name not in COMMONSENSE_TASKS:
        raise ValueError(f"unknown commonsense task {name!r}; allowed tasks: {sorted(COMMONSENSE_TASKS)}")
    return COMMONSENSE_TASKS[name]
