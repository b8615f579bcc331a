//! Access control, TLS, erasure and consent, as a user meets them: `persona run` (the real
//! binary) on a followed log, tokens from the environment, HTTP(S) over real sockets, and a
//! restart that re-reads the whole log.

mod support;

use serde_json::{json, Value};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::time::{SystemTime, UNIX_EPOCH};
use support::process::{spawn_listening, Process};

const READ: &str = "read-token-1e10";
const ADMIN: &str = "admin-Token_42";

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

fn event(id: &str, user: &str, kind: &str, ts: u64, item: Option<&str>) -> String {
    let mut v = json!({"event_id": id, "user_id": user, "type": kind, "ts": ts,
        "context": {"ip": "203.0.113.9"}});
    if let Some(i) = item {
        v["item_id"] = i.into();
    }
    v.to_string()
}

fn consent(id: &str, user: &str, ts: u64, granted: bool) -> String {
    json!({"event_id": id, "user_id": user, "type": "consent", "ts": ts,
        "properties": {"personalization": granted}})
    .to_string()
}

fn append(path: &Path, lines: &[String]) {
    let mut f = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(path)
        .unwrap();
    for l in lines {
        writeln!(f, "{l}").unwrap();
    }
}

/// `persona run` in `dir` on `dir/events.jsonl`, tokens from the environment.
fn start(dir: &Path) -> Process {
    let config = dir.join("persona.toml");
    std::fs::write(
        &config,
        format!(
            "[engine]\nworkers = 2\nerasure_log = {:?}\n\n[source]\npath = {:?}\ncatalog_path = \"\"\nfollow = true\ndead_letter_path = {:?}\n\n[triggers]\nsink = \"none\"\n\n[http]\nlisten = \"127.0.0.1:0\"\nmax_uri_bytes = 512\n",
            dir.join("erasures.jsonl").display().to_string(),
            dir.join("events.jsonl").display().to_string(),
            dir.join("dead.jsonl").display().to_string(),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_persona"));
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("PERSONA_HTTP_READ_TOKEN", READ)
        .env("PERSONA_HTTP_ADMIN_TOKEN", ADMIN);
    let p = spawn_listening(cmd);
    p.wait_for(30, "readiness", |p| p.get("/readyz").0 == 200);
    p
}

/// The profile of `user` once the engine has taken in everything up to `as_of` (status, body).
fn profile(p: &Process, user: &str, as_of: u64) -> (u16, Value) {
    let (status, body, _) = p.call(
        "GET",
        &format!("/v1/users/{user}?min_as_of_ms={as_of}&timeout_ms=20000"),
        Some(READ),
    );
    (status, body)
}

#[test]
fn tokens_guard_reads_and_erasure() {
    let dir = tempfile::tempdir().unwrap();
    let t = now_ms() - 60_000;
    append(
        &dir.path().join("events.jsonl"),
        &[event("e1", "u1", "click", t, None)],
    );
    let mut p = start(dir.path());

    // Reads: no token or a wrong one is 401 with a JSON error; either token passes.
    let (status, body, _) = p.call("GET", "/v1/users/u1", None);
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (401, Some("unauthorized")),
        "{body}"
    );
    assert_eq!(p.call("GET", "/v1/users/u1", Some("nope")).0, 401);
    assert_eq!(p.call("GET", "/v1/status", None).0, 401);
    assert_eq!(p.call("GET", "/metrics", None).0, 401);
    assert_eq!(profile(&p, "u1", t).0, 200);
    assert_eq!(p.call("GET", "/v1/users/u1", Some(ADMIN)).0, 200);
    // The dashboard's cookie passes reads, never an erasure.
    let cookie = |method: &str, path: &str, token: &str| match ureq::request(
        method,
        &format!("{}{path}", p.base),
    )
    .set("Cookie", &format!("theme=dark; persona_token={token}"))
    .call()
    {
        Ok(r) => r.status(),
        Err(ureq::Error::Status(code, _)) => code,
        Err(e) => panic!("{e}"),
    };
    assert_eq!(cookie("GET", "/v1/status", READ), 200);
    assert_eq!(cookie("GET", "/v1/status", "nope"), 401);
    assert_eq!(cookie("DELETE", "/v1/users/u1", ADMIN), 401);
    // Probes and the API description stay open, `HEAD` as `GET`.
    assert_eq!(p.get("/healthz").0, 200);
    assert_eq!(p.call("HEAD", "/healthz", None).0, 200);
    assert_eq!(p.call("HEAD", "/v1/users/u1", None).0, 401);
    assert_eq!(p.call("HEAD", "/v1/users/u1", Some(READ)).0, 200);
    // A method a path is not served with is 405 whatever the token; a refusal names its
    // process like any other answer; a malformed escape in an id is bad input.
    for token in [None, Some(READ), Some(ADMIN)] {
        let (status, body, _) = p.call("POST", "/v1/users/u1", token);
        assert_eq!(
            (status, body["error"]["code"].as_str()),
            (405, Some("method_not_allowed")),
            "{token:?}: {body}"
        );
    }
    let refused = match ureq::get(&format!("{}/v1/users/u1", p.base)).call() {
        Err(ureq::Error::Status(401, r)) => r,
        other => panic!("expected a 401, got {other:?}"),
    };
    assert_eq!(refused.header("x-persona-process"), Some("0"));
    let (status, body, _) = p.call("GET", "/v1/users/%ZZ", Some(READ));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (400, Some("bad_request")),
        "{body}"
    );
    let (status, spec, _) = p.get("/openapi.json");
    assert_eq!(status, 200);
    assert!(
        spec["openapi"].as_str().unwrap().starts_with("3."),
        "{spec}"
    );
    assert!(spec["paths"]["/v1/users/{user_id}"]["delete"].is_object());
    // Erasure needs the admin token: the read token is 403.
    let (status, body, _) = p.call("DELETE", "/v1/users/u1", Some(READ));
    assert_eq!(
        (status, body["error"]["code"].as_str()),
        (403, Some("forbidden")),
        "{body}"
    );
    assert_eq!(p.call("DELETE", "/v1/users/u1", None).0, 401);
    assert_eq!(
        profile(&p, "u1", t).0,
        200,
        "a refused erasure erases nothing"
    );
    // Request limits.
    let long = format!("/v1/users/{}", "x".repeat(600));
    assert_eq!(p.call("GET", &long, Some(READ)).0, 414);
    // A head over 64 KiB, however it arrives: a JSON 431, and the connection closes.
    let big = match ureq::get(&format!("{}/healthz", p.base))
        .set("X-Big", &"a".repeat(66_000))
        .call()
    {
        Err(ureq::Error::Status(431, r)) => r,
        other => panic!("a 66 kB header: {other:?}"),
    };
    assert_eq!(big.header("connection"), Some("close"));
    assert!(big.header("x-persona-process").is_some());
    let body: Value = serde_json::from_str(&big.into_string().unwrap()).unwrap();
    assert_eq!(body["error"]["code"], "header_too_large", "{body}");
    let fits = ureq::get(&format!("{}/healthz", p.base))
        .set("X-Big", &"a".repeat(60_000))
        .call();
    assert_eq!(fits.map(|r| r.status()).ok(), Some(200));

    let text = ureq::get(&format!("{}/metrics", p.base))
        .set("Authorization", &format!("Bearer {READ}"))
        .call()
        .unwrap()
        .into_string()
        .unwrap();
    assert!(
        text.contains("persona_requests_refused_total{reason=\"forbidden\"} 1"),
        "{text}"
    );
    // The name table holds the users and items read (the event-id table only device events').
    let names: Option<u64> = text
        .lines()
        .find_map(|l| l.strip_prefix("persona_names{table=\"names\"} "))
        .and_then(|v| v.parse().ok());
    assert!(names.is_some_and(|n| n > 0), "{text}");
    assert!(
        text.contains("persona_names{table=\"event_ids\"} "),
        "{text}"
    );
    p.stop();
    assert!(
        !p.log_contains(READ) && !p.log_contains(ADMIN),
        "tokens are never logged"
    );
    assert!(p.log_contains("***"), "the printed config masks the tokens");
}

