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
    let dir = tempfile::tempdir().unwrap();
    let log = make_log(dir.path());
    let (mut engine, _broker, _) = chaos(dir.path(), log, "", 4, false);
    engine.stop();
}

const DAY: u64 = 86_400_000;

/// The same with `retention = 8d` over a log of 12 days: the checkpoints then also hold what
/// sealing folded away (the gate's sealed counts, the basics' sealed parts). Sealing never
/// changes a profile while nothing is too late, so the profiles must equal the replay's
/// without a retention. An erasure of a user whose first days are sealed then survives a
/// restart too.
#[test]
fn with_a_retention_sigkill_loses_nothing_either() {
    let dir = tempfile::tempdir().unwrap();
    // Ends with the golden log's week, whose events come last in the file. Each restarted
    // engine catches up before the next chunk (12 days / 7) is produced, so it reads at most
    // two at once, far less than the retention: nothing is too late (a batch spanning more is
    // cut as a file's is; `tests/kafka.rs` checks that).
    let log = make_log_spanning(dir.path(), "12d", 1_700_604_800_000 - 12 * DAY);
    let retention = "retention = \"8d\"\n";
    let (mut engine, broker, expected) = chaos(dir.path(), log, retention, 6, true);
    let newest = checkpoints(dir.path()).pop().expect("a checkpoint");
    let c = persona::checkpoint::decode(&std::fs::read(&newest).unwrap()).unwrap();
    assert!(
        !c.sealed.is_empty() && !c.basics.is_empty(),
        "the newest checkpoint holds nothing sealed: {} sealed records, {} sealed basics",
        c.sealed.len(),
        c.basics.len()
    );

    // A user of the generated log: their first days are sealed by now.
    let user = expected
        .iter()
        .filter(|(u, _)| u.starts_with('u'))
        .min_by_key(|(_, p)| p["first_seen_ms"].as_u64())
        .map(|(u, _)| u.clone())
        .unwrap();
    let (status, body, _) = engine.call("DELETE", &format!("/v1/users/{user}"), None);
    assert_eq!(status, 200, "{body}");
    // Generated ids are prefixes of one another ("u1", "u12"): look for the exact string.
    let names = |f: &PathBuf| {
        std::fs::read(f)
            .ok()
            .and_then(|b| persona::checkpoint::decode(&b).ok())
            .is_none_or(|c| c.names.iter().any(|(_, s)| *s == user))
    };
    engine.wait_for(30, "no checkpoint naming the erased user", |_| {
        let files = checkpoints(dir.path());
        !files.is_empty() && !files.iter().any(names)
    });
    assert_eq!(engine.get(&format!("/v1/users/{user}")).0, 404);
    kill(&mut engine);
    let mut engine = start_engine(
        dir.path(),
        &broker.addr,
        2,
        &(engine_lines(dir.path()) + retention),
    );
    assert!(engine.log_contains("resuming from checkpoint"));
    engine.wait_for(60, "readiness", |e| e.get("/readyz").0 == 200);
    assert_eq!(engine.get(&format!("/v1/users/{user}")).0, 404);

    // Death between an erasure and its checkpoint: the newest checkpoint still holds the next
    // user's sealed part, which the restart must leave out, not only replace.
    let other = expected
        .iter()
        .filter(|(u, _)| u.starts_with('u') && **u != user)
        .min_by_key(|(_, p)| p["first_seen_ms"].as_u64())
        .map(|(u, _)| u.clone())
        .unwrap();
    assert_eq!(engine.get(&format!("/v1/users/{other}")).0, 200);
    let sealed_user = xxhash_rust::xxh3::xxh3_64(other.as_bytes());
    let newest = checkpoints(dir.path()).pop().expect("a checkpoint");
    let c = persona::checkpoint::decode(&std::fs::read(&newest).unwrap()).unwrap();
    assert!(
        c.basics.iter().any(|b| b.user == sealed_user),
        "{other} has no sealed part to erase"
    );
    kill(&mut engine);
    let log = dir.path().join("erasures.jsonl");
    let mut text = std::fs::read_to_string(&log).unwrap();
    text.push_str(&format!(
        "{{\"user_hash\":\"{sealed_user:016x}\",\"through_ms\":1800000000000,\"requested_at_ms\":1}}\n"
    ));
    std::fs::write(&log, text).unwrap();
    let mut engine = start_engine(
        dir.path(),
        &broker.addr,
        2,
        &(engine_lines(dir.path()) + retention),
    );
    assert!(engine.log_contains("the checkpoint holds events of an erased user"));
    engine.wait_for(60, "readiness", |e| e.get("/readyz").0 == 200);
    assert_eq!(engine.get(&format!("/v1/users/{other}")).0, 404);
    engine.wait_for(
        30,
        "a replacement checkpoint without the user's sealed part",
        |_| {
            checkpoints(dir.path()).last().is_some_and(|f| {
                std::fs::read(f)
                    .ok()
                    .and_then(|b| persona::checkpoint::decode(&b).ok())
                    .is_some_and(|c| !c.basics.iter().any(|b| b.user == sealed_user))
            })
        },
    );
    // And it stays gone from there on.
    kill(&mut engine);
    let mut engine = start_engine(
        dir.path(),
        &broker.addr,
        2,
        &(engine_lines(dir.path()) + retention),
    );
    engine.wait_for(60, "readiness", |e| e.get("/readyz").0 == 200);
    assert_eq!(engine.get(&format!("/v1/users/{other}")).0, 404);
    assert!(!engine.log_contains("the checkpoint holds events of an erased user"));
    engine.stop();
}

