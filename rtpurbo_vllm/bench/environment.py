"""What every benchmark result records about where it ran: the card, the versions, the commit."""

from __future__ import annotations

import importlib.metadata
import platform
import subprocess
from pathlib import Path
from typing import Any

from rtpurbo_vllm.bench.server import child_env


def environment() -> dict[str, Any]:
    """Card (from nvidia-smi: this process never creates a CUDA context, which would take memory from
    the servers), versions and the repository commit."""
    try:
        smi = subprocess.run(["nvidia-smi", "--query-gpu=name,memory.total,driver_version", "--format=csv,noheader"],
                             capture_output=True, text=True, timeout=30, check=True).stdout.strip().splitlines()
        device = smi[0] if smi else "no GPU listed by nvidia-smi"
    except (OSError, subprocess.SubprocessError) as exc:
        device = f"unknown ({type(exc).__name__} from nvidia-smi)"
    versions = {}
    for name in ("vllm", "torch", "transformers", "triton", "rtpurbo-vllm"):
        try:
            versions[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            versions[name] = None
    try:
        commit = subprocess.run(["git", "-C", str(Path(__file__).resolve().parents[2]), "describe", "--always",
                                 "--dirty"], capture_output=True, text=True, timeout=30).stdout.strip() or None
    except (OSError, subprocess.SubprocessError):
        commit = None
    env = {k: v for k, v in sorted(child_env().items()) if k.startswith(("VLLM_", "CUDA_", "TRITON_"))
           and not any(word in k for word in ("KEY", "TOKEN", "SECRET"))}
    return {"device": device, "python": platform.python_version(), "versions": versions, "commit": commit,
            "host": platform.node(), "env": env}
