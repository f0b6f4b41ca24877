"""The cluster scenario, run by tests/test_cluster.py inside a network namespace that has only loopback.

Starts PostgreSQL, Milvus Lite and a two-node Ray cluster (ray.cluster_utils), ingests 4 streams as source
actors, removes the worker node once a stream on it has committed segments, waits for every stream to finish,
asks from separate processes (plain `vidmem ask --memory URL`, and `vidmem ask --ray` twice in one conversation),
runs `vidmem monitor --ray` with a file and a camera as source actors against a real Mosquitto and stops it with
SIGTERM, streams answers from a replica token by token (in the front-ends' app and in `vidmem ask --ray` on a
terminal), captions a stream on the cluster (`vidmem ingest --ray --captions`) and asks about it, and prints one
JSON object of what it saw. The test makes the assertions.

    python3 tests/cluster_scenario.py VIDEO LLAVA_DIR CLIP_DIR MINILM_DIR WORK_DIR
"""
from __future__ import annotations

import asyncio
import json
import os
import pty
import signal
import subprocess
import sys
import threading
import time
import zlib
from dataclasses import replace
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

STREAMS = ("cam1", "cam2", "cam3", "cam4")
FPS = 2.0
REPLAY_SPEED = 1.0  # frames arrive as from cameras: every stream is still running when the node goes


STARTED: list[subprocess.Popen] = []  # stopped on the way out if still running


def start_vidmem(*args: str, env: dict) -> subprocess.Popen:
    """`vidmem ARGS --json` in a separate process, started now; `finish` waits for its JSON."""
    STARTED.append(subprocess.Popen([sys.executable, "-m", "vidmem", *args, "--json"], stdout=subprocess.PIPE,
                                    stderr=subprocess.PIPE, text=True, env=env))
    return STARTED[-1]


def finish(process: subprocess.Popen) -> dict:
    try:
        out, err = process.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        process.kill()
        raise SystemExit(f"{' '.join(process.args[2:5])} did not finish within 300 s") from None
    if process.returncode != 0:
        raise SystemExit(f"vidmem {process.args[3]} failed: {err[-3000:]}")
    return json.loads(out.strip().splitlines()[-1])


def vidmem(*args: str, env: dict) -> dict:
    return finish(start_vidmem(*args, env=env))


def fingerprint(memory, row) -> int:
    return zlib.crc32(memory.read_tokens(row).tobytes())


# ---- `vidmem monitor --ray`: its sources as actors on the cluster ---------------------------------------------
CAMERA_SECONDS = 120.0  # the camera streams longer than the monitor runs: SIGTERM lands mid-stream


def paced_camera(folder: Path):
    """An HTTP camera on loopback streaming CAMERA_SECONDS of busy video in real time, down until `up()`."""
    from camera import HttpCamera
    from services import free_port

    from vidmem.stream.synth import busy_scene, write_video

    feed = folder / "camera.ts"
    write_video(feed, busy_scene(int(CAMERA_SECONDS * 5), fps=5, width=160, height=96), fps=5)
    return HttpCamera(feed.read_bytes(), seconds=CAMERA_SECONDS, loop=False, port=free_port())


class Background(threading.Thread):
    """`call(*args)` in a thread, started now; `result` waits for what it returned (or raises what it raised)."""

    def __init__(self, call, *args) -> None:
        super().__init__(daemon=True)
        self.call, self.args, self.value, self.error = call, args, None, None
        self.start()

    def run(self) -> None:
        try:
            self.value = self.call(*self.args)
        except BaseException as exc:  # noqa: BLE001 - handed to whoever waits for the result
            self.error = exc

    def result(self, timeout: float):
        self.join(timeout)
        if self.is_alive():
            raise SystemExit(f"{getattr(self.call, '__name__', 'a step')} did not finish within {timeout:.0f} s")
        if self.error is not None:
            raise self.error
        return self.value


