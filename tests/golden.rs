//! The golden log in `tests/data/` through the `persona replay` command, against its expected
//! dump. The expected file is written by the test's independent reference implementation
//! (`REWRITE=1 cargo test --test golden`), and spot-checked by hand below: inspect any diff
//! before committing it.

mod support;

use serde_json::Value;
use std::path::Path;
use std::process::Command;

/// Runs the `persona` binary with `args`, asserts it succeeded and returns its stdout.
fn persona<I, S>(args: I) -> String
where
    I: IntoIterator<Item = S>,
    S: AsRef<std::ffi::OsStr>,
{
    let out = Command::new(env!("CARGO_BIN_EXE_persona"))
        .args(args)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "persona failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    String::from_utf8_lossy(&out.stdout).into_owned()
}

fn lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap()
        .lines()
        .map(str::to_string)
        .collect()
}

#[test]
fn golden_log_replays_to_its_expected_dump() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let (events, catalog, expected_path) = (
        data.join("golden-events.jsonl"),
        data.join("golden-catalog.jsonl"),
        data.join("golden-expected.jsonl"),
    );
    let (reference, stats) = support::reference::profiles(&lines(&events), &lines(&catalog));
    if std::env::var_os("REWRITE").is_some() {
        let text: String = reference.iter().map(|p| format!("{p}\n")).collect();
        std::fs::write(&expected_path, text).unwrap();
    }
    let expected: Vec<Value> = lines(&expected_path)
        .iter()
        .map(|l| serde_json::from_str(l).unwrap())
        .collect();
    support::assert_profiles_eq(&reference, &expected, "reference vs expected file");

    // Hand-checked facts of the golden log (SPEC §4), so the expected file is not taken on trust.
    let alice = &expected[0];
    assert_eq!(alice["user_id"], "alice");
    assert_eq!(
        alice["event_count"], 11,
        "g04 twice counts once; g20 is alice's"
    );
    assert_eq!(alice["total_spend"].as_f64().unwrap(), 179.9);
    assert_eq!(
        alice["sessions"]["count"], 4,
        "30 min + 200 ms splits, 30 min + 1 ms splits"
    );
    assert_eq!(
        alice["devices"],
        serde_json::json!(["desktop", "mobile", "tablet"])
    );
    assert_eq!(alice["last_device"], "desktop");
    let bob = &expected[1];
    assert_eq!(
        bob["sessions"]["count"], 2,
        "a gap of exactly 30 min stays in the session"
    );
    assert_eq!(
        bob["last_device"], "other",
        "conflicting g13: the copy with the smaller ts is kept"
    );
    assert_eq!(
        bob["recent_items"],
        serde_json::json!(["a-item", "b-item", "hat-2"])
    );
    assert_eq!(
        bob["top_categories"],
        serde_json::json!([{"category": "accessories", "count": 1}, {"category": "misc", "count": 1}])
    );
    assert_eq!(stats.dead, 7);

    for workers in ["1", "3"] {
        let dir = tempfile::tempdir().unwrap();
        let dump = dir.path().join("dump.jsonl");
        let dead = dir.path().join("dead.jsonl");
        let summary = persona([
            "replay".as_ref(),
            "--events".as_ref(),
            events.as_os_str(),
            "--catalog".as_ref(),
            catalog.as_os_str(),
            "--dump".as_ref(),
            dump.as_os_str(),
            "--dead-letters".as_ref(),
            dead.as_os_str(),
            "--workers".as_ref(),
            workers.as_ref(),
        ]);
        assert!(
            summary.contains(&format!("{} accepted", stats.accepted)),
            "{summary}"
        );
        assert!(
            summary.contains(&format!("{} dead letters", stats.dead + 1)),
            "events and the bad catalog record: {summary}"
        );
        let actual: Vec<Value> = lines(&dump)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        support::assert_profiles_eq(&actual, &expected, &format!("golden, {workers} workers"));

        // Every rejected line is in the dead-letter file with its reason and source line.
        let dead: Vec<Value> = lines(&dead)
            .iter()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect();
        assert_eq!(
            dead.len() as u64,
            stats.dead + 1,
            "7 bad events and 1 bad catalog record"
        );
        let sources: Vec<&str> = dead.iter().map(|d| d["source"].as_str().unwrap()).collect();
        assert!(
            sources
                .iter()
                .any(|s| s.ends_with("golden-events.jsonl:23")),
            "{sources:?}"
        );
        assert!(
            sources
                .iter()
                .any(|s| s.ends_with("golden-catalog.jsonl:8")),
            "{sources:?}"
        );
        let reasons: Vec<&str> = dead.iter().map(|d| d["reason"].as_str().unwrap()).collect();
        for r in [
            "invalid_json",
            "missing_field",
            "invalid_field",
            "unknown_schema_version",
        ] {
            assert!(reasons.contains(&r), "{reasons:?}");
        }
        assert!(dead
            .iter()
            .all(|d| d["raw"].is_string() && d["detail"].is_string()));
    }
}

