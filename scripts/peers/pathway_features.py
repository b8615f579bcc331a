#!/usr/bin/env python3
"""Pathway peer for scripts/bench.sh: persona's core per-user features, computed by Pathway.

    python pathway_features.py --events LOG --out OUT.jsonl [--threads N] [--sessions window|sort]

Runs one Pathway graph in static mode over a JSON Lines event log (persona's schema,
/work/shared/SPEC.md sections 2 and 4) and writes one JSON object per user:
`{"user_id", "event_count", "first_seen_ms", "last_seen_ms", "counts", "total_spend",
"distinct_items", "sessions": {"count", "avg_duration_ms"}}`, sorted by user_id.

* Parsing: the log is read as plain text and each line goes through a Python UDF that applies
  persona's validation rules (src/parse.rs); a line that breaks one yields None and is
  filtered out (persona sends it to its dead letters).
* De-duplication: groupby(event_id) keeping the copy with the smallest ts (persona keeps the
  smallest event, ts first; the bench logs only hold exact copies).
* Aggregates: groupby(user_id).reduce, groupby(user_id, type) for `counts`,
  count_distinct(item_id) over the events that carry one.
* Sessions: windowby(ts, session(max_gap=GAP + 1), instance=user_id). Pathway puts two
  adjacent events in one session when `next - cur < max_gap` (strict), persona when
  `next - cur <= GAP`; on integer milliseconds `< GAP + 1` is the same test.
  --sessions sort replaces the session window by sort(key=ts, instance=user_id) and the gap
  to `prev`: count = 1 + gaps > GAP, total duration = (last - first) - those gaps. Same
  result, without the window's iterate() (pointer jumping), which dominates the run.
* Known gaps vs persona's parser: none on the bench logs; a conflicting duplicate (same id,
  different content, same ts) may keep a different copy than persona.
* Threads: --threads N sets PATHWAY_THREADS (what `pathway spawn --threads N` sets) before
  pathway is imported. Default: $PATHWAY_THREADS, else 1.
* Output: pw.io.jsonlines.write to a temporary file, then a post-processing pass (part of
  this script's runtime) that nets the update stream, shapes each row and sorts by user_id.

Prints `pathway: <lines read> lines, <users> users, elapsed <s> s` to stdout at the end.
"""
import argparse
import json
import math
import os
import re
import tempfile
import time

SESSION_GAP_MS = 1_800_000
ITEM_TYPES = frozenset(["product_view", "add_to_cart", "remove_from_cart", "purchase"])
MAX_EVENT_BYTES = 64 * 1024
MAX_ID_BYTES = 128
MAX_TS = 253_402_300_799_999  # 9999-12-31T23:59:59.999Z, persona's limit
TYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
DEVICE_TYPES = frozenset(["desktop", "mobile", "tablet", "other"])


def _no_constants(name):
    raise ValueError(f"{name} is not JSON")


class _DupObject(dict):
    """A JSON object that had repeated keys (the last value kept); `dups` names them."""


def _object(pairs):
    d = dict(pairs)
    if len(d) != len(pairs):
        seen = set()
        d = _DupObject(d)
        d.dups = {k for k, _ in pairs if k in seen or seen.add(k)}
    return d


# serde (persona) rejects a repeated known field; Python's json keeps the last copy.
TOP_FIELDS = frozenset(
    ["event_id", "user_id", "type", "ts", "item_id", "value", "device", "context",
     "properties", "schema_version"]
)
DEVICE_FIELDS = frozenset(["type", "user_agent"])
_decode = json.JSONDecoder(parse_constant=_no_constants, object_pairs_hook=_object).decode


def _id(v):
    """A valid id field (1..=128 UTF-8 bytes), else None. JSON null counts as missing."""
    if not isinstance(v, str) or not v or len(v.encode("utf-8")) > MAX_ID_BYTES:
        return None
    return v


def _rfc3339_ms(s):
    from datetime import datetime, timedelta, timezone

    # RFC 3339 requires a full date, 'T' (or space/t), a time and an offset or Z.
    if not re.fullmatch(
        r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}:\d{2}(\.\d+)?([Zz]|[+-]\d{2}:\d{2})", s
    ):
        return None
    try:
        t = datetime.fromisoformat(s.replace("z", "Z").replace("t", "T"))
    except ValueError:
        return None
    ms = (t - datetime(1970, 1, 1, tzinfo=timezone.utc)) // timedelta(milliseconds=1)
    return ms if ms >= 0 else None


