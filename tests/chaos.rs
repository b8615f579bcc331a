//! Kill it at any moment and lose nothing. A log is produced to Kafka in chunks (each chunk also
//! redelivers the end of the previous one) while `persona run`, taking checkpoints every 100 ms,
//! is killed with SIGKILL at random moments and restarted (with 2, 3 or 1 workers); the broker is killed and restarted
//! once, and once the newest checkpoint is truncated before a restart. The final profiles must
//! equal `persona replay` of the same log.
//!
//! `CHAOS_ROUNDS` sets the number of engine kills (default 4; `scripts/chaos.sh` runs
//! more) and `CHAOS_SEED` the seed of the kill moments (printed, to repeat a run).

mod support;

use rand::{Rng, SeedableRng};
use std::path::{Path, PathBuf};
use std::time::Duration;
use support::broker::Broker;
use support::kafka_log::*;

fn env_u64(name: &str) -> Option<u64> {
    std::env::var(name).ok().and_then(|v| v.parse().ok())
}

const CHECKPOINTS: &str = "checkpoint_every = \"100ms\"\n";

fn engine_lines(dir: &Path) -> String {
    format!(
        "{CHECKPOINTS}checkpoint_dir = {:?}\nerasure_log = {:?}\n",
        checkpoint_dir(dir).display().to_string(),
        dir.join("erasures.jsonl").display().to_string()
    )
}

fn checkpoint_dir(dir: &Path) -> PathBuf {
    dir.join("checkpoints")
}

fn checkpoints(dir: &Path) -> Vec<PathBuf> {
    let mut files: Vec<PathBuf> = std::fs::read_dir(checkpoint_dir(dir))
        .map(|d| d.flatten().map(|e| e.path()).collect())
        .unwrap_or_default();
    files.retain(|p| p.extension().is_some_and(|e| e == "bin"));
    files.sort();
    files
}

/// Workers after the `i`th kill: a checkpoint restores with another worker count too.
fn workers(i: usize) -> usize {
    [2, 3, 1][i % 3]
}

/// SIGKILL: no shutdown code runs.
fn kill(engine: &mut support::process::Process) {
    let _ = engine.child.kill();
    let _ = engine.child.wait();
}

#[test]
fn sigkill_at_random_moments_loses_nothing_and_counts_nothing_twice() {
    let rounds = env_u64("CHAOS_ROUNDS").unwrap_or(4).max(2) as usize;
    let seed = env_u64("CHAOS_SEED").unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("chaos: {rounds} rounds, CHAOS_SEED={seed}");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);

    let dir = tempfile::tempdir().unwrap();
    let (events, catalog) = make_log(dir.path());
    let (max_ts, expected, _) = replay(dir.path(), &events, &catalog);
    let all = lines(&events);
    let mut broker = Broker::sqlite(dir.path());
    create_topics(&broker);
    produce(&broker.addr, CATALOG, &catalog);
    let mut total = lines(&catalog).len() as i64;

    let engine_config = engine_lines(dir.path());
    let mut engine = start_engine(dir.path(), &broker.addr, 2, &engine_config);
    let chunk = all.len().div_ceil(rounds + 1);
    let mut resumed = 0;
    let mut corrupted = false;
    for (i, part) in all.chunks(chunk).enumerate() {
        // At-least-once: the chunk starts with a redelivery of the previous chunk's end.
        let start = (i * chunk).saturating_sub(rng.gen_range(0..50));
        let mut sent = all[start..i * chunk].to_vec();
        sent.extend_from_slice(part);
        let log = dir.path().join(format!("chunk-{i}.jsonl"));
        write_lines(&log, &sent);
        produce(&broker.addr, EVENTS, &log);
        total += sent.len() as i64;
        if i == rounds / 2 {
            broker.kill();
            std::thread::sleep(Duration::from_millis(300));
            broker.start();
        }
        if i >= rounds {
            break;
        }
        // A random moment: before, during or after reading the chunk and checkpointing it.
        std::thread::sleep(Duration::from_millis(rng.gen_range(0..1500)));
        kill(&mut engine);
        let files = checkpoints(dir.path());
        if !corrupted && files.len() == 2 {
            // The newest checkpoint is cut short: the restart must use the one before it.
            let newest = files.last().unwrap();
            let bytes = std::fs::read(newest).unwrap();
            std::fs::write(newest, &bytes[..bytes.len() / 2]).unwrap();
            corrupted = true;
            engine = start_engine(dir.path(), &broker.addr, workers(i), &engine_config);
            engine.wait_for(60, "the fallback to the previous checkpoint", |e| {
                e.log_contains("checkpoint unusable, trying the one before it")
            });
        } else {
            engine = start_engine(dir.path(), &broker.addr, workers(i), &engine_config);
        }
        if engine.log_contains("resuming from checkpoint") {
            resumed += 1;
        }
    }
    finish_and_compare(dir.path(), &engine, &broker.addr, total, max_ts, &expected);
    assert!(
        resumed > 0,
        "no restart resumed from a checkpoint; the test exercised only full re-reads"
    );
    eprintln!("chaos: {resumed} of {rounds} restarts resumed from a checkpoint; corrupted newest: {corrupted}");
    engine.stop();
}

