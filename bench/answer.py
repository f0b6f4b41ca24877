"""Answering cost: prefill tokens and time to first token, vidmem's budget versus LLaVA-OneVision's native path.

    python bench/answer.py [--quick] [--device cpu|cuda] [--layers N] [--decode-tokens N] [--runtime-only]

Full mode builds LLaVA-OneVision 0.5B's architecture in memory with random weights (timing does not depend on
them; nothing is downloaded): the Qwen2-0.5B language model, its 151,936-token embeddings and lm_head and the
1152 -> 896 projector are full size; the SigLIP-so400m tower keeps its width but only one of its 27 layers, because
the answer path reads stored tokens and never runs it (the native path's tower time is scaled up from that layer).
Synthetic memories of 10 minutes and 1 hour (150 and 900 segments of 245 tokens at D = 1152, random 512-wide
retrieval embeddings) are written through `vidmem.memory.Memory`, plus a live stream. Measured:
- vidmem at budget 6000 per footage length: prefill tokens, time to first token cold, and for a follow-up
  question on the kept KV cache (only the question is prefilled);
- the native path (196 tokens per frame): at 1 fps 117,600 / 705,600 visual tokens, beyond the 32k context, so it
  is marked infeasible and its time to first token is an ESTIMATE: the longest measured prefill's seconds per token
  times its tokens, a lower bound (a least-squares a*S + b*S^2 is given beside it); and measured at
  LLaVA-OneVision's usual 32 uniform frames (6,273 tokens);
- a live question with the warm kept window (`Vidmem.refresh_live` then `ask(..., live=True)`) versus cold, and
  the time to extend the window by one new segment;
- decode speed (ms per generated token) of the answerer's decode loop against the previous loop, side by side.
Times to first token are the wall time of `ask` with one new token (selection included) and the answerer's own
`ttft_seconds` (selection excluded). `--quick` uses the tests' tiny checkpoints and small memories.
CPU runtime figures (agents/runtime.py), side by side in the same run, at the top level of the JSON line:
`prefill_tps_eager` / `prefill_tps_fast` (the language model prefilling PREFILL_TOKENS evidence embeddings into a
kept cache, eager fp32 versus `fast-lm`'s int8 linear layers, alternating, best of 3, with the relative error of
the last hidden state), and `live_ttft_warm_s` / `live_ttft_cold_s` (a live question with the kept window warm,
and cold: the window prefilled inside the ask), on the default runtime, named in `runtime`. `--runtime-only`
measures only these (about 10 minutes on 2 busy cores at full size).
Prints one JSON line; progress goes to stderr.
"""
from __future__ import annotations

import argparse
import gc
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import (  # noqa: E402
    clip512_checkpoint, emit, full_size_vlm, logger, machine_info, timed, tiny_checkpoints, unit_rows,
)

from vidmem.agents.app import Settings, Vidmem  # noqa: E402
from vidmem.agents.runtime import apply_runtime, describe  # noqa: E402
from vidmem.agents.native import NATIVE_TOKENS_PER_FRAME, native_answer, native_tokens, native_visual_embeds  # noqa: E402
from vidmem.memory import Manifest  # noqa: E402

log = logger("answer")

SEGMENT_SECONDS = 4.0  # 4 sampled frames at 1 fps per segment
SEGMENT_TOKENS = 245  # 196 keyframe + 49 TimePerceiver tokens (DESIGN.md "Token math")
SLOW_TOKENS = 196
BUDGET = 6000  # Clapper's evaluation bound, vidmem's default
NATIVE_FRAMES = 32  # LLaVA-OneVision's usual uniform frame count for video
QUESTIONS = (
    "What happened at the front door, and when did the package arrive?",
    "Who picked the box up afterwards?",
    "Is anyone at the door right now?",
    "And what is the cat doing now?",
)


# ---------------------------------------------------------------------------------------------------- setup


