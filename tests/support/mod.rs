//! Test support: a from-scratch reference implementation of SPEC §2 and §4, and helpers.
#![allow(dead_code)]

pub mod broker;
pub mod kafka_log;
pub mod process;
pub mod recommend;
pub mod reference;

use persona::config::{ClockMode, Config, Settings};

/// Settings for replay tests: the defaults, `workers` workers, event clock, a dedup horizon
/// longer than any generated log so that de-duplication is exact.
pub fn settings(workers: usize) -> Settings {
    let mut c = Config::default();
    c.engine.workers = workers;
    c.engine.dedup_horizon = "365d".into();
    // Never the erasures of whoever ran the engine in this directory.
    c.engine.erasure_log = "".into();
    let mut s = Settings::from_config(&c).expect("default settings are valid");
    s.clock = ClockMode::Event;
    s
}

/// Writes `events` and `catalog` lines to `events.jsonl` and `catalog.jsonl` in `dir`.
pub fn write_log(
    dir: &std::path::Path,
    events: &[String],
    catalog: &[String],
) -> (std::path::PathBuf, std::path::PathBuf) {
    let (ev, cat) = (dir.join("events.jsonl"), dir.join("catalog.jsonl"));
    for (path, lines) in [(&ev, events), (&cat, catalog)] {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        std::fs::write(path, text).unwrap();
    }
    (ev, cat)
}

/// Replays `events`/`catalog` lines in-process and returns the profiles as JSON values.
pub fn replay_lines(
    events: &[String],
    catalog: &[String],
    workers: usize,
) -> (Vec<serde_json::Value>, persona::replay::Summary) {
    replay_with(events, catalog, settings(workers)).0
}

/// [`replay_lines`] with `settings`; also returns the dead-letter records.
pub fn replay_with(
    events: &[String],
    catalog: &[String],
    settings: Settings,
) -> (
    (Vec<serde_json::Value>, persona::replay::Summary),
    Vec<serde_json::Value>,
) {
    let dir = tempfile::tempdir().unwrap();
    let (ev, cat) = write_log(dir.path(), events, catalog);
    let dead = dir.path().join("dead.jsonl");
    let replayed = persona::replay::replay(settings, &ev, Some(&cat), &dead, None, false)
        .expect("replay runs");
    let profiles = replayed
        .profiles
        .iter()
        .map(|p| serde_json::to_value(p).unwrap())
        .collect();
    let summary = replayed.summary.clone();
    replayed.shared.shutdown();
    replayed.join().expect("workers stop cleanly");
    let dead_letters = std::fs::read_to_string(&dead)
        .unwrap_or_default()
        .lines()
        .map(|l| serde_json::from_str(l).expect("dead letters are JSON"))
        .collect();
    ((profiles, summary), dead_letters)
}

/// Asserts two profile lists are equal, floats to 1e-9 relative.
pub fn assert_profiles_eq(
    actual: &[serde_json::Value],
    expected: &[serde_json::Value],
    context: &str,
) {
    assert_eq!(
        actual.len(),
        expected.len(),
        "{context}: number of profiles\nactual users: {:?}\nexpected users: {:?}",
        actual
            .iter()
            .map(|p| p["user_id"].clone())
            .collect::<Vec<_>>(),
        expected
            .iter()
            .map(|p| p["user_id"].clone())
            .collect::<Vec<_>>()
    );
    for (a, e) in actual.iter().zip(expected) {
        let (ao, eo) = (a.as_object().unwrap(), e.as_object().unwrap());
        let mut keys: Vec<_> = eo.keys().collect();
        keys.sort();
        let mut akeys: Vec<_> = ao.keys().collect();
        akeys.sort();
        assert_eq!(akeys, keys, "{context}: fields of {}", e["user_id"]);
        for k in keys {
            let (x, y) = (&ao[k], &eo[k]);
            assert!(
                !x.as_f64().is_some_and(|f| f == 0.0 && f.is_sign_negative()),
                "{context}: {k} of {} is -0.0",
                e["user_id"]
            );
            let same = match (x.as_f64(), y.as_f64()) {
                (Some(p), Some(q)) if k == "total_spend" || k == "engagement_score" => {
                    (p - q).abs() <= 1e-9 * q.abs().max(1.0)
                }
                _ => x == y,
            };
            assert!(
                same,
                "{context}: user {} field {k}:\n  engine:    {x}\n  reference: {y}",
                e["user_id"]
            );
        }
    }
}
