"""transformers models: named inputs and attention masks under vmap (no loop fallback), masks equal to the loop
path's, tied heads as one weight, weight kinds, and a save_pretrained folder through fit, report and export."""

from __future__ import annotations

import json
import sys
import warnings
from collections.abc import Callable
from pathlib import Path

import numpy as np
import pytest
import torch

transformers = pytest.importorskip("transformers")

import modscope  # noqa: E402
from modscope.errors import ModscopeWarning  # noqa: E402

N, L, VOCAB = 16, 6, 40


def _ids() -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(1)
    ids = torch.randint(1, VOCAB, (N, L), generator=gen)
    mask = torch.ones(N, L, dtype=torch.long)
    mask[::2, 4:] = 0  # half of the examples are padded
    return ids, mask


def _lm_labels(ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    return torch.where(mask.bool(), ids, -100)


def bert() -> tuple[torch.nn.Module, dict, torch.Tensor, str]:
    cfg = transformers.BertConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                                  intermediate_size=32, max_position_embeddings=16, num_labels=2)
    ids, mask = _ids()
    return transformers.BertForSequenceClassification(cfg), {"input_ids": ids, "attention_mask": mask}, ids[:, 0] % 2, "ce"


def gpt2() -> tuple[torch.nn.Module, dict, torch.Tensor, str]:
    cfg = transformers.GPT2Config(vocab_size=VOCAB, n_embd=16, n_layer=1, n_head=2, n_positions=16,
                                  bos_token_id=0, eos_token_id=0)
    ids, mask = _ids()
    return transformers.GPT2LMHeadModel(cfg), {"input_ids": ids, "attention_mask": mask}, _lm_labels(ids, mask), "seq_ce"


def llama() -> tuple[torch.nn.Module, dict, torch.Tensor, str]:
    # grouped-query attention (4 query heads, 2 key/value heads), RMSNorm, rotary embeddings, tied head
    cfg = transformers.LlamaConfig(vocab_size=VOCAB, hidden_size=16, num_hidden_layers=1, num_attention_heads=4,
                                   num_key_value_heads=2, intermediate_size=32, max_position_embeddings=16,
                                   tie_word_embeddings=True, bos_token_id=0, eos_token_id=0, pad_token_id=0)
    ids, mask = _ids()
    return transformers.LlamaForCausalLM(cfg), {"input_ids": ids, "attention_mask": mask}, _lm_labels(ids, mask), "seq_ce"


def vit() -> tuple[torch.nn.Module, dict, torch.Tensor, str]:
    cfg = transformers.ViTConfig(image_size=8, patch_size=4, num_channels=3, hidden_size=16, num_hidden_layers=1,
                                 num_attention_heads=2, intermediate_size=32, num_labels=3)
    pixels = torch.randn(N, 3, 8, 8, generator=torch.Generator().manual_seed(2))
    return transformers.ViTForImageClassification(cfg), {"pixel_values": pixels}, torch.arange(N) % 3, "ce"


def t5() -> tuple[torch.nn.Module, dict, torch.Tensor, str]:
    cfg = transformers.T5Config(vocab_size=VOCAB, d_model=16, d_kv=8, d_ff=32, num_layers=1, num_heads=2,
                                decoder_start_token_id=0, pad_token_id=0, eos_token_id=1)
    ids, mask = _ids()
    inputs = {"input_ids": ids, "attention_mask": mask, "decoder_input_ids": ids}
    return transformers.T5ForConditionalGeneration(cfg), inputs, _lm_labels(ids, mask), "seq_ce"


FAMILIES: dict[str, Callable[[], tuple[torch.nn.Module, dict, torch.Tensor, str]]] = {
    "bert": bert, "gpt2": gpt2, "llama": llama, "vit": vit, "t5": t5,
}


