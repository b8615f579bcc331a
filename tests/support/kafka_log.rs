//! Helpers for tests that run the `persona` binary against Kafka: the test log, the replay it
//! is compared with, producing and reading positions.

use super::broker::Broker;
use super::process::{spawn_listening, Process};
use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::process::Command;

pub const PARTITIONS: i32 = 4;
pub const EVENTS: &str = "events";
pub const CATALOG: &str = "catalog";
pub const DEAD: &str = "dead-letters";

pub fn persona() -> Command {
    Command::new(env!("CARGO_BIN_EXE_persona"))
}

pub fn run_ok(cmd: &mut Command) -> String {
    let out = cmd.output().unwrap();
    assert!(
        out.status.success(),
        "{cmd:?} failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).to_string()
}

pub fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .filter(|l| !l.trim().is_empty())
        .map(str::to_string)
        .collect()
}

pub fn write_lines(path: &Path, lines: &[String]) {
    std::fs::write(
        path,
        lines.iter().map(|l| format!("{l}\n")).collect::<String>(),
    )
    .unwrap();
}

/// A log with redeliveries, late events, bad lines and the golden log's edge cases; and a
/// catalog.
pub fn make_log(dir: &Path) -> (PathBuf, PathBuf) {
    make_log_spanning(dir, "6h", 1_700_000_000_000)
}

/// [`make_log`] with the generated events spread over `span` from `start_ms` (the golden log's
/// events keep their own times, from 1_700_000_000_000 to 7 days later).
pub fn make_log_spanning(dir: &Path, span: &str, start_ms: u64) -> (PathBuf, PathBuf) {
    let events = dir.join("events.jsonl");
    let catalog = dir.join("catalog.jsonl");
    run_ok(
        persona()
            .args(["generate", "--out"])
            .arg(&events)
            .arg("--catalog")
            .arg(&catalog)
            .args([
                "--events",
                "3000",
                "--users",
                "150",
                "--items",
                "300",
                "--categories",
                "12",
                "--span",
                span,
                "--start-ms",
                &start_ms.to_string(),
                "--duplicates",
                "0.05",
                "--late",
                "0.05",
                "--invalid",
                "0.01",
                "--seed",
                "11",
            ]),
    );
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let mut ev = lines(&events);
    ev.extend(lines(&data.join("golden-events.jsonl")));
    write_lines(&events, &ev);
    let mut cat = lines(&catalog);
    cat.extend(lines(&data.join("golden-catalog.jsonl")));
    write_lines(&catalog, &cat);
    (events, catalog)
}

pub const ENGINE: &str = "[engine]\nclock = \"event\"\nallowed_lateness = \"0s\"\ndedup_horizon = \"3650d\"\ntick = \"10ms\"\n";

/// `persona replay` of the log: the as_of, the profiles by user and the dead letters.
pub fn replay(
    dir: &Path,
    events: &Path,
    catalog: &Path,
) -> (u64, BTreeMap<String, Value>, Vec<Value>) {
    replay_config(dir, events, catalog, "")
}

/// [`replay`] with `engine` more lines of `[engine]` settings.
pub fn replay_config(
    dir: &Path,
    events: &Path,
    catalog: &Path,
    engine: &str,
) -> (u64, BTreeMap<String, Value>, Vec<Value>) {
    let config = dir.join("replay.toml");
    std::fs::write(&config, format!("{ENGINE}{engine}")).unwrap();
    let dump = dir.join("replay.jsonl");
    let dead = dir.join("replay-dead.jsonl");
    run_ok(
        persona()
            .args(["replay", "--events"])
            .arg(events)
            .arg("--catalog")
            .arg(catalog)
            .arg("--dump")
            .arg(&dump)
            .arg("--dead-letters")
            .arg(&dead)
            .arg("--config")
            .arg(&config),
    );
    let profiles: BTreeMap<String, Value> = lines(&dump)
        .iter()
        .map(|l| {
            let v: Value = serde_json::from_str(l).unwrap();
            (v["user_id"].as_str().unwrap().to_string(), v)
        })
        .collect();
    let as_of = profiles.values().next().unwrap()["as_of_ms"]
        .as_u64()
        .unwrap();
    let dead = lines(&dead)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    (as_of, profiles, dead)
}

pub fn create_topics(broker: &Broker) {
    broker.create_topic(EVENTS, PARTITIONS);
    broker.create_topic(CATALOG, 1);
    broker.create_topic(DEAD, 1);
}

