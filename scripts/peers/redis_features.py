#!/usr/bin/env python3
"""Redis peer for scripts/bench.sh: "a consumer updating a Redis hash per user".

    python redis_features.py --events LOG --out OUT.jsonl --port P [--loaders N] [--batch B]

Reads a JSON Lines event log in persona's schema (shared/SPEC.md §2), skips invalid lines,
and sends every valid event to Redis as one EVALSHA of the Lua script below, pipelined
--batch events per round trip (the replies of one batch are read after the next batch is
sent, so Redis runs one batch while Python parses the next). All state lives in Redis:

  e:<event_id>  string   de-duplication (SET NX): a redelivered event changes nothing
  z:<user_id>   zset     member event_id, score ts: event_count (ZCARD), first / last seen
                         (the ends) and an event's neighbours in time for the sessions
  i:<user_id>   set      distinct item ids (SCARD), exact
  u:<user_id>   hash     c:<type> count per type, sp total spend (HINCRBYFLOAT),
                         g number of gaps > 30 min between consecutive events, gs their sum

Sessions are maintained incrementally although events arrive out of order: inserting ts t
between predecessor p and successor s removes gap s-p (if it was > 30 min) and adds t-p and
s-t (if they are); sessions = 1 + g and the sum of session durations = (last - first) - gs.

With --loaders N > 1, N processes each read the whole log and handle the lines whose user
hashes to them (crc32(user_id) % N), like consumers of a topic partitioned by user. The
default is 1: on the 2-core bench machine 2 loaders are no faster (1M events: 33.5-34.2 s
with 1, 33.0-33.7 s with 2) and cost 25% more client CPU, because Redis runs the scripts
on one thread and is the bottleneck (~32 CPU-s of the ~34 s), and one loader (12.5 CPU-s)
already keeps it busy.
At the end the main process dumps every user (SCAN + pipelined reads) to OUT.jsonl, one
{"user_id","event_count","first_seen_ms","last_seen_ms","counts","total_spend",
"distinct_items","sessions":{"count","avg_duration_ms"}} per line, and prints a summary line.
"""
import argparse
import math
import multiprocessing
import queue
import re
import resource
import socket
import sys
import time
import zlib

import hiredis
import orjson
import redis

loads = orjson.loads

SESSION_GAP_MS = 1_800_000
ITEM_TYPES = frozenset(["product_view", "add_to_cart", "remove_from_cart", "purchase"])
TYPE_RE = re.compile(r"[a-z][a-z0-9_]{0,63}")
MAX_ID_BYTES = 128

# KEYS: e:<event_id>, u:<user>, z:<user>, i:<user>
# ARGV: event_id, ts, type, item_id ('' if none), value ('' if none or not a purchase)
LUA = """
if not redis.call('SET', KEYS[1], '1', 'NX') then return 0 end
local h, z, eid, tss = KEYS[2], KEYS[3], ARGV[1], ARGV[2]
local t = tonumber(tss)
local p, s
local last = redis.call('ZRANGE', z, -1, -1, 'WITHSCORES')[2]
redis.call('ZADD', z, tss, eid)
if last and t >= tonumber(last) then
  p = tonumber(last)  -- in order for this user (the common case): no successor
elseif last then
  local r = redis.call('ZRANK', z, eid)
  if r > 0 then
    local nb = redis.call('ZRANGE', z, r - 1, r + 1, 'WITHSCORES')
    p = tonumber(nb[2])
    if nb[6] then s = tonumber(nb[6]) end
  else
    s = tonumber(redis.call('ZRANGE', z, 1, 1, 'WITHSCORES')[2])
  end
end
local G = %d
local dg, ds = 0, 0
if p and s and s - p > G then dg = dg - 1; ds = ds - (s - p) end
if p and t - p > G then dg = dg + 1; ds = ds + (t - p) end
if s and s - t > G then dg = dg + 1; ds = ds + (s - t) end
if dg ~= 0 then redis.call('HINCRBY', h, 'g', dg) end
if ds ~= 0 then redis.call('HINCRBY', h, 'gs', string.format('%%d', ds)) end
redis.call('HINCRBY', h, 'c:' .. ARGV[3], 1)
if ARGV[4] ~= '' then redis.call('SADD', KEYS[4], ARGV[4]) end
if ARGV[5] ~= '' then redis.call('HINCRBYFLOAT', h, 'sp', ARGV[5]) end
return 1
""" % SESSION_GAP_MS


