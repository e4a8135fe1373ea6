"""GPU parity of the whole model: the fast path (mamba-ssm / causal-conv1d kernels, FlexAttention, SDPA, CUDA
graphs) against the plain-PyTorch reference path. Runs on the GPU machine; skipped on CPU."""
import importlib

import pytest
import torch

from components import HybridLM, preset
from components.generation import Generator
from components.ops.attention import attention_reference, allowed_keys, sequence_attention
from components.ops.backend import describe_backends

pytestmark = [pytest.mark.gpu, pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

GPU_SIZED = dict(vocab_size=1024, d_model=256, n_layers=4, qk_head_dim=64, ffn_dim=512, d_state=16, ssm_head_dim=32,
                 max_seq_len=2048)


def rel_err(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a.float() - b.float()).norm() / b.float().norm().clamp_min(1e-12)).item()


def gpu_model(name: str, window: int) -> HybridLM:
    """A tiny preset at GPU-friendly widths, on the GPU (row E with 8 meta tokens)."""
    cfg = preset(name, "tiny", **GPU_SIZED, window=window, n_meta_tokens=8 if name == "roadmap_e" else 0,
                 param_budget=None)
    return HybridLM(cfg).cuda()


def _loss_and_grads(model, ids, backend, scan_kernel="mamba_ssm"):
    model.set_backend(backend, scan_kernel)
    model.zero_grad(set_to_none=True)
    with torch.autocast("cuda", dtype=torch.bfloat16):
        loss = model.loss(ids, torch.roll(ids, -1, dims=1))
    loss.backward()
    return loss.detach(), {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("name,scan_kernel", [
    *[(name, "mamba_ssm") for name in ("transformer", "mamba", "mamba2", "roadmap_a", "roadmap_c", "roadmap_e")],
    ("mamba", "triton"), ("roadmap_e", "triton")])
def test_model_loss_and_gradients_fast_vs_reference(name, scan_kernel):
    pytest.importorskip("mamba_ssm")
    torch.manual_seed(0)
    model = gpu_model(name, window=64)
    ids = torch.randint(0, model.cfg.vocab_size, (4, 512), device="cuda")
    loss_fast, grads_fast = _loss_and_grads(model, ids, "kernel", scan_kernel)
    loss_ref, grads_ref = _loss_and_grads(model, ids, "reference")
    assert abs(loss_fast.item() - loss_ref.item()) / loss_ref.item() < 1e-2
    assert grads_fast.keys() == grads_ref.keys()
    worst = max(((rel_err(grads_fast[n], grads_ref[n]), n) for n in grads_ref), key=lambda t: t[0])
    assert worst[0] < 5e-2, f"gradient of {worst[1]} differs: rel err {worst[0]:.3g}"


@pytest.mark.parametrize("name,scan_kernel", [("mamba", "mamba_ssm"), ("mamba2", "mamba_ssm"),
                                              ("roadmap_e", "mamba_ssm"), ("roadmap_e", "triton")])
def test_compiled_training_forward_has_no_graph_breaks(name, scan_kernel):
    """With the scan kernels (selective scan, SSD) as custom ops, torch.compile captures the whole training loss in
    one graph (breaks split it, and the frames between them recompiled per layer)."""
    pytest.importorskip("mamba_ssm")
    torch._dynamo.reset()
    model = gpu_model(name, window=64)
    model.set_backend("kernel", scan_kernel)
    describe_backends()  # as HybridLM.compile does: the kernel imports resolved before tracing (else, when this test
    # runs first in its process, each traced import is a graph break)
    ids = torch.randint(0, model.cfg.vocab_size, (2, 256), device="cuda")
    with torch.autocast("cuda", dtype=torch.bfloat16):
        explained = torch._dynamo.explain(model.loss)(ids, torch.roll(ids, -1, dims=1))
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1


@pytest.mark.parametrize("name", ["mamba", "roadmap_e"])
def test_chunked_prefill_runs_the_triton_scan_and_matches_one_chunk(name, monkeypatch):
    """Prefill chunks after the first start from the SSM state: mamba_ssm's scan takes none, so with
    scan_kernel=mamba_ssm they run on the Triton scan (not the reference), and the chunked prefill gives the
    one-chunk prefill's tokens and logits."""
    pytest.importorskip("mamba_ssm")
    scan_module = importlib.import_module("components.ops.selective_scan")  # the package exports the function

    original, calls = scan_module.triton_scan_kernel, []

    def counting(*args):
        calls.append(args[8] is not None)  # initial_state
        return original(*args)

    monkeypatch.setattr(scan_module, "triton_scan_kernel", counting)
    torch.manual_seed(0)
    model = gpu_model(name, window=32).eval()
    model.set_backend("kernel", "mamba_ssm")  # triton (the default) runs every chunk, the first one too
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,)).tolist() for n in (70, 45, 9)]
    chunked = Generator(model, cuda_graph=False).generate(prompts, 8, keep_logits=True, prefill_chunk=16)
    assert calls and all(calls), "prefill chunks after the first ran the Triton scan with an initial state"
    whole = Generator(model, cuda_graph=False).generate(prompts, 8, keep_logits=True)
    assert chunked.tokens == whole.tokens
    for c, w in zip(chunked.step_logits, whole.step_logits):
        assert rel_err(c, w) < 1e-4


