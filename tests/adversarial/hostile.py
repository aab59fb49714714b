"""Hostile non-ONNX inputs: code-execution payloads, crafted zips, malformed torch/safetensors/task files, crafted run
folders and report files.

Every payload that would run code, if a loader let it, creates a *canary* file; a test that finds the canary knows
code from a file ran. Each builder writes its files into a folder and returns a `Case`: the command line to run,
the API call that must raise a `ModscopeError`, and the paths that must not exist afterwards.

Example:
    >>> import tempfile
    >>> case = zip_duplicate_members(Path(tempfile.mkdtemp()), {})
    >>> case.argv[0]
    'inspect'
"""

from __future__ import annotations

import io
import json
import os
import pickle
import struct
import sys
import zipfile
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch

CANARY = "CANARY"  # the file a payload creates when its code runs


@dataclass
class Case:
    """One hostile input: ``argv`` for ``modscope``, ``api`` = (function name, args) that must raise a ModscopeError,
    ``absent``: paths that must not exist afterwards (outputs, the canary)."""

    argv: list[str]
    api: tuple[str, list[str]]
    absent: list[str] = field(default_factory=list)
    env: dict[str, str] = field(default_factory=dict)


class Payload:
    """Unpickling this object creates ``path`` (the canary): it runs ``open(path, "w")``."""

    def __init__(self, path: Path):
        self.path = str(path)

    def __reduce__(self) -> tuple[Any, tuple[str, str]]:
        return (open, (self.path, "w"))


def _canary(folder: Path) -> Path:
    return folder / CANARY


def _inspect(path: Path, folder: Path, *extra: str) -> Case:
    return Case(["inspect", str(path), "--json", *extra], ("load", [str(path)]), [str(_canary(folder))])


def _state_dict_pt(path: Path) -> Path:
    torch.save({"weight": torch.ones(3, 2), "bias": torch.zeros(3)}, path)
    return path


def _rewrite_zip(src: Path, dst: Path, extra: list[tuple[zipfile.ZipInfo | str, bytes]], first: bool = False) -> None:
    """Copy ``src`` to ``dst`` with ``extra`` members added (before the others when ``first``); names may repeat."""
    import warnings

    with zipfile.ZipFile(src) as z:
        members = [(info, z.read(info)) for info in z.infolist()]
    with warnings.catch_warnings(), zipfile.ZipFile(dst, "w") as out:
        warnings.simplefilter("ignore")  # "Duplicate name": that is the point
        for info, data in (extra + members if first else members + extra):
            out.writestr(info, data)


def _patch_central(path: Path, name: str, *, flag_bits: int | None = None, method: int | None = None,
                   file_size: int | None = None) -> None:
    """Change fields of ``name``'s central-directory entry (and local header for flags/method) in place."""
    data = bytearray(path.read_bytes())
    encoded = name.encode()
    pos = data.find(b"PK\x01\x02")
    while pos != -1:
        n_len = struct.unpack_from("<H", data, pos + 28)[0]
        if bytes(data[pos + 46:pos + 46 + n_len]) == encoded:
            if flag_bits is not None:
                struct.pack_into("<H", data, pos + 8, flag_bits)
            if method is not None:
                struct.pack_into("<H", data, pos + 10, method)
            if file_size is not None:
                struct.pack_into("<I", data, pos + 24, file_size)
            local = struct.unpack_from("<I", data, pos + 42)[0]
            if flag_bits is not None:
                struct.pack_into("<H", data, local + 6, flag_bits)
            if method is not None:
                struct.pack_into("<H", data, local + 8, method)
            path.write_bytes(bytes(data))
            return
        pos = data.find(b"PK\x01\x02", pos + 4)
    raise KeyError(name)


def _pt2(path: Path) -> Path:
    torch.export.save(torch.export.export(torch.nn.Linear(2, 3), (torch.zeros(1, 2),)), str(path))
    return path


def _pt2_config_name(path: Path) -> str:
    with zipfile.ZipFile(path) as z:
        return next(n for n in z.namelist() if n.endswith("model_weights_config.json"))