/// `persona validate` reports the same rejections as a replay of the golden log, by reason,
/// on any number of threads, and counts every other line as valid.
#[test]
fn validate_counts_what_replay_rejects() {
    let data = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/data");
    let events = data.join("golden-events.jsonl");
    let all = lines(&events);
    let (_, stats) = support::reference::profiles(&all, &lines(&data.join("golden-catalog.jsonl")));
    let dir = tempfile::tempdir().unwrap();
    let dead = dir.path().join("dead.jsonl");
    persona([
        "replay".as_ref(),
        "--events".as_ref(),
        events.as_os_str(),
        "--dead-letters".as_ref(),
        dead.as_os_str(),
    ]);
    let mut by_reason = std::collections::BTreeMap::<String, u64>::new();
    for line in lines(&dead) {
        let d: Value = serde_json::from_str(&line).unwrap();
        *by_reason
            .entry(d["reason"].as_str().unwrap().to_string())
            .or_default() += 1;
    }
    assert_eq!(by_reason.values().sum::<u64>(), stats.dead);
    assert!(
        !by_reason.contains_key("future_ts"),
        "validate has no clock"
    );
    let non_blank = all.iter().filter(|l| !l.trim().is_empty()).count() as u64;

    for workers in ["1", "3"] {
        let text = persona([
            "validate".as_ref(),
            "--workers".as_ref(),
            workers.as_ref(),
            "--events".as_ref(),
            events.as_os_str(),
        ]);
        let summary = format!(
            "validated {non_blank} lines: {} valid, {} rejected;",
            non_blank - stats.dead,
            stats.dead
        );
        assert!(text.starts_with(&summary), "{workers} workers: {text}");
        for (reason, n) in &by_reason {
            assert!(
                text.contains(&format!("  {reason}: {n} (first at line ")),
                "{workers} workers, {reason}: {text}"
            );
        }
    }
}

#[test]
fn operator_times_name_each_workers_views() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    persona([
        "generate".as_ref(),
        "--out".as_ref(),
        events.as_os_str(),
        "--events".as_ref(),
        "20000".as_ref(),
        "--users".as_ref(),
        "2000".as_ref(),
    ]);
    let dump = |on: &str| dir.path().join(format!("dump-{on}.jsonl"));
    let run = |on: &str| {
        let out = Command::new(env!("CARGO_BIN_EXE_persona"))
            .args(["replay", "--workers", "2", "--events"])
            .arg(&events)
            .arg("--dead-letters")
            .arg(dir.path().join("dead.jsonl"))
            .arg("--dump")
            .arg(dump(on))
            .env("PERSONA_ENGINE_OPERATOR_TIMES", on)
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        String::from_utf8_lossy(&out.stderr).into_owned()
    };
    let on = run("true");
    for worker in 0..2 {
        let table = on
            .split(&format!("operator times, worker {worker}:"))
            .nth(1)
            .unwrap_or_else(|| panic!("no table for worker {worker} in {on}"));
        let table = table
            .split("operator times, worker")
            .next()
            .unwrap_or(table);
        for view in ["Basics", "Dedup", "Arrange: basics", "Arrange: features"] {
            assert!(
                table.contains(&format!("  {view} (#")),
                "worker {worker}'s table names {view}: {table}"
            );
        }
    }
    assert!(!run("false").contains("operator times"));
    // The logging only watches: the profiles are the same without it.
    let read = |on: &str| std::fs::read_to_string(dump(on)).unwrap();
    assert!(
        read("true") == read("false"),
        "dumps differ with operator times on"
    );
}