# the last three: heads FlexAttention does not take (value heads of 8 or 26 in a tiny model, 256 in a wide one) use
# SDPA
@pytest.mark.parametrize("window,num_meta,dqk,dv", [(128, 0, 64, 128), (128, 16, 64, 128), (1024, 128, 64, 128),
                                                    (128, 16, 16, 8), (128, 16, 16, 26), (128, 16, 64, 256)])
def test_flex_attention_matches_reference_with_gradients(window, num_meta, dqk, dv):
    torch.manual_seed(0)
    b, hq, hkv, length = 2, 8, 2, 1024 + num_meta
    q = torch.randn(b, hq, length, dqk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    k = torch.randn(b, hkv, length, dqk, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    v = torch.randn(b, hkv, length, dv, device="cuda", dtype=torch.bfloat16, requires_grad=True)
    pos = torch.arange(length, device="cuda").expand(b, -1)
    out = sequence_attention(q, k, v, pos, window, num_meta, backend="kernel")
    ref = attention_reference(q.float(), k.float(), v.float(), allowed_keys(pos, pos, window, num_meta))
    assert rel_err(out, ref) < 1e-2
    grad = torch.randn_like(ref)
    g_fast = torch.autograd.grad(out, (q, k, v), grad.to(out.dtype))
    g_ref = torch.autograd.grad(ref, (q, k, v), grad)
    for fast, slow in zip(g_fast, g_ref):
        assert rel_err(fast, slow) < 2e-2


@pytest.mark.parametrize("name", ["transformer", "mamba", "roadmap_e"])
def test_cuda_graph_decoding_matches_eager_and_full_forward(name):
    pytest.importorskip("mamba_ssm")
    torch.manual_seed(0)
    model = gpu_model(name, window=32).eval()
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,)).tolist() for n in (40, 25, 7)]
    graphed = Generator(model, cuda_graph=True).generate(prompts, 24, keep_logits=True)
    eager = Generator(model, cuda_graph=False).generate(prompts, 24, keep_logits=True)
    assert graphed.tokens == eager.tokens
    for g, e in zip(graphed.step_logits, eager.step_logits):
        assert rel_err(g, e) < 1e-4
    with torch.no_grad():  # the last row against the full forward of its own tokens
        full = model(torch.tensor([prompts[2] + eager.tokens[2][:-1]], device="cuda"))[0, len(prompts[2]) - 1:]
    assert rel_err(torch.stack([s[2] for s in eager.step_logits]), full.float().cpu()) < 1e-3


@pytest.mark.parametrize("prompt_len, new_tokens", [(1, 1), (1, 0), (2, 1), (1, 2)])
def test_cuda_graph_decoding_of_requests_shorter_than_its_capture(prompt_len, new_tokens):
    """Capturing the step runs 3 steps on the state: a request of fewer tokens still gets the eager result."""
    pytest.importorskip("mamba_ssm")
    torch.manual_seed(0)
    model = gpu_model("roadmap_e", window=32).eval()
    prompts = [torch.randint(0, model.cfg.vocab_size, (prompt_len,)).tolist()]
    graphed = Generator(model, cuda_graph=True).generate(prompts, new_tokens)
    assert graphed.tokens == Generator(model, cuda_graph=False).generate(prompts, new_tokens).tokens
    assert len(graphed.tokens[0]) == new_tokens


