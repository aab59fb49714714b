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

import json
import os
from pathlib import Path
from typing import Any

import torch

from ..checksums import folder_checksum
from ..errors import InvalidParameterError, ModelLoadError, UntrustedFileError
from ..filemodes import match_umask
from ..model import Model, TransformersModel, batchable_attention, is_transformers_model, load_transformers  # noqa: F401 - re-exported

_INSTALL = 'transformers is not installed; install the extra: pip install "modscope[hf]" (from a clone: pip install -e ".[hf]")'


def is_model_folder(path: str | os.PathLike) -> bool:
    """Whether ``path`` is a folder holding ``config.json`` and safetensors weights (``save_pretrained``'s layout)."""
    p = Path(path)
    return p.is_dir() and (p / "config.json").is_file() and any(p.glob("*.safetensors"))


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
