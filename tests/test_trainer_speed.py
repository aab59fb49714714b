"""The fast step and the memory plan change nothing: same seeds, bit-identical masks and logits."""

from __future__ import annotations

import hashlib

import numpy as np
import pytest
import torch
from torch import nn

import modscope
from modscope.errors import OutOfMemoryPlanError
from modscope.masks import native
from modscope.masks import trainer as trainer_module
from modscope.masks.memory import parse_bytes, plan_passes
from modscope.masks.trainer import MaskTrainer

# Recorded on CPU with the learner as it was before the buffer-reusing step and the memory plan (commit c338bc8):
# per task, the masks packed as bits (weights in name order, flattened) and the first 16 hex digits of the SHA-256
# of the float32 logits. Any change in the noise stream, the sampler's arithmetic or the order of work shows here.
REFERENCE = {
    "first": (("0100730c83030030480c30c32012000900800000044644806de0348c040020016480204004c0418008088511400a0000231409a"
               "3413680"), "585109a353e065b2"),
    "second": (("612031c08a040ab00d00044080010888e2050000544244e8000012800000e0018280408004c04982ac88821084060000b45380"
                "a3701680"), "71b34d894f6c3f1d"),
}
CONFIG = {"n_steps": 40, "batch_size": 32, "n_samples": 4, "lr": 0.2, "init": 0.3, "beta": 1e-2, "mask_biases": True, "seed": 5}


def reference_net() -> nn.Module:
    g = torch.Generator().manual_seed(7)
    net = nn.Sequential(nn.Linear(6, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))
    with torch.no_grad():
        for p in net.parameters():
            p.copy_(torch.randn(p.shape, generator=g) * 0.5)
    return net


def reference_tasks() -> list[modscope.Task]:
    g = torch.Generator().manual_seed(11)
    x = torch.randn(96, 6, generator=g)
    return [modscope.Task("first", x, (x[:, 0] > 0).long() + (x[:, 1] > 0).long()),
            modscope.Task("second", x, (x[:, 2] > x[:, 3]).long())]


def fingerprint(masks: modscope.MaskSet, task: str) -> tuple[str, str]:
    flat = torch.cat([masks.logits[task][w].flatten() for w in sorted(masks.logits[task])])
    bits = np.packbits((flat > 0).numpy()).tobytes().hex()
    return bits, hashlib.sha256(flat.numpy().tobytes()).hexdigest()[:16]


def train(**overrides) -> modscope.MaskSet:
    config = modscope.MaskConfig(**{**CONFIG, "compile": False, **overrides})
    return modscope.train_masks(reference_net(), reference_tasks(), config, progress=False)


@pytest.mark.parametrize("kernels", ["native", "torch"])
def test_masks_and_logits_are_bit_identical_to_the_recorded_reference(kernels, request):
    calls = request.getfixturevalue("torch_kernels" if kernels == "torch" else "native_calls")
    masks = train()
    if kernels == "native":  # every kernel ran: per pass one draw and one call per masked tensor (3 weights, 3 biases)
        assert calls["uniforms_many"] >= CONFIG["n_steps"], calls
        assert calls["keep"] == calls["logit_grad"] == 6 * calls["uniforms_many"], calls
        assert calls["adam_step"] == CONFIG["n_steps"], calls  # every step (the first leaves it to torch, which makes the state)
    for task, (bits, digest) in REFERENCE.items():
        assert fingerprint(masks, task) == (bits, digest), f"task {task!r} changed"


@pytest.mark.parametrize("pass_size", [4, 2, 3, 1])
def test_passes_of_whole_tasks_or_sample_chunks_give_the_same_masks(pass_size):
    masks = train(pass_size=pass_size)
    for task, (bits, digest) in REFERENCE.items():
        got_bits, got_digest = fingerprint(masks, task)
        assert got_bits == bits, f"task {task!r}: masks changed with pass_size={pass_size}"
        if pass_size >= CONFIG["n_samples"]:  # whole tasks per pass: the same arithmetic, bit for bit
            assert got_digest == digest
    reference = train()
    for task in REFERENCE:
        for w, lg in reference.logits[task].items():
            torch.testing.assert_close(masks.logits[task][w], lg, rtol=0, atol=1e-5)


