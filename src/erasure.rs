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
        let created = !self.path.exists();
        let mut file = std::fs::OpenOptions::new()
            .create(true)
            .read(true)
            .append(true)
            .open(&self.path)
            .with_context(|| format!("cannot open the erasure log {}", self.path.display()))?;
        // After a crash mid-append the file ends in a torn line: end it, so that this record
        // starts a line of its own (`load` skips the torn one).
        let mut line = Vec::new();
        if !ends_with_newline(&mut file)? {
            line.push(b'\n');
        }
        line.extend(serde_json::to_vec(e)?);
        line.push(b'\n');
        file.write_all(&line)
            .and_then(|_| file.sync_data())
            .with_context(|| format!("cannot write the erasure log {}", self.path.display()))?;
        if created {
            // The new file's directory entry must be durable too.
            if let Some(dir) = self.path.parent().filter(|d| !d.as_os_str().is_empty()) {
                std::fs::File::open(dir).and_then(|d| d.sync_all()).ok();
            }
        }
        Ok(())
    }
}

fn ends_with_newline(file: &mut std::fs::File) -> Result<bool> {
    use std::io::{Read, Seek, SeekFrom};
    let len = file.metadata()?.len();
    if len == 0 {
        return Ok(true);
    }
    let mut last = [0u8];
    file.seek(SeekFrom::Start(len - 1))?;
    file.read_exact(&mut last)?;
    Ok(last[0] == b'\n')
}

/// Every erasure of the log at `path` and of its per-process siblings (`NAME.pN.EXT`, written
/// by the processes of a cluster): any process, and a replay, must apply them all, whatever
/// the cluster's layout was when they were recorded.
pub fn load_family(path: &Path) -> Result<Vec<Erasure>> {
    let mut out = Vec::new();
    for p in family(path)? {
        out.extend(load(&p)?);
    }
    Ok(out)
}

/// The files of [`load_family`] that exist, for messages.
pub fn family_files(path: &Path) -> Vec<PathBuf> {
    family(path)
        .unwrap_or_default()
        .into_iter()
        .filter(|p| p.is_file())
        .collect()
}

/// `path` without a `.pN` suffix, and every `.pN` sibling that exists.
fn family(path: &Path) -> Result<Vec<PathBuf>> {
    if path.as_os_str().is_empty() {
        return Ok(Vec::new());
    }
    let name = path.file_name().unwrap_or_default().to_string_lossy();
    let (stem, ext) = match name.rsplit_once('.') {
        Some((s, e)) => (s.to_string(), format!(".{e}")),
        None => (name.to_string(), String::new()),
    };
    let base_stem = match stem.rsplit_once(".p") {
        Some((b, n)) if !n.is_empty() && n.bytes().all(|c| c.is_ascii_digit()) => b.to_string(),
        _ => stem,
    };
    let dir = path
        .parent()
        .filter(|d| !d.as_os_str().is_empty())
        .unwrap_or(Path::new("."));
    let mut out = vec![dir.join(format!("{base_stem}{ext}"))];
    let entries = match std::fs::read_dir(dir) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(out),
        Err(e) => return Err(e).with_context(|| format!("cannot list {}", dir.display())),
    };
    let mut siblings = Vec::new();
    for entry in entries.flatten() {
        let n = entry.file_name().to_string_lossy().to_string();
        let process = n
            .strip_prefix(&format!("{base_stem}.p"))
            .and_then(|rest| rest.strip_suffix(ext.as_str()));
        if process.is_some_and(|d| !d.is_empty() && d.bytes().all(|c| c.is_ascii_digit())) {
            siblings.push(entry.path());
        }
    }
    siblings.sort();
    out.extend(siblings);
    Ok(out)
}

/// Every erasure in the log at `path` (none if there is no file). A torn line (a crash during
/// an append, which was then never confirmed) is skipped when it is the last one, or when the
/// next append ended it; any other bad line fails: starting without an erasure would bring the
/// user back.
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
            Err(_) if (!complete && i + 1 == lines.len()) || is_torn(line) => {
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

/// A prefix of a record (what a crash mid-append leaves), rather than a foreign line.
fn is_torn(line: &[u8]) -> bool {
    let record = br#"{"user_hash":""#;
    let n = line.len().min(record.len());
    n > 0 && line[..n] == record[..n] && !line.ends_with(b"}")
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
        // The next append ends the torn line: both records after it count.
        let log2 = ErasureLog::new(path.clone());
        log2.append(&a).unwrap();
        assert_eq!(load(&path).unwrap().len(), 3);
        // Per-process siblings are read with the base log, whichever of them is named.
        std::fs::copy(&path, dir.path().join("erasures.p3.jsonl")).unwrap();
        std::fs::write(dir.path().join("erasures.px.jsonl"), "garbage\n").unwrap();
        assert_eq!(
            load_family(&dir.path().join("erasures.p0.jsonl"))
                .unwrap()
                .len(),
            6
        );
        // A bad line in the middle is an error: skipping it would bring a user back.
        std::fs::write(&path, "garbage\n{}\n").unwrap();
        assert!(load(&path).unwrap_err().to_string().contains("line 1"));
        assert!(load(&dir.path().join("missing")).unwrap().is_empty());
    }
}
