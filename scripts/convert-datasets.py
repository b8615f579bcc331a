#!/usr/bin/env python3
"""Converts the shared public datasets into persona's event schema (SPEC §2) and catalogs.

Usage: scripts/convert-datasets.py [DATASETS_DIR] [OUT_DIR]
  DATASETS_DIR  default ../shared/datasets
  OUT_DIR       default target/datasets

Writes <name>-events.jsonl and <name>-catalog.jsonl for:
  taobao-firehose   Taobao UserBehavior firehose sample (58,732 users, 2 hours)
  taobao-histories  Taobao UserBehavior user histories (43 users, 9 days)
  movielens         MovieLens ml-latest-small ratings (671 users, 1995..2016)
  otto              OTTO RecSys 20-session sample (scripts/convert-otto.py's mapping)
Mappings (the datasets' READMEs suggest them):
  Taobao pv -> product_view, cart -> add_to_cart, buy -> purchase, fav -> fav (own type);
    timestamp s -> ms; catalog category = category_id. event_id = "<file>:<line>".
  MovieLens rating -> product_view of item movieId; ts = timestamp * 1000; catalog category =
    first genre. event_id = "ml:<line>".
  OTTO clicks/carts/orders -> product_view/add_to_cart/purchase; OTTO publishes no
    categories, so catalog items have none.
Raw files are read, never changed. Events are written in time order (ties: file order).
"""
import csv
import json
import sys
from pathlib import Path

TAOBAO = {"pv": "product_view", "cart": "add_to_cart", "buy": "purchase", "fav": "fav"}
OTTO = {"clicks": "product_view", "carts": "add_to_cart", "orders": "purchase"}


def write(out: Path, name: str, events: list, catalog: dict) -> None:
    events.sort(key=lambda e: e["ts"])
    with open(out / f"{name}-events.jsonl", "w") as f:
        for e in events:
            f.write(json.dumps(e, separators=(",", ":")) + "\n")
    with open(out / f"{name}-catalog.jsonl", "w") as f:
        for item in sorted(catalog):
            record = {"item_id": item}
            if catalog[item] is not None:
                record["category"] = catalog[item]
            f.write(json.dumps(record, separators=(",", ":")) + "\n")
    print(f"{name}: {len(events)} events, {len(catalog)} catalog items")


def taobao(path: Path, tag: str):
    events, catalog = [], {}
    with open(path, newline="") as f:
        for n, row in enumerate(csv.reader(f), 1):
            if len(row) != 5:
                continue
            user, item, category, behaviour, ts = row
            events.append({"event_id": f"{tag}:{n}", "user_id": f"tb-{user}", "type": TAOBAO.get(behaviour, behaviour),
                           "ts": int(ts) * 1000, "item_id": item})
            catalog[item] = f"cat-{category}"
    return events, catalog


def movielens(folder: Path):
    catalog = {}
    with open(folder / "movies.csv", newline="", encoding="utf-8") as f:
        for row in csv.DictReader(f):
            catalog[row["movieId"]] = row["genres"].split("|")[0]
    events = []
    with open(folder / "ratings.csv", newline="") as f:
        for n, row in enumerate(csv.DictReader(f), 2):
            events.append({"event_id": f"ml:{n}", "user_id": f"ml-{row['userId']}", "type": "product_view",
                           "ts": int(row["timestamp"]) * 1000, "item_id": row["movieId"]})
    return events, {k: v for k, v in catalog.items()}


def otto(path: Path):
    events, catalog = [], {}
    for line in path.read_text().splitlines():
        session = json.loads(line)
        sid = session["session"]
        for i, e in enumerate(session["events"]):
            events.append({"event_id": f"otto-{sid}-{i}", "user_id": f"otto-{sid}", "type": OTTO[e["type"]],
                           "ts": e["ts"], "item_id": str(e["aid"])})
            catalog[str(e["aid"])] = None
    return events, catalog


def main() -> None:
    here = Path(__file__).resolve().parent.parent
    if any(a in ("-h", "--help") for a in sys.argv[1:]):
        print(__doc__)
        return
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else here.parent / "shared/datasets"
    out = Path(sys.argv[2]) if len(sys.argv) > 2 else here / "target/datasets"
    out.mkdir(parents=True, exist_ok=True)
    tb = src / "taobao-userbehavior"
    write(out, "taobao-firehose", *taobao(tb / "UserBehavior_firehose_sample.csv", "tbf"))
    write(out, "taobao-histories", *taobao(tb / "UserBehavior_user_histories_sample.csv", "tbh"))
    write(out, "movielens", *movielens(src / "movielens-latest-small"))
    write(out, "otto", *otto(src / "otto-recsys-sample/otto_train_sample.jsonl"))


if __name__ == "__main__":
    main()
