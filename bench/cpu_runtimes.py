"""CPU runtimes side by side: eager fp32, vidmem's `fast` (torch int8 dynamic), torch.compile and ONNX Runtime.

    python bench/cpu_runtimes.py [--layers N | --tower-layers N --lm-layers N] [--threads T] [--repeats R]
                                 [--frames F] [--tokens S] [--only tower|lm] [--candidates fast,ort_int8_u8,...]

Two models, LLaVA-OneVision 0.5B's full-size architecture with random weights (bench/common.py; timing does not
depend on the weights):
- the SigLIP-so400m vision tower (384 px, the features LLaVA-OneVision reads: the last hidden state), in ms/frame;
- the Qwen2-0.5B language model prefilling `--tokens` evidence embeddings (`inputs_embeds`) into an empty
  transformers Cache, in tokens/s.

Candidates, each converted once (its conversion seconds and memory reported) and then timed alternating with the
others, best of `--repeats`:
- `eager`: fp32 as loaded (the reference for every relative L2 error);
- `fast`: vidmem's current runtime (compressors/runtime.py, agents/runtime.py): int8 dynamic `nn.Linear`s, fbgemm;
- `compile`: `torch.compile` (inductor, freezing on: weights constant-folded and prepacked), fp32;
- `compile_int8`: `torch.compile` on top of `fast`'s int8 module;
- `compile_torchao_int8`: `torch.compile` over torchao's int8 dynamic-activation/int8-weight linear layers;
- `ort_fp32`: `torch.onnx.export` (dynamo) -> ONNX Runtime, CPU provider, all graph optimizations;
- `ort_int8_s8` / `ort_int8_u8`: `onnxruntime.quantization.quantize_dynamic` of that graph, per-channel, QInt8 or
  QUInt8 weights (AVX2 without VNNI may run one better than the other); `ort_int8_s8_rr`: QInt8 with
  `reduce_range` (7-bit weights: the u8 x s8 products of AVX2's vpmaddubsw cannot saturate).

`--ceiling` times eager and `fast` only, splitting each call into its linear layers (timed by hooks on every
`nn.Linear` and int8 dynamic Linear) and everything else (attention, norms, activations): what any runtime that
speeds up the linear layers alone can reach, against the issue's goals (tower 3x, prefill 2x), beside the most
torch's int8 kernels gain over fp32 on a large square product on this CPU.

`--layers` cuts both models to N layers (identical layers: per-layer cost and the ratios carry over to full depth).
Memory: `rss_added_mb` is the resident size the candidate added (after conversion, before timing), `peak_rss_mb`
the process's peak resident size sampled during its conversion; all candidates live in one process, so the peak
includes the ones built before it. One JSON line on stdout; progress on stderr.
"""
from __future__ import annotations

import argparse
import copy
import gc
import os
import sys
import tempfile
import threading
import time
import traceback
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from common import QWEN2_05B, SIGLIP_SO400M, emit, logger, machine_info, rss_mb  # noqa: E402

log = logger("cpu_runtimes")
Run = Callable[[], torch.Tensor]


# ---------------------------------------------------------------------------------------------------- memory


class PeakRss:
    """The process's peak resident size while the block runs, sampled every 50 ms."""

    def __enter__(self) -> "PeakRss":
        self.peak = rss_mb()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()
        return self

    def _sample(self) -> None:
        while not self._stop.wait(0.05):
            self.peak = max(self.peak, rss_mb())

    def __exit__(self, *exc) -> None:
        self._stop.set()
        self._thread.join()
        self.peak = max(self.peak, rss_mb())


# ---------------------------------------------------------------------------------------------------- candidates


@dataclass
class Candidate:
    name: str
    runtime: str  # what it is, in words
    run: Run | None = None
    convert_s: float = 0.0
    peak_rss_mb: float = 0.0
    rss_added_mb: float = 0.0
    note: str | None = None
    error: str | None = None
    output: torch.Tensor | None = None
    times: list[float] = field(default_factory=list)


SELECTED: set[str] | None = None  # --candidates: build only these
SKIPPED = "not selected (--candidates)"