def _id_ok(v):
    return v.__class__ is str and 0 < len(v) and len(v.encode()) <= MAX_ID_BYTES


def parse(line):
    """The event's (event_id, user_id, type, ts, item_id, value) as strings, or None if invalid."""
    try:
        ev = loads(line)
    except ValueError:
        return None
    if ev.__class__ is not dict:
        return None
    eid, uid, typ, ts = ev.get("event_id"), ev.get("user_id"), ev.get("type"), ev.get("ts")
    if not (_id_ok(eid) and _id_ok(uid)):
        return None
    if not (typ.__class__ is str and TYPE_RE.fullmatch(typ)):
        return None
    if ts.__class__ is not int:  # bool is a subclass of int, not int itself
        return None
    item = ev.get("item_id")
    if item is None:
        if typ in ITEM_TYPES:
            return None
        item = ""
    elif not _id_ok(item):
        return None
    value = ev.get("value")
    if value is None:
        value = ""
    else:
        if value.__class__ is not int and value.__class__ is not float:
            return None
        if not math.isfinite(value) or value < 0:
            return None
        value = repr(value) if typ == "purchase" else ""
    return eid, uid, typ, str(ts), item, value


_UID = b'"user_id":"'


def partition(line, n):
    """Which of n loaders handles this raw line: crc32 of its user_id (0 if not found)."""
    i = line.find(_UID)
    if i < 0:
        return 0
    i += len(_UID)
    j = line.find(b'"', i)
    if j < 0:
        return 0
    return zlib.crc32(line[i:j]) % n


class Pipe:
    """Pipelining over one connection: commands are packed by hiredis, sent a batch per
    sendall, and the replies of batch k are read only after batch k+1 has been sent, so
    Redis executes one batch while this process parses the next, and never waits for it."""

    def __init__(self, port):
        self.sock = socket.create_connection(("127.0.0.1", port))
        self.sock.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        self.reader = hiredis.Reader()
        self.buf = bytearray(1 << 16)
        self.out = []  # packed commands not sent yet
        self.queued = 0  # how many commands self.out holds
        self.in_flight = 0  # commands sent whose replies were not read yet

    def add(self, *args):
        self.out.append(hiredis.pack_command(args))
        self.queued += 1

    def add_packed(self, blob, commands):
        self.out.append(blob)
        self.queued += commands

    def send(self):
        """Sends the queued commands, then reads and returns the replies of the batch sent
        before them: Redis always has the next batch queued when it finishes one."""
        self.sock.sendall(b"".join(self.out))
        replies = self.read(self.in_flight)
        self.in_flight, self.queued, self.out = self.queued, 0, []
        return replies

    def drain(self):
        replies = self.read(self.in_flight)
        self.in_flight = 0
        return replies

    def read(self, n):
        replies = []
        gets, feed, buf, recv = self.reader.gets, self.reader.feed, self.buf, self.sock.recv_into
        while len(replies) < n:
            r = gets()
            if r is False:
                k = recv(buf)
                if not k:
                    raise ConnectionError("redis closed the connection")
                feed(buf, 0, k)
            elif isinstance(r, hiredis.ReplyError):
                raise r
            else:
                replies.append(r)
        return replies


def load(path, port, part, nparts, batch, out_q=None):
    sha = redis.Redis(host="127.0.0.1", port=port).script_load(LUA)
    pipe = Pipe(port)
    add = pipe.add
    lines = invalid = queued = 0
    with open(path, "rb") as f:
        for line in f:
            if nparts > 1 and partition(line, nparts) != part:
                continue
            lines += 1
            ev = parse(line)
            if ev is None:
                invalid += 1
                continue
            eid, uid, typ, ts, item, value = ev
            add("EVALSHA", sha, "4", "e:" + eid, "u:" + uid, "z:" + uid, "i:" + uid,
                eid, ts, typ, item, value)
            queued += 1
            if queued >= batch:
                pipe.send()
                queued = 0
    if queued:
        pipe.send()
    pipe.drain()
    stats = (lines, invalid, resource.getrusage(resource.RUSAGE_SELF).ru_maxrss)
    if out_q is not None:
        out_q.put(stats)
    return stats


