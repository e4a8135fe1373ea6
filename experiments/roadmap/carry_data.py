"""Copy what the GPU study reads from ../shared/data into .data/ (git-ignored) so a device call can carry it.

The device tool carries at most 64 MiB, so gutenberg/train is cut to its first whole documents covering
--train-tokens byte tokens; the text datamodule reads documents in order and stops at data.max_train_tokens,
so a run with max_train_tokens <= --train-tokens sees exactly the tokens it would see in the full file.
    python experiments/roadmap/carry_data.py --train-tokens 16000000   # then carry [".data"], ARCH_LAB_DATA_ROOT=$PWD/.data
"""
from __future__ import annotations

import argparse
import gzip
import shutil
from pathlib import Path

EOT = "<|endoftext|>"


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--src", default="../shared/data")
    parser.add_argument("--dst", default=".data")
    parser.add_argument("--train-tokens", type=int, default=16_000_000)
    args = parser.parse_args(argv)
    src, dst = Path(args.src), Path(args.dst)
    (dst / "gutenberg").mkdir(parents=True, exist_ok=True)
    (dst / "wikitext2").mkdir(parents=True, exist_ok=True)
    (dst / "tinyshakespeare").mkdir(parents=True, exist_ok=True)
    # tinyshakespeare is what the test suite's conftest looks for (the GPU parity tests run from .data too).
    copied = ("gutenberg/valid.txt.gz", "gutenberg/test.txt.gz", "wikitext2/wiki.test.raw", "tinyshakespeare/input.txt")
    for rel in copied:
        shutil.copyfile(src / rel, dst / rel)
    with gzip.open(src / "gutenberg/train.txt.gz", "rt", encoding="utf-8") as f:
        text = f.read()
    kept, size = [], 0
    for doc in text.split(EOT):
        kept.append(doc)
        if doc.strip():  # the reader strips documents and skips blank ones; each gets an eos token
            size += len(doc.strip().encode("utf-8")) + 1
        if size >= args.train_tokens:
            break
    with gzip.open(dst / "gutenberg/train.txt.gz", "wt", encoding="utf-8") as f:
        f.write(EOT.join(kept))
    print(f"{dst}/gutenberg/train.txt.gz: {len(kept)} documents, {size:,} byte tokens")


if __name__ == "__main__":
    main()