#[test]
fn an_erased_user_stays_gone_after_a_restart_and_consent_is_honoured() {
    let dir = tempfile::tempdir().unwrap();
    let events = dir.path().join("events.jsonl");
    let t = now_ms() - 600_000;
    append(
        &events,
        &[
            event("e1", "u1", "product_view", t, Some("i1")),
            event("e2", "u1", "purchase", t + 1_000, Some("i2")),
            event("e3", "u2", "product_view", t + 2_000, Some("i1")),
            event("e4", "u3", "click", t + 3_000, None),
            consent("c1", "u3", t + 4_000, false),
            event("e5", "u3", "click", t + 5_000, None),
        ],
    );
    let mut p = start(dir.path());
    assert_eq!(profile(&p, "u1", t + 5_000).1["event_count"], 2);
    // u3 revoked consent: their profile is cleared and later events are not profiled.
    assert_eq!(profile(&p, "u3", t + 5_000).0, 404);

    let (status, body, _) = p.call("DELETE", "/v1/users/u1", Some(ADMIN));
    assert_eq!(status, 200, "{body}");
    assert_eq!(body["erased"], true);
    let through = body["erased_through_ms"].as_u64().unwrap();
    assert!(through >= t + 1_000, "{body}");
    // Answered once every view has taken it in: the profile is gone at once.
    assert_eq!(p.call("GET", "/v1/users/u1", Some(READ)).0, 404);
    let (_, u2) = profile(&p, "u2", 0);
    assert_eq!(u2["event_count"], 1, "other users are untouched");
    // A redelivered event of the erased past stays erased; u3 grants consent again.
    let now = now_ms();
    append(
        &events,
        &[
            event("e1", "u1", "product_view", t, Some("i1")),
            consent("c2", "u3", now, true),
            event("e6", "u3", "page_view", now + 1, None),
            event("e7", "u2", "click", now + 2, None),
        ],
    );
    assert_eq!(profile(&p, "u2", now + 2).1["event_count"], 2);
    assert_eq!(p.call("GET", "/v1/users/u1", Some(READ)).0, 404);
    let (_, u3) = profile(&p, "u3", now + 2);
    assert_eq!(
        (u3["event_count"].as_u64(), u3["counts"].clone()),
        (Some(1), json!({"page_view": 1})),
        "only events after the grant count"
    );
    p.stop();

    // The erasure log holds a hash, not the id; the raw IP is stored nowhere.
    let log = std::fs::read_to_string(dir.path().join("erasures.jsonl")).unwrap();
    assert_eq!(log.lines().count(), 1);
    assert!(!log.contains("u1"), "{log}");

    // A restart re-reads the whole log: u1 must not come back.
    let p = start(dir.path());
    assert_eq!(profile(&p, "u2", now + 2).1["event_count"], 2);
    assert_eq!(p.call("GET", "/v1/users/u1", Some(READ)).0, 404);
    assert_eq!(profile(&p, "u3", now + 2).1["event_count"], 1);
    let (_, similar, _) = p.call("GET", "/v1/items/i1/similar", Some(READ));
    assert!(
        similar["items"]
            .as_array()
            .unwrap()
            .iter()
            .all(|n| n["item_id"] != "i2"),
        "u1's i1–i2 co-occurrence is gone: {similar}"
    );
    let dead = std::fs::read_to_string(dir.path().join("dead.jsonl")).unwrap_or_default();
    assert!(dead.is_empty(), "{dead}");
    let _ = PathBuf::new();
}