# -- model files -----------------------------------------------------------------------------------------------------
def pt2_duplicate_config(folder: Path, ctx: dict) -> Case:
    """A .pt2 whose first ``model_weights_config.json`` says ``use_pickle`` for a payload; the second is harmless."""
    legit = _pt2(folder / "legit.pt2")
    name = _pt2_config_name(legit)
    prefix = name.rsplit("/", 1)[0]
    config = json.loads(zipfile.ZipFile(legit).read(name))
    config["config"]["weight"].update(path_name="payload", use_pickle=True)
    buffer = io.BytesIO()
    torch.save(Payload(_canary(folder)), buffer)
    path = folder / "dup_config.pt2"
    _rewrite_zip(legit, path, [(name, json.dumps(config).encode()), (f"{prefix}/payload", buffer.getvalue())], first=True)
    return _inspect(path, folder)


def pt2_config_is_a_list(folder: Path, ctx: dict) -> Case:
    legit = _pt2(folder / "legit.pt2")
    name = _pt2_config_name(legit)
    path = folder / "config_list.pt2"
    with zipfile.ZipFile(legit) as z, zipfile.ZipFile(path, "w") as out:
        for info in z.infolist():
            out.writestr(info, b"[1, 2, 3]" if info.filename == name else z.read(info))
    return _inspect(path, folder)


def zip_duplicate_members(folder: Path, ctx: dict) -> Case:
    legit = _state_dict_pt(folder / "legit.pt")
    with zipfile.ZipFile(legit) as z:
        data_pkl = next(n for n in z.namelist() if n.endswith("data.pkl"))
    path = folder / "dup.pt"
    _rewrite_zip(legit, path, [(data_pkl, pickle.dumps(Payload(_canary(folder))))], first=True)
    return _inspect(path, folder)


def zip_member_outside_root(folder: Path, ctx: dict) -> Case:
    path = folder / "escape.pt"
    _rewrite_zip(_state_dict_pt(folder / "legit.pt"), path, [("../../escaped", b"x")])
    return _inspect(path, folder)


def zip_encrypted_member(folder: Path, ctx: dict) -> Case:
    path = _state_dict_pt(folder / "encrypted.pt")
    name = zipfile.ZipFile(path).namelist()[0]
    _patch_central(path, name, flag_bits=0x1)
    return _inspect(path, folder)


def zip_unknown_method(folder: Path, ctx: dict) -> Case:
    path = _state_dict_pt(folder / "method99.pt")
    name = zipfile.ZipFile(path).namelist()[0]
    _patch_central(path, name, method=99)
    return _inspect(path, folder)


def zip_declared_size_over_limit(folder: Path, ctx: dict) -> Case:
    """A member that declares 4 GiB uncompressed under a 1 GiB limit (set through the environment, as a user would)."""
    path = _state_dict_pt(folder / "declares4g.pt")
    name = next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("data.pkl"))
    _patch_central(path, name, file_size=0xFFFFFFF0)
    case = _inspect(path, folder)
    case.env = {"MODSCOPE_MAX_ZIP_MEMBER_BYTES": str(1 << 30)}
    return case


def zip_deflated_member_inflates_to_4_gib(folder: Path, ctx: dict) -> Case:
    """A re-zipped (deflated) checkpoint whose data.pkl says it inflates to 4 GiB: refused at the default limits."""
    legit = _state_dict_pt(folder / "legit.pt")
    path = folder / "deflated.pt"
    with zipfile.ZipFile(legit) as z, zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as out:
        for info in z.infolist():
            out.writestr(info.filename, z.read(info))
    name = next(n for n in zipfile.ZipFile(path).namelist() if n.endswith("data.pkl"))
    _patch_central(path, name, file_size=0xFFFFFFF0)
    return _inspect(path, folder)


def pickled_module_payload(folder: Path, ctx: dict) -> Case:
    path = folder / "payload.pt"
    torch.save(Payload(_canary(folder)), path)
    return _inspect(path, folder)


def legacy_pickle_payload(folder: Path, ctx: dict) -> Case:
    path = folder / "payload.pkl"
    path.write_bytes(pickle.dumps(Payload(_canary(folder)), protocol=4))
    return _inspect(path, folder)