def build(name: str, runtime: str, make: Callable[[], tuple[Run, str | None]]) -> Candidate:
    """Convert one candidate (timing its one-time cost and memory) and run it once (its output, and a warm-up)."""
    candidate = Candidate(name, runtime)
    if SELECTED is not None and name not in SELECTED:
        candidate.error = SKIPPED
        return candidate
    gc.collect()
    before = rss_mb()
    log(f"{name}: converting ({runtime})")
    try:
        with PeakRss() as peak:
            start = time.perf_counter()
            run, candidate.note = make()
            candidate.output = run().detach().float().clone()  # compile/ORT first call: part of the one-time cost
            candidate.convert_s = time.perf_counter() - start
        candidate.run = run
        candidate.peak_rss_mb = peak.peak
        candidate.rss_added_mb = rss_mb() - before
        log(f"{name}: ready in {candidate.convert_s:.1f} s, +{candidate.rss_added_mb:.0f} MB")
    except Exception as exc:  # a candidate that cannot be built is reported, not fatal
        candidate.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[0][:300] if str(exc).strip() else ''}"
        log(f"{name}: FAILED {candidate.error}\n{traceback.format_exc(limit=6)}")
    gc.collect()
    return candidate


def race(candidates: list[Candidate], repeats: int) -> None:
    """Time the working candidates alternating (one call each per round): one untimed round, then `repeats`."""
    for candidate in candidates:
        if candidate.run is not None:
            candidate.run()
    for round_ in range(repeats):
        for candidate in candidates:
            if candidate.run is None:
                continue
            start = time.perf_counter()
            candidate.run()
            candidate.times.append(time.perf_counter() - start)
        log(f"round {round_ + 1}/{repeats}: " + ", ".join(
            f"{c.name} {c.times[-1]:.2f} s" for c in candidates if c.times))


def relative_error(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.float() - b.float()).norm() / b.float().norm())


def report(candidates: list[Candidate], *, unit: str, per_call: float, reference: str = "eager",
           baseline: str = "fast") -> dict:
    """{name: figures} with ratios against eager and against the current `fast` runtime of the same run."""
    ref = next(c for c in candidates if c.name == reference)
    values: dict[str, float] = {}
    out: dict[str, dict] = {}
    for c in candidates:
        if c.error == SKIPPED:
            continue
        row: dict = {"runtime": c.runtime}
        if c.error:
            row["error"] = c.error
        else:
            best = min(c.times)
            values[c.name] = 1000 * best / per_call if unit == "ms_per_frame" else per_call / best
            row[unit] = round(values[c.name], 1 if unit == "ms_per_frame" else 2)
            row["relative_error"] = round(relative_error(c.output, ref.output), 5)
            row["convert_s"] = round(c.convert_s, 1)
            row["rss_added_mb"] = round(c.rss_added_mb)
            row["peak_rss_mb"] = round(c.peak_rss_mb)
        if c.note:
            row["note"] = c.note
        out[c.name] = row
    faster = (lambda a, b: a / b) if unit == "ms_per_frame" else (lambda a, b: b / a)  # > 1: the candidate wins
    for name, value in values.items():
        out[name]["x_eager"] = round(faster(values[reference], value), 2)
        if baseline in values:
            out[name]["x_fast"] = round(faster(values[baseline], value), 2)
    return out


# ---------------------------------------------------------------------------------------------------- ONNX


def ort_session(path: Path, threads: int):
    import onnxruntime as ort

    options = ort.SessionOptions()
    options.intra_op_num_threads = threads
    options.inter_op_num_threads = 1
    options.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    options.graph_optimization_level = ort.GraphOptimizationLevel.ORT_ENABLE_ALL
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def export_onnx(module: torch.nn.Module, args: tuple, path: Path, *, dynamic_shapes=None, output_names=None) -> None:
    with torch.no_grad():
        torch.onnx.export(module, args, str(path), dynamo=True, external_data=True, dynamic_shapes=dynamic_shapes,
                          input_names=None, output_names=output_names, optimize=True, verbose=False)


def quantize_onnx(source: Path, target: Path, weight_type: str, *, reduce_range: bool = False) -> None:
    from onnxruntime.quantization import QuantType, quantize_dynamic

    quantize_dynamic(str(source), str(target), per_channel=True, reduce_range=reduce_range,
                     weight_type=getattr(QuantType, weight_type), use_external_data_format=True)


# ---------------------------------------------------------------------------------------------------- tower


