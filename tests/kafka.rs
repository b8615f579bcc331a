//! The Kafka path end to end against a real Kafka-protocol broker (tansu, one per test): a log
//! produced with `persona produce` and read by `persona run` gives exactly the profiles of
//! `persona replay` of the same log; bad messages reach the dead-letter topic naming their
//! partition and offset; a broker that is down at start, or killed and restarted mid-stream,
//! costs neither events nor double counts.
//!
//! Comparing at one time: the run uses the event clock with no allowed lateness. Once the
//! status shows every produced message consumed and reflected, the run is read at its
//! `as_of_ms`, which is `max_ts` (the time the replay's dump is taken at) when the newest event
//! was read last (see `finish_and_compare`).

mod support;

use serde_json::Value;
use std::collections::BTreeMap;
use support::broker::Broker;
use support::kafka_log::*;

fn reasons(dead: &[Value]) -> BTreeMap<String, usize> {
    let mut m = BTreeMap::new();
    for d in dead {
        *m.entry(d["reason"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    m
}

/// The item most events of the log name.
fn most_common_item(events: &std::path::Path) -> String {
    let mut counts: BTreeMap<String, usize> = BTreeMap::new();
    for line in lines(events) {
        if let Ok(v) = serde_json::from_str::<Value>(&line) {
            if let Some(item) = v["item_id"].as_str() {
                *counts.entry(item.to_string()).or_default() += 1;
            }
        }
    }
    counts
        .into_iter()
        .max_by_key(|(_, n)| *n)
        .map(|(item, _)| item)
        .expect("the log names items")
}

/// Produces the log to the broker's topics, starts `persona run` on them (`workers`, more
/// `[engine]` lines), and checks every profile against the replay's once all is read.
fn read_to_the_replay(
    (dir, brokers): (&std::path::Path, &str),
    (workers, engine_lines): (usize, &str),
    (events, catalog): (&std::path::Path, &std::path::Path),
    (max_ts, expected): (u64, &BTreeMap<String, Value>),
) -> support::process::Process {
    produce(brokers, CATALOG, catalog);
    produce(brokers, EVENTS, events);
    let engine = start_engine(dir, brokers, workers, engine_lines);
    engine.wait_for(60, "readiness", |e| e.get("/readyz").0 == 200);
    let total = (lines(events).len() + lines(catalog).len()) as i64;
    finish_and_compare(dir, &engine, total, (events, catalog), max_ts, expected);
    engine
}

fn matches_replay(workers: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (events, catalog) = make_log(dir.path());
    let (max_ts, expected, replay_dead) = replay(dir.path(), &events, &catalog);
    let broker = Broker::memory();
    create_topics(&broker);
    let mut engine = read_to_the_replay(
        (dir.path(), &broker.addr),
        (workers, ""),
        (&events, &catalog),
        (max_ts, &expected),
    );

    // Item-item lists were ranked from the topic: under the event clock the tick put in before
    // the last event's batch covers every other event.
    let item = most_common_item(&events);
    let (status, similar, _) = engine.get(&format!("/v1/items/{item}/similar?limit=3"));
    assert_eq!(status, 200, "{similar}");
    let neighbours = similar["items"].as_array().cloned().unwrap_or_default();
    let reason = format!("viewed together with {item}");
    assert!(
        !neighbours.is_empty() && neighbours.iter().all(|n| n["reason"] == reason.as_str()),
        "{similar}"
    );

    // Status: every partition of both topics, each read by one worker, read to its end, and
    // the state reflects every message: no later event was needed to complete the newest.
    engine.wait_for(30, "watermarks and lag in the status", |e| {
        let (_, status, _) = e.get("/v1/status");
        let sources = status["sources"].as_array().cloned().unwrap_or_default();
        sources.iter().all(|p| {
            p["read_position"] == p["high_watermark"]
                && p["position"] == p["high_watermark"]
                && p["lag"] == 0
        })
    });
    let (_, status, _) = engine.get("/v1/status");
    let sources = status["sources"].as_array().unwrap();
    assert_eq!(sources.len(), PARTITIONS as usize + 1, "{status}");
    for s in sources {
        let p = s["partition"].as_i64().unwrap();
        assert_eq!(s["worker"].as_i64(), Some(p % workers as i64), "{s}");
    }

    // Dead letters: on the topic, each naming the message it came from, the same rejections as
    // the replay's.
    let messages: BTreeMap<(String, i32, i64), Vec<u8>> = [(EVENTS, PARTITIONS), (CATALOG, 1)]
        .iter()
        .flat_map(|(t, n)| {
            broker
                .read_topic(t, *n)
                .into_iter()
                .map(|(p, o, m)| ((t.to_string(), p, o), m))
        })
        .collect();
    let dead: Vec<Value> = broker
        .read_topic(DEAD, 1)
        .iter()
        .map(|(_, _, m)| serde_json::from_slice(m).unwrap())
        .collect();
    assert!(!dead.is_empty());
    assert_eq!(reasons(&dead), reasons(&replay_dead));
    for d in &dead {
        let source = d["source"].as_str().unwrap();
        let parts: Vec<&str> = source.rsplitn(3, '/').collect();
        let key = (
            parts[2].to_string(),
            parts[1].parse().unwrap(),
            parts[0].parse().unwrap(),
        );
        let raw = messages
            .get(&key)
            .unwrap_or_else(|| panic!("{source}: no such message"));
        assert_eq!(d["raw"].as_str().unwrap().as_bytes(), &raw[..], "{d}");
    }
    assert!(!dir.path().join("fallback-dead.jsonl").exists());
    assert!(
        !engine.log_contains("PartitionEOF"),
        "reaching the end of a partition is not a warning"
    );

    // `persona record` copies the topic back: the same lines (order across partitions aside).
    let copy = dir.path().join("recorded.jsonl");
    let out = run_ok(
        persona()
            .args([
                "record",
                "--brokers",
                &broker.addr,
                "--topic",
                EVENTS,
                "--out",
            ])
            .arg(&copy),
    );
    assert!(out.contains("recorded"), "{out}");
    let mut recorded = lines(&copy);
    let mut produced = lines(&events);
    recorded.sort();
    produced.sort();
    assert_eq!(recorded, produced);
    engine.stop();
}

#[test]
fn one_worker_matches_replay() {
    matches_replay(1);
}

#[test]
fn three_workers_over_four_partitions_match_replay() {
    matches_replay(3);
}

/// The broker is down when the engine starts, then killed and restarted (topics kept on disk)
/// between two halves of the log; the second half redelivers part of the first.
const DAY: u64 = 86_400_000;

/// Under a retention, a topic whose first batch spans more than the retention (20 days read at
/// once) gives the replay's profiles and dead letters: a batch ends before a message that
/// would overtake an older one of the same batch, as a file's does, so nothing read in order
/// is too late.
#[test]
fn a_first_batch_spanning_more_than_the_retention_matches_replay() {
    // One partition: the order the engine reads is the file's.
    backlog_over_the_retention_matches_replay(1, 1);
}

/// One worker reads two partitions of a 20-day backlog: librdkafka hands it one partition's
/// messages, then the other's, weeks apart in event time. The engine clock follows the
/// partition furthest behind until each has reached its end, so the second partition's
/// messages are not too late because the first one's were read before them.
#[test]
fn partitions_read_weeks_apart_under_a_retention_match_replay() {
    backlog_over_the_retention_matches_replay(2, 1);
}

/// Two workers, two partitions each: the within-worker case above and the workers' reading
/// paces, which differ over a backlog.
#[test]
fn workers_reading_a_backlog_at_different_paces_under_a_retention_match_replay() {
    backlog_over_the_retention_matches_replay(4, 2);
}

fn backlog_over_the_retention_matches_replay(partitions: i32, workers: usize) {
    let dir = tempfile::tempdir().unwrap();
    let (events, catalog) = make_log_spanning(dir.path(), "20d", 1_700_604_800_000 - 20 * DAY);
    let retention = "retention = \"8d\"\n";
    let (max_ts, expected, replay_dead) = replay_config(dir.path(), &events, &catalog, retention);
    let broker = Broker::memory();
    broker.create_topic(EVENTS, partitions);
    broker.create_topic(CATALOG, 1);
    broker.create_topic(DEAD, 1);
    read_to_the_replay(
        (dir.path(), &broker.addr),
        (workers, retention),
        (&events, &catalog),
        (max_ts, &expected),
    );
    let dead: Vec<Value> = broker
        .read_topic(DEAD, 1)
        .iter()
        .map(|(_, _, m)| serde_json::from_slice(m).unwrap())
        .collect();
    assert_eq!(reasons(&dead), reasons(&replay_dead));
    assert!(
        !dead.iter().any(|d| d["reason"] == "too_late"),
        "{:?}",
        dead.iter().find(|d| d["reason"] == "too_late")
    );
}

#[test]
fn broker_down_at_start_and_restarted_mid_stream() {
    let dir = tempfile::tempdir().unwrap();
    let (events, catalog) = make_log(dir.path());
    let (max_ts, expected, _) = replay(dir.path(), &events, &catalog);
    let all = lines(&events);
    let (first, second) = all.split_at(all.len() / 2);
    let mut second = second.to_vec();
    second.extend_from_slice(&first[first.len() - 200..]); // at-least-once redelivery
    let (first_log, second_log) = (
        dir.path().join("first.jsonl"),
        dir.path().join("second.jsonl"),
    );
    write_lines(&first_log, first);
    write_lines(&second_log, &second);

    let mut broker = Broker::not_started(dir.path());
    let mut engine = start_engine(dir.path(), &broker.addr, 2, "");
    engine.wait_for(30, "the retry log line", |e| {
        e.log_contains("cannot reach the brokers")
    });
    assert_eq!(engine.get("/readyz").0, 503);
    assert!(engine.alive());

    broker.start();
    create_topics(&broker);
    produce(&broker.addr, CATALOG, &catalog);
    produce(&broker.addr, EVENTS, &first_log);
    engine.wait_for(60, "readiness", |e| e.get("/readyz").0 == 200);
    let half = (first.len() + lines(&catalog).len()) as i64;
    engine.wait_for(60, "the first half read", |e| {
        positions(e, "read_position") == half
    });

    broker.kill();
    std::thread::sleep(std::time::Duration::from_millis(500));
    assert!(engine.alive(), "the engine survives the broker's death");
    broker.start();
    produce(&broker.addr, EVENTS, &second_log);
    let total = half + second.len() as i64;
    finish_and_compare(
        dir.path(),
        &engine,
        total,
        (&events, &catalog),
        max_ts,
        &expected,
    );
    engine.stop();
}

/// Empty topics under the event clock: the engine is ready and answers (an unknown user is
/// 404, not 503 for want of a complete time); the first event then counts.
#[test]
fn empty_topics_are_ready_and_readable() {
    let dir = tempfile::tempdir().unwrap();
    let broker = Broker::memory();
    create_topics(&broker);
    let mut engine = start_engine(dir.path(), &broker.addr, 2, "");
    engine.wait_for(60, "readiness", |e| e.get("/readyz").0 == 200);
    engine.wait_for(10, "an answer about a user", |e| {
        e.get("/v1/users/nobody").0 == 404
    });
    let first = dir.path().join("first.jsonl");
    write_lines(
        &first,
        &[r#"{"event_id":"e1","user_id":"u1","type":"click","ts":1700000000000}"#.to_string()],
    );
    produce(&broker.addr, EVENTS, &first);
    let (status, p, _) = engine.get("/v1/users/u1?min_as_of_ms=1700000000000&timeout_ms=20000");
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["event_count"], 1, "{p}");
    engine.stop();
}

/// More workers than partitions: worker 4 reads nothing and closes its input, and the clock
/// still advances.
#[test]
fn five_workers_over_four_partitions_match_replay() {
    matches_replay(5);
}
