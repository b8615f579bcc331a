#!/usr/bin/env bash
# Offline evaluation of the recommendation strategies on every shared dataset: converts them
# (scripts/convert-datasets.py), then runs `persona evaluate` with config/evaluate.toml on each,
# each user's first 80 % of events training, and prints one Markdown table.
# Usage: scripts/evaluate.sh [DATASETS_DIR]   (default $DATASETS, else ../shared/datasets)
set -euo pipefail
cd "$(dirname "$0")/.."
DATASETS=${1:-${DATASETS:-../shared/datasets}}
if [[ ! -d "$DATASETS" ]]; then
    echo "evaluate: no datasets folder at $DATASETS (pass it: scripts/evaluate.sh DIR, or DATASETS=DIR)" >&2
    exit 1
fi
SPLIT=${SPLIT:-0.8}
OUT=target/datasets
python3 scripts/convert-datasets.py "$DATASETS" "$OUT" >&2
cargo build --release --quiet
header=1
for name in taobao-firehose taobao-histories movielens otto; do
    result=$(RUST_LOG=warn target/release/persona evaluate --config config/evaluate.toml \
        --events "$OUT/$name-events.jsonl" --catalog "$OUT/$name-catalog.jsonl" \
        --split-at "$SPLIT" --label "$name")
    echo "$result" | head -1 >&2
    if [ $header = 1 ]; then echo "$result" | sed -n '2,3p'; header=0; fi
    echo "$result" | tail -n +4
done
