"""Hostile ONNX files (``onnx_hostile.py``) against the command line and the API, under an address-space limit.

All the files run in one child process (one interpreter start), through ``modscope.cli.main`` and ``modscope.load``;
the child's peak RSS bounds every case's. A few cases also run as real ``python -m modscope`` processes.
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))  # the generator sits next to this file

import onnx_hostile as hostile  # noqa: E402

GIB = 1 << 30
LOAD_ERRORS = {"ModelLoadError", "ResourceLimitError"}


@pytest.fixture(scope="module")
def batch(tmp_path_factory: pytest.TempPathFactory) -> tuple[dict, hostile.Outcome]:
    folder = tmp_path_factory.mktemp("hostile")
    cases = []
    for name, build in hostile.REFUSED.items():
        cases.append({"name": name, "argv": ["inspect", str(hostile.write(build(), folder, name))]})
    for name, build in hostile.REFUSED_WHEN_RUN.items():
        path = str(hostile.write(build(), folder, name))
        cases.append({"name": name, "argv": ["inspect", path, "--verify"], "forward": True})
    for name, build in hostile.ACCEPTED.items():
        cases.append({"name": name, "argv": ["inspect", str(hostile.write(build(), folder, name))]})
    # onnxruntime computes dead nodes too: verify hands it the model without them
    dead = str(folder / "dead_bombs.onnx")
    cases.append({"name": "dead_bombs_verified", "argv": ["inspect", dead, "--verify"], "forward": True})
    return hostile.run_batch(cases, folder)


def test_the_batch_stays_under_1_gib(batch):
    results, outcome = batch
    assert outcome.returncode == 0, outcome.stderr[-2000:]
    assert len(results) == len(hostile.REFUSED) + len(hostile.REFUSED_WHEN_RUN) + len(hostile.ACCEPTED) + 1
    assert outcome.peak_rss < GIB, f"peak RSS {outcome.peak_rss / GIB:.2f} GiB"


@pytest.mark.parametrize("name", [*hostile.REFUSED, *hostile.REFUSED_WHEN_RUN])
def test_hostile_file_is_refused_in_one_sentence(batch, name):
    result = batch[0][name]
    assert result["code"] == 2, result["stderr"]
    assert result["stdout"] == ""  # nothing half-printed before the error
    assert hostile.one_sentence(result["stderr"]), result["stderr"]
    assert result["stderr"].startswith("modscope inspect: error: ")
    assert "ModscopeError" in result["api"] and LOAD_ERRORS & set(result["api"]), result["api"]


@pytest.mark.parametrize("name", ["range_bomb", "tile_bomb", "constant_of_shape_bomb", "cos_of_huge_constant",
                                  "pad_bomb", "resize_bomb", "concat_bomb", "broadcast_bomb", "gather_bomb",
                                  "sparse_constant_bomb",
                                  *hostile.REFUSED_WHEN_RUN])
def test_memory_bombs_name_the_node_and_the_limit(batch, name):
    result = batch[0][name]
    assert "ResourceLimitError" in result["api"]
    assert "MODSCOPE_MAX_TENSOR_BYTES" in result["stderr"]
    assert "limit of 2.0 GiB" in result["stderr"]


@pytest.mark.parametrize("name", [*hostile.ACCEPTED, "dead_bombs_verified"])
def test_dead_bombs_and_long_chains_load(batch, name):
    result = batch[0][name]
    assert result["code"] == 0, result["stderr"]
    assert result["api"] == []
    assert "inputs: x" in result["stdout"]


def test_console_process_exits_2_with_one_sentence(tmp_path):
    path = hostile.write(hostile.constant_of_shape_bomb(), tmp_path, "bomb")
    outcome = hostile.run_modscope("inspect", path, "--verify", "--json")
    assert outcome.returncode == 2
    assert outcome.stdout == ""
    assert hostile.one_sentence(outcome.stderr), outcome.stderr
    assert "ConstantOfShape" in outcome.stderr
    assert outcome.peak_rss < GIB


def test_a_runaway_loop_stops_at_the_limit(tmp_path):
    path = hostile.write(hostile.loop_bomb(), tmp_path, "loop")
    outcome = hostile.run_modscope("inspect", path, "--verify", env={"MODSCOPE_MAX_TENSOR_BYTES": "32MiB"})
    assert outcome.returncode == 2
    assert outcome.stdout == ""
    assert hostile.one_sentence(outcome.stderr), outcome.stderr
    assert "node 'loop' (Loop)" in outcome.stderr and "iterations" in outcome.stderr
    assert outcome.peak_rss < GIB


@pytest.mark.parametrize("name", ["range_bomb", "runtime_tile_bomb"])
def test_fit_on_a_bomb_leaves_no_run_folder(tmp_path, name):
    import numpy as np

    path = hostile.write(getattr(hostile, name)(), tmp_path, name)
    task = tmp_path / "task.npz"
    np.savez(task, x=np.ones((8, 1), np.float32), y=np.zeros(8, np.int64))
    out = tmp_path / "run"
    outcome = hostile.run_modscope("fit", path, "--task", f"a={task}", "--out", out, "--quiet", "--n-steps", "2")
    assert outcome.returncode == 2
    assert hostile.one_sentence(outcome.stderr), outcome.stderr
    assert "would make a tensor" in outcome.stderr
    assert not out.exists()
    assert outcome.peak_rss < GIB


@pytest.mark.slow
def test_a_runaway_loop_stops_at_the_default_limit(tmp_path):
    """About two million iterations (a minute on one core) before the default 2 GiB bound stops it."""
    path = hostile.write(hostile.loop_bomb(), tmp_path, "loop")
    outcome = hostile.run_modscope("inspect", path, "--verify", cpu_seconds=600, address_space=4 << 30)
    assert outcome.returncode == 2
    assert hostile.one_sentence(outcome.stderr), outcome.stderr
    assert outcome.peak_rss < GIB