# The 5 reads of one user, in RESP: HGETALL u:, ZCARD z:, ZRANGE z: 0 0 / -1 -1 WITHSCORES,
# SCARD i: (each key is 2 + len(user_id) bytes long, passed as (len(key), user_id)).
READ_USER = (b"*2\r\n$7\r\nHGETALL\r\n$%d\r\nu:%b\r\n"
             b"*2\r\n$5\r\nZCARD\r\n$%d\r\nz:%b\r\n"
             b"*5\r\n$6\r\nZRANGE\r\n$%d\r\nz:%b\r\n$1\r\n0\r\n$1\r\n0\r\n$10\r\nWITHSCORES\r\n"
             b"*5\r\n$6\r\nZRANGE\r\n$%d\r\nz:%b\r\n$2\r\n-1\r\n$2\r\n-1\r\n$10\r\nWITHSCORES\r\n"
             b"*2\r\n$5\r\nSCARD\r\n$%d\r\ni:%b\r\n")


def dump(port, out_path, batch):
    keys = list(redis.Redis(host="127.0.0.1", port=port).scan_iter(
        match="u:*", count=10000, _type="hash"))
    pipe = Pipe(port)
    with open(out_path, "wb") as out:
        prev = []
        for i in range(0, len(keys), batch):
            chunk = keys[i:i + batch]
            pipe.add_packed(b"".join(READ_USER % ((len(k), k[2:]) * 5) for k in chunk),
                            5 * len(chunk))
            replies = pipe.send()
            out.write(b"".join(profile(k, replies[5 * j:5 * j + 5]) for j, k in enumerate(prev)))
            prev = chunk
        replies = pipe.drain()
        out.write(b"".join(profile(k, replies[5 * j:5 * j + 5]) for j, k in enumerate(prev)))
    return len(keys)


def profile(key, replies):
    flat, n, first, last, items = replies
    h = dict(zip(flat[::2], flat[1::2]))
    first, last = int(first[1]), int(last[1])
    sessions = 1 + int(h.get(b"g", 0))
    total_duration = (last - first) - int(h.get(b"gs", 0))
    counts = {k[2:].decode(): int(v) for k, v in h.items() if k.startswith(b"c:")}
    return orjson.dumps({
        "user_id": key[2:].decode(),
        "event_count": n,
        "first_seen_ms": first,
        "last_seen_ms": last,
        "counts": counts,
        "total_spend": float(h.get(b"sp", 0)),
        "distinct_items": items,
        "sessions": {"count": sessions, "avg_duration_ms": total_duration // sessions},
    }, option=orjson.OPT_APPEND_NEWLINE)


def main():
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--events", required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--port", type=int, default=6390)
    ap.add_argument("--loaders", type=int, default=1)
    ap.add_argument("--batch", type=int, default=1000, help="events per pipelined round trip")
    a = ap.parse_args()

    t0 = time.monotonic()
    if a.loaders <= 1:
        lines, invalid, rss = load(a.events, a.port, 0, 1, a.batch)
        rss_kib = [rss]
    else:
        ctx = multiprocessing.get_context("fork")
        q = ctx.Queue()
        procs = [ctx.Process(target=load, args=(a.events, a.port, k, a.loaders, a.batch, q))
                 for k in range(a.loaders)]
        for p in procs:
            p.start()
        stats = []
        while len(stats) < len(procs):
            try:
                stats.append(q.get(timeout=1))
            except queue.Empty:
                for p in procs:
                    if p.exitcode:
                        for other in procs:
                            other.kill()
                        sys.exit(f"loader {p.pid} failed with exit code {p.exitcode}")
        for p in procs:
            p.join()
        lines = sum(s[0] for s in stats)
        invalid = sum(s[1] for s in stats)
        rss_kib = [s[2] for s in stats]
    t1 = time.monotonic()
    users = dump(a.port, a.out, a.batch)
    t2 = time.monotonic()
    main_rss = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    rss_kib = [main_rss] if a.loaders <= 1 else rss_kib + [main_rss]
    print(f"summary: lines {lines} invalid {invalid} users {users} loaders {a.loaders} "
          f"load {t1 - t0:.2f} s dump {t2 - t1:.2f} s "
          f"peak RSS {'+'.join(map(str, rss_kib))} KiB", flush=True)


if __name__ == "__main__":
    main()