def test_the_plan_splits_a_step_to_fit_max_memory_and_keeps_the_masks(monkeypatch):
    from modscope.masks import memory

    held = 1 << 30
    monkeypatch.setattr(memory, "process_memory", lambda device: (held, 1 << 34))  # RSS moves in a shared run
    net, tasks = reference_net(), reference_tasks()
    model = modscope.load(net)
    config = modscope.MaskConfig(**{**CONFIG, "compile": False})
    whole = MaskTrainer(model, model.module_on("cpu"), tasks, config, torch.device("cpu")).plan
    assert len(whole.passes) == 1 or whole.replicas >= CONFIG["n_samples"]
    per_replica = whole.parts["replica"]
    # room for the fixed part and three replicas: passes of three samples of one task
    limit = held + whole.parts["tasks"] + 3 * per_replica + per_replica // 2
    notes: list[str] = []
    heaps: list[str] = []
    for name in ("retained_heap", "strict_heap"):  # the tight plan returns freed memory at once instead of keeping it
        monkeypatch.setattr(trainer_module, name, lambda *a, _f=getattr(memory, name), _n=name: heaps.append(_n) or _f(*a))
    masks = modscope.train_masks(net, tasks, modscope.MaskConfig(**{**CONFIG, "compile": False, "max_memory": limit}),
                                 progress=False, notes=notes.append)
    assert "passes of up to 3" in notes[0], notes
    assert heaps == ["strict_heap"] and memory._HEAP_BLOCKS == [0]
    tight = MaskTrainer(model, model.module_on("cpu"), tasks, modscope.MaskConfig(**{**CONFIG, "max_memory": limit}),
                        torch.device("cpu"))
    assert tight.plan.parts["optimizer"] == 0 and tight.optimizer.param_groups[0]["fused"] is True  # no Adam temporaries
    assert whole.parts["optimizer"] > 0
    for task, (bits, _) in REFERENCE.items():
        assert fingerprint(masks, task)[0] == bits


def test_a_sample_that_does_not_fit_is_refused_with_the_estimate_and_the_levers():
    config = modscope.MaskConfig(**{**CONFIG, "max_memory": "1MB"})
    with pytest.raises(OutOfMemoryPlanError) as caught:
        modscope.train_masks(reference_net(), reference_tasks(), config, progress=False)
    message = str(caught.value)
    assert "\n" not in message and message.count("; ") == 1, "one sentence: the estimate; the levers"
    for words in ("one mask sample needs about", "MiB", "include=", "fewer samples", "smaller batch", "max_memory"):
        assert words in message, message


def test_plan_arithmetic():
    plan = plan_passes(tasks=10, samples=4, per_replica=100, per_task=10, base=1000, limit=1000 + 100 + 8 * 100)
    assert plan.replicas == 8 and [p.tasks for p in plan.passes] == [range(k, k + 2) for k in range(0, 10, 2)]
    assert plan.estimate == 1000 + 100 + 800 and plan.unchunked == 1000 + 100 + 4000
    # each task of the largest pass keeps a row of the pass buffers: 2 tasks of 4 samples no longer fit that limit
    rows = plan_passes(tasks=10, samples=4, per_replica=100, per_task=10, base=1000, limit=1000 + 100 + 8 * 100,
                       per_pass_task=50)
    assert rows.replicas == 4 and rows.estimate == 1000 + 100 + 50 + 400
    split = plan_passes(tasks=2, samples=4, per_replica=100, per_task=10, base=0, limit=20 + 300)
    assert [(p.tasks, p.samples) for p in split.passes] == [(range(1), (0, 3)), (range(1), (3, 4)),
                                                           (range(1, 2), (0, 3)), (range(1, 2), (3, 4))]
    assert parse_bytes("2 GiB") == 2 << 30 and parse_bytes("1.5kB") == 1500
    with pytest.raises(modscope.errors.InvalidParameterError):
        modscope.MaskConfig(max_memory="lots")


def test_noise_drawn_ahead_in_threads_gives_the_same_masks_and_logits(torch_kernels):
    threads = torch.get_num_threads()
    torch.set_num_threads(2)
    try:
        masks = train(threads=2)
        split = train(pass_size=4, threads=2)  # one task per pass: the next task's noise is drawn while this one runs
    finally:
        torch.set_num_threads(threads)
    for task, expected in REFERENCE.items():
        assert fingerprint(masks, task) == expected and fingerprint(split, task) == expected


