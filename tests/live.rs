//! Live delivery as a client sees it: the real `persona run` binary on a followed log, its
//! `GET /v1/users/{id}/stream` read over a raw TCP socket (server-sent events), the triggers
//! file, and the dashboard page driven in a real headless Chromium over the DevTools protocol.
//! Every wait polls with a deadline; no test asserts on timing.

use serde_json::{json, Value};
use std::io::{BufRead, BufReader, Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

mod support;

use support::process::{spawn_listening, Process};

/// How long a stream event may take to arrive before the test gives up.
const STREAM_WAIT: Duration = Duration::from_secs(10);
/// How long the dashboard may take to show a change before the test gives up.
const PAGE_WAIT: Duration = Duration::from_secs(15);

fn now_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .unwrap()
        .as_millis() as u64
}

/// `persona run` on a followed, initially empty log in a temporary directory.
struct Engine {
    process: Process,
    _dir: tempfile::TempDir,
    events: PathBuf,
    triggers: PathBuf,
}

impl std::ops::Deref for Engine {
    type Target = Process;
    fn deref(&self) -> &Process {
        &self.process
    }
}

impl Engine {
    /// Starts the engine; `segments` is a `[segments]` table body, `None` keeps the defaults.
    fn start(stream_buffer: usize, segments: Option<&str>) -> Engine {
        Engine::start_with_token(stream_buffer, segments, "")
    }

    /// As `start`, with `http.read_token` set.
    fn start_with_token(stream_buffer: usize, segments: Option<&str>, token: &str) -> Engine {
        let dir = tempfile::tempdir().unwrap();
        let events = dir.path().join("events.jsonl");
        let catalog = dir.path().join("catalog.jsonl");
        let dead = dir.path().join("dead.jsonl");
        let triggers = dir.path().join("triggers.jsonl");
        std::fs::write(&events, "").unwrap();
        std::fs::write(&catalog, "{\"item_id\":\"i1\",\"category\":\"shoes\"}\n").unwrap();
        let mut toml = format!(
            "[engine]\nworkers = 2\ntick = \"20ms\"\nerasure_log = {:?}\n\n\
             [source]\npath = {:?}\ncatalog_path = {:?}\nfollow = true\ndead_letter_path = {:?}\n\n\
             [http]\nlisten = \"127.0.0.1:0\"\nread_token = {token:?}\n\n\
             [triggers]\nsink = \"file\"\npath = {:?}\nstream_buffer = {stream_buffer}\n",
            dir.path().join("erasures.jsonl").display().to_string(),
            events.display().to_string(),
            catalog.display().to_string(),
            dead.display().to_string(),
            triggers.display().to_string(),
        );
        if let Some(segments) = segments {
            toml.push_str(&format!("\n[segments]\n{segments}"));
        }
        let config = dir.path().join("persona.toml");
        std::fs::write(&config, toml).unwrap();
        let mut cmd = Command::new(env!("CARGO_BIN_EXE_persona"));
        cmd.args(["run", "--config"]).arg(&config);
        let engine = Engine {
            process: spawn_listening(cmd),
            _dir: dir,
            events,
            triggers,
        };
        engine.wait_for(30, "readiness", |e| e.get("/readyz").0 == 200);
        engine
    }

    /// Appends `lines` to the followed log in one write.
    fn append(&self, lines: &[Value]) {
        let text: String = lines.iter().map(|l| format!("{l}\n")).collect();
        let mut f = std::fs::OpenOptions::new()
            .append(true)
            .open(&self.events)
            .unwrap();
        f.write_all(text.as_bytes()).unwrap();
    }

    /// The trigger records of `user` in the triggers file, in file order.
    fn triggers_of(&self, user: &str) -> Vec<Value> {
        support::process::complete_lines(&self.triggers)
            .lines()
            .map(|l| serde_json::from_str::<Value>(l).expect("a trigger line is JSON"))
            .filter(|t| t["user_id"] == user)
            .collect()
    }