@pytest.mark.parametrize("name", ["mamba", "mamba2", "roadmap_e"])
def test_compiled_cuda_graph_decoding_matches_eager(name):
    """compile_decode: the torch.compile'd step inside the CUDA graph gives the eager step's tokens and logits."""
    pytest.importorskip("mamba_ssm")
    torch._dynamo.reset()
    torch.manual_seed(0)
    model = gpu_model(name, window=32).eval()
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,)).tolist() for n in (40, 25, 7)]
    compiled = Generator(model, cuda_graph=True, compile=True).generate(prompts, 24, keep_logits=True)
    eager = Generator(model, cuda_graph=False).generate(prompts, 24, keep_logits=True)
    assert compiled.tokens == eager.tokens
    for c, e in zip(compiled.step_logits, eager.step_logits):
        assert rel_err(c, e) < 1e-3


@pytest.mark.parametrize("compile", [False, True], ids=["eager", "compiled"])
def test_decode_branches_on_two_streams_match_one_stream(compile, monkeypatch):
    """Row E's hybrid layers with attention and the fused Mamba-1 step on two CUDA streams (the default on GPUs)
    give, inside the CUDA graph, the tokens and logits of the same decode with the branches one after the other."""
    import components.hybrid_mixer as mixer_module

    calls = []

    def counted(*args):
        calls.append(len(args))
        return op(*args)

    op = mixer_module.attention_beside_mamba1_step
    monkeypatch.setattr(mixer_module, "attention_beside_mamba1_step", counted)
    torch.manual_seed(0)
    model = gpu_model("roadmap_e", window=32).eval()
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,)).tolist() for n in (40, 25, 7)]
    runs = {}
    for mode in ("sequential", "concurrent"):
        torch._dynamo.reset()
        model.set_backend("auto", "triton", mode)
        runs[mode] = Generator(model, cuda_graph=True, compile=compile).generate(prompts, 24, keep_logits=True)
        assert bool(calls) == (mode == "concurrent")  # traced once when compiled, else every step's layers
    assert runs["concurrent"].tokens == runs["sequential"].tokens
    for c, s in zip(runs["concurrent"].step_logits, runs["sequential"].step_logits):
        assert rel_err(c, s) < 1e-4


@pytest.mark.parametrize("name", ["mamba", "roadmap_e"])
def test_programmatic_dependent_launch_decodes_as_without(name):
    """pdl=true (the compiled decode step's kernels start while the kernel before them drains, inside the CUDA
    graph) gives the tokens and logits of pdl=false."""
    if torch.cuda.get_device_capability()[0] < 9:
        pytest.skip("programmatic dependent launch needs a Hopper or later GPU")
    torch.manual_seed(0)
    model = gpu_model(name, window=32).eval()
    prompts = [torch.randint(0, model.cfg.vocab_size, (n,)).tolist() for n in (40, 25, 7)]
    runs = {}
    for pdl in (False, True):
        torch._dynamo.reset()
        runs[pdl] = Generator(model, cuda_graph=True, compile=True, pdl=pdl).generate(prompts, 24, keep_logits=True)
    assert runs[True].tokens == runs[False].tokens
    for with_pdl, without in zip(runs[True].step_logits, runs[False].step_logits):
        assert rel_err(with_pdl, without) < 1e-4


@pytest.mark.parametrize("name", ["mamba", "mamba2", "roadmap_e"])
def test_compiled_decode_step_has_no_graph_breaks(name):
    """With the decode kernels (conv update, state update) as custom ops, one decode step is one graph."""
    pytest.importorskip("mamba_ssm")
    torch._dynamo.reset()
    model = gpu_model(name, window=32).eval()
    model.set_backend("kernel")
    gen = Generator(model, cuda_graph=False)
    state = gen.new_state(2, 64)
    with torch.no_grad():
        logits = gen.prefill(state, torch.randint(0, model.cfg.vocab_size, (2, 40), device="cuda"))
        explained = torch._dynamo.explain(model.forward_cached)(logits.argmax(-1)[:, None], state)
    assert explained.graph_break_count == 0, [str(r.reason)[:200] for r in explained.break_reasons]
    assert explained.graph_count == 1