def test_a_checkpoint_taken_while_noise_is_drawn_ahead_holds_the_streams_of_the_step_boundary(tmp_path, torch_kernels):
    from modscope.masks.checkpoint import TrainingState

    def saved_generators(threads: int) -> list[torch.Tensor]:
        before = torch.get_num_threads()
        torch.set_num_threads(threads)
        try:
            model = modscope.load(reference_net())
            config = modscope.MaskConfig(**{**CONFIG, "compile": False, "pass_size": 4})
            trainer = MaskTrainer(model, model.module_on("cpu"), reference_tasks(), config, torch.device("cpu"))
            for _ in range(3):
                trainer.step()
            assert trainer._ahead == (threads > 1)
            path = tmp_path / f"ckpt{threads}.pt"
            trainer.save(path, TrainingState(3, {}, [0.0, 0.0]))
            trainer.close()
        finally:
            torch.set_num_threads(before)
        return torch.load(path, weights_only=True)["generators"]

    for ahead, plain in zip(saved_generators(2), saved_generators(1)):
        assert torch.equal(ahead, plain)


def test_step_buffers_give_the_same_bits_whatever_the_block_size_and_with_the_native_kernels(monkeypatch, native_calls):
    from modscope.masks.sampling import StepBuffers

    loaded = native._loaded

    g = torch.Generator().manual_seed(3)
    weights = [torch.randn(300, 70, generator=g), torch.randn(90, generator=g), torch.randn(20, 300, generator=g)]
    offsets = [0, 21000, 21090]
    total = 27090
    logits = torch.randn(2, total, generator=g) * 3
    uniforms = torch.rand(2, 4, total, generator=g)
    grads = [torch.randn(2, 4, *w.shape, generator=g) for w in weights]
    grads[0] = grads[0].transpose(-1, -2).contiguous().transpose(-1, -2)  # as a linear layer's weight gradient
    results = []
    for block, kernels in ((None, (None, "off")), (4096, (None, "off")), (None, loaded)):
        monkeypatch.setattr(native, "_loaded", kernels)
        buffers = StepBuffers(weights, offsets, replicas=8, tasks=2)
        buffers.block = block or buffers.block  # a few blocks per weight, or many
        effective = [e.clone() for e in buffers.effective(logits, uniforms, weights)]
        out = torch.full((2, total), 7.0)
        buffers.logit_grad(logits, uniforms, grads, out, 1.0, accumulate=False)
        buffers.logit_grad(logits, uniforms, grads, out, 1.0, accumulate=True)
        results.append((effective, out))
    (eff1, out1), *others = results
    for eff, out in others:
        assert all(torch.equal(a, b) for a, b in zip(eff1, eff))
        assert torch.equal(out1, out) and out1.abs().sum() > 0  # τ = 1: + − × ÷ only, exact whatever the blocks
    assert native_calls["keep"] == 3 and native_calls["logit_grad"] == 6  # the third round ran in the kernels


@pytest.mark.parametrize("kernels,threads", [("native", 1), ("torch", 2)])  # torch, 2 threads: noise drawn ahead
def test_timing_the_pass_groupings_changes_no_bit_of_the_masks(monkeypatch, request, kernels, threads):
    if kernels == "torch":
        request.getfixturevalue("torch_kernels")
    elif native.kernels() is None:
        pytest.skip(native.status())
    monkeypatch.setattr(trainer_module, "TUNE_MIN_STEPS", 0)
    switches: list[int] = []
    use_plan = MaskTrainer._use_plan
    monkeypatch.setattr(MaskTrainer, "_use_plan", lambda self, plan, ahead: switches.append(plan.replicas) or use_plan(self, plan, ahead))
    notes: list[str] = []
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        masks = modscope.train_masks(reference_net(), reference_tasks(),
                                     modscope.MaskConfig(**{**CONFIG, "compile": False, "threads": threads}),
                                     progress=False, notes=notes.append)
    finally:
        torch.set_num_threads(before)
    assert switches[:2] == [4 * threads, 4 * (3 - threads)], switches  # the default first, then the other grouping
    assert any(n.startswith("pass grouping of the 2 tasks timed over the first steps: ") for n in notes), notes
    for task, expected in REFERENCE.items():
        assert fingerprint(masks, task) == expected