/// An erased user is in no checkpoint once the erasure is answered and the next checkpoint is
/// written, and stays gone after a SIGKILL and a restart from it.
#[test]
fn erasure_reaches_the_checkpoints_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, total) = broker_with_log(dir.path());
    let engine_config = engine_lines(dir.path());
    let mut engine = start_engine(dir.path(), &broker.addr, 2, &engine_config);
    read_all_and_complete(&engine, dir.path(), &broker, total);
    // A user of the golden log.
    let user = "alice";
    engine.wait_for(60, "the user's profile", |e| {
        e.get(&format!("/v1/users/{user}")).0 == 200
    });
    engine.wait_for(30, "a checkpoint naming the user", |_| {
        checkpoints(dir.path()).iter().any(|p| contains(p, user))
    });
    let written = |e: &support::process::Process| -> u64 {
        e.metrics()
            .lines()
            .find_map(|l| l.strip_prefix("persona_checkpoints_total "))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0)
    };
    let (status, body, _) = engine.call("DELETE", &format!("/v1/users/{user}"), None);
    assert_eq!(status, 200, "{body}");
    // The first checkpoint opened after the answer deletes every older one.
    engine.wait_for(30, "no checkpoint naming the erased user", |_| {
        let files = checkpoints(dir.path());
        !files.is_empty() && !files.iter().any(|f| contains(f, user))
    });
    assert!(written(&engine) > 0);

    kill(&mut engine);
    let mut engine = start_engine(dir.path(), &broker.addr, 2, &engine_config);
    assert!(engine.log_contains("resuming from checkpoint"));
    engine.wait_for(60, "readiness", |e| e.get("/readyz").0 == 200);
    assert_eq!(engine.get(&format!("/v1/users/{user}")).0, 404);
    // It resumed from the stored positions: only messages after them were read again.
    let (_, status, _) = engine.get("/v1/status");
    let read_again = status["counters"]["events_in"].as_i64().unwrap();
    assert!(
        read_again < total / 10,
        "{read_again} of {total} read again"
    );
    engine.wait_for(10, "every partition's position in the status", |e| {
        positions(e, "read_position") == total + 1
    });

    // Death between an erasure and its checkpoint: the erasure is in the log (appended before
    // the answer), and the newest checkpoint still holds the user. The restart replaces it.
    let other = "bob";
    assert!(checkpoints(dir.path()).iter().any(|p| contains(p, other)));
    kill(&mut engine);
    let record = format!(
        "{{\"user_hash\":\"{:016x}\",\"through_ms\":1800000000000,\"requested_at_ms\":1}}\n",
        xxhash_rust::xxh3::xxh3_64(other.as_bytes())
    );
    let log = dir.path().join("erasures.jsonl");
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str(&record);
    std::fs::write(&log, text).unwrap();
    let engine = start_engine(dir.path(), &broker.addr, 2, &engine_config);
    assert!(engine.log_contains("resuming from checkpoint"));
    engine.wait_for(30, "the stale checkpoint noticed", |e| {
        e.log_contains("the checkpoint holds events of an erased user")
    });
    engine.wait_for(30, "no checkpoint naming the other user", |_| {
        let files = checkpoints(dir.path());
        !files.is_empty() && !files.iter().any(|f| contains(f, other))
    });
    engine.wait_for(60, "readiness", |e| e.get("/readyz").0 == 200);
    assert_eq!(engine.get(&format!("/v1/users/{other}")).0, 404);
}

