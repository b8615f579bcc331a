//! Dead letters: every rejected line or message, with its reason and where it came from, as one
//! JSON record `{"reason", "detail", "source", "raw"}` to the dead-letter sink (a JSON Lines
//! file, or a Kafka topic with that file as fallback). Nothing is dropped silently.

use crate::metrics::Metrics;
use crate::parse::Rejection;
use crate::sink::Sink;
use serde::Serialize;
use std::time::Duration;

/// How much of a rejected line is kept.
pub const RAW_PREFIX_BYTES: usize = 4096;

#[derive(Serialize)]
struct Record<'a> {
    reason: &'a str,
    detail: &'a str,
    source: &'a str,
    raw: &'a str,
}

pub struct DeadLetters {
    sink: Sink,
    metrics: Metrics,
}

impl DeadLetters {
    pub fn new(sink: Sink, metrics: Metrics) -> Self {
        DeadLetters { sink, metrics }
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
        if let Ok(line) = serde_json::to_vec(&record) {
            self.sink.send(None, &line);
        }
    }

    /// Delivers what is still queued (Kafka) before the process exits.
    pub fn flush(&self) {
        self.sink.flush(Duration::from_secs(10));
    }

    pub fn describe(&self) -> String {
        self.sink.describe()
    }
}
