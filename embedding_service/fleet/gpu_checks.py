"""Device health checks of the fleet, which model replicas run on a schedule and after inference errors.

A check is any callable `check(device: str, node_id: str, **args) -> str | None` returning a failure
reason, or None when healthy; each model names one by import path (`gpu_check`, default
`embedding_service.fleet.gpu_checks:cuda_check`) with keyword `gpu_check_args`. A fault it reports
quarantines the node (fleet/recycler.py).
"""

from __future__ import annotations

from pathlib import Path


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

