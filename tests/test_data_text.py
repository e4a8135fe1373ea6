"""Text readers, tokenizers and packing, on real corpora from ../shared/data and tiny temp files."""

import gzip
import json
import re

import pytest
import torch
from torch.utils.data import DataLoader

import arch_lab.data.text as text_module
from arch_lab.data.datamodule import TextDataModule
from arch_lab.data.text import (
    DOC_SEPARATOR,
    PackedTokenStream,
    TextBlocks,
    iter_documents,
    pack_tokens,
    tokenize_corpus,
)
from arch_lab.data.tokenizers import BPETokenizer, ByteTokenizer, build_tokenizer
from lab_helpers import DATA_ROOT as DATA

SHAKESPEARE = DATA / "tinyshakespeare" / "input.txt"
GUTENBERG_VALID = DATA / "gutenberg" / "valid.txt.gz"
GUTENBERG_TEST = DATA / "gutenberg" / "test.txt.gz"
WIKITEXT2 = DATA / "wikitext2" / "wiki.test.raw"
LAMBADA = DATA / "commonsense" / "llmfoundry_lambada_openai.jsonl"
BYTE = ByteTokenizer()


# --- readers on real files -------------------------------------------------------------------


def test_plain_text_file_is_one_document():
    docs = list(iter_documents(SHAKESPEARE))
    assert docs == [SHAKESPEARE.read_text(encoding="utf-8").strip()]
    assert docs[0].startswith("First Citizen:")


def test_gzip_corpus_splits_into_its_books():
    docs = list(iter_documents(GUTENBERG_VALID))
    manifest = [json.loads(line) for line in (DATA / "gutenberg" / "manifest.jsonl").read_text().splitlines()]
    assert len(docs) == sum(book["split"] == "valid" for book in manifest) == 8
    with gzip.open(GUTENBERG_VALID, "rt", encoding="utf-8") as f:
        assert docs == [d.strip() for d in f.read().split(DOC_SEPARATOR)]
    assert docs[0].startswith("IS SHAKESPEARE DEAD?")


def test_jsonl_reader_uses_the_configured_field():
    docs = list(iter_documents(LAMBADA, text_field="context"))
    lines = LAMBADA.read_text(encoding="utf-8").splitlines()
    assert len(docs) == len(lines) == 5153
    assert docs[0] == json.loads(lines[0])["context"].strip()


def test_jsonl_reader_names_file_and_key_when_the_field_is_missing():
    message = f"data.text_field: {LAMBADA} line 1 has no string field 'text' (fields: ['context', 'continuation'])"
    with pytest.raises(ValueError, match=re.escape(message)):
        next(iter_documents(LAMBADA))


def test_wikitext_raw_file_is_read_as_plain_text():
    (doc,) = iter_documents(WIKITEXT2)
    assert doc.startswith("= Robert Boulter =")


# --- readers on tiny temp files ----------------------------------------------------------------


def test_separator_split_survives_every_chunk_boundary(tmp_path, monkeypatch):
    docs = [f"document {i}: " + "é" * i + "." for i in range(20)]
    path = tmp_path / "c.txt"
    path.write_text(f"\n{DOC_SEPARATOR}\n".join(docs) + "\n", encoding="utf-8")
    for chunk in (1, 2, 5, 12, 13, 14, 31, 1000):
        monkeypatch.setattr(text_module, "_READ_CHUNK_CHARS", chunk)
        assert list(iter_documents(path)) == docs, chunk


def test_directory_reads_txt_gz_jsonl_in_sorted_order(tmp_path):
    (tmp_path / "b.txt").write_text(f"two{DOC_SEPARATOR}three", encoding="utf-8")
    with gzip.open(tmp_path / "a.txt.gz", "wt", encoding="utf-8") as f:
        f.write("one\n")
    (tmp_path / "c.jsonl").write_text('{"text": "four"}\n\n{"text": "five"}\n', encoding="utf-8")
    (tmp_path / "notes.md").write_text("ignored", encoding="utf-8")
    assert list(iter_documents(tmp_path)) == ["one", "two", "three", "four", "five"]


