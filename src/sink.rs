//! Record sinks: where persona writes JSON records it emits (dead letters now; triggers later).
//!
//! A sink is a JSON Lines file or a Kafka topic. A Kafka sink never loses a record to a broker
//! problem: a record the producer cannot queue, or that the broker finally refuses, is appended
//! to the sink's fallback file with an error in the log.

use crate::config::KafkaConfig;
use crate::kafka_client::{client_config, Role};
use anyhow::{Context, Result};
use rdkafka::client::ClientContext;
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::Message;
use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// A JSON Lines file, created on the first record.
pub struct FileSink {
    path: PathBuf,
    file: Mutex<Option<BufWriter<File>>>,
}

impl FileSink {
    pub fn new(path: &Path) -> Self {
        FileSink {
            path: path.to_path_buf(),
            file: Mutex::new(None),
        }
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    /// Appends one line (`record` without its newline). Failures are logged, never fatal.
    pub fn write(&self, record: &[u8]) {
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
                    tracing::error!(path = %self.path.display(), "cannot open sink file: {e}");
                    return;
                }
            }
        }
        if let Some(w) = guard.as_mut() {
            if let Err(e) = w
                .write_all(record)
                .and_then(|_| w.write_all(b"\n"))
                .and_then(|_| w.flush())
            {
                tracing::error!(path = %self.path.display(), "cannot write to sink file: {e}");
            }
        }
    }
}

/// Sends failed deliveries to the fallback file.
struct Fallback {
    file: Arc<FileSink>,
    failed: Arc<AtomicU64>,
}

impl ClientContext for Fallback {}

impl ProducerContext for Fallback {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, msg)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            tracing::error!(
                topic = msg.topic(),
                fallback = %self.file.path().display(),
                "kafka sink: delivery failed ({e}); record written to the fallback file"
            );
            self.file.write(msg.payload().unwrap_or_default());
        }
    }
}

/// A Kafka topic, with a file for records Kafka did not take.
pub struct KafkaSink {
    topic: String,
    producer: ThreadedProducer<Fallback>,
    fallback: Arc<FileSink>,
    failed: Arc<AtomicU64>,
}

/// How long `send` waits for room in librdkafka's queue before using the fallback file.
const QUEUE_WAIT: Duration = Duration::from_secs(1);

impl KafkaSink {
    pub fn new(kafka: &KafkaConfig, topic: &str, fallback: &Path) -> Result<Self> {
        let fallback = Arc::new(FileSink::new(fallback));
        let failed = Arc::new(AtomicU64::new(0));
        let producer = client_config(kafka, Role::Writer)
            .create_with_context(Fallback {
                file: fallback.clone(),
                failed: failed.clone(),
            })
            .with_context(|| format!("cannot create a Kafka producer for topic {topic}"))?;
        Ok(KafkaSink {
            topic: topic.to_string(),
            producer,
            fallback,
            failed,
        })
    }

    fn send(&self, key: Option<&[u8]>, record: &[u8]) {
        let deadline = Instant::now() + QUEUE_WAIT;
        loop {
            let mut r = BaseRecord::to(&self.topic).payload(record);
            if let Some(k) = key {
                r = r.key(k);
            }
            match self.producer.send(r) {
                Ok(()) => return,
                Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _))
                    if Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(5));
                }
                Err((e, _)) => {
                    self.failed.fetch_add(1, Ordering::Relaxed);
                    tracing::error!(topic = %self.topic, fallback = %self.fallback.path().display(), "kafka sink: cannot queue a record ({e}); written to the fallback file");
                    self.fallback.write(record);
                    return;
                }
            }
        }
    }
}

/// Where records go.
pub enum Sink {
    File(FileSink),
    Kafka(KafkaSink),
}

impl Sink {
    pub fn send(&self, key: Option<&[u8]>, record: &[u8]) {
        match self {
            Sink::File(f) => f.write(record),
            Sink::Kafka(k) => k.send(key, record),
        }
    }

    /// Waits (up to `timeout`) for queued records to be delivered.
    pub fn flush(&self, timeout: Duration) {
        if let Sink::Kafka(k) = self {
            if let Err(e) = k.producer.flush(timeout) {
                tracing::error!(topic = %k.topic, "kafka sink: records still queued at shutdown: {e}");
            }
        }
    }

    /// Records that went to the fallback file instead of Kafka.
    pub fn failed(&self) -> u64 {
        match self {
            Sink::File(_) => 0,
            Sink::Kafka(k) => k.failed.load(Ordering::Relaxed),
        }
    }

    pub fn describe(&self) -> String {
        match self {
            Sink::File(f) => format!("file {}", f.path().display()),
            Sink::Kafka(k) => format!("kafka topic {}", k.topic),
        }
    }
}