def build_app(args: argparse.Namespace, work: Path) -> Vidmem:
    """A Vidmem over an empty memory in `work`, with the VLM and embedder already loaded."""
    if args.quick:
        tiny = tiny_checkpoints(work / "models")
        settings = Settings(memory=work / "memory", model=str(tiny["llava"]), embedder=str(tiny["clip"]),
                            device=args.device, runtime=args.runtime)
        app = Vidmem(settings)
        app.vlm  # noqa: B018 - loads through load_vlm, the real path
    else:
        clip = clip512_checkpoint(work / "clip512")
        app = Vidmem(Settings(memory=work / "memory", embedder=str(clip), device=args.device))
        log(f"building LLaVA-OneVision 0.5B's architecture with random weights ({args.layers} text layers)")
        app._vlm = full_size_vlm(device=args.device, vision_layers=1, text_layers=args.layers)  # in memory, not saved
        apply_runtime(app._vlm, args.runtime)  # what Vidmem.vlm does after load_vlm
    vlm, embedder = app.vlm, app.embedder
    # stored tokens live in the language model's input space (agents/vlm.py), as Vidmem.manifest records them
    app.memory.bind(Manifest(encoder=vlm.fingerprint, encoder_name=vlm.name, compressor="timeperceiver",
                             dim=vlm.hidden_size, embedder=embedder.name, embed_dim=embedder.dim))
    return app


def fill(app: Vidmem, stream: str, segments: int, *, start: float, rng: np.random.Generator,
         pool: list[np.ndarray]) -> None:
    """Write `segments` synthetic 4-second segments of 245 stored tokens into `stream`."""
    dim = app.embedder.dim
    for first in range(0, segments, 100):
        count = min(100, segments - first)
        embeddings = unit_rows(rng, count, dim)
        app.memory.add_segments([
            dict(stream=stream, start=start + (first + i) * SEGMENT_SECONDS, end=start + (first + i + 1) * SEGMENT_SECONDS,
                 frames=4, cut=(first + i) % 10 == 0, tokens=pool[(first + i) % len(pool)], slow=SLOW_TOKENS,
                 embedding=embeddings[i])
            for i in range(count)
        ])


def token_pool(dim: int, rng: np.random.Generator, size: int = 8) -> list[np.ndarray]:
    """A few random (245, D) float16 token blocks, reused across segments (their values do not change timing)."""
    return [(rng.standard_normal((SEGMENT_TOKENS, dim)) * 0.5).astype(np.float16) for _ in range(size)]


# ---------------------------------------------------------------------------------------------------- measuring


def sync(app: Vidmem) -> None:
    """Wait for queued GPU work, so wall times include it (a no-op on the CPU)."""
    if app.vlm.device.type == "cuda":
        torch.cuda.synchronize(app.vlm.device)


def measure(fn, *, note: str) -> dict:
    """Wall time of one answer call plus the Answer's own figures."""
    gc.collect()
    started = time.perf_counter()
    answer = fn()
    wall = time.perf_counter() - started
    figures = {
        "ask_to_first_token_seconds": round(wall, 4),
        "ttft_seconds": round(answer.ttft_seconds, 4),
        "prefill_tokens": answer.prefill_tokens,
        "cached_tokens": answer.cached_tokens,
        "visual_tokens": answer.visual_tokens,
        "segments": len(answer.picks),
    }
    log(f"  {note}: {figures}")
    return figures


def fit_prefill(points: list[tuple[int, float]]) -> tuple[float, float]:
    """(a, b) of t = a*S + b*S^2 by least squares over measured cold prefills (b >= 0)."""
    s = np.array([p[0] for p in points], dtype=np.float64)
    t = np.array([p[1] for p in points], dtype=np.float64)
    if len(points) >= 2 and len(set(s.tolist())) >= 2:
        (a, b), *_ = np.linalg.lstsq(np.stack([s, s * s], axis=1), t, rcond=None)
        if a > 0 and b >= 0:
            return float(a), float(b)
    return float(np.sum(t) / np.sum(s)), 0.0  # linear through the origin: a lower bound


