//! The Kafka source: the events topic and the catalog topic, read by the workers.
//!
//! Partition `p` of a topic is read by worker `p % workers` (of the whole cluster): manual
//! assignment, no consumer-group balancing, so every partition has exactly one reader and a
//! reader's position is part of the engine's state. A producer that partitions by
//! `persona_dataflows::owner(user, partitions)` (as `persona produce` does) sends each user to one
//! partition; with as many partitions as workers (or a multiple), the worker that reads a user's
//! partition also owns the user's state, and the exchange by user stays on that worker.
//!
//! Workers never block on Kafka: they poll with a zero timeout, and librdkafka's non-empty
//! callback wakes a parked worker when messages arrive. A worker that reads no partition (more
//! workers than partitions) closes its inputs, so the engine clock never waits for it. Topic layouts and high watermarks come
//! from a [`Monitor`] thread, which is also what retries (and says so) while the brokers are
//! unreachable or the topics missing; until it has a layout no worker reads and the engine is
//! not ready.

use super::{Origin, Stream};
use crate::config::{KafkaConfig, StartOffset};
use crate::kafka_client::{client_config, KafkaContext, Role, Watermarks};
use anyhow::{Context, Result};
use rdkafka::consumer::{BaseConsumer, Consumer};
use rdkafka::error::KafkaError;
use rdkafka::{Message, Offset, TopicPartitionList};
use std::collections::VecDeque;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, OnceLock};
use std::thread::Thread;
use std::time::{Duration, Instant};

/// The worker (of `workers`) that reads partition `partition` of any topic.
pub fn partition_reader(partition: i32, workers: usize) -> usize {
    partition.max(0) as usize % workers.max(1)
}

/// Partition counts of the topics persona reads.
#[derive(Clone, Debug)]
pub struct Layout {
    pub topics: Vec<(Stream, String, i32)>,
}

/// One partition's position as the engine state reflects it, for `/v1/status`.
#[derive(Clone, Debug, serde::Serialize)]
pub struct PartitionStatus {
    pub topic: String,
    pub partition: i32,
    pub worker: usize,
    /// Next offset to read: every message below it is reflected in the state at `as_of_ms`.
    pub position: Option<i64>,
    /// The state time these positions are reflected at.
    pub as_of_ms: Option<u64>,
    /// Next offset to read, of messages read so far (the state may not reflect them yet).
    pub read_position: Option<i64>,
    pub high_watermark: Option<i64>,
    pub lag: Option<i64>,
}

/// Learns the topics' layout, retrying while brokers or topics are missing, on its own thread
/// so that no worker ever waits on a metadata request. Holds the high watermarks the workers'
/// consumers report.
pub struct Monitor {
    config: KafkaConfig,
    layout: OnceLock<Layout>,
    high: Watermarks,
    stop: AtomicBool,
}

const RETRY: Duration = Duration::from_secs(1);
const REQUEST_TIMEOUT: Duration = Duration::from_secs(2);
/// Repeated failures are logged at most this often.
const LOG_EVERY: Duration = Duration::from_secs(30);

impl Monitor {
    /// Checks the client configuration and starts the monitor thread.
    pub fn start(config: &KafkaConfig) -> Result<Arc<Monitor>> {
        let consumer: BaseConsumer<KafkaContext> = client_config(config, Role::Monitor)
            .create_with_context(KafkaContext::default())
            .context("invalid Kafka client configuration ([kafka] brokers / properties)")?;
        let monitor = Arc::new(Monitor {
            config: config.clone(),
            layout: OnceLock::new(),
            high: Watermarks::default(),
            stop: AtomicBool::new(false),
        });
        let m = monitor.clone();
        std::thread::Builder::new()
            .name("kafka-monitor".into())
            .spawn(move || m.run(consumer))
            .context("cannot start the Kafka monitor thread")?;
        Ok(monitor)
    }

    pub fn brokers(&self) -> &str {
        &self.config.brokers
    }

    pub fn layout(&self) -> Option<&Layout> {
        self.layout.get()
    }

    pub fn stop(&self) {
        self.stop.store(true, Ordering::Release);
    }

    pub fn high_watermark(&self, topic: &str, partition: i32) -> Option<i64> {
        let high = self.high.lock().unwrap_or_else(|p| p.into_inner());
        high.get(&(topic.to_string(), partition)).copied()
    }

    fn topics(&self) -> Vec<(Stream, String)> {
        let mut t = vec![(Stream::Events, self.config.events_topic.clone())];
        if !self.config.catalog_topic.is_empty() {
            t.push((Stream::Catalog, self.config.catalog_topic.clone()));
        }
        t
    }

