//! `persona run` as a user runs it: the real binary, a config file, a followed log, HTTP over
//! real sockets. Checks the API's answers, errors, read-your-writes and live following.

use serde_json::Value;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

mod support;

use support::process::{complete_lines, spawn_listening, Process};

/// `persona run` on a followed log in a temporary directory.
struct Engine {
    process: Process,
    _dir: Option<tempfile::TempDir>,
    events: PathBuf,
    dead: PathBuf,
}

impl std::ops::Deref for Engine {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl Engine {
    fn start(initial: &[String]) -> Engine {
        Engine::start_with(initial, &[])
    }

    /// With extra environment variables for `persona run`.
    fn start_with(initial: &[String], env: &[(&str, &str)]) -> Engine {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("events.jsonl");
        let catalog = dir.path().join("catalog.jsonl");
        let dead = dir.path().join("dead.jsonl");
        std::fs::write(
            &events,
            initial.iter().map(|l| format!("{l}\n")).collect::<String>(),
        )
        .unwrap();
        std::fs::write(&catalog, "{\"item_id\":\"i1\",\"category\":\"shoes\"}\n").unwrap();
        let config = dir.path().join("persona.toml");
        std::fs::write(
            &config,
            format!(
                "[engine]\nworkers = 2\ntick = \"20ms\"\nerasure_log = {:?}\n\n[source]\npath = {:?}\ncatalog_path = {:?}\nfollow = true\ndead_letter_path = {:?}\n\n[triggers]\npath = {:?}\n\n[http]\nlisten = \"127.0.0.1:0\"\n\n[recommendations]\nrefresh = \"100ms\"\n\n[recommendations.experiment]\nitem_item = 1\npopular = 1\n",
                dir.path().join("erasures.jsonl").display().to_string(),
                events.display().to_string(),
                catalog.display().to_string(),
                dead.display().to_string(),
                dir.path().join("triggers.jsonl").display().to_string()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_persona"));
        cmd.args(["run", "--config"]).arg(&config);
        cmd.envs(env.iter().copied());
        let engine = Engine {
            process: spawn_listening(cmd),
            _dir: Some(dir),
            events,
            dead,
        };
        engine.wait_for(30, "readiness", |e| e.get("/readyz").0 == 200);
        engine
    }

    fn append(&self, lines: &[String]) {
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.events)
            .unwrap();
        for l in lines {
            writeln!(f, "{l}").unwrap();
        }
    }
}

fn event(id: &str, user: &str, kind: &str, ts: u64, item: Option<&str>) -> String {
    let mut v = serde_json::json!({"event_id": id, "user_id": user, "type": kind, "ts": ts, "device": {"type": "mobile"}});
    if let Some(i) = item {
        v["item_id"] = i.into();
    }
    v.to_string()
}

/// The name of every thread of process `pid` with what `read` finds in its `/proc` directory,
/// sorted; threads where it finds nothing are left out.
#[cfg(target_os = "linux")]
fn threads_of<T: Ord>(pid: u32, read: impl Fn(&std::path::Path) -> Option<T>) -> Vec<(String, T)> {
    let mut found = Vec::new();
    for task in std::fs::read_dir(format!("/proc/{pid}/task"))
        .unwrap()
        .flatten()
    {
        let name = std::fs::read_to_string(task.path().join("comm")).unwrap_or_default();
        if let Some(v) = read(&task.path()) {
            found.push((name.trim().to_string(), v));
        }
    }
    found.sort();
    found
}

/// The values of the threads whose name starts with `prefix`.
#[cfg(target_os = "linux")]
fn named<T: Clone>(threads: &[(String, T)], prefix: &str) -> Vec<T> {
    threads
        .iter()
        .filter(|(name, _)| name.starts_with(prefix))
        .map(|(_, v)| v.clone())
        .collect()
}

/// The name and nice value of every thread of process `pid`.
#[cfg(target_os = "linux")]
fn threads_nice(pid: u32) -> Vec<(String, i64)> {
    threads_of(pid, |task| {
        let stat = std::fs::read_to_string(task.join("stat")).ok()?;
        // After the parenthesised name: state is field 3, nice is field 19.
        let (_, rest) = stat.rsplit_once(") ")?;
        rest.split(' ').nth(16)?.parse().ok()
    })
}

#[cfg(target_os = "linux")]
#[test]
fn worker_nice_lowers_the_workers_and_not_the_http_threads() {
    let t = now_ms() - 60_000;
    let engine = Engine::start_with(
        &[event("e1", "u1", "page_view", t, None)],
        &[("PERSONA_ENGINE_WORKER_NICE", "7")],
    );
    engine.wait_for(30, "u1", |e| e.get("/v1/users/u1").0 == 200);
    let threads = threads_nice(engine.child.id());
    let nice_of = |prefix: &str| named(&threads, prefix);
    assert_eq!(nice_of("timely:work"), vec![7, 7], "{threads:?}");
    let http = nice_of("http");
    assert!(!http.is_empty(), "{threads:?}");
    assert!(http.iter().all(|&n| n == 0), "{threads:?}");
}

/// The name and allowed CPU list (`0-1` style) of every thread of process `pid`.
#[cfg(target_os = "linux")]
fn threads_cpus(pid: u32) -> Vec<(String, String)> {
    threads_of(pid, |task| {
        let status = std::fs::read_to_string(task.join("status")).ok()?;
        status
            .lines()
            .find_map(|l| l.strip_prefix("Cpus_allowed_list:"))
            .map(|c| c.trim().to_string())
    })
}

#[cfg(target_os = "linux")]
#[test]
fn cpu_lists_pin_the_workers_and_the_http_threads_apart() {
    // The first and the last CPU this test may use (the same one on a single-CPU machine).
    let allowed = persona::affinity::allowed().unwrap();
    let (first, last) = (allowed[0], allowed[allowed.len() - 1]);
    let t = now_ms() - 60_000;
    let engine = Engine::start_with(
        &[event("e1", "u1", "page_view", t, None)],
        &[
            ("PERSONA_ENGINE_WORKER_CPUS", &format!("[{first}]")),
            ("PERSONA_HTTP_CPUS", &format!("[{last}]")),
        ],
    );
    engine.wait_for(30, "u1", |e| e.get("/v1/users/u1").0 == 200);
    let threads = threads_cpus(engine.child.id());
    let cpus_of = |prefix: &str| named(&threads, prefix);
    assert_eq!(
        cpus_of("timely:work"),
        vec![first.to_string(); 2],
        "{threads:?}"
    );
    // The driving "http" thread and the runtime's "http-worker" threads.
    let http = cpus_of("http");
    assert!(http.len() >= 2, "{threads:?}");
    assert!(http.iter().all(|c| *c == last.to_string()), "{threads:?}");
}

#[test]
fn run_serves_profiles_follows_the_log_and_reports_errors() {
    let t = now_ms() - 60_000;
    let mut engine = Engine::start(&[
        event("e1", "u1", "page_view", t, None),
        event("e2", "u1", "product_view", t + 1_000, Some("i1")),
        event("e2", "u1", "product_view", t + 1_000, Some("i1")),
        event("e3", "u 2/ü", "purchase", t + 2_000, Some("i1")),
    ]);

    // A profile: every SPEC §4 field, the answering worker, and a consistent as_of.
    let (status, p, worker) = engine.get("/v1/users/u1");
    assert_eq!(status, 200, "{p}");
    assert!(worker.is_some());
    assert_eq!(p["user_id"], "u1");
    assert_eq!(p["event_count"], 2, "the redelivered e2 counts once");
    assert_eq!(p["counts"]["product_view"], 1);
    assert_eq!(
        p["windows"]["1h"]["page_view"], 1,
        "live clock: events a minute old are in the 1h window"
    );
    assert_eq!(p["top_categories"][0]["category"], "shoes");
    assert_eq!(p["engagement_score"].as_f64(), Some(3.0));
    for field in [
        "as_of_ms",
        "first_seen_ms",
        "last_seen_ms",
        "distinct_items",
        "recent_items",
        "total_spend",
        "devices",
        "last_device",
        "sessions",
        "segments",
    ] {
        assert!(p.get(field).is_some(), "missing {field}: {p}");
    }
    assert!(p["as_of_ms"].as_u64().unwrap() >= t + 1_000);

    // Ids are percent-decoded from the path.
    let (status, p, _) = engine.get("/v1/users/u%202%2F%C3%BC");
    assert_eq!((status, p["user_id"].as_str()), (200, Some("u 2/ü")), "{p}");

    // Errors are JSON with a code and a fitting status.
    let (status, e, _) = engine.get("/v1/users/nobody");
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (404, Some("user_not_found")),
        "{e}"
    );
    let (status, e, _) = engine.get("/v1/users/u1?min_as_of_ms=soon");
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{e}"
    );
    let (status, e, _) = engine.get(&format!(
        "/v1/users/u1?min_as_of_ms={}&timeout_ms=100",
        now_ms() + 3_600_000
    ));
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (504, Some("timeout")),
        "{e}"
    );
    let (status, e, _) = engine.get("/v1/nothing");
    assert_eq!(
        (status, e["error"]["code"].as_str()),
        (404, Some("not_found")),
        "{e}"
    );
    let post = ureq::post(&format!("{}/v1/users/u1", engine.base)).call();
    assert!(matches!(post, Err(ureq::Error::Status(405, _))));

    // Appended lines show up; min_as_of_ms waits for the clock (read-your-writes).
    let appended_at = now_ms();
    engine.append(&[
        event("e4", "u1", "add_to_cart", appended_at, Some("i9")),
        event("e5", "u9", "click", appended_at, None),
        "{not json".to_string(),
    ]);
    let (status, p, _) = engine.get(&format!(
        "/v1/users/u9?min_as_of_ms={appended_at}&timeout_ms=10000"
    ));
    if status == 404 {
        // The clock passed appended_at before the line was read: poll like a client would.
        engine.wait_for(30, "the appended user", |e| e.get("/v1/users/u9").0 == 200);
    } else {
        assert_eq!(status, 200, "{p}");
        assert!(p["as_of_ms"].as_u64().unwrap() >= appended_at);
    }
    engine.wait_for(30, "the appended event of u1", |e| {
        e.get("/v1/users/u1").1["event_count"] == 3
    });
    let (_, p, _) = engine.get("/v1/users/u1");
    assert_eq!(p["recent_items"][0], "i9");

    // The bad line is a dead letter, counted in metrics and status.
    engine.wait_for(30, "the dead letter", |_| {
        complete_lines(&engine.dead).contains("invalid_json")
    });
    let dead: Value =
        serde_json::from_str(complete_lines(&engine.dead).lines().next().unwrap()).unwrap();
    assert!(
        dead["source"].as_str().unwrap().ends_with("events.jsonl:7"),
        "{dead}"
    );
    assert_eq!(dead["raw"], "{not json");
    let metrics = engine.metrics();
    assert!(
        metrics.contains("persona_dead_letters_total{reason=\"invalid_json\"} 1"),
        "{metrics}"
    );
    assert!(metrics.contains("persona_duplicates_total 1"), "{metrics}");
    assert!(
        metrics.contains("persona_query_duration_seconds_bucket"),
        "{metrics}"
    );
    let (status, s, _) = engine.get("/v1/status");
    assert_eq!(status, 200);
    assert_eq!(s["workers"], 2);
    assert_eq!(s["counters"]["accepted"], 5);
    assert_eq!(s["counters"]["dead_letters"]["invalid_json"], 1);
    assert_eq!(s["sources"].as_array().unwrap().len(), 2);
    // Status reports the clock every worker has published, which may trail a just-answered
    // query by a tick: poll, don't assert on a clock.
    engine.wait_for(30, "the status clock", |e| {
        e.get("/v1/status").1["as_of_ms"].as_u64() >= Some(appended_at)
    });
    assert_eq!(engine.get("/healthz").0, 200);

    engine.process.stop();
}

