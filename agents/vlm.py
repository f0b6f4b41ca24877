"""LLaVA-OneVision behind one adapter: everything vidmem does with the answering model goes through `VLM`.

It owns every internal of `LlavaOnevisionForConditionalGeneration`, so the rest of vidmem never reaches inside:
- the vision tower, with the config's feature layer and select strategy (`encoder`, a `VisionEncoder`);
- the projector, LLaVA-OneVision's frame pooling and its `image_newline` (`compress`, `evidence_embeds`,
  `video_embeds`): with a training-free compressor a keyframe reaches the language model exactly as transformers'
  `get_video_features` would give that frame (projector, bilinear 27x27 -> 14x14, one `image_newline` after the
  video), checked against the reference in tests/test_vlm_reference.py;
- the language model and lm_head (`forward`, `answer_loss`);
- the checkpoint's own chat template, in whichever form the checkpoint carries it (`chat_template.jinja` or
  `chat_template.json`, the processor's list-of-parts template, or a string template in `tokenizer_config.json`),
  split where the video goes (`layout`), and the generation config's stop ids and logits processors.

Answering (agents/answer.py), the native path (agents/native.py), training (compressors/train.py, handed a `VLM`)
and the benches use only this.

The prompt layout, identical for answering and training (LLaVA-OneVision's own video prompt):
    head      "<|im_start|>system\\n{system}<|im_end|>\\n<|im_start|>user\\n"        (template text before <video>)
    evidence  for each segment: "[00:01:23-00:01:27]" + its visual tokens + image_newline
    tail      "\\n{question}<|im_end|>\\n<|im_start|>assistant\\n"                      (template text after <video>)
"""
from __future__ import annotations

import functools
import json
import logging
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Sequence

import torch
import torch.nn.functional as F

from vidmem.compressors.base import Compressor, TokenBlock, bilinear_pool, stride_side
from vidmem.compressors.encoder import Preprocess, VisionEncoder
from vidmem.errors import ModelNotFoundError

log = logging.getLogger(__name__)

SYSTEM_PROMPT = (
    "You are vidmem, an assistant that watches video and remembers it. The user's message holds video segments, "
    "each preceded by the time it was recorded in square brackets. Answer the question from what the video shows, "
    "and say when things happened using those times."
)
LIVE_EPOCH = 1e9  # times above this are unix seconds (live streams); below, seconds from the start of a file
NATIVE_STRIDE = 2  # LLaVA-OneVision pools video frames 2x2: 27x27 -> 14x14 = 196 tokens
TEMPLATE_FILES = ("chat_template.jinja", "chat_template.json")  # the processor's template, as checkpoints carry it
_QUESTION = "\x00VIDMEM-QUESTION\x00"  # stands where the question goes while the template renders


def render_time(seconds: float) -> str:
    """'00:01:23' for a position in recorded footage, '2026-11-21 14:03:05' for a live stream's unix time."""
    if seconds >= LIVE_EPOCH:
        return time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(seconds))
    whole = int(seconds)
    return f"{whole // 3600:02d}:{whole % 3600 // 60:02d}:{whole % 60:02d}"


def render_span(start: float, end: float) -> str:
    """The timestamp text before a segment's tokens: '[00:01:23-00:01:27]'."""
    end_text = render_time(end)
    if start >= LIVE_EPOCH and render_time(start)[:10] == end_text[:10]:
        end_text = end_text[11:]  # same day: show the date once
    return f"[{render_time(start)}-{end_text}]"


# ---------------------------------------------------------------------------------------------------- templates


@dataclass(frozen=True)
class Layout:
    """The chat template rendered once and split where the evidence and the question go."""

    head: str  # everything before the video: system turn and the opening of the user turn
    mid: str  # between the video and the question (a newline in LLaVA-OneVision's template)
    end: str  # after the question: end of the user turn and the assistant's generation prompt
    form: str  # which template it came from: "chat_template.jinja", "chat_template.json" or "tokenizer_config.json"

    def tail(self, question: str) -> str:
        return f"{self.mid}{question.strip()}{self.end}"


