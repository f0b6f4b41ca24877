"""Answer quality on the synthetic world (vidmem.stream.world), with tiny models trained for it on a CPU.

    python bench/quality.py --quick --seed 0 --out DIR      # minutes on 2 cores
    python bench/quality.py --out DIR --plot docs/quality.png  # the full recipe, for the README

Trains the world's CLIP and LLaVA-OneVision (bench/world_models.py; `--reuse` keeps DIR/vlm and DIR/clip when they
are there), writes held-out footage (seeds below the training seeds, so unseen layouts) to DIR/eval/ with
DIR/eval/questions.json, a list of {"video", "question", "answer", "kind"}, ingests it into DIR/eval/memory with
vidmem itself (the same code as `vidmem ingest`) and asks every question (the same code as `vidmem ask`). Prints one
JSON line:
- `accuracy`: per question kind, the share of answers `world.grade` accepts, over the held-out clips at budget 6000;
- `describe`: per attribute (colour, shape, size, background), the share of held-out shots whose description
  ("Describe the video." over that shot alone) names it right, beside a uniform guess;
- `prior`: per kind, the accuracy of the best constant answer (learnt from the training questions): what a model
  that ignores the video scores, the line `accuracy` must clear;
- `needle`: over an hour of footage, per budget from 500 to 6,000 visual tokens, the share of questions whose
  needle segment is in the selected evidence (`recall`) and whose answer is right (`accuracy`);
- `compressors`: every registered compressor under the same token bound, untrained and trained (the same number of
  further steps for both; "trained" also trains the compressor), accuracy per kind on held-out clips;
- `rules`: a watch rule ("a red circle", say) on minute-long streams with and without that object: precision, recall,
  latency (seconds from the object's appearance to the event's start) at a threshold calibrated on training streams;
- `storage`: int8 tokens, STC's cacher (on by default) and STC's pruner beside float16 tokens of every frame, on
  held-out clips, asked of the stage-1 model (it reads the evidence): accuracy per kind, described attributes and
  the bytes of tokens stored; `describe_stage1` repeats the described attributes of every frame encoded;
- `vision`: linear-probe accuracy of the vision tower's patch features, random and trained.
These are tiny models on a synthetic world: the figures measure vidmem's pipeline, not the public checkpoints.
"""
from __future__ import annotations

import argparse
import asyncio
import json
import logging
import random
import re
import shutil
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Sequence

import numpy as np
import torch

if __package__ in (None, ""):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from bench import world_models as wm
from vidmem.stream import world

log = logging.getLogger("vidmem.bench.quality")

BUDGETS = (500, 1000, 2000, 4000, 6000)
EVAL_KINDS = ("what", "when", "order", "motion", "temporal", "count", "absent")


@dataclass(frozen=True)
class Scale:
    eval_clips: int  # held-out 16 s clips
    hours: int  # held-out hours with a needle
    compare_steps: int  # further training steps per compressor and variant
    compare_clips: int  # held-out clips the compressors are compared on
    rule_streams: int  # held-out streams with the event, and as many without
    storage_clips: int  # held-out clips the storage options are compared on


SCALES = {"quick": Scale(eval_clips=10, hours=1, compare_steps=12, compare_clips=3, rule_streams=3, storage_clips=10),
          "full": Scale(eval_clips=40, hours=3, compare_steps=200, compare_clips=16, rule_streams=10, storage_clips=20)}


def eval_seeds(seed: int, n: int) -> list[int]:
    """Held-out clip seeds: below the training seeds (world_models.TRAIN_SEED_BASE), distinct per bench seed."""
    return [seed * 1000 + i for i in range(n)]


# ---- the held-out set through vidmem ---------------------------------------------------------------------------
def write_eval_set(folder: Path, seed: int, scale: Scale) -> world.WorldSet:
    made = world.build_set(folder, eval_seeds(seed, scale.eval_clips), hours=[seed * 1000 + 900 + h for h in range(scale.hours)])
    return made