/// Recommendations and similar items over a socket: a user's new event changes their list,
/// a purchase removes the item, the experiment names the strategy, errors are clear.
#[test]
fn recommendations_and_similar_items_over_http() {
    let t = now_ms();
    let views: Vec<String> = ["a", "b", "c"]
        .iter()
        .enumerate()
        .flat_map(|(n, u)| {
            [
                event(
                    &format!("{u}1"),
                    u,
                    "product_view",
                    t + n as u64,
                    Some("i1"),
                ),
                event(
                    &format!("{u}2"),
                    u,
                    "product_view",
                    t + n as u64,
                    Some("i2"),
                ),
            ]
        })
        .collect();
    let engine = Engine::start(&views);
    let items = |path: &str| -> Vec<String> {
        let (status, body, _) = engine.get(path);
        assert_eq!(status, 200, "{path}: {body}");
        body["items"]
            .as_array()
            .unwrap()
            .iter()
            .map(|i| i["item_id"].as_str().unwrap().to_string())
            .collect()
    };
    engine.wait_for(30, "i1's neighbours", |_| {
        items("/v1/items/i1/similar") == ["i2"]
    });
    let (_, similar, _) = engine.get("/v1/items/i1/similar?limit=5");
    assert!(similar["as_of_ms"].as_u64().is_some(), "{similar}");
    assert_eq!(similar["items"][0]["reason"], "viewed together with i1");
    assert!(similar["items"][0]["score"].as_f64().unwrap() > 0.0);

    // d views i1: under item_item, i2 comes with its reason; the strategy is named.
    engine.append(&[event("d1", "d", "product_view", t + 10, Some("i1"))]);
    let strategy =
        |u: &str| engine.get(&format!("/v1/users/{u}/recommendations")).1["strategy"].clone();
    // Wait for the item-item answer itself: while the refresh moves i1's counts, a read can
    // briefly find i2 only through the popular fill.
    engine.wait_for(30, "d's recommendation", |e| {
        let first = &e
            .get("/v1/users/d/recommendations?strategy=item_item&limit=1")
            .1["items"][0];
        first["item_id"] == "i2" && first["reason"] == "viewed together with i1"
    });
    let (_, rec, _) = engine.get("/v1/users/d/recommendations?strategy=item_item&limit=1");
    assert_eq!(rec["user_id"], "d");
    assert_eq!(rec["strategy"], "item_item");
    assert_eq!(rec["items"].as_array().unwrap().len(), 1);
    assert_eq!(rec["items"][0]["reason"], "viewed together with i1");
    assert!(["item_item", "popular"].contains(&strategy("d").as_str().unwrap()));
    // Variants are stable per user and both are in use over a few users.
    let variants: std::collections::BTreeSet<String> = (0..20)
        .map(|n| strategy(&format!("user-{n}")).as_str().unwrap().to_string())
        .collect();
    assert_eq!(variants.len(), 2, "{variants:?}");
    assert_eq!(strategy("user-7"), strategy("user-7"));

    // Bought: never recommended again.
    engine.append(&[event("d2", "d", "purchase", t + 11, Some("i2"))]);
    engine.wait_for(30, "the purchase to apply", |_| {
        !items("/v1/users/d/recommendations?strategy=item_item").contains(&"i2".to_string())
    });
    // Cold start: the trending list.
    let (_, cold, _) = engine.get("/v1/users/newcomer/recommendations?strategy=popular");
    assert_eq!(cold["items"][0]["reason"], "popular now", "{cold}");

    for (path, status) in [
        ("/v1/users/d/recommendations?limit=0", 400),
        ("/v1/users/d/recommendations?limit=101", 400),
        ("/v1/users/d/recommendations?strategy=nope", 400),
        ("/v1/items/never-seen/similar", 404),
        // Named, but not as an item: a user, an event type, a catalog category.
        ("/v1/items/a/similar", 404),
        ("/v1/items/product_view/similar", 404),
        ("/v1/items/shoes/similar", 404),
    ] {
        let (s, body, _) = engine.get(path);
        assert_eq!(s, status, "{path}: {body}");
        assert!(body["error"]["code"].is_string(), "{path}: {body}");
    }
    let exposures = |e: &Engine| -> u64 {
        e.metrics()
            .lines()
            .find_map(|l| {
                l.strip_prefix("persona_recommendation_exposures_total{strategy=\"item_item\"} ")
            })
            .and_then(|v| v.trim().parse().ok())
            .expect("item_item exposures in the metrics")
    };
    let before = exposures(&engine);
    assert!(before > 0);
    // A HEAD shows no items: no exposure.
    let (status, _, _) = engine.call(
        "HEAD",
        "/v1/users/a/recommendations?strategy=item_item",
        None,
    );
    assert_eq!(status, 200);
    assert_eq!(exposures(&engine), before);
    let shown = items("/v1/users/a/recommendations?strategy=item_item").len() as u64;
    assert_eq!(exposures(&engine), before + shown);
}