def read_templates(files: dict[str, str | None], tokenizer: Any) -> list[tuple[str, str]]:
    """(form, template) candidates in the order transformers' processor prefers them; `files` maps names to paths."""
    found = []
    jinja = files.get("chat_template.jinja")
    if jinja:
        found.append(("chat_template.jinja", Path(jinja).read_text(encoding="utf-8")))
    processor = files.get("chat_template.json")
    if processor:
        template = json.loads(Path(processor).read_text(encoding="utf-8")).get("chat_template")
        if isinstance(template, str) and template.strip():
            found.append(("chat_template.json", template))
    own = getattr(tokenizer, "chat_template", None)
    if isinstance(own, dict):  # several named templates: the default one
        own = own.get("default")
    if isinstance(own, str) and own.strip() and all(own != template for _, template in found):
        found.append(("tokenizer_config.json", own))
    return found


def render_layout(tokenizer: Any, templates: list[tuple[str, str]], *, system: str, video_token: str, name: str) -> Layout:
    """Renders system + user(video, question) with the first template that places both, and splits it there.

    List-of-parts content (`{"type": "video"}`, `{"type": "text"}`) is what LLaVA-OneVision's processor template
    takes; a string template gets the video token written into the text, as the processor's users do.
    """
    if not templates:
        raise ModelNotFoundError(
            f"the model '{name}' carries no chat template (no chat_template.jinja, chat_template.json or "
            "chat_template in tokenizer_config.json); vidmem frames questions with the checkpoint's own template, so "
            "use a complete checkpoint directory (the llava-hf checkpoints ship chat_template.json)."
        )
    contents = (
        ([{"type": "text", "text": system}], [{"type": "video"}, {"type": "text", "text": _QUESTION}]),
        (system, f"{video_token}\n{_QUESTION}"),
    )
    problems = []
    for form, template in templates:
        for system_content, user_content in contents:
            messages = [{"role": "system", "content": system_content}, {"role": "user", "content": user_content}]
            try:
                text = tokenizer.apply_chat_template(
                    messages, chat_template=template, tokenize=False, add_generation_prompt=True
                )
            except Exception as exc:  # a template written for the other content shape
                problems.append(f"{form}: {type(exc).__name__}: {exc}")
                continue
            if isinstance(text, str) and text.count(video_token) == 1 and text.count(_QUESTION) == 1:
                head, rest = text.split(video_token)
                mid, end = rest.split(_QUESTION)
                if _QUESTION not in head:
                    return Layout(head=head, mid=mid, end=end, form=form)
            problems.append(f"{form}: the rendered prompt does not place the video before the question")
    raise ModelNotFoundError(
        f"the chat template of model '{name}' cannot frame a video question ({problems[-1]}); vidmem needs a template "
        "that renders a user turn with a video part and a text part."
    )


# ---------------------------------------------------------------------------------------------------- the adapter


