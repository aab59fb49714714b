"""State_dicts nested in training checkpoints (issue 11 item 4): found under the usual keys or ``--state-key``,
wrapper prefixes stripped, extra and missing keys named in one warning, missing parameters refused."""

from __future__ import annotations

import warnings
from pathlib import Path

import pytest
import torch
from cli_fixtures import cli
from factories import lstm_tagger, seeded

import modscope
from modscope.errors import ModelLoadError, ModscopeWarning

FACTORY = "factories:lstm_tagger"


def _training_checkpoint(layout: str, state: dict[str, torch.Tensor]) -> dict:
    optimizer = {"state": {}, "param_groups": [{"lr": 0.1, "params": [0, 1]}]}
    if layout == "lightning":  # a LightningModule holding the network as self.model
        return {"epoch": 3, "global_step": 120, "state_dict": {f"model.{k}": v for k, v in state.items()},
                "optimizer_states": [optimizer]}
    return {"epoch": 3, layout: state, "optimizer_state_dict": optimizer, "loss": torch.tensor(0.25)}


def _check_same(model: modscope.Model, net: torch.nn.Module) -> None:
    ids = torch.randint(0, 10, (2, 5))
    with torch.no_grad():
        assert torch.equal(model.module(ids), net(ids))


@pytest.mark.parametrize("layout", ["model_state", "state_dict", "model", "model_state_dict", "lightning"])
def test_a_nested_state_dict_is_found_and_loaded(layout: str, tmp_path: Path) -> None:
    net = seeded(lstm_tagger).eval()
    path = tmp_path / "ckpt.pt"
    torch.save(_training_checkpoint(layout, net.state_dict()), path)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModscopeWarning)  # an exact match warns of nothing
        model = modscope.load(path, factory=FACTORY)
    _check_same(model, net)
    assert {w.name for w in model.weights} >= {"lstm.weight_ih_l0", "lstm.weight_hh_l0", "head.weight", "embed.weight"}


def test_state_key_names_the_key(tmp_path: Path) -> None:
    net = seeded(lstm_tagger).eval()
    path = tmp_path / "ckpt.pt"
    torch.save({"ema": {"weights": net.state_dict()}, "model": {k: torch.zeros_like(v) for k, v in net.state_dict().items()}}, path)
    _check_same(modscope.load(path, factory=FACTORY, state_key="ema/weights"), net)
    with pytest.raises(ModelLoadError, match="has no key 'nope'"):
        modscope.load(path, factory=FACTORY, state_key="nope")
    # the command line takes it too
    assert cli("inspect", path, "--factory", FACTORY, "--state-key", "ema/weights", "--json") == 0


def test_extra_and_missing_buffers_are_named_in_one_warning(tmp_path: Path) -> None:
    net = seeded(lstm_tagger).eval()
    state = dict(net.state_dict())
    state["teacher.weight"] = torch.zeros(2)
    path = tmp_path / "ckpt.pt"
    torch.save({"model_state_dict": state}, path)
    with pytest.warns(ModscopeWarning, match=r"1 key\(s\) the module does not have were ignored \(teacher\.weight\)") as record:
        model = modscope.load(path, factory=FACTORY)
    assert len([r for r in record if issubclass(r.category, ModscopeWarning)]) == 1
    _check_same(model, net)


def test_a_missing_parameter_is_refused(tmp_path: Path) -> None:
    state = dict(seeded(lstm_tagger).state_dict())
    del state["lstm.weight_hh_l0"]
    path = tmp_path / "ckpt.pt"
    torch.save({"state_dict": state}, path)
    with pytest.raises(ModelLoadError, match=r"1 missing key\(s\) \(lstm\.weight_hh_l0\)"):
        modscope.load(path, factory=FACTORY)


def test_a_checkpoint_without_a_state_dict_suggests_state_key(tmp_path: Path) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({"epoch": 1, "weights_ema": {"a": 1}}, path)
    with pytest.raises(ModelLoadError, match="--state-key"):
        modscope.load(path, factory=FACTORY)


def test_fit_and_export_a_nested_checkpoint(tmp_path: Path) -> None:
    """The run records --state-key (data, not code) and export reuses it; the factory must be given again."""
    from cli_fixtures import FIT_FLAGS, make_toy

    toy = make_toy(tmp_path / "toy")
    ckpt = tmp_path / "train.pt"
    torch.save({"epoch": 9, "ema": {"net": torch.load(toy.state_dict, weights_only=True)}}, ckpt)
    run = tmp_path / "run"
    flags = ["--factory", "cli_fixtures:toy_net"]
    assert cli("fit", ckpt, *flags, "--state-key", "ema/net", "--task", f"a={toy.a}", "--out", run, *FIT_FLAGS) == 0
    assert cli("export", run, "--remove", "a", "-o", tmp_path / "ablated.pt", *flags) == 0
    assert set(torch.load(tmp_path / "ablated.pt", weights_only=True)) == set(torch.load(toy.state_dict, weights_only=True))