def test_missing_path_error_names_data_path(tmp_path):
    missing = tmp_path / "nope.txt"
    with pytest.raises(FileNotFoundError, match=re.escape(f"data.path: no such file or directory: {missing}")):
        next(iter_documents(missing))


@pytest.mark.parametrize(
    ("name", "content", "message"),
    [
        ("empty.txt", "  \n", "data.path: {path} contains no text"),
        ("seps.txt", f"{DOC_SEPARATOR}\n{DOC_SEPARATOR}", "data.path: {path} contains no text"),
        ("bad.jsonl", '{"text": "ok"}\nnot json\n', "data.path: {path} line 2 is not valid JSON"),
        ("data.csv", "a,b", "data.path: {path} must end with one of ['.txt', '.txt.gz', '.raw', '.jsonl']"),
    ],
)
def test_unusable_files_raise_naming_file_and_key(tmp_path, name, content, message):
    path = tmp_path / name
    path.write_text(content, encoding="utf-8")
    with pytest.raises(ValueError, match=re.escape(message.format(path=path))):
        list(iter_documents(path))


def test_invalid_utf8_and_empty_directory_raise(tmp_path):
    for name in ("bad.txt", "bad.jsonl"):
        bad = tmp_path / name
        bad.write_bytes(b'{"text": "ok"}\n\xff\xfe')
        with pytest.raises(ValueError, match=re.escape(f"data.path: cannot read {bad} as UTF-8 text")):
            list(iter_documents(bad))
    empty = tmp_path / "empty_dir"
    empty.mkdir()
    with pytest.raises(ValueError, match=re.escape(f"data.path: directory {empty} holds no")):
        list(iter_documents(empty))


# --- tokenizers --------------------------------------------------------------------------------


def test_byte_tokenizer_round_trips_real_text_and_drops_specials():
    text = SHAKESPEARE.read_text(encoding="utf-8")
    ids = BYTE.encode(text)
    assert len(ids) == len(text.encode("utf-8")) and max(ids) < 256
    assert BYTE.decode(ids) == text
    book = next(iter_documents(GUTENBERG_VALID))[:50_000]
    assert BYTE.decode(BYTE.encode(book)) == book
    assert BYTE.decode([BYTE.bos_id, *BYTE.encode("héllo"), BYTE.eos_id, BYTE.pad_id]) == "héllo"
    assert (BYTE.vocab_size, BYTE.bos_id, BYTE.eos_id, BYTE.pad_id) == (259, 256, 257, 258)


@pytest.fixture(scope="module")
def bpe():
    return BPETokenizer.train(SHAKESPEARE, vocab_size=600)


def test_bpe_trained_on_tinyshakespeare_round_trips_and_has_the_requested_size(bpe):
    assert bpe.vocab_size == 600
    assert {bpe.bos_id, bpe.eos_id, bpe.pad_id} <= set(range(600)) and len({bpe.bos_id, bpe.eos_id, bpe.pad_id}) == 3
    held_out = next(iter_documents(GUTENBERG_TEST))[:20_000] + " naïve café 日本"
    ids = bpe.encode(held_out)
    assert bpe.decode(ids) == held_out
    assert len(ids) < 0.6 * len(held_out.encode("utf-8"))  # merges actually compress English
    assert bpe.decode([bpe.bos_id, *bpe.encode("To be"), bpe.eos_id]) == "To be"


def test_bpe_save_load_and_factory(bpe, tmp_path):
    path = tmp_path / "tok" / "bpe.json"
    bpe.save(path)
    loaded = BPETokenizer.load(path)
    sample = "Now is the winter of our discontent"
    assert loaded.encode(sample) == bpe.encode(sample)
    assert (loaded.vocab_size, loaded.eos_id) == (bpe.vocab_size, bpe.eos_id)
    assert build_tokenizer("bpe", path=path).encode(sample) == bpe.encode(sample)

    trained_path = tmp_path / "new.json"
    texts = ["the cat sat on the mat"] * 50 + ["the dog ate the log"] * 50
    trained = build_tokenizer("bpe", path=trained_path, train_source=iter(texts), vocab_size=270)
    assert trained_path.is_file() and trained.vocab_size == 270
    assert trained.decode(trained.encode("the cat ate")) == "the cat ate"


