//! `persona evaluate` as a user runs it: redelivered copies of events change nothing (they
//! neither move a user's split nor score as held-out interactions), and a split that leaves
//! nothing to score is an error, not a table of zeros.

mod support;

use std::path::Path;
use support::kafka_log::{persona, run_ok};

/// `persona evaluate` of `log`: its table rows, or its error output.
fn evaluate(log: &Path, split_at: &str) -> Result<Vec<String>, String> {
    let out = persona()
        .env("RUST_BACKTRACE", "0")
        .args([
            "evaluate",
            "--label",
            "log",
            "--split-at",
            split_at,
            "--events",
        ])
        .arg(log)
        .output()
        .unwrap();
    if !out.status.success() {
        return Err(String::from_utf8_lossy(&out.stderr).into_owned());
    }
    Ok(String::from_utf8_lossy(&out.stdout)
        .lines()
        .filter(|l| l.starts_with("| log |") && !l.contains("strategy"))
        .map(str::to_string)
        .collect())
}

#[test]
fn redelivered_copies_change_nothing() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.jsonl");
    run_ok(
        persona()
            .args(["generate", "--out"])
            .arg(&log)
            .args(["--events", "4000", "--users", "150", "--items", "80"])
            .args(["--duplicates", "0", "--invalid", "0", "--seed", "5"]),
    );
    let text = std::fs::read_to_string(&log).unwrap();
    let lines: Vec<&str> = text.lines().collect();
    // Every 7th event is delivered again, some of them much later in the file.
    let mut redelivered: Vec<&str> = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        redelivered.push(line);
        if n % 7 == 3 {
            redelivered.push(line);
        }
        if n % 11 == 5 {
            redelivered.push(lines[n / 2]);
        }
    }
    let copies = dir.path().join("copies.jsonl");
    std::fs::write(&copies, redelivered.join("\n") + "\n").unwrap();

    for split in ["0.8", "0.5"] {
        let once = evaluate(&log, split).unwrap();
        assert!(!once.is_empty());
        assert_eq!(
            evaluate(&copies, split).unwrap(),
            once,
            "--split-at {split}"
        );
    }
}

#[test]
fn nothing_to_score_is_an_error() {
    let dir = tempfile::tempdir().unwrap();
    let log = dir.path().join("log.jsonl");
    // The held-out part has an event, but no item to score against.
    std::fs::write(
        &log,
        "{\"event_id\":\"e1\",\"user_id\":\"u\",\"type\":\"product_view\",\"item_id\":\"i1\",\"ts\":1000000}\n\
         {\"event_id\":\"e2\",\"user_id\":\"u\",\"type\":\"page_view\",\"ts\":2000000}\n",
    )
    .unwrap();
    let err = evaluate(&log, "1500000").unwrap_err();
    assert!(err.contains("none with an item"), "{err}");
}