    /// Polls until `user` has `n` records in the triggers file.
    fn wait_for_triggers(&self, user: &str, n: usize) -> Vec<Value> {
        let deadline = Instant::now() + STREAM_WAIT;
        loop {
            let found = self.triggers_of(user);
            if found.len() >= n {
                return found;
            }
            assert!(
                Instant::now() < deadline,
                "gave up waiting for {n} triggers of {user} in {}; found {}:\n{}\nengine log tail:\n{}",
                self.triggers.display(),
                found.len(),
                lines(&found),
                self.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

/// An event line of the log, at the wall clock's now.
fn event(id: &str, user: &str, kind: &str, device: &str) -> Value {
    json!({"event_id": id, "user_id": user, "type": kind, "ts": now_ms(), "item_id": "i1",
           "device": {"type": device}})
}

fn lines(values: &[Value]) -> String {
    values.iter().map(|v| format!("  {v}\n")).collect()
}

/// "CHANGE SEGMENT" of each trigger record, sorted.
fn changes(records: &[Value]) -> Vec<String> {
    let mut out: Vec<String> = records
        .iter()
        .map(|t| {
            format!(
                "{} {}",
                t["change"].as_str().unwrap_or("?"),
                t["segment"].as_str().unwrap_or("?")
            )
        })
        .collect();
    out.sort();
    out
}

// ---- server-sent events over a raw socket ----

/// One server-sent event.
#[derive(Debug, Clone)]
struct SseEvent {
    name: String,
    data: String,
}

impl SseEvent {
    fn json(&self) -> Value {
        serde_json::from_str(&self.data)
            .unwrap_or_else(|e| panic!("{} event data is not JSON ({e}): {}", self.name, self.data))
    }
}

/// Splits a byte stream into server-sent events.
#[derive(Default)]
struct SseParser {
    pending: Vec<u8>,
    name: Option<String>,
    data: Vec<String>,
}

impl SseParser {
    fn feed(&mut self, bytes: &[u8]) -> Vec<SseEvent> {
        self.pending.extend_from_slice(bytes);
        let mut out = Vec::new();
        while let Some(end) = self.pending.iter().position(|&b| b == b'\n') {
            let raw: Vec<u8> = self.pending.drain(..=end).collect();
            let line = String::from_utf8_lossy(&raw);
            let line = line.trim_end_matches(['\n', '\r']);
            if line.is_empty() {
                if self.name.is_some() || !self.data.is_empty() {
                    out.push(SseEvent {
                        name: self.name.take().unwrap_or_else(|| "message".into()),
                        data: std::mem::take(&mut self.data).join("\n"),
                    });
                }
            } else if !line.starts_with(':') {
                let (field, value) = line.split_once(':').unwrap_or((line, ""));
                let value = value.strip_prefix(' ').unwrap_or(value);
                match field {
                    "event" => self.name = Some(value.to_string()),
                    "data" => self.data.push(value.to_string()),
                    _ => {} // retry, id
                }
            }
        }
        out
    }
}

/// A `GET .../stream` over a raw TCP socket; a thread reads the body as it comes.
struct SseClient {
    status: u16,
    headers: Vec<(String, String)>,
    incoming: mpsc::Receiver<SseEvent>,
    /// Everything received after the headers, for failure messages.
    text: Arc<Mutex<String>>,
    /// Every event received so far, in order.
    seen: Vec<SseEvent>,
    ended: bool,
    socket: TcpStream,
}

enum Next {
    Event(SseEvent),
    Ended,
    TimedOut,
}

impl SseClient {
    fn connect(base: &str, path: &str) -> SseClient {
        let addr = base.trim_start_matches("http://");
        let mut socket = TcpStream::connect(addr).expect("connect to the engine");
        write!(
            socket,
            "GET {path} HTTP/1.1\r\nHost: {addr}\r\nAccept: text/event-stream\r\n\r\n"
        )
        .unwrap();
        socket.set_read_timeout(Some(STREAM_WAIT)).unwrap();
        let mut reader = BufReader::new(socket.try_clone().unwrap());
        let mut line = String::new();
        reader
            .read_line(&mut line)
            .expect("the response's status line");
        let status = line
            .split_whitespace()
            .nth(1)
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| panic!("not an HTTP status line: {line:?}"));
        let mut headers = Vec::new();
        loop {
            line.clear();
            reader.read_line(&mut line).expect("a response header");
            let l = line.trim_end();
            if l.is_empty() {
                break;
            }
            let (k, v) = l.split_once(':').unwrap_or((l, ""));
            headers.push((k.trim().to_ascii_lowercase(), v.trim().to_string()));
        }
        socket.set_read_timeout(None).unwrap();
        let chunked = headers
            .iter()
            .any(|(k, v)| k == "transfer-encoding" && v.eq_ignore_ascii_case("chunked"));
        let (tx, incoming) = mpsc::channel();
        let text = Arc::new(Mutex::new(String::new()));
        let sink = text.clone();
        std::thread::spawn(move || read_body(reader, chunked, tx, sink));
        SseClient {
            status,
            headers,
            incoming,
            text,
            seen: Vec::new(),
            ended: false,
            socket,
        }
    }

    fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k == name)
            .map(|(_, v)| v.as_str())
    }

    /// The next event, or the end of the stream, or nothing by `deadline`.
    fn next(&mut self, deadline: Instant) -> Next {
        if self.ended {
            return Next::Ended;
        }
        let left = deadline.saturating_duration_since(Instant::now());
        match self.incoming.recv_timeout(left) {
            Ok(e) => {
                self.seen.push(e.clone());
                Next::Event(e)
            }
            Err(mpsc::RecvTimeoutError::Timeout) => Next::TimedOut,
            Err(mpsc::RecvTimeoutError::Disconnected) => {
                self.ended = true;
                Next::Ended
            }
        }
    }

    /// Reads events until `done(everything seen)` holds; fails, showing the stream, if the
    /// stream ends or stays quiet past the deadline first.
    fn read_until(&mut self, engine: &Engine, what: &str, done: impl Fn(&[SseEvent]) -> bool) {
        let deadline = Instant::now() + STREAM_WAIT;
        while !done(&self.seen) {
            let why = match self.next(deadline) {
                Next::Event(_) => continue,
                Next::Ended => "the stream ended",
                Next::TimedOut => "timed out",
            };
            panic!("{why} waiting for {what}\n{}", self.report(engine));
        }
    }

    fn report(&self, engine: &Engine) -> String {
        let text = self.text.lock().unwrap();
        let tail = &text[text.len().saturating_sub(4000)..];
        format!(
            "stream text (tail):\n{tail}\nengine log tail:\n{}",
            engine.log_tail(30)
        )
    }

    /// The data of every `segment` event seen, as JSON, in order.
    fn segments(&self) -> Vec<Value> {
        self.seen
            .iter()
            .filter(|e| e.name == "segment")
            .map(SseEvent::json)
            .collect()
    }
}

impl Drop for SseClient {
    fn drop(&mut self) {
        let _ = self.socket.shutdown(std::net::Shutdown::Both);
    }
}

/// Reads a response body (chunked or to the end of the connection) into events.
fn read_body(
    mut reader: BufReader<TcpStream>,
    chunked: bool,
    tx: mpsc::Sender<SseEvent>,
    text: Arc<Mutex<String>>,
) {
    let mut parser = SseParser::default();
    loop {
        let bytes = if chunked {
            let mut line = String::new();
            if reader.read_line(&mut line).unwrap_or(0) == 0 {
                return;
            }
            let size = line.trim().split(';').next().unwrap_or_default();
            let size = usize::from_str_radix(size, 16).unwrap_or(0);
            if size == 0 {
                return; // the last chunk (or garbage: the test will see the stream end)
            }
            let mut chunk = vec![0; size + 2];
            if reader.read_exact(&mut chunk).is_err() {
                return;
            }
            chunk.truncate(size);
            chunk
        } else {
            let mut buf = vec![0; 8192];
            match reader.read(&mut buf) {
                Ok(0) | Err(_) => return,
                Ok(n) => {
                    buf.truncate(n);
                    buf
                }
            }
        };
        text.lock()
            .unwrap()
            .push_str(&String::from_utf8_lossy(&bytes));
        for e in parser.feed(&bytes) {
            if tx.send(e).is_err() {
                return;
            }
        }
    }
}

/// Whether `seen` has a `segment` event `(segment, change)`.
fn has_segment(seen: &[SseEvent], segment: &str, change: &str) -> bool {
    seen.iter().any(|e| {
        e.name == "segment" && {
            let t = e.json();
            t["segment"] == segment && t["change"] == change
        }
    })
}

/// Whether `seen` has a `profile` event with `event_count` and exactly `segments`.
fn has_profile(seen: &[SseEvent], event_count: u64, segments: &[&str]) -> bool {
    seen.iter().any(|e| {
        e.name == "profile" && {
            let p = e.json();
            let mut got: Vec<&str> = p["segments"]
                .as_array()
                .map(|a| a.iter().filter_map(Value::as_str).collect())
                .unwrap_or_default();
            got.sort_unstable();
            let mut want = segments.to_vec();
            want.sort_unstable();
            p["event_count"] == event_count && got == want
        }
    })
}

#[test]
fn stream_pushes_profile_and_segment_changes() {
    let engine = Engine::start(256, None);
    let mut stream = SseClient::connect(&engine.base, "/v1/users/u1/stream");
    assert_eq!(stream.status, 200, "{:?}", stream.headers);
    assert!(
        stream
            .header("content-type")
            .is_some_and(|v| v.starts_with("text/event-stream")),
        "content-type of the stream: {:?}",
        stream.headers
    );

    // Before the user's first event: a `profile` event with `null`.
    match stream.next(Instant::now() + STREAM_WAIT) {
        Next::Event(e) => assert!(
            e.name == "profile" && e.data == "null",
            "first event: {e:?}\n{}",
            stream.report(&engine)
        ),
        _ => panic!("no first event\n{}", stream.report(&engine)),
    }

    // An add_to_cart from a phone: enters cart_abandoner and mobile.
    engine.append(&[event("e1", "u1", "add_to_cart", "mobile")]);
    stream.read_until(&engine, "cart_abandoner and mobile entered", |seen| {
        has_segment(seen, "cart_abandoner", "enter")
            && has_segment(seen, "mobile", "enter")
            && has_profile(seen, 1, &["cart_abandoner", "mobile"])
    });

    // A purchase: leaves cart_abandoner, enters buyer.
    let mut purchase = event("e2", "u1", "purchase", "mobile");
    purchase["value"] = json!(19.99);
    engine.append(&[purchase]);
    stream.read_until(&engine, "cart_abandoner left and buyer entered", |seen| {
        has_segment(seen, "cart_abandoner", "exit")
            && has_segment(seen, "buyer", "enter")
            && has_profile(seen, 2, &["buyer", "mobile"])
    });

    // The stream's triggers are the triggers file's records of u1, in the same order.
    let pushed = stream.segments();
    let written = engine.wait_for_triggers("u1", 4);
    assert_eq!(
        pushed,
        written,
        "stream segment events vs the triggers file\nstream:\n{}file:\n{}",
        lines(&pushed),
        lines(&written)
    );
    // Within one engine time the order is the engine's; across the two events it is theirs.
    assert_eq!(
        (
            written.len(),
            changes(&written[..2]),
            changes(&written[2..])
        ),
        (
            4,
            vec!["enter cart_abandoner".to_string(), "enter mobile".into()],
            vec!["enter buyer".to_string(), "exit cart_abandoner".into()]
        ),
        "triggers of u1:\n{}",
        lines(&written)
    );
    assert!(
        written[2]["as_of_ms"].as_u64() >= written[1]["as_of_ms"].as_u64(),
        "{}",
        lines(&written)
    );

    // An erasure: the stream no longer shows the profile (a subscriber, the dashboard among
    // them, must not keep what was erased).
    let (status, body, _) = engine.call("DELETE", "/v1/users/u1", None);
    assert_eq!(status, 200, "{body}");
    let before = stream.seen.len();
    stream.read_until(&engine, "a null profile after the erasure", |seen| {
        seen[before..]
            .iter()
            .any(|e| e.name == "profile" && e.data == "null")
    });
}

#[test]
fn slow_stream_client_is_dropped_not_the_engine() {
    // One event makes u1 enter 64 segments at one engine time: 64 triggers offered to a
    // subscriber with room for one. Whether the stream task drains the buffer between two of
    // them is up to the scheduler, so either outcome is accepted, each checked in full.
    const SEGMENTS: usize = 64;
    let names: Vec<String> = (0..SEGMENTS).map(|i| format!("mobile_{i:02}")).collect();
    let rules: String = names
        .iter()
        .map(|n| format!("{n} = 'last_device == \"mobile\"'\n"))
        .collect();
    let engine = Engine::start(1, Some(&rules));
    let mut stream = SseClient::connect(&engine.base, "/v1/users/u1/stream");
    assert_eq!(stream.status, 200, "{:?}", stream.headers);
    stream.read_until(&engine, "the first profile event", |seen| {
        seen.iter().any(|e| e.name == "profile")
    });

    // One write: u1's event among 100 of u2 (whose triggers are not u1's subscriber's).
    let mut burst: Vec<Value> = (0..100)
        .map(|i| event(&format!("u2-{i}"), "u2", "click", "mobile"))
        .collect();
    burst.insert(50, event("u1-1", "u1", "add_to_cart", "mobile"));
    engine.append(&burst);

    let dropped = |seen: &[SseEvent]| seen.iter().any(|e| e.name == "dropped");
    stream.read_until(&engine, "all triggers or a `dropped` event", |seen| {
        dropped(seen) || seen.iter().filter(|e| e.name == "segment").count() >= SEGMENTS
    });
    let written = engine.wait_for_triggers("u1", SEGMENTS);
    let pushed = stream.segments();
    assert!(
        pushed.iter().all(|t| t["user_id"] == "u1"),
        "another user's trigger on u1's stream:\n{}",
        lines(&pushed)
    );
    // What was pushed came in file order, none invented or repeated.
    let mut rest = written.iter();
    for t in &pushed {
        assert!(
            rest.any(|w| w == t),
            "stream trigger {t} is not in file order\nstream:\n{}file:\n{}",
            lines(&pushed),
            lines(&written)
        );
    }
    if dropped(&stream.seen) {
        let last = stream.seen.last().unwrap().clone();
        assert_eq!(
            last.name,
            "dropped",
            "events after `dropped`\n{}",
            stream.report(&engine)
        );
        let notice = last.json();
        assert_eq!(notice["reason"], "slow_consumer", "{notice}");
        assert!(notice["message"].as_str().is_some(), "{notice}");
        // ...and the server ends the stream.
        match stream.next(Instant::now() + STREAM_WAIT) {
            Next::Ended => {}
            Next::Event(e) => panic!("{e:?} after `dropped`\n{}", stream.report(&engine)),
            Next::TimedOut => panic!(
                "the stream stayed open after `dropped`\n{}",
                stream.report(&engine)
            ),
        }
        eprintln!(
            "slow subscriber dropped after {} of {SEGMENTS} triggers",
            pushed.len()
        );
    } else {
        assert_eq!(
            pushed,
            written[..SEGMENTS],
            "no `dropped` event, so every trigger must have arrived"
        );
        eprintln!("the subscriber kept up with all {SEGMENTS} triggers");
    }

    // The engine is unaffected: every trigger written, every event counted, and a new
    // subscriber gets the current state.
    assert_eq!(written.len(), SEGMENTS, "{}", lines(&written));
    let u2 = engine.wait_for_triggers("u2", SEGMENTS);
    assert_eq!(u2.len(), SEGMENTS, "{}", lines(&u2));
    engine.wait_for(30, "u2's 100 events", |e| {
        e.get("/v1/users/u2").1["event_count"] == 100
    });
    // Read at or after u1's triggers: u2's answer says nothing about how far u1's worker has
    // published (SPEC §5: `min_as_of_ms` is the read-your-writes contract).
    let entered = written.iter().filter_map(|t| t["as_of_ms"].as_u64()).max();
    let (status, p, _) = engine.get(&format!(
        "/v1/users/u1?min_as_of_ms={}",
        entered.unwrap_or(0)
    ));
    assert_eq!((status, &p["event_count"]), (200, &json!(1)), "{p}");
    let names: Vec<&str> = names.iter().map(String::as_str).collect();
    let mut again = SseClient::connect(&engine.base, "/v1/users/u1/stream");
    again.read_until(&engine, "the current profile on a new stream", |seen| {
        has_profile(seen, 1, &names)
    });
    assert_eq!(engine.get("/readyz").0, 200);
}

// ---- the dashboard in headless Chromium ----

/// The Chromium executable: `$CHROMIUM`, `/usr/bin/chromium` or `chromium` on `PATH`.
fn chromium_path() -> PathBuf {
    if let Some(p) = std::env::var_os("CHROMIUM") {
        let p = PathBuf::from(p);
        assert!(
            p.is_file(),
            "CHROMIUM={} is not a file; unset it to use /usr/bin/chromium \
             (`apt-get install chromium`)",
            p.display()
        );
        return p;
    }
    let on_path = std::env::var_os("PATH")
        .map(|paths| {
            std::env::split_paths(&paths)
                .map(|d| d.join("chromium"))
                .collect::<Vec<_>>()
        })
        .unwrap_or_default();
    std::iter::once(PathBuf::from("/usr/bin/chromium"))
        .chain(on_path)
        .find(|p| p.is_file())
        .expect(
            "this test drives the dashboard in a real browser and needs Chromium: \
             `apt-get install chromium` (or set CHROMIUM to its path)",
        )
}

/// A headless Chromium with a DevTools port; killed (its whole process group) when dropped.
struct Chromium {
    child: Child,
    port: u16,
    log: Arc<Mutex<Vec<String>>>,
    _profile: tempfile::TempDir,
}

impl Chromium {
    fn launch() -> Chromium {
        use std::os::unix::process::CommandExt;
        let profile = tempfile::tempdir().unwrap();
        let mut child = Command::new(chromium_path())
            .args([
                "--headless=new",
                "--no-sandbox",
                "--disable-gpu",
                "--remote-debugging-port=0",
                "--window-size=1280,1000",
            ])
            .arg(format!("--user-data-dir={}", profile.path().display()))
            .arg("about:blank")
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .process_group(0)
            .spawn()
            .expect("chromium starts");
        let stderr = BufReader::new(child.stderr.take().unwrap());
        let log = Arc::new(Mutex::new(Vec::new()));
        let (tx, rx) = mpsc::channel();
        let sink = log.clone();
        std::thread::spawn(move || {
            for line in stderr.lines().map_while(Result::ok) {
                if let Some(url) = line.split("DevTools listening on ").nth(1) {
                    let _ = tx.send(url.trim().to_string());
                }
                sink.lock().unwrap().push(line);
            }
        });
        let mut chromium = Chromium {
            child,
            port: 0,
            log,
            _profile: profile,
        };
        let url = rx
            .recv_timeout(Duration::from_secs(30))
            .unwrap_or_else(|_| {
                panic!(
                    "chromium printed no DevTools address; its log:\n{}",
                    chromium.log_tail(30)
                )
            });
        // ws://127.0.0.1:PORT/devtools/browser/ID
        chromium.port = url
            .trim_start_matches("ws://")
            .split(['/', ':'])
            .nth(1)
            .and_then(|p| p.parse().ok())
            .unwrap_or_else(|| panic!("no port in the DevTools address {url:?}"));
        chromium
    }