def footage(app: Vidmem, stream: str, seconds: float, *, cold_points: list) -> dict:
    """vidmem cold and follow-up on one stream; the native path's tokens for the same footage."""
    answerer = app.answerer
    answerer.kept = None
    cold = measure(lambda: app.ask(QUESTIONS[0], streams=[stream], budget=BUDGET), note=f"{stream} cold")
    cold_points.append((cold["prefill_tokens"], cold["ttft_seconds"]))
    warm = measure(lambda: app.ask(QUESTIONS[1], streams=[stream], budget=BUDGET, follow_up=True),
                   note=f"{stream} follow-up")
    frames = int(seconds)  # 1 fps
    head = answerer.vlm.count_tokens(answerer.vlm.layout.head)
    tail = answerer.vlm.count_tokens(answerer.vlm.layout.tail(QUESTIONS[0]))
    native_visual = native_tokens(frames)
    prompt_text = head + native_visual + tail
    return {
        "video_seconds": seconds,
        "frames_1fps": frames,
        "segments": len(app.memory.segments(stream=stream)),
        "vidmem": {"cold": cold, "follow_up": warm,
                   "follow_up_speedup": round(cold["ttft_seconds"] / max(warm["ttft_seconds"], 1e-9), 2)},
        "native": {"visual_tokens": native_visual, "prefill_tokens": prompt_text,
                   "context_length": app.vlm.context_length, "feasible": prompt_text <= app.vlm.context_length},
        "token_ratio": round(prompt_text / cold["prefill_tokens"], 1),
    }


def native_uniform(app: Vidmem, rng: np.random.Generator, *, tower_layers: int, full_layers: int) -> dict:
    """LLaVA-OneVision's stock video path at 32 uniform frames (6,273 visual tokens), measured."""
    answerer = app.answerer
    frames = [rng.integers(0, 255, (384, 384, 3), dtype=np.uint8) for _ in range(NATIVE_FRAMES)]
    vision = time.perf_counter()
    native_visual_embeds(app.vlm, frames)
    sync(app)
    vision = time.perf_counter() - vision
    figures = measure(lambda: native_answer(answerer, frames, QUESTIONS[0]), note=f"native {NATIVE_FRAMES} frames")
    figures["frames"] = NATIVE_FRAMES
    figures["vision_seconds_measured"] = round(vision, 4)
    figures["vision_tower_layers_run"] = tower_layers
    scale = full_layers / tower_layers
    figures["vision_seconds_estimate_full_tower"] = round(vision * scale, 3)  # ESTIMATE: per-layer time x 27
    figures["prefill_seconds"] = round(max(figures["ttft_seconds"] - vision, 1e-6), 4)
    return figures


def live(app: Vidmem, rng: np.random.Generator, pool: list[np.ndarray], segments: int) -> dict:
    """A question about now on a live stream: the warm kept window versus building it cold."""
    now = time.time()
    stream = "live"
    fill(app, stream, segments, start=now - segments * SEGMENT_SECONDS, rng=rng, pool=pool)
    # Retrieve by the newest segment's own embedding so nothing older outranks the window: a question about now.
    last = app.memory.last_segment(stream)
    query = unit_rows(rng, 1, app.embedder.dim)[0]
    app.memory.add_segment(stream=stream, start=last.end, end=last.end + SEGMENT_SECONDS, frames=4, cut=False,
                           tokens=pool[0], slow=SLOW_TOKENS, embedding=query)
    app.live.clear()
    cold = measure(lambda: app.ask(QUESTIONS[2], streams=[stream], live=True, query=query), note="live cold")
    cold["prefill_tokens"] += cold["cached_tokens"]  # the window was prefilled inside this ask (refresh_live)
    cold["cached_tokens"] = 0
    app.refresh_live(stream)  # what the ingest side does after each committed segment
    kept = app.live[stream]
    warm = measure(lambda: app.ask(QUESTIONS[3], streams=[stream], live=True, query=query), note="live warm")
    # a new segment arrives: the ingest side extends the kept window (prefilling only it), then a question
    last = app.memory.last_segment(stream)
    app.memory.add_segment(stream=stream, start=last.end, end=last.end + SEGMENT_SECONDS, frames=4, cut=False,
                           tokens=pool[1], slow=SLOW_TOKENS, embedding=query)
    extend = time.perf_counter()
    app.refresh_live(stream)
    extend = time.perf_counter() - extend
    after = measure(lambda: app.ask(QUESTIONS[3], streams=[stream], live=True, query=query), note="live after extend")
    return {
        "window_segments": len(kept.picks),
        "window_tokens": kept.length,
        "cold": cold,
        "warm": warm,
        "warm_after_new_segment": after,
        "extend_one_segment_seconds": round(extend, 4),
        "warm_speedup": round(cold["ask_to_first_token_seconds"] / max(warm["ask_to_first_token_seconds"], 1e-9), 2),
    }


