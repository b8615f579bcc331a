//! The one place rdkafka clients are configured. Every setting persona chooses says why;
//! `kafka.properties` from the config is applied last, so an operator can override any of them
//! (and must supply security settings there).

use crate::config::{KafkaConfig, StartOffset};
use rdkafka::client::ClientContext;
use rdkafka::config::ClientConfig;
use rdkafka::consumer::ConsumerContext;
use rdkafka::error::KafkaError;
use rdkafka::statistics::Statistics;
use rdkafka::types::RDKafkaErrorCode;
use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

/// High watermarks by (topic, partition), as the brokers' fetch responses report them.
/// (Not from ListOffsets requests: tansu answers those wrongly.)
pub type Watermarks = Arc<Mutex<BTreeMap<(String, i32), i64>>>;

/// Logs librdkafka's errors through `tracing` (reaching the end of a partition is not one) and
/// keeps the high watermarks its statistics report.
#[derive(Default)]
pub struct KafkaContext {
    pub watermarks: Option<Watermarks>,
}

impl ClientContext for KafkaContext {
    fn stats(&self, statistics: Statistics) {
        let Some(w) = &self.watermarks else { return };
        let mut w = w.lock().unwrap_or_else(|p| p.into_inner());
        for (name, topic) in statistics.topics {
            for (p, part) in topic.partitions {
                if p >= 0 && part.hi_offset >= 0 {
                    w.insert((name.clone(), p), part.hi_offset);
                }
            }
        }
    }

    fn error(&self, error: KafkaError, reason: &str) {
        let end_of_partition = matches!(
            error,
            KafkaError::PartitionEOF(_) | KafkaError::Global(RDKafkaErrorCode::PartitionEOF)
        );
        if !end_of_partition {
            tracing::warn!("librdkafka: {error}: {reason}");
        }
    }
}

impl ConsumerContext for KafkaContext {}

/// What a client is for.
pub enum Role<'a> {
    /// Reads partitions persona assigns itself; `group` is unique to the reader.
    Reader { group: &'a str, start: StartOffset },
    /// Metadata and watermarks only.
    Monitor,
    /// Writes records (dead letters, `persona produce`).
    Writer,
}

pub fn client_config(kafka: &KafkaConfig, role: Role<'_>) -> ClientConfig {
    let mut c = ClientConfig::new();
    c.set("bootstrap.servers", &kafka.brokers)
        .set("client.id", "persona")
        // A restarted broker is found again within a second or two, not after librdkafka's
        // default 10 s backoff.
        .set("reconnect.backoff.max.ms", "1000");
    match role {
        Role::Reader { group, start } => {
            // librdkafka needs a group to assign partitions. A unique one, never joined
            // (`assign`, not `subscribe`), keeps the broker's group balancing away from
            // persona's own partition → worker rule.
            c.set("group.id", group)
                // Positions belong to persona's state, not to the broker's group offsets.
                .set("enable.auto.commit", "false")
                .set("enable.auto.offset.store", "false")
                // End-of-partition events tell a worker it has read a partition's backlog.
                .set("enable.partition.eof", "true")
                // Where to start when a position is unknown or no longer retained.
                .set(
                    "auto.offset.reset",
                    match start {
                        StartOffset::Earliest => "earliest",
                        StartOffset::Latest => "latest",
                    },
                )
                // Watermarks (for lag) arrive with the statistics, every second.
                .set("statistics.interval.ms", "1000")
                // Freshness: a fetch that finds nothing returns within 10 ms instead of 500 ms,
                // so a message produced just after it is not held back by the broker's wait.
                .set("fetch.wait.max.ms", "10");
        }
        Role::Monitor => {}
        Role::Writer => {
            // Records leave within 5 ms; batching still happens under load.
            c.set("linger.ms", "5");
        }
    }
    for (k, v) in &kafka.properties {
        c.set(k, v);
    }
    c
}
