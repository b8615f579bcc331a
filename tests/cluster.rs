//! A cluster of 2 processes × 2 workers (timely's cluster mode on loopback) reading a Kafka
//! topic from a real broker gives exactly the profiles of 1 process × 1 worker, and the
//! replay's; queries through either process return the same answer for every user, from the
//! owner named in the headers; when a process dies the other stops with a clear message; a
//! restart of the whole cluster reads the topic again to the same profiles.
//!
//! Comparing at one time works as in tests/kafka.rs: event clock, no allowed lateness, reads at
//! the time the state is complete at once every message is read (`max_ts`, or the replay is
//! taken at that later time too).

mod support;

use percent_encoding::{utf8_percent_encode, NON_ALPHANUMERIC};
use serde_json::Value;
use std::collections::BTreeMap;
use std::path::Path;
use std::time::{Duration, Instant};
use support::broker::{free_port, Broker};
use support::kafka_log::*;
use support::process::{spawn_listening, Process};

const PROCESSES: usize = 2;
const THREADS: usize = 2;

/// A run config on the broker's topics; with a `[cluster]` section when `cluster` is given.
fn config(dir: &Path, name: &str, brokers: &str, workers: usize, cluster: &str) -> String {
    let path = dir.join(format!("{name}.toml"));
    std::fs::write(
        &path,
        format!(
            "{ENGINE}workers = {workers}\nerasure_log = {:?}\n\n[source]\nkind = \"kafka\"\ndead_letter_path = {:?}\n\n[triggers]\npath = {:?}\n\n[kafka]\nbrokers = {brokers:?}\nevents_topic = {EVENTS:?}\ncatalog_topic = {CATALOG:?}\ndead_letter_topic = {DEAD:?}\n\n[http]\nlisten = \"127.0.0.1:0\"\n{cluster}",
            dir.join(format!("{name}-erasures.jsonl")).display().to_string(),
            dir.join(format!("{name}-dead.jsonl")).display().to_string(),
            dir.join(format!("{name}-triggers.jsonl")).display().to_string(),
        ),
    )
    .unwrap();
    path.display().to_string()
}

struct Cluster {
    config: String,
    processes: Vec<Process>,
}

impl Cluster {
    fn layout() -> String {
        let list = |ports: Vec<u16>| {
            ports
                .iter()
                .map(|p| format!("\"127.0.0.1:{p}\""))
                .collect::<Vec<_>>()
                .join(", ")
        };
        format!(
            "\n[cluster]\naddresses = [{}]\nhttp = [{}]\nworkers = [{}]\n",
            list((0..PROCESSES).map(|_| free_port()).collect()),
            list((0..PROCESSES).map(|_| free_port()).collect()),
            vec![THREADS.to_string(); PROCESSES].join(", ")
        )
    }

    fn start(config: String) -> Cluster {
        let processes = (0..PROCESSES)
            .map(|p| {
                let mut cmd = persona();
                cmd.args(["run", "--config", &config, "--process", &p.to_string()]);
                spawn_listening(cmd)
            })
            .collect();
        Cluster { config, processes }
    }

    fn restart(&mut self) {
        self.processes.clear();
        *self = Cluster::start(self.config.clone());
    }