    fn run(&self, consumer: BaseConsumer<KafkaContext>) {
        let brokers = &self.config.brokers;
        let mut last_log: Option<Instant> = None;
        let mut attempts = 0u64;
        let should_log = |last: &mut Option<Instant>| {
            let now = Instant::now();
            let due = last.is_none_or(|t| now.duration_since(t) >= LOG_EVERY);
            if due {
                *last = Some(now);
            }
            due
        };
        while !self.stop.load(Ordering::Acquire) {
            attempts += 1;
            match self.fetch_layout(&consumer) {
                Ok(layout) => {
                    for (_, topic, partitions) in &layout.topics {
                        tracing::info!(%brokers, topic, partitions, "kafka: reading topic");
                    }
                    let _ = self.layout.set(layout);
                    return;
                }
                Err(e) => {
                    if should_log(&mut last_log) {
                        tracing::warn!(%brokers, attempts, "kafka: {e:#}; retrying every {}s (not ready until then)", RETRY.as_secs());
                    }
                    std::thread::sleep(RETRY);
                }
            }
        }
    }

    fn fetch_layout(&self, consumer: &BaseConsumer<KafkaContext>) -> Result<Layout> {
        let mut topics = Vec::new();
        for (stream, topic) in self.topics() {
            let md = consumer
                .fetch_metadata(Some(&topic), REQUEST_TIMEOUT)
                .map_err(|e| anyhow::anyhow!("cannot reach the brokers ({e})"))?;
            let t = md.topics().iter().find(|t| t.name() == topic);
            match t {
                Some(t) if t.error().is_none() && !t.partitions().is_empty() => {
                    topics.push((stream, topic.clone(), t.partitions().len() as i32))
                }
                _ => anyhow::bail!(
                    "topic {topic:?} does not exist (create it: scripts/kafka.sh topics)"
                ),
            }
        }
        Ok(Layout { topics })
    }
}

/// A partition a worker reads.
struct Owned {
    partition: i32,
    /// Next offset to read (`None` until the first message).
    next: Option<i64>,
    /// Reached the end of what the partition held at some point since start.
    caught_up: bool,
    /// How long the worker has been reading without this partition handing over a message.
    idle: Duration,
}

/// A partition in its backlog that hands over nothing for this long (a partition without a
/// leader, say) stops holding the engine clock back (see [`Reader::backlog`]) until it does.
const PARTITION_IDLE: Duration = Duration::from_secs(30);
/// The most one gap between two reads adds to a partition's idle time: a worker held back by
/// another (see the engine's backpressure) is not reading, so its partitions are not idle.
const IDLE_STEP: Duration = Duration::from_secs(1);

/// One topic's consumer of a worker. (One consumer per topic: librdkafka's end-of-partition
/// events name only the partition.)
struct TopicReader {
    stream: Stream,
    topic: String,
    consumer: BaseConsumer<KafkaContext>,
    owned: Vec<Owned>,
}

/// Positions at an input time, kept until that time is complete.
type Snapshot = (u64, Vec<(usize, usize, Option<i64>)>);

/// A worker's Kafka reader.
pub struct Reader {
    monitor: Arc<Monitor>,
    worker: usize,
    workers: usize,
    start: StartOffset,
    /// Positions restored from a checkpoint: where those partitions resume.
    resume: std::collections::HashMap<(String, i32), i64>,
    wake: Thread,
    readers: Option<Vec<TopicReader>>,
    in_flight: VecDeque<Snapshot>,
    changed: bool,
    reflected: Option<Snapshot>,
    last_error_log: Option<Instant>,
    /// The position after a record the engine kept for its next batch (reader, owned
    /// partition, next offset): it moves when that batch is read, so that a checkpoint taken
    /// in between does not count the record as applied.
    deferred: Option<(usize, usize, i64)>,
    created: Instant,
    last_read: Option<Instant>,
}

/// What one [`Reader::read`] did.
pub struct Read {
    pub records: usize,
    /// Every owned partition has reached the end of its backlog at least once.
    pub caught_up: bool,
}

impl Reader {
    /// A reader for `worker` of `workers`; partitions in `resume` start at their stored
    /// position, the others at `start`.
    pub fn new(
        monitor: Arc<Monitor>,
        worker: usize,
        workers: usize,
        start: StartOffset,
        resume: &[crate::checkpoint::Position],
    ) -> Self {
        Reader {
            monitor,
            worker,
            workers,
            start,
            resume: resume
                .iter()
                .map(|p| ((p.topic.clone(), p.partition), p.next))
                .collect(),
            wake: std::thread::current(),
            readers: None,
            in_flight: VecDeque::new(),
            changed: false,
            reflected: None,
            last_error_log: None,
            deferred: None,
            created: Instant::now(),
            last_read: None,
        }
    }

