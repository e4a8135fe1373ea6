"""A run's config values are checked before anything trains, each error naming its key and what is allowed
(arch_lab/run_checks.py); torch and Lightning failed later with their own words ("Invalid learning rate: -1")."""
from __future__ import annotations

import re

import pytest
from hydra import compose, initialize_config_dir

from arch_lab.run_checks import check_values
from components.config import ConfigError
from lab_helpers import CONF_DIR


def _composed(*overrides: str):
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        return compose(config_name="train", overrides=list(overrides))


def test_every_shipped_experiment_passes():
    for path in sorted((CONF_DIR / "experiment").glob("*.yaml")):
        check_values(_composed(f"experiment={path.stem}"))
        # the same composition with one bad value is refused: the checks do run on each experiment's config
        with pytest.raises(ConfigError, match=r"^optim\.lr must be a number > 0, got -1$"):
            check_values(_composed(f"experiment={path.stem}", "optim.lr=-1"))
    check_values(_composed("trainer=gpu", "trainer.val_check_interval=0.5"))  # a fraction of an epoch is allowed
    with pytest.raises(ConfigError, match=r"^trainer\.val_check_interval must be .* in \(0, 1\], got 1\.5$"):
        check_values(_composed("trainer=gpu", "trainer.val_check_interval=1.5"))  # more than one epoch is not


@pytest.mark.parametrize("override, message", [
    ("seed=abc", "seed must be an integer >= 0, got 'abc'"),
    ("data.batch_size=0", "data.batch_size must be an integer >= 1, got 0"),
    ("data.num_workers=-1", "data.num_workers must be an integer >= 0, got -1"),
    ("float32_matmul_precision=tf32", "float32_matmul_precision must be one of highest, high, medium, got 'tf32'"),
    ("optim.lr=-1", "optim.lr must be a number > 0, got -1"),
    ("optim.min_lr_ratio=2", "optim.min_lr_ratio must be a number in [0, 1], got 2"),
    ("optim.betas=[0.9]", "optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.95], got [0.9]"),
    ("optim.betas=[0.9,1.0]", "optim.betas must be two numbers in [0, 1), e.g. [0.9, 0.95], got [0.9, 1.0]"),
    ("optim.weight_decay=-0.1", "optim.weight_decay must be a number >= 0, got -0.1"),
    ("optim.schedule=linear", "optim.schedule must be one of wsd, cosine, constant, got 'linear'"),
    ("optim.warmup_steps=1.5", "optim.warmup_steps must be an integer >= 0, got 1.5"),
    ("optim.decay_fraction=-1", "optim.decay_fraction must be a number in [0, 1], got -1"),
    ("trainer.val_check_interval=0",
     "trainer.val_check_interval must be steps as an integer >= 1, or a fraction of an epoch in (0, 1], got 0"),
    ("eval.decode.batch=0", "eval.decode.batch must be an integer >= 1, got 0"),
    ("trainer.max_steps=0", "trainer.max_steps must be an integer >= 1 (the learning-rate schedule is laid out "
                            "over it; trainer.max_time may stop a run sooner), got 0"),
    ("trainer.accumulate_grad_batches=0", "trainer.accumulate_grad_batches must be an integer >= 1, got 0"),
    ("trainer.gradient_clip_val=-1", "trainer.gradient_clip_val must be a number >= 0, or null (0: off), got -1"),
    ("backend=cuda", "backend must be one of auto, reference, kernel, got 'cuda'"),
    ("eval.mqar=maybe", "eval.mqar must be true or false, got 'maybe'"),
    ("eval.cache_lengths=[-1]", "eval.cache_lengths must be a list of token counts >= 1, e.g. [8192, 16384], got [-1]"),
    ("eval.analysis.seq_len=0", "eval.analysis.seq_len must be an integer >= 1, got 0"),
    ("data.seq_len=0", "data.seq_len must be an integer >= 1, got 0"),
    # switches that took any string as true (compile=maybe compiled; passkey's "maybe" turned it off)
    ("compile=maybe", "compile must be true or false, got 'maybe'"),
    ("eval.decode.enabled=maybe", "eval.decode.enabled must be true or false, got 'maybe'"),
    ("eval.passkey.enabled=maybe", "eval.passkey.enabled must be true, false or auto (on for text data), got 'maybe'"),
    ("logger.log_checkpoints=1", "logger.log_checkpoints must be true or false, got 1"),
    ("logger.experiment_name=''", "logger.experiment_name must be a name, got ''"),
    ("tags=abc", "tags must be a mapping of tag names to values, e.g. +tags.row=E, got 'abc'"),
    # the data's own keys, by kind (they failed in Python's words: "'>' not supported", "NoneType")
    ("data.kind=foo", "data.kind must be one of mqar, text, got 'foo'"),
    ("data.vocab_size=abc", "data.vocab_size must be an integer >= 1, got 'abc'"),
    ("data.power_a=0", "data.power_a must be a number > 0 (1.0: uniform gaps), got 0"),
    ("+optim.eps=1e-8", "optim: unknown key(s) ['eps']; allowed: betas, decay_fraction, lr, min_lr_ratio, schedule, "
                        "warmup_steps, weight_decay"),
    ("eval.decode.new_tokens=1000", "eval.decode.context + eval.decode.new_tokens = 1128 is longer than the model "
                                    "supports (model.max_seq_len=1024): lower them or raise model.max_seq_len"),
])
def test_a_bad_value_names_its_key_and_what_is_allowed(override, message):
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        check_values(_composed(override))


