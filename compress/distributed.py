"""torchrun support for distillation: devices, the configuration hash (rank, world, the process group and
barriers: flowpress/ranks.py)."""

from __future__ import annotations

import hashlib
import json
import os
from dataclasses import asdict
from typing import Any

import torch


def device() -> torch.device:
    if torch.cuda.is_available():
        return torch.device("cuda", int(os.environ.get("LOCAL_RANK", "0")))
    return torch.device("cpu")


def config_hash(*parts: Any) -> str:
    text = json.dumps([asdict(p) if hasattr(p, "__dataclass_fields__") else p for p in parts], sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:10]


def _why(error: Exception) -> str:
    """The first line of an exception's message (its type when the message is empty), at most 200 characters."""
    text = str(error).strip()
    return (text.splitlines()[0] if text else type(error).__name__)[:200]