def _train(model: modscope.Model, tasks: list[modscope.Task], vectorize: str) -> modscope.MaskSet:
    config = modscope.MaskConfig(n_steps=3, batch_size=8, n_samples=2, seed=0, vectorize=vectorize, threads=1)
    with warnings.catch_warnings():
        warnings.simplefilter("error", ModscopeWarning)  # the loop fallback's warning would fail the test
        return modscope.train_masks(model, tasks, config, progress=False)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_two_tasks_train_under_vmap_and_equal_the_loop(family: str) -> None:
    torch.manual_seed(0)
    net, inputs, labels, loss = FAMILIES[family]()
    net.eval()
    model = modscope.load(net)
    flipped = {k: v.flip(0) for k, v in inputs.items()}
    tasks = [modscope.Task("a", inputs, labels, loss=loss), modscope.Task("b", flipped, labels.flip(0), loss=loss)]
    before = {n: p.detach().clone() for n, p in net.named_parameters()}
    attn = net.config._attn_implementation

    vmapped = _train(model, tasks, "auto")
    looped = _train(model, tasks, "loop")

    assert vmapped.extra["vectorize"] == "vmap"
    assert looped.extra["vectorize"] == "loop"
    for t in ("a", "b"):
        for name in vmapped.logits[t]:
            assert torch.equal(vmapped[t][name], looped[t][name]), (t, name)
            # float reassociation between batched and per-sample matmuls only
            torch.testing.assert_close(vmapped.logits[t][name], looped.logits[t][name], atol=1e-5, rtol=0)
    # the user's model is left as it was: weights, attention implementation
    assert net.config._attn_implementation == attn
    assert all(torch.equal(before[n], p) for n, p in net.named_parameters())


def test_kinds_and_tied_head() -> None:
    net, *_ = llama()
    model = modscope.load(net)
    names = [w.name for w in model.weights]
    assert "lm_head.weight" not in names and names.count("model.embed_tokens.weight") == 1
    gpt2_kinds = {w.name: w.kind for w in modscope.load(gpt2()[0]).weights}
    assert gpt2_kinds["transformer.wte.weight"] == "embedding" and "lm_head.weight" not in gpt2_kinds
    kinds = {w.name: w.kind for w in model.weights}
    assert kinds["model.embed_tokens.weight"] == "embedding"
    assert kinds["model.norm.weight"] == "norm"  # RMSNorm scale
    assert kinds["model.layers.0.input_layernorm.weight"] == "norm"
    assert kinds["model.layers.0.self_attn.q_proj.weight"] == "weight"

    bert_kinds = {w.name: w.kind for w in modscope.load(bert()[0]).weights}
    assert bert_kinds["bert.embeddings.word_embeddings.weight"] == "embedding"
    assert bert_kinds["bert.embeddings.position_embeddings.weight"] == "embedding"
    assert bert_kinds["bert.embeddings.LayerNorm.weight"] == "norm"
    assert bert_kinds["bert.embeddings.LayerNorm.bias"] == "bias"

    vit_kinds = {w.name: w.kind for w in modscope.load(vit()[0]).weights}
    assert vit_kinds["vit.embeddings.patch_embeddings.projection.weight"] == "embedding"
    assert vit_kinds["vit.embeddings.position_embeddings"] == "embedding"
    assert vit_kinds["vit.embeddings.patch_embeddings.projection.bias"] == "bias"


def test_tied_head_is_masked_with_the_embedding() -> None:
    net, inputs, labels, _ = llama()
    model = modscope.load(net.eval())
    task = modscope.Task("lm", inputs, labels, loss="seq_ce", output="logits")
    zero_embedding = {"model.embed_tokens.weight": torch.zeros(net.model.embed_tokens.weight.shape, dtype=torch.bool)}
    from modscope.evaluation import predict

    logits = predict(model, task, zero_embedding)
    assert torch.count_nonzero(logits) == 0  # the head (the same weight) was zeroed too


def test_outputs_are_tensors_by_name() -> None:
    net, inputs, labels, _ = gpt2()
    model = modscope.load(net)
    with model.frozen() as module:
        out = model.run(module, {}, tuple(inputs.values()), tuple(inputs))
    assert set(out) == {"logits"}  # no cache
    task = modscope.Task("lm", inputs, labels, loss="seq_ce", output="logits")
    assert 0.0 <= modscope.evaluate(model, task) <= 1.0