def monitor_on_cluster(address: str, url: str, video: str, work: Path, env: dict) -> dict:
    """`vidmem monitor --ray` with a file and a camera that is down at first, both as source actors; a watch rule on
    each; everything it publishes collected over MQTT from a real Mosquitto; SIGTERM once the camera's stream has
    committed segments; then what the memory holds."""
    from test_mqtt_monitor import Broker, Watcher

    from vidmem.memory import Memory

    broker, camera = Broker(work / "broker"), paced_camera(work)
    rules = work / "rules.yaml"
    rules.write_text("rules:\n" + "".join(f"  - stream: {s}\n    id: anything\n    condition: a person walking\n"
                                          "    threshold: -1\n    cooldown: 0\n" for s in ("porch", "door")))
    # --device cpu: the models of the scenario's encoder and answer actors, so the monitor shares them
    command = [sys.executable, "-m", "vidmem", "monitor", "--mqtt", broker.url(), "--rules", str(rules),
               "--source", f"porch={video}", "--source", f"door={camera.url}", "--fps", str(FPS),
               "--source-backoff-max", "1", "--memory", url, "--device", "cpu", "--ray", address]
    out: dict = {"timeline": {}}
    started = time.monotonic()

    def mark(what: str) -> None:
        out["timeline"][what] = round(time.monotonic() - started, 1)

    async def watch() -> None:
        async with Watcher(broker.port) as w:
            log = (work / "monitor.log").open("w")
            process = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=log, env=env)
            STARTED.append(process)  # killed by main() on the way out if it fails first
            try:
                # the camera is down: its actor keeps knocking (the monitor's backoff reached it), then it boots
                await w.wait(lambda: any(m["state"] == "reconnecting" and m["attempts"] >= 2
                                         for m in w.on("vidmem/door/state")), "the camera's actor knocking", 180)
                mark("knocking")
                camera.up()
                await w.wait(lambda: len(w.events(stream="door", rule="anything")) >= 2, "two scored door segments",
                             120)
                mark("door scored")
                await w.wait(lambda: any(m["type"] == "end" for m in w.events(stream="porch")), "porch's end", 120)
                mark("porch ended")
                process.send_signal(signal.SIGTERM)
                try:
                    process.wait(timeout=60)
                except subprocess.TimeoutExpired:
                    out["timed_out"] = True
                    process.kill()
                mark("exited")
                await w.wait(lambda: w.on("vidmem/available")[-1:] == ["offline"], "offline", 10)
                await asyncio.sleep(0.5)  # the last retained messages reach the watcher
            finally:
                if process.poll() is None:
                    process.kill()
                process.wait()
                log.close()
                out["rc"], out["stderr"] = process.returncode, (work / "monitor.log").read_text()[-3000:]
            out["states"] = {s: w.on(f"vidmem/{s}/state") for s in ("porch", "door")}
            out["events"] = {s: [[m["type"], m["event"]["end_time"]] for m in w.events(stream=s, rule="anything")]
                             for s in ("porch", "door")}
            out["available"] = w.on("vidmem/available")

    broker.start()
    try:
        asyncio.run(watch())
    finally:
        camera.down()
        broker.stop()
    with Memory.open(url, readonly=True) as memory:
        out["rows"] = {s: [[r.start, r.end] for r in memory.segments(stream=s)] for s in ("porch", "door")}
        out["verify"] = memory.verify()
    mark("done")
    return out


LOOPBACK = "127.0.0.1"  # the namespace's only address; named, so no node resolves the host name


def start_head(attempts: int = 3):
    """The Ray head node on loopback. A head whose GCS has not published its port in time (a loaded or paused
    machine: the CI host once went 30 s without starting it) is stopped and started again, up to ATTEMPTS."""
    from ray.cluster_utils import Cluster

    os.environ.setdefault("RAY_gcs_server_port_wait_time_s", "120")
    for attempt in range(1, attempts + 1):
        try:
            return Cluster(initialize_head=True, head_node_args={
                "num_cpus": 4, "include_dashboard": False, "node_ip_address": LOOPBACK})
        except RuntimeError as error:
            if "Timed out" not in str(error) or attempt == attempts:
                raise
            print(f"cluster_scenario: the Ray head did not start ({error}); attempt {attempt + 1}", file=sys.stderr)
            subprocess.run(["pkill", "-9", "-P", str(os.getpid()), "gcs_server"], check=False)  # this try's, if stuck