@dataclass
class VLM:
    """A loaded LLaVA-OneVision and everything vidmem does with it."""

    model: Any  # LlavaOnevisionForConditionalGeneration, eval mode, on `device` in `dtype`
    tokenizer: Any  # its tokenizer
    encoder: VisionEncoder  # the model's own SigLIP tower with the checkpoint's preprocessing
    layout: Layout  # the checkpoint's chat template, split where the evidence and the question go
    name: str  # what it was loaded from (hub id or directory), for messages and memory metadata
    device: torch.device
    dtype: torch.dtype
    files: dict[str, str | None] = field(default_factory=dict)  # checkpoint files carried over by save_pretrained
    system_prompt: str = SYSTEM_PROMPT  # the one system prompt answering and training use

    @classmethod
    def wrap(cls, model: Any, tokenizer: Any, *, name: str, files: dict[str, str | None] | None = None,
             preprocess: Preprocess | None = None) -> "VLM":
        """The adapter around a loaded `LlavaOnevisionForConditionalGeneration` and its tokenizer.

        files: the checkpoint's preprocessor_config.json and chat template files (name -> path or None).
        """
        files = dict(files or {})
        config = model.config
        layout = render_layout(
            tokenizer, read_templates(files, tokenizer), system=SYSTEM_PROMPT,
            video_token=tokenizer.convert_ids_to_tokens(int(config.video_token_index)), name=name,
        )
        if preprocess is None:
            pre_file = files.get("preprocessor_config.json")
            if not pre_file:
                log.warning("%s has no preprocessor_config.json; normalising with mean/std 0.5", name)
            pre_config = json.loads(Path(pre_file).read_text(encoding="utf-8")) if pre_file else {}
            preprocess = Preprocess.from_config(pre_config, default_size=int(config.vision_config.image_size))
        encoder = VisionEncoder(
            model.model.vision_tower, preprocess=preprocess, feature_layer=config.vision_feature_layer,
            select_strategy=config.vision_feature_select_strategy, name=name,
        )
        param = next(model.parameters())
        return cls(model=model, tokenizer=tokenizer, encoder=encoder, layout=layout, name=name, device=param.device,
                   dtype=param.dtype, files=files)

    # ---- parts ------------------------------------------------------------------------------------------
    @property
    def config(self) -> Any:
        return self.model.config

    @property
    def _inner(self) -> Any:
        """The LlavaOnevisionModel inside (vision tower, projector, image_newline, language model)."""
        return self.model.model

    @property
    def projector(self) -> torch.nn.Module:
        """The `multi_modal_projector` (vision width D -> language width H)."""
        return self._inner.multi_modal_projector

    @property
    def language_model(self) -> torch.nn.Module:
        return self._inner.language_model

    @property
    def lm_head(self) -> torch.nn.Module:
        return self.model.lm_head

    @property
    def hidden_size(self) -> int:
        """The language model's width H: the width of every token vidmem stores."""
        return int(self.config.text_config.hidden_size)

    @property
    def context_length(self) -> int:
        return int(self.config.text_config.max_position_embeddings)

    @property
    def vocab_size(self) -> int:
        return int(self.lm_head.out_features)

    @property
    def image_newline(self) -> torch.Tensor:
        """(H,) the learned separator LLaVA-OneVision appends after a video's frames."""
        return self._inner.image_newline

    @property
    def video_token(self) -> str:
        return self.tokenizer.convert_ids_to_tokens(int(self.config.video_token_index))

    @property
    def fingerprint(self) -> str:
        """What stored tokens depend on: the vision tower and the projector (hashed from a slice of their weights)."""
        import hashlib

        digest = hashlib.sha256(self.encoder.fingerprint.encode())
        for param in self.projector.parameters():
            digest.update(param.detach().to("cpu", torch.bfloat16).flatten()[:4096].view(torch.int16).numpy().tobytes())
        return digest.hexdigest()[:16]

    @property
    def generation_config(self) -> Any:
        return self.model.generation_config

    @property
    def stop_ids(self) -> tuple[int, ...]:
        """Ids that end a reply: the generation config's eos ids, the tokenizer's eos and the template's end of turn."""
        eos = self.generation_config.eos_token_id
        ids = list(eos) if isinstance(eos, (list, tuple)) else [eos]
        ids.append(self.tokenizer.eos_token_id)
        end_of_turn = self.tokenizer.convert_tokens_to_ids("<|im_end|>")
        if end_of_turn != self.tokenizer.unk_token_id:
            ids.append(end_of_turn)
        return tuple(dict.fromkeys(int(i) for i in ids if isinstance(i, int) and 0 <= i < self.vocab_size))

    @property
    def end_of_turn_id(self) -> int:
        """The token that closes a turn in this checkpoint's template (<|im_end|> for Qwen2), what an answer ends with."""
        return int(self.ids(self.layout.end)[0])

    def logits_processors(self) -> Any:
        """The checkpoint's generation config as transformers' logits processors (greedy decoding).

        Besides the config's own `suppress_tokens`, special tokens that are not stops (<video>, <image>, padding)
        are suppressed: an answer is text.
        """
        from transformers import (
            LogitsProcessorList,
            MinNewTokensLengthLogitsProcessor,
            RepetitionPenaltyLogitsProcessor,
            SuppressTokensLogitsProcessor,
        )

        config, stops = self.generation_config, set(self.stop_ids)
        processors = LogitsProcessorList()
        suppress = set(config.suppress_tokens or []) | {i for i in self.tokenizer.all_special_ids if i not in stops}
        suppress = sorted(i for i in suppress if 0 <= i < self.vocab_size)
        if suppress:
            processors.append(SuppressTokensLogitsProcessor(suppress, device=str(self.device)))
        if config.min_new_tokens:
            processors.append(
                MinNewTokensLengthLogitsProcessor(0, int(config.min_new_tokens), sorted(stops), device=str(self.device))
            )
        if config.repetition_penalty not in (None, 1.0):
            processors.append(RepetitionPenaltyLogitsProcessor(float(config.repetition_penalty)))
        return processors

    # ---- text -------------------------------------------------------------------------------------------
    def ids(self, text: str) -> torch.Tensor:
        """1-D LongTensor of `text`'s token ids (no special tokens added)."""
        return torch.tensor(self.tokenizer(text, add_special_tokens=False).input_ids, dtype=torch.long, device=self.device)

    def count_tokens(self, text: str) -> int:
        return len(self.tokenizer(text, add_special_tokens=False).input_ids)

    def embed_ids(self, ids: torch.Tensor) -> torch.Tensor:
        """(..., T) token ids -> (..., T, H) input embeddings."""
        return self.model.get_input_embeddings()(ids.to(self.device))

    def embed_text(self, text: str) -> torch.Tensor:
        """(T, H) embeddings of `text`."""
        return self.embed_ids(self.ids(text))

    @staticmethod
    def render_span(start: float, end: float) -> str:
        return render_span(start, end)

    @functools.cached_property
    def span_tokens(self) -> int:
        """Context a segment takes besides its visual tokens, at most: its longest timestamp and the newline token."""
        return self.count_tokens(render_span(LIVE_EPOCH, LIVE_EPOCH + 86_400)) + 1

    # ---- vision -----------------------------------------------------------------------------------------
    def project(self, features: torch.Tensor) -> torch.Tensor:
        """(..., D) vision features -> (..., H) language-model embeddings (grad flows when enabled)."""
        projector = self.projector
        param = next(projector.parameters())
        if features.is_inference() and not torch.is_inference_mode_enabled():
            features = features.clone()  # frozen encoder output, made outside inference mode, may meet trainable weights
        return projector(features.to(param.device, param.dtype))

    def compress(self, compressor: Compressor, features: torch.Tensor) -> TokenBlock:
        """A segment's (T, L, D) vision features -> its tokens in the language model's input space, with views."""
        return compressor(features, project=self.project)

    def video_embeds(self, features: torch.Tensor) -> torch.Tensor:
        """LLaVA-OneVision's own video path for (F, L, D) frame features: (F * 196 + 1, H), newline last."""
        side = stride_side(self.encoder.side, NATIVE_STRIDE)
        frames = bilinear_pool(self.project(features), side)  # (F, 196, H)
        newline = self.image_newline[None].to(frames.dtype)  # (1, H)
        return torch.cat([frames.reshape(-1, frames.shape[-1]), newline])

    # ---- prompts ----------------------------------------------------------------------------------------
    def evidence_embeds(self, items: Sequence[tuple[float, float, torch.Tensor]]) -> torch.Tensor:
        """(S, H) evidence: per (start, end, tokens (N, H)) the timestamp text, the tokens, then `image_newline`.

        Each segment is a short video of its own, so each ends with the newline token the reference puts after a
        video; the newline and the timestamp are structure, not visual tokens, and are not counted in a budget.
        """
        newline = self.image_newline[None]  # (1, H)
        parts = []
        for start, end, tokens in items:
            text = self.embed_text(render_span(start, end))
            parts += [text, tokens.to(text.device, text.dtype), newline.to(text.dtype)]
        if not parts:
            return self.embed_text("")
        return torch.cat(parts)

    def head_embeds(self) -> torch.Tensor:
        """(P, H) the template text before the evidence."""
        return self.embed_text(self.layout.head)

    def question_embeds(self, question: str) -> torch.Tensor:
        """(Q, H) the template text after the evidence: the question and the generation prompt."""
        return self.embed_text(self.layout.tail(question))

    def prompt_embeds(self, question: str, evidence: torch.Tensor) -> torch.Tensor:
        """(1, P, H) the whole prompt: head, evidence, question, generation prompt."""
        parts = [self.head_embeds(), evidence.to(self.dtype_of_embeddings), self.question_embeds(question)]
        return torch.cat(parts)[None]

    @property
    def dtype_of_embeddings(self) -> torch.dtype:
        return self.model.get_input_embeddings().weight.dtype

    # ---- the language model -----------------------------------------------------------------------------
    def forward(self, embeds: torch.Tensor, cache: Any = None, *, all_positions: bool = False) -> torch.Tensor:
        """Run (S, H) or (1, S, H) embeddings through the language model on top of `cache`.

        Returns the logits of the last position, (1, vocab), or of every position with `all_positions`.
        """
        if embeds.dim() == 2:
            embeds = embeds[None]
        past = cache.get_seq_length() if cache is not None else 0
        positions = torch.arange(past, past + embeds.shape[1], device=embeds.device)[None]  # (1, S)
        out = self.language_model(
            inputs_embeds=embeds.to(self.dtype_of_embeddings), cache=cache, use_cache=cache is not None,
            position_ids=positions,
        )
        hidden = out.last_hidden_state  # (1, S, H)
        return self.lm_head(hidden if all_positions else hidden[:, -1])

    def answer_loss(self, prompt: torch.Tensor, answer: str) -> torch.Tensor:
        """Next-token cross-entropy of `answer` and the end of turn after the (1, P, H) prompt (the training loss)."""
        return self.answer_losses([prompt], [answer])[0]

    def answer_losses(self, prompts: list[torch.Tensor], answers: list[str]) -> torch.Tensor:
        """(B,) `answer_loss` of each (1, P_i, H) prompt and its answer, in one forward pass.

        The sequences are padded on the right: under the causal mask a real position never sees the padding after
        it, so each loss equals the unbatched one. Only the answers' positions go through lm_head.
        """
        end = torch.tensor([self.end_of_turn_id], device=self.device)
        targets = [torch.cat([self.ids(answer.strip()), end]) for answer in answers]  # (A_i,) each
        inputs = [torch.cat([prompt[0], self.embed_ids(target).to(prompt.dtype)])[:-1]  # (P_i + A_i - 1, H)
                  for prompt, target in zip(prompts, targets)]
        batch = torch.nn.utils.rnn.pad_sequence(inputs, batch_first=True)  # (B, L, H), zeros after each sequence
        positions = torch.arange(batch.shape[1], device=batch.device)[None]  # (1, L)
        hidden = self.language_model(inputs_embeds=batch.to(self.dtype_of_embeddings), use_cache=False,
                                     position_ids=positions).last_hidden_state  # (B, L, H)
        losses = []
        for i, (prompt, target) in enumerate(zip(prompts, targets)):
            start = prompt.shape[1] - 1  # the last prompt position predicts the answer's first token
            logits = self.lm_head(hidden[i, start : start + len(target)])  # (A_i, V)
            losses.append(F.cross_entropy(logits.float(), target))
        return torch.stack(losses)

    # ---- checkpoints ------------------------------------------------------------------------------------
    def save_pretrained(self, directory: str | Path) -> Path:
        """Write a complete checkpoint directory (`--model DIR` loads it) with the current weights."""
        directory = Path(directory)
        directory.mkdir(parents=True, exist_ok=True)
        self.model.save_pretrained(directory)
        self.tokenizer.save_pretrained(directory)
        for name, path in self.files.items():
            if path and Path(path).is_file() and not (directory / name).exists():
                shutil.copyfile(path, directory / name)
        return directory
