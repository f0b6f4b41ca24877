"""Scale benchmark: vidmem on Ray with a shared memory, 1, 2 and 4 ingest workers, and a sizing table.

    python bench/scale.py [--model DIR --embedder DIR] [--streams 4] [--fps 2] [--video demo.mp4]

Runs here, on one machine: PostgreSQL (Debian's binaries) and Milvus Lite on loopback ports, a local Ray instance,
`--streams` copies of a test video ingested as source actors (unpaced) into a fresh shared memory per run, with
1, 2 and 4 encoder actors ("ingest workers"). While each run ingests, a driver thread asks a question through an
answer replica, one after another (a quarter second apart). Prints one JSON line:
- runs: per worker count, segments/second (all streams, from the first source starting to the last finishing,
  encoders already loaded) and question latency (median and max) measured during the ingest;
- per_segment: measured means (tokens, keyframe JPEG bytes, token-file bytes, PostgreSQL bytes, Milvus bytes);
- sizing: for 100 and 1,000 cameras at 1 sampled frame per second, the devices (encoder workers at the measured
  1-worker rate), token-file disk per day, and Milvus and PostgreSQL growth per day. Token bytes are projected to
  the answering model's width (`--token-width`, 896 = LLaVA-OneVision-0.5B's hidden size) and vectors to CLIP's
  512 (`--embed-width`) from the measured counts.
Without --model the tests' tiny random checkpoints are used: the figures then measure vidmem, Ray, PostgreSQL and
Milvus overhead, not a vision tower; the JSON names the model and the runtime of every figure.
"""
from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
import threading
import time
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(REPO / "bench"))
from common import TESTDATA, TESTS, emit, logger, machine_info, tiny_checkpoints  # noqa: E402

log = logger("scale")
CAMERAS = (100, 1000)
BTREE_ENTRY_BYTES = 24  # an 8-byte key b-tree entry: 8 key + 8 item header + 4 line pointer, aligned (PostgreSQL docs)


