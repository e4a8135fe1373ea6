"""`python -m arch_lab.generate` on a real checkpoint, and `python -m arch_lab.report` on a real MLflow store."""
import math
import os
import struct
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from arch_lab.generate import load_checkpoint, main as generate_main
from components.generation import Generator
from components.model import HybridLM
from lab_helpers import DATA_ROOT as DATA

REPO = Path(__file__).resolve().parents[1]


def _env():
    return {**os.environ, "OMP_NUM_THREADS": "1"}


def _same_image(a: Path, b: Path) -> bool:
    """Same size and pixels (PNG metadata aside)."""
    from matplotlib.image import imread

    pixels_a, pixels_b = imread(a), imread(b)
    return pixels_a.shape == pixels_b.shape and bool((pixels_a == pixels_b).all())


@pytest.fixture(scope="module")
def text_checkpoint(tmp_path_factory) -> Path:
    tmp = tmp_path_factory.mktemp("gen")
    args = [sys.executable, "-m", "arch_lab", "data=text_shakespeare", f"data_root={DATA}", "data.seq_len=32",
            "data.batch_size=4", "data.max_train_tokens=4096", "data.max_eval_tokens=512", "trainer.max_steps=4",
            "trainer.val_check_interval=2", "trainer.limit_val_batches=1", "eval.passkey.seq_len=128",
            "eval.passkey.num_per_depth=1", "eval.decode.context=8", "eval.decode.new_tokens=2",
            "eval.analysis.enabled=false", "trainer.enable_progress_bar=false",
            f"logger.tracking_uri=sqlite:///{tmp}/mlruns.db", f"hydra.run.dir={tmp}/run"]
    subprocess.run(args, cwd=tmp, env=_env(), check=True, capture_output=True, text=True, timeout=600)
    return tmp / "run" / "checkpoints" / "last.ckpt"


@pytest.mark.parametrize("flags", [[], pytest.param(["--compile"], marks=pytest.mark.slow)])
def test_generate_cli_prints_the_greedy_continuation_of_the_checkpoint(text_checkpoint, flags):
    """The same tokens with the decode steps compiled (--compile) as eager."""
    out = subprocess.run([sys.executable, "-m", "arch_lab.generate", str(text_checkpoint), "--prompt", "ROMEO:",
                          "--prompt", "To be", "--max-new-tokens", "6", "--device", "cpu", *flags],
                         env=_env(), capture_output=True, text=True, timeout=300, check=True).stdout
    model, tokenizer = load_checkpoint(str(text_checkpoint), "cpu")
    expected = Generator(model).generate([tokenizer.encode("ROMEO:"), tokenizer.encode("To be")], 6,
                                         eos_id=tokenizer.eos_id, vocab_limit=tokenizer.vocab_size).tokens
    assert out == "".join(f"=== {p}\n{tokenizer.decode(t)}\n" for p, t in zip(["ROMEO:", "To be"], expected))


@pytest.fixture
def id_checkpoint(tmp_path) -> Path:
    """A checkpoint as an MQAR run writes it: the LightningModule's hyperparameters hold no text tokenizer (the
    data factory's spec for token-id data is None)."""
    from arch_lab.data_factory import tokenizer_spec
    from arch_lab.lit_module import LitHybridLM
    from components.presets import preset

    spec = tokenizer_spec({"kind": "mqar"}, tmp_path)
    lit = LitHybridLM(preset("transformer", "tiny", vocab_size=64).to_dict(), {"lr": 1e-3}, tokenizer=spec)
    torch.save({"hyper_parameters": dict(lit.hparams), "state_dict": lit.state_dict()}, tmp_path / "last.ckpt")
    return tmp_path / "last.ckpt"


