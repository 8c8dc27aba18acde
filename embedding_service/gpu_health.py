"""Device health checks that model replicas run on a schedule and after inference errors.

A check is any callable `check(device: str, node_id: str, **args) -> str | None`
returning a failure reason, or None when healthy; the model settings name it by
import path (`gpu_check`) with keyword `gpu_check_args`.
"""

from __future__ import annotations

import importlib
from pathlib import Path
from typing import Callable

Check = Callable[..., "str | None"]


def cuda_check(device: str, node_id: str) -> str | None:
    """The device is present and runs a tiny kernel; nothing to check on CPU."""
    if not device.startswith("cuda"):
        return None
    import torch

    try:
        if not torch.cuda.is_available() or torch.cuda.device_count() == 0:
            return "CUDA device not available"
        x = torch.ones(16, device=device)
        if float((x * 2).sum().item()) != 32.0:
            return "CUDA kernel returned a wrong result"
        torch.cuda.mem_get_info()
        torch.cuda.synchronize()
    except Exception as exc:  # any CUDA error is a fault of this node's GPU
        return f"CUDA error: {type(exc).__name__}: {exc}"
    return None


def fault_file_check(device: str, node_id: str, directory: str) -> str | None:
    """Chaos testing: reports a fault while `<directory>/<node_id>` exists (its text is the reason)."""
    flag = Path(directory) / node_id
    if flag.exists():
        return flag.read_text().strip() or "injected fault"
    return None


def load_check(import_path: str) -> Check:
    module, _, name = import_path.partition(":")
    return getattr(importlib.import_module(module), name)