def open_app(out: Path, memory: Path, compressor: str = "timeperceiver", weights: Path | None = None, *,
             model: Path | None = None, **settings):
    """vidmem as the CLI runs it (`--model OUT/vlm --embedder OUT/clip`, any other setting as given), in this
    process."""
    from vidmem.agents.app import Settings, Vidmem

    return Vidmem(Settings(memory=memory, model=str(model or out / "vlm"), embedder=str(out / "clip"), device="cpu",
                           compressor=compressor, compressor_weights=weights, max_new_tokens=16, **settings))


STORAGE_VARIANTS = {  # what each storage or speed option costs in answers, beside every frame through the tower
    "float16, every frame encoded": {"feature_cache": False},
    "int8 tokens (--token-dtype int8)": {"token_dtype": "int8", "feature_cache": False},
    "STC cacher (--feature-cache, the default)": {"feature_cache": True},
    "STC pruner 0.5 (--prune 0.5)": {"prune": 0.5, "feature_cache": False},
}


def stage1_model(out: Path) -> Path:
    """The VLM after stage 1 (one-shot descriptions), which reads the evidence; OUT/vlm when there is no such stage."""
    stage1 = out / "train" / "vlm-stage1"
    return stage1 if (stage1 / "config.json").is_file() else out / "vlm"


def storage_variants(out: Path, made: world.WorldSet, *, clips: int) -> dict:
    """Accuracy per kind and per described attribute on the first `clips` held-out clips, ingested and asked once
    per option in STORAGE_VARIANTS (a fresh memory each), with the bytes of tokens each memory stores.

    Asked of the stage-1 model: an option's cost shows only in a model that reads the evidence."""
    footage = [f for f in made.footage if f.kind == "clip"][:clips]
    subset = world.WorldSet(made.folder, footage=footage)
    videos = {f"{f.name}.mp4" for f in footage}
    questions = [q for q in made.questions if q.video in videos]
    results = {}
    for name, settings in STORAGE_VARIANTS.items():
        mark = time.perf_counter()
        memory = out / "storage" / re.sub(r"[^a-z0-9]+", "-", name.lower()).strip("-")
        shutil.rmtree(memory, ignore_errors=True)
        app = open_app(out, memory, model=stage1_model(out), **settings)
        try:
            ingest_all(app, {f.name: made.path(f) for f in footage})
            summary, _ = accuracy_per_kind(app, questions)
            summary["describe"] = {a: v["accuracy"] for a, v in describe_accuracy(app, subset).items()}
        finally:
            app.close()
        summary["token_bytes"] = sum(f.stat().st_size for f in (memory / "tokens").rglob("*") if f.is_file())
        summary["seconds"] = wm._since(mark)
        results[name] = summary
        log.info("%s: %s", name, summary["all"])
    return results


def ingest_all(app, paths: dict[str, Path], *, on_segment=None) -> None:
    from vidmem.stream import IngestOptions, open_source

    for stream, path in paths.items():
        asyncio.run(app.ingest(open_source(str(path)), stream=stream, options=IngestOptions(),
                               on_segment=on_segment))


def stream_name(video: str) -> str:
    return Path(video).stem


def accuracy_per_kind(app, questions: Sequence[world.Question], *, budget: int = 6000) -> tuple[dict, list[dict]]:
    results = []
    for q in questions:
        answer = app.ask(q.question, streams=[stream_name(q.video)], budget=budget)
        ok = world.grade(q.kind, answer.text, q.answer)
        results.append({"video": q.video, "question": q.question, "answer": q.answer, "kind": q.kind,
                        "said": answer.text, "correct": ok})
    return summarise(results), results


def summarise(results: list[dict]) -> dict:
    by_kind: dict[str, list[bool]] = {}
    for r in results:
        by_kind.setdefault(r["kind"], []).append(bool(r["correct"]))
    out = {kind: {"accuracy": round(sum(v) / len(v), 3), "n": len(v)} for kind, v in sorted(by_kind.items())}
    every = [bool(r["correct"]) for r in results]
    out["all"] = {"accuracy": round(sum(every) / max(1, len(every)), 3), "n": len(every)}
    return out


