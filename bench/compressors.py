"""Compressors side by side at SigLIP-so400m width: tokens, compression, CPU time and size.

    python bench/compressors.py [--quick] [--repeats N] [--threads N]

For every registered compressor at its defaults, with random weights (timing does not depend on them), on a
4-frame segment of D = 1152 features over 729 patches (LLaVA-OneVision's SigLIP at 384 px / patch 14):
- tokens per segment for T = 1..4, tokens per frame at T = 4, Clapper's compression ratio (eq. 1) at T = 4;
- median milliseconds per segment on the CPU (inference mode, fp32), after one warm-up call;
- parameters.
Also STC's pruner (keep half of a TimePerceiver block) in ms per block, and the STC cacher's hit rate on the
test videos at 1 and 5 fps (the fraction of vision-tower calls it saves, tolerance 2 grey levels on a 32x32
thumbnail; a tiny tower, since hits do not depend on it).
Prints one JSON line; progress goes to stderr. Absolute times are this machine's; compare them side by side.
"""
from __future__ import annotations

import argparse
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

from vidmem.compressors import available, build_compressor
from vidmem.compressors.stc import CachedEncoder, Pruner

REPO = Path(__file__).resolve().parents[1]
TESTDATA = REPO.parent / "shared" / "testdata"
DIM = 1152  # SigLIP-so400m feature width
PATCHES = 729  # 27x27 patches at 384 px / patch 14


def log(msg: str) -> None:
    print(f"[bench/compressors] {msg}", file=sys.stderr, flush=True)


def time_ms(fn, repeats: int) -> float:
    fn()  # warm-up
    times = []
    for _ in range(repeats):
        start = time.perf_counter()
        fn()
        times.append((time.perf_counter() - start) * 1000)
    return statistics.median(times)


def bench_compressors(repeats: int) -> dict:
    torch.manual_seed(0)
    features = torch.randn(4, PATCHES, DIM)
    out = {}
    for name in available():
        compressor = build_compressor(name, dim=DIM, num_patches=PATCHES).eval()
        with torch.inference_mode():
            ms = time_ms(lambda: compressor(features), repeats)
        out[name] = {
            "tokens_per_segment": [compressor.token_count(t) for t in range(1, 5)],
            "tokens_per_frame": compressor.tokens_per_frame(4),
            "compression_ratio": round(compressor.compression_ratio(4), 2),
            "ms_per_segment": round(ms, 2),
            "parameters": sum(p.numel() for p in compressor.parameters()),
        }
        log(f"{name}: {out[name]}")
    return out


def bench_pruner(repeats: int) -> dict:
    torch.manual_seed(0)
    with torch.inference_mode():
        block = build_compressor("timeperceiver", dim=DIM).eval()(torch.randn(4, PATCHES, DIM))
        previous = build_compressor("timeperceiver", dim=DIM).eval()(torch.randn(4, PATCHES, DIM))
        pruner = Pruner(keep=0.5)
        ms = time_ms(lambda: pruner(block, previous), repeats)
    return {"keep": 0.5, "tokens_in": block.count, "tokens_out": pruner(block, previous).count, "ms_per_block": round(ms, 3)}


def bench_cacher(quick: bool) -> dict:
    if not (TESTDATA / "videos.json").is_file():
        return {"skipped": f"no test videos at {TESTDATA}"}
    sys.path.insert(0, str(REPO / "tests"))
    from checkpoints import build_tiny_llava

    from vidmem.agents.models import load_vlm
    from vidmem.compressors.train import decode_frames

    videos = json.loads((TESTDATA / "videos.json").read_text())["videos"]
    names = ["counter.mp4", "test.mp4", "bikes.mp4"] if quick else sorted(videos)
    out = {}
    with tempfile.TemporaryDirectory() as tmp:
        encoder = load_vlm(str(build_tiny_llava(Path(tmp))), device="cpu").encoder
        for name in names:
            out[name] = {}
            for fps in (1.0, 5.0):
                frames = decode_frames(TESTDATA / videos[name]["path"], fps=fps)
                cached = CachedEncoder(encoder, tolerance=2.0)
                for frame in frames:  # one frame at a time, as a live stream delivers them
                    cached([frame])
                out[name][f"{fps:g}fps"] = {
                    "frames": len(frames), "encoded": cached.misses, "hit_rate": round(cached.hits / len(frames), 3)
                }
            log(f"cacher {name}: {out[name]}")
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="fewer repeats and videos (under a minute)")
    parser.add_argument("--repeats", type=int, help="timed calls per compressor (default 3 quick, 10 full)")
    parser.add_argument("--threads", type=int, help="torch CPU threads (default: torch's choice)")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    repeats = args.repeats or (3 if args.quick else 10)
    started = time.perf_counter()
    result = {
        "bench": "compressors",
        "dim": DIM,
        "patches": PATCHES,
        "segment_frames": 4,
        "device": "cpu",
        "threads": torch.get_num_threads(),
        "repeats": repeats,
        "compressors": bench_compressors(repeats),
        "pruner": bench_pruner(repeats),
        "cacher": bench_cacher(args.quick),
    }
    result["seconds"] = round(time.perf_counter() - started, 1)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
