"""compile=true: the model is compiled in place (nn.Module.compile), so training sees the same losses and
gradients as eager, and checkpoints keep the HybridLM's parameter names, once each."""
from __future__ import annotations

import pytest
import torch

from arch_lab.lit_module import LitHybridLM
from components.presets import preset


@pytest.mark.slow
def test_compiled_training_module_matches_eager_and_keeps_parameter_names():
    from torch._dynamo.utils import counters

    model_cfg = preset("transformer", "tiny").to_dict()
    optim_cfg = {"lr": 1e-3}
    torch.manual_seed(0)
    torch._dynamo.reset()
    counters.clear()
    eager = LitHybridLM(model_cfg, optim_cfg, backend="reference")
    compiled = LitHybridLM(model_cfg, optim_cfg, backend="reference", compile=True)
    compiled.load_state_dict(eager.state_dict())
    ids = torch.randint(0, model_cfg["vocab_size"], (2, 24))
    batch = {"input_ids": ids, "labels": ids.roll(-1, dims=1)}

    losses = []
    for module in (eager, compiled):
        loss, _ = module._loss(batch)
        loss.backward()
        losses.append(loss.detach())
    torch.testing.assert_close(losses[1], losses[0], rtol=1e-5, atol=1e-5)
    for (name, p), (_, q) in zip(eager.named_parameters(), compiled.named_parameters()):
        torch.testing.assert_close(q.grad, p.grad, rtol=1e-4, atol=1e-6, msg=name)
    # dynamo traced the model (unique_graphs counts the frames it compiled): the losses above were not both eager
    assert counters["stats"]["unique_graphs"] >= 1
    assert list(compiled.state_dict()) == list(eager.state_dict())
    assert all(key.startswith("model.") for key in compiled.state_dict())


def test_checkpoints_with_the_old_duplicate_weights_still_load():
    model_cfg = preset("transformer", "tiny").to_dict()
    source, target = LitHybridLM(model_cfg, {"lr": 1e-3}), LitHybridLM(model_cfg, {"lr": 1e-3})
    state = source.state_dict()
    checkpoint = {"state_dict": {**state, **{f"_forward.{k.removeprefix('model.')}": v for k, v in state.items()}}}
    target.on_load_checkpoint(checkpoint)
    target.load_state_dict(checkpoint["state_dict"])  # strict, as Lightning resumes
    for (name, p), (_, q) in zip(source.named_parameters(), target.named_parameters()):
        torch.testing.assert_close(q, p, msg=name)


def trace_on_fake_tensors(fn, shapes):
    """make_fx of ``fn`` on fake tensors (requires_grad) of the given (shape, dtype)s: the custom ops called in the
    graph, and the fake values of its outputs."""
    from torch.fx.experimental.proxy_tensor import make_fx

    inputs = [torch.randn(shape, dtype=dtype, requires_grad=True) for shape, dtype in shapes]
    graph = make_fx(fn, tracing_mode="fake")(*inputs)
    ops = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    output = next(node for node in graph.graph.nodes if node.op == "output")
    return ops, [v.meta["val"] for v in torch.utils._pytree.tree_leaves(output.args)]


def test_scan_custom_op_traces_forward_and_backward_with_kernel_shapes_and_no_gpu():
    """torch.compile sees the mamba_ssm scan only through the custom op's fake implementation and its registered
    backward: trace both on fake tensors (the kernel never runs) and check the shapes and dtypes the CUDA kernel
    returns: outputs in u's dtype, a float32 last state, and each gradient in its input's dtype."""
    from components.ops.custom_ops import selective_scan_kernel

    b, d, n, l = 2, 8, 4, 4100  # three of the kernel's 2048-step chunks

    def scan_and_grads(u, delta, A, B, C, D, z, bias):
        y, last = selective_scan_kernel(u, delta, A, B, C, D, z, bias, True, True)
        return y, last, torch.autograd.grad(y.float().sum(), (u, delta, A, B, C, D, z, bias))

    bf16 = torch.bfloat16
    shapes = [((b, d, l), bf16), ((b, d, l), bf16), ((d, n), torch.float32), ((b, n, l), bf16), ((b, n, l), bf16),
              ((d,), torch.float32), ((b, d, l), bf16), ((d,), torch.float32)]
    ops, values = trace_on_fake_tensors(scan_and_grads, shapes)
    assert "arch_lab.selective_scan_fwd.default" in ops and "arch_lab.selective_scan_bwd.default" in ops
    assert [(tuple(v.shape), v.dtype) for v in values] == [((b, d, l), bf16), ((b, d, n), torch.float32), *shapes]


