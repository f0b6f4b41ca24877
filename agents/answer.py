"""Answering with LLaVA-OneVision from stored tokens: timestamped evidence, streamed tokens, reused KV caches.

The prompt is the checkpoint's own chat template (agents/vlm.py, `Layout`) with the evidence where the video goes:
  head     = "<|im_start|>system ... <|im_start|>user\n"
  evidence = for each picked segment: "[00:01:23-00:01:27]", the view of its stored tokens its level shows (already
             in the language model's input space), then `image_newline`
  tail     = "\n" + question + "<|im_end|>\n<|im_start|>assistant\n"
and is fed as `inputs_embeds`. Decoding is greedy, step by step, with the checkpoint's generation config applied
through transformers' logits processors, so that (a) tokens leave as they are generated, (b) the time to first
token is measured where it happens, and (c) the KV cache of head + evidence can be kept: a follow-up question on
the same evidence, or a question on a live stream whose recent window is already in the cache, prefills only the
question (DESIGN.md "Answering").
"""
from __future__ import annotations

import logging
import threading
import time
from dataclasses import dataclass, field, replace
from typing import Callable, Sequence

import numpy as np
import torch
from transformers import DynamicCache
from transformers.cache_utils import Cache, DynamicLayer

from vidmem.agents.select import Level, Pick, views_of
from vidmem.agents.vlm import SYSTEM_PROMPT, render_span, render_time  # noqa: F401 - the answer's time format
from vidmem.compressors.base import TokenBlock
from vidmem.compressors.stc import prune as prune_block
from vidmem.errors import BudgetError

log = logging.getLogger(__name__)

ReadTokens = Callable[[object], np.ndarray]  # segment row -> (N, H) stored tokens


def tokens_at_level(tokens: np.ndarray, pick: Pick) -> torch.Tensor:
    """The stored tokens `pick.level` shows, as the segment's compressor declared its views."""
    x = torch.from_numpy(np.array(tokens))  # a copy: stored tokens are read-only memory maps
    return views_of(pick.row).view(pick.level.view).apply(x)


