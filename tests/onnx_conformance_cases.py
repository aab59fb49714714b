"""The ONNX node conformance cases shipped inside the ``onnx`` package, run through ``modscope.load``.

Used by ``tests/test_onnx_conformance.py`` and runnable by hand while working on an op family::

    python tests/onnx_conformance_cases.py            # pass rate and every failure
    python tests/onnx_conformance_cases.py Conv Pool  # only cases whose name contains one of the words

The "NN set" follows the converter issue: cases whose inputs and outputs are all plain numeric tensors, leaving out
training, random and string operators.
"""

from __future__ import annotations

import signal
import sys
import warnings
from dataclasses import dataclass

import numpy as np

SKIP_OPS = {
    "Adagrad", "Adam", "Momentum", "Gradient", "RandomNormal", "RandomNormalLike", "RandomUniform",
    "RandomUniformLike", "Bernoulli", "Multinomial", "ImageDecoder", "StringConcat", "StringNormalizer",
    "StringSplit", "RegexFullMatch", "TfIdfVectorizer", "LabelEncoder",
}


@dataclass
class CaseResult:
    name: str
    ok: bool
    in_nn_set: bool
    error: str


def node_cases() -> list:
    from onnx.backend.test.case.node import collect_testcases

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        return [c for c in collect_testcases(None) if c.kind == "node"]


def _plain(x: object) -> bool:
    return isinstance(x, np.ndarray) and x.dtype.kind in "fiub"


def in_nn_set(case) -> bool:
    if {n.op_type for n in case.model.graph.node} & SKIP_OPS:
        return False
    return all(_plain(a) for inputs, outputs in case.data_sets for a in list(inputs) + list(outputs))


def _compare(out: object, expected: np.ndarray, rtol: float, atol: float) -> str:
    out = np.asarray(out)
    if out.shape != expected.shape:
        return f"shape {out.shape} != {expected.shape}"
    if expected.dtype.kind in "fc":
        ok = np.allclose(out.astype(np.float64), expected.astype(np.float64), rtol=rtol, atol=atol, equal_nan=True)
    else:
        ok = np.array_equal(out, expected)
    return "" if ok else "values differ"


def _to_numpy(value: object) -> object:
    if hasattr(value, "detach"):
        return value.detach().cpu().numpy()
    if isinstance(value, list):
        return [_to_numpy(v) for v in value]
    return value


class _Timeout(Exception):
    pass


def run_case(case, timeout_s: int = 20) -> CaseResult:
    import torch

    import modscope

    def alarm(*_: object) -> None:
        raise _Timeout(f"took over {timeout_s} s")

    error = ""
    old = signal.signal(signal.SIGALRM, alarm)
    signal.alarm(timeout_s)
    try:
        model = modscope.load(case.model)
        for inputs, expected in case.data_sets:
            tensors = [torch.from_numpy(np.array(i, copy=True)) if isinstance(i, np.ndarray) else i for i in inputs]
            with torch.no_grad():
                outs = model(*tensors)
            outs = list(outs) if isinstance(outs, tuple) else [outs]
            if len(outs) < len(expected):
                error = f"{len(outs)} outputs, expected {len(expected)}"
                break
            for out, exp in zip(outs, expected):
                if isinstance(exp, np.ndarray):
                    error = _compare(_to_numpy(out), exp, max(case.rtol, 1e-3), max(case.atol, 1e-5))
                    if error:
                        break
            if error:
                break
    except Exception as exc:  # noqa: BLE001 - every failure is a failed case here
        error = f"{type(exc).__name__}: {str(exc)[:200]}"
    finally:
        signal.alarm(0)
        signal.signal(signal.SIGALRM, old)
    return CaseResult(case.name, not error, in_nn_set(case), error)


def run_all(words: list[str] | None = None) -> list[CaseResult]:
    cases = node_cases()
    if words:
        cases = [c for c in cases if any(w.lower() in c.name.lower() for w in words)]
    return [run_case(c) for c in cases]


def main(argv: list[str]) -> None:
    results = run_all(argv)
    nn = [r for r in results if r.in_nn_set]
    for r in results:
        if not r.ok and r.in_nn_set:
            print(f"FAIL {r.name}: {r.error}")
    n_ok = sum(r.ok for r in nn)
    print(f"nn-set {n_ok}/{len(nn)} = {n_ok / max(len(nn), 1):.3%}; all {sum(r.ok for r in results)}/{len(results)}")


if __name__ == "__main__":
    main(sys.argv[1:])