/// `run` under the event clock reflects every line it has read without waiting for a later
/// `ts`: once the log is read, the clock moves 1 ms past the last batch. An appended line with
/// no newer `ts` is reflected too (the clock then runs 1 ms ahead); a newer one moves the clock
/// to its `ts` again. One worker, so that the times are exact.
#[test]
fn event_clock_reflects_the_last_lines_without_a_later_event() {
    const T0: u64 = 1_700_000_000_000;
    let initial = [
        event("e1", "u1", "click", T0, None),
        event("e2", "u2", "click", T0 + 500, None),
        event("e3", "u1", "product_view", T0 + 2_000, Some("i1")),
    ];
    let engine = Engine::start_with(
        &initial,
        &[
            ("PERSONA_ENGINE_CLOCK", "event"),
            ("PERSONA_ENGINE_ALLOWED_LATENESS", "0s"),
            ("PERSONA_ENGINE_WORKERS", "1"),
        ],
    );
    let (status, p, _) = engine.get("/v1/users/u1");
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["event_count"].as_u64(), Some(2), "{p}");
    assert_eq!(p["as_of_ms"].as_u64(), Some(T0 + 2_000), "{p}");
    assert_eq!(p["windows"]["1h"]["product_view"].as_u64(), Some(1), "{p}");

    // No newer ts: reflected all the same, 1 ms later.
    engine.append(&[event("e4", "u3", "click", T0 + 2_000, None)]);
    engine.wait_for(30, "the appended line reflected", |e| {
        e.get("/v1/users/u3").0 == 200
    });
    let (_, p, _) = engine.get("/v1/users/u3");
    assert_eq!(p["event_count"].as_u64(), Some(1), "{p}");
    assert_eq!(p["as_of_ms"].as_u64(), Some(T0 + 2_001), "{p}");

    // A newer ts moves the clock to it; a read at it is answered without a later event.
    engine.append(&[event("e5", "u1", "click", T0 + 5_000, None)]);
    let (status, p, _) = engine.get(&format!(
        "/v1/users/u1?min_as_of_ms={}&timeout_ms=20000",
        T0 + 5_000
    ));
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["event_count"].as_u64(), Some(3), "{p}");
    assert_eq!(p["as_of_ms"].as_u64(), Some(T0 + 5_000), "{p}");
}

