"""Hugging Face ``transformers`` models in: an in-memory ``PreTrainedModel`` or a local model folder.

A model folder is what ``save_pretrained`` writes: ``config.json`` and the weights as ``*.safetensors`` (one file,
or shards with an index). It is read with ``transformers`` (the optional extra ``modscope[hf]``), which is imported
only here and only when such a model is loaded. Code shipped with a model (``auto_map`` in its config, loaded with
``trust_remote_code``) runs only when the user passes ``trust=True`` (``--trust``); pickled ``pytorch_model.bin``
weights are never read, only safetensors.

Calls made by modscope run without a cache (``use_cache=False``) and return the output's tensors as a dict
(``{"logits": ...}``), which `Task` reads by name (``output="logits"``, the default when present). While masks are
trained or evaluated, attention runs on the model's own eager (matmul + softmax) implementation, which
``torch.func.vmap`` batches, and its attention masks are built without data-dependent shortcuts; both are restored
afterwards.

Example:
    >>> import transformers, modscope
    >>> config = transformers.GPT2Config(vocab_size=32, n_embd=8, n_layer=1, n_head=2, n_positions=8,
    ...                                     bos_token_id=0, eos_token_id=0)
    >>> model = modscope.load(transformers.GPT2LMHeadModel(config))
    >>> model.source.format, model.weight("transformer.wte.weight").kind
    ('transformers', 'embedding')
"""

from __future__ import annotations

import contextlib
import inspect
import json
import os
import sys
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..errors import InvalidParameterError, ModelLoadError, UntrustedFileError
from ..filemodes import match_umask
from ..model import Model, Source, weights_checksum

_INSTALL = 'transformers is not installed; install the extra: pip install "modscope[hf]" (from a clone: pip install -e ".[hf]")'