def test_decode_settings_are_only_checked_when_decode_runs():
    check_values(_composed("eval.decode.enabled=false", "eval.decode.batch=0"))
    with pytest.raises(ConfigError, match=r"^eval\.decode\.batch must be an integer >= 1, got 0$"):
        check_values(_composed("eval.decode.enabled=true", "eval.decode.batch=0"))


def test_a_checkpoint_path_that_cannot_resume_is_refused_before_training(tmp_path, monkeypatch):
    from arch_lab.checkpoints import check_resumable
    from arch_lab.run_checks import check_inputs_exist

    monkeypatch.chdir(tmp_path)
    data = {"kind": "mqar"}
    with pytest.raises(FileNotFoundError, match=r"^ckpt_path=last: every run checkpoints into its own .*path$"):
        check_inputs_exist(_composed("ckpt_path=last"), data)
    (tmp_path / "outputs/2026-11-29/10-00-00/checkpoints").mkdir(parents=True)
    (tmp_path / "outputs/2026-11-29/10-00-00/checkpoints/last.ckpt").write_bytes(b"")
    with pytest.raises(FileNotFoundError, match=r"; the newest here: ckpt_path='outputs/2026-11-29/10-00-00/"):
        check_inputs_exist(_composed("ckpt_path=last"), data)
    (tmp_path / "notes.txt").write_text("not a checkpoint")
    with pytest.raises(ValueError, match=r"^ckpt_path: notes.txt is not a checkpoint \(torch cannot load it\)$"):
        check_resumable("notes.txt", None, None, None, {})


@pytest.mark.parametrize("override, message", [
    ("eval.passkey.seq_len=2048", "eval.passkey.seq_len=2048 is longer than the model supports "
                                  "(model.max_seq_len=1024): lower it or raise model.max_seq_len"),
    ("eval.passkey.depths=[1.5]", "eval.passkey.depths must be a list of needle depths in [0, 1], e.g. [0.0, 0.5, "
                                  "1.0], got [1.5]"),
    ("eval.passkey.num_per_depth=0", "eval.passkey.num_per_depth must be an integer >= 1, got 0"),
    ("eval.commonsense.limit=0", "eval.commonsense.limit must be an integer >= 1, or null for every item, got 0"),
])
def test_a_text_runs_evaluation_settings_are_checked_before_training(override, message):
    overrides = ["data=text_shakespeare", override]
    if override.startswith("eval.commonsense"):
        overrides.append("eval.commonsense.enabled=true")
    with pytest.raises(ConfigError, match=f"^{re.escape(message)}$"):
        check_values(_composed(*overrides))
    check_values(_composed(override))  # an MQAR run does no passkey or commonsense evaluation


def test_the_vocabulary_error_names_the_key_that_sets_the_datas_vocabulary():
    from arch_lab.run_checks import check_compatible

    model = {"vocab_size": 512, "max_seq_len": 1024}
    with pytest.raises(ValueError, match=r"raise model.vocab_size \(to 4096 or more\) or lower data.bpe_vocab_size$"):
        check_compatible(model, {"kind": "text", "tokenizer": "bpe", "seq_len": 64}, 4096)
    with pytest.raises(ValueError, match=r"raise model.vocab_size \(to 600 or more\) or lower data.vocab_size$"):
        check_compatible(model, {"kind": "mqar", "seq_len": 64}, 600)