class TowerFeatures(torch.nn.Module):
    """The SigLIP tower returning what LLaVA-OneVision reads (vision_feature_layer -1: the last hidden state)."""

    def __init__(self, tower: torch.nn.Module) -> None:
        super().__init__()
        self.tower = tower

    def forward(self, pixel_values: torch.Tensor) -> torch.Tensor:
        return self.tower(pixel_values=pixel_values, output_hidden_states=True).hidden_states[-1]  # (B, 729, 1152)


def tower_candidates(args: argparse.Namespace, work: Path) -> tuple[dict, list[Candidate]]:
    from transformers import SiglipVisionConfig, SiglipVisionModel

    from vidmem.compressors.runtime import quantize_linears

    config = dict(SIGLIP_SO400M, num_hidden_layers=args.tower_layers)
    torch.manual_seed(0)
    tower = SiglipVisionModel(SiglipVisionConfig(**config, attn_implementation="sdpa")).eval()
    eager = TowerFeatures(tower).eval()
    pixels = torch.randn(args.frames, 3, config["image_size"], config["image_size"])  # (F, 3, 384, 384), normalized
    feed = {"pixel_values": pixels.numpy()}

    def plain(module: Callable) -> Run:
        return lambda: _no_grad(module, pixels)

    candidates = [build("eager", "torch eager fp32 (SDPA)", lambda: (plain(eager), None))]
    int8 = TowerFeatures(quantize_linears(tower)).eval()
    candidates.append(build("fast", "vidmem fast: torch int8 dynamic nn.Linear (fbgemm, per-channel)",
                            lambda: (plain(int8), None)))
    candidates += torch_compile_candidates(eager, int8, plain)
    candidates += ort_candidates(eager, (pixels,), feed, work / "tower", args.threads,
                                 dynamic_shapes={"pixel_values": {0: torch.export.Dim("frames", min=1, max=64)}},
                                 unpack=lambda outputs: torch.from_numpy(outputs[0]))
    info = {"model": f"SigLIP-so400m vision tower (LLaVA-OneVision 0.5B), {args.tower_layers} of 27 layers, "
                     f"{config['image_size']} px, random weights",
            "frames_per_call": args.frames}
    return info, candidates


def _no_grad(module: torch.nn.Module, *inputs: torch.Tensor) -> torch.Tensor:
    with torch.inference_mode():
        return module(*inputs)


def torch_compile_candidates(eager: torch.nn.Module, int8: torch.nn.Module,
                             runner: Callable[[Callable], Run], note: str | None = None) -> list[Candidate]:
    """torch.compile (inductor, freezing) over the fp32 module, over `fast`'s int8 module, and over torchao's int8
    dynamic-activation/int8-weight tensors (the int8 path torch.compile is made for), when torchao is installed."""
    import torch._inductor.config as inductor

    inductor.freezing = True  # inference: constant-fold and prepack the weights (the recommended CPU setting)
    torch._dynamo.config.cache_size_limit = 64  # one compiled graph per candidate module; none is evicted

    def compiled(module: torch.nn.Module | Callable[[], torch.nn.Module]) -> Callable[[], tuple[Run, str | None]]:
        def make() -> tuple[Run, str | None]:
            target = module if isinstance(module, torch.nn.Module) else module()
            return runner(torch.compile(target, backend="inductor", dynamic=False)), note
        return make

    def torchao_int8() -> torch.nn.Module:
        from torchao.quantization import Int8DynamicActivationInt8WeightConfig, quantize_

        quantized = copy.deepcopy(eager)
        quantize_(quantized, Int8DynamicActivationInt8WeightConfig())
        return quantized.eval()

    return [
        build("compile", "torch.compile inductor fp32 (freezing)", compiled(eager)),
        build("compile_int8", "torch.compile inductor over torch int8 dynamic nn.Linear (freezing)", compiled(int8)),
        build("compile_torchao_int8", f"torch.compile inductor over torchao {_version('torchao')} int8 dynamic "
              "activation + int8 weight (freezing)", compiled(torchao_int8)),
    ]


def _version(module: str) -> str | None:
    try:
        return __import__(module).__version__
    except ImportError:
        return None