/// An in-memory broker holding the test log; returns it and its number of messages.
fn broker_with_log(dir: &Path) -> (Broker, i64) {
    let (events, catalog) = make_log(dir);
    let broker = Broker::memory();
    create_topics(&broker);
    produce(&broker.addr, CATALOG, &catalog);
    produce(&broker.addr, EVENTS, &events);
    let total = (lines(&events).len() + lines(&catalog).len()) as i64;
    (broker, total)
}

/// Waits until the engine has read all `total` messages, then sends an event with a later ts:
/// under the event clock the newest time completes only once a later ts arrives.
fn read_all_and_complete(
    engine: &support::process::Process,
    dir: &Path,
    broker: &Broker,
    total: i64,
) {
    engine.wait_for(60, "every message read", |e| {
        positions(e, "read_position") == total
    });
    let last = dir.join("last.jsonl");
    write_lines(
        &last,
        &[
            r#"{"event_id":"zz-last","user_id":"zz-last","type":"page_view","ts":1800000000000}"#
                .to_string(),
        ],
    );
    produce(&broker.addr, EVENTS, &last);
}

fn contains(path: &Path, needle: &str) -> bool {
    std::fs::read(path)
        .map(|b| b.windows(needle.len()).any(|w| w == needle.as_bytes()))
        .unwrap_or(false)
}

/// A graceful stop (SIGTERM) writes one last checkpoint, however far off the next periodic one
/// is, and the restart resumes from it instead of reading the topics again.
#[test]
fn a_graceful_stop_takes_a_last_checkpoint() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, total) = broker_with_log(dir.path());
    let engine_config = format!(
        "checkpoint_every = \"1h\"\ncheckpoint_dir = {:?}\n",
        checkpoint_dir(dir.path()).display().to_string()
    );
    let mut engine = start_engine(dir.path(), &broker.addr, 2, &engine_config);
    read_all_and_complete(&engine, dir.path(), &broker, total);
    engine.wait_for(60, "every message reflected in the state", |e| {
        positions(e, "position") >= total
    });
    assert!(checkpoints(dir.path()).is_empty(), "none due for an hour");
    let users = ["alice", "bob"];
    let before: Vec<_> = users
        .iter()
        .map(|u| engine.get(&format!("/v1/users/{u}")))
        .collect();
    assert!(before.iter().all(|b| b.0 == 200));
    engine.stop();
    assert_eq!(checkpoints(dir.path()).len(), 1, "{}", engine.log_tail(20));

    let engine = start_engine(dir.path(), &broker.addr, 2, &engine_config);
    assert!(engine.log_contains("resuming from checkpoint"));
    engine.wait_for(60, "readiness", |e| e.get("/readyz").0 == 200);
    engine.wait_for(30, "every partition's position in the status", |e| {
        positions(e, "read_position") == total + 1
    });
    let (_, status, _) = engine.get("/v1/status");
    let read_again = status["counters"]["events_in"].as_i64().unwrap();
    assert!(read_again <= 1, "{read_again} of {total} read again");
    // The restored state is readable at once, at the same as_of, and the same.
    for (u, b) in users.iter().zip(&before) {
        assert_eq!(engine.get(&format!("/v1/users/{u}")).1, b.1, "{u}");
    }
}