def is_transformers_model(obj: Any) -> bool:
    """Whether ``obj`` is a ``transformers.PreTrainedModel`` (without importing transformers)."""
    module = sys.modules.get("transformers")
    cls = getattr(module, "PreTrainedModel", None) if module is not None else None
    return cls is not None and isinstance(obj, cls)


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding ``config.json`` and safetensors weights (``save_pretrained``'s layout)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and any(p.glob("*.safetensors"))


class TransformersModel(Model):
    """A `Model` over a ``transformers.PreTrainedModel``: calls without cache, tensor outputs, batchable attention."""

    def call_options(self, module: nn.Module) -> dict[str, Any]:
        params = inspect.signature(module.forward).parameters
        return {k: v for k, v in (("use_cache", False), ("return_dict", True)) if k in params}

    def reduce_output(self, output: Any) -> Any:
        if isinstance(output, dict):  # a ModelOutput: keep its tensors (and tuples of them); drop caches
            return {k: v for k, v in output.items() if _is_tensors(v)}
        return output

    @contextlib.contextmanager
    def frozen(self, device: torch.device | str | None = None, *, train: bool = False) -> Iterator[nn.Module]:
        with super().frozen(device, train=train) as module, batchable_attention(module):
            yield module


def _is_tensors(value: Any) -> bool:
    if isinstance(value, torch.Tensor):
        return True
    return isinstance(value, tuple | list) and all(_is_tensors(v) for v in value)


@contextlib.contextmanager
def batchable_attention(module: nn.Module) -> Iterator[None]:
    """Run ``module``'s attention on its eager implementation with masks built without data-dependent shortcuts.

    transformers' default (``sdpa``) and its mask builders skip the mask when no token is padded, a test on the
    data that ``torch.func.vmap`` cannot batch; the eager path computes the same attention with plain tensor ops.
    The module's implementation setting and transformers' eager mask builder are restored on exit.
    """
    from transformers import masking_utils

    previous = getattr(module.config, "_attn_implementation", None)
    masks = masking_utils.ALL_MASK_ATTENTION_FUNCTIONS
    had_local = "eager" in masks._local_mapping
    old_local = masks._local_mapping.get("eager")
    eager_mask = masks["eager"]

    def eager_mask_always(*args: Any, **kwargs: Any) -> Any:
        kwargs["allow_is_bidirectional_skip"] = False
        return eager_mask(*args, **kwargs)

    try:
        if previous not in (None, "eager"):
            module.set_attn_implementation("eager")
        masks["eager"] = eager_mask_always
        yield
    finally:
        if had_local:
            masks["eager"] = old_local
        else:
            masks._local_mapping.pop("eager", None)
        if previous not in (None, "eager"):
            module.set_attn_implementation(previous)


def load_transformers(model: nn.Module, *, path: str | None = None, checksum: str | None = None) -> TransformersModel:
    """Wrap a ``transformers.PreTrainedModel`` (never modified) as a `Model`.

    Args:
        model: the model.
        path: the folder it was read from, if any.
        checksum: the weights' checksum (computed from the weights when omitted).

    Returns:
        A `TransformersModel`; a tied LM head and input embedding are one weight.
    """
    params = dict(model.named_parameters())
    details = {"architecture": type(model).__name__, "model_type": getattr(model.config, "model_type", "")}
    source = Source("transformers", path=path, checksum=checksum or weights_checksum(params), details=details)
    return TransformersModel(model, source=source)


def load_folder(path: str | os.PathLike, *, trust: bool = False) -> TransformersModel:
    """Load a local model folder (``config.json`` + ``*.safetensors``) with transformers.

    Args:
        path: the folder.
        trust: allow the model's own code (``auto_map``, ``trust_remote_code``); never implied.

    Raises:
        ModelLoadError: transformers is missing, or the folder cannot be read as a model.
        UntrustedFileError: the model needs its own code and ``trust=True`` was not given.
    """
    transformers = _require()
    p = Path(path)
    try:
        config_dict = json.loads((p / "config.json").read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ModelLoadError(f"{p}/config.json cannot be read as JSON ({exc})") from exc
    if not isinstance(config_dict, dict):
        raise ModelLoadError(f"{p}/config.json is not a JSON object")
    architectures = config_dict.get("architectures") or []
    cls = getattr(transformers, architectures[0], None) if architectures and isinstance(architectures[0], str) else None
    if config_dict.get("auto_map") and not trust and cls is None:
        raise UntrustedFileError(
            f"the model in {p} needs its own Python code (auto_map in config.json), which modscope runs only with --trust"
        )
    cls = cls or transformers.AutoModel
    try:
        model = cls.from_pretrained(str(p), local_files_only=True, use_safetensors=True, trust_remote_code=trust)
    except Exception as exc:  # noqa: BLE001 - transformers raises many kinds; one sentence for the user
        raise ModelLoadError(f"transformers cannot load the model folder {p}: {str(exc).splitlines()[0][:200]}") from exc
    model.eval()
    return load_transformers(model, path=str(p), checksum=folder_checksum(p))


def folder_checksum(p: Path) -> str:
    """sha256 over a model folder's config.json and safetensors files (names and contents)."""
    import hashlib

    from .files import file_sha256

    h = hashlib.sha256()
    for f in sorted([p / "config.json", *p.glob("*.safetensors")]):
        h.update(f.name.encode())
        h.update(file_sha256(f).encode())
    return h.hexdigest()


def _require() -> Any:
    try:
        import transformers
    except ImportError as exc:
        raise ModelLoadError(_INSTALL) from exc
    return transformers


def save_folder(model: Model, params: dict[str, torch.Tensor], out: str | os.PathLike) -> Path:
    """Write ``model`` with ``params`` (some weights zeroed) as a model folder ``transformers`` loads.

    The folder is written next to ``out`` under a temporary name and renamed into place, so a failure leaves no
    half-written folder.
    """
    import shutil
    import tempfile

    if not isinstance(model, TransformersModel):
        raise InvalidParameterError("only a transformers model can be written as a model folder")
    target = Path(out)
    if target.exists():
        raise InvalidParameterError(f"{target} exists; give a new folder name")
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent if str(target.parent) else "."))
    try:
        import copy

        module = copy.deepcopy(model.module)  # the user's module is never modified
        with torch.no_grad():
            for n, p in module.named_parameters():
                if n in params:
                    p.copy_(params[n].detach().to(p))
        module.save_pretrained(str(tmp), safe_serialization=True)
        match_umask(tmp)  # mkdtemp makes 0700
        os.replace(tmp, target)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return target