ATTRIBUTES = {  # what a shot's description must name, and the share a guess gets right
    "colour": 1 / len(world.COLOURS), "shape": 1 / len(world.SHAPES), "size": 1 / len(world.SIZES),
    "background": 1 / len(world.BACKGROUNDS),
}


def shot_attributes(shot: world.Shot) -> dict[str, str]:
    values = {"background": shot.background}
    if shot.thing is not None:
        values |= {"colour": shot.thing.colour, "shape": shot.thing.shape, "size": shot.thing.size}
    return values


def described(text: str, attribute: str, truth: str) -> bool:
    """Whether a description names `truth` for `attribute` and no other value of it (plurals count as the shape)."""
    words = set(re.findall(r"[a-z]+", text.lower()))
    words |= {shape for shape, plural in world.PLURAL.items() if plural in words}
    values = {"colour": world.COLOURS, "shape": world.SHAPES, "size": world.SIZES, "background": world.BACKGROUNDS}
    named = {v for v in values[attribute] if v in words}
    if attribute == "background":  # the background is named last, after "on a"; an object may share a colour name
        match = re.search(r"(\w+) background", text.lower())
        named = {match.group(1)} if match else set()
    return named == {truth}


def describe_accuracy(app, made: world.WorldSet) -> dict:
    """Per attribute, the share of held-out shots whose description (`ask "Describe the video."` over that shot
    alone, as `vidmem ask --since --until` does) names it right; `chance` is a uniform guess."""
    hits: dict[str, list[bool]] = {a: [] for a in ATTRIBUTES}
    for footage in (f for f in made.footage if f.kind == "clip"):
        for shot in footage.shots:
            answer = app.ask(wm.CAPTION_PROMPT, streams=[footage.name], since=shot.start + 0.5, until=shot.end - 0.5)
            for attribute, truth in shot_attributes(shot).items():
                hits[attribute].append(described(answer.text, attribute, truth))
    return {a: {"accuracy": _mean(v), "chance": round(ATTRIBUTES[a], 3), "n": len(v)} for a, v in hits.items()}


def question_form(question: str) -> str:
    """The question with the world's words (colours, shapes) blanked: "What shape is the _ object?"."""
    words = set(world.COLOURS) | set(world.SHAPES) | set(world.PLURAL.values())
    return " ".join("_" if w.strip("?,.").lower() in words else w for w in question.split())


def prior_baseline(train: Sequence[dict], questions: Sequence[world.Question]) -> dict:
    """Per kind, the accuracy of a model that reads the question but never the video: for every question form
    ("What shape is the _ object?"), the one answer the training questions of that form most often accept (for
    `when`, the time within one segment of the most of them). The accuracy above it is what reading the video adds."""
    def truth(row: dict) -> str:  # `when` answers are taught as HH:MM:SS and graded against seconds
        return str(int(world.cited_times(row["answer"])[0])) if row["kind"] == "when" else row["answer"]

    forms: dict[tuple[str, str], list[dict]] = {}
    for row in train:
        if row.get("kind") in world.KINDS:
            forms.setdefault((row["kind"], question_form(row["question"])), []).append(row)
    best = {key: max(sorted({r["answer"] for r in rows}),
                     key=lambda c: sum(world.grade(key[0], c, truth(r)) for r in rows))
            for key, rows in forms.items()}
    out = {}
    for kind in sorted({q.kind for q in questions}):
        held = [q for q in questions if q.kind == kind]
        right = [world.grade(kind, best.get((kind, question_form(q.question)), ""), q.answer) for q in held]
        out[kind] = {"accuracy": round(sum(right) / len(right), 3), "n": len(right)}
    return out


