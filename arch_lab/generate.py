"""Generate from a trained checkpoint with the cached, batched decoder.

    python -m arch_lab.generate outputs/<date>/<time>/checkpoints/last.ckpt --prompt "ROMEO:" --max-new-tokens 200
    python -m arch_lab.generate <ckpt> --prompt "To be" --prompt "Once upon" --sample --temperature 0.8 --top-k 40
    python -m arch_lab.generate <ckpt> --ids 3,17,5,9          # token ids (MQAR models have no text tokenizer)
    python -m arch_lab.generate <ckpt> --prompt "ROMEO:" --max-new-tokens 2000 --compile   # compiled decode steps
"""
from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path
from typing import Optional

import torch

from components.config import ModelConfig
from components.generation import Generator
from components.model import HybridLM

from .checkpoints import CheckpointError, hybrid_lm_state, read_lab_checkpoint
from .data.tokenizers import build_tokenizer


def tokenizer_file(spec: dict, checkpoint: str, given: Optional[str] = None) -> Path:
    """The BPE tokenizer.json of a run: --tokenizer, else the path stored at training, else the one in the
    checkpoint's run folder (<run>/checkpoints/last.ckpt): the stored path is absolute, so it breaks when the run
    folder is moved or copied to another machine."""
    if given is not None:
        if not Path(given).is_file():
            raise CheckpointError(f"--tokenizer: no such file {given}")
        return Path(given)
    beside = Path(checkpoint).resolve().parent.parent / "tokenizer.json"
    for candidate in (Path(spec["path"]), beside):
        if candidate.is_file():
            return candidate
    raise CheckpointError(f"the checkpoint's BPE tokenizer is neither at {spec['path']} nor at {beside}: give its "
                          "tokenizer.json with --tokenizer PATH")


def load_tokenizer(spec: Optional[dict], checkpoint: str, vocab_size: int, given: Optional[str] = None):
    """The run's text tokenizer (None for a model trained on token ids)."""
    if spec is None or spec["kind"] != "bpe":
        if given is not None:
            raise CheckpointError("--tokenizer: only a checkpoint trained with a BPE tokenizer takes one (this one "
                                  + ("was trained on token ids)" if spec is None else f"uses the {spec['kind']} one)"))
        return build_tokenizer(spec["kind"]) if spec else None
    path = tokenizer_file(spec, checkpoint, given)
    try:
        tokenizer = build_tokenizer("bpe", path=path)
    except Exception as error:  # the tokenizers library's own error for a file that is not its JSON
        raise CheckpointError(f"tokenizer: {path} is not a tokenizer.json ({error})") from None
    if tokenizer.vocab_size > vocab_size:  # ids the embedding lacks: another run's tokenizer
        raise CheckpointError(f"tokenizer: {path} has {tokenizer.vocab_size} ids, more than the model's {vocab_size}: "
                              "give this run's tokenizer.json with --tokenizer PATH")
    return tokenizer


def load_checkpoint(path: str, device: str, tokenizer: Optional[str] = None):
    """(model in eval mode on `device`, its tokenizer or None); `tokenizer` overrides the BPE file's path."""
    ckpt = read_lab_checkpoint(path, "checkpoint")
    hparams = ckpt["hyper_parameters"]
    model = HybridLM(ModelConfig.from_dict(hparams["model_cfg"]))
    model.load_state_dict(hybrid_lm_state(ckpt["state_dict"]))
    tokenizer = load_tokenizer(hparams.get("tokenizer"), path, model.cfg.vocab_size, tokenizer)
    return model.to(device).eval(), tokenizer


def token_ids(text: str) -> list[int]:
    """--ids: comma-separated non-negative token ids."""
    try:
        ids = [int(t) for t in text.split(",")]
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a comma-separated list of token ids, e.g. 3,17,5") from None
    if min(ids) < 0:
        raise argparse.ArgumentTypeError(f"{text!r} holds a negative token id")
    return ids


