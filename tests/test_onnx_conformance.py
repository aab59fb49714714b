"""The ONNX node conformance cases shipped inside the ``onnx`` package, run through ``modscope.load``.

The yardstick of the ONNX converter (DESIGN.md section 4): at least 97% of the "NN set" (numeric tensor cases,
see ``onnx_conformance_cases.py``) must pass. ``EXPECTED_FAILURES`` lists the NN-set cases known to fail, with the
reason; any other failing case is reported by name, so a regression in a passing case cannot hide behind the rate.
Run ``python tests/onnx_conformance_cases.py [WORD ...]`` to see every failure while working on an op family.
"""

from __future__ import annotations

import pytest
from onnx_conformance_cases import run_all

pytest.importorskip("onnx.backend.test.case.node")

TARGET = 0.97

#: NN-set cases that fail today, and why. Remove an entry when its case passes.
EXPECTED_FAILURES: dict[str, str] = {
    "test_maxunpool_export_with_output_shape": (
        "MaxUnpool with an explicit output_shape: the handler reads the indices as positions in output_shape, the "
        "ONNX reference reads them in the default unpooled shape and pads (ops/pooling.py)"
    ),
}


@pytest.fixture(scope="module")
def results():
    return run_all()


def test_nn_set_pass_rate(results):
    nn = [r for r in results if r.in_nn_set]
    passed = sum(r.ok for r in nn)
    rate = passed / len(nn)
    print(f"ONNX node conformance, NN set: {passed}/{len(nn)} = {rate:.2%} (target {TARGET:.0%})")
    assert len(nn) > 1000, "the onnx package ships fewer node cases than expected; is the install complete?"
    assert rate >= TARGET, f"NN-set pass rate {rate:.2%} is below {TARGET:.0%}"


def test_no_unexpected_failures(results):
    unexpected = {r.name: r.error for r in results if r.in_nn_set and not r.ok and r.name not in EXPECTED_FAILURES}
    assert not unexpected, "NN-set cases that should pass failed:\n" + "\n".join(
        f"{name}: {error}" for name, error in sorted(unexpected.items())
    )


def test_expected_failures_are_still_listed_for_a_reason(results):
    by_name = {r.name: r for r in results}
    fixed = [name for name in EXPECTED_FAILURES if name in by_name and by_name[name].ok]
    unknown = [name for name in EXPECTED_FAILURES if name not in by_name]
    assert not unknown, f"EXPECTED_FAILURES names cases the onnx package does not have: {unknown}"
    assert not fixed, f"these cases pass now; remove them from EXPECTED_FAILURES: {fixed}"
