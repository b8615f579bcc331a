#!/usr/bin/env python3
"""Checks that a peer's per-user features equal persona's dump on the core features.

    compare.py PEER.jsonl PERSONA_DUMP.jsonl

Both files hold one JSON object per user. The peer's objects carry `user_id`, `event_count`,
`first_seen_ms`, `last_seen_ms`, `counts` (type -> count, non-zero only), `total_spend`,
`distinct_items` and `sessions` (`count`, `avg_duration_ms`); other keys are ignored.
Exits 1 and prints the first differences if any user or field differs.
"""
import json
import sys

FIELDS = ["event_count", "first_seen_ms", "last_seen_ms", "counts", "distinct_items"]


def core(p):
    out = {f: p.get(f) for f in FIELDS}
    out["counts"] = {k: v for k, v in (p.get("counts") or {}).items() if v}
    out["total_spend"] = round(float(p.get("total_spend") or 0.0), 2)
    s = p.get("sessions") or {}
    out["sessions"] = [s.get("count"), s.get("avg_duration_ms")]
    return out


def load(path):
    users = {}
    with open(path, encoding="utf-8") as f:
        for line in f:
            if line.strip():
                p = json.loads(line)
                users[p["user_id"]] = core(p)
    return users


def main():
    if len(sys.argv) != 3:
        sys.exit(__doc__)
    peer, persona = load(sys.argv[1]), load(sys.argv[2])
    bad = []
    for u in sorted(set(peer) | set(persona)):
        a, b = peer.get(u), persona.get(u)
        if a is None or b is None:
            bad.append(f"{u}: only in {'persona' if a is None else 'peer'}")
            continue
        for k in a:
            if k == "total_spend":
                same = abs(a[k] - b[k]) <= 0.011
            else:
                same = a[k] == b[k]
            if not same:
                bad.append(f"{u}.{k}: peer {a[k]!r} != persona {b[k]!r}")
    if bad:
        print(f"{len(bad)} differences over {len(persona)} users; first ones:")
        for line in bad[:10]:
            print("  " + line)
        sys.exit(1)
    print(f"same core features for all {len(persona)} users")


if __name__ == "__main__":
    main()
