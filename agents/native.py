"""LLaVA-OneVision's own video path, for comparison and for users who want it.

Uniformly sampled frames go through the model's stock video route (vision tower -> projector -> 2x2 bilinear
pooling, 196 tokens per frame, plus the `image_newline` token; `VLM.video_embeds`), exactly as transformers'
`get_video_features` does, with the same template and greedy decoding as vidmem's answers. This is what vidmem's
budgeted evidence is measured against: at 1 fps an hour of video is 3600 x 196 = 705,600 visual tokens here, against
at most the budget with vidmem.
"""
from __future__ import annotations

import time
from typing import Callable

import numpy as np
import torch

from vidmem.agents.answer import Answer, Answerer

NATIVE_TOKENS_PER_FRAME = 196  # LLaVA-OneVision video frames: 27x27 features pooled 2x2 to 14x14


def native_tokens(frames: int) -> int:
    """Visual tokens the native path spends on `frames` frames (one newline token closes the video)."""
    return frames * NATIVE_TOKENS_PER_FRAME + 1


@torch.inference_mode()
def native_visual_embeds(vlm, frames: list[np.ndarray]) -> torch.Tensor:
    """(F * 196 + 1, H) projected, pooled video features through the model's own video path."""
    return vlm.video_embeds(vlm.encoder(frames))


def native_answer(
    answerer: Answerer, frames: list[np.ndarray], question: str, *, on_token: Callable[[str], None] | None = None
) -> Answer:
    """Answer from `frames` with the stock LLaVA-OneVision video representation (no memory, no budget)."""
    started = time.perf_counter()
    vlm = answerer.vlm
    with answerer.lock, torch.inference_mode():
        visual = native_visual_embeds(vlm, frames)
        embeds = torch.cat([vlm.head_embeds(), visual.to(vlm.dtype_of_embeddings), vlm.question_embeds(question)])
        answerer._check_context(embeds.shape[0])
        cache = answerer.cache_class()
        logits = answerer._forward(embeds, cache)
        text, ttft = answerer._decode(logits, cache, started, on_token)
    return Answer(
        text=text, picks=[], visual_tokens=visual.shape[0], ttft_seconds=ttft, seconds=time.perf_counter() - started,
        prefill_tokens=embeds.shape[0], cached_tokens=0,
    )


__all__ = ["NATIVE_TOKENS_PER_FRAME", "native_answer", "native_tokens", "native_visual_embeds"]