def test_tokenizer_factory_errors_name_the_key():
    assert isinstance(build_tokenizer("byte"), ByteTokenizer)
    with pytest.raises(ValueError, match=re.escape("data.tokenizer must be one of ['byte', 'bpe'], got 'word'")):
        build_tokenizer("word")
    with pytest.raises(ValueError, match=re.escape("data.tokenizer=byte takes no options, got ['vocab_size']")):
        build_tokenizer("byte", vocab_size=300)
    with pytest.raises(ValueError, match=re.escape("data.tokenizer=bpe needs data.train_path and data.bpe_vocab_size")):
        build_tokenizer("bpe", path="/nonexistent/bpe.json")
    with pytest.raises(ValueError, match=re.escape("data.bpe_vocab_size must be > 259")):
        BPETokenizer.train(["some text"], vocab_size=259)


# --- packing -----------------------------------------------------------------------------------


def test_documents_are_separated_by_eos():
    assert tokenize_corpus(["ab", "c"], BYTE).tolist() == [97, 98, 257, 99, 257]
    assert tokenize_corpus(["ab", "c"], BYTE, max_tokens=4).tolist() == [97, 98, 257, 99]


def test_packing_produces_exactly_shifted_labels_and_covers_every_token():
    seq_len = 64
    docs = list(iter_documents(GUTENBERG_VALID))[:2]
    tokens = tokenize_corpus(docs, BYTE, max_tokens=10_000)
    examples = list(pack_tokens(docs, BYTE, seq_len, max_tokens=10_000))
    assert len(examples) == (10_000 - 1) // seq_len
    for i, ex in enumerate(examples):
        block = tokens[i * seq_len : i * seq_len + seq_len + 1]
        assert torch.equal(ex["input_ids"], block[:-1]) and torch.equal(ex["labels"], block[1:])
        assert ex["input_ids"].shape == (seq_len,) and ex["input_ids"].dtype == torch.long
    # every token after the first is a target exactly once
    assert torch.equal(torch.cat([ex["labels"] for ex in examples]), tokens[1 : 1 + len(examples) * seq_len])
    blocks = TextBlocks(tokens, seq_len)
    assert len(blocks) == len(examples)
    assert all(torch.equal(blocks[i]["labels"], ex["labels"]) for i, ex in enumerate(examples))


def test_text_blocks_count_and_too_short_corpus():
    tokens = torch.arange(1000)
    assert len(TextBlocks(tokens[:101], 10)) == 10 and len(TextBlocks(tokens[:100], 10)) == 9
    with pytest.raises(ValueError, match=re.escape("data.path: the corpus gives 5 tokens (data.max_train_tokens / "
                                                   "max_eval_tokens cap them), fewer than one example of "
                                                   "data.seq_len=10 needs (11)")):
        TextBlocks(tokens[:5], 10)


def test_stream_matches_blocks_and_splits_blocks_across_workers():
    docs = [SHAKESPEARE.read_text(encoding="utf-8")[:20_000]]
    stream = PackedTokenStream(lambda: iter(docs), BYTE, seq_len=128)
    single = [b["input_ids"] for b in DataLoader(stream, batch_size=None)]
    blocks = TextBlocks.from_documents(docs, BYTE, seq_len=128)
    assert len(single) == len(blocks) and all(torch.equal(a, blocks[i]["input_ids"]) for i, a in enumerate(single))
    parallel = [b["input_ids"] for b in DataLoader(stream, batch_size=None, num_workers=2)]
    assert sorted(map(tuple, (p.tolist() for p in parallel))) == sorted(map(tuple, (s.tolist() for s in single)))


