//! The dead-letter sink: every rejected line, with its reason and where it came from, as one
//! JSON Lines record `{"reason", "detail", "source", "raw"}`. Nothing is dropped silently.

use crate::metrics::Metrics;
use crate::parse::Rejection;
use serde::Serialize;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Mutex;

/// How much of a rejected line is kept.
pub const RAW_PREFIX_BYTES: usize = 4096;

#[derive(Serialize)]
struct Record<'a> {
    reason: &'a str,
    detail: &'a str,
    source: &'a str,
    raw: &'a str,
}

/// A JSON Lines file of dead letters, created on the first one.
pub struct DeadLetters {
    path: PathBuf,
    file: Mutex<Option<BufWriter<File>>>,
    metrics: Metrics,
}

impl DeadLetters {
    pub fn new(path: &Path, metrics: Metrics) -> Self {
        DeadLetters {
            path: path.to_path_buf(),
            file: Mutex::new(None),
            metrics,
        }
    }

    /// Records one rejected line. A failure to write is logged, never fatal to the engine.
    pub fn reject(&self, rejection: &Rejection, source: &str, raw: &[u8]) {
        self.metrics.dead_letter(rejection.reason);
        tracing::debug!(
            reason = rejection.reason,
            source,
            "dead letter: {}",
            rejection.detail
        );
        let mut end = raw.len().min(RAW_PREFIX_BYTES);
        while end > 0 && end < raw.len() && (raw[end] & 0xC0) == 0x80 {
            end -= 1; // keep whole UTF-8 sequences
        }
        let raw = String::from_utf8_lossy(&raw[..end]);
        let record = Record {
            reason: rejection.reason,
            detail: &rejection.detail,
            source,
            raw: raw.trim_end_matches(['\r', '\n']),
        };
        let Ok(mut line) = serde_json::to_vec(&record) else {
            return;
        };
        line.push(b'\n');
        let mut guard = match self.file.lock() {
            Ok(g) => g,
            Err(poisoned) => poisoned.into_inner(),
        };
        if guard.is_none() {
            match OpenOptions::new()
                .create(true)
                .append(true)
                .open(&self.path)
            {
                Ok(f) => *guard = Some(BufWriter::new(f)),
                Err(e) => {
                    tracing::error!(path = %self.path.display(), "cannot open dead-letter file: {e}");
                    return;
                }
            }
        }
        if let Some(w) = guard.as_mut() {
            if let Err(e) = w.write_all(&line).and_then(|_| w.flush()) {
                tracing::error!(path = %self.path.display(), "cannot write dead letter: {e}");
            }
        }
    }
}
