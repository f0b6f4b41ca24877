"""The CPU runtime of a loaded VLM: which fast paths its vision tower and language model take.

Runtimes (`--runtime` or $VIDMEM_RUNTIME; see `vidmem.compressors.runtime` for how they were chosen):
- `eager`: everything fp32 as loaded (the reference; always the choice on a GPU);
- `fast` (the CPU default): the vision tower's linear layers run int8 (`optimize_tower`), features within
  `TOWER_TOLERANCE` of eager; the language model stays fp32 (its int8 path is `fast-lm`);
- `fast-lm`: `fast`, plus the language model's decoder linear layers int8 (`optimize_language_model`). Opt-in:
  prefill measured ~1.3-1.4x faster, but hidden states drift further from fp32 (`LM_TOLERANCE`) and only random
  weights could be checked here, so answers of a real checkpoint may change.

Both keep the call signatures: the language model still takes `inputs_embeds`, `position_ids` and a transformers
`Cache` in `past_key_values` (the kept KV cache), since only its `nn.Linear`s are swapped for int8 ones.
"""
from __future__ import annotations

import logging
import warnings
from typing import Any

import torch
from torch import nn

from vidmem.compressors.runtime import RUNTIMES, can_optimize, optimize_tower, resolve_runtime, runtime_name
log = logging.getLogger(__name__)

# Relative L2 error of the last hidden state, int8 decoder versus fp32 (tests/test_runtime.py, tiny checkpoint).
LM_TOLERANCE = 0.35


resolve = resolve_runtime  # a name from RUNTIMES: the flag, else $VIDMEM_RUNTIME, else fast on a CPU, eager on a GPU
__all__ = ["RUNTIMES", "LM_TOLERANCE", "resolve", "optimize_language_model", "apply_runtime", "describe"]


def optimize_language_model(language_model: nn.Module, runtime: str | None = None) -> nn.Module:
    """`language_model` with int8 dynamic linear layers under 'fast-lm' (changed in place), else unchanged.

    Same forward signature (inputs_embeds, position_ids, past_key_values=Cache, use_cache) and outputs.
    """
    param = next(language_model.parameters())
    if resolve(runtime, device=param.device) != "fast-lm" or not can_optimize(language_model):
        return language_model
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # torch.ao's quantize_dynamic is deprecated (see compressors/runtime.py)
        torch.ao.quantization.quantize_dynamic(
            language_model, {nn.Linear: torch.ao.quantization.per_channel_dynamic_qconfig}, inplace=True
        )
    log.info("language model: int8 dynamic-quantized linear layers (runtime 'fast-lm')")
    return language_model


def apply_runtime(vlm: Any, runtime: str | None = None) -> str:
    """Put a loaded VLM on `runtime` (at load time, before any encoding); returns the runtime in effect.

    The encoder's tower is replaced by `optimize_tower`'s copy (the model's own tower stays fp32 for training and
    the reference path); under 'fast-lm' the language model is quantized where the model holds it.
    """
    chosen = resolve(runtime, device=vlm.device)
    if chosen == "eager":
        return chosen
    vlm.encoder.tower = optimize_tower(vlm.encoder.tower, chosen)
    if chosen == "fast-lm":
        inner = getattr(vlm.model, "model", vlm.model)
        inner.language_model = optimize_language_model(inner.language_model, chosen)
    return chosen


def describe(vlm: Any) -> dict[str, str]:
    """What each part of `vlm` runs on, for benches and `--json` reports."""
    inner = getattr(vlm.model, "model", vlm.model)
    return {"vision_tower": runtime_name(vlm.encoder.tower), "language_model": runtime_name(inner.language_model)}
