//! `persona produce` and `persona record`: event logs to and from Kafka.
//!
//! `produce` keys each message by its `user_id` and picks the partition with the engine's own
//! routing hash ([`persona_dataflows::owner`] of the user's key), so a user's events stay in one
//! partition, in log order. Lines without a readable `user_id` are still sent (round-robin, no
//! key): the engine's validation, not the producer, decides what is a dead letter.

use crate::config::{Config, KafkaConfig, Settings};
use crate::kafka_client::{client_config, KafkaContext, Role};
use crate::names;
use crate::source::{LineSource, Next};
use anyhow::{anyhow, bail, Context, Result};
use rdkafka::client::ClientContext;
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::producer::{BaseRecord, DeliveryResult, Producer, ProducerContext, ThreadedProducer};
use rdkafka::types::RDKafkaErrorCode;
use rdkafka::{Message, Offset, TopicPartitionList};
use serde::Deserialize;
use std::borrow::Cow;
use std::io::{BufWriter, Write};
use std::path::PathBuf;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Mutex;
use std::time::{Duration, Instant};

const METADATA_TIMEOUT: Duration = Duration::from_secs(10);

/// The partition count of `topic`, with a clear error when the brokers or the topic are missing.
pub fn partitions(kafka: &KafkaConfig, topic: &str) -> Result<i32> {
    let consumer: BaseConsumer<KafkaContext> = client_config(kafka, Role::Monitor)
        .create_with_context(KafkaContext::default())
        .context("invalid Kafka client configuration")?;
    let md = consumer
        .fetch_metadata(Some(topic), METADATA_TIMEOUT)
        .with_context(|| format!("cannot reach the Kafka brokers at {}", kafka.brokers))?;
    match md.topics().iter().find(|t| t.name() == topic) {
        Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
            Ok(t.partitions().len() as i32)
        }
        _ => bail!(
            "topic {topic:?} does not exist on {} (create it: scripts/kafka.sh topics)",
            kafka.brokers
        ),
    }
}

#[derive(Deserialize)]
struct KeyOnly<'a> {
    #[serde(borrow, default)]
    user_id: Option<Cow<'a, str>>,
}

/// The key and partition of one log line.
pub fn route(line: &[u8], partitions: i32, fallback: u64) -> (Option<Vec<u8>>, i32) {
    match serde_json::from_slice::<KeyOnly<'_>>(line) {
        Ok(KeyOnly {
            user_id: Some(user),
        }) if !user.is_empty() => {
            let p = persona_dataflows::owner(names::hash(&user), partitions as usize) as i32;
            (Some(user.as_bytes().to_vec()), p)
        }
        _ => (None, (fallback % partitions as u64) as i32),
    }
}

struct Delivery {
    failed: AtomicU64,
    first_error: Mutex<Option<String>>,
}

impl ClientContext for Delivery {}

impl ProducerContext for Delivery {
    type DeliveryOpaque = ();
    fn delivery(&self, result: &DeliveryResult<'_>, _: ()) {
        if let Err((e, _)) = result {
            self.failed.fetch_add(1, Ordering::Relaxed);
            let mut first = self.first_error.lock().unwrap_or_else(|p| p.into_inner());
            first.get_or_insert_with(|| e.to_string());
        }
    }
}

/// Which topic on which brokers: the options `produce` and `record` share.
#[derive(clap::Args, Debug)]
pub struct Target {
    /// Topic (default: kafka.events_topic of the config).
    #[arg(long)]
    pub topic: Option<String>,
    /// Brokers (default: kafka.brokers of the config).
    #[arg(long)]
    pub brokers: Option<String>,
    /// Config file whose [kafka] section applies (default: the embedded one).
    #[arg(long)]
    pub config: Option<PathBuf>,
}

impl Target {
    /// The `[kafka]` section with `PERSONA_KAFKA_*` and `--brokers` applied, and the topic.
    fn resolve(&self) -> Result<(KafkaConfig, String)> {
        let mut config = Config::load(self.config.as_deref(), std::env::vars())?;
        if let Some(b) = &self.brokers {
            config.kafka.brokers = b.clone();
        }
        Settings::from_config(&config)?;
        let topic = self
            .topic
            .clone()
            .unwrap_or(config.kafka.events_topic.clone());
        Ok((config.kafka, topic))
    }
}

#[derive(clap::Args, Debug)]
pub struct ProduceArgs {
    /// Event log (JSON Lines, `.gz` accepted); one message per non-blank line.
    #[arg(long)]
    pub events: PathBuf,
    /// Messages per second (default: as fast as the broker takes them).
    #[arg(long)]
    pub rate: Option<u64>,
    #[command(flatten)]
    pub target: Target,
}

/// The longest line `produce` sends: the default `message.max.bytes` (1,000,000) less room
/// for the record's key and headers.
pub const MAX_MESSAGE_BYTES: usize = 990_000;

