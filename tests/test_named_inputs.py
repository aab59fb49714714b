"""Named inputs: a Task given a mapping passes its arrays to the model as keyword arguments."""

import warnings

import numpy as np
import pytest
import torch
from torch import nn

import modscope
from modscope.errors import DataError, ModscopeWarning
from modscope.evaluation import predict


class KeywordNet(nn.Module):
    """A tiny token classifier whose forward takes only keyword arguments, like transformers models."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(8, 6)
        self.head = nn.Linear(6, 2)

    def forward(self, *, input_ids: torch.Tensor, attention_mask: torch.Tensor) -> torch.Tensor:
        h = self.embed(input_ids) * attention_mask.unsqueeze(-1)
        return self.head(h.sum(1) / attention_mask.sum(1, keepdim=True))


def _tasks() -> list[modscope.Task]:
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 8, (32, 5), generator=gen)
    mask = torch.ones(32, 5)
    mask[:, 4] = 0
    return [modscope.Task(name, {"input_ids": ids, "attention_mask": mask}, (ids[:, col] % 2)) for name, col in (("a", 0), ("b", 1))]


def _train(vectorize: str) -> modscope.MaskSet:
    torch.manual_seed(0)
    model = KeywordNet()
    config = modscope.MaskConfig(n_steps=4, batch_size=8, n_samples=2, seed=3, vectorize=vectorize)
    return modscope.train_masks(model, _tasks(), config)


def test_named_inputs_train_under_vmap_and_equal_the_loop():
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModscopeWarning)
        vmapped = _train("vmap")
    looped = _train("loop")
    for name in ("a", "b"):
        assert list(vmapped[name]) == list(looped[name])
        for w in vmapped[name]:
            assert torch.equal(vmapped[name][w], looped[name][w]), (name, w)


def test_named_inputs_evaluate_and_predict():
    torch.manual_seed(0)
    model = KeywordNet()
    task = _tasks()[0]
    out = predict(model, task)
    assert out.shape == (32, 2)
    assert 0.0 <= modscope.evaluate(model, task) <= 1.0
    assert torch.allclose(out, model(input_ids=task.inputs[0], attention_mask=task.inputs[1]))


@pytest.mark.parametrize(
    "x, match",
    [
        ({}, "at least one entry"),
        ({"input_ids": np.zeros((3, 2)), "attention_mask": np.zeros((4, 2))}, "different lengths"),
        ({"input_ids": np.array([["a"], ["b"], ["c"]], dtype=object)}, "input_ids is not a numeric array"),
    ],
)
def test_bad_named_inputs_raise_one_sentence(x, match):
    with pytest.raises(DataError, match=match):
        modscope.Task("t", x, np.zeros(3))
