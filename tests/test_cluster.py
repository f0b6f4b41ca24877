"""vidmem on a real two-node Ray cluster with a shared memory in real PostgreSQL and Milvus.

Ray advertises the machine's address instead of 127.0.0.1, so the scenario (tests/cluster_scenario.py) runs in a
network namespace with only loopback (`unshare -n`), where every node, PostgreSQL and Milvus bind 127.0.0.1.

The scenario's language model is the tiny checkpoint with its own output head: with tied embeddings a tiny random
model repeats its prompt's last token (a newline) and every answer and caption is empty, so streaming and captions
could not be seen.
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from collections import defaultdict
from pathlib import Path

import pytest

from services import ensure_debian_package

HERE = Path(__file__).resolve().parent
REPO = HERE.parent


@pytest.fixture(scope="module")
def scenario(tiny_models, videos, tmp_path_factory) -> dict:
    unshare = shutil.which("unshare") or ensure_debian_package("unshare", "util-linux")
    ip = shutil.which("ip") or ensure_debian_package("ip", "iproute2")
    from checkpoints import build_tiny_llava

    work = tmp_path_factory.mktemp("cluster")
    llava = build_tiny_llava(work / "llava", tie_word_embeddings=False)  # answers in words (see above)
    env = {**os.environ, "HF_HUB_OFFLINE": "1",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO.parent)]))}
    command = (f"{ip} link set lo up && exec {sys.executable} {HERE / 'cluster_scenario.py'} "
               f"{videos['demo.mp4']['file']} {llava} {tiny_models.clip} {tiny_models.minilm} {work}")
    result = subprocess.run([unshare, "-n", "bash", "-c", command], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-6000:]
    return json.loads(result.stdout.strip().splitlines()[-1])


def _by_stream(rows: dict) -> dict[str, list]:
    out = defaultdict(list)
    for seg_id, (stream, start, end, crc) in rows.items():
        out[stream].append((start, end))
    return {stream: sorted(spans) for stream, spans in out.items()}


def test_four_streams_survive_losing_a_worker_node_mid_ingest(scenario) -> None:
    streams = ("cam1", "cam2", "cam3", "cam4")
    killed = scenario["placed_on_worker"]
    assert killed, "some source ran on the worker node"
    # Mid-ingest: the killed node's streams had committed some, not all, of their segments.
    assert all(0 < scenario["killed_at"][s] < len(scenario["reference"]) for s in killed)
    # Nothing committed before the kill was lost or changed: same ids, times and token bytes.
    before, after = scenario["before"], scenario["after"]
    assert {k: after.get(k) for k in before} == before
    # Each stream ends exactly as a single-process ingest of the same video: no gap, nothing stored twice.
    reference = [tuple(span) for span in scenario["reference"]]
    assert _by_stream(after) == {s: reference for s in streams}
    for stream in killed:  # restarted on the surviving node, resuming after its last committed segment
        report = scenario["reports"][stream]
        assert report["restarted"] and report["resumed_after"] is not None and report["skipped"] > 0
    assert all(not scenario["reports"][s]["restarted"] for s in streams if s not in killed)
    assert scenario["verify"] == {"segments": 4 * len(reference), "bad": [], "missing_from_index": [],
                                  "extra_in_index": []}


def test_questions_from_other_processes_reach_the_shared_memory_and_keep_their_replica(scenario) -> None:
    answer = scenario["ask"]  # plain `vidmem ask --memory URL` in a fresh process
    # (tiny random checkpoints may answer with an empty string: what they cite is what is checked)
    assert isinstance(answer["answer"], str) and answer["segments"]
    assert all(s["stream"] == "cam1" for s in answer["segments"])
    first, follow_up = scenario["ray_ask"]  # `vidmem ask --ray` twice in one conversation
    assert isinstance(first["answer"], str) and first["visual_tokens"] > 0
    assert {s["stream"] for s in first["segments"]} <= {"cam1", "cam2", "cam3", "cam4", "front", "porch", "door",
                                                        "described"}
    assert follow_up["replica"] == first["replica"] and follow_up["follow_up"]
    assert follow_up["cached_tokens"] > 0 and follow_up["prefill_tokens"] < first["prefill_tokens"]


def test_the_front_ends_app_encodes_and_answers_on_the_cluster(scenario) -> None:
    front = scenario["front"]  # the app `serve --ray` and `monitor --ray` hold
    assert front["app"] == "ClusterVidmem"
    assert front["spans"] == scenario["reference"] and front["segments"] == len(scenario["reference"])
    for answer in front["answers"]:
        assert isinstance(answer["answer"], str) and answer["streams"] == ["front"]
    # A watch rule's verification ran on a replica: a probability, and the front-end never loaded the VLM.
    assert 0.0 <= front["verified"] <= 1.0 and not front["front_end_loaded_the_vlm"]


def test_the_monitors_sources_run_as_actors_and_stop_cleanly_on_sigterm(scenario) -> None:
    monitor = scenario["monitor"]  # `vidmem monitor --ray` with porch=demo.mp4 and door=an HTTP camera, down at first
    assert monitor["rc"] == 0 and not monitor.get("timed_out"), monitor["stderr"]
    assert "Traceback" not in monitor["stderr"]
    # Every source state came from an actor on the cluster's surviving node, published retained over MQTT.
    for stream in ("porch", "door"):
        assert {state["node"] for state in monitor["states"][stream]} == {scenario["head_node"]}
    assert [s["state"] for s in monitor["states"]["porch"]] == ["connecting", "live", "ended"]
    door = monitor["states"]["door"]
    # The camera's actor knocked with the monitor's endless backoff until the camera came up, then went live; on
    # SIGTERM it stopped reading and ended cleanly (an actor killed instead would never say "ended").
    assert door[0]["state"] == "connecting" and door[1]["state"] == "reconnecting"
    assert "refused" in door[1]["error"].lower()
    assert [s["state"] for s in door[-2:]] == ["live", "ended"] and door[-1]["error"] is None

    def scored(rows: list) -> list:  # threshold -1: each committed segment extends the rule's one event
        return [["new", rows[0][1]]] + [["update", end] for _, end in rows[1:]] + [["end", rows[-1][1]]]

    # The file is stored as a single-process ingest stores it, and the rule scored every segment of it.
    assert monitor["rows"]["porch"] == scenario["reference"]
    assert monitor["events"]["porch"] == scored(monitor["rows"]["porch"])
    # The camera was stopped mid-stream: what it committed, the segment in flight at SIGTERM included, was
    # scored before the monitor exited, and nothing else was stored.
    assert len(monitor["rows"]["door"]) >= 2
    assert monitor["events"]["door"] == scored(monitor["rows"]["door"])
    assert monitor["available"] == ["online", "offline"]
    verify = monitor["verify"]
    assert verify["bad"] == [] and verify["missing_from_index"] == [] and verify["extra_in_index"] == []


def test_answers_stream_from_a_replica_token_by_token(scenario) -> None:
    streaming = scenario["streaming"]
    app = streaming["app"]  # the websocket server's app (`serve --ray`) asking with on_token
    assert len(app["pieces"]) > 1, "the answer arrives in pieces, as the replica's model produces them"
    assert "".join(app["pieces"]).strip() == app["answer"] and app["answer"] and app["segments"] > 0
    # `vidmem ask --ray` on a terminal prints what `vidmem ask` prints on one machine: the streamed answer, then
    # what it was drawn from.
    terminal = streaming["terminal"]
    assert terminal["rc"] == 0, terminal["stderr"][-2000:]
    text, cited = terminal["stdout"].rstrip("\n").rsplit("\n", 1)
    assert text == app["answer"]
    assert cited.startswith("(from ") and " visual tokens: front " in cited
    first, follow_up = streaming["conversation"]  # the front-ends' conversations: kept on the replica
    assert follow_up["cached_tokens"] > 0 and follow_up["prefill_tokens"] < first["prefill_tokens"]
    # A listener that stops listening ends the answer with its own error; the replica answers the next question.
    assert streaming["cut_short"] == {"pieces": 1, "error": "the listener went away"}
    # An error raised on the replica, inside the stream, reaches the caller as itself and the CLI as one line.
    assert streaming["unknown_stream"]["type"] == "UnknownStreamError"
    assert streaming["unknown_stream"]["error"].startswith("unknown stream 'nowhere'")
    unknown = streaming["terminal_unknown_stream"]
    assert unknown["rc"] != 0 and unknown["stdout"] == "" and "Traceback" not in unknown["stderr"]
    assert unknown["stderr"].splitlines()[-1].startswith("vidmem: error: unknown stream 'nowhere'")


def test_segments_ingested_on_the_cluster_get_captions_that_questions_search(scenario) -> None:
    described = scenario["described"]  # `vidmem ingest --ray --captions`, then questions about that stream
    segments = described["report"]["segments"]
    assert segments > 0 and len(described["captions"]) == segments
    # Captions are written by the answer replicas (where the language model lives) into the shared memory, and
    # every one is there once ingest returns, indexed for caption search.
    assert all(described["captions"]), "every segment committed on the cluster is described"
    assert all(described["caption_search"]), "each caption finds its segment through the caption index"
    answer = described["ask"]  # asked with the last segment's caption, on the cluster
    assert answer["segments"] and {s["stream"] for s in answer["segments"]} == {"described"}
    # Keyframe and caption rankings are fused (reciprocal ranks, k=60): a segment found by both scores above
    # 1/61, the most a segment found by one ranking can score.
    retrieved = [s for s in answer["segments"] if s["score"] > 0]
    assert retrieved and all(1 / 61 < s["score"] <= 2 / 61 + 1e-4 for s in retrieved)


def test_ray_without_a_shared_memory_is_refused_in_one_line(tmp_path, videos) -> None:
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO.parent)]))}
    result = subprocess.run([sys.executable, "-m", "vidmem", "ingest", str(videos["demo.mp4"]["file"]), "--ray",
                             "127.0.0.1:6379", "--memory", str(tmp_path / "memory")], capture_output=True, text=True,
                            env=env, timeout=300)
    assert result.returncode == 2 and result.stdout == ""
    assert result.stderr.startswith("vidmem: error: --ray needs a shared memory") and result.stderr.count("\n") == 1
    assert not (tmp_path / "memory").exists()
