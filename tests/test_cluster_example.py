"""examples/cluster keeps working: PostgreSQL, Milvus and two Ray nodes come up, two streams are ingested, a
question is answered, and a separate `vidmem ask --memory URL` answers from the printed URL; --down cleans up.

Runs in a network namespace with only loopback (Ray advertises the machine's address otherwise).
"""
from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

from services import ensure_debian_package, free_port

REPO = Path(__file__).resolve().parents[1]


def test_cluster_example_ingests_two_streams_answers_and_tears_down(tmp_path, tiny_models, videos):
    unshare = shutil.which("unshare") or ensure_debian_package("unshare", "util-linux")
    ip = shutil.which("ip") or ensure_debian_package("ip", "iproute2")
    ensure_debian_package("pg_ctlcluster", "postgresql")
    state = Path("/tmp") / f"vidmem-cluster-test-{os.getpid()}"  # the postgres user must reach it: not tmp_path
    bin_dir = Path(sys.executable).parent
    env = {**os.environ, "VIDMEM_MODEL": str(tiny_models.llava), "VIDMEM_EMBEDDER": str(tiny_models.clip),
           "HF_HUB_OFFLINE": "1", "VIDMEM_CLUSTER_DIR": str(state), "VIDMEM_PG_PORT": str(free_port()),
           "VIDMEM_MILVUS_PORT": str(free_port()), "VIDMEM_RAY_PORT": str(free_port()),
           "PATH": f"{bin_dir}{os.pathsep}{os.environ.get('PATH', '')}",
           "PYTHONPATH": os.pathsep.join(filter(None, [os.environ.get("PYTHONPATH"), str(REPO.parent)]))}
    script = REPO / "examples" / "cluster" / "run.sh"
    # One namespace for the whole life of the example: the services live on its loopback.
    command = (f"{ip} link set lo up && bash {script} {videos['demo.mp4']['file']} {videos['bikes.mp4']['file']} "
               f"> {tmp_path / 'run.out'} && url=$(grep '^memory: ' {tmp_path / 'run.out'} | cut -d' ' -f2-) && "
               f"{sys.executable} -m vidmem ask 'what happens on the driveway?' --memory \"$url\" --stream driveway "
               f"--json > {tmp_path / 'ask.out'}; status=$?; bash {script} --down; exit $status")
    result = subprocess.run([unshare, "-n", "bash", "-c", command], capture_output=True, text=True, env=env,
                            timeout=900)
    assert result.returncode == 0, result.stderr[-5000:]
    out = (tmp_path / "run.out").read_text().splitlines()
    reports = [json.loads(line) for line in out if line.startswith("{")]
    ingests = {r["stream"]: r for r in reports if "stream" in r}
    assert set(ingests) == {"front-door", "driveway"} and all(r["segments"] > 0 for r in ingests.values())
    asked = [r for r in reports if "answer" in r][0]
    assert isinstance(asked["answer"], str) and {s["stream"] for s in asked["segments"]} == {"front-door"}
    url = [line for line in out if line.startswith("memory: ")][0].split(" ", 1)[1]
    assert url.startswith("postgresql://vidmem@127.0.0.1:") and "index=milvus://127.0.0.1:" in url
    separate = json.loads((tmp_path / "ask.out").read_text())
    assert isinstance(separate["answer"], str) and {s["stream"] for s in separate["segments"]} == {"driveway"}
    assert not state.exists(), "--down removes the example's folder"