/// The out-of-the-box path: `persona` with no arguments, from the repository root, serves the
/// bundled sample.
#[test]
fn no_command_serves_the_bundled_sample() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR"));
    let dir = tempfile::tempdir().unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_persona"));
    cmd.current_dir(root)
        .env("PERSONA_HTTP_LISTEN", "127.0.0.1:0")
        .env(
            "PERSONA_SOURCE_DEAD_LETTER_PATH",
            dir.path().join("dead.jsonl"),
        )
        .env("PERSONA_TRIGGERS_PATH", dir.path().join("triggers.jsonl"));
    let mut engine = Engine {
        process: spawn_listening(cmd),
        _dir: Some(dir),
        events: root.join("data/sample-events.jsonl"),
        dead: PathBuf::new(),
    };
    engine.wait_for(30, "readiness", |e| e.get("/readyz").0 == 200);
    let sample = complete_lines(&engine.events);
    let otto0 = sample
        .lines()
        .filter(|l| l.contains("\"user_id\":\"otto-0\""))
        .count();
    let (status, p, _) = engine.get("/v1/users/otto-0");
    assert_eq!(status, 200, "{p}");
    assert_eq!(p["event_count"].as_u64(), Some(otto0 as u64));
    assert!(
        !p["top_categories"].as_array().unwrap().is_empty(),
        "the bundled catalog is loaded"
    );
    // Similarities and trending lists are re-ranked every `refresh` (5 s).
    engine.wait_for(30, "recommendations for otto-0", |e| {
        e.get("/v1/users/otto-0/recommendations").1["items"]
            .as_array()
            .map(Vec::len)
            == Some(10)
    });
    let (status, r, _) = engine.get("/v1/users/someone-new/recommendations?limit=3");
    assert_eq!(
        (status, r["items"][0]["reason"].as_str()),
        (200, Some("popular now")),
        "{r}"
    );
    engine.process.stop();
}

#[test]
fn run_fails_clearly_on_a_bad_config() {
    let dir = tempfile::tempdir().unwrap();
    let config = dir.path().join("bad.toml");
    std::fs::write(&config, "[engine]\nwindowz = [\"1h\"]\n").unwrap();
    let out = Command::new(env!("CARGO_BIN_EXE_persona"))
        .args(["run", "--config"])
        .arg(&config)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("windowz"), "{err}");

    let out = Command::new(env!("CARGO_BIN_EXE_persona"))
        .args(["run"])
        .env("PERSONA_SOURCE_PATH", dir.path().join("missing.jsonl"))
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(String::from_utf8_lossy(&out.stderr).contains("missing.jsonl"));
}
