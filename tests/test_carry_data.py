"""experiments/roadmap/carry_data.py cuts gutenberg/train to a prefix for the device call: a run reading at most
--train-tokens tokens must see exactly the tokens the full file gives it."""
import gzip
import runpy
from pathlib import Path

import pytest

from arch_lab.data.text import iter_documents, tokenize_corpus
from arch_lab.data.tokenizers import ByteTokenizer

SCRIPT = Path(__file__).resolve().parents[1] / "experiments" / "roadmap" / "carry_data.py"


@pytest.fixture
def shared_data(tmp_path):
    src = tmp_path / "src"
    (src / "gutenberg").mkdir(parents=True)
    (src / "wikitext2").mkdir()
    docs = [f"  book {i}: " + "é word " * (50 + 7 * i) + "\n" for i in range(40)]
    docs.insert(3, "   \n")  # a blank document, skipped by the reader
    with gzip.open(src / "gutenberg/train.txt.gz", "wt", encoding="utf-8") as f:
        f.write("<|endoftext|>".join(docs))
    for name in ("valid", "test"):
        with gzip.open(src / f"gutenberg/{name}.txt.gz", "wt", encoding="utf-8") as f:
            f.write(f"{name} text")
    (src / "wikitext2/wiki.test.raw").write_text("wiki text")
    (src / "tinyshakespeare").mkdir()
    (src / "tinyshakespeare/input.txt").write_text("First Citizen:")  # the test suite's conftest looks for it
    return src


@pytest.mark.parametrize("budget", [1, 2000, 9000])
def test_prefix_gives_the_same_tokens_as_the_full_file(shared_data, tmp_path, budget):
    dst = tmp_path / "carried"
    runpy.run_path(str(SCRIPT), run_name="not_main")["main"](
        ["--src", str(shared_data), "--dst", str(dst), "--train-tokens", str(budget)])
    tok = ByteTokenizer()
    full = tokenize_corpus(iter_documents(shared_data / "gutenberg/train.txt.gz"), tok, max_tokens=budget)
    prefix = tokenize_corpus(iter_documents(dst / "gutenberg/train.txt.gz"), tok, max_tokens=budget)
    assert len(full) == budget and prefix.equal(full)
    assert (dst / "gutenberg/train.txt.gz").stat().st_size < (shared_data / "gutenberg/train.txt.gz").stat().st_size
    assert (dst / "tinyshakespeare/input.txt").read_text() == "First Citizen:"
    assert (dst / "wikitext2/wiki.test.raw").read_text() == "wiki text"
