"""Hostile non-ONNX inputs (tests/adversarial/hostile.py): each is refused with exit code 2 and one sentence, no
traceback, no canary (no code from a file ran), no partial output, and the API raises a ModscopeError; all of them
run in one child process whose peak RSS stays under 1 GiB."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))
sys.path.insert(0, str(Path(__file__).parents[1]))

import hostile  # noqa: E402
from cli_fixtures import FIT_FLAGS, cli, make_toy  # noqa: E402
from onnx_hostile import one_sentence  # noqa: E402

GIB = 1 << 30


def _interrupted_run(model: Path, task: Path, folder: Path) -> Path:
    """A run folder holding only the checkpoint an interrupted `fit --n-steps 4` leaves (step 2)."""
    import modscope
    from modscope.taskdata import load_task

    folder.mkdir()
    modscope.train_masks(modscope.load(model), [load_task("a", task)], modscope.MaskConfig(n_steps=4),
                         checkpoint=folder / "checkpoint.pt", checkpoint_every=2, progress=False)
    assert (folder / "checkpoint.pt").exists()
    return folder


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict[str, dict], object, dict[str, hostile.Case]]:
    root = tmp_path_factory.mktemp("trust_hostile")
    toy = make_toy(root / "toy")
    run = root / "fitted"
    assert cli("fit", toy.onnx, "--task", f"a={toy.a}", "--task", f"b={toy.b}", "--out", run, *FIT_FLAGS) == 0
    module_dir = root / "modules"
    module_dir.mkdir()
    ctx = {"model": str(toy.onnx), "task": str(toy.a), "run": str(run), "module_dir": str(module_dir),
           "interrupted": str(_interrupted_run(toy.onnx, toy.a, root / "interrupted")),
           "interrupted_flags": ["--n-steps", "4", "--quiet"]}
    cases = {}
    for name, build in hostile.REFUSED.items():
        folder = root / name
        folder.mkdir()
        cases[name] = build(folder, ctx)
    results, outcome = hostile.run_batch(cases, root, module_dir)
    return results, outcome, cases


def test_the_batch_stays_under_1_gib(batch):
    results, outcome, _ = batch
    assert outcome.returncode == 0, outcome.stderr[-3000:]
    assert set(results) == set(hostile.REFUSED)
    assert outcome.peak_rss < GIB, f"peak RSS {outcome.peak_rss / GIB:.2f} GiB"


@pytest.mark.parametrize("name", list(hostile.REFUSED))
def test_hostile_input_is_refused_in_one_sentence(batch, name):
    result = batch[0][name]
    assert result["code"] == 2, result["stderr"]
    assert "Traceback" not in result["stderr"]
    error_lines = [line for line in result["stderr"].splitlines() if ": error: " in line]
    assert len(error_lines) == 1 and one_sentence(error_lines[0]), result["stderr"]
    assert result["stdout"] == ""
    assert result["present"] == [], f"left behind: {result['present']}"  # no canary, no partial output


@pytest.mark.parametrize("name", list(hostile.REFUSED))
def test_the_api_raises_a_modscope_error(batch, name):
    result, case = batch[0][name], batch[2][name]
    if case.api[0] == "none":
        pytest.skip("only the command line reaches this input")
    assert "ModscopeError" in result["api"], result["api"]


@pytest.mark.parametrize("name, words", [
    ("pt2_duplicate_config", "two members named"),
    ("zip_member_outside_root", "outside the archive"),
    ("zip_encrypted_member", "encrypted"),
    ("zip_unknown_method", "compression method 99"),
    ("zip_declared_size_over_limit", "MODSCOPE_MAX_ZIP_MEMBER_BYTES"),
    ("zip_deflated_member_inflates_to_4_gib", "MODSCOPE_MAX_ZIP_INFLATED_BYTES"),
    ("npz_deflate_bomb", "different lengths"),
    ("labels_negative", "class target -3"),
    ("labels_minus_2_under_seq_ce", "class target -2"),
    ("labels_boolean_under_ce", "booleans"),
    ("run_config_grants_trust", "cannot grant trust"),
    ("run_config_names_a_factory", "cannot name code"),
    ("resume_checkpoint_wrong_logits", "mask logits"),
    ("resume_checkpoint_bare_tensor", "not a modscope training state"),
])
def test_the_sentence_says_what_is_wrong(batch, name, words):
    assert words in batch[0][name]["stderr"], batch[0][name]["stderr"]
