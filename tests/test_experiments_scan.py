"""SCAN: the grammar generator and splits against the original files, the LSTM, and the experiment's report."""

from __future__ import annotations

import gzip
import json
import os
from collections import Counter
from pathlib import Path

import pytest
import torch

from modscope.errors import InvalidParameterError
from modscope.experiments import get_experiment, scan, scan_data, scan_model
from modscope.experiments.common import ExperimentOptions

#: the original SCAN files (tasks_*.txt): ../shared/data/scan next to the checkout, or $MODSCOPE_SCAN_DATA.
ORIGINAL = Path(os.environ.get("MODSCOPE_SCAN_DATA", Path(__file__).resolve().parents[2] / "shared" / "data" / "scan"))


def _read_original(name: str) -> Counter:
    """The examples of an original SCAN file as a multiset (the files are shuffled; repeats matter)."""
    out = Counter()
    with gzip.open(ORIGINAL / f"{name}.txt.gz", "rt") as f:
        for line in f:
            command, actions = line.rstrip("\n").removeprefix("IN: ").split(" OUT: ")
            out[(command, actions)] += 1
    return out


needs_original = pytest.mark.skipif(not ORIGINAL.is_dir(), reason=f"the original SCAN files are not in {ORIGINAL} (set MODSCOPE_SCAN_DATA)")


@pytest.fixture(scope="module")
def full() -> list[scan_data.Example]:
    return scan_data.generate()


@needs_original
def test_generated_full_set_equals_the_original(full):
    assert len(full) == 20_910
    assert Counter(full) == _read_original("tasks")


@needs_original
@pytest.mark.parametrize("name", ["length", "addprim_jump", "addprim_turn_left"])
def test_deterministic_splits_equal_the_original(full, name):
    train, test = scan_data.split(full, name)
    assert Counter(train) == _read_original(f"tasks_train_{name}")
    assert Counter(test) == _read_original(f"tasks_test_{name}")


@needs_original
def test_simple_split_has_the_original_sizes(full):
    train, test = scan_data.split(full, "simple", seed=0)
    original_train, original_test = _read_original("tasks_train_simple"), _read_original("tasks_test_simple")
    assert (len(train), len(test)) == (sum(original_train.values()), sum(original_test.values()))


def test_generator_semantics_on_hand_checked_commands(full):
    meaning = dict(full)
    assert len(meaning) == 20_910, "commands must be unique"
    assert meaning["jump"] == "I_JUMP"
    assert meaning["turn left"] == "I_TURN_LEFT"
    assert meaning["walk opposite right"] == "I_TURN_RIGHT I_TURN_RIGHT I_WALK"
    assert meaning["turn around left"] == " ".join(["I_TURN_LEFT"] * 4)
    assert meaning["look around right twice"] == " ".join(["I_TURN_RIGHT I_LOOK"] * 8)
    assert meaning["run after jump left"] == "I_TURN_LEFT I_JUMP I_RUN"
    assert meaning["walk thrice and turn opposite left"] == "I_WALK I_WALK I_WALK I_TURN_LEFT I_TURN_LEFT"


def test_splits_partition_the_commands(full):
    commands = {c for c, _ in full}
    for name in scan_data.SPLITS:
        train, test = scan_data.split(full, name)
        train_c, test_c = {c for c, _ in train}, {c for c, _ in test}
        assert not train_c & test_c and train_c | test_c == commands, name
    train, test = scan_data.split(full, "addprim_jump")
    assert ("jump", "I_JUMP") not in test and all("jump" in c.split() for c, _ in test)
    assert scan_data.split(full, "simple", seed=1)[1] != scan_data.split(full, "simple", seed=0)[1]
    with pytest.raises(InvalidParameterError):
        scan_data.split(full, "mcd1")


def test_encoding_pads_and_ends_with_eos():
    enc = scan_data.encode([("walk twice", "I_WALK I_WALK"), ("turn left", "I_TURN_LEFT")])
    vocab = scan_data.Vocab()
    assert enc.src.shape == (2, 10) and enc.tgt.shape == (2, 49)
    assert enc.src_len.tolist() == [3, 3]  # two words and the encoder's EOS
    assert enc.src[:, 2].tolist() == [vocab.src_eos] * 2 and (enc.src[:, 3:] == 0).all()
    assert enc.tgt[0, :3].tolist() == [0, 0, vocab.eos] and (enc.tgt[0, 3:] == -1).all()
    with pytest.raises(InvalidParameterError):
        scan_data.encode([("walk", "I_WALK " * 60)])


def test_lstm_ignores_padding_and_teacher_forcing_feeds_targets():
    torch.manual_seed(0)
    net = scan_model.ScanLSTM(13, 7, hidden=8, dropout=0.0).eval()
    src = torch.tensor([[0, 9, 0, 0], [1, 2, 3, 0]])
    src_len = torch.tensor([2, 3])
    tgt = torch.tensor([[0, 0, 6, -1], [4, 1, 6, -1]])
    greedy = net(src, src_len, tgt, torch.zeros(2, dtype=torch.bool))
    padded = src.clone()
    padded[0, 2:] = 5  # beyond the length: must not matter
    torch.testing.assert_close(net(padded, src_len, tgt, torch.zeros(2, dtype=torch.bool)), greedy, rtol=0, atol=0)
    forced = net(src, src_len, tgt, torch.ones(2, dtype=torch.bool))
    assert forced.shape == greedy.shape == (2, 4, 7)
    torch.testing.assert_close(forced[:, 0], greedy[:, 0], rtol=0, atol=0)  # the first step sees SOS either way
    tgt_other = tgt.clone()
    tgt_other[:, 0] = 3
    assert not torch.equal(net(src, src_len, tgt_other, torch.ones(2, dtype=torch.bool))[:, 1], forced[:, 1])


