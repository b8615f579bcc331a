#!/usr/bin/env bash
# Pathway peer: persona's core per-user features computed by Pathway in static mode.
#
#   scripts/peers/pathway.sh LOG OUT THREADS
#
# Creates target/bench/venv-pathway (pip install -r requirements-pathway.txt) when it is
# missing or the requirements changed, then runs pathway_features.py with THREADS Pathway
# worker threads (PATHWAY_THREADS, what `pathway spawn --threads N` sets). Prints only errors
# and a final line `pathway: <lines read> lines, <users> users, elapsed <s> s`.
# `--setup` only creates the venv (scripts/bench.sh runs it before timing anything).
# PATHWAY_SESSIONS=sort swaps windowby(session) for a sort-based session count (see the script).
set -euo pipefail

setup_only=0
if [ "${1:-}" = --setup ] && [ $# -eq 1 ]; then
    setup_only=1
elif [ $# -ne 3 ]; then
    echo "usage: $0 LOG OUT THREADS | $0 --setup" >&2
    exit 2
else
    log=$1 out=$2 threads=$3
fi
here=$(cd "$(dirname "${BASH_SOURCE[0]}")" && pwd)
root=$(cd "$here/../.." && pwd)
venv=$root/target/bench/venv-pathway
req=$here/requirements-pathway.txt

if ! [ -x "$venv/bin/python" ] || ! cmp -s "$req" "$venv/.requirements"; then
    mkdir -p "$root/target/bench"
    [ -x "$venv/bin/python" ] || python3 -m venv "$venv" >&2
    "$venv/bin/pip" install -q --disable-pip-version-check -r "$req" >&2
    cp "$req" "$venv/.requirements"
fi
[ "$setup_only" = 1 ] && exit 0

exec "$venv/bin/python" "$here/pathway_features.py" \
    --events "$log" --out "$out" --threads "$threads" \
    --sessions "${PATHWAY_SESSIONS:-window}"