    /// Creates the consumers once the layout is known.
    fn connect(&mut self) -> Result<bool> {
        if self.readers.is_some() {
            return Ok(true);
        }
        let Some(layout) = self.monitor.layout() else {
            return Ok(false);
        };
        let mut readers = Vec::new();
        for (stream, topic, partitions) in &layout.topics {
            let owned: Vec<Owned> = (0..*partitions)
                .filter(|p| partition_reader(*p, self.workers) == self.worker)
                .map(|partition| Owned {
                    partition,
                    next: self.resume.get(&(topic.clone(), partition)).copied(),
                    caught_up: false,
                    idle: Duration::ZERO,
                })
                .collect();
            if owned.is_empty() {
                continue;
            }
            let group = format!("persona-{}-{}-{}", std::process::id(), self.worker, topic);
            let mut consumer: BaseConsumer<KafkaContext> = client_config(
                &self.monitor.config,
                Role::Reader {
                    group: &group,
                    start: self.start,
                },
            )
            .create_with_context(KafkaContext {
                watermarks: Some(self.monitor.high.clone()),
            })
            .context("cannot create a Kafka consumer")?;
            let wake = self.wake.clone();
            consumer.set_nonempty_callback(move || wake.unpark());
            let mut tpl = TopicPartitionList::new();
            let offset = match self.start {
                StartOffset::Earliest => Offset::Beginning,
                StartOffset::Latest => Offset::End,
            };
            for o in &owned {
                let at = o.next.map_or(offset, Offset::Offset);
                tpl.add_partition_offset(topic, o.partition, at)
                    .with_context(|| format!("cannot assign {topic}/{}", o.partition))?;
            }
            consumer
                .assign(&tpl)
                .with_context(|| format!("cannot assign partitions of {topic}"))?;
            tracing::info!(
                worker = self.worker,
                topic,
                partitions = ?owned.iter().map(|o| o.partition).collect::<Vec<_>>(),
                "kafka: reading partitions"
            );
            readers.push(TopicReader {
                stream: *stream,
                topic: topic.clone(),
                consumer,
                owned,
            });
        }
        self.readers = Some(readers);
        // The restored state reflects the restored positions.
        if !self.resume.is_empty() {
            self.reflected = Some((0, self.positions()));
        }
        Ok(true)
    }

    /// The consumers exist (the topics' layout is known).
    pub fn connected(&self) -> bool {
        self.readers.is_some()
    }

    /// Not connected yet, for less than [`PARTITION_IDLE`]: the partitions it will read hold
    /// the clock back as if they had not handed over anything yet.
    pub fn connecting(&self) -> bool {
        !self.connected() && self.created.elapsed() < PARTITION_IDLE
    }

    /// The positions the state reflects (at the latest complete time), for a checkpoint.
    pub fn reflected_positions(&self) -> Vec<crate::checkpoint::Position> {
        let Some((_, reflected)) = &self.reflected else {
            return Vec::new();
        };
        let readers = self.readers.as_deref().unwrap_or_default();
        reflected
            .iter()
            .filter_map(|&(ri, oi, next)| {
                let r = readers.get(ri)?;
                Some(crate::checkpoint::Position {
                    topic: r.topic.clone(),
                    partition: r.owned.get(oi)?.partition,
                    next: next?,
                })
            })
            .collect()
    }

    /// Connected, and owns no partition of any topic (more workers than partitions).
    pub fn reads_nothing(&self) -> bool {
        self.readers.as_ref().is_some_and(|r| r.is_empty())
    }