def test_seq_ce_ignores_padding_labels() -> None:
    logits = torch.randn(2, 3, 5)
    labels = torch.tensor([[1, 2, -100], [3, -100, -100]])
    task = modscope.Task("t", torch.zeros(2, 1), labels, loss="seq_ce")
    expected = torch.nn.functional.cross_entropy(logits.reshape(-1, 5), labels.reshape(-1), reduction="sum") / 2
    torch.testing.assert_close(task.loss_fn()(logits, labels), expected)
    right = logits.clone()
    right[0, 0, 1] = right[0, 1, 2] = right[1, 0, 3] = 99.0  # correct on every real token, wrong on padding
    assert task.compute_metric(right, labels) == 1.0


def test_named_inputs_of_different_lengths_are_refused() -> None:
    with pytest.raises(modscope.errors.DataError):
        modscope.Task("t", {"input_ids": torch.zeros(4, 3), "attention_mask": torch.zeros(3, 3)}, torch.zeros(4))


def test_model_folder_fit_report_export(tmp_path: Path) -> None:
    from cli_fixtures import FIT_FLAGS, cli

    net, inputs, labels, _ = bert()
    folder = tmp_path / "bert"
    net.save_pretrained(folder)
    for name, rows in (("a", slice(0, 8)), ("b", slice(8, 16))):
        np.savez(tmp_path / f"{name}.npz", y=labels[rows].numpy(), **{k: v[rows].numpy() for k, v in inputs.items()})
    run = tmp_path / "run"
    assert cli("fit", folder, "--task", f"a={tmp_path / 'a.npz'}", "--task", f"b={tmp_path / 'b.npz'}",
               "--out", run, *FIT_FLAGS, "--batch-size", "4") == 0
    assert cli("report", run) == 0
    out = tmp_path / "without-b"
    assert cli("export", run, "--remove", "b", "-o", out) == 0

    masks = modscope.MaskSet.load(run / "masks.safetensors")
    reloaded = transformers.AutoModelForSequenceClassification.from_pretrained(out)
    params = dict(reloaded.named_parameters())
    original = dict(net.named_parameters())
    for name, keep in masks["b"].items():
        removed = params[name][keep]
        assert removed.numel() == 0 or torch.count_nonzero(removed) == 0
        torch.testing.assert_close(params[name][~keep], original[name][~keep])


def test_folder_with_its_own_code_needs_trust(tmp_path: Path) -> None:
    net, *_ = bert()
    net.save_pretrained(tmp_path)
    config = json.loads((tmp_path / "config.json").read_text())
    config["architectures"] = ["CustomModel"]
    config["auto_map"] = {"AutoModel": "modeling_custom.CustomModel"}
    (tmp_path / "config.json").write_text(json.dumps(config))
    with pytest.raises(modscope.errors.UntrustedFileError, match="--trust"):
        modscope.load(tmp_path)


def test_folder_without_transformers_names_the_extra(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    net, *_ = bert()
    net.save_pretrained(tmp_path)
    monkeypatch.setitem(sys.modules, "transformers", None)  # import transformers now raises ImportError
    with pytest.raises(modscope.errors.ModelLoadError, match=r"modscope\[hf\]"):
        modscope.load(tmp_path)


def test_named_inputs_from_a_safetensors_task_file(tmp_path: Path) -> None:
    from safetensors.torch import save_file

    from modscope.taskdata import load_task

    ids, mask = _ids()
    save_file({"input_ids": ids, "attention_mask": mask, "y": ids[:, 0] % 2}, tmp_path / "t.safetensors")
    task = load_task("t", tmp_path / "t.safetensors", loss="ce")
    assert set(task.input_names) == {"input_ids", "attention_mask"} and len(task) == N
    model = modscope.load(bert()[0].eval())
    assert 0.0 <= modscope.evaluate(model, task) <= 1.0
