"""compile=true: the model is compiled in place (nn.Module.compile), so training sees the same losses and
gradients as eager, and checkpoints keep the HybridLM's parameter names, once each."""
from __future__ import annotations

import pytest
import torch

from arch_lab.lit_module import LitHybridLM
from components.presets import preset


@pytest.mark.slow
def test_compiled_training_module_matches_eager_and_keeps_parameter_names():
    model_cfg = preset("transformer", "tiny").to_dict()
    optim_cfg = {"lr": 1e-3}
    torch.manual_seed(0)
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
    assert compiled.model._compiled_call_impl is not None  # the compiled path really ran
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