def test_hf_source_goes_through_the_same_packing(tmp_path):
    pytest.importorskip("datasets")
    from arch_lab.data.text import iter_hf_documents

    path = tmp_path / "docs.jsonl"
    path.write_text("".join(json.dumps({"text": f"document {i}: " + "word " * i}) + "\n" for i in range(40)))
    hf_docs = list(iter_hf_documents("json", split="train", data_files=str(path)))
    assert hf_docs == list(iter_documents(path))
    from_hf = TextBlocks.from_documents(hf_docs, BYTE, seq_len=32)
    from_files = TextBlocks.from_documents(iter_documents(path), BYTE, seq_len=32)
    assert torch.equal(from_hf.tokens, from_files.tokens)


# --- data module -------------------------------------------------------------------------------


def test_text_datamodule_on_real_files():
    def make(seed):
        dm = TextDataModule(
            tokenizer=BYTE, seq_len=64, batch_size=8, train_path=str(SHAKESPEARE), valid_path=str(GUTENBERG_VALID),
            test_paths={"gutenberg_test": str(GUTENBERG_TEST), "wikitext2": str(WIKITEXT2)},
            max_train_tokens=20_000, max_eval_tokens=4_096, seed=seed,
        )
        dm.setup()
        return dm

    dm = make(0)
    batch = next(iter(dm.train_dataloader()))
    assert batch["input_ids"].shape == batch["labels"].shape == (8, 64)
    assert len(dm.train_set) == (20_000 - 1) // 64 and len(dm.val_set) == (4_096 - 1) // 64
    assert dm.test_names == ["gutenberg_test", "wikitext2"]
    wiki = next(iter(dm.test_dataloader()[1]))
    assert BYTE.decode(wiki["input_ids"][0].tolist()).startswith("= Robert Boulter =")
    assert torch.equal(wiki["labels"][0, :-1], wiki["input_ids"][0, 1:])
    assert torch.equal(batch["input_ids"], next(iter(make(0).train_dataloader()))["input_ids"])
    assert not torch.equal(batch["input_ids"], next(iter(make(1).train_dataloader()))["input_ids"])


def test_text_datamodule_config_errors():
    with pytest.raises(ValueError, match=re.escape("data.source must be one of ['files', 'hf'], got 'web'")):
        TextDataModule(tokenizer=BYTE, seq_len=8, batch_size=2, source="web")
    with pytest.raises(ValueError, match=re.escape("data.source=files needs data.train_path and data.valid_path")):
        TextDataModule(tokenizer=BYTE, seq_len=8, batch_size=2, train_path=str(SHAKESPEARE))
    dm = TextDataModule(tokenizer=BYTE, seq_len=8, batch_size=2, train_path="/no/such.txt", valid_path=str(SHAKESPEARE))
    with pytest.raises(FileNotFoundError, match=re.escape("data.train_path: no such file or directory: /no/such.txt")):
        dm.setup("fit")


def test_held_out_perplexity_reads_each_whole_set_and_validation_its_training_batches():
    """trainer.limit_val_batches bounds validation only: it used to cut each test set to its first books."""
    from arch_lab.evaluate import mean_loss, perplexity_metrics
    from components.model import HybridLM
    from components.presets import preset

    torch.manual_seed(0)
    model = HybridLM(preset("transformer", "tiny", vocab_size=64)).eval()
    batches = [{"input_ids": ids, "labels": ids} for ids in torch.randint(0, 64, (6, 2, 16))]

    class Data:
        test_names = ["held_out"]

        def setup(self, stage):
            pass

        def val_dataloader(self):
            return batches

        def test_dataloader(self):
            return [batches]

    with torch.no_grad():
        metrics = perplexity_metrics(model, Data(), max_batches=2)
        assert metrics["val/loss"] == pytest.approx(mean_loss(model, batches[:2]))
        assert metrics["test/held_out/loss"] == pytest.approx(mean_loss(model, batches))
        assert metrics["test/held_out/loss"] != pytest.approx(metrics["val/loss"])
