#!/usr/bin/env bash
# Live camera Q&A: start `vidmem serve`, stream a video file to it as a camera would, ask a question, stop.
# Usage: examples/live_camera/run.sh [VIDEO] [QUESTION]
# Environment: PORT (default 8765), VIDMEM_TOKEN (optional), VIDMEM_MEMORY (default ./vidmem-memory),
# VIDMEM_MODEL / VIDMEM_EMBEDDER (local directories when offline; the defaults are fetched on first use).
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
video=${1:-$here/../../../shared/testdata/mmaction2/test.mp4}
question=${2:-"What is the person doing?"}
port=${PORT:-8765}
python=${PYTHON:-python}

"$python" -m vidmem serve --port "$port" --device "${VIDMEM_DEVICE:-auto}" &
server=$!
trap 'kill -TERM $server 2>/dev/null; wait $server 2>/dev/null || true' EXIT

# Wait for the health check (model loading can take a while the first time).
for _ in $(seq 600); do
  if "$python" -c "import urllib.request,sys; urllib.request.urlopen('http://127.0.0.1:$port/healthz', timeout=2)" 2>/dev/null; then
    break
  fi
  kill -0 $server 2>/dev/null || { echo "vidmem serve exited" >&2; exit 1; }
  sleep 0.5
done

echo "open http://127.0.0.1:$port/ in a browser to use your own camera" >&2
"$python" "$here/client.py" "$video" --url "ws://127.0.0.1:$port" ${VIDMEM_TOKEN:+--token "$VIDMEM_TOKEN"} \
  --stream example --fps 2 --seconds "${SECONDS_OF_VIDEO:-6}" --question "$question" ${JSON:+--json}
