"""Generate from a trained checkpoint with the cached, batched decoder.

    python -m arch_lab.generate outputs/<date>/<time>/checkpoints/last.ckpt --prompt "ROMEO:" --max-new-tokens 200
    python -m arch_lab.generate <ckpt> --prompt "To be" --prompt "Once upon" --sample --temperature 0.8 --top-k 40
    python -m arch_lab.generate <ckpt> --ids 3,17,5,9          # token ids (MQAR models have no text tokenizer)
    python -m arch_lab.generate <ckpt> --prompt "ROMEO:" --max-new-tokens 2000 --compile   # compiled decode steps
"""
from __future__ import annotations

import argparse
import sys
from pathlib import Path

import torch

from components.config import ModelConfig
from components.generation import Generator
from components.model import HybridLM

from .checkpoints import AtomicCheckpointIO, hybrid_lm_state
from .data.tokenizers import build_tokenizer


def load_checkpoint(path: str, device: str):
    ckpt = AtomicCheckpointIO().load_checkpoint(path)  # weights_only=True
    hparams = ckpt["hyper_parameters"]
    model = HybridLM(ModelConfig.from_dict(hparams["model_cfg"]))
    model.load_state_dict(hybrid_lm_state(ckpt["state_dict"]))
    spec = hparams.get("tokenizer")
    tokenizer = build_tokenizer(spec["kind"], path=spec["path"]) if spec else None
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
        if value <= 0:
            raise argparse.ArgumentTypeError(f"must be > 0, got {text}")
        return value
    parse.__name__ = kind.__name__  # argparse names the type in its message for a value it cannot convert
    return parse


def main(argv=None) -> int:
    parser = argparse.ArgumentParser(prog="python -m arch_lab.generate", description=__doc__,
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint", help="a Lightning checkpoint written by `python -m arch_lab`")
    parser.add_argument("--prompt", action="append", default=[], help="text prompt (repeat for a batch)")
    parser.add_argument("--ids", action="append", default=[], type=token_ids,
                        help="comma-separated token ids (repeatable)")
    parser.add_argument("--max-new-tokens", type=positive(int), default=64)
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--temperature", type=positive(float), default=1.0)
    parser.add_argument("--top-k", type=positive(int), default=None)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--compile", action="store_true",
                        help="run each decode step through torch.compile (fuses its small kernels; compiling takes "
                             "tens of seconds, so it pays off for long generations on a GPU)")
    args = parser.parse_args(argv)
    if not Path(args.checkpoint).is_file():
        parser.error(f"checkpoint: no such file {args.checkpoint} (give the path of a .ckpt that `python -m arch_lab` "
                     "wrote, e.g. outputs/<date>/<time>/checkpoints/last.ckpt)")
    model, tokenizer = load_checkpoint(args.checkpoint, args.device)
    if args.prompt and tokenizer is None:
        parser.error("this checkpoint was trained on token ids (no text tokenizer): use --ids")
    vocab = model.cfg.vocab_size
    outside = [i for ids in args.ids for i in ids if i >= vocab]
    if outside:
        parser.error(f"--ids: token id {outside[0]} is outside the model's vocabulary (0..{vocab - 1})")
    if args.top_k is not None and args.top_k > vocab:
        parser.error(f"--top-k {args.top_k} is larger than the model's vocabulary ({vocab} ids)")
    prompts = [tokenizer.encode(p) for p in args.prompt] + args.ids
    if not prompts:
        parser.error("give at least one --prompt or --ids")
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
