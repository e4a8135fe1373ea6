"""A run's config checked before anything trains: each bad value fails with one message naming its key and what
is allowed, where torch or Lightning would otherwise fail later with words of their own ("Invalid learning rate",
"integer modulo by zero"). The model's keys are checked by components.config.ModelConfig.validate."""
from __future__ import annotations

from pathlib import Path
from typing import Any, Callable

from omegaconf import DictConfig, OmegaConf

from components.config import ConfigError, MissingInputError
from components.ops.backend import BACKENDS

from .data import DATA_KINDS
from .data.text import TEXT_SOURCES
from .data.tokenizers import TOKENIZER_KINDS
from .optim import SCHEDULES


def _integer(v: Any) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _boolean(v: Any) -> bool:
    return isinstance(v, bool)


def _fraction(v: Any) -> bool:
    return _number(v) and 0 <= v <= 1


def _betas(v: Any) -> bool:
    return isinstance(v, (list, tuple)) and len(v) == 2 and all(_number(b) and 0 <= b < 1 for b in v)


def _val_interval(v: Any) -> bool:
    return (_integer(v) and v >= 1) or (isinstance(v, float) and 0 < v <= 1)


MATMUL_PRECISIONS = ("highest", "high", "medium")  # torch.set_float32_matmul_precision's
Rule = tuple[str, Callable[[Any], bool], str]
_POSITIVE: tuple[Callable[[Any], bool], str] = (lambda v: _integer(v) and v >= 1, "an integer >= 1")
RULES: list[Rule] = [
    ("seed", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("compile", _boolean, "true or false"),
    ("run_name", lambda v: v is None or (isinstance(v, (str, int)) and str(v).strip() != ""), "a name, or null"),
    ("tags", lambda v: isinstance(v, dict), "a mapping of tag names to values, e.g. +tags.row=E"),
    ("logger.experiment_name", lambda v: isinstance(v, str) and v.strip() != "", "a name"),
    ("logger.log_checkpoints", _boolean, "true or false"),
    ("data.kind", lambda v: v in DATA_KINDS, f"one of {', '.join(DATA_KINDS)}"),
    ("data.batch_size", *_POSITIVE),
    ("data.seq_len", *_POSITIVE),
    ("data.num_workers", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("float32_matmul_precision", lambda v: v in MATMUL_PRECISIONS, f"one of {', '.join(MATMUL_PRECISIONS)}"),
    ("optim.lr", lambda v: _number(v) and v > 0, "a number > 0"),
    ("optim.min_lr_ratio", _fraction, "a number in [0, 1]"),
    ("optim.betas", _betas, "two numbers in [0, 1), e.g. [0.9, 0.95]"),
    ("optim.weight_decay", lambda v: _number(v) and v >= 0, "a number >= 0"),
    ("optim.schedule", lambda v: v in SCHEDULES, f"one of {', '.join(SCHEDULES)}"),
    ("optim.warmup_steps", lambda v: _integer(v) and v >= 0, "an integer >= 0"),
    ("optim.decay_fraction", _fraction, "a number in [0, 1]"),
    ("trainer.val_check_interval", _val_interval, "steps as an integer >= 1, or a fraction of an epoch in (0, 1]"),
    ("trainer.max_steps", lambda v: _integer(v) and v >= 1,
     "an integer >= 1 (the learning-rate schedule is laid out over it; trainer.max_time may stop a run sooner)"),
    ("trainer.accumulate_grad_batches", *_POSITIVE),
    ("trainer.log_every_n_steps", *_POSITIVE),
    ("trainer.gradient_clip_val", lambda v: v is None or (_number(v) and v >= 0), "a number >= 0, or null (0: off)"),
    ("backend", lambda v: v in BACKENDS, f"one of {', '.join(BACKENDS)}"),
    ("eval.mqar", _boolean, "true or false"),
    ("eval.perplexity", _boolean, "true or false"),
    *((f"eval.{name}.enabled", _boolean, "true or false") for name in ("decode", "analysis", "commonsense")),
    ("eval.passkey.enabled", lambda v: _boolean(v) or v == "auto", "true, false or auto (on for text data)"),
    ("eval.cache_lengths", lambda v: isinstance(v, list) and all(_integer(n) and n >= 1 for n in v),
     "a list of token counts >= 1, e.g. [8192, 16384]"),
]
# each data kind's own keys (the data modules check how they fit together: pairs per length, vocabulary halves)
DATA_RULES: dict[str, list[Rule]] = {
    "mqar": [*((f"data.{key}", *_POSITIVE) for key in ("vocab_size", "train_examples", "test_examples")),
             ("data.power_a", lambda v: _number(v) and v > 0, "a number > 0 (1.0: uniform gaps)"),
             ("data.random_non_queries", _boolean, "true or false")],
    "text": [("data.tokenizer", lambda v: v in TOKENIZER_KINDS, f"one of {', '.join(TOKENIZER_KINDS)}"),
             ("data.source", lambda v: v in TEXT_SOURCES, f"one of {', '.join(TEXT_SOURCES)}"),
             *((f"data.{key}", lambda v: v is None or (_integer(v) and v >= 1), "an integer >= 1, or null for all")
               for key in ("max_train_tokens", "max_eval_tokens"))],
}
DECODE_RULES: list[Rule] = [(f"eval.decode.{key}", *_POSITIVE) for key in ("batch", "context", "new_tokens")]
ANALYSIS_RULES: list[Rule] = [("eval.analysis.seq_len", *_POSITIVE)]
PASSKEY_RULES: list[Rule] = [
    ("eval.passkey.seq_len", *_POSITIVE),
    ("eval.passkey.depths", lambda v: isinstance(v, list) and v and all(_fraction(d) for d in v),
     "a list of needle depths in [0, 1], e.g. [0.0, 0.5, 1.0]"),
    ("eval.passkey.num_per_depth", *_POSITIVE),
]
COMMONSENSE_RULES: list[Rule] = [("eval.commonsense.limit", lambda v: v is None or (_integer(v) and v >= 1),
                                  "an integer >= 1, or null for every item")]


def evaluations_on(cfg: DictConfig) -> dict[str, bool]:
    """Which of the evaluations with settings of their own the run will do."""
    text = OmegaConf.select(cfg, "data.kind") == "text"
    return {"decode": bool(OmegaConf.select(cfg, "eval.decode.enabled")),
            "analysis": bool(OmegaConf.select(cfg, "eval.analysis.enabled")),
            "passkey": text and OmegaConf.select(cfg, "eval.passkey.enabled") in (True, "auto"),
            "commonsense": text and bool(OmegaConf.select(cfg, "eval.commonsense.enabled"))}


EVALUATION_RULES = {"decode": DECODE_RULES, "analysis": ANALYSIS_RULES, "passkey": PASSKEY_RULES,
                    "commonsense": COMMONSENSE_RULES}


def check_values(cfg: DictConfig) -> None:
    """Every rule's key (RULES, and those of the evaluations the run will do) holds an allowed value, and what the
    evaluations feed the model fits model.max_seq_len."""
    on = evaluations_on(cfg)
    rules = RULES + [rule for name, group in EVALUATION_RULES.items() if on[name] for rule in group]
    rules += DATA_RULES.get(OmegaConf.select(cfg, "data.kind"), [])
    known = {key.split(".", 1)[1] for key, _, _ in RULES if key.startswith("optim.")}  # every key AdamW's setup reads
    unknown = sorted(set(cfg.optim) - known)
    if unknown:  # `+optim.eps=1e-8` would be ignored without a word
        raise ConfigError(f"optim: unknown key(s) {unknown}; allowed: {', '.join(sorted(known))}")
    for key, allowed, description in rules:
        value = OmegaConf.select(cfg, key)
        value = OmegaConf.to_container(value) if OmegaConf.is_config(value) else value
        if not allowed(value):
            raise ConfigError(f"{key} must be {description}, got {value!r}")
    longest = cfg.model.max_seq_len
    if on["passkey"] and cfg.eval.passkey.seq_len > longest:
        raise ConfigError(f"eval.passkey.seq_len={cfg.eval.passkey.seq_len} is longer than the model supports "
                          f"(model.max_seq_len={longest}): lower it or raise model.max_seq_len")
    decode = cfg.eval.decode
    if on["decode"] and decode.context + decode.new_tokens > longest:
        raise ConfigError(f"eval.decode.context + eval.decode.new_tokens = {decode.context + decode.new_tokens} is "
                          f"longer than the model supports (model.max_seq_len={longest}): lower them or raise "
                          f"model.max_seq_len")


def check_compatible(model_cfg: dict[str, Any], data_cfg: dict[str, Any], vocab: int) -> None:
    if vocab > model_cfg["vocab_size"]:
        smaller = {"mqar": " or lower data.vocab_size", "bpe": " or lower data.bpe_vocab_size"}.get(
            "mqar" if data_cfg["kind"] == "mqar" else data_cfg.get("tokenizer"), "")
        raise ConfigError(f"the data vocabulary ({vocab} ids) is larger than model.vocab_size="
                          f"{model_cfg['vocab_size']}; raise model.vocab_size (to {vocab} or more){smaller}")
    if data_cfg["seq_len"] > model_cfg["max_seq_len"]:
        raise ConfigError(f"data.seq_len={data_cfg['seq_len']} is longer than the model supports "
                          f"(model.max_seq_len={model_cfg['max_seq_len']})")


def check_inputs_exist(cfg: DictConfig, data_cfg: dict[str, Any]) -> None:
    """Files read only after training must exist before it starts, so a typo cannot waste a run (the passkey
    haystack is read when its prompts are built, before training too)."""
    if cfg.ckpt_path == "last":
        # Lightning's "last" means this Trainer's own checkpoint folder, and every lab run writes a new one
        found = sorted(Path("outputs").glob("*/*/checkpoints/last.ckpt"))
        newest = f"; the newest here: ckpt_path='{found[-1]}'" if found else ""
        raise MissingInputError(f"ckpt_path=last: every run checkpoints into its own outputs/<date>/<time>/"
                                f"checkpoints, so give the checkpoint's path{newest}")
    if cfg.ckpt_path is not None and not Path(cfg.ckpt_path).is_file():
        raise MissingInputError(f"ckpt_path: no checkpoint at {cfg.ckpt_path}")
    if data_cfg["kind"] == "text" and cfg.eval.commonsense.enabled:
        from .evaluation.commonsense import COMMONSENSE_TASKS

        unknown = [t for t in cfg.eval.commonsense.tasks if t not in COMMONSENSE_TASKS]
        if unknown:
            raise ConfigError(f"eval.commonsense.tasks: unknown task(s) {unknown}; allowed: "
                              f"{sorted(COMMONSENSE_TASKS)}")
        if not Path(cfg.eval.commonsense.data_dir).is_dir():
            raise MissingInputError(f"eval.commonsense.data_dir: no such directory {cfg.eval.commonsense.data_dir}")
        for task in cfg.eval.commonsense.tasks:  # each task's files, read up to their first item
            COMMONSENSE_TASKS[task].build(Path(cfg.eval.commonsense.data_dir), 1)


def changed_settings(prefix: str, checkpoint: dict[str, Any], run: dict[str, Any]) -> list[str]:
    """`<prefix><key>=<run's> (checkpoint: <checkpoint's>)` for every key whose value a resumed run changes
    (`prefix`: "model.", say, or "" for top-level keys)."""
    return [f"{prefix}{key}={run.get(key)!r} (checkpoint: {checkpoint.get(key)!r})"
            for key in sorted(set(checkpoint) | set(run)) if checkpoint.get(key) != run.get(key)]


def refuse_changed_resume(changed: list[str]) -> None:
    if changed:
        raise ConfigError(f"ckpt_path: this run changes {', '.join(changed)}; resume with the checkpoint's "
                          f"settings, or start a new run without ckpt_path")
