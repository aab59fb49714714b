import numpy as np
import pytest
import torch

import modscope
from modscope.errors import DataError, InvalidParameterError, ModscopeError


def test_task_reads_arrays_tensors_and_tuples():
    t = modscope.Task("t", np.zeros((5, 3), np.float32), np.arange(5) % 2)
    assert len(t) == 5 and t.inputs[0].dtype == torch.float32 and t.targets.dtype == torch.int64
    multi = modscope.Task("m", (torch.zeros(4, 2), torch.ones(4, 3)), torch.zeros(4, dtype=torch.long))
    assert [x.shape for x in multi.inputs] == [(4, 2), (4, 3)]


def test_task_reads_a_dataset():
    ds = torch.utils.data.TensorDataset(torch.randn(6, 2), torch.arange(6) % 3)
    t = modscope.Task("ds", ds)
    assert len(t) == 6 and t.inputs[0].shape == (6, 2)


@pytest.mark.parametrize(
    "args, kwargs, error, match",
    [
        (("", torch.zeros(2, 2), torch.zeros(2)), {}, InvalidParameterError, "non-empty name"),
        (("t", torch.zeros(0, 2), torch.zeros(0)), {}, DataError, "no examples"),
        (("t", torch.zeros(3, 2), torch.zeros(4)), {}, DataError, "different lengths"),
        (("t", torch.tensor([[float("nan"), 1.0]]), torch.zeros(1)), {}, DataError, "NaN"),
        (("t", torch.zeros(2, 2)), {}, DataError, "no targets"),
        (("t", torch.zeros(2, 2), torch.zeros(2)), {"loss": "hinge"}, InvalidParameterError, "unknown loss"),
        (("t", torch.zeros(2, 2), torch.tensor([0.5, 1.0])), {}, DataError, "integer class targets"),
    ],
)
def test_bad_task_data_raises_one_clear_error(args, kwargs, error, match):
    with pytest.raises(error, match=match) as info:
        modscope.Task(*args, **kwargs)
    assert isinstance(info.value, ModscopeError)


def test_losses_and_metrics():
    logits = torch.tensor([[[2.0, 0.0], [0.0, 2.0]], [[2.0, 0.0], [2.0, 0.0]]])  # (N=2, positions=2, C=2)
    y = torch.tensor([[0, 1], [0, 1]])
    t = modscope.Task("seq", torch.zeros(2, 1), y)
    assert t.compute_metric(logits, y) == 0.5  # an example is correct only if all its positions are
    seq = modscope.Task("seq", torch.zeros(2, 1), torch.tensor([[0, -1], [0, 1]]), loss="seq_ce")
    assert seq.compute_metric(logits, seq.targets) == 0.5  # padding (-1) is ignored
    reg = modscope.Task("reg", torch.zeros(2, 1), torch.zeros(2, 1), loss="mse")
    assert reg.metric_name == "mse" and reg.higher_is_better is False


def test_unknown_task_name_in_a_maskset():
    ms = modscope.MaskSet.from_masks({"a": {"w": torch.ones(2, dtype=torch.bool)}})
    with pytest.raises(InvalidParameterError, match="no mask for task 'b'"):
        ms["b"]


def test_output_selection_errors_are_clear():
    t = modscope.Task("t", torch.zeros(2, 2), torch.zeros(2), output=3)
    with pytest.raises(InvalidParameterError, match="no output 3"):
        t.select_output((torch.zeros(2), torch.zeros(2)))
    t2 = modscope.Task("t2", torch.zeros(2, 2), torch.zeros(2))
    with pytest.raises(InvalidParameterError, match="returns 2 outputs"):
        t2.select_output((torch.zeros(2), torch.zeros(2)))