PREFILL_TOKENS = 1024  # evidence tokens per timed prefill: about four segments' keyframes


def prefill_runtimes(app: Vidmem, repeats: int) -> dict:
    """Prefill tokens per second of the language model, eager fp32 versus the int8 `fast-lm` runtime, alternating."""
    import copy

    from vidmem.agents.runtime import describe, optimize_language_model

    vlm = app.vlm
    inner = getattr(vlm.model, "model", vlm.model)
    eager = inner.language_model
    if vlm.device.type != "cpu":
        return {"skipped": "the int8 runtime is a CPU path; a GPU runs bf16"}
    fast = optimize_language_model(copy.deepcopy(eager), "fast-lm")
    cache_class = app.answerer.cache_class
    torch.manual_seed(0)
    embeds = torch.randn(1, PREFILL_TOKENS, vlm.model.config.text_config.hidden_size) * 0.5  # (1, S, H)

    @torch.inference_mode()
    def prefill(lm) -> torch.Tensor:
        cache = cache_class()
        return lm(inputs_embeds=embeds.to(vlm.dtype), cache=cache, use_cache=True).last_hidden_state[:, -1]

    reference, quantized = prefill(eager), prefill(fast)  # also the warm-up
    runs: dict[str, list[float]] = {"eager": [], "fast": []}
    for _ in range(repeats):
        for name, lm in (("eager", eager), ("fast", fast)):
            runs[name].append(timed(lambda: prefill(lm))[0])
    del fast
    gc.collect()
    out = {f"prefill_tps_{name}": round(PREFILL_TOKENS / min(times), 1) for name, times in runs.items()}
    out["prefill_speedup"] = round(out["prefill_tps_fast"] / out["prefill_tps_eager"], 2)
    out["prefill_tokens"] = PREFILL_TOKENS
    out["prefill_runtime_eager"] = describe(vlm)["language_model"]
    out["prefill_runtime_fast"] = "fast-lm (int8 dynamic linear, fbgemm)"
    out["prefill_fast_relative_error"] = round(float((quantized - reference).norm() / reference.norm()), 4)
    log(f"  prefill: {out}")
    return out


def clone_cache(cache, kind: str, room: int):
    """A copy of `cache`'s keys and values in a new cache of `kind` (no recomputation), with `room` more positions."""
    from transformers import DynamicCache, StaticCache

    from vidmem.agents.answer import ReservedCache

    length = cache.get_seq_length()
    if kind == "static":
        clone = StaticCache(config=APP_CONFIG[0], max_cache_len=length + room)
        positions = torch.arange(length)
        for index, layer in enumerate(cache.layers):
            clone.update(layer.keys.clone(), layer.values.clone(), index, {"cache_position": positions})
        return clone
    clone = {"dynamic": DynamicCache, "reserved": ReservedCache}[kind]()
    for index, layer in enumerate(cache.layers):
        clone.update(layer.keys.clone(), layer.values.clone(), index)
    return clone


APP_CONFIG: list = []  # the text config StaticCache is sized from (set by decode_speed)