def parse_event(line):
    """persona's rules (src/parse.rs parse_event, replay mode): the event's
    (event_id, user_id, type, ts, item_id or None, value), or None when persona rejects it."""
    if len(line.encode("utf-8")) > MAX_EVENT_BYTES:
        return None
    try:
        d = _decode(line)
    except (ValueError, RecursionError):
        return None
    if not isinstance(d, dict):
        return None
    if isinstance(d, _DupObject) and d.dups & TOP_FIELDS:
        return None
    sv = d.get("schema_version")
    if sv is not None and (type(sv) is not int or sv != 1):
        return None
    for k in ("context", "properties"):
        if d.get(k) is not None and not isinstance(d[k], dict):
            return None
    dev = d.get("device")
    if dev is not None:
        if not isinstance(dev, dict):
            return None
        if isinstance(dev, _DupObject) and dev.dups & DEVICE_FIELDS:
            return None
        dt, ua = dev.get("type"), dev.get("user_agent")
        if dt is not None and (not isinstance(dt, str) or dt not in DEVICE_TYPES):
            return None
        if ua is not None and not isinstance(ua, str):
            return None
    event_id, user_id = _id(d.get("event_id")), _id(d.get("user_id"))
    if event_id is None or user_id is None:
        return None
    kind = d.get("type")
    if not isinstance(kind, str) or not TYPE_RE.fullmatch(kind):
        return None
    ts = d.get("ts")
    if type(ts) is int:
        pass
    elif isinstance(ts, str):
        ts = _rfc3339_ms(ts)
    else:
        return None
    if ts is None or ts < 0 or ts > MAX_TS:
        return None
    item = d.get("item_id")
    if item is not None:
        item = _id(item)
        if item is None:
            return None
    elif kind in ITEM_TYPES:
        return None
    value = d.get("value")
    if value is None:
        value = 0.0
    elif type(value) in (int, float) and math.isfinite(value) and value >= 0:
        value = float(value) + 0.0
    else:
        return None
    return (event_id, user_id, kind, ts, item, value)


def build(pw, events_path, raw_out, sessions_by):
    lines = pw.io.plaintext.read(events_path, mode="static")

    @pw.udf(deterministic=True)
    def parse(line: str) -> tuple[str, str, str, int, str | None, float] | None:
        return parse_event(line)

    parsed = lines.select(e=parse(pw.this.data)).filter(pw.this.e.is_not_none())
    events = parsed.select(
        event_id=pw.unwrap(pw.this.e.get(0)),
        user_id=pw.unwrap(pw.this.e.get(1)),
        type=pw.unwrap(pw.this.e.get(2)),
        ts=pw.unwrap(pw.this.e.get(3)),
        item_id=pw.this.e.get(4),
        value=pw.unwrap(pw.this.e.get(5)),
    ).update_types(
        event_id=str, user_id=str, type=str, ts=int, item_id=str | None, value=float
    )

    # De-duplicate by event_id: one copy per id, the one with the smallest ts.
    kept = events.groupby(pw.this.event_id).reduce(row=pw.reducers.argmin(pw.this.ts))
    ev = events.ix(kept.row)

    users = ev.groupby(pw.this.user_id).reduce(
        pw.this.user_id,
        event_count=pw.reducers.count(),
        first_seen_ms=pw.reducers.min(pw.this.ts),
        last_seen_ms=pw.reducers.max(pw.this.ts),
        total_spend=pw.reducers.sum(
            pw.if_else(pw.this.type == "purchase", pw.this.value, 0.0)
        ),
    )

    by_type = ev.groupby(pw.this.user_id, pw.this.type).reduce(
        pw.this.user_id, pair=pw.make_tuple(pw.this.type, pw.reducers.count())
    )
    counts = by_type.groupby(pw.this.user_id).reduce(
        pw.this.user_id, counts=pw.reducers.tuple(pw.this.pair)
    )

    items = (
        ev.filter(pw.this.item_id.is_not_none())
        .groupby(pw.this.user_id)
        .reduce(pw.this.user_id, distinct_items=pw.reducers.count_distinct(pw.this.item_id))
    )

    if sessions_by == "window":
        windows = ev.windowby(
            ev.ts,
            window=pw.temporal.session(max_gap=SESSION_GAP_MS + 1),
            instance=ev.user_id,
        ).reduce(
            user_id=pw.this._pw_instance,
            duration=pw.this._pw_window_end - pw.this._pw_window_start,
        )
        sessions = windows.groupby(pw.this.user_id).reduce(
            pw.this.user_id,
            session_count=pw.reducers.count(),
            duration_sum=pw.reducers.sum(pw.this.duration),
        )
    else:
        # Sort per user; a gap > GAP to the previous event starts a session. The sessions'
        # durations add up to (last - first) less the gaps between sessions.
        ordered = ev.select(pw.this.user_id, pw.this.ts)
        ordered += ordered.sort(key=pw.this.ts, instance=pw.this.user_id)
        prev = ordered.ix(ordered.prev, optional=True)
        gaps = ordered.select(
            pw.this.user_id,
            pw.this.ts,
            gap=pw.if_else(
                prev.ts.is_not_none(), pw.this.ts - pw.coalesce(prev.ts, 0), 0
            ),
        ).select(
            pw.this.user_id,
            pw.this.ts,
            cut=pw.if_else(pw.this.gap > SESSION_GAP_MS, 1, 0),
            cut_gap=pw.if_else(pw.this.gap > SESSION_GAP_MS, pw.this.gap, 0),
        )
        sessions = gaps.groupby(pw.this.user_id).reduce(
            pw.this.user_id,
            cuts=pw.reducers.sum(pw.this.cut),
            cut_gaps=pw.reducers.sum(pw.this.cut_gap),
            span=pw.reducers.max(pw.this.ts) - pw.reducers.min(pw.this.ts),
        ).select(
            pw.this.user_id,
            session_count=pw.this.cuts + 1,
            duration_sum=pw.this.span - pw.this.cut_gaps,
        )

    result = (
        users.join(counts, pw.left.user_id == pw.right.user_id, id=pw.left.id)
        .select(*pw.left, counts=pw.right.counts)
        .join(sessions, pw.left.user_id == pw.right.user_id, id=pw.left.id)
        .select(
            *pw.left,
            session_count=pw.right.session_count,
            avg_duration_ms=pw.right.duration_sum // pw.right.session_count,
        )
        .join_left(items, pw.left.user_id == pw.right.user_id, id=pw.left.id)
        .select(*pw.left, distinct_items=pw.coalesce(pw.right.distinct_items, 0))
    )
    line_count = lines.reduce(n=pw.reducers.count())

    pw.io.jsonlines.write(result, raw_out)
    pw.io.jsonlines.write(line_count, raw_out + ".lines")