def test_lstm_runs_under_vmap_like_a_loop():
    torch.manual_seed(0)
    net = scan_model.ScanLSTM(13, 7, hidden=8, dropout=0.0).eval()
    params = {n: p.detach() for n, p in net.named_parameters()}
    stacked = {n: torch.stack([p, p * 0.5]) for n, p in params.items()}
    args = (torch.randint(0, 13, (2, 3, 5)), torch.tensor([[5, 2, 1], [3, 3, 4]]), torch.randint(0, 7, (2, 3, 6)),
            torch.tensor([[True, False, True], [False, False, True]]))

    def call(p, *xs):
        return torch.func.functional_call(net, p, xs)

    batched = torch.func.vmap(call)(stacked, *args)
    for k in range(2):
        one = call({n: v[k] for n, v in stacked.items()}, *(a[k] for a in args))
        torch.testing.assert_close(batched[k], one, rtol=1e-5, atol=1e-6)


def test_training_batches_are_teacher_forced_as_a_whole_half_of_the_time():
    enc = scan_data.encode([("walk", "I_WALK"), ("run", "I_RUN"), ("look", "I_LOOK")])
    task = scan_model.make_task("t", enc)
    gen = torch.Generator().manual_seed(0)
    draws = []
    for _ in range(400):
        index = torch.randint(len(task), (8,), generator=gen)
        (_, _, _, tf), _ = task.batch(index)
        assert tf.all() or not tf.any(), "one draw per batch"
        assert torch.equal(task.batch(index)[0][3], tf), "the draw depends on the batch only"
        draws.append(bool(tf[0]))
    assert 0.4 < sum(draws) / len(draws) < 0.6
    assert scan_model.make_task("t", enc, teacher_forcing=False).inputs[3].tolist() == [False] * 3


@pytest.fixture
def one_thread():
    """The LSTM's many tiny ops run far slower with 2 threads on a busy machine; restore the setting after."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def test_tiny_run_reports_every_claimed_quantity(tmp_path, one_thread):
    tiny = {"hidden": 8, "base_steps": 3, "mask_steps": 2, "batch_size": 8, "mask_batch_size": 8, "max_test": 16, "scratch": False}
    report = get_experiment("scan").run(ExperimentOptions(out=tmp_path, progress=False, overrides=tiny))
    run = report["runs"][0]
    assert set(run["accuracy"]) == {"full", *scan.MASKS} and run["masks"] == list(scan.MASKS)
    assert all(set(v) == set(scan_data.SPLITS) for v in run["accuracy"].values())
    assert list(run["removed_per_token"]) == scan_data.Vocab().token_names()
    assert all(0 <= v <= 100 for v in run["removed_per_token"].values())
    assert run["vectorize"] == "vmap"
    whats = " ".join(c["what"] for c in report["claims"])
    assert "addprim_jump: before → after" in whats and "I_JUMP row" in whats
    assert json.loads((tmp_path / "scan.json").read_text())["claims"] == report["claims"]
    assert (tmp_path / "scan.html").read_text().count("<pre>") == 5  # settings, three tables, claims


def test_mask_choice_is_validated_and_control_is_required():
    data = {name: ([("walk", "I_WALK")], [("run", "I_RUN")]) for name in scan_data.SPLITS}
    train, test = scan.make_tasks(data, None, masks=("control", "jump"))
    assert list(train) == ["control", "jump"] and list(test) == list(scan_data.SPLITS)
    for bad in (("jump",), ("control", "mcd")):
        with pytest.raises(InvalidParameterError):
            scan.make_tasks(data, None, masks=bad)


@pytest.mark.slow
def test_quick_preset_shows_the_jump_finding(tmp_path):
    report = scan.run(ExperimentOptions(quick=True, out=tmp_path, progress=False))
    acc = report["runs"][0]["accuracy"]
    assert acc["control"]["simple"] >= 0.8
    assert acc["jump"]["addprim_jump"] < 0.5 * acc["control"]["addprim_jump"]


@pytest.mark.parametrize(("after", "scratch", "holds"), [(0.38, 0.0, False), (0.05, 0.0, True), (0.12, 0.10, True), (None, None, None)])
def test_the_before_after_claim_needs_most_of_the_way_down_to_from_scratch(after, scratch, holds):
    run = {"masks": ["control", "jump"], "removed_per_token": None, "scratch": {} if scratch is None else {"addprim_jump": scratch},
           "accuracy": {"full": {"simple": 0.9, "addprim_jump": 0.9}, "control": {"simple": 0.9, "addprim_jump": 0.95},
                        "jump": {"simple": 0.8, "addprim_jump": 0.2 if after is None else after}}}
    claim = next(c for c in scan.claims([run]) if c.what == "addprim_jump: before → after")
    assert claim.holds is holds
