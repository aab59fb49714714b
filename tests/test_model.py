import pytest
import torch
from torch import nn

import modscope
from modscope.errors import InvalidParameterError


def test_weight_registry_kinds_and_layers():
    net = nn.Sequential(nn.Embedding(10, 4), nn.Linear(4, 4), nn.LayerNorm(4), nn.BatchNorm1d(4))
    kinds = {w.name: (w.kind, w.layer) for w in modscope.load(net).weights}
    assert kinds["0.weight"] == ("embedding", "0")
    assert kinds["1.weight"] == ("weight", "1") and kinds["1.bias"] == ("bias", "1")
    assert kinds["2.weight"] == ("norm", "2") and kinds["3.bias"] == ("bias", "3")


def test_model_runs_like_the_module_and_checksums_weights(tiny_mlp):
    model = modscope.load(tiny_mlp)
    x = torch.randn(2, 4)
    torch.testing.assert_close(model(x), tiny_mlp(x))
    assert len(model.weights) == 4 and len(model.checksum) == 64
    assert modscope.load(nn.Linear(4, 8)).checksum != modscope.load(nn.Linear(4, 8)).checksum


def test_frozen_context_restores_modes_after_errors(tiny_mlp):
    model = modscope.load(tiny_mlp)
    tiny_mlp.train()
    with pytest.raises(RuntimeError):
        with model.frozen() as module:
            assert not module.training
            raise RuntimeError("boom")
    assert all(m.training for m in tiny_mlp.modules())


def test_load_rejects_unknown_objects():
    with pytest.raises(InvalidParameterError, match="cannot load"):
        modscope.load(42)
    with pytest.raises(InvalidParameterError, match="do not apply"):
        modscope.load(nn.Linear(2, 2), trust=True)


def test_evaluate_removes_exactly_the_masks_weights(tiny_mlp):
    model = modscope.load(tiny_mlp)
    x = torch.randn(16, 4)
    task = modscope.Task("t", x, tiny_mlp(x).argmax(1))
    keep_all = {w.name: torch.ones(w.shape, dtype=torch.bool) for w in model.weights if w.kind == "weight"}
    assert modscope.evaluate(model, task, keep_all) == 1.0
    assert modscope.evaluate(model, task, {k: ~v for k, v in keep_all.items()}, invert=True) == 1.0
    from modscope.evaluation import masked_parameters

    params = masked_parameters(model, keep_all, invert=True)
    assert all(torch.count_nonzero(params[n]) == 0 for n in keep_all)
    assert torch.equal(params["0.bias"], tiny_mlp[0].bias.detach()), "weights outside the mask stay"
