#!/usr/bin/env python3
"""Converts the OTTO RecSys sample (CC BY 4.0) into persona's event schema and a catalog.

Usage: scripts/convert-otto.py [SAMPLE] [OUT_DIR]
  SAMPLE   default ../shared/datasets/otto-recsys-sample/otto_train_sample.jsonl
  OUT_DIR  default data/

Mapping: OTTO `session` -> user_id "otto-<session>", `aid` -> item_id "<aid>",
clicks -> product_view, carts -> add_to_cart, orders -> purchase, ts (epoch ms) kept.
event_id "otto-<session>-<index>" is stable, so re-ingesting the file is a duplicate.
OTTO publishes no categories or prices: the catalog's categories are SYNTHETIC
("group-NN" from a hash of the aid), only to exercise top_categories.
Events are written in time order, as a live stream would deliver them.
"""
import json
import sys
import zlib
from pathlib import Path

TYPES = {"clicks": "product_view", "carts": "add_to_cart", "orders": "purchase"}


def main() -> None:
    here = Path(__file__).resolve().parent.parent
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        return
    sample = Path(sys.argv[1]) if len(sys.argv) > 1 else here.parent / "shared/datasets/otto-recsys-sample/otto_train_sample.jsonl"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else here / "data"
    out.mkdir(parents=True, exist_ok=True)
    events, items = [], set()
    for line in sample.read_text().splitlines():
        session = json.loads(line)
        sid = session["session"]
        for i, e in enumerate(session["events"]):
            items.add(e["aid"])
            events.append({
                "event_id": f"otto-{sid}-{i}",
                "user_id": f"otto-{sid}",
                "type": TYPES[e["type"]],
                "ts": e["ts"],
                "item_id": str(e["aid"]),
            })
    events.sort(key=lambda e: (e["ts"], e["event_id"]))
    with open(out / "sample-events.jsonl", "w") as f:
        for e in events:
            f.write(json.dumps(e, separators=(",", ":")) + "\n")
    with open(out / "sample-catalog.jsonl", "w") as f:
        for aid in sorted(items):
            group = zlib.crc32(str(aid).encode()) % 12
            f.write(json.dumps({"item_id": str(aid), "category": f"group-{group:02d}"}, separators=(",", ":")) + "\n")
    print(f"wrote {len(events)} events and {len(items)} catalog items to {out}")


if __name__ == "__main__":
    main()