def decode_speed(app: Vidmem, tokens: int, repeats: int) -> dict:
    """ms per generated token on the kept evidence of the last question, for each KV cache class, side by side.

    The answerer's own decode loop runs on all of them; only the cache differs: transformers' DynamicCache
    (torch.cat of the whole cache at every token) and StaticCache (preallocated, written in place by position),
    and vidmem's ReservedCache (a DynamicCache whose layers append in place). Each continues from a copy of the
    same kept prefix, alternating, best of `repeats`; the stops are lifted so every run decodes `tokens` tokens.
    """
    answerer = app.answerer
    kept = answerer.kept
    APP_CONFIG[:] = [answerer.vlm.config.text_config]
    saved = answerer.stop_ids, answerer.max_new_tokens
    answerer.stop_ids, answerer.max_new_tokens = set(), tokens
    question = answerer.vlm.question_embeds(QUESTIONS[1])
    runs: dict[str, list[float]] = {"dynamic": [], "static": [], "reserved": []}
    try:
        for _ in range(repeats):
            for kind in runs:
                cache = clone_cache(kept.cache, kind, room=question.shape[0] + tokens + 8)
                logits = answerer._forward(question, cache)
                started = time.perf_counter()
                answerer._decode(logits, cache, started, None)
                runs[kind].append((time.perf_counter() - started) / tokens)
    finally:
        answerer.stop_ids, answerer.max_new_tokens = saved
    out = {kind: {"ms_per_token": round(1000 * min(times), 2)} for kind, times in runs.items()}
    out["context_tokens"] = kept.length
    out["tokens"] = tokens
    best_transformers = min(out["dynamic"]["ms_per_token"], out["static"]["ms_per_token"])
    out["speedup"] = round(best_transformers / max(out["reserved"]["ms_per_token"], 1e-9), 2)  # > 1: keep ReservedCache
    out["old"], out["new"] = out["dynamic"], out["reserved"]  # the names report.py reads
    log(f"  decode: {out}")
    return out


def prefill_threads(app: Vidmem, stream: str, segments: int, repeats: int) -> dict:
    """Prefill seconds of the same evidence with OpenMP left at one thread by a FAISS search (the old memory
    search) versus the threads restored (the fix in memory/index.py): torch and FAISS share the OpenMP runtime."""
    import faiss

    from vidmem.agents.select import Level, Pick

    picks = [Pick(row, Level.FULL, 0.0, "bench") for row in app.memory.segments(stream=stream)[:segments]]
    answerer = app.answerer
    threads = torch.get_num_threads()
    runs: dict[str, list[float]] = {"one_thread_old": [], "restored_new": []}
    for _ in range(repeats):  # alternating, best of `repeats`: other work on a shared CPU comes and goes
        for name, count in (("one_thread_old", 1), ("restored_new", threads)):
            faiss.omp_set_num_threads(count)
            seconds, kept = timed(lambda: (answerer.prefill(picks, app.memory.read_tokens), sync(app))[0])
            runs[name].append(seconds)
    faiss.omp_set_num_threads(threads)
    out = {name: round(min(times), 4) for name, times in runs.items()}
    out["tokens"] = kept.length
    out["threads"] = threads
    out["speedup"] = round(out["one_thread_old"] / max(out["restored_new"], 1e-9), 2)
    log(f"  prefill threads: {out}")
    return out


# ---------------------------------------------------------------------------------------------------- main