/// `curl` with the test's CA: (HTTP status, body); status 0 when no HTTP answer came.
fn curl(args: &[&str]) -> (u16, String) {
    let out = Command::new("curl")
        .args(["-s", "-m", "10", "-w", "\n%{http_code}"])
        .args(args)
        .output()
        .expect("curl runs");
    let text = String::from_utf8_lossy(&out.stdout).to_string();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), body.to_string())
}

#[test]
fn https_when_a_certificate_is_configured() {
    let dir = tempfile::tempdir().unwrap();
    let (cert, key) = (dir.path().join("cert.pem"), dir.path().join("key.pem"));
    let made = Command::new("openssl")
        .args([
            "req",
            "-x509",
            "-newkey",
            "rsa:2048",
            "-nodes",
            "-days",
            "1",
            "-subj",
            "/CN=localhost",
        ])
        .args([
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
            "-keyout",
        ])
        .arg(&key)
        .arg("-out")
        .arg(&cert)
        .output()
        .expect("openssl runs");
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    append(
        &dir.path().join("events.jsonl"),
        &[event("e1", "u1", "click", now_ms() - 1_000, None)],
    );
    let config = dir.path().join("persona.toml");
    std::fs::write(
        &config,
        format!(
            "[engine]\nerasure_log = \"\"\n\n[source]\npath = {:?}\ncatalog_path = \"\"\ndead_letter_path = {:?}\n\n[triggers]\nsink = \"none\"\n\n[http]\nlisten = \"127.0.0.1:0\"\n",
            dir.path().join("events.jsonl").display().to_string(),
            dir.path().join("dead.jsonl").display().to_string(),
        ),
    )
    .unwrap();
    let mut cmd = Command::new(env!("CARGO_BIN_EXE_persona"));
    cmd.args(["run", "--config"])
        .arg(&config)
        .env("PERSONA_HTTP_TLS_CERT", &cert)
        .env("PERSONA_HTTP_TLS_KEY", &key)
        .env("PERSONA_HTTP_READ_TOKEN", READ);
    let p = spawn_listening(cmd);
    assert!(p.base.starts_with("https://127.0.0.1:"), "{}", p.base);
    let cacert = cert.display().to_string();
    let auth = format!("Authorization: Bearer {READ}");
    let url = format!("{}/v1/users/u1?min_as_of_ms=0&timeout_ms=20000", p.base);
    let deadline = std::time::Instant::now() + std::time::Duration::from_secs(30);
    let (status, body) = loop {
        let got = curl(&["--cacert", &cacert, "-H", &auth, &url]);
        if got.0 == 200 || std::time::Instant::now() > deadline {
            break got;
        }
        std::thread::sleep(std::time::Duration::from_millis(50));
    };
    assert_eq!(status, 200, "{body}");
    assert_eq!(
        serde_json::from_str::<Value>(&body).unwrap()["event_count"],
        1
    );
    // The token is still required over TLS; an untrusted certificate is refused by the client;
    // plain HTTP on the TLS port gets no HTTP answer.
    assert_eq!(curl(&["--cacert", &cacert, &url]).0, 401);
    assert_eq!(curl(&["-H", &auth, &url]).0, 0);
    let plain = url.replacen("https://", "http://", 1);
    assert_eq!(curl(&["-H", &auth, &plain]).0, 0);

    // Half a TLS setting is an error at start.
    let out = Command::new(env!("CARGO_BIN_EXE_persona"))
        .args(["run", "--config"])
        .arg(&config)
        .env("PERSONA_HTTP_TLS_CERT", &cert)
        .output()
        .unwrap();
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("tls_key"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}
