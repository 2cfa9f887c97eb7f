"""Resumable training state without pickle: tensors in safetensors, the rest as JSON in its header."""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import Tensor

from flowpress.compress.distributed import _why
from flowpress.errors import FlowpressError
from flowpress.files import staged_file
from flowpress.models import DiffusersDenoiser


@dataclass
class TrainState:
    model: DiffusersDenoiser
    ema: DiffusersDenoiser
    opt: torch.optim.Optimizer
    step: int = 0
    losses: list[float] = field(default_factory=list)


STATE_FORMAT = "flowpress-train-state/1"


@dataclass(frozen=True)
class SavedState:
    """A training state as written by _save_state: tensors named model/<key>, ema/<key> and
    opt/<param>/<key>; meta: the JSON rest (format, step, losses, param_groups, opt_state, sha256)."""

    tensors: dict[str, Tensor]
    meta: dict[str, Any]

    def part(self, prefix: str) -> dict[str, Tensor]:
        return {k[len(prefix) :]: v for k, v in self.tensors.items() if k.startswith(prefix)}


def _state_digest(tensors: dict[str, Tensor], meta: dict[str, Any]) -> str:
    """sha256 over the name, dtype, shape and bytes of every tensor (in name order) and the JSON rest."""
    digest = hashlib.sha256(json.dumps(meta, sort_keys=True).encode())
    for name in sorted(tensors):
        t = tensors[name]
        digest.update(f"{name}|{t.dtype}|{tuple(t.shape)}|".encode())
        digest.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return digest.hexdigest()


def _save_state(state: TrainState, path: Path) -> None:
    """Write `state` to `path` without pickle: one safetensors file of every tensor (model, EMA, optimizer
    moments) whose metadata holds the rest as JSON, with the sha256 of both; temporary file, then rename."""
    from safetensors.torch import save_file

    opt = state.opt.state_dict()
    tensors = {f"model/{k}": v for k, v in state.model.state_dict().items()}
    tensors.update({f"ema/{k}": v for k, v in state.ema.state_dict().items()})
    opt_state: dict[str, dict[str, Any]] = {}
    for param, entry in opt["state"].items():
        opt_state[str(param)] = {k: v for k, v in entry.items() if not isinstance(v, Tensor)}
        tensors.update({f"opt/{param}/{k}": v for k, v in entry.items() if isinstance(v, Tensor)})
    tensors = {k: v.detach().cpu().contiguous() for k, v in tensors.items()}
    meta = {
        "format": STATE_FORMAT,
        "step": state.step,
        "losses": state.losses,
        "param_groups": opt["param_groups"],
        "opt_state": opt_state,
    }
    meta = json.loads(json.dumps(meta))  # what reading it back gives (tuples become lists), for the digest
    meta["sha256"] = _state_digest(tensors, meta)
    with staged_file(path) as tmp:
        save_file(tensors, str(tmp), metadata={"flowpress": json.dumps(meta)})


def read_state(path: Path) -> SavedState:
    """A _save_state file, read without pickle and checked against its sha256; an unreadable,
    truncated or altered file is a FlowpressError."""
    from safetensors import safe_open

    def bad(reason: str) -> FlowpressError:
        return FlowpressError(f"{path}: not a whole training state ({reason}); delete it to start that stage afresh")

    try:
        with safe_open(str(path), framework="pt") as f:
            meta = json.loads((f.metadata() or {})["flowpress"])
            tensors = {k: f.get_tensor(k) for k in f.keys()}
    except Exception as e:  # SafetensorError (header, size), KeyError / ValueError (metadata), OSError
        raise bad(_why(e)) from None
    found = meta.get("format") if isinstance(meta, dict) else None
    if found != STATE_FORMAT:
        raise bad(f"format {found!r}, expected {STATE_FORMAT!r}")
    sha = meta.pop("sha256", None)
    if sha != _state_digest(tensors, meta):
        raise bad("sha256 mismatch")
    return SavedState(tensors, meta)


def _load_state(state: TrainState, path: Path) -> None:
    """Restore `state` from read_state(path); a state of another model or optimizer is a FlowpressError."""
    saved = read_state(path)
    try:
        opt_state = {
            int(param): {**rest, **saved.part(f"opt/{param}/")} for param, rest in saved.meta["opt_state"].items()
        }
        state.model.load_state_dict(saved.part("model/"))
        state.ema.load_state_dict(saved.part("ema/"))
        state.opt.load_state_dict({"state": opt_state, "param_groups": saved.meta["param_groups"]})
        state.step, state.losses = int(saved.meta["step"]), [float(x) for x in saved.meta["losses"]]
    except (KeyError, RuntimeError, TypeError, ValueError) as e:  # another model's or optimizer's state
        raise FlowpressError(
            f"{path}: training state does not fit this model ({_why(e)}); delete it to start that stage afresh"
        ) from None