def start_monitor_step(head, finished_actors: dict, url: str, video: str, work: Path, env: dict) -> Background:
    """`vidmem monitor --ray` beside the front-end's steps; its result: {"monitor": ..., "head_node": ...}.

    The 4 streams' finished actors go first: the monitor's source actors need their CPU share on the head."""
    import ray

    for actor in finished_actors.values():
        ray.kill(actor)
    return Background(lambda: {"monitor": monitor_on_cluster(head.address, url, video, work, env),
                               "head_node": head.head_node.node_id})


# ---- answers streamed from a replica, captions written by the replicas -------------------------------------------
class OnATerminal:
    """`vidmem ARGS` with its stdout on a pseudo-terminal (as a person runs it), stderr piped; `finish` for both."""

    def __init__(self, *args: str, env: dict) -> None:
        master, slave = pty.openpty()
        self.process = subprocess.Popen([sys.executable, "-m", "vidmem", *args], stdout=slave, stderr=subprocess.PIPE,
                                        text=True, env=env)
        STARTED.append(self.process)
        os.close(slave)
        self.chunks: list[bytes] = []
        self.reader = threading.Thread(target=self._read, args=(master,), daemon=True)
        self.reader.start()

    def _read(self, master: int) -> None:
        try:
            while chunk := os.read(master, 65536):
                self.chunks.append(chunk)
        except OSError:  # EIO: the process closed the terminal
            pass
        finally:
            os.close(master)

    def finish(self) -> dict:
        err = self.process.communicate(timeout=300)[1]
        self.reader.join(timeout=10)
        return {"rc": self.process.returncode, "stdout": b"".join(self.chunks).decode().replace("\r\n", "\n"),
                "stderr": err}


STREAMED_QUESTION = "what do you see on the front camera?"


def stream_from_a_replica(app, url: str, same_models: tuple[str, ...], env: dict) -> dict:
    """Answers streamed from a replica: the front-ends' app (`serve --ray`), and `vidmem ask --ray` on a terminal."""
    from vidmem.errors import VidmemError

    common = ("--memory", url, *same_models)
    terminal = OnATerminal("ask", STREAMED_QUESTION, "--stream", "front", *common, env=env)
    unknown = OnATerminal("ask", "what is there?", "--stream", "nowhere", *common, env=env)
    out: dict = {}
    # An answer cut short by its listener (a server stopping): the error reaches the caller, the replica carries on.
    cut: list[str] = []

    def stop_after_one(text: str) -> None:
        cut.append(text)
        raise VidmemError("the listener went away")

    try:
        app.ask(STREAMED_QUESTION, streams=["front"], on_token=stop_after_one)
    except VidmemError as exc:
        out["cut_short"] = {"pieces": len(cut), "error": str(exc)}
    try:
        app.ask("what is there?", streams=["nowhere"], on_token=cut.append)
    except VidmemError as exc:  # raised on the replica, inside the stream
        out["unknown_stream"] = {"type": type(exc).__name__, "error": str(exc)}
    pieces: list[str] = []
    answer = app.ask(STREAMED_QUESTION, streams=["front"], on_token=pieces.append)
    out["app"] = {"pieces": pieces, "answer": answer.text, "segments": len(answer.picks)}
    # A front-end's conversation (a websocket or MQTT client's): kept on the replica, the follow-up reuses it.
    out["conversation"] = [app.ask_conversation("porch-chat", question, streams=["front"], live=True).to_json()
                           for question in ("who is at the door?", "and now?")]
    out["terminal"] = terminal.finish()
    out["terminal_unknown_stream"] = unknown.finish()
    return out


def start_captioned_ingest(video: str, url: str, same_models: tuple[str, ...], env: dict) -> subprocess.Popen:
    """`vidmem ingest --ray --captions` of a short part of the video (its 4 most informative frames)."""
    return start_vidmem("ingest", video, "--stream", "described", "--fps", str(FPS), "--frame-budget", "4",
                        "--captions", "--memory", url, *same_models, env=env)


