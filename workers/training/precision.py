"""What `--precision auto` trains in: decided by the device, the CPU's features and the model's width.

Measured on 2-core AMD EPYCs (bench/RESULTS.md, fine-tuning), one AdamW step of a batch in bf16
autocast against fp32:

- AVX2 only (no AVX512-BF16, no AMX): bf16 is emulated, and the demo's ViT trained about 10x
  slower in it: fp32.
- AVX-512 BF16 without AMX: bf16 pays where the matrices are wide, and loses where they are
  narrow, since every cast around a small matmul costs more than the matmul saves. The demo's ViT
  (hidden 96) took 1.5-2x longer over whole 10-epoch runs in bf16 (vitbatch and the plain Trainer);
  per step, hidden 256 and 384 took 1.4-2.7x less, a ViT-S/16 at 224 px (hidden 384) 2.1-2.7x less. A model whose typical Linear layer is at least BF16_MIN_WIDTH wide gets bf16, others fp32.
- AMX: bf16 (the tiles run it natively).
- CUDA: bf16 where the GPU supports it.
"""

from __future__ import annotations

import torch

from workers.models import cpu_has_fast_bf16

# Between the widths measured on the AVX-512 BF16 EPYC: 96 (fp32 faster) and 384 (bf16 faster).
BF16_MIN_WIDTH = 256


def model_width(model: torch.nn.Module) -> int:
    """The median input width of the model's Linear layers (a ViT's hidden size; 0 without any)."""
    widths = sorted(m.in_features for m in model.modules() if isinstance(m, torch.nn.Linear))
    return widths[len(widths) // 2] if widths else 0


def cpu_trains_faster_in_bf16(model: torch.nn.Module) -> bool:
    """bf16 autocast beats fp32 for this model on this CPU (see the module's measurements)."""
    if torch.cpu._is_amx_tile_supported():
        return True
    return cpu_has_fast_bf16() and model_width(model) >= BF16_MIN_WIDTH


def resolve(precision: str, device: torch.device, model: torch.nn.Module) -> str:
    """auto -> bf16 or fp32 for this device and model; an explicit choice is kept."""
    if precision != "auto":
        return precision
    fast_bf16 = torch.cuda.is_bf16_supported() if device.type == "cuda" else cpu_trains_faster_in_bf16(model)
    return "bf16" if fast_bf16 else "fp32"