class ReservedLayer(DynamicLayer):
    """A DynamicLayer whose keys and values are views into buffers with room to grow.

    DynamicLayer appends with `torch.cat`, copying the whole cache at every decoded token: with 6,000 tokens of
    evidence that is ~150 MB per step for Qwen2-0.5B. Here a step writes one position in place; the buffers grow
    (and are copied) only when full, by an eighth at least. `crop` (DynamicLayer's, a slice) keeps working: the next
    update writes after the cropped length, over what was cut.
    """

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        super().lazy_initialization(key_states, value_states)
        self.reserved: tuple[torch.Tensor, torch.Tensor] | None = None  # (B, kv heads, capacity, head dim) each

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        if not self.is_initialized:
            self.lazy_initialization(key_states, value_states)
        length = self.keys.shape[-2] if self.keys.dim() == 4 else 0
        need = length + key_states.shape[-2]
        if self.reserved is None or need > self.reserved[0].shape[-2]:
            capacity = need + max(RESERVE_TOKENS, need // 8)
            batch, heads, _, _ = key_states.shape
            keys = key_states.new_empty((batch, heads, capacity, key_states.shape[-1]))
            values = value_states.new_empty((batch, heads, capacity, value_states.shape[-1]))
            if length:
                keys[..., :length, :] = self.keys
                values[..., :length, :] = self.values
            self.reserved = (keys, values)
        keys, values = self.reserved
        keys[..., length:need, :] = key_states
        values[..., length:need, :] = value_states
        self.keys, self.values = keys[..., :need, :], values[..., :need, :]  # (B, kv heads, need, head dim) views
        return self.keys, self.values


RESERVE_TOKENS = 320  # room left after a prefill: a question (~20-60 tokens) and an answer (max_new_tokens 256)


class ReservedCache(DynamicCache):
    """A DynamicCache of ReservedLayers: appending a decoded token costs O(1) copying instead of O(cache)."""

    def __init__(self) -> None:
        Cache.__init__(self, layer_class_to_replicate=ReservedLayer)


def truncate(cache: DynamicCache, length: int) -> None:
    """Drop cached positions past `length` (a negative `crop` removes from the end in every transformers version)."""
    extra = cache.get_seq_length() - length
    if extra > 0:
        cache.crop(-extra)


@dataclass
class Answer:
    text: str
    picks: list[Pick]
    visual_tokens: int
    ttft_seconds: float
    seconds: float
    prefill_tokens: int  # prompt tokens computed for this question
    cached_tokens: int  # prompt tokens reused from a kept KV cache

    def segments(self) -> list[dict]:
        return [
            {"stream": p.row.stream, "start": round(p.row.start, 3), "end": round(p.row.end, 3), "tokens": p.tokens,
             "score": round(float(p.score), 4), "id": p.row.id, "level": p.level.name.lower()}
            for p in self.picks
        ]

    def to_json(self) -> dict:
        return {
            "answer": self.text,
            "segments": self.segments(),
            "visual_tokens": self.visual_tokens,
            "ttft_seconds": round(self.ttft_seconds, 4),
            "seconds": round(self.seconds, 4),
            "prefill_tokens": self.prefill_tokens,
            "cached_tokens": self.cached_tokens,
        }


@dataclass
class KeptPrefix:
    """A KV cache of head + evidence, kept to answer more questions on the same evidence."""

    key: tuple  # identifies the evidence: ((segment id, level), ...)
    cache: DynamicCache
    length: int  # tokens in the cache
    picks: list[Pick] = field(default_factory=list)


class Answerer:
    """Turns picks and a question into a streamed answer with one VLM; one question at a time (a lock)."""

    def __init__(self, vlm, *, max_new_tokens: int = 256, prune: float = 1.0) -> None:
        self.vlm = vlm
        self.max_new_tokens = max_new_tokens
        self.prune = prune  # share of each segment's tokens shown to the model (STC pruner); 1 shows all
        self.lock = threading.RLock()
        self.kept: KeptPrefix | None = None
        self.cache_class: type[DynamicCache] = ReservedCache  # bench/answer.py times it against transformers' caches
        self.processors = vlm.logits_processors()
        self.stop_ids = set(vlm.stop_ids)

    # ---- prompt pieces -------------------------------------------------------------------------------
    def evidence(self, picks: Sequence[Pick], read_tokens: ReadTokens) -> tuple[torch.Tensor, list[Pick]]:
        """(S, H) embeddings of the timestamped evidence, in the order given, and the picks as shown.

        With `prune` below 1, STC's pruner keeps that share of each segment's tokens, the most salient ones and
        those that differ from the segment before it (related-work-abstracts.txt, STC); the picks then carry
        the counts actually shown.
        """
        items, shown, previous = [], [], None
        for pick in picks:
            visual = tokens_at_level(read_tokens(pick.row), pick)
            if self.prune < 1.0 and visual.shape[0] > 1:
                keep = max(1, int(visual.shape[0] * self.prune))  # floored, so the total stays within the budget
                slow = min(pick.row.slow, visual.shape[0]) if pick.level is not Level.LOW else 0
                pruned = prune_block(TokenBlock(visual, slow=slow), keep=keep, previous=previous)
                previous = visual
                visual = pruned.tokens
                pick = replace(pick, keep=int(visual.shape[0]))
            items.append((pick.row.start, pick.row.end, visual))
            shown.append(pick)
        return self.vlm.evidence_embeds(items), shown

    # ---- model calls ---------------------------------------------------------------------------------
    @torch.inference_mode()
    def _forward(self, embeds: torch.Tensor, cache: DynamicCache) -> torch.Tensor:
        """Run (S, H) embeddings through the language model on top of `cache`; return the last position's logits."""
        return self.vlm.forward(embeds, cache)

    def prefill(self, picks: Sequence[Pick], read_tokens: ReadTokens) -> KeptPrefix:
        """Compute and keep the KV cache of head + evidence."""
        with self.lock, torch.inference_mode():
            evidence, shown = self.evidence(picks, read_tokens)
            embeds = torch.cat([self.vlm.head_embeds(), evidence])
            self._check_context(embeds.shape[0])
            cache = self.cache_class()
            self._forward(embeds, cache)
            key = tuple((p.row.id, int(p.level)) for p in picks)
            return KeptPrefix(key=key, cache=cache, length=cache.get_seq_length(), picks=shown)

    def extend(self, kept: KeptPrefix, picks: Sequence[Pick], read_tokens: ReadTokens) -> KeptPrefix:
        """Append more evidence to a kept prefix (a live stream's new segments) without recomputing it."""
        with self.lock, torch.inference_mode():
            truncate(kept.cache, kept.length)
            embeds, shown = self.evidence(picks, read_tokens)
            self._check_context(kept.length + embeds.shape[0])
            self._forward(embeds, kept.cache)
            kept.length = kept.cache.get_seq_length()
            kept.picks.extend(shown)
            kept.key = kept.key + tuple((p.row.id, int(p.level)) for p in picks)
            return kept

    def _check_context(self, prompt_tokens: int) -> None:
        limit = self.vlm.context_length - self.max_new_tokens
        if prompt_tokens > limit:
            raise BudgetError(
                f"the prompt needs {prompt_tokens} tokens but the model's context holds {limit} besides the answer; "
                "ask a shorter question or use a smaller --budget"
            )

    def answer(
        self,
        question: str,
        picks: Sequence[Pick],
        read_tokens: ReadTokens,
        *,
        on_token: Callable[[str], None] | None = None,
        extra: Sequence[Pick] = (),
        prefix: KeptPrefix | None = None,
        keep: bool = True,
        started: float | None = None,
    ) -> Answer:
        """Answer `question` from `picks` (kept as a reusable prefix), plus `extra` picks prefilled with the question.

        With `prefix` given (a live window), its cache is used and `picks` is ignored. Otherwise the answerer keeps
        the prefix of its last question and reuses it when the evidence is the same (a follow-up question);
        `keep=False` answers without touching that kept prefix (captions written during ingest). `started`
        (a `time.perf_counter()` value) moves the start of the clock for `ttft_seconds` earlier, to include work
        the caller did for this question first.
        """
        started = time.perf_counter() if started is None else started
        with self.lock, torch.inference_mode():
            question_ids = self.vlm.ids(question)
            if question_ids.shape[0] > self.vlm.context_length // 2:
                raise BudgetError(
                    f"the question is {question_ids.shape[0]} tokens long, more than half the model's context "
                    f"({self.vlm.context_length}); ask a shorter question"
                )
            cached = 0
            if prefix is None:
                key = tuple((p.row.id, int(p.level)) for p in picks)
                if self.kept is not None and self.kept.key == key:
                    prefix = self.kept
                    cached = prefix.length
                elif not keep:
                    prefix = self.prefill(picks, read_tokens)
                else:
                    self.kept = None  # free the old cache before building the new one
                    prefix = self.kept = self.prefill(picks, read_tokens)
            else:
                cached = prefix.length
            truncate(prefix.cache, prefix.length)
            suffix = []
            if extra:
                extra_embeds, extra = self.evidence(extra, read_tokens)
                suffix.append(extra_embeds)
            suffix.append(self.vlm.question_embeds(question))
            suffix_embeds = torch.cat(suffix)
            self._check_context(prefix.length + suffix_embeds.shape[0])
            prefilled = (0 if cached else prefix.length) + suffix_embeds.shape[0]
            logits = self._forward(suffix_embeds, prefix.cache)
            text, ttft = self._decode(logits, prefix.cache, started, on_token)
            truncate(prefix.cache, prefix.length)  # keep only head + evidence for the next question
        all_picks = sorted([*prefix.picks, *extra], key=lambda p: (p.row.start, p.row.stream))
        return Answer(
            text=text,
            picks=all_picks,
            visual_tokens=sum(p.tokens for p in all_picks),
            ttft_seconds=ttft,
            seconds=time.perf_counter() - started,
            prefill_tokens=prefilled,
            cached_tokens=cached,
        )

    @torch.inference_mode()
    def _decode(
        self, logits: torch.Tensor, cache: DynamicCache, started: float, on_token: Callable[[str], None] | None
    ) -> tuple[str, float]:
        """Greedy decoding; emits text as soon as it forms whole characters. Returns (text, time to first token)."""
        tokenizer = self.vlm.tokenizer
        ids = torch.zeros((1, 0), dtype=torch.long, device=logits.device)  # the answer so far, (1, n)
        emitted = ""
        ttft = 0.0
        for step in range(self.max_new_tokens):
            scores = self.processors(ids, logits.float())  # the generation config: suppressions, penalties, minimum
            next_id = int(scores.argmax(dim=-1)[0])
            if step == 0:
                ttft = time.perf_counter() - started
            if next_id in self.stop_ids:
                break
            ids = torch.cat([ids, ids.new_tensor([[next_id]])], dim=1)
            text = tokenizer.decode(ids[0], skip_special_tokens=True).lstrip()  # the streamed text is the answer's
            if not text.endswith("\ufffd") and len(text) > len(emitted):
                if on_token is not None:
                    on_token(text[len(emitted) :])
                emitted = text
            if step + 1 < self.max_new_tokens:
                logits = self._forward(self.vlm.embed_ids(ids[0, -1:]), cache)
        final = tokenizer.decode(ids[0], skip_special_tokens=True).strip()  # = the streamed pieces, bar trailing space
        return final, ttft