def test_triton_scan_custom_op_traces_forward_and_backward_with_kernel_shapes_and_no_gpu():
    """arch_lab's Triton scan as torch.compile sees it (fake tensors, no GPU, no kernel run): the output stored
    (b, l, d) as the kernel writes it, a float32 last state, and every gradient, the initial state's and the one
    from the last state included, in its input's dtype and shape."""
    from components.ops.custom_ops import triton_scan_kernel

    b, d, n, l = 2, 8, 4, 130  # three of the kernel's 64-step chunks

    def scan_and_grads(u, delta, A, B, C, D, z, bias, initial):
        y, last = triton_scan_kernel(u, delta, A, B, C, D, z, bias, initial, True, True)
        return y, last, torch.autograd.grad(y.float().sum() + last.sum(), (u, delta, A, B, C, D, z, bias, initial))

    bf16, f32 = torch.bfloat16, torch.float32
    shapes = [((b, d, l), bf16), ((b, d, l), bf16), ((d, n), f32), ((b, n, l), bf16), ((b, n, l), bf16), ((d,), f32),
              ((b, d, l), bf16), ((d,), f32), ((b, d, n), f32)]
    ops, values = trace_on_fake_tensors(scan_and_grads, shapes)
    assert "arch_lab.triton_scan_fwd.default" in ops and "arch_lab.triton_scan_bwd.default" in ops
    assert [(tuple(v.shape), v.dtype) for v in values] == [((b, d, l), bf16), ((b, d, n), f32), *shapes]
    assert values[0].stride() == (l * d, 1, d)


def test_ssd_custom_op_traces_forward_and_backward_with_kernel_shapes_and_no_gpu():
    """The Mamba-2 SSD op as torch.compile sees it (fake tensors, no GPU): outputs in x's dtype, a float32 final
    state, and each gradient in its input's dtype (the kernels return the initial state's in x's dtype, which
    autograd casts)."""
    from components.ops.custom_ops import ssd_scan_kernel

    b, l, h, p, g, n = 2, 100, 4, 8, 2, 16

    def scan_and_grads(x, dt, A, B, C, D, z, dt_bias, initial):
        y, final = ssd_scan_kernel(x, dt, A, B, C, 64, D, z, dt_bias, initial, True, True)
        return y, final, torch.autograd.grad(y.float().sum() + final.sum(), (x, dt, A, B, C, D, z, dt_bias, initial))

    bf16, f32 = torch.bfloat16, torch.float32
    shapes = [((b, l, h, p), bf16), ((b, l, h), bf16), ((h,), f32), ((b, l, g, n), bf16), ((b, l, g, n), bf16),
              ((h,), f32), ((b, l, h, p), bf16), ((h,), f32), ((b, h, p, n), f32)]
    ops, values = trace_on_fake_tensors(scan_and_grads, shapes)
    assert "arch_lab.ssd_scan_fwd.default" in ops and "arch_lab.ssd_scan_bwd.default" in ops
    assert [(tuple(v.shape), v.dtype) for v in values] == [((b, l, h, p), bf16), ((b, h, p, n), f32), *shapes]