def _safetensors(path: Path, header: dict, data: bytes = b"\x00" * 24) -> Path:
    raw = json.dumps(header).encode()
    path.write_bytes(struct.pack("<Q", len(raw)) + raw + data)
    return path


def safetensors_offsets_as_strings(folder: Path, ctx: dict) -> Case:
    path = _safetensors(folder / "strings.safetensors", {"w": {"dtype": "F32", "shape": [2, 3], "data_offsets": ["0", "24"]}})
    return _inspect(path, folder, "--factory", "cli_fixtures:toy_net")


def safetensors_entry_not_an_object(folder: Path, ctx: dict) -> Case:
    path = _safetensors(folder / "entry.safetensors", {"w": [1, 2, 3]})
    return _inspect(path, folder, "--factory", "cli_fixtures:toy_net")


def safetensors_negative_shape(folder: Path, ctx: dict) -> Case:
    path = _safetensors(folder / "negshape.safetensors", {"w": {"dtype": "F32", "shape": [-2, 3], "data_offsets": [0, 24]}})
    return _inspect(path, folder, "--factory", "cli_fixtures:toy_net")


def checkpoint_bare_tensor(folder: Path, ctx: dict) -> Case:
    path = folder / "tensor.pt"
    torch.save(torch.zeros(3, 2), path)
    return _inspect(path, folder, "--factory", "cli_fixtures:toy_net")


def torchscript_unguessable_input(folder: Path, ctx: dict) -> Case:
    class ReluFirst(torch.nn.Module):
        def __init__(self) -> None:
            super().__init__()
            self.fc = torch.nn.Linear(4, 2)

        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return self.fc(torch.relu(x))

    path = folder / "relu_first.ts"
    torch.jit.save(torch.jit.script(ReluFirst()), str(path))
    return _inspect(path, folder)


# -- task data files: `fit TOY --task a=FILE` must refuse, writing no run folder ----------------------------------------
def _fit(task_file: Path, folder: Path, ctx: dict, *extra: str) -> Case:
    out = folder / "run"
    argv = ["fit", ctx["model"], "--task", f"a={task_file}", "--out", str(out), "--n-steps", "2", "--quiet", *extra]
    return Case(argv, ("task", [str(task_file), ctx["model"], *extra[1:2]]), [str(out), str(_canary(folder))])


def _npy_header(shape: tuple[int, ...], dtype: str = "<f4") -> bytes:
    buffer = io.BytesIO()
    np.lib.format.write_array_header_1_0(buffer, {"descr": dtype, "fortran_order": False, "shape": shape})
    return buffer.getvalue()