    /// SIGTERM to every process first (one that stops alone is a lost peer to the others),
    /// then waits for all.
    fn stop(&mut self) {
        for p in &self.processes {
            let _ = std::process::Command::new("kill")
                .args(["-TERM", &p.child.id().to_string()])
                .status();
        }
        for p in &mut self.processes {
            let deadline = Instant::now() + Duration::from_secs(20);
            while p.alive() {
                assert!(Instant::now() < deadline, "a cluster process did not stop");
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }
}

/// Every user's profile at `max_ts` through `engine`, with the worker and process that answered.
fn profiles_at(
    engine: &Process,
    users: &[String],
    max_ts: u64,
) -> (Vec<Value>, BTreeMap<String, (String, String)>) {
    let mut profiles = Vec::new();
    let mut owners = BTreeMap::new();
    for user in users {
        let path = format!(
            "/v1/users/{}?min_as_of_ms={max_ts}&timeout_ms=20000",
            utf8_percent_encode(user, NON_ALPHANUMERIC)
        );
        let response = match ureq::get(&format!("{}{path}", engine.base))
            .timeout(Duration::from_secs(40))
            .call()
        {
            Ok(r) => r,
            Err(ureq::Error::Status(status, r)) => panic!(
                "GET {path} from {}: {status} from process {:?} worker {:?}: {}",
                engine.base,
                r.header("x-persona-process").map(str::to_string),
                r.header("x-persona-worker").map(str::to_string),
                r.into_string().unwrap_or_default()
            ),
            Err(e) => panic!("GET {path} from {}: {e}", engine.base),
        };
        let header = |h: &str| response.header(h).unwrap_or("").to_string();
        owners.insert(
            user.clone(),
            (header("x-persona-process"), header("x-persona-worker")),
        );
        let p: Value = serde_json::from_str(&response.into_string().unwrap()).unwrap();
        assert_eq!(p["as_of_ms"].as_u64(), Some(max_ts), "{user}: {p}");
        profiles.push(p);
    }
    (profiles, owners)
}

/// Waits until each engine (its processes together) has read the `total` messages of the log
/// and its state reflects them; returns the time each engine's state is complete at, once
/// every process of the engine has reached it. Once a worker has read everything, the event
/// clock moves past its newest records: that time is `max_ts`, or a little later when a
/// worker's last messages went in after another's had moved the clock past it (see
/// `kafka_log::finish_and_compare`).
fn caught_up(engines: &[&[&Process]], total: i64, max_ts: u64) -> Vec<u64> {
    let mut times = Vec::new();
    for engine in engines {
        for e in engine.iter() {
            e.wait_for(120, "readiness", |e| e.get("/readyz").0 == 200);
        }
        // Each process reports the partitions its own workers read.
        let sum = |field: &str| -> i64 { engine.iter().map(|e| positions(e, field)).sum() };
        let deadline = Instant::now() + Duration::from_secs(120);
        while sum("read_position") < total || sum("position") < total {
            assert!(
                Instant::now() < deadline,
                "messages not all read and reflected"
            );
            std::thread::sleep(Duration::from_millis(50));
        }
        let as_of = |e: &Process| e.get("/v1/status").1["as_of_ms"].as_u64().unwrap_or(0);
        let at = engine.iter().map(|e| as_of(e)).max().unwrap_or(0);
        assert!(at >= max_ts, "complete at {at}, before {max_ts}");
        for e in engine.iter() {
            e.wait_for(60, "every process at the same time", |e| as_of(e) >= at);
        }
        times.push(at);
    }
    times
}

/// A one-event log of user `zz-last` at `ts`, which moves the event clock there.
fn clock_event(dir: &Path, id: &str, ts: u64) -> std::path::PathBuf {
    let path = dir.join(format!("{id}.jsonl"));
    let event =
        serde_json::json!({"event_id": id, "user_id": "zz-last", "type": "page_view", "ts": ts});
    std::fs::write(&path, format!("{event}\n")).unwrap();
    path
}

#[test]
fn two_processes_of_two_workers_match_one_process() {
    let dir = tempfile::tempdir().unwrap();
    let (events, catalog) = make_log(dir.path());
    let (max_ts, expected, _) = replay(dir.path(), &events, &catalog);
    let users: Vec<String> = expected.keys().cloned().collect();
    let broker = Broker::memory();
    create_topics(&broker);
    produce(&broker.addr, CATALOG, &catalog);
    produce(&broker.addr, EVENTS, &events);
    let total = (lines(&events).len() + lines(&catalog).len()) as i64;

    let mut single = spawn_listening({
        let mut cmd = persona();
        cmd.args([
            "run",
            "--config",
            &config(dir.path(), "single", &broker.addr, 1, ""),
        ]);
        cmd
    });
    let mut cluster = Cluster::start(config(
        dir.path(),
        "cluster",
        &broker.addr,
        THREADS,
        &Cluster::layout(),
    ));
    let times = caught_up(
        &[&[&single], &[&cluster.processes[0], &cluster.processes[1]]],
        total,
        max_ts,
    );
    let (at_single, at) = (times[0], times[1]);
    // The replay's profiles with its clock ending at `at`.
    let expected_at = |at: u64| -> Vec<Value> {
        let profiles = if at == max_ts {
            expected.clone()
        } else {
            replay_until(dir.path(), (&events, &catalog), at)
        };
        profiles.into_values().collect()
    };

    // The replay's profiles from the single process, and from either process of the cluster.
    let (one, _) = profiles_at(&single, &users, at_single);
    let (via0, owners0) = profiles_at(&cluster.processes[0], &users, at);
    let (via1, owners1) = profiles_at(&cluster.processes[1], &users, at);
    support::assert_profiles_eq(&one, &expected_at(at_single), "1x1 vs replay");
    support::assert_profiles_eq(&via0, &expected_at(at), "2x2 through process 0 vs replay");
    assert_eq!(via0, via1, "process 0 and process 1 answer alike");
    // Each answer names its owner, the same whichever process was asked, and every worker of
    // the cluster owns some users.
    assert_eq!(owners0, owners1);
    let workers: std::collections::BTreeSet<_> = owners0.values().cloned().collect();
    assert_eq!(workers.len(), PROCESSES * THREADS, "{workers:?}");
    for (process, worker) in owners0.values() {
        let (p, w): (usize, usize) = (process.parse().unwrap(), worker.parse().unwrap());
        assert_eq!(w / THREADS, p, "worker {w} runs in process {p}");
    }

    // Recommendations and similar items are answered by one owner, whichever process is asked.
    for user in users.iter().take(20) {
        let path = format!(
            "/v1/users/{}/recommendations?limit=5",
            utf8_percent_encode(user, NON_ALPHANUMERIC)
        );
        let (s0, r0, _) = cluster.processes[0].get(&path);
        let (s1, r1, _) = cluster.processes[1].get(&path);
        assert_eq!((s0, s1), (200, 200), "{r0} {r1}");
        assert_eq!(r0["items"], r1["items"], "{user}");
        for item in r0["items"].as_array().unwrap() {
            let id = item["item_id"].as_str().unwrap();
            assert!(!id.starts_with('#'), "item named by its hash: {item}");
            let similar = format!(
                "/v1/items/{}/similar?limit=3",
                utf8_percent_encode(id, NON_ALPHANUMERIC)
            );
            let (a, b) = (
                cluster.processes[0].get(&similar),
                cluster.processes[1].get(&similar),
            );
            assert_eq!((a.0, &a.1["items"]), (b.0, &b.1["items"]), "{id}");
        }
    }

    // /v1/status lists every process, each with its workers; together they read every
    // partition, each from the worker that `partition % workers` names.
    let (_, status, _) = cluster.processes[1].get("/v1/status");
    let rows = status["processes"].as_array().unwrap();
    assert_eq!(rows.len(), PROCESSES, "{status}");
    for (i, row) in rows.iter().enumerate() {
        assert_eq!(row["process"], i, "{status}");
        assert_eq!(row["reachable"], true, "{status}");
        assert_eq!(row["workers"], THREADS, "{status}");
    }
    assert_eq!(status["cluster_workers"], PROCESSES * THREADS);
    let mut partitions = Vec::new();
    for e in &cluster.processes {
        let (_, s, _) = e.get("/v1/status");
        for p in s["sources"].as_array().unwrap() {
            if p["topic"] == EVENTS {
                let (part, worker) = (
                    p["partition"].as_u64().unwrap(),
                    p["worker"].as_u64().unwrap(),
                );
                assert_eq!(worker, part % (PROCESSES * THREADS) as u64, "{p}");
                assert_eq!(
                    worker as usize / THREADS,
                    s["process"].as_u64().unwrap() as usize
                );
                partitions.push(part);
            }
        }
    }
    partitions.sort();
    assert_eq!(partitions, (0..PARTITIONS as u64).collect::<Vec<_>>());

    // A process dies: the other stops by itself, saying why.
    let _ = cluster.processes[1].child.kill();
    let survivor = &mut cluster.processes[0];
    let deadline = Instant::now() + Duration::from_secs(30);
    let status = loop {
        if let Some(status) = survivor.child.try_wait().unwrap() {
            break status;
        }
        assert!(
            Instant::now() < deadline,
            "process 0 kept running without process 1"
        );
        std::thread::sleep(Duration::from_millis(50));
    };
    assert!(!status.success(), "losing a peer is an error exit");
    std::thread::sleep(Duration::from_millis(200));
    assert!(
        survivor.log_contains("lost the connection to another process")
            || survivor.log_contains("stopped answering"),
        "{}",
        survivor.log_tail(20)
    );

    // The whole cluster restarted reads the topic again, to the replay's profiles.
    cluster.restart();
    let at = caught_up(
        &[&[&cluster.processes[0], &cluster.processes[1]]],
        total,
        max_ts,
    )[0];
    let (again, _) = profiles_at(&cluster.processes[1], &users, at);
    support::assert_profiles_eq(&again, &expected_at(at), "restarted 2x2 vs replay");

    // Erasure through the process that does not own the user (forwarded to the owner), and
    // as a control record on the topic, which the single process honours too.
    let (_, owners) = profiles_at(&cluster.processes[0], &users, at);
    let remote = users.iter().find(|u| owners[*u].0 == "1").unwrap();
    let on_topic = users.iter().find(|u| *u != remote).unwrap();
    let encoded = |u: &str| utf8_percent_encode(u, NON_ALPHANUMERIC).to_string();
    let (status, body, _) =
        cluster.processes[0].call("DELETE", &format!("/v1/users/{}", encoded(remote)), None);
    assert_eq!(status, 200, "{body}");
    let control = dir.path().join("erasure.jsonl");
    let record = serde_json::json!({"event_id": "erase-1", "user_id": on_topic, "type": "erasure", "ts": max_ts + 3});
    std::fs::write(&control, format!("{record}\n")).unwrap();
    produce(&broker.addr, EVENTS, &control);
    produce(
        &broker.addr,
        EVENTS,
        &clock_event(dir.path(), "zz-after", max_ts + 4),
    );
    for engine in [&single, &cluster.processes[0], &cluster.processes[1]] {
        for user in [on_topic, remote] {
            if engine.base == single.base && user == remote {
                continue; // erased in the cluster only
            }
            let path = format!(
                "/v1/users/{}?min_as_of_ms={}&timeout_ms=20000",
                encoded(user),
                max_ts + 3
            );
            let (status, body, _) = engine.get(&path);
            assert_eq!(status, 404, "{user} is erased: {body}");
        }
    }
    assert!(
        std::fs::read_to_string(dir.path().join("cluster-erasures.p1.jsonl"))
            .unwrap()
            .contains(&format!(
                "{:016x}",
                xxhash_rust::xxh3::xxh3_64(remote.as_bytes())
            )),
        "the owner recorded it"
    );
    cluster.stop();
    single.stop();
}
