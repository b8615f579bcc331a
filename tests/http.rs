//! `persona run` as a user runs it: the real binary, a config file, a followed log, HTTP over
//! real sockets. Checks the API's answers, errors, read-your-writes and live following.

use serde_json::Value;
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

struct Engine {
    child: Child,
    base: String,
    _dir: Option<tempfile::TempDir>,
    events: PathBuf,
    dead: PathBuf,
}

/// Spawns `cmd` and returns it with the base URL from its log line
/// "persona listening on http://ADDR".
fn spawn_listening(mut cmd: Command) -> (Child, String) {
    let mut child = cmd
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .unwrap();
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let mut line = String::new();
    let base = loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "persona exited before listening"
        );
        if let Some(pos) = line.find("listening on http://") {
            break line[pos + "listening on ".len()..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_string();
        }
    };
    std::thread::spawn(move || for _ in stderr.lines() {});
    (child, base)
}

impl Engine {
    fn start(initial: &[String]) -> Engine {
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
                "[engine]\nworkers = 2\ntick = \"20ms\"\n\n[source]\npath = {:?}\ncatalog_path = {:?}\nfollow = true\ndead_letter_path = {:?}\n\n[http]\nlisten = \"127.0.0.1:0\"\n",
                events.display().to_string(),
                catalog.display().to_string(),
                dead.display().to_string()
            ),
        )
        .unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_persona"));
        cmd.args(["run", "--config"]).arg(&config);
        let (child, base) = spawn_listening(cmd);
        let engine = Engine {
            child,
            base,
            _dir: Some(dir),
            events,
            dead,
        };
        engine.wait_for(|e| e.get("/readyz").0 == 200, "readiness");
        engine
    }

    fn get(&self, path: &str) -> (u16, Value, Option<String>) {
        let request = ureq::get(&format!("{}{path}", self.base)).timeout(Duration::from_secs(30));
        let response = match request.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("GET {path}: {e}"),
        };
        let status = response.status();
        let worker = response.header("x-persona-worker").map(str::to_string);
        let body = response.into_string().unwrap();
        (
            status,
            serde_json::from_str(&body).unwrap_or(Value::String(body)),
            worker,
        )
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

    /// Polls `check` until it holds; fails after a generous deadline (no timing is asserted).
    fn wait_for(&self, check: impl Fn(&Engine) -> bool, what: &str) {
        let deadline = Instant::now() + Duration::from_secs(30);
        while !check(self) {
            assert!(Instant::now() < deadline, "gave up waiting for {what}");
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    fn stop(&mut self) {
        let pid = self.child.id().to_string();
        assert!(Command::new("kill")
            .args(["-TERM", &pid])
            .status()
            .unwrap()
            .success());
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().unwrap() {
                assert!(
                    status.success(),
                    "persona run exited with {status} after SIGTERM"
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("persona run did not stop after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Engine {
    /// A failed assertion must not leave the server running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
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

fn read(path: &Path) -> String {
    std::fs::read_to_string(path).unwrap_or_default()
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
        engine.wait_for(|e| e.get("/v1/users/u9").0 == 200, "the appended user");
    } else {
        assert_eq!(status, 200, "{p}");
        assert!(p["as_of_ms"].as_u64().unwrap() >= appended_at);
    }
    engine.wait_for(
        |e| e.get("/v1/users/u1").1["event_count"] == 3,
        "the appended event of u1",
    );
    let (_, p, _) = engine.get("/v1/users/u1");
    assert_eq!(p["recent_items"][0], "i9");

    // The bad line is a dead letter, counted in metrics and status.
    engine.wait_for(
        |_| read(&engine.dead).contains("invalid_json"),
        "the dead letter",
    );
    let dead: Value = serde_json::from_str(read(&engine.dead).lines().next().unwrap()).unwrap();
    assert!(
        dead["source"].as_str().unwrap().ends_with("events.jsonl:7"),
        "{dead}"
    );
    assert_eq!(dead["raw"], "{not json");
    let metrics = ureq::get(&format!("{}/metrics", engine.base))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
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
    engine.wait_for(
        |e| e.get("/v1/status").1["as_of_ms"].as_u64() >= Some(appended_at),
        "the status clock",
    );
    assert_eq!(engine.get("/healthz").0, 200);

    engine.stop();
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
        );
    let (child, base) = spawn_listening(cmd);
    let mut engine = Engine {
        child,
        base,
        _dir: Some(dir),
        events: root.join("data/sample-events.jsonl"),
        dead: PathBuf::new(),
    };
    engine.wait_for(|e| e.get("/readyz").0 == 200, "readiness");
    let sample = read(&engine.events);
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
    engine.stop();
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