    /// Hands up to `budget` records to `handle`, without blocking. When `handle` answers
    /// `false`, it has kept the record for its next batch: reading stops, and the record's
    /// position moves at the next call (the batch that applies it).
    pub fn read(
        &mut self,
        budget: usize,
        handle: &mut dyn FnMut(Stream, &[u8], Origin<'_>) -> bool,
    ) -> Result<Read> {
        if !self.connect()? {
            return Ok(Read {
                records: 0,
                caught_up: false,
            });
        }
        let now = Instant::now();
        let gap = self
            .last_read
            .map_or(Duration::ZERO, |t| now.duration_since(t).min(IDLE_STEP));
        self.last_read = Some(now);
        let readers = self.readers.as_deref_mut().unwrap_or_default();
        for o in readers.iter_mut().flat_map(|r| r.owned.iter_mut()) {
            o.idle += gap;
        }
        if let Some((ri, oi, next)) = self.deferred.take() {
            if let Some(o) = readers.get_mut(ri).and_then(|r| r.owned.get_mut(oi)) {
                o.next = Some(next);
                self.changed = true;
            }
        }
        let mut records = 0;
        'readers: for (ri, r) in readers.iter_mut().enumerate() {
            while records < budget {
                let Some(polled) = r.consumer.poll(Duration::ZERO) else {
                    break;
                };
                match polled {
                    Ok(msg) => {
                        let partition = msg.partition();
                        let offset = msg.offset();
                        let owned = r.owned.iter().position(|o| o.partition == partition);
                        let taken = handle(
                            r.stream,
                            msg.payload().unwrap_or_default(),
                            Origin::Message {
                                topic: &r.topic,
                                partition,
                                offset,
                            },
                        );
                        if !taken {
                            self.deferred = owned.map(|oi| (ri, oi, offset + 1));
                            break 'readers;
                        }
                        records += 1;
                        if let Some(oi) = owned {
                            r.owned[oi].next = Some(offset + 1);
                            r.owned[oi].idle = Duration::ZERO;
                            self.changed = true;
                        }
                    }
                    Err(KafkaError::PartitionEOF(p)) => {
                        if let Some(o) = r.owned.iter_mut().find(|o| o.partition == p) {
                            if !o.caught_up {
                                tracing::debug!(
                                    worker = self.worker,
                                    topic = r.topic,
                                    partition = p,
                                    "kafka: end of backlog"
                                );
                            }
                            o.caught_up = true;
                        }
                    }
                    Err(e) => {
                        let now = Instant::now();
                        if self
                            .last_error_log
                            .is_none_or(|t| now.duration_since(t) >= LOG_EVERY)
                        {
                            self.last_error_log = Some(now);
                            tracing::warn!(
                                worker = self.worker,
                                topic = r.topic,
                                "kafka: {e}; librdkafka keeps retrying"
                            );
                        }
                        break;
                    }
                }
            }
        }
        let caught_up = readers.iter().all(|r| r.owned.iter().all(|o| o.caught_up));
        Ok(Read { records, caught_up })
    }

    /// Remembers the positions after the records given to the input at time `t`.
    pub fn input_at(&mut self, t: u64) {
        if !self.changed {
            return;
        }
        self.changed = false;
        let positions = self.positions();
        match self.in_flight.back_mut() {
            Some((last, p)) if *last == t => *p = positions,
            _ => self.in_flight.push_back((t, positions)),
        }
    }

    fn positions(&self) -> Vec<(usize, usize, Option<i64>)> {
        let mut v = Vec::new();
        for (ri, r) in self.readers.iter().flatten().enumerate() {
            for (oi, o) in r.owned.iter().enumerate() {
                v.push((ri, oi, o.next));
            }
        }
        v
    }

    /// Every time below `completed` is complete: the positions of those times are reflected.
    pub fn completed(&mut self, completed: u64) {
        while self.in_flight.front().is_some_and(|(t, _)| *t < completed) {
            self.reflected = self.in_flight.pop_front();
        }
    }

    /// Whether this worker is still reading a backlog: some partition it owns has not reached
    /// its end yet and is more than `within` messages from the high watermark last seen (an
    /// unknown watermark counts as far).
    pub fn in_backlog(&self, within: i64) -> bool {
        self.readers.iter().flatten().any(|r| {
            r.owned.iter().any(|o| {
                !o.caught_up
                    && self
                        .monitor
                        .high_watermark(&r.topic, o.partition)
                        .is_none_or(|high| high - o.next.unwrap_or(0) > within)
            })
        })
    }

    /// The events partitions this worker reads that have not reached the end of their backlog
    /// yet, and have handed over a message within [`PARTITION_IDLE`] of reading. While there are any,
    /// the engine clock follows the slowest of them (`backlog_clock` in the engine).
    pub fn backlog(&self) -> impl Iterator<Item = i32> + '_ {
        self.readers
            .iter()
            .flatten()
            .filter(|r| r.stream == Stream::Events)
            .flat_map(|r| r.owned.iter())
            .filter(|o| !o.caught_up && o.idle < PARTITION_IDLE)
            .map(|o| o.partition)
    }

    /// The status of every partition this worker reads.
    pub fn status(&self) -> Vec<PartitionStatus> {
        let mut out = Vec::new();
        let reflected = |ri: usize, oi: usize| {
            self.reflected.as_ref().and_then(|(t, v)| {
                v.iter()
                    .find(|(r, o, _)| *r == ri && *o == oi)
                    .and_then(|(_, _, n)| n.map(|n| (*t, n)))
            })
        };
        for (ri, r) in self.readers.iter().flatten().enumerate() {
            for (oi, o) in r.owned.iter().enumerate() {
                let high = self.monitor.high_watermark(&r.topic, o.partition);
                let refl = reflected(ri, oi);
                let position = refl.map(|(_, n)| n);
                out.push(PartitionStatus {
                    topic: r.topic.clone(),
                    partition: o.partition,
                    worker: self.worker,
                    position,
                    as_of_ms: refl.map(|(t, _)| t),
                    read_position: o.next,
                    high_watermark: high,
                    lag: high.map(|h| (h - position.unwrap_or(0)).max(0)),
                });
            }
        }
        out
    }
}