/// Produces the log to Kafka in chunks while killing and restarting the engine (`engine_extra`:
/// more `[engine]` lines) `CHAOS_ROUNDS` times (else `default_rounds`), then compares every
/// profile with the replay's; returns the engine, still running, its broker and the replay's
/// profiles. `paced`: each restarted engine reads what was produced before the next chunk.
fn chaos(
    dir: &Path,
    (events, catalog): (PathBuf, PathBuf),
    engine_extra: &str,
    default_rounds: u64,
    paced: bool,
) -> (
    support::process::Process,
    Broker,
    std::collections::BTreeMap<String, serde_json::Value>,
) {
    let rounds = env_u64("CHAOS_ROUNDS").unwrap_or(default_rounds).max(2) as usize;
    let seed = env_u64("CHAOS_SEED").unwrap_or_else(|| rand::thread_rng().gen());
    eprintln!("chaos: {rounds} rounds, CHAOS_SEED={seed}");
    let mut rng = rand::rngs::SmallRng::seed_from_u64(seed);

    let (max_ts, expected, _) = replay(dir, &events, &catalog);
    let all = lines(&events);
    let mut broker = Broker::sqlite(dir);
    create_topics(&broker);
    produce(&broker.addr, CATALOG, &catalog);
    let mut total = lines(&catalog).len() as i64;

    let engine_config = engine_lines(dir) + engine_extra;
    let mut engine = start_engine(dir, &broker.addr, 2, &engine_config);
    let chunk = all.len().div_ceil(rounds + 1);
    let mut resumed = 0;
    let mut corrupted = false;
    for (i, part) in all.chunks(chunk).enumerate() {
        // At-least-once: the chunk starts with a redelivery of the previous chunk's end.
        let start = (i * chunk).saturating_sub(rng.gen_range(0..50));
        let mut sent = all[start..i * chunk].to_vec();
        sent.extend_from_slice(part);
        let log = dir.join(format!("chunk-{i}.jsonl"));
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
        let files = checkpoints(dir);
        if !corrupted && files.len() == 2 {
            // The newest checkpoint is cut short: the restart must use the one before it.
            let newest = files.last().unwrap();
            let bytes = std::fs::read(newest).unwrap();
            std::fs::write(newest, &bytes[..bytes.len() / 2]).unwrap();
            corrupted = true;
            engine = start_engine(dir, &broker.addr, workers(i), &engine_config);
            engine.wait_for(60, "the fallback to the previous checkpoint", |e| {
                e.log_contains("checkpoint unusable, trying the one before it")
            });
        } else {
            engine = start_engine(dir, &broker.addr, workers(i), &engine_config);
        }
        if engine.log_contains("resuming from checkpoint") {
            resumed += 1;
        }
        if paced {
            engine.wait_for(60, "the restarted engine to read what was produced", |e| {
                positions(e, "read_position") == total
            });
        }
    }
    finish_and_compare(dir, &engine, total, (&events, &catalog), max_ts, &expected);
    assert!(
        resumed > 0,
        "no restart resumed from a checkpoint; the test exercised only full re-reads"
    );
    eprintln!("chaos: {resumed} of {rounds} restarts resumed from a checkpoint; corrupted newest: {corrupted}");
    (engine, broker, expected)
}

/// An erased user is in no checkpoint once the erasure is answered and the next checkpoint is
/// written, and stays gone after a SIGKILL and a restart from it.
#[test]
fn erasure_reaches_the_checkpoints_and_survives_a_restart() {
    let dir = tempfile::tempdir().unwrap();
    let (broker, total) = broker_with_log(dir.path());
    let engine_config = engine_lines(dir.path());
    let mut engine = start_engine(dir.path(), &broker.addr, 2, &engine_config);
    read_all(&engine, total);
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
        positions(e, "read_position") == total
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

/// A broker holding the test log; returns it and its number of messages. SQLite storage: the
/// in-memory one answers a fetch from inside a record batch with a later batch or nothing.
fn broker_with_log(dir: &Path) -> (Broker, i64) {
    let (events, catalog) = make_log(dir);
    let broker = Broker::sqlite(dir);
    create_topics(&broker);
    produce(&broker.addr, CATALOG, &catalog);
    produce(&broker.addr, EVENTS, &events);
    let total = (lines(&events).len() + lines(&catalog).len()) as i64;
    (broker, total)
}

/// Waits until the engine has read all `total` messages and its state reflects them: once a
/// worker has read everything, the event clock moves past its newest records.
fn read_all(engine: &support::process::Process, total: i64) {
    engine.wait_for(60, "every message read", |e| {
        positions(e, "read_position") == total
    });
    engine.wait_for(60, "every message reflected in the state", |e| {
        positions(e, "position") >= total
    });
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
    read_all(&engine, total);
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
        positions(e, "read_position") == total
    });
    let (_, status, _) = engine.get("/v1/status");
    let read_again = status["counters"]["events_in"].as_i64().unwrap();
    assert_eq!(read_again, 0, "{read_again} of {total} read again");
    // The restored state is readable at once, at the same as_of, and the same.
    for (u, b) in users.iter().zip(&before) {
        assert_eq!(engine.get(&format!("/v1/users/{u}")).1, b.1, "{u}");
    }
}
