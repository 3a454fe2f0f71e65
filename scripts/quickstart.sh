#!/usr/bin/env bash
# The main job on the embedded default: installs mbatch, then runs the example file through the
# whole pipeline in one process (SQLite and a local folder, the tiny model built on first use).
set -euo pipefail
cd "$(dirname "$0")/.."
scripts/setup.sh
.venv/bin/mbatch run examples/prompts.jsonl -o out.jsonl