@pytest.mark.parametrize("channel_last", [False, True])
def test_conv_custom_op_traces_forward_and_backward_in_the_input_layout(channel_last):
    """The causal-conv custom op as torch.compile sees it (fake tensors, no GPU): its output and dx keep the
    input's layout (channel-last for Mamba's transposed projection) and its gradients their inputs' dtypes."""
    from torch.fx.experimental.proxy_tensor import make_fx

    from components.ops.custom_ops import causal_conv1d_fwd

    b, d, l = 2, 16, 40
    x = torch.randn(b, l, d, dtype=torch.bfloat16).transpose(1, 2) if channel_last else \
        torch.randn(b, d, l, dtype=torch.bfloat16)
    x.requires_grad_(True)
    weight, bias = torch.randn(d, 4, requires_grad=True), torch.randn(d, requires_grad=True)

    def conv_and_grads(x, weight, bias):
        y = causal_conv1d_fwd(x, weight, bias, True)
        return y, torch.autograd.grad(y.float().sum(), (x, weight, bias))

    graph = make_fx(conv_and_grads, tracing_mode="fake")(x, weight, bias)
    ops = [str(node.target) for node in graph.graph.nodes if node.op == "call_function"]
    assert "arch_lab.causal_conv1d_fwd.default" in ops and "arch_lab.causal_conv1d_bwd.default" in ops
    output = next(node for node in graph.graph.nodes if node.op == "output")
    y, dx, dweight, dbias = [v.meta["val"] for v in torch.utils._pytree.tree_leaves(output.args)]
    assert y.shape == dx.shape == x.shape and y.stride() == dx.stride() == x.stride()
    assert (y.dtype, dx.dtype, dweight.dtype, dbias.dtype) == (torch.bfloat16, torch.bfloat16, torch.float32,
                                                               torch.float32)


def test_decode_step_custom_ops_trace_as_in_place_state_updates():
    """The decode kernels as torch.compile sees them (fake tensors, no GPU): each returns a new tensor shaped and
    typed like its input x, and updates the conv or SSM state it declares as mutated."""
    from torch._subclasses.functional_tensor import dispatch_functionalize
    from torch.fx.experimental.proxy_tensor import make_fx

    from components.ops.custom_ops import causal_conv1d_update, selective_state_update_kernel

    b, d, n = 2, 16, 4
    bf16 = torch.bfloat16
    inputs = {"x": torch.randn(b, d, dtype=bf16), "conv_state": torch.randn(b, d, 3, dtype=bf16),
              "weight": torch.randn(d, 4), "bias": torch.randn(d), "ssm_state": torch.randn(b, d, n),
              "dt": torch.randn(b, d, dtype=bf16), "A": torch.randn(d, n), "B": torch.randn(b, n),
              "C": torch.randn(b, n), "D": torch.randn(d), "z": torch.randn(b, d, dtype=bf16),
              "dt_bias": torch.randn(d)}

    def step(x, conv_state, weight, bias, ssm_state, dt, A, B, C, D, z, dt_bias):
        xc = causal_conv1d_update(x, conv_state, weight, bias, True)
        return xc, selective_state_update_kernel(ssm_state, xc, dt, A, B, C, D, z, dt_bias, True)

    graph = make_fx(dispatch_functionalize(step), tracing_mode="fake")(*inputs.values())
    # Functionalized, each op becomes a pure call that returns its state's new value; the state it mutates is
    # the input it declares.
    placeholders = [node for node in graph.graph.nodes if node.op == "placeholder"]
    mutated = {str(node.args[0]): [list(inputs)[placeholders.index(base)] for base in node.kwargs["_all_bases"]]
               for node in graph.graph.nodes if "_all_bases" in node.kwargs}
    assert mutated == {"arch_lab.causal_conv1d_update.default": ["conv_state"],
                       "arch_lab.selective_state_update.default": ["ssm_state"]}
    output = next(node for node in graph.graph.nodes if node.op == "output")
    xc, y = [v.meta["val"] for v in torch.utils._pytree.tree_leaves(output.args)]
    assert (xc.shape, xc.dtype, y.shape, y.dtype) == ((b, d), bf16, (b, d), bf16)


@pytest.mark.parametrize("name", ["roadmap_d", "roadmap_e"])
def test_reference_path_compiles_the_training_loss_into_one_graph(name):
    """Cross-layer KV sharing (the KV bus) and meta tokens trace without graph breaks: on the GPU only the kernels
    could split the graph, and those are custom ops (tests/test_model_gpu_parity.py checks the kernel path)."""
    from components import HybridLM

    torch._dynamo.reset()
    model = HybridLM(preset(name, "tiny", window=16, n_meta_tokens=4 if name == "roadmap_e" else 0))
    model.set_backend("reference")
    ids = torch.randint(0, model.cfg.vocab_size, (2, 64))
    explained = torch._dynamo.explain(model.loss)(ids, torch.roll(ids, -1, dims=1))
    assert (explained.graph_count, explained.graph_break_count) == (1, 0), explained.break_reasons