def needle(app, made: world.WorldSet) -> dict:
    """Recall of the needle segment in the selected evidence, and answer accuracy, per budget."""
    hours = [f for f in made.footage if f.kind == "hour"]
    rows = {b: {"recall": [], "accuracy": [], "visual_tokens": []} for b in BUDGETS}
    for footage in hours:
        shot = next(s for s in footage.shots if s.thing is not None and s.thing.name == footage.target)
        q = next(q for q in made.questions if q.video == f"{footage.name}.mp4")
        for budget in BUDGETS:
            answer = app.ask(q.question, streams=[footage.name], budget=budget)
            found = any(s["start"] < shot.end and s["end"] > shot.start for s in answer.segments())
            rows[budget]["recall"].append(found)
            rows[budget]["accuracy"].append(world.grade("needle", answer.text, q.answer))
            rows[budget]["visual_tokens"].append(answer.visual_tokens)
    return {str(b): {"recall": _mean(r["recall"]), "accuracy": _mean(r["accuracy"]),
                     "visual_tokens": int(max(r["visual_tokens"] or [0]))} for b, r in rows.items()} | {
        "hours": len(hours)}


def _mean(values: list) -> float:
    return round(float(np.mean(values)), 3) if values else float("nan")


# ---- Clapper's comparison: every compressor under one token bound ------------------------------------------------
COMPARE_KINDS = ("what", "motion", "temporal")
COMPARE_BOUND = 800  # visual tokens per question for every compressor (a 16 s clip is 980 at TimePerceiver's full detail)


def compare_compressors(out: Path, made: world.WorldSet, *, clips: int, steps: int, bound: int, seed: int,
                        work: Path | None = None, names: Sequence[str] | None = None) -> dict:
    """For every registered compressor: accuracy per kind on held-out clips at budget `bound`, untrained (ingested
    with `--compressor NAME`) and trained (`vidmem train --objective qa --compressor NAME`: compressor and projector,
    language model frozen, `steps` steps on the training clips' questions; ingested and asked with its checkpoint).
    `out` holds the trained models and their training set; memories and checkpoints go to `work` (OUT/compare)."""
    from vidmem.agents.models import load_vlm
    from vidmem.compressors import available

    compare = [f for f in made.footage if f.kind == "clip"][:clips]
    videos = {f"{f.name}.mp4" for f in compare}
    questions = [q for q in made.questions if q.video in videos and q.kind in COMPARE_KINDS]
    work = work or out / "compare"
    work.mkdir(parents=True, exist_ok=True)
    data = work / "qa-compare.jsonl"
    rows = [json.loads(line) for line in (out / "train" / "qa.jsonl").read_text().splitlines()]
    train_dir = (out / "train").resolve()
    data.write_text("".join(json.dumps({**r, "video": str(train_dir / r["video"])}) + "\n"
                            for r in rows if r["kind"] in COMPARE_KINDS))
    results: dict = {}
    for name in names or available():
        results[name] = {}
        for variant in ("untrained", "trained"):
            weights = None
            mark = time.perf_counter()
            if variant == "trained":
                try:
                    trained = wm.vidmem_train(
                        load_vlm(str(out / "vlm"), device="cpu"), data=data,
                        output=work / f"{name}.safetensors", objective="qa", steps=steps, lr=1e-3,
                        seed=seed, model_dir=None, compressor=name, cache_dir=out / "train" / "features",
                        train_llm=False, batch_size=2)
                except Exception as exc:  # a compressor that cannot train on this objective is reported, not fatal
                    results[name][variant] = {"error": f"{type(exc).__name__}: {exc}"}
                    continue
                weights = Path(trained["checkpoint"])
            app = open_app(out, work / f"{name}-{variant}", compressor=name, weights=weights)
            try:
                ingest_all(app, {f.name: made.path(f) for f in compare})
                summary, _ = accuracy_per_kind(app, questions, budget=bound)
            finally:
                app.close()
            summary["seconds"] = round(time.perf_counter() - mark, 1)
            results[name][variant] = summary
            log.info("%s %s: %s", name, variant, summary["all"])
    return results