def ort_candidates(module: torch.nn.Module, args: tuple, feed: dict, work: Path, threads: int, *, dynamic_shapes,
                   unpack: Callable[[list], torch.Tensor], output_names=None, note: str | None = None) -> list[Candidate]:
    import onnxruntime as ort

    work.mkdir(parents=True, exist_ok=True)
    fp32_path = work / "fp32.onnx"
    exported: dict[str, float] = {}

    def fp32() -> tuple[Run, str | None]:
        start = time.perf_counter()
        export_onnx(module, args, fp32_path, dynamic_shapes=dynamic_shapes, output_names=output_names)
        exported["s"] = time.perf_counter() - start
        log(f"  exported in {exported['s']:.1f} s")
        session = ort_session(fp32_path, threads)
        return (lambda: unpack(session.run(None, feed))), note

    def int8(weight_type: str, reduce_range: bool) -> Callable[[], tuple[Run, str | None]]:
        def make() -> tuple[Run, str | None]:
            if not fp32_path.exists():
                raise RuntimeError("the fp32 export failed")
            target = work / f"int8_{weight_type}{'_rr' if reduce_range else ''}.onnx"
            quantize_onnx(fp32_path, target, weight_type, reduce_range=reduce_range)
            session = ort_session(target, threads)
            export = f"its conversion time adds to the fp32 export's {exported.get('s', 0):.1f} s"
            return (lambda: unpack(session.run(None, feed))), f"{note}; {export}" if note else export
        return make

    candidates = [build("ort_fp32", f"ONNX Runtime {ort.__version__} fp32 (torch.onnx.export dynamo, CPU EP)", fp32)]
    for name, weight_type, reduce_range in (("ort_int8_s8", "QInt8", False), ("ort_int8_u8", "QUInt8", False),
                                            ("ort_int8_s8_rr", "QInt8", True)):
        candidates.append(build(name, f"ONNX Runtime {ort.__version__} int8 (quantize_dynamic, per-channel, "
                                      f"{weight_type}{', reduce_range: 7-bit weights' if reduce_range else ''})",
                                int8(weight_type, reduce_range)))
    return candidates


# ---------------------------------------------------------------------------------------------------- language model


class Prefill(torch.nn.Module):
    """Qwen2 prefilling `inputs_embeds` into a fresh DynamicCache: the last hidden state and the cache's keys/values."""

    def __init__(self, lm: torch.nn.Module) -> None:
        super().__init__()
        self.lm = lm

    def forward(self, inputs_embeds: torch.Tensor) -> tuple[torch.Tensor, ...]:
        from transformers import DynamicCache

        cache = DynamicCache(config=self.lm.config)
        hidden = self.lm(inputs_embeds=inputs_embeds, cache=cache, use_cache=True).last_hidden_state  # (1, S, H)
        keys = [layer.keys for layer in cache.layers]  # each (1, kv_heads, S, head_dim)
        values = [layer.values for layer in cache.layers]
        return (hidden, *keys, *values)


def lm_candidates(args: argparse.Namespace, work: Path) -> tuple[dict, list[Candidate]]:
    from transformers import DynamicCache, Qwen2Config, Qwen2Model

    from vidmem.agents.runtime import optimize_language_model

    torch.manual_seed(0)
    config = Qwen2Config(**{**QWEN2_05B, "num_hidden_layers": args.lm_layers}, attn_implementation="sdpa")
    lm = Qwen2Model(config).eval()
    embeds = torch.randn(1, args.tokens, config.hidden_size) * 0.5  # (1, S, H) evidence embeddings
    layers = config.num_hidden_layers

    def with_cache(module: Callable) -> Run:
        """The call vidmem makes (agents/answer.py): inputs_embeds into a transformers Cache that is kept."""
        def run() -> torch.Tensor:
            cache = DynamicCache(config=config)
            with torch.inference_mode():
                hidden = module(inputs_embeds=embeds, cache=cache, use_cache=True).last_hidden_state
            assert cache.get_seq_length() == args.tokens
            return hidden
        return run

    candidates = [build("eager", "torch eager fp32 (SDPA)", lambda: (with_cache(lm), None))]
    int8 = optimize_language_model(copy.deepcopy(lm), "fast-lm")
    candidates.append(build("fast", "vidmem fast-lm: torch int8 dynamic nn.Linear (fbgemm, per-channel)",
                            lambda: (with_cache(int8), None)))

    candidates += torch_compile_candidates(
        lm, int8, with_cache, note="the compiled Qwen2Model called with inputs_embeds and a DynamicCache (kept)")

    def unpack(outputs: list) -> torch.Tensor:
        cache = DynamicCache(config=config)  # the exported graph's present keys/values go into a transformers Cache
        for i in range(layers):
            cache.update(torch.from_numpy(outputs[1 + i]), torch.from_numpy(outputs[1 + layers + i]), i)
        assert cache.get_seq_length() == args.tokens
        return torch.from_numpy(outputs[0])

    names = ["hidden", *(f"key_{i}" for i in range(layers)), *(f"value_{i}" for i in range(layers))]
    candidates += ort_candidates(
        Prefill(lm).eval(), (embeds,), {"inputs_embeds": embeds.numpy()}, work / "lm", args.threads,
        dynamic_shapes={"inputs_embeds": {1: torch.export.Dim("tokens", min=2, max=32768)}}, unpack=unpack,
        output_names=names,
        note="prefill from an empty cache only: the graph returns the present keys/values, loaded into a "
             "DynamicCache; continuing a kept (non-empty) cache would need a second graph taking past keys/values")
    info = {"model": f"Qwen2-0.5B language model (LLaVA-OneVision 0.5B), {args.lm_layers} of 24 layers, random "
                     f"weights, prefill of {args.tokens} inputs_embeds into an empty transformers Cache",
            "tokens": args.tokens}
    return info, candidates