def run(args: argparse.Namespace) -> dict:
    rng = np.random.default_rng(0)
    with tempfile.TemporaryDirectory(prefix="vidmem-bench-answer-") as tmp:
        work = Path(tmp)
        app = build_app(args, work)
        try:
            vlm = app.vlm
            answerer = app.answerer
            answerer.max_new_tokens = 1  # an ask returns right after its first token: its wall time is the TTFT
            pool = token_pool(vlm.hidden_size, rng)  # (245, H) blocks: tokens are stored projected
            lengths = {"ten_minutes": 600.0, "one_hour": 3600.0} if not args.quick else {"ten_minutes": 600.0}
            if args.quick:
                lengths = {"short": 80.0, "long": 240.0}
            result: dict = {"bench": "answer", "quick": args.quick, "device": str(vlm.device),
                            "dtype": str(vlm.dtype).replace("torch.", ""), "budget": BUDGET,
                            "model": vlm.name, "text_layers": args.layers if not args.quick else None,
                            "runtime": describe(vlm), "native_tokens_per_frame": NATIVE_TOKENS_PER_FRAME,
                            "footage": {}}
            log("CPU runtime: prefill eager versus int8, side by side")
            result.update(prefill_runtimes(app, repeats=3))
            if args.runtime_only:
                log("live stream")
                result["live"] = live(app, rng, pool, segments=24)
                return finish(result, args)
            for name, seconds in lengths.items():
                log(f"writing {name}: {int(seconds / SEGMENT_SECONDS)} segments")
                fill(app, name.replace("_", "-"), int(seconds / SEGMENT_SECONDS), start=0.0, rng=rng, pool=pool)
            # warm-up: the first forward pass allocates and picks kernels; keep it out of every figure
            app.ask("warm up", streams=[next(iter(lengths)).replace("_", "-")], budget=300)
            cold_points: list[tuple[int, float]] = []
            for name, seconds in lengths.items():
                log(f"footage {name}")
                result["footage"][name] = footage(app, name.replace("_", "-"), seconds, cold_points=cold_points)
            log("native path, 32 uniform frames")
            layers = vlm.model.config.vision_config.num_hidden_layers
            native = native_uniform(app, rng, tower_layers=layers, full_layers=layers if args.quick else 27)
            cold_points.append((native["prefill_tokens"], native["prefill_seconds"]))
            result["native_uniform"] = native
            log("live stream")
            result["live"] = live(app, rng, pool, segments=24)
            # the live window is prefilled inside that ask (refresh_live), before the answerer's own clock starts
            cold_points.append((result["live"]["cold"]["prefill_tokens"],
                                result["live"]["cold"]["ask_to_first_token_seconds"]))
            a, b = fit_prefill(cold_points)
            largest = max(cold_points)
            rate = largest[1] / largest[0]  # seconds per token of the longest measured cold prefill
            result["prefill_fit"] = {"a_seconds_per_token": a, "b_seconds_per_token2": b, "points": cold_points,
                                     "largest_seconds_per_token": rate}
            per_frame_vision = native["vision_seconds_estimate_full_tower"] / NATIVE_FRAMES
            for figures in result["footage"].values():
                s = figures["native"]["prefill_tokens"]
                # ESTIMATES, not measured: at least the largest measured prefill's rate times the tokens (attention
                # grows quadratically, so more), and the least-squares t = a*S + b*S^2 over the measured prefills
                figures["native"]["ttft_estimate_seconds"] = round(rate * s, 1)
                figures["native"]["ttft_estimate_quadratic_seconds"] = round(a * s + b * s * s, 1) if b else None
                figures["native"]["vision_estimate_seconds"] = round(per_frame_vision * figures["frames_1fps"], 1)
                figures["native"]["estimate_note"] = (
                    "ESTIMATE: the longest measured prefill's seconds per token times the tokens (a lower bound: "
                    "attention is quadratic); infeasible anyway beyond the 32k context"
                )
            log("prefill after a FAISS search: one OpenMP thread (old) versus restored (new)")
            result["prefill_threads"] = prefill_threads(app, next(iter(lengths)).replace("_", "-"), 2, repeats=3)
            log("decode loop, old versus new")
            # continues from the kept evidence of the longest footage's follow-up (live questions do not replace it)
            result["decode"] = decode_speed(app, args.decode_tokens, repeats=2 if args.quick else 3)
            return finish(result, args)
        finally:
            app.close()


def finish(result: dict, args: argparse.Namespace) -> dict:
    """Top-level live figures, threads and machine; the runtimes are measured side by side on a shared machine."""
    live_figures = result["live"]
    result["live_ttft_warm_s"] = live_figures["warm"]["ask_to_first_token_seconds"]
    result["live_ttft_cold_s"] = live_figures["cold"]["ask_to_first_token_seconds"]
    result["threads"] = torch.get_num_threads()
    result["machine"] = machine_info()
    result["note"] = ("eager and fast figures come from the same run, alternating; the machine may be shared with "
                      "other work (machine.load_average), so compare ratios, not absolute seconds across runs")
    return result


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="tiny checkpoints, small memories (under a minute)")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu", help="cpu or cuda")
    parser.add_argument("--layers", type=int, default=24, help="text decoder layers to build (24 = full size)")
    parser.add_argument("--decode-tokens", type=int, default=None, help="tokens generated per decode timing")
    parser.add_argument("--runtime", choices=("eager", "fast", "fast-lm"), default=None,
                        help="runtime of the app's VLM (default: $VIDMEM_RUNTIME, else fast on a CPU)")
    parser.add_argument("--runtime-only", action="store_true",
                        help="only the CPU runtime figures: prefill eager vs fast, live time to first token")
    args = parser.parse_args()
    if args.decode_tokens is None:
        args.decode_tokens = 8 if args.quick else 12
    emit(run(args))


if __name__ == "__main__":
    main()
