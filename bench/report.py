"""Runs every bench, keeps their JSON lines, draws the plots and writes docs/performance.md.

    python bench/report.py [--quick] [--gpu] [--only answer,memory] [--redraw] [--out DIR]

- runs bench/{ingest,compressors,memory,answer,live}.py one after another (`--quick` passes their quick mode;
  `--gpu`, or a visible CUDA GPU, passes `--device cuda` to the benches that take it: absolute times in bf16 with
  flash-attention and FAISS on the GPU; on a CPU the figures to read are ratios measured side by side in one run);
- writes their JSON lines to OUT/results.jsonl, and OUT/results-machine.jsonl with the machine (CPU model, cores,
  torch version, date) and the command on every line;
- draws OUT/tokens_per_question.png, OUT/ingest_rtf.png, OUT/search_latency.png, OUT/ttft.png;
- writes OUT/performance.md: the table of figures beside the papers' where the same quantity exists.
OUT is docs/ (docs/quick/ with --quick). `--redraw` skips running and rebuilds plots and table from OUT/results.jsonl.
A bench that fails leaves an {"bench", "error"} line and the rest still run.
"""
from __future__ import annotations

import argparse
import collections
import json
import os
import shlex
import subprocess
import sys
import threading
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import REPO, logger, machine_info  # noqa: E402

log = logger("report")

BENCHES = ("ingest", "compressors", "memory", "answer", "live")
DEVICE_BENCHES = {"ingest", "memory", "answer", "live"}  # benches that take --device
TIMEOUT_S = {"quick": 240, "full": 3600}  # per bench

# The papers' headline figures, beside ours where the same quantity exists (../shared/papers/).
PAPERS = {
    "clapper_tokens_per_frame": 61,  # Clapper abstract: 13x compression, averaging 61 tokens/frame
    "clapper_tokens_per_video": 6000,  # Clapper abstract: fewer than 6,000 visual tokens per video
    "svc_compression": 64,  # AVS/SVC: 4x4x4 = 64x compression
    "stc_vision_encoding": -24.5,  # STC (related work): ViT encoding latency -24.5 %
    "stc_prefill": -45.3,  # STC: LLM pre-filling latency -45.3 %
}
NATIVE_TOKENS_PER_FRAME = 196
CONTEXT = 32768  # LLaVA-OneVision 0.5B's text context


# ---------------------------------------------------------------------------------------------------- running


def bench_command(name: str, *, quick: bool, gpu: bool, extra: str = "") -> list[str]:
    command = [sys.executable, str(REPO / "bench" / f"{name}.py")]
    if quick:
        command.append("--quick")
    if gpu and name in DEVICE_BENCHES:
        command += ["--device", "cuda"]
    return command + shlex.split(extra)