# ---- watch rules ------------------------------------------------------------------------------------------------
def rule_scores(app, folder: Path, streams: list[world.Footage], condition: str) -> dict[str, list[tuple[float, float, float]]]:
    """Per stream: (start, end, CLIP similarity of the keyframe and `condition`) for each stored segment, as the
    monitor scores them."""
    captured: dict[str, list] = {}
    paths = {}
    for footage in streams:
        paths[footage.name] = world.write(footage, folder / f"{footage.name}.mp4")
    text = app.embedder.embed_texts([condition])[0]

    def on_segment(row, segment) -> None:
        image = app.embedder.embed_images([segment.keyframe.image])[0]
        captured.setdefault(row.stream, []).append((row.start, row.end, float(np.dot(image, text))))

    ingest_all(app, paths, on_segment=on_segment)
    return captured


def run_rule(scores: list[tuple[float, float, float]], threshold: float, *, stream: str) -> list:
    from vidmem.agents.rules import Rule, RuleTracker

    tracker = RuleTracker(Rule("world", "target", threshold=threshold, min_duration=0.0, cooldown=10.0), stream)
    events = []
    for start, end, score in scores:
        events += [c.event for c in tracker.observe(start, score, end=end) if c.type == "new"]
    return events


def watch_rules(out: Path, seed: int, scale: Scale) -> dict:
    """Precision, recall and latency of a rule on held-out streams, thresholded from training streams."""
    rng = random.Random(seed)
    colour, shape = rng.choice(list(world.COLOURS)), rng.choice(world.SHAPES)
    condition = f"a {colour} {shape}"

    def streams(base: int, n: int) -> list[world.Footage]:
        return [world.make_event_stream(base + i, target=(colour, shape), with_event=with_event)
                for i in range(n) for with_event in (True, False)]

    calibration = streams(wm.TRAIN_SEED_BASE + 50_000 + seed * 100, max(3, scale.rule_streams // 2))
    held_out = streams(seed * 1000 + 500, scale.rule_streams)
    app = open_app(out, out / "rules" / "memory")
    try:
        cal = rule_scores(app, out / "rules" / "calibration", calibration, condition)
        test = rule_scores(app, out / "rules" / "eval", held_out, condition)
    finally:
        app.close()
    truth = {f.name: _event_span(f) for f in calibration + held_out}
    positives = [s for name, rows in cal.items() for (a, b, s) in rows if _overlaps(truth[name], a, b)]
    negatives = [s for name, rows in cal.items() for (a, b, s) in rows if not _overlaps(truth[name], a, b)]
    threshold = _best_threshold(positives, negatives)
    fired, true_events, hits, latencies = 0, 0, 0, []
    for footage in held_out:
        events = run_rule(test.get(footage.name, []), threshold, stream=footage.name)
        span = truth[footage.name]
        fired += len(events)
        good = [e for e in events if span is not None and _overlaps(span, e.start_time, e.end_time)]
        true_events += len(good)
        if span is not None and good:
            hits += 1
            latencies.append(max(0.0, good[0].start_time - span[0]))
    with_event = sum(1 for f in held_out if truth[f.name] is not None)
    return {
        "condition": condition, "threshold": round(threshold, 4),
        "precision": round(true_events / fired, 3) if fired else None,
        "recall": round(hits / with_event, 3) if with_event else None,
        "latency_seconds": round(float(np.mean(latencies)), 2) if latencies else None,
        "events_on_quiet_streams": sum(len(run_rule(test.get(f.name, []), threshold, stream=f.name))
                                       for f in held_out if truth[f.name] is None),
        "streams": len(held_out),
    }


def _event_span(footage: world.Footage) -> tuple[float, float] | None:
    for shot in footage.shots:
        if shot.thing is not None and shot.thing.name == footage.target:
            return float(shot.start), float(shot.end)
    return None


def _overlaps(span, start: float, end: float | None) -> bool:
    return span is not None and start < span[1] and (end if end is not None else start) >= span[0]


def _best_threshold(positives: list[float], negatives: list[float]) -> float:
    """The cut that best separates the calibration scores (maximum F1 on segments); midway between neighbours."""
    if not positives:
        return 1.0
    values = sorted(set(positives + negatives))
    candidates = [(a + b) / 2 for a, b in zip(values, values[1:])] or [values[0]]
    best, best_f1 = candidates[0], -1.0
    for t in candidates:
        tp = sum(p >= t for p in positives)
        fp = sum(n >= t for n in negatives)
        f1 = 2 * tp / (2 * tp + fp + (len(positives) - tp)) if tp else 0.0
        if f1 > best_f1:
            best, best_f1 = t, f1
    return float(best)


# ---- the plot ---------------------------------------------------------------------------------------------------
def plot(result: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 4, figsize=(20, 4.2))
    acc = result["accuracy"]
    kinds = [k for k in EVAL_KINDS if k in acc]
    x = np.arange(len(kinds))
    prior = result.get("prior", {})
    axes[0].bar(x - 0.2, [acc[k]["accuracy"] for k in kinds], 0.4, color="#4c72b0", label="vidmem")
    axes[0].bar(x + 0.2, [prior.get(k, {}).get("accuracy", 0) for k in kinds], 0.4, color="#bbbbbb",
                label="question only (best constant)")
    axes[0].set_xticks(x, kinds)
    axes[0].legend(fontsize=8)
    axes[0].set_ylim(0, 1)
    axes[0].set_title("accuracy per question kind (held-out clips)")
    axes[0].tick_params(axis="x", rotation=30)
    budgets = [b for b in BUDGETS if str(b) in result["needle"]]
    axes[1].plot(budgets, [result["needle"][str(b)]["recall"] for b in budgets], "o-", label="needle recall")
    axes[1].plot(budgets, [result["needle"][str(b)]["accuracy"] for b in budgets], "s-", label="answer accuracy")
    axes[1].set_ylim(-0.05, 1.05)
    axes[1].set_xlabel("visual-token budget")
    axes[1].set_title(f"one needle in an hour ({result['needle']['hours']} hours)")
    axes[1].legend()
    comp = result["compressors"]
    names = list(comp)
    x = np.arange(len(names))
    for offset, variant, colour in ((-0.2, "untrained", "#bbbbbb"), (0.2, "trained", "#dd8452")):
        axes[2].bar(x + offset, [comp[n][variant].get("temporal", {}).get("accuracy", 0) for n in names], 0.4,
                    label=f"{variant}: temporal", color=colour)
    axes[2].set_xticks(x, names, rotation=30)
    axes[2].set_ylim(0, 1)
    axes[2].axhline(0.5, color="k", lw=0.5, ls="--")
    axes[2].set_title("temporal kind per compressor, same bound")
    axes[2].legend()
    described = result.get("describe", {})
    names = list(described)
    x = np.arange(len(names))
    stage1 = result.get("describe_stage1", {})
    axes[3].bar(x - 0.27, [stage1.get(n, 0) for n in names], 0.27, color="#55a868", label="after stage 1")
    axes[3].bar(x, [described[n]["accuracy"] for n in names], 0.27, color="#4c72b0", label="after QA")
    axes[3].bar(x + 0.27, [described[n]["chance"] for n in names], 0.27, color="#bbbbbb", label="a guess")
    axes[3].set_xticks(x, names)
    axes[3].set_ylim(0, 1)
    axes[3].set_title("held-out shots described: attribute named right")
    axes[3].legend(fontsize=8)
    fig.suptitle(f"vidmem on the synthetic world, tiny models trained on CPU ({result['recipe']} recipe)")
    fig.tight_layout()
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(path, dpi=90)
    plt.close(fig)


# ---- main ---------------------------------------------------------------------------------------------------------
def run(out: Path, *, quick: bool, seed: int, reuse: bool, plot_path: Path | None) -> dict:
    name = "quick" if quick else "full"
    scale = SCALES[name]
    recipe = replace(wm.RECIPES[name], seed=seed)
    started = time.perf_counter()
    result: dict = {"bench": "quality", "recipe": name, "seed": seed,
                    "models": "tiny LLaVA-OneVision (1-layer SigLIP, 2-layer Qwen2) and CLIP trained on the synthetic world",
                    "runtime": f"torch {torch.__version__} CPU, {torch.get_num_threads()} threads"}
    reused = reuse and (out / "vlm" / "config.json").is_file() and (out / "clip" / "modules.json").is_file()
    if not reused:
        report = wm.train_all(out, recipe)
    else:
        report = json.loads((out / "train_report.json").read_text())
    result["training"] = {k: report.get(k) for k in ("clip", "caption", "qa", "seconds")}
    result["vision"] = report.get("vision")

    for stale in (out / "eval" / "memory", out / "rules", out / "compare"):  # memories of an earlier run
        shutil.rmtree(stale, ignore_errors=True)
    made = write_eval_set(out / "eval", seed, scale)
    (out / "eval" / "questions.json").write_text(json.dumps(
        [{"video": q.video, "question": q.question, "answer": q.answer, "kind": q.kind} for q in made.questions], indent=1))
    app = open_app(out, out / "eval" / "memory")
    try:
        paths = {f.name: made.path(f) for f in made.footage}
        mark = time.perf_counter()
        ingest_all(app, paths)
        result["ingest_seconds"] = round(time.perf_counter() - mark, 1)
        clip_questions = [q for q in made.questions if q.kind != "needle"]
        result["accuracy"], answers = accuracy_per_kind(app, clip_questions)
        train_rows = [json.loads(line) for line in (out / "train" / "qa.jsonl").read_text().splitlines()]
        result["prior"] = prior_baseline(train_rows, clip_questions)
        result["describe"] = describe_accuracy(app, made)
        (out / "eval" / "answers.json").write_text(json.dumps(answers, indent=1))
        result["needle"] = needle(app, made)
    finally:
        app.close()

    result["answer_seconds"] = wm._since(started) - result["training"].get("seconds", 0) if not reused else None
    mark = time.perf_counter()
    result["storage"] = storage_variants(out, made, clips=scale.storage_clips)
    result["describe_stage1"] = result["storage"]["float16, every frame encoded"]["describe"]
    result["storage_seconds"] = wm._since(mark)
    mark = time.perf_counter()
    result["compressors"] = compare_compressors(out, made, clips=scale.compare_clips, steps=scale.compare_steps,
                                                bound=COMPARE_BOUND, seed=seed)
    result["compressor_bound"] = COMPARE_BOUND
    result["compare_seconds"] = wm._since(mark)
    mark = time.perf_counter()
    result["rules"] = watch_rules(out, seed, scale)
    result["rules_seconds"] = wm._since(mark)
    tp = result["compressors"].get("timeperceiver", {})
    gain = (tp.get("trained", {}).get("temporal", {}).get("accuracy", 0.0)
            - tp.get("untrained", {}).get("temporal", {}).get("accuracy", 0.0))
    result["timeperceiver_temporal_gain"] = round(gain, 3)
    result["seconds"] = round(time.perf_counter() - started, 1)
    if plot_path is not None:
        plot(result, plot_path)
        result["plot"] = str(plot_path)
    return result


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="the quick recipe and a small held-out set")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--out", type=Path, default=Path("quality-run"))
    parser.add_argument("--reuse", action="store_true", help="keep OUT/vlm and OUT/clip when they are there")
    parser.add_argument("--plot", type=Path, help="where to draw the plot (default OUT/quality.png)")
    parser.add_argument("--threads", type=int, help="torch threads (1 on a CPU shared with other work: spinning "
                        "OpenMP threads slow small models down tenfold there)")
    args = parser.parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s: %(message)s", stream=sys.stderr)
    for noisy in ("transformers", "sentence_transformers", "vidmem.stream", "vidmem.agents", "vidmem.memory"):
        logging.getLogger(noisy).setLevel(logging.WARNING)
    result = run(args.out, quick=args.quick, seed=args.seed, reuse=args.reuse, plot_path=args.plot or args.out / "quality.png")
    print(json.dumps(result), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