# ---------------------------------------------------------------------------------------------------- ceiling


class LinearClock:
    """Wall time spent inside linear layers (fp32 `nn.Linear` and int8 dynamic ones) while enabled: global module
    hooks, so no model code changes. The models run synchronously on the CPU, so the sums are exact."""

    def __init__(self) -> None:
        self.seconds = 0.0
        self._started: dict[int, float] = {}
        self._handles = []

    @staticmethod
    def _is_linear(module: torch.nn.Module) -> bool:
        return isinstance(module, torch.nn.Linear) or type(module).__name__ == "Linear"

    def __enter__(self) -> "LinearClock":
        def before(module, inputs):
            if self._is_linear(module):
                self._started[id(module)] = time.perf_counter()

        def after(module, inputs, output):
            if self._is_linear(module):
                self.seconds += time.perf_counter() - self._started.pop(id(module))

        self._handles = [torch.nn.modules.module.register_module_forward_pre_hook(before),
                         torch.nn.modules.module.register_module_forward_hook(after)]
        return self

    def __exit__(self, *exc) -> None:
        for handle in self._handles:
            handle.remove()


def int8_gemm_peak(repeats: int = 5, size: int = 2048) -> dict:
    """fp32 `nn.Linear` against torch's int8 dynamic one on a large square product (size x size by size x size),
    alternating, best of `repeats`: the most the int8 kernels gain over fp32 on this CPU, away from small shapes."""
    from vidmem.compressors.runtime import quantize_linears

    torch.manual_seed(0)
    fp32 = torch.nn.Sequential(torch.nn.Linear(size, size)).eval()
    int8 = quantize_linears(copy.deepcopy(fp32))
    x = torch.randn(size, size)
    times: dict[str, list[float]] = {"fp32": [], "int8": []}
    with torch.inference_mode():
        for _ in range(repeats + 1):  # the first round warms up
            for name, module in (("fp32", fp32), ("int8", int8)):
                start = time.perf_counter()
                module(x)
                times[name].append(time.perf_counter() - start)
    best = {name: min(values[1:]) for name, values in times.items()}
    flops = 2 * size**3
    return {"shape": f"{size}x{size}x{size}", "fp32_gflops": round(flops / best["fp32"] / 1e9, 1),
            "int8_gops": round(flops / best["int8"] / 1e9, 1), "speedup": round(best["fp32"] / best["int8"], 2)}


