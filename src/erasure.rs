//! The erasure log: every `DELETE /v1/users/{id}`, kept so that an erased user stays gone.
//!
//! A source re-read from the start (a restart without checkpoints, a replay, a backfill) would
//! bring an erased user's events back; the log's records are applied again at every start, as
//! the erasure control records they were. A record holds the user's hash, not the id: the log
//! must not itself keep what it erases. Appends are fsynced before the erasure is confirmed.

use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// One erasure: every event of `user` with `ts <= through` is removed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Erasure {
    /// The user's id hash, as 16 hex digits.
    #[serde(with = "hex_u64")]
    pub user_hash: u64,
    pub through_ms: u64,
    /// Wall-clock time of the request (for audits).
    pub requested_at_ms: u64,
}

/// Appends to the log; one writer per process.
pub struct ErasureLog {
    path: PathBuf,
    lock: Mutex<()>,
}

impl ErasureLog {
    pub fn new(path: PathBuf) -> Self {
        ErasureLog {
            path,
            lock: Mutex::new(()),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends `e` and waits until it is on disk.
    pub fn append(&self, e: &Erasure) -> Result<()> {
        if self.path.as_os_str().is_empty() {
            bail!("engine.erasure_log is empty: an erasure would not survive a restart");
        }
        let _guard = self.lock.lock().unwrap_or_else(|p| p.into_inner());
        let mut line = serde_json::to_vec(e)?;
        line.push(b'\n');
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open the erasure log {}", self.path.display()))?;
        file.write_all(&line)
            .and_then(|_| file.sync_data())
            .with_context(|| format!("cannot write the erasure log {}", self.path.display()))
    }
}

/// Every erasure in the log at `path` (none if there is no file). A torn last line (a crash
/// during an append, which was then never confirmed) is skipped; any other bad line fails:
/// starting without an erasure would bring the user back.
pub fn load(path: &Path) -> Result<Vec<Erasure>> {
    if path.as_os_str().is_empty() {
        return Ok(Vec::new());
    }
    let text = match std::fs::read(path) {
        Ok(t) => t,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
        Err(e) => {
            return Err(e)
                .with_context(|| format!("cannot read the erasure log {}", path.display()))
        }
    };
    let complete = text.ends_with(b"\n");
    let lines: Vec<&[u8]> = text.split(|b| *b == b'\n').collect();
    let mut out = Vec::new();
    for (i, line) in lines.iter().enumerate() {
        if line.iter().all(u8::is_ascii_whitespace) {
            continue;
        }
        match serde_json::from_slice::<Erasure>(line) {
            Ok(e) => out.push(e),
            Err(_) if !complete && i + 1 == lines.len() => {
                tracing::warn!(
                    "erasure log {}: skipping a torn last line (an unconfirmed erasure)",
                    path.display()
                );
            }
            Err(e) => bail!(
                "erasure log {} line {}: {e}; fix or remove the line to start",
                path.display(),
                i + 1
            ),
        }
    }
    Ok(out)
}

mod hex_u64 {
    use serde::{de::Error, Deserialize, Deserializer, Serializer};

    pub fn serialize<S: Serializer>(v: &u64, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(&format!("{v:016x}"))
    }

    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<u64, D::Error> {
        let s = <std::borrow::Cow<str>>::deserialize(d)?;
        u64::from_str_radix(&s, 16).map_err(D::Error::custom)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip_and_torn_tail() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("erasures.jsonl");
        let log = ErasureLog::new(path.clone());
        let a = Erasure {
            user_hash: 0xdead_beef,
            through_ms: 5,
            requested_at_ms: 6,
        };
        log.append(&a).unwrap();
        log.append(&Erasure {
            user_hash: u64::MAX,
            ..a
        })
        .unwrap();
        assert_eq!(load(&path).unwrap().len(), 2);
        // A crash mid-append leaves a torn last line: skipped.
        std::fs::OpenOptions::new()
            .append(true)
            .open(&path)
            .unwrap()
            .write_all(b"{\"user_hash\":\"00")
            .unwrap();
        assert_eq!(
            load(&path).unwrap(),
            vec![
                a,
                Erasure {
                    user_hash: u64::MAX,
                    ..a
                }
            ]
        );
        // A bad line in the middle is an error: skipping it would bring a user back.
        std::fs::write(&path, "garbage\n{}\n").unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("line 1"));
        assert!(load(&dir.path().join("missing")).unwrap().is_empty());
    }
}