def captions_on_the_cluster(ingest: subprocess.Popen, settings, address: str) -> dict:
    """Once `ingest --captions` returns: the captions in the shared memory, found by caption search, and a question
    asked on the cluster whose selection fuses caption search with keyframe search."""
    import ray

    from vidmem.agents import cluster
    from vidmem.agents.models import load_caption_embedder
    from vidmem.memory import Memory

    out: dict = {"report": finish(ingest)}
    with Memory.open(settings.memory, readonly=True) as memory:
        rows = memory.segments(stream="described")
        out["captions"] = [row.caption for row in rows]
        embedder = load_caption_embedder(settings.caption_embedder, device="cpu")
        out["caption_search"] = [  # the best caption match of each caption's text is it (or one worded alike)
            bool(row.caption) and [hit.caption for hit, _ in memory.search(
                embedder.embed_texts([row.caption])[0], k=1, streams=["described"], kinds=["caption"])] == [row.caption]
            for row in rows]
    # Asked with the models the ingest named (the caption embedder among them): the replica that wrote the captions.
    cluster.connect(address)
    try:
        out["ask"] = cluster.Answerers(settings).ask(rows[-1].caption or "what happens?", streams=["described"])
    finally:
        ray.shutdown()
    return out


def main() -> None:
    video, llava, clip, minilm, work = sys.argv[1:6]
    work_dir = Path(work)
    from cluster_support import start_milvus, start_postgres

    import ray

    from vidmem.agents import cluster
    from vidmem.agents.app import Settings
    from vidmem.agents.select import Level, Pick
    from vidmem.memory import Memory
    from vidmem.stream import IngestOptions, open_source

    env = {**os.environ, "HF_HUB_OFFLINE": "1", "VIDMEM_MODEL": llava, "VIDMEM_EMBEDDER": clip}
    out: dict = {}
    # The reference: the same video ingested by one process into an embedded memory (while the services start).
    reference = start_vidmem("ingest", video, "--memory", str(work_dir / "reference"), "--fps", str(FPS), "--stream",
                             "ref", env=env)
    pg, milvus = start_postgres(), start_milvus()
    head = None
    try:
        url = f"{pg.create_database('scenario')}?index={milvus.url}&tokens={work_dir / 'tokens'}"
        out["url"] = url
        Memory.open(url).close()  # create the tables, so readers can open it before the first segment
        reference = finish(reference)
        with Memory.open(work_dir / "reference", readonly=True) as ref:
            out["reference"] = [[r.start, r.end] for r in ref.segments(stream="ref")]
        out["reference_segments"] = reference["segments"]

        head = start_head()
        worker = head.add_node(num_cpus=4, node_ip_address=LOOPBACK)
        ray.init(address=head.address, namespace=cluster.NAMESPACE, log_to_driver=False)
        head.wait_for_nodes()
        out["address"] = head.address
        settings = Settings(memory=url, model=llava, embedder=clip, device="cpu")
        same_models = ("--device", "cpu")  # what `vidmem ask --ray` adds to reach these settings' answer replica
        options = cluster.ClusterOptions(replay_speed=REPLAY_SPEED)  # 4 sources + the encoder fit the head alone
        actors = cluster.start_sources(settings, {s: video for s in STREAMS}, ingest_options=IngestOptions(fps=FPS),
                                       options=options)
        placed = dict(zip(actors, ray.get([a.where.remote() for a in actors.values()])))  # before run: in order
        runs = {stream: actor.run.remote() for stream, actor in actors.items()}
        out["placed_on_worker"] = sorted(s for s, node in placed.items() if node == worker.node_id)
        if not out["placed_on_worker"]:
            raise SystemExit(f"SPREAD put no source on the worker node: {placed}")

        # Kill the worker node once a stream on it has committed segments (mid-ingest: frames arrive in real time).
        with Memory.open(url, readonly=True) as memory:
            deadline = time.monotonic() + 240
            victim = out["placed_on_worker"][0]
            while time.monotonic() < deadline:
                if memory.has_stream(victim) and len(memory.segments(stream=victim)) >= 2:
                    break
                done, _ = ray.wait(list(runs.values()), timeout=0.2)
                if done:
                    ray.get(done)  # a failed run raises here, with its error
                    raise SystemExit("a stream finished before the worker node was killed")
            else:
                raise SystemExit("no segment was committed on the worker node within 240 s")
            before = {r.id: [r.stream, r.start, r.end, fingerprint(memory, r)] for r in memory.segments()}
            head.remove_node(worker, allow_graceful=False)
            out["killed_at"] = {s: len([r for r in before.values() if r[0] == s]) for s in STREAMS}
        out["before"] = before
        reports = {stream: ray.get(ref, timeout=300) for stream, ref in runs.items()}
        out["reports"] = reports
        with Memory.open(url, readonly=True) as memory:
            out["after"] = {r.id: [r.stream, r.start, r.end, fingerprint(memory, r)] for r in memory.segments()}
            out["verify"] = memory.verify()
        monitor = start_monitor_step(head, actors, url, video, work_dir, env)

        # What `vidmem serve --ray` holds: sources local, encoding and answers remote (`monitor --ray` too, for rules).
        app = cluster.open_app(settings, address=head.address)
        app.load_models()
        report = asyncio.run(app.ingest(open_source(video), stream="front", options=IngestOptions(fps=FPS)))
        live = [app.ask("what is happening now?", streams=["front"], live=True) for _ in range(2)]
        with Memory.open(url, readonly=True) as memory:
            rows = memory.segments(stream="front")
            # a watch rule's VLM verification, as `monitor --ray` asks it: on a replica, never in the front-end
            picks = [Pick(r, Level.FULL, 0.0, "verify") for r in rows[:2]]
            verified = app.yes_probability('Is "a person" true? Answer yes or no.', picks)
            out["front"] = {"app": type(app).__name__, "segments": report.segments,
                            "spans": [[r.start, r.end] for r in rows],
                            "answers": [{"answer": a.text, "streams": sorted({p.row.stream for p in a.picks}),
                                         "follow_up": a.follow_up} for a in live],
                            "verified": verified, "front_end_loaded_the_vlm": app._vlm is not None}
        started = time.monotonic()
        out["streaming"] = stream_from_a_replica(app, url, same_models, {**env, cluster.ENV: head.address})
        out["seconds"] = {"streaming": round(time.monotonic() - started, 1)}
        app.close()
        ray.shutdown()
        out.update(monitor.result(timeout=480))  # before the asks: it adds streams to the memory they read

        # Questions from other processes: the shared memory read directly (alongside the next two), then answer
        # replicas on the cluster, twice in one conversation. A stream is captioned on the cluster meanwhile: from
        # here on every question names the caption embedder (on the cluster: the replica that holds it).
        captioned = (*same_models, "--caption-embedder", minilm)
        plain = start_vidmem("ask", "what happens on cam1?", "--memory", url, "--stream", "cam1", "--caption-embedder",
                             minilm, env=env)
        ray_env = {**env, cluster.ENV: head.address}
        described = start_captioned_ingest(video, url, captioned, ray_env)
        out["ray_ask"] = [vidmem("ask", question, "--memory", url, "--conversation", "kitchen-chat", *captioned,
                                 env=ray_env)
                          for question in ("what is happening?", "and then?")]
        out["ask"] = finish(plain)
        started = time.monotonic()
        out["described"] = captions_on_the_cluster(described, replace(settings, caption_embedder=minilm), head.address)
        out["seconds"]["captions_after_the_asks"] = round(time.monotonic() - started, 1)
    finally:
        for process in STARTED:
            if process.poll() is None:
                process.kill()
                process.wait()
        if ray.is_initialized():
            ray.shutdown()
        if head is not None:
            head.shutdown()
        milvus.stop()
        pg.stop()
    print(json.dumps(out))


if __name__ == "__main__":
    main()