def folder_bytes(folder: Path) -> int:
    return sum(p.stat().st_size for p in folder.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--model", help="LLaVA-OneVision checkpoint directory (default: tiny random checkpoints)")
    parser.add_argument("--embedder", help="CLIP sentence-transformers directory (default: tiny)")
    parser.add_argument("--streams", type=int, default=4)
    parser.add_argument("--fps", type=float, default=2.0, help="sampled frames per second of video")
    parser.add_argument("--video", default="mmaction2/demo.mp4", help="test video under ../shared/testdata")
    parser.add_argument("--workers", default="1,2,4")
    parser.add_argument("--token-width", type=int, default=896, help="answering model's hidden size for sizing")
    parser.add_argument("--embed-width", type=int, default=512, help="retrieval embedding width for sizing (CLIP)")
    args = parser.parse_args()

    sys.path.insert(0, str(TESTS))
    import psycopg
    import ray
    from cluster_support import start_milvus, start_postgres

    from vidmem.agents import cluster
    from vidmem.agents.app import Settings
    from vidmem.memory import Memory
    from vidmem.stream import IngestOptions

    work = Path(tempfile.mkdtemp(prefix="vidmem-scale-"))
    if args.model:
        model, embedder, model_name = args.model, args.embedder, args.model
    else:
        tiny = tiny_checkpoints(work / "models")
        model, embedder, model_name = str(tiny["llava"]), str(tiny["clip"]), "tiny random checkpoints (tests/checkpoints.py)"
    video = str(TESTDATA / args.video)
    workers = [int(w) for w in args.workers.split(",")]
    pg, milvus = start_postgres(), start_milvus()
    runs, per_segment = {}, {}
    try:
        ray.init(num_cpus=max(workers) + args.streams + 2, include_dashboard=False, namespace=cluster.NAMESPACE,
                 log_to_driver=False)
        for n in workers:
            url = f"{pg.create_database(f'scale_{n}')}?index={milvus.url}&tokens={work / f'tokens{n}'}"
            Memory.open(url).close()
            settings = Settings(memory=url, model=model, embedder=embedder, device="cpu")
            options = cluster.ClusterOptions(encoders=n, cpus_per_encoder=1.0, cpus_per_source=0.5)
            encoders = cluster.encoder_pool(settings, options)
            ray.get([e.manifest.remote() for e in encoders])  # models loaded before the clock starts
            answerers = cluster.Answerers(settings, options)
            answerers.wait_ready()  # the replica's model loaded before the clock starts too
            sources = {f"cam{i}": video for i in range(args.streams)}
            actors = cluster.start_sources(settings, sources, ingest_options=IngestOptions(fps=args.fps),
                                           options=options, encoders=encoders)
            ray.get([a.where.remote() for a in actors.values()])  # actors up (their processes imported vidmem)
            latencies: list[float] = []
            done = threading.Event()

            def ask_while_ingesting() -> None:
                while not done.is_set():
                    started = time.perf_counter()
                    try:
                        answerers.ask("what is happening?")
                        latencies.append(time.perf_counter() - started)
                    except Exception as exc:  # noqa: BLE001 - nothing stored yet: try again
                        log(f"question before any segment: {exc}")
                    done.wait(0.25)

            asker = threading.Thread(target=ask_while_ingesting)
            started = time.perf_counter()
            runs_ref = [a.run.remote() for a in actors.values()]
            asker.start()
            reports = ray.get(runs_ref)
            wall = time.perf_counter() - started
            done.set()
            asker.join()
            segments = sum(r["segments"] for r in reports)
            frames = sum(r["frames"] for r in reports)
            runs[n] = {"segments": segments, "seconds": round(wall, 2), "segments_per_second": round(segments / wall, 2),
                       "question_latency_s": {"median": round(statistics.median(latencies), 3) if latencies else None,
                                              "max": round(max(latencies), 3) if latencies else None,
                                              "questions": len(latencies)},
                       "encoder_batches": [ray.get(e.stats.remote()) for e in encoders]}
            log(f"{n} workers: {runs[n]}")
            if n == workers[0]:
                with Memory.open(url, readonly=True) as memory:
                    rows = memory.segments()
                    stats = memory.stats()
                    jpeg = statistics.mean(len(memory.keyframe_jpeg(r) or b"") for r in rows)
                    manifest = memory.manifest
                with psycopg.connect(url.split("?")[0]) as conn:
                    # Tuple bytes per segment (its row, vector and change-log rows) plus a b-tree entry per index:
                    # a small database's page overhead (8 KiB pages) would swamp a per-segment figure.
                    pg_bytes = sum(conn.execute(f"SELECT COALESCE(SUM(pg_column_size(t.*)), 0) FROM {table} t")
                                   .fetchone()[0] for table in ("segments", "vectors", "changes"))
                    indexes = conn.execute("SELECT COUNT(*) FROM pg_indexes WHERE tablename IN "
                                           "('segments', 'vectors', 'changes')").fetchone()[0]
                    pg_bytes += indexes * len(rows) * BTREE_ENTRY_BYTES
                per_segment = {"tokens": round(statistics.mean(r.tokens for r in rows), 1),
                               "keyframe_jpeg_bytes": round(jpeg),
                               "token_file_bytes_measured": round(stats["bytes"] / len(rows)),
                               "token_width_measured": manifest.dim, "embed_dim": manifest.embed_dim,
                               "postgresql_bytes": round(pg_bytes / len(rows)),
                               "segments_per_sampled_frame": round(len(rows) / frames, 3)}
            for actor in actors.values():
                ray.kill(actor)
            for handle in encoders + answerers.replicas:
                ray.kill(handle)
        milvus_bytes = folder_bytes(milvus.folder / "data")
        vectors = sum(r["segments"] for r in runs.values())
        per_segment["milvus_bytes"] = round(milvus_bytes / max(vectors, 1))
    finally:
        if ray.is_initialized():
            ray.shutdown()
        milvus.stop()
        pg.stop()

    # Sizing: 1 sampled frame per second per camera, segments per frame as measured here. Token bytes and Milvus
    # bytes are projected from the measured counts to the real widths (fp16 tokens at --token-width, float32
    # vectors at --embed-width); the measured overhead per Milvus vector is kept.
    seg_per_cam_s = per_segment["segments_per_sampled_frame"] * 1.0
    token_bytes = per_segment["tokens"] * args.token_width * 2 + per_segment["keyframe_jpeg_bytes"]
    milvus_vector = per_segment["milvus_bytes"] + 4 * (args.embed_width - per_segment["embed_dim"])
    per_segment["projected"] = {"token_file_bytes": round(token_bytes), "milvus_bytes": milvus_vector,
                                "postgresql_bytes": per_segment["postgresql_bytes"] + 4 * (args.embed_width -
                                                                                           per_segment["embed_dim"])}
    rate_one = runs[workers[0]]["segments_per_second"] / workers[0]
    sizing = []
    for cams in CAMERAS:
        per_day = cams * seg_per_cam_s * 86_400
        sizing.append({"cameras": cams, "segments_per_second": round(cams * seg_per_cam_s, 1),
                       "encoder_workers": int(-(-cams * seg_per_cam_s // rate_one)),
                       "token_disk_gb_per_day": round(per_day * token_bytes / 1e9, 1),
                       "milvus_gb_per_day": round(per_day * milvus_vector / 1e9, 2),
                       "postgresql_gb_per_day": round(per_day * per_segment["projected"]["postgresql_bytes"] / 1e9, 2),
                       "index_vectors_per_day": int(per_day)})
    emit({"bench": "scale", "model": model_name, "runtime": "Ray local instance, CPU encoders (torch), PostgreSQL "
          "15 + Milvus Lite on loopback", "video": args.video, "streams": args.streams, "fps": args.fps,
          "runs": runs, "per_segment": per_segment, "token_width_for_sizing": args.token_width, "embed_width_for_sizing": args.embed_width,
          "sizing": sizing,
          "machine": machine_info()})


if __name__ == "__main__":
    main()
