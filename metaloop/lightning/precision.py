"""Numeric precision and memory format of meta-training: which of Lightning's precisions an inner loop can take, and the ``auto`` choices.

Under ``trainer.precision="bf16-mixed"`` Lightning runs every step under ``torch.autocast``:
convolutions and matrix products compute in bfloat16, while the weights, the fast weights of
the inner loop, the inner optimizer's state and learned learning rates stay float32 (autocast
casts a float32 weight to bfloat16 on the way into an operation, and the gradient back to
float32 on the way out, so the inner update ``w - lr * g`` is float32 arithmetic).
``"16-mixed"`` is refused: its gradient scaler scales the outer loss only, and the inner
loop's gradients, taken by :func:`torch.autograd.grad` without a scale, underflow in float16
(a gradient below 6e-8 becomes zero: the inner step silently does nothing for that weight).
``"bf16-true"`` / ``"16-true"`` store the weights themselves in 16 bits, so the inner update's
arithmetic would be 16-bit: refused too.

Channels-last (NHWC) convolutions are faster where oneDNN or cuDNN have NHWC kernels for the
dtype (GPUs; CPUs with AVX-512 BF16 / AMX), and slower elsewhere (measured on an AVX2 CPU:
``benchmarks/results/speed.md``), hence :func:`auto_memory_format`.
"""

from __future__ import annotations

from typing import Literal

import torch
from torch import Tensor, nn

__all__ = [
    "ACCEPTED_PRECISIONS",
    "MemoryFormat",
    "auto_memory_format",
    "auto_precision",
    "bf16_fast",
    "check_precision",
    "has_conv",
    "resolve_memory_format",
    "to_memory_format",
]

MemoryFormat = Literal["auto", "channels_last", "contiguous"]
MEMORY_FORMATS: tuple[str, ...] = ("auto", "channels_last", "contiguous")

# Lightning's precision flags an inner loop can take ("auto" is resolved by auto_precision before Lightning sees it).
ACCEPTED_PRECISIONS: tuple[str, ...] = ("auto", "32-true", "32", "64-true", "64", "bf16-mixed")
_REFUSED = {
    "16-mixed": "float16 autocast scales the outer loss only: the inner loop's unscaled gradients underflow in float16",
    "16": "float16 autocast scales the outer loss only: the inner loop's unscaled gradients underflow in float16",
    "16-true": "16-bit weights make the inner update's arithmetic 16-bit",
    "bf16-true": "bfloat16 weights make the inner update's arithmetic bfloat16 (8 mantissa bits)",
    "bf16": "bfloat16 weights make the inner update's arithmetic bfloat16 (8 mantissa bits)",
}


def check_precision(precision: str | int) -> None:
    """Raises ``ValueError`` naming ``precision`` and the accepted values unless meta-training can run in it."""
    if str(precision) in ACCEPTED_PRECISIONS:
        return
    why = _REFUSED.get(str(precision), "it is not a precision metaloop's inner loops are tested in")
    raise ValueError(
        f"trainer.precision={precision!r} is refused ({why}); use one of {', '.join(ACCEPTED_PRECISIONS)} "
        "(bf16-mixed for 16-bit speed: its gradients need no scaling)"
    )


def bf16_fast(device_type: str) -> bool:
    """Returns whether bfloat16 autocast has hardware support on ``device_type`` ("cpu": AVX-512 BF16 or AMX; "cuda": Ampere or newer)."""
    if device_type == "cuda":
        return torch.cuda.is_available() and torch.cuda.is_bf16_supported(including_emulation=False)
    if device_type == "cpu":
        return bool(torch.backends.mkldnn.is_available() and torch.ops.mkldnn._is_mkldnn_bf16_supported())
    return False


def auto_precision(accelerator: str) -> str:
    """Returns the precision ``"auto"`` stands for on ``accelerator``: ``"bf16-mixed"`` on a CPU with fast bfloat16 (:func:`bf16_fast`), else ``"32-true"``.

    ``accelerator`` is Lightning's flag (``"cpu"``, ``"gpu"``, ``"cuda"``, ``"auto"``); ``"auto"``
    and ``"gpu"`` mean CUDA when it is available. On CUDA it is float32: meta-learning's small
    models are launch-bound there, and on an H200 bf16-mixed made MAML slower (1.70 against 2.47
    meta-steps/s for the Omniglot conv-4, ``benchmarks/results/gpu_h200.md``). On CPUs with
    AVX-512 BF16 or AMX, bf16-mixed made the same MAML step 2.2x faster (issue 14's measurement).
    """
    if accelerator in ("gpu", "cuda", "auto") and torch.cuda.is_available():
        device_type = "cuda"
    else:  # Lightning's "auto" is the CPU without CUDA ("gpu" without CUDA is Lightning's error to report)
        device_type = "cpu" if accelerator == "auto" else accelerator
    return "bf16-mixed" if device_type == "cpu" and bf16_fast("cpu") else "32-true"


def has_conv(model: nn.Module) -> bool:
    """Returns whether ``model`` has a 2-D convolution (what channels-last changes)."""
    return any(isinstance(m, nn.Conv2d) for m in model.modules())


def auto_memory_format(model: nn.Module, device_type: str, precision: str, batched: bool = False) -> torch.memory_format:
    """Returns the memory format ``"auto"`` stands for: channels-last for a conv net under bf16-mixed on CUDA or on a CPU with fast bfloat16; contiguous otherwise.

    Measured (``benchmarks/results/gpu_h200.md``): on an H200, channels-last makes sequential MAML 1.24x
    faster under bf16-mixed and 0.82x slower in float32. Tasks adapted under vmap (``batched``) stay
    contiguous: first-order MAML vmapped on CUDA failed in channels-last ("Tensor.clone(memory_format)
    inside vmap is only supported with ... preserve_format or contiguous_format").
    """
    if batched or not has_conv(model) or precision != "bf16-mixed":
        return torch.contiguous_format
    if device_type == "cuda" or (device_type == "cpu" and bf16_fast("cpu")):
        return torch.channels_last
    return torch.contiguous_format


def resolve_memory_format(
    choice: str, model: nn.Module, device_type: str, precision: str, batched: bool = False
) -> torch.memory_format:
    """Returns the ``torch.memory_format`` of ``choice`` (``"auto"``, ``"channels_last"`` or ``"contiguous"``).

    Raises:
        ValueError: for another ``choice``.
    """
    if choice == "auto":
        return auto_memory_format(model, device_type, precision, batched)
    if choice == "channels_last":
        return torch.channels_last
    if choice == "contiguous":
        return torch.contiguous_format
    raise ValueError(f"memory_format={choice!r} is not one of {', '.join(MEMORY_FORMATS)}")


def to_memory_format(x: Tensor, memory_format: torch.memory_format) -> Tensor:
    """Returns images ``x`` in ``memory_format``: ``(n, C, H, W)``, or ``(tasks, n, C, H, W)`` with each task's images in it; other tensors as they are."""
    if memory_format is torch.contiguous_format or x.ndim not in (4, 5) or not x.is_floating_point():
        return x
    if x.ndim == 4:
        return x.contiguous(memory_format=memory_format)
    # channels-last per task: strides (n*H*W*C, H*W*C, 1, W*C, C)
    return x.permute(0, 1, 3, 4, 2).contiguous().permute(0, 1, 4, 2, 3)