pub fn produce(brokers: &str, topic: &str, log: &Path) {
    let out = run_ok(
        persona()
            .args([
                "produce",
                "--brokers",
                brokers,
                "--topic",
                topic,
                "--events",
            ])
            .arg(log),
    );
    assert!(out.contains("0 failed"), "{out}");
}

/// Sum of `field` (`read_position`: read from Kafka; `position`: reflected in the state) over
/// every partition the engine reads.
pub fn positions(engine: &Process, field: &str) -> i64 {
    let (_, status, _) = engine.get("/v1/status");
    status["sources"]
        .as_array()
        .map(|s| s.iter().filter_map(|p| p[field].as_i64()).sum())
        .unwrap_or(0)
}

/// `persona run` on the broker's topics with `workers` workers and `engine` more lines of
/// `[engine]` settings.
pub fn start_engine(dir: &Path, brokers: &str, workers: usize, engine: &str) -> Process {
    let config = dir.join("run.toml");
    std::fs::write(
        &config,
        format!(
            "{ENGINE}workers = {workers}\n{engine}\n[source]\nkind = \"kafka\"\ndead_letter_path = {:?}\n\n[triggers]\npath = {:?}\n\n[kafka]\nbrokers = {brokers:?}\nevents_topic = {EVENTS:?}\ncatalog_topic = {CATALOG:?}\ndead_letter_topic = {DEAD:?}\n\n[http]\nlisten = \"127.0.0.1:0\"\n",
            dir.join("fallback-dead.jsonl").display().to_string(),
            dir.join("fallback-triggers.jsonl").display().to_string(),
        ),
    )
    .unwrap();
    let mut cmd = persona();
    cmd.args(["run", "--config"]).arg(&config);
    spawn_listening(cmd)
}

/// Waits until the engine has read all `total` messages and its state reflects them, then
/// checks every profile against the replay of `log` (events, catalog). Once a worker has read
/// everything, the event clock moves past its last records, so the state completes at the
/// newest time put in: `max_ts` when every message was read before the one carrying it went
/// idle. A message read after the clock passed `max_ts` (another partition's, delivered later)
/// goes in at a later time, as in any run that reads in arrival order; the state is then
/// compared with a replay that ends at that time too (`replay_until`).
pub fn finish_and_compare(
    dir: &Path,
    engine: &Process,
    total: i64,
    log: (&Path, &Path),
    max_ts: u64,
    expected: &BTreeMap<String, Value>,
) {
    engine.wait_for(120, "every produced message read", |e| {
        positions(e, "read_position") == total
    });
    engine.wait_for(60, "positions reflected in the state", |e| {
        positions(e, "position") >= total
    });
    let as_of = engine.get("/v1/status").1["as_of_ms"]
        .as_u64()
        .expect("as_of_ms in the status");
    assert!(as_of >= max_ts, "the state at {as_of} is before {max_ts}");
    let later;
    let expected = if as_of == max_ts {
        expected
    } else {
        eprintln!(
            "the state is complete at {as_of}, max_ts + {}",
            as_of - max_ts
        );
        later = replay_until(dir, log, as_of);
        &later
    };
    let mut actual = Vec::new();
    for user in expected.keys() {
        let path = format!(
            "/v1/users/{}?min_as_of_ms={as_of}&timeout_ms=10000",
            utf8_percent_encode(user, NON_ALPHANUMERIC)
        );
        let (status, p, _) = engine.get(&path);
        assert_eq!(status, 200, "{user}: {p}");
        assert_eq!(p["as_of_ms"].as_u64(), Some(as_of), "{user}: {p}");
        actual.push(p);
    }
    let expected: Vec<Value> = expected.values().cloned().collect();
    super::assert_profiles_eq(&actual, &expected, "kafka run vs replay");
}

/// The replay of `log` (with the `[engine]` settings of the last [`replay_config`] in `dir`)
/// with its clock ending at `at`: the log and one event of another user at `at`, whose
/// profile is left out.
pub fn replay_until(
    dir: &Path,
    (events, catalog): (&Path, &Path),
    at: u64,
) -> BTreeMap<String, Value> {
    let extended = dir.join("events-until.jsonl");
    let mut log = lines(events);
    log.push(format!(
        r#"{{"event_id":"zz-clock","user_id":"zz-clock","type":"page_view","ts":{at}}}"#
    ));
    write_lines(&extended, &log);
    let engine = std::fs::read_to_string(dir.join("replay.toml"))
        .unwrap()
        .strip_prefix(ENGINE)
        .expect("a replay config in the test's folder")
        .to_string();
    let (until, mut profiles, _) = replay_config(dir, &extended, catalog, &engine);
    assert_eq!(until, at);
    profiles.remove("zz-clock");
    profiles
}