def npz_deflate_bomb(folder: Path, ctx: dict) -> Case:
    """A 1-2 MB .npz whose x declares 1.2 GB of float32 zeros (deflated), with 10 targets: the lengths differ."""
    rows = 300_000_000
    path = folder / "bomb.npz"
    with zipfile.ZipFile(path, "w", zipfile.ZIP_DEFLATED) as z:
        info = zipfile.ZipInfo("x.npy")
        info.compress_type = zipfile.ZIP_DEFLATED
        with z.open(info, "w", force_zip64=True) as f:
            f.write(_npy_header((rows,)))
            chunk = bytes(1 << 24)
            for _ in range(rows * 4 // len(chunk)):
                f.write(chunk)
            f.write(bytes(rows * 4 % len(chunk)))
        z.writestr("y.npy", _npy_header((10,), "<i8") + bytes(80))
    return _fit(path, folder, ctx)


def npz_header_lies(folder: Path, ctx: dict) -> Case:
    path = folder / "lies.npz"
    with zipfile.ZipFile(path, "w") as z:
        z.writestr("x.npy", _npy_header((1000, 8)) + bytes(64))
        z.writestr("y.npy", _npy_header((1000,), "<i8") + bytes(8000))
    return _fit(path, folder, ctx)


def npz_duplicate_members(folder: Path, ctx: dict) -> Case:
    good = io.BytesIO()
    np.save(good, np.zeros((4, 8), np.float32))
    path = folder / "dup.npz"
    import warnings

    with warnings.catch_warnings(), zipfile.ZipFile(path, "w") as z:
        warnings.simplefilter("ignore")
        z.writestr("x.npy", good.getvalue())
        z.writestr("x.npy", good.getvalue())
        y = io.BytesIO()
        np.save(y, np.zeros(4, np.int64))
        z.writestr("y.npy", y.getvalue())
    return _fit(path, folder, ctx)


def task_pt_payload(folder: Path, ctx: dict) -> Case:
    path = folder / "task.pt"
    torch.save({"x": torch.zeros(4, 8), "y": Payload(_canary(folder))}, path)
    return _fit(path, folder, ctx)


def _labels(folder: Path, ctx: dict, name: str, y: np.ndarray, *extra: str) -> Case:
    path = folder / f"{name}.npz"
    np.savez(path, x=np.zeros((len(y), 8), np.float32), y=y)
    return _fit(path, folder, ctx, *extra)


def labels_negative(folder: Path, ctx: dict) -> Case:
    return _labels(folder, ctx, "neg", np.array([0, 1, -3, 1]))


def labels_minus_2_under_seq_ce(folder: Path, ctx: dict) -> Case:
    return _labels(folder, ctx, "m2", np.array([0, 1, -2, 1]), "--loss", "seq_ce")  # -1 and -100 are padding


def labels_boolean_under_ce(folder: Path, ctx: dict) -> Case:
    return _labels(folder, ctx, "bool", np.array([True, False, True, False]))


def labels_too_large(folder: Path, ctx: dict) -> Case:
    return _labels(folder, ctx, "big", np.array([0, 1, 2, 4]))


# -- run folders and reports --------------------------------------------------------------------------------------------
def _copy_run(folder: Path, ctx: dict) -> Path:
    import shutil

    run = folder / "run"
    shutil.copytree(ctx["run"], run)
    return run


def _export(run: Path, folder: Path, *extra: str) -> Case:
    out = folder / "out.safetensors"
    return Case(["export", str(run), "--remove", "a", "-o", str(out), *extra], ("export", [str(run)]),
                [str(out), str(_canary(folder))])


def _point_run_at(run: Path, model: Path, options: dict) -> None:
    from modscope.runs import file_checksum

    config = json.loads((run / "config.json").read_text())
    config["model"].update(path=str(model), checksum=file_checksum(model), options=options)
    (run / "config.json").write_text(json.dumps(config))


def run_config_grants_trust(folder: Path, ctx: dict) -> Case:
    """config.json says ``trust: true`` for a pickle whose unpickling creates the canary."""
    run = _copy_run(folder, ctx)
    model = folder / "payload.pt"
    torch.save(Payload(_canary(folder)), model)
    _point_run_at(run, model, {"trust": True})
    return _export(run, folder)


def run_config_names_a_factory(folder: Path, ctx: dict) -> Case:
    """config.json names ``hostile_factory_mod:build``, a module on the path whose import creates the canary."""
    run = _copy_run(folder, ctx)
    module_dir = Path(ctx["module_dir"])
    (module_dir / "hostile_factory_mod.py").write_text(
        f"open({str(_canary(folder))!r}, 'w').close()\ndef build():\n    raise SystemExit('factory ran')\n")
    model = _state_dict_pt(folder / "weights.pt")
    _point_run_at(run, model, {"factory": "hostile_factory_mod:build"})
    return _export(run, folder)


def run_config_model_not_an_object(folder: Path, ctx: dict) -> Case:
    run = _copy_run(folder, ctx)
    config = json.loads((run / "config.json").read_text())
    config["model"] = ["not", "an", "object"]
    (run / "config.json").write_text(json.dumps(config))
    return _export(run, folder)


def run_config_deep_nesting(folder: Path, ctx: dict) -> Case:
    run = _copy_run(folder, ctx)
    (run / "config.json").write_text('{"schema_version": 1, "model": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return _export(run, folder)


def run_masks_are_a_pickle(folder: Path, ctx: dict) -> Case:
    run = _copy_run(folder, ctx)
    torch.save(Payload(_canary(folder)), run / "masks.safetensors")
    return _export(run, folder)


def _report_case(path: Path, folder: Path) -> Case:
    out = folder / "report.html"
    return Case(["report", str(path), "--html", str(out)], ("report", [str(path)]), [str(out)])


def report_wrong_types(folder: Path, ctx: dict) -> Case:
    data = json.loads((Path(ctx["run"]) / "report.json").read_text())
    for key in list(data):
        if key != "schema_version":
            data[key] = "not what you expect" if isinstance(data[key], list | dict) else [1, 2]
    path = folder / "report.json"
    path.write_text(json.dumps(data))
    return _report_case(path, folder)


def diff_report_wrong_types(folder: Path, ctx: dict) -> Case:
    run = _copy_run(folder, ctx)
    report_wrong_types(folder, ctx)
    (folder / "report.json").replace(run / "report.json")
    return Case(["diff", ctx["run"], str(run)], ("diff", [str(run)]), [])


def report_deep_nesting(folder: Path, ctx: dict) -> Case:
    path = folder / "report.json"
    path.write_text('{"schema_version": 1, "tasks": ' + "[" * 100_000 + "]" * 100_000 + "}")
    return _report_case(path, folder)


def masks_metadata_missing_keys(folder: Path, ctx: dict) -> Case:
    from safetensors import safe_open
    from safetensors.torch import save_file

    run = _copy_run(folder, ctx)
    with safe_open(str(run / "masks.safetensors"), "pt") as f:
        tensors = {k: f.get_tensor(k) for k in f.keys()}  # noqa: SIM118 - safe_open has no __iter__
        meta = dict(f.metadata() or {})
    meta.pop(next(iter(sorted(meta))), None)
    save_file(tensors, str(run / "masks.safetensors"), metadata={k: v for k, v in meta.items() if k != "tasks"})
    return _export(run, folder)


def resume_checkpoint_bare_tensor(folder: Path, ctx: dict) -> Case:
    out = folder / "run"
    out.mkdir()
    torch.save(torch.zeros(3), out / "checkpoint.pt")
    argv = ["fit", ctx["model"], "--task", f"a={ctx['task']}", "--out", str(out), "--n-steps", "2", "--quiet", "--resume"]
    return Case(argv, ("none", []), [str(out / "masks.safetensors"), str(out / "report.json")])


def resume_checkpoint_wrong_logits(folder: Path, ctx: dict) -> Case:
    """A genuine interrupted run's checkpoint with its logits replaced by a tensor of another shape."""
    import shutil

    out = folder / "run"
    shutil.copytree(ctx["interrupted"], out)
    state = torch.load(out / "checkpoint.pt", weights_only=True)
    state["logits"] = torch.zeros(2, 2)
    torch.save(state, out / "checkpoint.pt")
    argv = ["fit", ctx["model"], "--task", f"a={ctx['task']}", "--out", str(out), *ctx["interrupted_flags"], "--resume"]
    return Case(argv, ("none", []), [str(out / "masks.safetensors"), str(out / "report.json")])


# -- policies: `check RUN --policy FILE` must refuse in one sentence ------------------------------------------------------
def _check(policy: Path, ctx: dict) -> Case:
    return Case(["check", ctx["run"], "--policy", str(policy)], ("policy", [str(policy)]), [])


def policy_deep_nesting(folder: Path, ctx: dict) -> Case:
    path = folder / "deep.toml"
    path.write_text("rule = " + "[" * 50_000 + "]" * 50_000 + "\n")
    return _check(path, ctx)


def policy_wrong_types(folder: Path, ctx: dict) -> Case:
    path = folder / "types.toml"
    path.write_text('[[rule]]\nmetric = ["iou"]\ntasks = "a"\nmax = "half"\n')
    return _check(path, ctx)


def policy_rule_not_a_table(folder: Path, ctx: dict) -> Case:
    path = folder / "scalar.toml"
    path.write_text('rule = [1, 2]\n')
    return _check(path, ctx)


def policy_binary(folder: Path, ctx: dict) -> Case:
    path = folder / "binary.toml"
    path.write_bytes(b"\xff\xfe\x00rule\x00" * 10)
    return _check(path, ctx)


#: name -> builder(folder, context) for inputs that must be refused with exit code 2.
REFUSED: dict[str, Callable[[Path, dict], Case]] = {f.__name__: f for f in (
    pt2_duplicate_config, pt2_config_is_a_list, zip_duplicate_members, zip_member_outside_root, zip_encrypted_member,
    zip_unknown_method, zip_declared_size_over_limit, zip_deflated_member_inflates_to_4_gib, pickled_module_payload, legacy_pickle_payload,
    safetensors_offsets_as_strings, safetensors_entry_not_an_object, safetensors_negative_shape, checkpoint_bare_tensor,
    torchscript_unguessable_input, npz_deflate_bomb, npz_header_lies, npz_duplicate_members, task_pt_payload,
    labels_negative, labels_minus_2_under_seq_ce, labels_boolean_under_ce, labels_too_large,
    run_config_grants_trust, run_config_names_a_factory, report_wrong_types, report_deep_nesting,
    masks_metadata_missing_keys, resume_checkpoint_bare_tensor, resume_checkpoint_wrong_logits,
    policy_deep_nesting, policy_wrong_types, policy_rule_not_a_table, policy_binary,
    run_config_model_not_an_object, run_config_deep_nesting, run_masks_are_a_pickle, diff_report_wrong_types,
)}


# -- running them: all cases in one child process (one interpreter start), its peak RSS bounding each -------------------
def _api_call(kind: str, args: list[str]) -> None:
    import modscope
    from modscope.commands.report import read_report
    from modscope.runs import RunFolder
    from modscope.taskdata import check_fits, load_task

    if kind == "load":
        modscope.load(args[0])
    elif kind == "task":
        task = load_task("a", args[0], loss=args[2] if len(args) > 2 else None)
        check_fits(modscope.load(args[1]), task)
    elif kind == "export":
        run = RunFolder.open(args[0])
        run.masks()
        run.load_model()
    elif kind == "report":
        read_report(args[0])
    elif kind == "diff":
        RunFolder.open(args[0]).report()
    elif kind == "policy":
        from modscope.policy import load_policy

        load_policy(args[0])


def batch_main(spec_path: str) -> None:
    """Inside the child: run each case through the CLI's ``main`` and its API call; record how each ended."""
    spec = json.loads(Path(spec_path).read_text())
    sys.path.insert(0, spec["module_dir"])
    from onnx_hostile import run_cli_captured
    results = {}
    for case in spec["cases"]:
        saved = {k: os.environ.get(k) for k in case["env"]}
        os.environ.update(case["env"])
        code, out, err = run_cli_captured(case["argv"])
        api: list[str] = []
        if case["api"][0] != "none":
            try:
                _api_call(*case["api"])
                api = ["no error"]
            except BaseException as exc:  # noqa: BLE001 - the class names are what the test checks
                api = [c.__name__ for c in type(exc).__mro__]
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        results[case["name"]] = {"code": code, "stdout": out.getvalue(), "stderr": err.getvalue(), "api": api,
                                 "present": [p for p in case["absent"] if os.path.exists(p)]}
    Path(spec["out"]).write_text(json.dumps(results))


def run_batch(cases: dict[str, Case], folder: Path, module_dir: Path) -> tuple[dict[str, dict], Any]:
    """Run every case in one child under an address-space limit: ``{name: result}`` and the child's outcome."""
    here = Path(__file__).parent
    sys.path.insert(0, str(here))
    from onnx_hostile import (
        _run,  # the limited-child runner the ONNX corpus uses (RLIMIT_AS, wait4 peak RSS)
    )

    spec, out = folder / "trust-batch.json", folder / "trust-results.json"
    spec.write_text(json.dumps({"cases": [{"name": n, "argv": c.argv, "api": list(c.api), "absent": c.absent, "env": c.env}
                                          for n, c in cases.items()], "out": str(out), "module_dir": str(module_dir)}))
    code = f"import sys; sys.path.insert(0, {str(here)!r}); import hostile; hostile.batch_main({str(spec)!r})"
    root = Path(__file__).resolve().parents[2]
    path = os.pathsep.join([str(root), str(root / "tests"), str(module_dir)])
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": path}
    outcome = _run([sys.executable, "-c", code], env)
    return (json.loads(out.read_text()) if out.exists() else {}), outcome
