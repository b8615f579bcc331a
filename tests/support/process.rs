//! The `persona` binary as a child process: spawned, found on its HTTP port, queried over real
//! sockets, stopped with SIGTERM. Its log lines are kept for assertions.

use serde_json::Value;
use std::io::{BufRead, BufReader};
use std::process::{Child, Command, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

pub struct Process {
    pub child: Child,
    /// `http://ADDR` (or `https://`) from the log line "persona listening on http://ADDR".
    pub base: String,
    log: Arc<Mutex<Vec<String>>>,
}

/// Spawns `cmd` (a `persona run`-like command) and waits until it listens.
pub fn spawn_listening(mut cmd: Command) -> Process {
    let mut child = cmd
        .env("RUST_LOG", "info")
        .stderr(Stdio::piped())
        .stdout(Stdio::null())
        .spawn()
        .expect("the persona binary starts");
    let mut stderr = BufReader::new(child.stderr.take().unwrap());
    let log = Arc::new(Mutex::new(Vec::new()));
    let mut line = String::new();
    let base = loop {
        line.clear();
        assert!(
            stderr.read_line(&mut line).unwrap() > 0,
            "persona exited before listening; its log:\n{}",
            log.lock().unwrap().join("")
        );
        log.lock().unwrap().push(line.clone());
        if let Some(pos) = line.find("listening on http") {
            break line[pos + "listening on ".len()..]
                .split_whitespace()
                .next()
                .unwrap()
                .to_string();
        }
    };
    let sink = log.clone();
    std::thread::spawn(move || {
        for l in stderr.lines().map_while(Result::ok) {
            sink.lock().unwrap().push(l);
        }
    });
    Process { child, base, log }
}

impl Process {
    /// GET `path`: status, JSON body (or the text as a JSON string), `x-persona-worker`.
    /// `GET /metrics` as text.
    pub fn metrics(&self) -> String {
        ureq::get(&format!("{}/metrics", self.base))
            .call()
            .unwrap()
            .into_string()
            .unwrap()
    }

    pub fn get(&self, path: &str) -> (u16, Value, Option<String>) {
        self.call("GET", path, None)
    }

    /// `method` on `path` with an optional bearer token: status, JSON body, `x-persona-worker`.
    pub fn call(
        &self,
        method: &str,
        path: &str,
        token: Option<&str>,
    ) -> (u16, Value, Option<String>) {
        let mut request =
            ureq::request(method, &format!("{}{path}", self.base)).timeout(Duration::from_secs(30));
        if let Some(t) = token {
            request = request.set("Authorization", &format!("Bearer {t}"));
        }
        let response = match request.call() {
            Ok(r) => r,
            Err(ureq::Error::Status(_, r)) => r,
            Err(e) => panic!("{method} {path}: {e}"),
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

    /// Polls `check` until it holds; fails after `secs` (no timing is asserted).
    pub fn wait_for(&self, secs: u64, what: &str, check: impl Fn(&Process) -> bool) {
        let deadline = Instant::now() + Duration::from_secs(secs);
        while !check(self) {
            assert!(
                Instant::now() < deadline,
                "gave up waiting for {what}; status: {}\nlog tail:\n{}",
                self.get("/v1/status").1,
                self.log_tail(30)
            );
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn log_contains(&self, needle: &str) -> bool {
        self.log.lock().unwrap().iter().any(|l| l.contains(needle))
    }

    pub fn log_tail(&self, n: usize) -> String {
        let log = self.log.lock().unwrap();
        log[log.len().saturating_sub(n)..].join("\n")
    }

    pub fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }

    /// SIGTERM, and a clean exit within 20 s.
    pub fn stop(&mut self) {
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
                    "persona exited with {status} after SIGTERM; log tail:\n{}",
                    self.log_tail(30)
                );
                return;
            }
            if Instant::now() > deadline {
                let _ = self.child.kill();
                panic!("persona did not stop after SIGTERM");
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

impl Drop for Process {
    /// A failed assertion must not leave the process running.
    fn drop(&mut self) {
        if let Ok(None) = self.child.try_wait() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The complete lines of a file the engine may be appending to: a read can see part of a
/// concurrent write, so a last line without its newline is not read yet. Empty if absent.
pub fn complete_lines(path: &std::path::Path) -> String {
    let mut text = std::fs::read_to_string(path).unwrap_or_default();
    text.truncate(text.rfind('\n').map_or(0, |end| end + 1));
    text
}