def ceiling(candidates: list[Candidate], repeats: int, *, unit: str, per_call: float, goal: float) -> dict:
    """Eager and `fast` split into linear layers and the rest (best of `repeats`, alternating), and what speeding up
    the linear layers alone can reach: `bound_free_linears` if they cost nothing, `linear_speedup_needed` to reach
    `goal` (None: out of reach whatever the linear layers cost)."""
    split: dict[str, list[tuple[float, float]]] = {}
    for _ in range(repeats):
        for c in candidates:
            if c.run is None:
                continue
            with LinearClock() as clock:
                start = time.perf_counter()
                c.run()
                total = time.perf_counter() - start
            split.setdefault(c.name, []).append((total, clock.seconds))
    best = {name: min(rows) for name, rows in split.items()}  # the fastest call, with its own split
    out: dict = {}
    for name, (total, linear) in best.items():
        out[name] = {"total_s": round(total, 3), "linear_s": round(linear, 3), "other_s": round(total - linear, 3),
                     "linear_share": round(linear / total, 3)}
    (eager_total, eager_linear), (fast_total, fast_linear) = best["eager"], best["fast"]
    eager_other = eager_total - eager_linear
    target = eager_total / goal  # the time per call the goal asks for
    out["int8_linear_speedup"] = round(eager_linear / fast_linear, 2)
    out["int8_gemm_peak"] = int8_gemm_peak()
    out["x_eager_fast"] = round(eager_total / fast_total, 2)
    out["goal_x"] = goal
    out["bound_free_linears_x"] = round(eager_total / eager_other, 2)
    out["linear_speedup_needed"] = round(eager_linear / (target - eager_other), 2) if target > eager_other else None
    out["unit"] = unit
    out["per_call"] = per_call
    return out


# ---------------------------------------------------------------------------------------------------- main


def versions() -> dict:
    return {module: _version(module) for module in ("onnxruntime", "onnx", "onnxscript", "torchao")}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--layers", type=int, default=None, help="cut both models to N layers")
    parser.add_argument("--tower-layers", type=int, default=27)
    parser.add_argument("--lm-layers", type=int, default=24)
    parser.add_argument("--threads", type=int, default=None, help="torch and ONNX Runtime threads (default: torch's)")
    parser.add_argument("--repeats", type=int, default=3, help="timed rounds; the best of them is reported")
    parser.add_argument("--frames", type=int, default=1, help="frames per tower call")
    parser.add_argument("--tokens", type=int, default=1024, help="prefill tokens")
    parser.add_argument("--only", choices=("tower", "lm"), default=None)
    parser.add_argument("--ceiling", action="store_true",
                        help="eager and fast only, split into linear layers and the rest: what the goals need")
    parser.add_argument("--candidates", default=None,
                        help="comma-separated names to build (eager always; ort_fp32 too when any ort_ is named)")
    args = parser.parse_args()
    global SELECTED
    if args.ceiling:
        args.candidates = "fast"
    if args.candidates:
        SELECTED = {"eager", *args.candidates.split(",")}
        if any(name.startswith("ort_int8") for name in SELECTED):
            SELECTED.add("ort_fp32")  # the int8 graphs are quantized from its export
    if args.layers:
        args.tower_layers, args.lm_layers = min(args.layers, 27), min(args.layers, 24)
    if args.threads:
        torch.set_num_threads(args.threads)
    args.threads = torch.get_num_threads()
    out: dict = {"bench": "cpu_runtimes", "machine": machine_info(), "versions": versions(),
                 "threads": args.threads, "repeats": args.repeats}
    loads = [os.getloadavg()[0]]
    with tempfile.TemporaryDirectory(prefix="vidmem-cpu-runtimes-") as tmp:
        for part, (builder, unit, per_call, goal) in {
            "tower": (tower_candidates, "ms_per_frame", args.frames, 3.0),
            "lm": (lm_candidates, "tokens_per_s", args.tokens, 2.0),
        }.items():
            if args.only and args.only != part:
                continue
            log(f"--- {part}")
            info, candidates = builder(args, Path(tmp))
            loads.append(os.getloadavg()[0])
            if args.ceiling:
                out[part] = {**info, "ceiling": ceiling(candidates, args.repeats, unit=unit, per_call=per_call,
                                                         goal=goal)}
                loads.append(os.getloadavg()[0])
                log(f"{part}: {out[part]}")
                continue
            race(candidates, args.repeats)
            loads.append(os.getloadavg()[0])
            out[part] = {**info, "candidates": report(candidates, unit=unit, per_call=per_call)}
            log(f"{part}: {out[part]}")
            del candidates
            gc.collect()
    out["load_average_1min"] = {"min": min(loads), "max": max(loads)}
    emit(out)


if __name__ == "__main__":
    main()
