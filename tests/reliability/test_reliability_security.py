"""Security: nothing untrusted is unpickled, names and paths are checked everywhere, services refuse what they must.

Token checks on the websocket handshake, 401s and the 4 MiB close are in tests/test_live_server.py; MQTT
credentials in tests/test_mqtt_monitor.py. These add the cross-cutting rules.
"""
from __future__ import annotations

import asyncio
import io
import json
import re
import subprocess
import urllib.error
import urllib.request
from pathlib import Path

import pytest
from PIL import Image
from rel_support import WAIT, Broker, LoopThread

from vidmem.agents.cli import main as vidmem_main
from vidmem.errors import BrokerError, VidmemError

REPO = Path(__file__).resolve().parents[2]
PACKAGE_DIRS = ["stream", "memory", "compressors", "agents", "bench", "examples"]
TRAVERSALS = ["../../etc", "..", ".hidden", "a/b", "/etc/passwd", "cam\n", "c" * 65, "", "..\\..\\windows"]


def test_no_pickle_anywhere_in_the_code():
    """Weights are safetensors; no pickle, no torch.load without weights_only=True, no unsafe YAML or numpy loads."""
    files = [p for d in PACKAGE_DIRS for p in (REPO / d).rglob("*.py")] + list(REPO.glob("*.py"))
    assert len(files) > 20
    offences = []
    for path in files:
        text = path.read_text(encoding="utf-8")
        for pattern in (r"\bimport\s+(c?pickle|dill|joblib|marshal)\b", r"\bfrom\s+(c?pickle|dill|joblib)\b",
                        r"allow_pickle\s*=\s*True", r"yaml\.(unsafe_)?load\((?![^)]*SafeLoader)", r"yaml\.Loader\b"):
            offences += [f"{path.relative_to(REPO)}: {m.group(0)}" for m in re.finditer(pattern, text)]
        for m in re.finditer(r"torch\.load\(([^()]|\([^()]*\))*\)", text):
            if "weights_only=True" not in m.group(0):
                offences.append(f"{path.relative_to(REPO)}: {m.group(0)}")
    assert offences == []


def test_a_pickled_model_file_is_never_unpickled(tmp_path, tiny_models):
    """A checkpoint whose weights are a pickle (that would run code when loaded) is refused, and the code never runs."""
    import shutil

    evil = tmp_path / "evil-model"
    shutil.copytree(tiny_models.llava, evil)
    marker = tmp_path / "pwned"
    payload = f"""
import os
class Boom:
    def __reduce__(self):
        return (os.system, ("touch {marker}",))
"""
    namespace: dict = {}
    exec(compile(payload, "evil", "exec"), namespace)  # noqa: S102 - builds the hostile file
    import pickle  # noqa: S403 - only to write the hostile file this test feeds to vidmem

    for weights in evil.glob("*.safetensors"):
        weights.unlink()
    for name in ("pytorch_model.bin", "model.safetensors.index.json"):
        (evil / name).unlink(missing_ok=True)
    (evil / "pytorch_model.bin").write_bytes(pickle.dumps({"w": namespace["Boom"]()}))
    from vidmem.agents.models import load_vlm

    with pytest.raises(Exception):  # noqa: B017 - refused one way or another ...
        load_vlm(str(evil), device="cpu")
    assert not marker.exists()  # ... but never by running the pickle

    checkpoint = tmp_path / "compressor.safetensors"  # a pickle named like a compressor checkpoint
    checkpoint.write_bytes(pickle.dumps(namespace["Boom"]()))
    from vidmem.compressors.train import read_checkpoint_config

    with pytest.raises(VidmemError):
        read_checkpoint_config(checkpoint)
    assert not marker.exists()


def test_stream_names_that_escape_the_memory_are_refused_everywhere(tmp_path, tiny_models, videos, capfd):
    from vidmem.agents.protocol import stream_name
    from vidmem.memory import check_stream_name

    memory = tmp_path / "memory"
    common = ["--memory", str(memory), "--model", str(tiny_models.llava), "--embedder", str(tiny_models.clip),
              "--device", "cpu"]
    for name in TRAVERSALS:
        with pytest.raises(VidmemError):
            check_stream_name(name)
        with pytest.raises(VidmemError):
            stream_name({"stream": [name]})
    assert vidmem_main(["ingest", str(videos["test.mp4"]["file"]), "--stream", "ok", *common]) == 0
    capfd.readouterr()
    for name in ("../../etc", "..", ".hidden", "a/b"):
        assert vidmem_main(["ingest", str(videos["test.mp4"]["file"]), "--stream", name, *common]) == 2
        assert capfd.readouterr().err.startswith("vidmem: error: ")
        assert vidmem_main(["ask", "what?", "--stream", name, *common]) == 2
        assert capfd.readouterr().err.startswith("vidmem: error: ")
    # nothing was written outside the memory, and inside it only the good stream has files
    assert sorted(p.name for p in (memory / "tokens").iterdir()) == ["ok"]
    assert sorted(p.name for p in tmp_path.iterdir()) == ["memory"]


