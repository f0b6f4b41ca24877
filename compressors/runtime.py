"""The CPU runtime for the vision tower: eager fp32, or the measured fast path (int8 linear layers).

Chosen by measurement on a 2-core AVX2 machine (no VNNI, no AVX-512), side by side in one run (README "CPU
performance"): for SigLIP-so400m, torch's dynamic int8 linear layers (fbgemm, per-channel weights) beat eager fp32;
OpenVINO fp32 (`openvino.convert_model`) gains less, costs a minute and several GB to convert, and OpenVINO's int8
weight compression (nncf) is slower than fp32 on AVX2 (weights are decompressed for every matmul). So the fast path
is torch-native: no extra dependency, no conversion step, any batch size.

`optimize_tower(tower)` returns a drop-in replacement: the same class, `config`, call signature and outputs
(`hidden_states` included), with every `nn.Linear` an int8 dynamic-quantized linear. The patch embedding stays
fp32, so an encoder's fingerprint (config + patch-embedding weights) is the same on both runtimes and memories
stay compatible. The original module is left untouched (training and transformers' reference path keep fp32).

Which runtime: `--runtime eager|fast` on the CLI or `VIDMEM_RUNTIME`; the default is `fast` on a CPU and
`eager` on a GPU (the int8 kernels here are CPU kernels; a GPU runs bf16).
"""
from __future__ import annotations

import copy
import logging
import os

import torch
from torch import nn

from vidmem.errors import ConfigError

log = logging.getLogger(__name__)

RUNTIMES = ("eager", "fast", "fast-lm")  # fast-lm: also the language model (agents/runtime.py); the tower as fast
ENV = "VIDMEM_RUNTIME"
# Features of the int8 tower stay this close to eager fp32 (checked by tests/test_runtime.py on the tiny checkpoint,
# measured on the full-size architecture by bench/ingest.py): relative L2 error over the (B, L, D) features.
TOWER_TOLERANCE = 0.05


def resolve_runtime(spec: str | None = None, *, device: torch.device | str = "cpu") -> str:
    """A name from RUNTIMES: `spec`, else $VIDMEM_RUNTIME, else 'fast' on a CPU and 'eager' on a GPU."""
    value = (spec or os.environ.get(ENV) or "").strip().lower()
    if not value or value == "auto":
        return "fast" if torch.device(device).type == "cpu" else "eager"
    if value not in RUNTIMES:
        raise ConfigError(f"runtime {value!r} is not known; use eager, fast or fast-lm (--runtime or ${ENV}).")
    return value


def quantize_linears(module: nn.Module) -> nn.Module:
    """A copy of `module` whose `nn.Linear`s are int8 dynamic-quantized (per-channel weights, fbgemm)."""
    quantized = copy.deepcopy(module)
    qconfig = torch.ao.quantization.per_channel_dynamic_qconfig
    # torch.ao's eager quantization API is deprecated in favour of torchao, whose int8 path is ~40x slower on a CPU
    # without torch.compile (measured); it stays the fastest torch-native int8 on CPUs.
    import warnings

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        torch.ao.quantization.quantize_dynamic(quantized, {nn.Linear: qconfig}, inplace=True)
    return quantized.eval()


def can_optimize(module: nn.Module) -> bool:
    """The fast path runs float32 modules on a CPU only."""
    param = next(module.parameters(), None)
    return param is not None and param.device.type == "cpu" and param.dtype == torch.float32


def optimize_tower(tower: nn.Module, runtime: str | None = None) -> nn.Module:
    """The vision tower to encode with: `tower` itself (eager, GPU, non-fp32) or its int8 fast copy."""
    chosen = resolve_runtime(runtime, device=next(tower.parameters()).device)
    if chosen == "eager" or not can_optimize(tower):  # fast and fast-lm: the same tower
        return tower
    fast = quantize_linears(tower)
    log.info("vision tower: int8 dynamic-quantized linear layers (runtime 'fast'; --runtime eager turns it off)")
    return fast


def runtime_name(module: nn.Module) -> str:
    """'fast (int8 linear)' when `module` went through the fast path, else 'eager fp32' (or its dtype)."""
    quantized = any(type(m).__module__.startswith("torch.ao.nn.quantized") for m in module.modules())
    if quantized:
        return "fast (int8 dynamic linear, fbgemm)"
    param = next(module.parameters(), None)
    return f"eager {str(param.dtype).replace('torch.', '') if param is not None else 'fp32'}"