def positive(kind: type):
    def parse(text: str):
        value = kind(text)
        if not value > 0:  # nan too
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        if not math.isfinite(value):  # an infinite temperature turns the logits into nan
            raise argparse.ArgumentTypeError(f"must be finite, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its message for a value it cannot convert
    return parse


def device_name(text: str) -> str:
    """--device: cpu, cuda or cuda:<index> (torch's own error for a typo lists twenty device types)."""
    if text not in ("cpu", "cuda") and not (text.startswith("cuda:") and text[5:].isdigit()):
        raise argparse.ArgumentTypeError(f"expected cpu, cuda or cuda:<index>, got {text!r}")
    return text


def check_device(parser: argparse.ArgumentParser, device: str) -> None:
    """A CUDA device this machine has (torch fails on the first tensor moved there with an AssertionError)."""
    if device == "cpu":
        return
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        parser.error(f"--device {device}: no CUDA device is visible here; use --device cpu")
    if device != "cuda" and int(device[5:]) >= count:
        parser.error(f"--device {device}: this machine has {count} CUDA device(s), cuda:0 to cuda:{count - 1}")


def check_lengths(parser: argparse.ArgumentParser, prompts: list[list[int]], max_new_tokens: int,
                  max_seq_len: int) -> None:
    """Prompt and generated tokens must fit the model's max_seq_len (positions past it were never trained, and
    generation went on past it without a word)."""
    longest = max(len(ids) for ids in prompts)
    if longest > max_seq_len:
        parser.error(f"a prompt of {longest} tokens is longer than the model's max_seq_len={max_seq_len}; shorten it")
    # the model reads the prompt and every generated token but the last: longest + max_new_tokens - 1 positions
    if longest + max_new_tokens - 1 > max_seq_len:
        parser.error(f"--max-new-tokens {max_new_tokens}: after the longest prompt ({longest} tokens) the model "
                     f"reads {longest + max_new_tokens - 1} positions, more than its max_seq_len={max_seq_len}; give "
                     f"at most --max-new-tokens {max_seq_len - longest + 1}")


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arch_lab.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a Lightning checkpoint written by `python -m arch_lab`")
    parser.add_argument("--prompt", action="append", default=[], help="text prompt (repeat for a batch)")
    parser.add_argument("--tokenizer", default=None, metavar="PATH",
                        help="the run's tokenizer.json (BPE runs), when neither the path stored in the checkpoint "
                             "nor the checkpoint's run folder holds it")
    parser.add_argument("--ids", action="append", default=[], type=token_ids,
                        help="comma-separated token ids (repeatable)")
    parser.add_argument("--max-new-tokens", type=positive(int), default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=positive(float), default=1.0)
    parser.add_argument("--top-k", type=positive(int), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", type=device_name, default="cuda" if torch.cuda.is_available() else "cpu",
                        help="cpu, cuda or cuda:<index> (default: %(default)s)")
    parser.add_argument("--compile", action="store_true",
                        help="run each decode step through torch.compile (fuses its small kernels; compiling takes "
                             "tens of seconds, so it pays off for long generations on a GPU)")
    args = parser.parse_args(argv)
    check_device(parser, args.device)
    if not Path(args.checkpoint).is_file():
        parser.error(f"checkpoint: no such file {args.checkpoint} (give the path of a .ckpt that `python -m arch_lab` "
                     "wrote, e.g. outputs/<date>/<time>/checkpoints/last.ckpt)")
    try:
        model, tokenizer = load_checkpoint(args.checkpoint, args.device, args.tokenizer)
    except CheckpointError as error:
        parser.error(str(error))
    if args.prompt and tokenizer is None:
        parser.error("this checkpoint was trained on token ids (no text tokenizer): use --ids")
    encoded = [tokenizer.encode(p) for p in args.prompt]
    if not all(encoded):  # the decoder needs at least one token to start from
        parser.error(f"--prompt {args.prompt[encoded.index([])]!r}: encodes to no tokens; give some text")
    vocab = model.cfg.vocab_size
    outside = [i for ids in args.ids for i in ids if i >= vocab]
    if outside:
        parser.error(f"--ids: token id {outside[0]} is outside the model's vocabulary (0..{vocab - 1})")
    if args.top_k is not None and args.top_k > vocab:
        parser.error(f"--top-k {args.top_k} is larger than the model's vocabulary ({vocab} ids)")
    prompts = encoded + args.ids
    if not prompts:
        parser.error("give at least one --prompt or --ids")
    check_lengths(parser, prompts, args.max_new_tokens, model.cfg.max_seq_len)
    out = Generator(model, compile=args.compile).generate(prompts, args.max_new_tokens, greedy=not args.sample,
                                    temperature=args.temperature, top_k=args.top_k,
                                    eos_id=tokenizer.eos_id if tokenizer else None, seed=args.seed,
                                    vocab_limit=tokenizer.vocab_size if tokenizer else None)
    for prompt, tokens in zip(args.prompt + [",".join(map(str, ids)) for ids in args.ids], out.tokens):
        text = tokenizer.decode(tokens) if tokenizer else ",".join(map(str, tokens))
        print(f"=== {prompt}\n{text}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