def run_bench(name: str, *, quick: bool, gpu: bool, extra: str = "") -> dict:
    """Run one bench; its stderr (progress) is echoed as it comes, its last JSON line on stdout is the result."""
    command = bench_command(name, quick=quick, gpu=gpu, extra=extra)
    log(f"running {shlex.join(command[1:])}")
    started = time.perf_counter()
    process = subprocess.Popen(command, cwd=REPO, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stdout: list[str] = []
    stderr: collections.deque[str] = collections.deque(maxlen=20)

    def echo() -> None:
        for line in process.stderr:
            stderr.append(line.rstrip())
            print(line, end="", file=sys.stderr, flush=True)

    readers = [threading.Thread(target=echo, daemon=True),
               threading.Thread(target=lambda: stdout.extend(process.stdout), daemon=True)]
    for reader in readers:
        reader.start()
    try:
        process.wait(timeout=TIMEOUT_S["quick" if quick else "full"])
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()
        return {"bench": name, "error": "timed out"}
    for reader in readers:
        reader.join(timeout=10)
    seconds = round(time.perf_counter() - started, 1)
    for line in reversed(stdout):
        try:
            result = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(result, dict):
            result.setdefault("bench", name)
            result["bench_wall_seconds"] = seconds
            log(f"  {name}: done in {seconds} s")
            return result
    tail = list(stderr)[-1:] or ["no output"]
    log(f"  {name}: failed (exit {process.returncode}): {tail[0]}")
    return {"bench": name, "error": f"exit {process.returncode}: {tail[0]}", "bench_wall_seconds": seconds}


# ---------------------------------------------------------------------------------------------------- reading


def get(data: dict | None, *path, default=None):
    """data[path[0]][path[1]]..., or `default` where any step is missing."""
    for key in path:
        if not isinstance(data, dict) or key not in data:
            return default
        data = data[key]
    return data


def percent(new: float | None, old: float | None) -> str:
    """'-84.1%': the change from `old` to `new`."""
    if new is None or not old:
        return "n/a"
    return f"{100 * (new / old - 1):+.1f}%"


def footage_label(seconds: float) -> str:
    if seconds >= 3600:
        return f"{seconds / 3600:.3g} h"
    if seconds >= 60:
        return f"{seconds / 60:.3g} min"
    return f"{seconds:g} s"


def fmt(value, digits: int = 2, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, bool):
        return "yes" if value else "no"
    if isinstance(value, int) or (isinstance(value, float) and value.is_integer() and abs(value) >= 100):
        return f"{int(value):,}{unit}"
    return f"{value:.{digits}f}{unit}"


# ---------------------------------------------------------------------------------------------------- plots


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def plot_tokens(answer: dict | None, out: Path) -> Path:
    """Visual tokens per question versus footage length: vidmem (flat at the budget) and the native path."""
    plt = _pyplot()
    minutes = [1, 2, 5, 10, 30, 60, 180, 600, 1440]
    native = [m * 60 * NATIVE_TOKENS_PER_FRAME for m in minutes]
    budget = get(answer, "budget", default=6000)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    ax.plot(minutes, native, "o-", color="tab:red", label="LLaVA-OneVision native (196 tokens/frame, 1 fps)")
    vidmem_minutes = [minutes[0], minutes[-1]]
    ax.plot(vidmem_minutes, [budget, budget], "--", color="tab:blue", alpha=0.6, label=f"vidmem budget ({budget:,})")
    measured = [(f["video_seconds"] / 60, get(f, "vidmem", "cold", "visual_tokens"))
                for f in (get(answer, "footage", default={}) or {}).values()]
    measured = [(m, t) for m, t in measured if t]
    if measured:
        ax.plot(*zip(*measured), "s", color="tab:blue", markersize=8, label="vidmem, measured visual tokens")
    ax.axhline(CONTEXT, color="grey", linestyle=":", label="32k context of the 0.5B model")
    ax.set_xscale("log")
    ax.set_yscale("log")
    ax.set_xlabel("footage (minutes)")
    ax.set_ylabel("visual tokens per question")
    ax.set_title("Tokens per question versus footage length")
    ax.legend(fontsize=8)
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, out / "tokens_per_question.png")


def ingest_stages(ingest: dict | None) -> dict[str, float]:
    """Mean real-time factor per stage over the test videos (video seconds per wall second)."""
    stages: dict[str, list[float]] = {}
    for video in (get(ingest, "decode", "videos", default=None) or get(ingest, "decode", default={}) or {}).values():
        if not isinstance(video, dict):
            continue
        for key, value in video.items():
            if isinstance(value, (int, float)) and "rtf" in key:
                stages.setdefault(key, []).append(float(value))
    for video in (get(ingest, "full", "videos", default={}) or {}).values():
        if isinstance(video, dict) and isinstance(video.get("rtf"), (int, float)):
            stages.setdefault("full pipeline rtf", []).append(float(video["rtf"]))
    return {key: sum(v) / len(v) for key, v in stages.items() if v}


STAGE_LABELS = {
    "decode_rtf": "decode (PyAV, every frame)",
    "decode_sample_rtf": "decode + shots + sampling + segments",
    "full pipeline rtf": "full pipeline (given --model)",
}


def encoder_rtf(answer: dict | None) -> float | None:
    """Estimated real-time factor of the full SigLIP tower at 1 fps (from the answer bench's 1-layer timing)."""
    native = get(answer, "native_uniform")
    if not native or answer.get("quick"):
        return None
    return native["frames"] / native["vision_seconds_estimate_full_tower"]


