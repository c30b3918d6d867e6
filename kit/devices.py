"""Device helpers for training and inference: which half precision a CUDA device runs natively, autocast.

`torch.cuda.is_bf16_supported()` also says True on GPUs that only *emulate* bfloat16 (its default
`including_emulation=True`): a Kaggle T4 or a P100 (compute capability 7.5 / 6.0) would then run autocast in an
emulated bf16, far slower than its fp16 tensor cores. Only compute capability >= 8 (A100, L4, H100, RTX 30xx+)
has bf16 in hardware.
"""

from __future__ import annotations

import torch


def has_native_bf16(device: torch.device | str) -> bool:
    """True for a CUDA device with bfloat16 in hardware (compute capability >= 8.0); False otherwise (CPU too)."""
    device = torch.device(device)
    if device.type != "cuda" or not torch.cuda.is_available():
        return False
    if torch.version.hip:  # ROCm GPUs run bf16 natively
        return True
    return torch.cuda.get_device_capability(device)[0] >= 8


def cuda_half_dtype(device: torch.device | str) -> torch.dtype:
    """bfloat16 where the GPU has it in hardware, else float16 (T4, P100, V100)."""
    return torch.bfloat16 if has_native_bf16(device) else torch.float16


def autocast(device: torch.device, amp: bool):
    if amp and device.type == "cuda":
        return torch.autocast("cuda", dtype=cuda_half_dtype(device))
    return torch.autocast(device.type, enabled=False)
