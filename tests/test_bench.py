"""`python bench/report.py --quick` runs the benches, and what it writes says what the README's table says.

One report run (the quick modes of ingest, compressors, memory and answer; the live bench's quick mode has its own
test in test_live_load.py) feeds every test here, each bench's figures included; `--redraw` then rebuilds the plots
and table from its JSON lines. No timed assertions: only token counts, accounting, detected cuts and structure.
"""
from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
BENCHES = ("ingest", "compressors", "memory", "answer")
PLOTS = ("tokens_per_question.png", "ingest_rtf.png", "search_latency.png", "ttft.png")
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _report(*args: str) -> dict:
    done = subprocess.run([sys.executable, str(REPO / "bench" / "report.py"), *args], cwd=REPO, capture_output=True,
                          text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-3000:]
    (line,) = done.stdout.strip().splitlines()  # one JSON line on stdout, progress on stderr
    return json.loads(line)


@pytest.fixture(scope="module")
def report(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict, dict[str, dict]]:
    out = tmp_path_factory.mktemp("report")
    summary = _report("--quick", "--only", ",".join(BENCHES), "--out", str(out))
    results = {}
    for line in (out / "results.jsonl").read_text().splitlines():
        entry = json.loads(line)
        results[entry["bench"]] = entry
    return out, summary, results


@pytest.mark.slow
def test_every_quick_bench_reports_one_line_of_figures(report) -> None:
    out, summary, results = report
    assert summary["failed"] == [], {n: results[n].get("error") for n in summary["failed"]}
    assert list(results) == list(BENCHES)
    machine = [json.loads(line) for line in (out / "results-machine.jsonl").read_text().splitlines()]
    assert [m["bench"] for m in machine] == list(BENCHES)
    assert all(m["machine"]["cores"] >= 1 and m["machine"]["torch"] and m["machine"]["date"] for m in machine)
    assert all(m["command"].startswith("python bench/report.py --quick") for m in machine)


@pytest.mark.slow
def test_answer_bench_keeps_every_question_within_the_budget_whatever_the_footage(report) -> None:
    _, _, results = report
    answer = results["answer"]
    assert answer["budget"] == 6000
    lengths = sorted(answer["footage"].values(), key=lambda f: f["video_seconds"])
    for footage in lengths:
        cold, follow_up = footage["vidmem"]["cold"], footage["vidmem"]["follow_up"]
        assert 0 < cold["visual_tokens"] <= answer["budget"]
        assert footage["native"]["visual_tokens"] == footage["frames_1fps"] * 196 + 1
        assert footage["native"]["prefill_tokens"] > cold["prefill_tokens"]
        # the follow-up reuses the kept KV cache of the evidence: only the question is prefilled
        assert follow_up["cached_tokens"] >= cold["prefill_tokens"] - 64
        assert follow_up["prefill_tokens"] < 64
        assert footage["native"]["ttft_estimate_seconds"] >= 0
    # footage 3x longer costs the native path 3x the tokens and vidmem no more than the budget
    assert lengths[-1]["native"]["visual_tokens"] > 2.5 * lengths[0]["native"]["visual_tokens"]
    assert answer["native_uniform"]["visual_tokens"] == 32 * 196 + 1


@pytest.mark.slow
def test_answer_bench_live_question_prefills_only_itself_when_the_window_is_warm(report) -> None:
    live = report[2]["answer"]["live"]
    assert live["cold"]["prefill_tokens"] > live["warm"]["prefill_tokens"]
    assert live["warm"]["cached_tokens"] > 0 and live["warm"]["prefill_tokens"] < 64
    assert live["warm_after_new_segment"]["cached_tokens"] > live["warm"]["cached_tokens"]
    decode = report[2]["answer"]["decode"]
    assert decode["old"]["ms_per_token"] > 0 and decode["new"]["ms_per_token"] > 0


@pytest.mark.slow
def test_ingest_bench_reports_decoding_the_cuts_and_the_static_scene_savings(report) -> None:
    ingest = report[2]["ingest"]
    videos = ingest["decode"]["videos"]
    assert set(videos) == {"bikes.mp4", "test.mp4", "testvideo.mp4"}
    assert all(v["decode_rtf"] > 0 and v["decode_sample_rtf"] > 0 for v in videos.values())
    assert videos["bikes.mp4"]["cuts"] == pytest.approx([1.2, 3.04, 5.48, 7.48, 9.68], abs=0.05)
    assert ingest["static_vs_busy"]["busy_over_static"] >= 10
    assert "skipped" in ingest["full"] and "--model" in ingest["full"]["skipped"]


@pytest.mark.slow
def test_memory_bench_reports_search_latency_recall_disk_and_ram(report) -> None:
    figures = report[2]["memory"]
    at_10k = figures["search"]["10000"]
    for name in ("none", "one_of_4_streams", "last_hour", "one_stream_last_day"):
        assert at_10k[name]["p50_ms"] > 0 and at_10k[name]["p99_ms"] >= at_10k[name]["p50_ms"]
        assert at_10k[name]["recall_at_10"] >= 0.9
    # 245 fp16 tokens x 1152 per 4 s segment is 141 KB/s before the keyframe JPEG and the SQLite rows.
    assert 141_000 < figures["disk"]["float16"]["bytes_per_second"] < 160_000
    assert figures["disk"]["int8"]["bytes_per_second"] < figures["disk"]["float16"]["bytes_per_second"] * 0.6
    assert len(figures["ram"]["rss_mb"]) == len(figures["ram"]["segments"]) > 5


@pytest.mark.slow
def test_report_draws_the_plots_and_the_table_with_the_papers_figures(report) -> None:
    out, summary, _ = report
    for name in PLOTS:
        assert (out / name).read_bytes()[:8] == PNG_MAGIC, name
    table = (out / "performance.md").read_text()
    assert "| quantity | vidmem (this run) | native / baseline | paper |" in table
    assert "Reproduce: `python bench/report.py --quick" in table
    for paper in ("Clapper: 61", "< 6,000 per video", "AVS/SVC: 64x", "STC: prefill -45.3%", "STC: ViT encoding -24.5%"):
        assert paper in table, paper
    assert "ESTIMATE" in table  # native times beyond the context are labelled as estimates
    assert "61.25" in table  # the default's tokens per frame, measured


@pytest.mark.slow
def test_redraw_rebuilds_plots_and_table_from_saved_results_without_running(report) -> None:
    out, _, _ = report
    for name in (*PLOTS, "performance.md"):
        (out / name).unlink()
    summary = _report("--redraw", "--out", str(out))
    assert summary["ran"] == []
    assert all((out / name).is_file() for name in (*PLOTS, "performance.md"))
