#!/bin/sh
# Run one row of the paper's results table (k = 0 and k = k_exp, three seeds) end to end.
# Usage: sh scripts/DP/run_row.sh <dataset> <epsilon> <public_set> [extra run_pipeline.py flags]
# Rows and their settings live in configs/paper.yaml and configs/table1.yaml.
set -eu
[ $# -ge 3 ] || { echo "usage: $0 <dataset> <epsilon> <public_set> [flags]" >&2; exit 2; }
dataset=$1 epsilon=$2 public=$3
shift 3
cd "$(dirname "$0")/../.."
PY=${PYTHON:-.venv/bin/python}
exec "$PY" run_pipeline.py --config configs/paper.yaml --row "${dataset}_eps${epsilon}_${public}" "$@"