def test_generate_cli_refuses_text_for_an_id_model_and_needs_a_prompt(text_checkpoint, id_checkpoint, capsys):
    run = subprocess.run([sys.executable, "-m", "arch_lab.generate", str(text_checkpoint)], env=_env(),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and "give at least one --prompt or --ids" in run.stderr
    # text for a model trained on token ids: no tokenizer could encode it
    with pytest.raises(SystemExit) as stop:
        generate_main([str(id_checkpoint), "--prompt", "x", "--device", "cpu"])
    assert stop.value.code == 2
    assert ("error: this checkpoint was trained on token ids (no text tokenizer): use --ids"
            in capsys.readouterr().err)
    # the same model takes ids, and prints the generated ids
    assert generate_main([str(id_checkpoint), "--ids", "3,5", "--max-new-tokens", "3", "--device", "cpu"]) == 0
    model = load_checkpoint(str(id_checkpoint), "cpu")[0]
    expected = Generator(model).generate([[3, 5]], 3).tokens[0]
    assert capsys.readouterr().out == f"=== 3,5\n{','.join(map(str, expected))}\n"


@pytest.mark.parametrize("args, message", [
    (["--ids", "3,a"], "argument --ids: '3,a' is not a comma-separated list of token ids"),
    (["--ids", "-3"], "argument --ids: '-3' holds a negative token id"),
    (["--ids", "3,99999"], "--ids: token id 99999 is outside the model's vocabulary (0..{last})"),
    (["--ids", "3", "--max-new-tokens", "0"], "argument --max-new-tokens: must be > 0, got 0"),
    (["--ids", "3", "--sample", "--temperature", "0"], "argument --temperature: must be > 0, got 0"),
    (["--ids", "3", "--sample", "--temperature", "nan"], "argument --temperature: must be > 0, got nan"),
    (["--ids", "3", "--sample", "--temperature", "inf"], "argument --temperature: must be finite, got inf"),
    (["--ids", "3,5", "--max-new-tokens", "5000"], "--max-new-tokens 5000: after the longest prompt (2 tokens) the "
                                                   "model reads 5001 positions, more than its max_seq_len={max_len}; "
                                                   "give at most --max-new-tokens {room}"),
    (["--prompt", "x" * 5000], "a prompt of 5000 tokens is longer than the model's max_seq_len={max_len}; shorten it"),
    (["--ids", "3", "--device", "foo"], "argument --device: expected cpu, cuda or cuda:<index>, got 'foo'"),
    (["--ids", "3", "--top-k", "99999"], "--top-k 99999 is larger than the model's vocabulary ({vocab} ids)"),
    (["--prompt", ""], "--prompt '': encodes to no tokens; give some text"),  # not generation's ValueError
    (["--ids", "3", "--tokenizer", "t.json"], "--tokenizer: only a checkpoint trained with a BPE tokenizer takes one "
                                              "(this one uses the byte one)"),
])
def test_generate_cli_names_a_bad_argument(text_checkpoint, capsys, args, message):
    """Not a traceback from the embedding, torch.device or multinomial, nor 5000 tokens past max_seq_len."""
    cfg = load_checkpoint(str(text_checkpoint), "cpu")[0].cfg
    with pytest.raises(SystemExit) as stop:
        generate_main([str(text_checkpoint), "--device", "cpu", *args])
    assert stop.value.code == 2
    assert message.format(last=cfg.vocab_size - 1, vocab=cfg.vocab_size, max_len=cfg.max_seq_len,
                          room=cfg.max_seq_len - 1) in capsys.readouterr().err


@pytest.mark.parametrize("device, gpus, message", [
    ("cuda", 0, "no CUDA device is visible here; use --device cpu"),
    ("cuda:1", 0, "no CUDA device is visible here; use --device cpu"),
    ("cuda:1", 1, "this machine has 1 CUDA device(s), cuda:0 to cuda:0"),
])
def test_generate_cli_names_a_cuda_device_this_machine_lacks(text_checkpoint, capsys, monkeypatch, device, gpus,
                                                             message):
    """torch's AssertionError ("Torch not compiled with CUDA enabled") came from moving the model there."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: gpus > 0)
    monkeypatch.setattr(torch.cuda, "device_count", lambda: gpus)
    with pytest.raises(SystemExit) as stop:
        generate_main([str(text_checkpoint), "--ids", "3", "--device", device])
    assert stop.value.code == 2
    assert f"error: --device {device}: {message}" in capsys.readouterr().err


def test_generate_cli_names_a_missing_checkpoint(tmp_path):
    run = subprocess.run([sys.executable, "-m", "arch_lab.generate", str(tmp_path / "last.ckpt"), "--ids", "3,5"],
                         env=_env(), capture_output=True, text=True, timeout=300)
    assert run.returncode == 2 and f"checkpoint: no such file {tmp_path / 'last.ckpt'}" in run.stderr
    assert "Traceback" not in run.stderr


def test_checkpoint_loads_with_weights_only(text_checkpoint):
    ckpt = torch.load(text_checkpoint, weights_only=True)
    assert ckpt["hyper_parameters"]["tokenizer"] == {"kind": "byte", "path": None}
    assert not list(text_checkpoint.parent.glob("*.tmp"))
    # every weight once, under the HybridLM's own names (no second copy under a wrapper's name)
    assert all(key.startswith("model.") for key in ckpt["state_dict"])


@pytest.mark.parametrize("successes, trials, interval", [(0, 5, (0.0, 0.434)), (2, 5, (0.118, 0.769)),
                                                         (5, 5, (0.566, 1.0)), (50, 100, (0.404, 0.596))])
def test_wilson_interval_matches_known_values(successes, trials, interval):
    from arch_lab.report import wilson_interval

    assert wilson_interval(successes, trials) == pytest.approx(interval, abs=1e-3)


def test_report_builds_tables_and_plots_from_mlflow_runs(tmp_path):
    import mlflow

    from arch_lab import report

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("roadmap")
    # per row: (accuracy, decode tok/s, cache MB at 16k) of each seed's run
    for model, seeds in {"transformer_tiny": ((0.30, 100.0, 4.0), (0.40, 300.0, 4.0)),
                         "roadmap_e_tiny": ((0.50, 500.0, 1.0), (0.60, 700.0, 2.0))}.items():
        for seed, (acc, tok_s, cache_mb) in enumerate(seeds):
            with mlflow.start_run(tags={"model": model, "task": "mqar", "seed": str(seed)}):
                mlflow.log_params({"data.vocab_size": 256})
                mlflow.log_metrics({"throughput/decode_tok_s": tok_s, "cache/mb_16k": cache_mb,
                                    "recall/mqar_acc": acc, "recall/mqar_acc_kv8": acc + 0.1,
                                    "recall/mqar_acc_kv64": acc - 0.1, "val/loss": 2.0 + seed,
                                    "analysis/erf": 3.0 + seed,
                                    "analysis/attn_entropy_layer0": 1.0, "analysis/attn_entropy_layer1": 2.0})
                for step, value in ((19, acc), (9, acc / 2)):  # validation accuracy by step, logged out of order
                    mlflow.log_metric("val/mqar_acc", value, step=step)
    with mlflow.start_run(tags={"model": "roadmap_d_tiny", "task": "mqar"}):
        mlflow.log_metrics({"recall/mqar_acc": 0.45, "analysis/attn_entropy_layer0": 1.5,
                            "analysis/attn_entropy_layer1": 2.5})
    out = tmp_path / "report"
    assert report.main(["--tracking-uri", uri, "--experiment", "roadmap", "--out", str(out)]) == 0
    tables = (out / "tables.md").read_text()
    transformer = next(line for line in tables.splitlines() if line.startswith("| Transformer"))
    assert "| 35.0 ± 5.0 | 0/2 (0–66%) |" in transformer and transformer.endswith("| 39.98 | 2 | – / – |")
    row_e = next(line for line in tables.splitlines() if line.startswith("| E + meta tokens"))
    assert "| 55.0 ± 5.0 | 1/2 (9–91%) |" in row_e  # runs above 50% count as learned: 0.6 does, 0.5 does not
    # without a bench store, speed and cache are the training runs' own: mean tok/s (× the Transformer's), mean MB
    assert "| 200 (1.00×) |" in transformer and "| 4.0 |" in transformer
    assert "| 600 (3.00×) |" in row_e and "| 1.5 ± 0.5 |" in row_e
    assert "MQAR chance (a uniform guess among the vocab/2 values): 0.78% at vocabulary 256" in tables
    # the slice table: one column per slice found in the runs, then the losses (text has no runs: "–")
    assert "| row | 8 pairs % | 64 pairs % | MQAR val loss | text val loss |" in tables
    slices_e = [line for line in tables.splitlines() if line.startswith("| E + meta tokens")][1]
    assert slices_e.startswith("| E + meta tokens | 65.0 ± 5.0 | 45.0 ± 5.0 | 2.50 ± 0.50 | – |")
    # Fig. 1 plots those rows: its image is not the one drawn for the same runs without their speeds (only the
    # chance line), which the report drew before any run logged throughput
    runs = report._runs([uri], "roadmap")
    without_speed = report.plot_fig1(runs.drop(columns=["metrics.throughput/decode_tok_s"]), None,
                                     tmp_path / "without_speed.png")
    assert not _same_image(out / "fig1_accuracy_throughput_cache.png", without_speed)
    assert (out / "fig3_erf_vs_cache.png").read_bytes()[:4] == b"\x89PNG"  # ERF and cache of both rows
    assert (out / "fig9_entropy_per_layer_mqar.png").read_bytes()[:4] == b"\x89PNG"
    assert not (out / "fig9_entropy_per_layer_text.png").exists()  # no text runs: no text figure
    assert report.mean_spread([1.0, 3.0]) == (2.0, 1.0)
    # learning curves: one line per run with a validation history, Table 1 order, steps ascending
    curves = tables.split("## MQAR validation accuracy % by step, per run")[1].strip().splitlines()[2:]
    assert curves == ["| run | 9 | 19 |", "|---|---|---|", "| Transformer s0 | 15.0 | 30.0 |",
                      "| Transformer s1 | 20.0 | 40.0 |", "| E s0 | 25.0 | 50.0 |", "| E s1 | 30.0 | 60.0 |"]
    assert (out / "mqar_learning_curves.png").read_bytes()[:4] == b"\x89PNG"


def test_report_pools_stores_and_takes_table9_speed_from_head_ratio_bench(tmp_path):
    import mlflow

    from arch_lab import report

    stores = [f"sqlite:///{tmp_path}/seed{seed}.db" for seed in (0, 1)]
    for seed, uri in enumerate(stores):  # one store per parallel run, as experiments/roadmap/run_study.sh keeps them
        mlflow.set_tracking_uri(uri)
        mlflow.set_experiment("roadmap")
        with mlflow.start_run(tags={"model": "mamba_small", "task": "mqar", "seed": str(seed)}):
            mlflow.log_metrics({"recall/mqar_acc": 0.1 + 0.2 * seed, "train/steps": 800 - 100 * seed})
            mlflow.log_params({"optim.lr": (0.001, 0.0005)[seed]})
            mlflow.log_metric("val/mqar_acc", 0.1 + 0.2 * seed, step=199)
        with mlflow.start_run(tags={"model": "roadmap_b_small", "sweep.study_name": "head_ratio",
                                    "params.attn_to_ssm": "1:1.18"}):
            mlflow.log_params({"model.n_heads": 2})
            mlflow.log_metrics({"recall/mqar_acc": 0.5 + 0.1 * seed, "throughput/decode_tok_s": 99.0,
                                "cache/mb_16k": 9.0, "val/loss": math.log(4.0 + 2 * seed)})
    bench = f"sqlite:///{tmp_path}/bench.db"
    mlflow.set_tracking_uri(bench)
    mlflow.set_experiment("arch_lab")
    with mlflow.start_run(tags={"model": "mamba_300m", "study": "performance"}):
        mlflow.log_metrics({"bench/decode_tok_s": 1000.0, "bench/cache_mb_16k": 3.6})
    with mlflow.start_run(tags={"model": "mamba_300m", "study": "performance"}):  # benched again later: supersedes
        mlflow.log_metrics({"bench/decode_tok_s": 4000.0, "bench/cache_mb_16k": 3.6})
    with mlflow.start_run(tags={"model": "mamba_300m", "study": "performance"}):  # newest, but timed training only
        mlflow.log_metrics({"bench/train_tok_s": 9.0, "bench/cache_mb_16k": 3.6})
    with mlflow.start_run(tags={"model": "transformer_300m", "study": "performance"}):
        mlflow.log_metrics({"bench/decode_tok_s": 2000.0, "bench/cache_mb_16k": 1610.6})
        mlflow.log_params({"compile_decode": True})
    with mlflow.start_run(tags={"model": "transformer_300m", "study": "performance"}):  # newer, but eager
        mlflow.log_metrics({"bench/decode_tok_s": 1500.0, "bench/cache_mb_16k": 1610.6})
        mlflow.log_params({"compile_decode": False})
    with mlflow.start_run(tags={"model": "roadmap_b_300m", "study": "head_ratio", "n_heads": "4"}):
        mlflow.log_metrics({"bench/decode_tok_s": 2500.0, "bench/cache_mb_16k": 200.0})
    out = tmp_path / "report"
    assert report.main(["--tracking-uri", *stores, "--experiment", "roadmap", "--bench-uri", bench,
                        "--out", str(out)]) == 0
    lines = (out / "tables.md").read_text().splitlines()
    mamba = next(line for line in lines if line.startswith("| Mamba"))
    assert "| 20.0 ± 10.0 |" in mamba and mamba.endswith("| 2 | 700–800 / – |")  # both stores' seeds pooled
    assert "| 3.6 |" in mamba  # cache from the Table 1 bench run, not the head-ratio one
    # the newest bench run of the row, not a mean with the older one; the Transformer's compiled run, not its newer
    # eager one
    assert "| 4000 (2.00×) |" in mamba
    assert "Decode tok/s timed with the compiled step: Transformer; the eager step: Mamba." in lines
    two_heads = next(line for line in lines if line.startswith("| 2 |"))
    # recall pooled over both stores; speed/cache from the bench run at the paper's 4 heads (second row)
    # answer perplexity exp(val/loss) (4 and 6) and the seed count pooled too
    # runs that differ in learning rate (a probe) are named with it in the learning-curve table
    assert "| Mamba s0 lr 0.001 | 10.0 |" in lines and "| Mamba s1 lr 0.0005 | 30.0 |" in lines
    assert two_heads.startswith("| 2 | 1:1.18 | 55.0 ± 5.0 | 5.0 ± 1.0 | 2 | 2500 | 200.000 | 1:8.48 |")
    # a mistyped store or experiment is named, and no empty store is left behind
    with pytest.raises(SystemExit, match=r"^--bench-uri sqlite:///.*typo\.db: no MLflow store there"):
        report.main(["--tracking-uri", *stores, "--experiment", "roadmap", "--bench-uri",
                     f"sqlite:///{tmp_path}/typo.db"])
    assert not (tmp_path / "typo.db").exists()
    with pytest.raises(SystemExit, match=r"bench\.db: no experiment 'roadmap' in this store \(it holds \["):
        report.main(["--tracking-uri", bench, "--experiment", "roadmap", "--out", str(out)])
    # the default experiment is the lab's (logger.experiment_name), where `python -m arch_lab` logs
    with pytest.raises(SystemExit, match=r"seed0\.db: no experiment 'arch_lab' in this store \(it holds \["):
        report.main(["--tracking-uri", stores[0], "--out", str(out)])


def test_report_takes_a_runs_task_from_its_data_tag(tmp_path):
    """Runs of `python -m arch_lab` carry data=mqar|text; without a task tag they count in their own task's tables
    only (not in both)."""
    import mlflow

    from arch_lab import report

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("arch_lab")
    for data, loss in (("mqar", 1.0), ("text", 4.0)):
        with mlflow.start_run(tags={"model": "transformer_tiny", "data": data}):
            mlflow.log_metrics({"val/loss": loss})
    with mlflow.start_run(tags={"model": "mamba_tiny", "data": "text", "task": "mqar"}):  # task wins over data
        mlflow.log_metrics({"val/loss": 2.0})
    out = tmp_path / "report"
    assert report.main(["--tracking-uri", uri, "--out", str(out)]) == 0
    rows = [line for line in (out / "tables.md").read_text().splitlines() if line.startswith("| Transformer")]
    assert rows[1].startswith("| Transformer (Llama) | 1.00 | 4.000 |")  # MQAR val loss, text val loss
    mamba = [line for line in (out / "tables.md").read_text().splitlines() if line.startswith("| Mamba")]
    assert mamba[1].startswith("| Mamba | 2.00 | – |")


@pytest.fixture
def small_store(tmp_path) -> str:
    """One finished run in the lab's experiment."""
    import mlflow

    uri = f"sqlite:///{tmp_path}/mlruns.db"
    mlflow.set_tracking_uri(uri)
    mlflow.set_experiment("arch_lab")
    with mlflow.start_run(tags={"model": "transformer_tiny", "data": "mqar"}):
        mlflow.log_metrics({"val/loss": 1.0})
    return uri


def test_report_names_an_out_folder_it_cannot_write(tmp_path, small_store):
    """--out under a file (or /proc): one line naming --out, not a FileNotFoundError traceback."""
    from arch_lab import report

    (tmp_path / "notes.txt").write_text("a file, not a folder")
    out = tmp_path / "notes.txt" / "report"
    with pytest.raises(SystemExit, match=rf"^--out {out}: cannot write the report there \(Not a directory: "):
        report.main(["--tracking-uri", small_store, "--out", str(out)])


@pytest.mark.parametrize("content, why", [("garbage", "file is not a database"), ("", "an empty database")])
@pytest.mark.parametrize("flag", ["--tracking-uri", "--bench-uri"])
def test_report_names_a_file_that_is_not_an_mlflow_store_and_leaves_it_as_it_was(tmp_path, small_store, flag,
                                                                                 content, why):
    """sqlalchemy's DatabaseError for a file that is not a database; MLflow's tables written into an empty one."""
    from arch_lab import report

    bad = tmp_path / "bad.db"
    bad.write_text(content)
    stores = {"--tracking-uri": small_store, "--bench-uri": small_store, flag: f"sqlite:///{bad}"}
    with pytest.raises(SystemExit, match=rf"^{flag} sqlite:///.*bad\.db: .*bad\.db is not an MLflow SQLite "
                                         rf"store \({why}\)$"):
        report.main([arg for item in stores.items() for arg in item] + ["--out", str(tmp_path / "report")])
    assert bad.read_text() == content and not (tmp_path / "report").exists()


@pytest.fixture
def moved_bpe_checkpoint(tmp_path) -> Path:
    """A BPE run's checkpoint whose stored tokenizer path is gone (the run folder was moved to moved/): the
    tokenizer.json sits in the run folder, as `python -m arch_lab` writes it."""
    from arch_lab.data.tokenizers import BPETokenizer
    from components.presets import preset

    tokenizer = BPETokenizer.train(iter(["To be, or not to be, that is the question. " * 20]), vocab_size=280)
    run = tmp_path / "moved"
    tokenizer.save(run / "tokenizer.json")
    model = HybridLM(preset("transformer", "tiny", vocab_size=288))
    ckpt = run / "checkpoints" / "last.ckpt"
    ckpt.parent.mkdir()
    torch.save({"hyper_parameters": {"model_cfg": model.cfg.to_dict(),
                                     "tokenizer": {"kind": "bpe", "path": str(tmp_path / "run" / "tokenizer.json")}},
                "state_dict": {f"model.{k}": v for k, v in model.state_dict().items()}}, ckpt)
    return ckpt


def _expected_bpe_output(checkpoint: Path, tokenizer_json: Path, prompt: str, new_tokens: int) -> str:
    """What generate prints for `prompt`: the checkpoint's weights, loaded here, decoded greedily and detokenized
    with the given tokenizer.json."""
    from arch_lab.data.tokenizers import BPETokenizer
    from components.config import ModelConfig

    ckpt = torch.load(checkpoint, weights_only=True)
    model = HybridLM(ModelConfig.from_dict(ckpt["hyper_parameters"]["model_cfg"]))
    model.load_state_dict({k.removeprefix("model."): v for k, v in ckpt["state_dict"].items()})
    tokenizer = BPETokenizer.load(tokenizer_json)
    tokens = Generator(model.eval()).generate([tokenizer.encode(prompt)], new_tokens, eos_id=tokenizer.eos_id,
                                              vocab_limit=tokenizer.vocab_size).tokens[0]
    return f"=== {prompt}\n{tokenizer.decode(tokens)}\n"


def test_generate_finds_a_moved_bpe_runs_tokenizer_in_its_run_folder(moved_bpe_checkpoint, capsys):
    assert generate_main([str(moved_bpe_checkpoint), "--prompt", "To be", "--max-new-tokens", "4",
                          "--device", "cpu"]) == 0
    run = moved_bpe_checkpoint.parents[1]  # the run folder's tokenizer, not the byte one or another run's
    assert capsys.readouterr().out == _expected_bpe_output(moved_bpe_checkpoint, run / "tokenizer.json", "To be", 4)


def test_generate_takes_a_bpe_tokenizer_from_the_option_or_names_it(moved_bpe_checkpoint, tmp_path, capsys):
    elsewhere = tmp_path / "elsewhere.json"
    (moved_bpe_checkpoint.parents[1] / "tokenizer.json").rename(elsewhere)
    with pytest.raises(SystemExit) as stop:
        generate_main([str(moved_bpe_checkpoint), "--prompt", "To be", "--device", "cpu"])
    assert stop.value.code == 2
    assert (f"error: the checkpoint's BPE tokenizer is neither at {tmp_path / 'run' / 'tokenizer.json'} nor at "
            f"{tmp_path / 'moved' / 'tokenizer.json'}: give its tokenizer.json with --tokenizer PATH"
            in capsys.readouterr().err)
    assert generate_main([str(moved_bpe_checkpoint), "--prompt", "To be", "--max-new-tokens", "4", "--device", "cpu",
                          "--tokenizer", str(elsewhere)]) == 0
    assert capsys.readouterr().out == _expected_bpe_output(moved_bpe_checkpoint, elsewhere, "To be", 4)
    with pytest.raises(SystemExit):
        generate_main([str(moved_bpe_checkpoint), "--ids", "3", "--tokenizer", str(tmp_path / "typo.json")])
    assert f"error: --tokenizer: no such file {tmp_path / 'typo.json'}" in capsys.readouterr().err


def test_generate_names_a_file_that_is_not_a_checkpoint(tmp_path, capsys):
    torch.save({"weight": torch.zeros(2)}, tmp_path / "weights.pt")
    for path, message in ((REPO / "README.md", "is not a checkpoint (torch cannot load it)"),
                          (tmp_path / "weights.pt", "is not a checkpoint written by `python -m arch_lab` "
                                                    "(no hyper_parameters.model_cfg or state_dict)")):
        with pytest.raises(SystemExit) as stop:
            generate_main([str(path), "--ids", "3"])
        assert stop.value.code == 2 and f"error: checkpoint: {path} {message}" in capsys.readouterr().err


@pytest.mark.filterwarnings("ignore:No artists with labels:UserWarning")  # the plot of a run with no losses
def test_attention_maps_are_plotted_only_with_the_analysis(text_checkpoint, tmp_path, monkeypatch):
    """eval.analysis.enabled=false (as the fixture's run) skips the maps; with the analysis on, they are drawn."""
    import mlflow

    from arch_lab.reporting import log_run_plots, plot_training_curves
    from components.presets import preset

    curves = text_checkpoint.parents[1] / "plots" / "training_curves.png"
    # a PNG of the figure's size: 6 x 4 inches at 120 dpi (width and height from its IHDR chunk)
    assert curves.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    assert struct.unpack(">II", curves.read_bytes()[16:24]) == (720, 480)
    # it draws the losses the run logged: redrawn from the run's MLflow history it is the same image
    mlflow.set_tracking_uri(f"sqlite:///{text_checkpoint.parents[2]}/mlruns.db")
    (trained,) = mlflow.search_runs(experiment_names=["arch_lab"], output_format="list")
    assert _same_image(curves, plot_training_curves(trained.info.run_id, tmp_path / "redrawn.png"))
    assert not list((text_checkpoint.parents[1] / "plots").glob("*_map_layer*.png"))

    class Data:
        def val_dataloader(self):
            return [{"input_ids": torch.randint(0, 64, (2, 16))}]

    monkeypatch.chdir(tmp_path)
    mlflow.set_tracking_uri(f"sqlite:///{tmp_path}/mlruns.db")
    mlflow.set_experiment("plots")  # not the experiment id an earlier test left active in its own store
    model = HybridLM(preset("transformer", "tiny", vocab_size=64)).eval()
    with mlflow.start_run() as empty:  # no losses logged: axes and labels only
        assert not _same_image(curves, plot_training_curves(empty.info.run_id, tmp_path / "empty.png"))
    with mlflow.start_run() as run:
        mlflow.log_metric("train/loss", 3.0, step=0)
        plotted = {maps: [p.name for p in log_run_plots(run.info.run_id, model, Data(), {}, {}, tmp_path / str(maps),
                                                        attention_maps=maps)]
                   for maps in (False, True)}
    assert plotted[False] == ["training_curves.png"]
    assert plotted[True][0] == "training_curves.png" and "attention_map_layer0.png" in plotted[True]
