"""The native CPU kernels: built where a C compiler is, the same bits as torch, and a safe fallback where not."""

from __future__ import annotations

import os
import shutil
import stat

import pytest
import torch

from modscope.masks import native
from modscope.masks.sampling import draw_uniforms

needs_kernels = pytest.mark.skipif(shutil.which(os.environ.get("CC", "cc")) is None, reason="no C compiler")


@needs_kernels
def test_the_kernels_build_and_pass_their_check_where_there_is_a_c_compiler():
    assert native.kernels() is not None, native.status()
    assert native.status().startswith("native CPU kernels (")


@needs_kernels
@pytest.mark.parametrize("skip,sizes", [(0, [1, 623, 624, 625]), (1001, [5000, 3, 100_000]), (624 * 7, [2, 624 * 3])])
def test_uniforms_are_those_of_torch_rand_and_leave_the_generator_where_torch_rand_would(skip, sizes, native_calls):
    fast, reference = torch.Generator().manual_seed(99), torch.Generator().manual_seed(99)
    torch.rand(skip, generator=fast), torch.rand(skip, generator=reference)
    for n in sizes:
        out = torch.empty(2, n)
        assert draw_uniforms((2, n), fast, out=out) is out
        assert torch.equal(out, torch.rand(2, n, generator=reference))
    assert torch.equal(fast.get_state(), reference.get_state())
    assert torch.equal(torch.rand(7, generator=fast), torch.rand(7, generator=reference))  # torch goes on from there
    assert native_calls["uniforms_many"] == len(sizes)  # drawn by the kernel, not by torch


def _fresh_load(monkeypatch: pytest.MonkeyPatch, **env: str) -> tuple[native.Kernels | None, str]:
    for name, value in env.items():
        monkeypatch.setenv(name, value)
    return native._load()


@needs_kernels
def test_a_cache_folder_others_can_write_to_is_not_used(tmp_path, monkeypatch):
    shared = tmp_path / "cache"
    (shared / "modscope").mkdir(parents=True)
    os.chmod(shared / "modscope", 0o777)
    found, why = _fresh_load(monkeypatch, XDG_CACHE_HOME=str(shared))
    assert found is None and "not private to this user" in why and "torch operations" in why
    assert not list((shared / "modscope").iterdir())


@needs_kernels
def test_a_library_others_can_write_to_is_not_loaded(tmp_path, monkeypatch):
    found, _ = _fresh_load(monkeypatch, XDG_CACHE_HOME=str(tmp_path))
    assert found is not None
    (library,) = (tmp_path / "modscope").glob("native-*.so")
    assert stat.S_IMODE(library.stat().st_mode) == 0o700
    os.chmod(library, 0o777)
    found, why = native._load()
    assert found is None and "not private to this user" in why


@needs_kernels
def test_the_library_is_built_once_and_then_taken_from_the_cache(tmp_path, monkeypatch):
    first, why = _fresh_load(monkeypatch, XDG_CACHE_HOME=str(tmp_path))
    assert first is not None and first.build_seconds > 0 and "built in" in why
    again, why = native._load()
    assert again is not None and again.build_seconds == 0 and "from the cache" in why


@pytest.mark.parametrize("env,words", [
    ({"MODSCOPE_NATIVE": "0"}, "MODSCOPE_NATIVE=0"),
    ({"CC": "no-such-compiler-here"}, "no C compiler 'no-such-compiler-here' on the PATH; set CC"),
    ({"CC": "false"}, "false failed"),
])
def test_without_kernels_the_reason_is_said_and_the_torch_operations_run(tmp_path, monkeypatch, env, words):
    found, why = _fresh_load(monkeypatch, XDG_CACHE_HOME=str(tmp_path), **env)
    assert found is None and words in why and "torch operations" in why
    monkeypatch.setattr(native, "_loaded", (found, why))
    out = torch.empty(10)
    draw_uniforms((10,), torch.Generator().manual_seed(1), out=out)
    assert torch.equal(out, torch.rand(10, generator=torch.Generator().manual_seed(1)))


def test_training_notes_say_whether_the_native_kernels_run(torch_kernels):
    import modscope

    notes: list[str] = []
    x = torch.randn(32, 4)
    net = torch.nn.Sequential(torch.nn.Linear(4, 3))
    modscope.train_masks(net, modscope.Task("t", x, (x[:, 0] > 0).long()), modscope.MaskConfig(n_steps=2, batch_size=8),
                         progress=False, notes=notes.append)
    assert "mask step: native kernels off for this test" in notes, notes


@needs_kernels
def test_a_cache_folder_that_cannot_be_made_falls_back_to_a_private_temporary_one(tmp_path, monkeypatch):
    blocker = tmp_path / "not-a-folder"
    blocker.write_text("")
    monkeypatch.setattr(native.tempfile, "tempdir", str(tmp_path))
    found, why = _fresh_load(monkeypatch, XDG_CACHE_HOME=str(blocker))
    assert found is not None, why
    assert str(tmp_path / f"modscope-native-{os.getuid()}") in why


def test_a_missing_compiler_is_warned_about_once_and_a_turned_off_one_not_at_all(tmp_path, monkeypatch):
    import warnings

    from modscope.errors import ModscopeWarning

    monkeypatch.setattr(native, "_warned", False)
    monkeypatch.setattr(native, "_loaded", _fresh_load(monkeypatch, XDG_CACHE_HOME=str(tmp_path), CC="no-such-cc"))
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        native.warn_once_if_missing()
        native.warn_once_if_missing()
    assert [str(w.message) for w in caught if w.category is ModscopeWarning] == [
        f"{native.status()}; the native kernels make the mask step about twice as fast"]
    assert "no C compiler 'no-such-cc' on the PATH; set CC to one" in native.status()
    monkeypatch.setattr(native, "_warned", False)
    monkeypatch.setenv("MODSCOPE_NATIVE", "0")
    monkeypatch.setattr(native, "_loaded", native._load())
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        native.warn_once_if_missing()
    assert not caught


def test_drawing_twice_from_one_generator_gives_its_stream_in_order():
    from modscope.masks.sampling import draw_uniforms_many

    g = torch.Generator().manual_seed(8)
    outs = torch.empty(2, 3000)
    draw_uniforms_many([g, g], list(outs))
    assert torch.equal(outs.flatten(), torch.rand(6000, generator=torch.Generator().manual_seed(8)))
