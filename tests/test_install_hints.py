"""Hints name the install command for the way modscope was installed (clone with -e, or package)."""

from pathlib import Path

import pytest

from modscope.install import install_hint, installed_from_clone


def test_clone_detected_from_pyproject_beside_the_package(tmp_path: Path):
    pkg = tmp_path / "modscope"
    pkg.mkdir()
    assert not installed_from_clone(pkg)
    (tmp_path / "pyproject.toml").write_text("[project]\nname = 'modscope'\n")
    assert installed_from_clone(pkg)


@pytest.mark.parametrize(("from_clone", "expected"), [(True, 'pip install -e ".[verify]"'), (False, 'pip install "modscope[verify]"')])
def test_hint_fits_the_installation(from_clone: bool, expected: str):
    assert install_hint("verify", from_clone=from_clone).startswith(expected)


def test_this_checkout_is_a_clone():
    assert installed_from_clone() and install_hint("report").startswith('pip install -e ".[report]"')
