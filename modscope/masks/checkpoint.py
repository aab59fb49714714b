"""Saving and resuming mask training: logits, optimizer, random generators, curves and step, in one file."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch

from ..errors import InvalidParameterError
from ..fileio import atomic_write


@dataclass
class TrainingState:
    step: int
    curves: dict[str, dict[str, list[float]]] = field(default_factory=dict)
    window: list[float] = field(default_factory=list)
    """Per-task sums of the losses since the last curve point, so a resumed run records the same curves."""
    window_steps: int = 0


def save_checkpoint(
    path: Path,
    identity: dict[str, Any],
    state: TrainingState,
    logits: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    generators: list[torch.Generator],
) -> None:
    """Write the state to ``path`` atomically (temporary file, then rename)."""
    payload = {
        "identity": identity,
        "step": state.step,
        "curves": state.curves,
        "window": state.window,
        "window_steps": state.window_steps,
        "logits": logits.detach().cpu(),
        "optimizer": optimizer.state_dict(),
        "generators": [g.get_state() for g in generators],
    }
    path.parent.mkdir(parents=True, exist_ok=True)
    with atomic_write(path) as tmp:
        torch.save(payload, tmp)


def load_checkpoint(
    path: Path,
    identity: dict[str, Any],
    logits: torch.Tensor,
    optimizer: torch.optim.Optimizer,
    generators: list[torch.Generator],
) -> TrainingState:
    """Restore a state saved by `save_checkpoint` into the given objects; the run must be the same."""
    try:
        payload = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # noqa: BLE001 - any failure means the file cannot be used
        raise InvalidParameterError(f"checkpoint {path} cannot be read ({exc}); delete it to start over") from exc
    if not isinstance(payload, dict):
        raise InvalidParameterError(f"checkpoint {path} holds a {type(payload).__name__}, not a modscope training state; "
                                    "delete it to start over")
    if payload.get("identity") != identity:
        raise InvalidParameterError(
            f"checkpoint {path} belongs to a different run (other tasks, config or model); delete it or resume the same run"
        )
    saved = payload.get("logits")
    if not isinstance(saved, torch.Tensor) or saved.shape != logits.shape or not saved.is_floating_point():
        shape = tuple(saved.shape) if isinstance(saved, torch.Tensor) else type(saved).__name__
        raise InvalidParameterError(f"checkpoint {path} is corrupt: its mask logits are {shape}, this run needs "
                                    f"{tuple(logits.shape)}; delete it to start over")
    try:
        with torch.no_grad():
            logits.copy_(saved)
        optimizer.load_state_dict(payload["optimizer"])
        for gen, gen_state in zip(generators, payload["generators"], strict=True):
            gen.set_state(gen_state)
        return TrainingState(int(payload["step"]), payload["curves"], list(payload["window"]), int(payload["window_steps"]))
    except (KeyError, TypeError, ValueError, RuntimeError) as exc:
        raise InvalidParameterError(f"checkpoint {path} is corrupt ({type(exc).__name__}: {str(exc).splitlines()[0][:120] if str(exc) else ''}); "
                                    "delete it to start over") from exc