def plot_ingest(ingest: dict | None, out: Path, answer: dict | None = None) -> Path:
    plt = _pyplot()
    stages = {STAGE_LABELS.get(k, k): v for k, v in ingest_stages(ingest).items()}
    encoder = encoder_rtf(answer)
    fig, ax = plt.subplots(figsize=(7.2, 4.2))
    if stages or encoder:
        names = list(stages)
        ax.barh(names, [stages[n] for n in names], color="tab:green")
        if encoder:
            ax.barh(["SigLIP-so400m encoder, 1 fps (ESTIMATE)"], [encoder], color="lightgrey", edgecolor="black")
        ax.axvline(1.0, color="grey", linestyle=":", label="real time")
        ax.set_xscale("log")
        ax.legend(fontsize=8)
    else:
        ax.text(0.5, 0.5, "no ingest figures in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("real-time factor (video seconds per wall second, mean over test videos)")
    ax.set_title("Ingest speed per stage")
    return _save(fig, out / "ingest_rtf.png")


def _save(fig, path: Path) -> Path:
    """Write a finished figure as a PNG and free it."""
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    _pyplot().close(fig)
    return path


def search_points(memory: dict | None) -> list[tuple[int, float, float]]:
    """(segments, p50 ms, p99 ms) of the unfiltered search at each size."""
    search = get(memory, "search", default={}) or {}
    rows = []
    items = search.items() if isinstance(search, dict) else ((str(s.get("size")), s) for s in search)
    for size, figures in items:
        unfiltered = get(figures, "none") or get(figures, "unfiltered", default=figures)  # no filter
        p50 = get(unfiltered, "p50_ms")
        p99 = get(unfiltered, "p99_ms")
        try:
            n = int(str(size).replace(",", "").replace("_", ""))
        except ValueError:
            n = get(figures, "size")
        if p50 is not None and n:
            rows.append((int(n), float(p50), float(p99 if p99 is not None else p50)))
    return sorted(rows)


def plot_search(memory: dict | None, out: Path) -> Path:
    plt = _pyplot()
    points = search_points(memory)
    fig, ax = plt.subplots(figsize=(6.4, 4.2))
    if points:
        sizes, p50, p99 = zip(*points)
        ax.plot(sizes, p50, "o-", label="p50")
        ax.plot(sizes, p99, "s--", label="p99")
        ax.set_xscale("log")
        ax.set_yscale("log")
        ax.legend()
    else:
        ax.text(0.5, 0.5, "no search figures in this run", ha="center", va="center", transform=ax.transAxes)
    ax.set_xlabel("segments in memory")
    ax.set_ylabel("search latency (ms, k=32, end to end)")
    ax.set_title("Memory search latency versus memory size")
    ax.grid(True, which="both", alpha=0.3)
    return _save(fig, out / "search_latency.png")


def ttft_bars(answer: dict | None) -> list[tuple[str, float, str]]:
    """(label, seconds, kind) bars of time to first token; kind: cold, warm or estimate."""
    bars = []
    for f in (get(answer, "footage", default={}) or {}).values():
        label = footage_label(f["video_seconds"])
        cold = get(f, "vidmem", "cold", "ask_to_first_token_seconds")
        warm = get(f, "vidmem", "follow_up", "ask_to_first_token_seconds")
        if cold is not None:
            bars.append((f"vidmem {label}, cold", cold, "cold"))
        if warm is not None:
            bars.append((f"vidmem {label}, follow-up (kept KV)", warm, "warm"))
    live = get(answer, "live", default={}) or {}
    if "cold" in live:
        bars.append(("live window, cold", live["cold"]["ask_to_first_token_seconds"], "cold"))
        bars.append(("live window, warm (kept KV)", live["warm"]["ask_to_first_token_seconds"], "warm"))
    native = get(answer, "native_uniform")
    if native:
        bars.append((f"native, {native['frames']} frames (LM prefill)", native["prefill_seconds"], "cold"))
    for f in (get(answer, "footage", default={}) or {}).values():
        estimate = get(f, "native", "ttft_estimate_seconds")
        if estimate:
            bars.append((f"native {footage_label(f['video_seconds'])} (ESTIMATE, over context)", estimate, "estimate"))
    return bars


def plot_ttft(answer: dict | None, out: Path) -> Path:
    plt = _pyplot()
    bars = ttft_bars(answer)
    colours = {"cold": "tab:orange", "warm": "tab:blue", "estimate": "lightgrey"}
    fig, ax = plt.subplots(figsize=(7.5, 0.45 * max(len(bars), 4) + 1.2))
    if bars:
        labels, seconds, kinds = zip(*bars)
        ax.barh(range(len(bars)), seconds, color=[colours[k] for k in kinds],
                hatch=None, edgecolor=["black" if k == "estimate" else "none" for k in kinds])
        ax.set_yticks(range(len(bars)), labels, fontsize=8)
        ax.invert_yaxis()
        ax.set_xscale("log")
        for i, (s, k) in enumerate(zip(seconds, kinds)):
            ax.text(s, i, f" {s:.3g} s" + (" (est.)" if k == "estimate" else ""), va="center", fontsize=7)
    else:
        ax.text(0.5, 0.5, "no answer figures in this run", ha="center", va="center", transform=ax.transAxes)
    where = "GPU" if get(answer, "device", default="cpu").startswith("cuda") else "CPU, ratios count"
    ax.set_xlabel(f"time to first token (s, log; {where})")
    ax.set_title("Time to first token: warm (kept KV cache) versus cold")
    return _save(fig, out / "ttft.png")


# ---------------------------------------------------------------------------------------------------- table


def table_rows(results: dict[str, dict]) -> list[tuple[str, str, str, str]]:
    """(quantity, vidmem measured, baseline/native, paper) rows for docs/performance.md."""
    answer, compressors, memory, ingest, live = (results.get(n) for n in ("answer", "compressors", "memory", "ingest",
                                                                          "live"))
    rows: list[tuple[str, str, str, str]] = []
    tp = get(compressors, "compressors", "timeperceiver") or get(compressors, "timeperceiver")
    rows.append(("tokens per frame (default, 4-frame segment)", fmt(get(tp, "tokens_per_frame")),
                 f"{NATIVE_TOKENS_PER_FRAME} (LLaVA-OneVision video path)", f"Clapper: {PAPERS['clapper_tokens_per_frame']}"))
    rows.append(("compression vs 729 SigLIP features per frame", fmt(get(tp, "compression_ratio"), 1, "x"),
                 "3.7x (729 -> 196)", "Clapper: 13x"))
    svc = get(compressors, "compressors", "svc") or get(compressors, "svc")
    rows.append(("SVC compression (4x4x4)", fmt(get(svc, "compression_ratio"), 1, "x"), "", f"AVS/SVC: {PAPERS['svc_compression']}x"))
    for f in (get(answer, "footage", default={}) or {}).values():
        label = footage_label(f["video_seconds"])
        native = f["native"]
        rows.append((f"visual tokens per question, {label} of footage (budget {get(answer, 'budget')})",
                     fmt(get(f, "vidmem", "cold", "visual_tokens")),
                     f"{native['visual_tokens']:,} native at 1 fps ({'fits' if native['feasible'] else 'over the 32k context'})",
                     f"Clapper: < {PAPERS['clapper_tokens_per_video']:,} per video"))
        rows.append((f"prefill tokens per question, {label}", fmt(get(f, "vidmem", "cold", "prefill_tokens")),
                     f"{native['prefill_tokens']:,} native ({f['token_ratio']}x more)", ""))
        rows.append((f"time to first token, {label}, cold", fmt(get(f, "vidmem", "cold", "ask_to_first_token_seconds"), 2, " s"),
                     f">= {fmt(native.get('ttft_estimate_seconds'), 0, ' s')} native LM prefill (ESTIMATE; infeasible "
                     f"beyond the context) + {fmt(native.get('vision_estimate_seconds'), 0, ' s')} SigLIP (ESTIMATE)", ""))
        warm = get(f, "vidmem", "follow_up", "ask_to_first_token_seconds")
        cold = get(f, "vidmem", "cold", "ask_to_first_token_seconds")
        rows.append((f"time to first token, {label}, follow-up on the kept KV cache",
                     f"{fmt(warm, 3, ' s')} ({percent(warm, cold)} vs cold)",
                     f"{get(f, 'vidmem', 'follow_up_speedup')}x faster than cold", f"STC: prefill {PAPERS['stc_prefill']}%"))
    nu = get(answer, "native_uniform")
    if nu:
        rows.append((f"native path at {nu['frames']} uniform frames: prompt tokens / LM prefill",
                     "", f"{nu['prefill_tokens']:,} tokens / {fmt(nu['prefill_seconds'], 2, ' s')} "
                         f"(+ {fmt(nu['vision_seconds_estimate_full_tower'], 1, ' s')} SigLIP, estimated)", ""))
    if nu and not answer.get("quick"):  # the quick run's tower is the tests' tiny one
        per_frame = nu["vision_seconds_estimate_full_tower"] / nu["frames"]
        rows.append(("ingest's slowest stage: SigLIP-so400m (27 layers) per sampled frame, ESTIMATED from one "
                     "full-width layer x 27", f"{per_frame:.2f} s/frame = {1 / per_frame:.2f}x real time at 1 fps "
                     "before the static check and the STC cacher skip frames", "", ""))
    lv = get(answer, "live")
    if lv:
        warm, cold = lv["warm"]["ask_to_first_token_seconds"], lv["cold"]["ask_to_first_token_seconds"]
        rows.append((f"live question, warm kept window ({lv['window_tokens']:,} tokens) vs cold: time to first token",
                     f"{fmt(warm, 3, ' s')} vs {fmt(cold, 2, ' s')} ({percent(warm, cold)})",
                     f"{lv['warm_speedup']}x faster warm", f"STC: prefill {PAPERS['stc_prefill']}%"))
        rows.append(("live window: extend by one new segment", fmt(lv["extend_one_segment_seconds"], 3, " s"), "", ""))
    pt = get(answer, "prefill_threads")
    if pt:
        rows.append((f"answer prefill after a FAISS search ({pt['tokens']:,} tokens, OpenMP threads 1 -> "
                     f"{pt['threads']}): old -> new",
                     f"{fmt(pt['one_thread_old'], 2, ' s')} -> {fmt(pt['restored_new'], 2, ' s')} "
                     f"({percent(pt['restored_new'], pt['one_thread_old'])})", "", ""))
    dc = get(answer, "decode")
    if dc:
        rows.append((f"decode, ms per token at {dc['context_tokens']:,} cached tokens (DynamicCache -> ReservedCache):"
                     " old -> new", f"{dc['old']['ms_per_token']} -> {dc['new']['ms_per_token']} "
                     f"({percent(dc['new']['ms_per_token'], dc['old']['ms_per_token'])})", "", ""))
    cacher = get(compressors, "cacher")
    if isinstance(cacher, dict):
        for rate in ("1fps", "5fps"):
            frames = sum(get(v, rate, "frames", default=0) for v in cacher.values())
            encoded = sum(get(v, rate, "encoded", default=0) for v in cacher.values())
            if frames:
                rows.append((f"STC cacher at {rate}: vision-tower calls on the test videos",
                             f"{encoded} of {frames} ({percent(encoded, frames)})", "",
                             f"STC: ViT encoding {PAPERS['stc_vision_encoding']}%"))
    pruner = get(compressors, "pruner")
    if isinstance(pruner, dict):
        rows.append(("STC pruner (keep half): tokens into the LLM", f"{pruner.get('tokens_in')} -> {pruner.get('tokens_out')}",
                     "", ""))
    for size, p50, p99 in search_points(memory):
        rows.append((f"memory search p50 / p99 at {size:,} segments", f"{p50:.2f} / {p99:.2f} ms", "", ""))
    disk = get(memory, "disk")
    if isinstance(disk, dict):
        for dtype in ("float16", "int8"):
            per_second = get(disk, dtype, "bytes_per_second")
            if per_second:
                rows.append((f"disk per second of footage ({dtype} tokens, with keyframe JPEG)",
                             f"{float(per_second) / 1000:.0f} kB ({get(disk, dtype, 'mb_per_hour')} MB/hour)", "", ""))
    for stage, rtf in ingest_stages(ingest).items():
        rows.append((f"ingest real-time factor (test videos, mean): {STAGE_LABELS.get(stage, stage)}",
                     fmt(rtf, 1, "x"), "", ""))
    sb = get(ingest, "static_vs_busy")
    if isinstance(sb, dict) and get(sb, "static", "encode_calls_per_minute") is not None:
        rows.append(("vision-encoder calls per minute, static vs busy footage (static check)",
                     f"{fmt(get(sb, 'static', 'encode_calls_per_minute'), 1)} vs "
                     f"{fmt(get(sb, 'busy', 'encode_calls_per_minute'), 1)}", "", ""))
    ram = get(memory, "ram", "rss_mb_per_1000_segments_second_half", default=get(memory, "ram", "mb_per_1000_segments_second_half"))
    if ram is not None:
        rows.append(("RAM growth while adding segments (MB per 1,000, second half)", fmt(ram, 2), "", ""))
    if live and "error" not in live:
        frames = get(live, "frames", default={}) or {}
        rows.append((f"live server: {live.get('clients')} websocket clients at {live.get('fps')} fps, frames "
                     "sent / stored / dropped", f"{frames.get('sent')} / {frames.get('stored')} / {frames.get('dropped')}"
                     f" (accounted: {fmt(live.get('accounted'))})", "", ""))
        rows.append(("live server: ack latency p50 / p99", f"{fmt(get(live, 'ack_latency_ms', 'p50'), 1)} / "
                     f"{fmt(get(live, 'ack_latency_ms', 'p99'), 1)} ms", "", ""))
        latency = get(live, "answer_under_load", "ttft_s")
        if latency is not None:
            rows.append(("live server: time to first token of a question under that load", fmt(latency, 3, " s"),
                         "", ""))
    return rows


def write_markdown(results: dict[str, dict], machine: dict, command: str, out: Path, plots: list[Path],
                   runs: dict[str, str] | None = None) -> Path:
    """`runs`: bench -> the command that produced its figures, when they come from more than one run."""
    gpu = machine.get("gpu")
    lines = [
        "# vidmem performance",
        "",
        f"Measured on **{machine.get('cpu')}**, {machine.get('cores')} cores, {machine.get('ram_gb')} GB RAM"
        + (f", GPU **{gpu}**" if gpu else ", no GPU")
        + f"; torch {machine.get('torch')}, transformers {machine.get('transformers')}, faiss {machine.get('faiss')}; "
        f"{machine.get('date')}; commit {machine.get('git')}; load average at start "
        f"{fmt(machine.get('load_average'), 1)} (other work shared the CPU).",
        "",
        f"Reproduce: `{command}`",
        "",
    ]
    if runs and len(set(runs.values())) > 1:
        lines += ["Figures merged from these runs: " + "; ".join(f"{name}: `{cmd}`" for name, cmd in runs.items())
                  + ".", ""]
    if not gpu:
        lines += [
            "CPU run: LLaVA-OneVision 0.5B's full-size architecture with random weights (timing does not depend on "
            "the weights). Absolute seconds are this machine's and only indicative; the figures to read are the "
            "ratios measured side by side in one run. Native-path times for footage over the 32k context are "
            "ESTIMATES, marked as such: the longest measured prefill's seconds per token times the tokens, a lower "
            "bound since attention grows quadratically. The SigLIP tower is built with 1 of its 27 layers (the "
            "answer path never runs it); tower times are that layer's time x 27, also marked as estimates.",
            "",
        ]
    lines += ["| quantity | vidmem (this run) | native / baseline | paper |", "|---|---|---|---|"]
    lines += [f"| {q} | {v} | {b} | {p} |" for q, v, b, p in table_rows(results)]
    failed = [f"{name}: {r['error']}" for name, r in results.items() if "error" in r]
    if failed:
        lines += ["", "Benches that did not report in this run: " + "; ".join(failed) + "."]
    lines += ["", "Plots:", ""] + [f"![{p.stem}]({p.name})" for p in plots]
    path = out / "performance.md"
    path.write_text("\n".join(lines) + "\n")
    return path


# ---------------------------------------------------------------------------------------------------- main


def _saved(out: Path) -> dict[str, dict]:
    """OUT/results-machine.jsonl by bench name (empty when there is none)."""
    path = out / "results-machine.jsonl"
    if not path.is_file():
        return {}
    entries = [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
    return {entry.get("bench", "?"): entry for entry in entries}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="every bench's quick mode (a few minutes in all)")
    parser.add_argument("--gpu", action="store_true", help="pass --device cuda (default when a GPU is visible)")
    parser.add_argument("--only", help="comma-separated benches to run (default: all)")
    parser.add_argument("--redraw", action="store_true", help="no runs: redraw from OUT/results.jsonl")
    parser.add_argument("--out", help="output folder (default docs/, or docs/quick/ with --quick)")
    parser.add_argument("--bench-args", action="append", default=[], metavar="NAME=ARGS",
                        help='extra arguments for one bench, e.g. memory="--sizes 10000,100000" (repeatable)')
    args = parser.parse_args()
    extras = dict(item.split("=", 1) for item in args.bench_args)
    import torch

    gpu = args.gpu or torch.cuda.is_available()
    out = Path(args.out) if args.out else REPO / "docs" / ("quick" if args.quick else "")
    out.mkdir(parents=True, exist_ok=True)
    names = [n.strip() for n in args.only.split(",")] if args.only else list(BENCHES)
    unknown = [n for n in names if n not in BENCHES]
    if unknown:
        parser.error(f"unknown bench {unknown[0]!r}; choose from {', '.join(BENCHES)}")
    command = "python bench/report.py" + (" --quick" if args.quick else "") + (" --gpu" if gpu else "")
    if args.only:
        command += f" --only {','.join(names)}"
    command += "".join(f" --bench-args {shlex.quote(item)}" for item in args.bench_args)
    machine = machine_info()
    results: dict[str, dict] = {}
    if args.redraw:
        for line in (out / "results.jsonl").read_text().splitlines():
            if line.strip():
                entry = json.loads(line)
                results[entry.get("bench", "?")] = entry
        saved = _saved(out)
        if saved:
            first = saved.get("answer") or next(iter(saved.values()))
            machine, command = first.get("machine", machine), first.get("command", command)
    else:
        # --only re-runs some benches and keeps the others' last figures (each line keeps its own machine and date)
        kept = _saved(out) if args.only else {}
        for name in names:
            kept[name] = {"machine": machine, "command": command,
                          **run_bench(name, quick=args.quick, gpu=gpu, extra=extras.get(name, ""))}
        order = [n for n in BENCHES if n in kept]
        results = {n: {k: v for k, v in kept[n].items() if k not in ("machine", "command")} for n in order}
        (out / "results.jsonl").write_text("".join(json.dumps(results[n]) + "\n" for n in order))
        (out / "results-machine.jsonl").write_text("".join(json.dumps(kept[n]) + "\n" for n in order))
    plots = [plot_tokens(results.get("answer"), out), plot_ingest(results.get("ingest"), out, results.get("answer")),
             plot_search(results.get("memory"), out), plot_ttft(results.get("answer"), out)]
    runs = {name: entry.get("command", command) for name, entry in _saved(out).items() if name in results}
    reproduce = "python bench/report.py" + (" --quick" if args.quick else "") + (" --gpu" if gpu else "")
    markdown = write_markdown(results, machine, reproduce if len(set(runs.values())) > 1 else command, out, plots, runs)
    summary = {"bench": "report", "quick": args.quick, "gpu": gpu, "out": str(out),
               "ran": names if not args.redraw else [], "failed": [n for n, r in results.items() if "error" in r],
               "files": [str(p.relative_to(out)) for p in [*plots, markdown]]}
    print(json.dumps(summary), flush=True)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    main()