    fn log_tail(&self, n: usize) -> String {
        let log = self.log.lock().unwrap();
        log[log.len().saturating_sub(n)..].join("\n")
    }

    /// The DevTools websocket of the first page target.
    fn page_websocket(&self) -> String {
        let url = format!("http://127.0.0.1:{}/json/list", self.port);
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let targets: Value = ureq::get(&url)
                .call()
                .ok()
                .and_then(|r| r.into_string().ok())
                .and_then(|text| serde_json::from_str(&text).ok())
                .unwrap_or(Value::Null);
            let page = targets.as_array().and_then(|list| {
                list.iter()
                    .find(|t| t["type"] == "page")
                    .and_then(|t| t["webSocketDebuggerUrl"].as_str())
                    .map(str::to_string)
            });
            if let Some(ws) = page {
                return ws;
            }
            assert!(
                Instant::now() < deadline,
                "no page target at {url}: {targets}\nchromium log:\n{}",
                self.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Chromium {
    fn drop(&mut self) {
        // The browser leads its own process group: end it and its helpers.
        let group = format!("-{}", self.child.id());
        let _ = Command::new("kill").args(["-TERM", "--", &group]).status();
        let deadline = Instant::now() + Duration::from_secs(5);
        while matches!(self.child.try_wait(), Ok(None)) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(50));
        }
        let _ = Command::new("kill").args(["-KILL", "--", &group]).status();
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// A Chrome DevTools Protocol session with one page.
struct Cdp {
    ws: tungstenite::WebSocket<TcpStream>,
    next_id: u64,
    /// Exceptions and console messages the page reported.
    page_log: Vec<String>,
}

impl Cdp {
    fn connect(url: &str) -> Cdp {
        let host = url
            .trim_start_matches("ws://")
            .split('/')
            .next()
            .unwrap()
            .to_string();
        let socket = TcpStream::connect(&host).expect("connect to chromium's DevTools port");
        let (ws, _) = tungstenite::client(url, socket).expect("DevTools websocket handshake");
        // Reads give up now and then so that a deadline can be checked.
        ws.get_ref()
            .set_read_timeout(Some(Duration::from_millis(500)))
            .unwrap();
        Cdp {
            ws,
            next_id: 0,
            page_log: Vec::new(),
        }
    }

    /// Sends a command and returns its result; events that arrive meanwhile are logged.
    fn call(&mut self, method: &str, params: Value) -> Value {
        self.next_id += 1;
        let id = self.next_id;
        let message = json!({"id": id, "method": method, "params": params}).to_string();
        self.ws
            .send(tungstenite::Message::Text(message))
            .unwrap_or_else(|e| panic!("send {method}: {e}"));
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            match self.ws.read() {
                Ok(tungstenite::Message::Text(text)) => {
                    let v: Value = serde_json::from_str(&text).expect("DevTools sends JSON");
                    if v["id"] == id {
                        assert!(v.get("error").is_none(), "{method} failed: {v}");
                        return v["result"].clone();
                    }
                    self.note(&v);
                }
                Ok(_) => {}
                Err(tungstenite::Error::Io(e))
                    if matches!(
                        e.kind(),
                        std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                    ) => {}
                Err(e) => panic!("DevTools websocket, waiting for {method}: {e}"),
            }
            assert!(Instant::now() < deadline, "no answer to {method}");
        }
    }

    fn note(&mut self, event: &Value) {
        match event["method"].as_str() {
            Some("Runtime.exceptionThrown") => self.page_log.push(format!(
                "exception: {}",
                event["params"]["exceptionDetails"]
            )),
            Some("Runtime.consoleAPICalled") => self.page_log.push(format!(
                "console.{}: {}",
                event["params"]["type"].as_str().unwrap_or("?"),
                event["params"]["args"]
            )),
            _ => {}
        }
    }

    /// The value of a JavaScript expression in the page.
    fn eval(&mut self, expression: &str) -> Value {
        let r = self.call(
            "Runtime.evaluate",
            json!({"expression": expression, "returnByValue": true}),
        );
        assert!(
            r.get("exceptionDetails").is_none(),
            "{expression} threw: {}",
            r["exceptionDetails"]
        );
        r["result"]["value"].clone()
    }
}

/// What the dashboard shows, as the test checks it.
const PAGE_STATE: &str = r#"(() => {
  const q = (s) => document.querySelector(s);
  const all = (s) => [...document.querySelectorAll(s)];
  return {
    url: location.href,
    stream: q('#stream-state') && q('#stream-state').dataset.state,
    stream_text: q('#stream-state') && q('#stream-state').textContent,
    event_count: q('#event-count') && q('#event-count').textContent,
    segments: all('#segments .segment[data-segment]').map((e) => e.dataset.segment),
    triggers: all('#triggers li').map((e) => e.dataset.change + ' ' + e.dataset.segment),
    clock: q('#status-clock') && q('#status-clock').textContent,
    token_form: !!q('#token-form') && !q('#token-form').hidden,
    rate: q('#status-rate') && q('#status-rate').textContent,
    profile_events: document.body && document.body.dataset.profileEvents,
    segment_events: document.body && document.body.dataset.segmentEvents,
  };
})()"#;

/// Polls the page state until `done` holds; fails showing the last state, the page's
/// console and the engine log.
fn wait_for_page(
    cdp: &mut Cdp,
    engine: &Engine,
    what: &str,
    done: impl Fn(&Value) -> bool,
) -> Value {
    let deadline = Instant::now() + PAGE_WAIT;
    loop {
        let state = cdp.eval(PAGE_STATE);
        if done(&state) {
            return state;
        }
        assert!(
            Instant::now() < deadline,
            "gave up waiting for the dashboard to show {what}; it shows:\n{state:#}\n\
             page console:\n{}\nengine log tail:\n{}",
            cdp.page_log.join("\n"),
            engine.log_tail(30)
        );
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Decodes standard base64 (as DevTools sends screenshots).
fn base64_decode(text: &str) -> Vec<u8> {
    let digit = |c: u8| -> u32 {
        match c {
            b'A'..=b'Z' => u32::from(c - b'A'),
            b'a'..=b'z' => u32::from(c - b'a') + 26,
            b'0'..=b'9' => u32::from(c - b'0') + 52,
            b'+' => 62,
            b'/' => 63,
            _ => panic!("not base64: {:?}", c as char),
        }
    };
    let digits: Vec<u32> = text.bytes().filter(|&c| c != b'=').map(digit).collect();
    let mut out = Vec::with_capacity(digits.len() / 4 * 3 + 3);
    for group in digits.chunks(4) {
        let n = group
            .iter()
            .enumerate()
            .fold(0u32, |n, (i, d)| n | d << (18 - 6 * i));
        out.extend_from_slice(&n.to_be_bytes()[1..group.len()]);
    }
    out
}

fn artifacts_dir() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("target/test-artifacts")
}

#[test]
fn dashboard_shows_live_changes_in_headless_chromium() {
    // With a read token: the page asks for it and keeps it in a cookie, which its EventSource
    // and fetches then carry.
    let engine = Engine::start_with_token(256, None, "dash-token");
    let chromium = Chromium::launch();
    let mut cdp = Cdp::connect(&chromium.page_websocket());
    cdp.call("Runtime.enable", json!({}));
    cdp.call(
        "Page.navigate",
        json!({"url": format!("{}/?user=u1", engine.base)}),
    );
    wait_for_page(&mut cdp, &engine, "the token field after a 401", |s| {
        s["token_form"] == true && s["stream"] != "live"
    });
    cdp.eval(
        "document.querySelector('#token-input').value = 'dash-token'; \
         document.querySelector('#token-form').requestSubmit(); true",
    );

    // Subscribed at once from ?user=, and told u1 has no events yet.
    wait_for_page(&mut cdp, &engine, "a live stream for u1", |s| {
        s["stream"] == "live" && s["profile_events"].as_str().is_some_and(|n| n != "0")
    });

    engine.append(&[event("e1", "u1", "add_to_cart", "mobile")]);
    let shown = wait_for_page(
        &mut cdp,
        &engine,
        "u1's event, cart_abandoner and its trigger",
        |s| {
            s["event_count"] == "1"
                && s["segments"]
                    .as_array()
                    .is_some_and(|a| a.contains(&json!("cart_abandoner")))
                && s["triggers"]
                    .as_array()
                    .is_some_and(|a| a.contains(&json!("enter cart_abandoner")))
        },
    );
    // The status panel has polled the engine's clock (its placeholder is a dash).
    let has_clock = |s: &Value| {
        s["clock"]
            .as_str()
            .is_some_and(|c| !c.trim().is_empty() && c != "\u{2013}")
    };
    let shown = if has_clock(&shown) {
        shown
    } else {
        wait_for_page(&mut cdp, &engine, "the engine clock", has_clock)
    };
    assert_eq!(shown["stream"], "live", "{shown:#}");
    assert_eq!(shown["token_form"], false, "{shown:#}");
    assert!(
        !cdp.page_log.iter().any(|l| l.starts_with("exception")),
        "the page threw:\n{}",
        cdp.page_log.join("\n")
    );

    let shot = cdp.call("Page.captureScreenshot", json!({"format": "png"}));
    let png = base64_decode(shot["data"].as_str().expect("screenshot data"));
    assert!(
        png.starts_with(b"\x89PNG\r\n\x1a\n") && png.len() > 1000,
        "not a PNG screenshot ({} bytes)",
        png.len()
    );
    let dir = artifacts_dir();
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("dashboard.png"), &png).unwrap();
    drop(chromium);
}