def test_listening_beyond_loopback_without_a_token_is_refused(capfd):
    for host in ("0.0.0.0", "::", "192.168.1.10"):
        assert vidmem_main(["serve", "--host", host, "--port", "0", "--memory", "/nonexistent"]) == 2
        err = capfd.readouterr().err
        assert err.count("\n") == 1 and "--token" in err and not Path("/nonexistent").exists()


@pytest.fixture(scope="module")
def served(tiny_models, tmp_path_factory):
    from vidmem.agents.app import Settings, Vidmem
    from vidmem.agents.server import LiveServer

    app = Vidmem(Settings(memory=tmp_path_factory.mktemp("sec") / "memory", model=str(tiny_models.llava),
                          embedder=str(tiny_models.clip), device="cpu", max_new_tokens=4))
    thread = LoopThread()
    server = LiveServer(app, port=0, token="t0ken")
    thread.call(server.start())
    yield server
    thread.call(server.stop())
    thread.close()
    app.close()


def test_size_limits_hold_where_input_arrives(served):
    from websockets.sync.client import connect

    from vidmem.agents.protocol import Limits

    limits = Limits()
    with connect(f"ws://127.0.0.1:{served.port}/ws/live?stream=big&token=t0ken", max_size=2**23) as ws:
        ws.recv(timeout=30)
        bomb = io.BytesIO()  # 12000x12000 pixels of one colour: a few KB of PNG, 432 MB decoded
        Image.new("L", (12000, 12000)).save(bomb, format="PNG")
        cases = [
            ("x" * (limits.max_text_bytes + 1), "too_large"),
            (json.dumps({"type": "ask", "question": "q" * (limits.max_question_chars + 1)}), "question_too_long"),
            (json.dumps({"type": "ask", "question": "hi", "budget": limits.max_budget + 1}), "bad_message"),
            (b"\xff\xd8\xff" + b"\0" * limits.max_frame_bytes, "too_large"),
            (bomb.getvalue(), "bad_image"),
        ]
        for message, code in cases:
            ws.send(message)
            reply = json.loads(ws.recv(timeout=WAIT))
            while reply["type"] == "ack":
                reply = json.loads(ws.recv(timeout=WAIT))
            assert reply["type"] == "error" and reply["code"] == code, (code, reply)
    for stream in TRAVERSALS[:5]:
        from urllib.parse import quote

        with pytest.raises(urllib.error.HTTPError) as err:
            urllib.request.urlopen(urllib.request.Request(
                f"http://127.0.0.1:{served.port}/ws/live?stream={quote(stream)}&token=t0ken",
                headers={"Upgrade": "websocket", "Connection": "Upgrade", "Sec-WebSocket-Version": "13",
                         "Sec-WebSocket-Key": "dGhlIHNhbXBsZSBub25jZQ=="}), timeout=30)
        assert err.value.code == 400


def _certificates(folder: Path) -> tuple[Path, Path, Path]:
    """A throwaway CA and a server certificate for 127.0.0.1, made with openssl."""
    folder.mkdir(parents=True, exist_ok=True)
    ca_key, ca, key, csr, cert = (folder / n for n in ("ca.key", "ca.pem", "server.key", "server.csr", "server.pem"))
    run = lambda *args: subprocess.run(["openssl", *args], check=True, capture_output=True, timeout=60)  # noqa: E731
    run("req", "-x509", "-newkey", "rsa:2048", "-nodes", "-keyout", str(ca_key), "-out", str(ca), "-days", "2",
        "-subj", "/CN=vidmem test CA")
    run("req", "-newkey", "rsa:2048", "-nodes", "-keyout", str(key), "-out", str(csr), "-subj", "/CN=127.0.0.1")
    ext = folder / "ext.cnf"
    ext.write_text("subjectAltName=IP:127.0.0.1\n")
    run("x509", "-req", "-in", str(csr), "-CA", str(ca), "-CAkey", str(ca_key), "-CAcreateserial", "-out", str(cert),
        "-days", "2", "-extfile", str(ext))
    key.chmod(0o644)
    return ca, cert, key


@pytest.mark.broker
def test_mqtt_over_tls_checks_the_broker_certificate_and_the_password(tmp_path):
    from services import ensure_debian_package

    from vidmem.agents.monitor import MonitorOptions, parse_mqtt_url, probe_broker

    ensure_debian_package("openssl", "openssl")
    ca, cert, key = _certificates(tmp_path / "tls")
    broker = Broker(tmp_path / "broker", users={"cam": "s3cret"}, tls=(ca, cert, key)).start()
    options = MonitorOptions(connect_timeout=10)
    try:
        asyncio.run(probe_broker(parse_mqtt_url(broker.url("mqtts", "cam:s3cret"), ca_file=ca), options))  # connects
        with pytest.raises(BrokerError):  # the system CAs do not vouch for this broker
            asyncio.run(probe_broker(parse_mqtt_url(broker.url("mqtts", "cam:s3cret")), options))
        with pytest.raises(BrokerError) as err:  # the right certificate, the wrong password
            asyncio.run(probe_broker(parse_mqtt_url(broker.url("mqtts", "cam:guess"), ca_file=ca), options))
        assert "guess" not in str(err.value)
        with pytest.raises(BrokerError):  # plain MQTT to a TLS listener
            asyncio.run(probe_broker(parse_mqtt_url(broker.url("mqtt", "cam:s3cret")), options))
    finally:
        broker.stop()