def net_rows(path):
    """The final rows of a Pathway update stream (rows with `time` and `diff`)."""
    weight = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if not line.strip():
                continue
            r = json.loads(line)
            diff = r.pop("diff")
            r.pop("time", None)
            key = json.dumps(r, sort_keys=True)
            weight[key] = weight.get(key, 0) + diff
    rows = []
    for key, w in weight.items():
        if w < 0 or w > 1:
            raise SystemExit(f"pathway output has weight {w} for {key}")
        if w == 1:
            rows.append(json.loads(key))
    return rows


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--threads", type=int, default=None)
    ap.add_argument(
        "--sessions",
        choices=["window", "sort"],
        default="window",
        help="window: windowby(session(...)) (default); sort: sort() + gaps, no windowby",
    )
    args = ap.parse_args()
    started = time.monotonic()
    if args.threads is not None:
        os.environ["PATHWAY_THREADS"] = str(args.threads)

    import logging

    import pathway as pw

    # Errors only: Pathway logs each connector's progress at INFO and "Closing the data
    # source" at WARNING.
    logging.basicConfig(level=logging.ERROR)

    out_dir = os.path.dirname(os.path.abspath(args.out))
    with tempfile.TemporaryDirectory(prefix="pathway-raw-", dir=out_dir) as tmp:
        raw = os.path.join(tmp, "users.jsonl")
        build(pw, os.path.abspath(args.events), raw, args.sessions)
        pw.run(monitoring_level=pw.MonitoringLevel.NONE, default_logging=False)

        users = net_rows(raw)
        lines_read = sum(r["n"] for r in net_rows(raw + ".lines"))
    users.sort(key=lambda r: r["user_id"])
    with open(args.out, "w", encoding="utf-8") as f:
        for r in users:
            profile = {
                "user_id": r["user_id"],
                "event_count": r["event_count"],
                "first_seen_ms": r["first_seen_ms"],
                "last_seen_ms": r["last_seen_ms"],
                "counts": {t: n for t, n in sorted(r["counts"])},
                "total_spend": r["total_spend"],
                "distinct_items": r["distinct_items"],
                "sessions": {
                    "count": r["session_count"],
                    "avg_duration_ms": r["avg_duration_ms"],
                },
            }
            f.write(json.dumps(profile, separators=(",", ":")) + "\n")
    elapsed = time.monotonic() - started
    print(f"pathway: {lines_read} lines, {len(users)} users, elapsed {elapsed:.1f} s")


if __name__ == "__main__":
    main()