pub fn produce(args: &ProduceArgs) -> Result<()> {
    let (kafka, topic) = args.target.resolve()?;
    let kafka = &kafka;
    if args.rate == Some(0) {
        bail!("--rate must be at least 1 message per second");
    }
    let partitions = partitions(kafka, &topic)?;
    let producer: ThreadedProducer<Delivery> = client_config(kafka, Role::Writer)
        .create_with_context(Delivery {
            failed: AtomicU64::new(0),
            first_error: Mutex::new(None),
        })
        .context("cannot create a Kafka producer")?;
    // Lines are sent whole, oversize events included (the engine dead-letters those), up to
    // the largest message a broker takes by default; a longer one is not sent, and said so.
    let mut log = LineSource::open(&args.events, false, 0, 1)?.with_cap(MAX_MESSAGE_BYTES);
    let started = Instant::now();
    let mut sent = 0u64;
    let mut too_long: Vec<u64> = Vec::new();
    while let Next::Line { number, oversize } = log.next_line()? {
        let line = log.line();
        if oversize {
            too_long.push(number);
        } else if !line.iter().all(u8::is_ascii_whitespace) {
            if let Some(rate) = args.rate {
                // Pace against the start, so short stalls are caught up, not lost.
                let due = started + Duration::from_secs_f64(sent as f64 / rate as f64);
                let now = Instant::now();
                if due > now {
                    std::thread::sleep(due - now);
                }
            }
            let (key, partition) = route(line, partitions, number);
            send(&producer, &topic, key.as_deref(), partition, line)?;
            sent += 1;
        }
        log.clear();
    }
    producer
        .flush(Duration::from_secs(60))
        .map_err(|e| anyhow!("messages still undelivered after 60 s: {e}"))?;
    let context = producer.context();
    let failed = context.failed.load(Ordering::Relaxed);
    let secs = started.elapsed().as_secs_f64();
    let _ = writeln!(
        std::io::stdout(),
        "produced {} messages to {topic} ({partitions} partitions) in {secs:.3} s, {:.0}/s; {failed} failed",
        sent - failed,
        sent as f64 / secs.max(1e-9),
    );
    if let Some(first) = too_long.first() {
        bail!(
            "{} lines were not sent: longer than {MAX_MESSAGE_BYTES} bytes, the largest message \
             a Kafka broker takes by default (first: line {first})",
            too_long.len()
        );
    }
    if failed > 0 {
        let first = context
            .first_error
            .lock()
            .unwrap_or_else(|p| p.into_inner());
        bail!(
            "{failed} messages were not delivered (first error: {})",
            first.as_deref().unwrap_or("unknown")
        );
    }
    Ok(())
}

/// Queues one message, waiting while librdkafka's queue is full.
fn send(
    producer: &ThreadedProducer<Delivery>,
    topic: &str,
    key: Option<&[u8]>,
    partition: i32,
    payload: &[u8],
) -> Result<()> {
    loop {
        let mut record = BaseRecord::to(topic).payload(payload).partition(partition);
        if let Some(k) = key {
            record = record.key(k);
        }
        match producer.send(record) {
            Ok(()) => return Ok(()),
            Err((KafkaError::MessageProduction(RDKafkaErrorCode::QueueFull), _)) => {
                std::thread::sleep(Duration::from_millis(2));
            }
            Err((e, _)) => bail!("cannot produce to {topic}: {e}"),
        }
    }
}

#[derive(clap::Args, Debug)]
pub struct RecordArgs {
    /// Output log: one message per line.
    #[arg(long)]
    pub out: PathBuf,
    #[command(flatten)]
    pub target: Target,
}

/// Copies every message the topic holds now (up to each partition's end at start) to a log.
pub fn record(args: &RecordArgs) -> Result<()> {
    let (kafka, topic) = args.target.resolve()?;
    let kafka = &kafka;
    let partitions = partitions(kafka, &topic)?;
    let group = format!("persona-record-{}", std::process::id());
    let consumer: BaseConsumer<KafkaContext> = client_config(
        kafka,
        Role::Reader {
            group: &group,
            start: crate::config::StartOffset::Earliest,
        },
    )
    .create_with_context(KafkaContext::default())
    .context("cannot create a Kafka consumer")?;
    // Every partition from its start to its end as the first fetch finds it (librdkafka's
    // end-of-partition event; the brokers' answers to offset requests are not relied on).
    let mut tpl = TopicPartitionList::new();
    for p in 0..partitions {
        tpl.add_partition_offset(&topic, p, Offset::Beginning)?;
    }
    consumer.assign(&tpl)?;
    let file = std::fs::File::create(&args.out)
        .with_context(|| format!("cannot create {}", args.out.display()))?;
    let mut out = BufWriter::new(file);
    let mut written = 0u64;
    let mut open: Vec<i32> = (0..partitions).collect();
    let mut idle_since = Instant::now();
    while !open.is_empty() {
        match consumer.poll(Duration::from_millis(200)) {
            Some(Ok(msg)) => {
                idle_since = Instant::now();
                if !open.contains(&msg.partition()) {
                    continue; // Already at its end: later messages are not part of the copy.
                }
                let payload = msg.payload().unwrap_or_default();
                let payload = payload.strip_suffix(b"\n").unwrap_or(payload);
                if payload.contains(&b'\n') {
                    tracing::warn!(
                        topic,
                        partition = msg.partition(),
                        offset = msg.offset(),
                        "message spans several lines; written as is"
                    );
                }
                out.write_all(payload)?;
                out.write_all(b"\n")?;
                written += 1;
            }
            Some(Err(KafkaError::PartitionEOF(p))) => open.retain(|q| *q != p),
            Some(Err(e)) => tracing::warn!("kafka: {e}"),
            None => {
                if idle_since.elapsed() > Duration::from_secs(60) {
                    bail!("no messages for 60 s with partitions {open:?} unfinished");
                }
            }
        }
    }
    out.flush()
        .with_context(|| format!("cannot write {}", args.out.display()))?;
    let _ = writeln!(
        std::io::stdout(),
        "recorded {written} messages from {topic} ({partitions} partitions) to {}",
        args.out.display()
    );
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn users_route_like_the_workers_and_keyless_lines_round_robin() {
        let (key, p) = route(br#"{"user_id":"u1","type":"click"}"#, 4, 7);
        assert_eq!(key.as_deref(), Some(&b"u1"[..]));
        assert_eq!(p as usize, persona_dataflows::owner(names::hash("u1"), 4));
        assert_eq!(route(b"not json", 4, 7), (None, 3));
        assert_eq!(route(br#"{"user_id":""}"#, 4, 8), (None, 0));
    }
}
