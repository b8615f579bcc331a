//! The engine: timely workers that read sources, drive the engine clock, maintain the views
//! and answer queries between steps.
//!
//! Each worker runs one loop: read a bounded batch of its share of the source (file lines, or
//! the Kafka partitions it owns) → parse and validate (rejects to dead letters) → feed the
//! events input at the current clock →
//! advance the clock → step the dataflow → answer the queries whose time is complete →
//! let the profile arrangement compact up to the latest complete time.

use crate::config::{ClockMode, Settings};
use crate::deadletter::DeadLetters;
use crate::metrics::Metrics;
use crate::names::Names;
use crate::parse::{self, Rejection};
use crate::profile_cache::Publisher;
use crate::query::Ask;
use crate::query::{Answer, Query, Router};
use crate::sink::Sink;
use crate::source::kafka::{self, PartitionStatus};
use crate::source::{LineSource, Next, Origin, Stream};
use anyhow::{anyhow, Context, Result};
use crossbeam_channel::{Receiver, Sender};
use differential_dataflow::input::{Input, InputSession};
use persona_dataflows::rules::Rule;
use persona_dataflows::{
    profiles, Event, InteractionConfig, PopularConfig, ProfileState, ProfileTraces,
    RecommendConfig, RecommendTraces, Retention, SegmentConfig, SimilarConfig, Time, ViewConfig,
};
use std::cell::RefCell;
use std::collections::HashMap;
use std::path::PathBuf;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::Probe;
use timely::worker::Worker;

/// Lines a worker reads before it steps the dataflow again: large for replay throughput,
/// small when following a live source so answers stay fresh.
const REPLAY_BATCH_LINES: usize = 65536;
const LIVE_BATCH_LINES: usize = 4096;
/// How often a worker publishes its Kafka partitions' status.
const STATUS_EVERY: Duration = Duration::from_millis(100);
/// Lines a waiting replay worker reads ahead between two steps.
const READ_AHEAD_LINES: usize = 512;
/// How long `run` steps for one batch before it turns to queries (see step 3).
const BACKPRESSURE_SLICE: Duration = Duration::from_millis(5);

/// What the engine runs.
#[derive(Clone, Debug)]
pub enum Mode {
    /// Read `events` once with the event-time clock, move the clock to the largest `ts`, and
    /// hand every worker's profiles to the dump channel; then stop, or keep serving if `serve`.
    Replay {
        events: PathBuf,
        catalog: Option<PathBuf>,
        serve: bool,
        /// Enter each event at the clock as it stands once it is read, rather than a whole
        /// batch at the clock after it: the triggers then follow the log record by record,
        /// whatever the batching, at a cost in speed (one time per distinct clock value).
        record_clock: bool,
    },
    /// Read the configured source (following it if configured) until stopped.
    Run,
}

/// Per-worker progress, for `/v1/status` and readiness.
#[derive(Debug)]
pub struct WorkerStatus {
    /// The worker's input time (its view of the engine clock).
    pub clock: AtomicU64,
    /// Completed time: all workers are done with every time below this.
    pub frontier: AtomicU64,
    pub lines: AtomicU64,
    pub offset: AtomicU64,
    pub file_len: AtomicU64,
    /// The clock when this worker first reached the end of its source (`u64::MAX`: not yet).
    pub reached_end_at: AtomicU64,
    /// The source's contents at start are read and processed, by every worker.
    pub caught_up: AtomicBool,
    /// Kafka: the partitions this worker reads and the positions its state reflects.
    pub partitions: Mutex<Vec<PartitionStatus>>,
}

impl Default for WorkerStatus {
    fn default() -> Self {
        WorkerStatus {
            clock: AtomicU64::new(0),
            frontier: AtomicU64::new(0),
            lines: AtomicU64::new(0),
            offset: AtomicU64::new(0),
            file_len: AtomicU64::new(0),
            reached_end_at: AtomicU64::new(u64::MAX),
            caught_up: AtomicBool::new(false),
            partitions: Mutex::new(Vec::new()),
        }
    }
}

impl WorkerStatus {
    /// Records the clock at which the source was first exhausted (later calls change nothing).
    fn mark_end(&self, clock: Time) {
        let _ = self.reached_end_at.compare_exchange(
            u64::MAX,
            clock,
            Ordering::AcqRel,
            Ordering::Acquire,
        );
    }
}

/// State shared by the workers, the HTTP server and the commands.
pub struct Shared {
    pub settings: Settings,
    pub names: Names,
    pub metrics: Metrics,
    pub dead: DeadLetters,
    pub router: Router,
    pub workers: Vec<WorkerStatus>,
    pub source_path: PathBuf,
    /// The Kafka source's monitor, when the source is Kafka.
    pub kafka: Option<Arc<kafka::Monitor>>,
    pub stop: AtomicBool,
    /// Largest valid `ts` parsed by any worker.
    pub max_ts: AtomicU64,
    pub started: Instant,
    /// Triggers and live subscribers.
    pub live: crate::live::Live,
    /// Where erasures are recorded.
    pub erasures: crate::erasure::ErasureLog,
    /// The erasure log's records at start, applied before any event.
    pub erased: Mutex<Vec<crate::erasure::Erasure>>,
    /// The type hashes of erasure and consent records.
    pub controls: persona_dataflows::ControlKinds,
    /// Takes checkpoints (Kafka source with `engine.checkpoint_dir`).
    pub checkpoints: std::sync::OnceLock<crate::checkpoint::Coordinator>,
    /// The checkpoint the workers start from, until every worker has fed its share.
    pub restore: Mutex<Option<Arc<crate::checkpoint::Checkpoint>>>,
    restored: std::sync::atomic::AtomicUsize,
    /// Profiles the workers publish for reads on the HTTP thread (`persona run`).
    pub profiles: Arc<crate::profile_cache::ProfileCache>,
}

impl Shared {
    pub fn new(
        settings: Settings,
        source_path: PathBuf,
        dead_letters: Sink,
        triggers: Option<Sink>,
        kafka: Option<Arc<kafka::Monitor>>,
    ) -> Arc<Shared> {
        let metrics = Metrics::new();
        let names = Names::default();
        let live = crate::live::Live::new(
            triggers,
            &settings.segments,
            names.clone(),
            settings.triggers.stream_buffer,
            metrics.clone(),
        );
        let workers = settings.workers;
        let (first, peers) = match &settings.cluster {
            Some(c) => (c.process * c.threads, c.peers()),
            None => (0, workers),
        };
        Arc::new(Shared {
            erasures: crate::erasure::ErasureLog::new(settings.erasure_log.clone()),
            erased: Mutex::new(Vec::new()),
            controls: control_kinds(&names),
            dead: DeadLetters::new(dead_letters, metrics.clone()),
            kafka,
            metrics,
            names,
            live,
            router: Router::new(workers, first, peers),
            workers: (0..workers).map(|_| WorkerStatus::default()).collect(),
            source_path,
            settings,
            stop: AtomicBool::new(false),
            max_ts: AtomicU64::new(0),
            started: Instant::now(),
            checkpoints: std::sync::OnceLock::new(),
            restore: Mutex::new(None),
            restored: std::sync::atomic::AtomicUsize::new(0),
            profiles: Arc::new(crate::profile_cache::ProfileCache::new(workers)),
        })
    }

    /// Reads the erasure log, whose records the workers apply before any event; returns how
    /// many there are.
    pub fn load_erasures(&self) -> Result<usize> {
        let records = crate::erasure::load_family(self.erasures.path())?;
        let n = records.len();
        *self.erased.lock().unwrap_or_else(|p| p.into_inner()) = records;
        Ok(n)
    }

    /// The erasures loaded at start: user hash → the latest `through_ms`.
    pub fn erased_users(&self) -> std::collections::HashMap<u64, u64> {
        let mut users = std::collections::HashMap::new();
        for e in self.erased.lock().unwrap_or_else(|p| p.into_inner()).iter() {
            let through = users.entry(e.user_hash).or_insert(e.through_ms);
            *through = (*through).max(e.through_ms);
        }
        users
    }

    /// The engine clock every worker has completed (`None` before the first time completes).
    pub fn clock(&self) -> Option<u64> {
        self.workers
            .iter()
            .map(|w| w.frontier.load(Ordering::Acquire))
            .min()
            .and_then(|f| f.checked_sub(1))
    }

    pub fn ready(&self) -> bool {
        !crate::cluster::peer_lost()
            && self
                .workers
                .iter()
                .all(|w| w.caught_up.load(Ordering::Acquire))
    }

    /// Asks every worker to stop.
    pub fn shutdown(&self) {
        self.stop.store(true, Ordering::Release);
        if !crate::cluster::peer_lost() {
            crate::cluster::stop_requested();
        }
        if let Some(k) = &self.kafka {
            k.stop();
        }
        self.router.wake_all();
    }

    pub fn stopping(&self) -> bool {
        self.stop.load(Ordering::Acquire) || crate::cluster::peer_lost()
    }
}

/// One worker's share of a replay's final state.
pub struct DumpPart {
    pub as_of: u64,
    pub profiles: Vec<(u64, ProfileState)>,
}

/// Starts the workers; they run until the input ends (replay) or [`Shared::shutdown`].
pub fn start(
    shared: Arc<Shared>,
    mode: Mode,
    dump: Option<Sender<Result<DumpPart, String>>>,
) -> Result<timely::communication::WorkerGuards<Result<(), String>>> {
    let mut config = match &shared.settings.cluster {
        Some(cluster) => {
            crate::cluster::watch_for_peer_loss();
            crate::cluster::timely_config(cluster)
        }
        None => timely::Config::process(shared.settings.workers),
    };
    // Let spines keep merging while idle, so reads stay fast after a burst.
    differential_dataflow::configure(
        &mut config.worker,
        &differential_dataflow::Config::default().idle_merge_effort(Some(1000)),
    );
    // timely binds this process's address and says only "Address already in use".
    let address = shared.settings.cluster.as_ref().map(|c| {
        format!(
            " (this process's timely address {}, cluster.addresses[{}])",
            c.addresses.get(c.process).map_or("?", String::as_str),
            c.process
        )
    });
    let guards = timely::execute(config, move |worker| {
        let index = worker.index();
        lower_priority(shared.settings.worker_nice, "worker");
        crate::affinity::pin_current(&shared.settings.worker_cpus, "worker");
        let result =
            run_worker(worker, &shared, &mode, dump.as_ref()).map_err(|e| format!("{e:#}"));
        if let Err(e) = &result {
            tracing::error!(worker = index, "worker failed: {e}");
            if let Some(d) = dump.as_ref() {
                let _ = d.send(Err(e.clone()));
            }
            shared.shutdown();
        }
        result
    })
    .map_err(|e| anyhow!("cannot start workers: {e}{}", address.unwrap_or_default()))?;
    Ok(guards)
}

/// Gives the calling thread nice value `nice` (0: leaves it alone), so that it yields the CPU
/// to the HTTP threads; a failure is logged, never fatal. Linux keeps a nice value per thread.
pub fn lower_priority(nice: i32, thread: &str) {
    if nice == 0 {
        return;
    }
    match set_nice(nice) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::Unsupported => {
            tracing::warn!(thread, nice, "engine.worker_nice is only applied on Linux")
        }
        Err(e) => tracing::warn!(thread, nice, "cannot lower the thread's priority: {e}"),
    }
}

/// Sets the calling thread's nice value.
fn set_nice(nice: i32) -> std::io::Result<()> {
    #[cfg(target_os = "linux")]
    {
        // SAFETY: plain system calls on the calling thread's own id.
        let done = unsafe {
            let tid = libc::gettid();
            libc::setpriority(libc::PRIO_PROCESS, tid as libc::id_t, nice)
        };
        if done != 0 {
            return Err(std::io::Error::last_os_error());
        }
        Ok(())
    }
    #[cfg(not(target_os = "linux"))]
    {
        let _ = nice;
        Err(std::io::ErrorKind::Unsupported.into())
    }
}

/// Waits for every worker and gathers their errors into one.
pub fn join(guards: timely::communication::WorkerGuards<Result<(), String>>) -> Result<()> {
    let lost = || {
        if crate::cluster::stopping_anyway() {
            Ok(())
        } else {
            Err(anyhow!(
                "cluster: lost another process; stopped (timely has no failover: restart every process of the cluster)"
            ))
        }
    };
    while !guards.guards().iter().all(|g| g.is_finished()) {
        if crate::cluster::peer_lost() {
            // The workers stop at their next step; the network threads died with the
            // connection, and joining them (as dropping the guards does) would only panic.
            let deadline = Instant::now() + Duration::from_secs(5);
            while Instant::now() < deadline && !guards.guards().iter().all(|g| g.is_finished()) {
                std::thread::sleep(Duration::from_millis(20));
            }
            std::mem::forget(guards);
            return lost();
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    if crate::cluster::peer_lost() {
        std::mem::forget(guards);
        return lost();
    }
    let errors: Vec<String> = guards
        .join()
        .into_iter()
        .filter_map(|r| r.and_then(|inner| inner).err())
        .collect();
    if errors.is_empty() {
        Ok(())
    } else {
        Err(anyhow!("workers failed: {}", errors.join("; ")))
    }
}

fn wall_ms() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_millis() as u64)
        .unwrap_or(0)
}

/// The worker's inputs; `None` once closed.
struct Inputs {
    events: Option<InputSession<Time, Event, isize>>,
    /// Erasure records from the HTTP API and the erasure log; never closed.
    controls: InputSession<Time, Event, isize>,
    catalog: Option<InputSession<Time, (u64, u64), isize>>,
    /// Refresh ticks for the recommenders' neighbours and trending lists; `None` when they
    /// move at every time.
    refresh: Option<InputSession<Time, (), isize>>,
    /// Announcements of parsed strings to the other processes (cluster only).
    names: Option<crate::cluster::Announcer>,
    /// The largest `ts` parsed, shared with the other processes (cluster only).
    max_ts: Option<crate::cluster::MaxShare>,
}

impl Inputs {
    fn advance_to(&mut self, t: Time) {
        if t > *self.controls.time() {
            self.controls.advance_to(t);
        }
        if let (Some(e), Some(c)) = (self.events.as_mut(), self.catalog.as_mut()) {
            if t > *e.time() {
                e.advance_to(t);
                c.advance_to(t);
            }
        }
        if let Some(r) = self.refresh.as_mut() {
            if t > *r.time() {
                r.advance_to(t);
            }
        }
        if let Some(n) = self.names.as_mut() {
            n.advance_to(t);
        }
    }
    fn flush(&mut self) {
        self.controls.flush();
        if let (Some(e), Some(c)) = (self.events.as_mut(), self.catalog.as_mut()) {
            e.flush();
            c.flush();
        }
        if let Some(r) = self.refresh.as_mut() {
            r.flush();
        }
        if let Some(n) = self.names.as_mut() {
            n.flush();
        }
    }
    /// A refresh tick at the current time.
    fn tick(&mut self) {
        if let Some(r) = self.refresh.as_mut() {
            r.update((), 1);
        }
    }
    /// Releases the event and catalog inputs' capabilities: the engine clock no longer waits
    /// for this worker's sources. Refresh ticks go on: the worker still owns users.
    fn close(&mut self) {
        self.events = None;
        self.catalog = None;
    }
}

/// The catalog as upserts of `(item, category)`: the current category of every item seen (and
/// the Kafka partition it came from, for checkpoints), so a change retracts the old pair.
#[derive(Default)]
struct Catalog {
    current: HashMap<u64, (u64, i32)>,
}

impl Catalog {
    fn record(
        &mut self,
        raw: &[u8],
        origin: Origin<'_>,
        input: &mut InputSession<Time, (u64, u64), isize>,
        names: Option<&mut crate::cluster::Announcer>,
        shared: &Shared,
    ) {
        match parse::parse_catalog(raw, &shared.names) {
            Ok(rec) => {
                shared.metrics.catalog_record();
                let new = if rec.deleted { None } else { rec.category };
                if let (Some(n), Some(c)) = (names, new) {
                    n.catalog(rec.item, c, &shared.names);
                }
                let old = self.current.get(&rec.item).map(|(c, _)| *c);
                let partition = match origin {
                    Origin::Message { partition, .. } => partition,
                    _ => -1,
                };
                if old != new {
                    if let Some(c) = old {
                        input.update((rec.item, c), -1);
                        self.current.remove(&rec.item);
                    }
                    if let Some(c) = new {
                        input.update((rec.item, c), 1);
                        self.current.insert(rec.item, (c, partition));
                    }
                }
            }
            Err(r) => shared.dead.reject(&r, &origin.to_string(), raw),
        }
    }

    /// The upserts in force, for a checkpoint.
    fn entries(&self, topic: &str) -> Vec<crate::checkpoint::CatalogEntry> {
        self.current
            .iter()
            .map(
                |(&item, &(category, partition))| crate::checkpoint::CatalogEntry {
                    topic: topic.to_string(),
                    partition,
                    item,
                    category,
                },
            )
            .collect()
    }
}

/// Parses one event record into `batch`, or rejects it. `min_ts`: with a retention, events
/// (and consent grants) at or before it are too late (erasures and revocations never are).
fn event_record(
    raw: &[u8],
    origin: Origin<'_>,
    (min_ts, max_ts): (Option<u64>, Option<u64>),
    batch: &mut Vec<Event>,
    shared: &Shared,
) {
    shared.metrics.event_read();
    match parse::parse_event(raw, &shared.names, max_ts) {
        Ok(event)
            if min_ts.is_some_and(|min| event.ts <= min) && !withdraws(&event, shared.controls) =>
        {
            let r = too_late(&event, min_ts.unwrap_or(0));
            shared.dead.reject(&r, &origin.to_string(), raw);
            if event.device.is_some() {
                shared.names.forget_event_id(event.id);
            }
        }
        Ok(event) => {
            if shared.controls.is_control(&event) {
                shared.metrics.control_record();
            }
            batch.push(event)
        }
        Err(r) => shared.dead.reject(&r, &origin.to_string(), raw),
    }
}

/// Batches under a retention and the event clock, judged as if the clock moved record by
/// record, so that the result does not depend on where batches end. Each *stream* is judged on
/// its own: a file's lines, or one Kafka partition's messages, in the order they are read (see
/// `clock_basis`). A line is too late if the seal point of an earlier line of its stream has
/// passed it, and a batch ends before a line that would make an older line of its stream in
/// the same batch too late (that line starts the next batch). The batch enters at a clock
/// below the seal point of none of its lines (`entry_limit`).
struct BatchCut {
    /// The retention plus the allowed lateness (`None`: batches end at their size only).
    span: Option<u64>,
    retention: Option<u64>,
    /// One entry per stream read so far (a few: the partitions a worker reads).
    streams: Vec<StreamClock>,
}

/// One stream's newest event ts (control records aside: they do not move the clock), and the
/// oldest ts of its records in the current batch.
struct StreamClock {
    stream: i32,
    newest: Option<u64>,
    batch_oldest: u64,
}

impl BatchCut {
    fn new(settings: &Settings, clock_mode: ClockMode) -> Self {
        let retention = settings
            .retention_ms
            .filter(|_| clock_mode == ClockMode::Event);
        BatchCut {
            span: retention.map(|r| r.saturating_add(settings.allowed_lateness_ms)),
            retention,
            streams: Vec::new(),
        }
    }

    /// The latest time the batch can enter at without its oldest record being too late at the
    /// gate. The clock it would enter at can be later than its streams allow: a partition that
    /// reached its end in this batch no longer holds the clock back, another worker's events
    /// move it. Never below the clock before the batch (its records were judged against that).
    fn entry_limit(&self) -> Time {
        let oldest = self.streams.iter().map(|s| s.batch_oldest).min();
        match (self.retention, oldest) {
            (Some(r), Some(o)) if o != u64::MAX => o.saturating_add(r.saturating_sub(1)),
            _ => Time::MAX,
        }
    }

    fn start(&mut self) {
        for s in &mut self.streams {
            s.batch_oldest = u64::MAX;
        }
    }

    /// The newest ts of the events taken from `stream` (a Kafka partition) so far.
    fn newest(&self, stream: i32) -> Option<u64> {
        self.streams
            .iter()
            .find(|s| s.stream == stream)
            .and_then(|s| s.newest)
    }

    fn clock(&mut self, stream: i32) -> &mut StreamClock {
        let i = match self.streams.iter().position(|s| s.stream == stream) {
            Some(i) => i,
            None => {
                self.streams.push(StreamClock {
                    stream,
                    newest: None,
                    batch_oldest: u64::MAX,
                });
                self.streams.len() - 1
            }
        };
        &mut self.streams[i]
    }

    /// The ts at or before which the next line of `stream` is too late: `min_ts` (from the
    /// clock before the batch), or later if a newer line of the stream moved it.
    fn min_ts(&mut self, stream: i32, min_ts: Option<u64>) -> Option<u64> {
        let Some(span) = self.span else {
            return min_ts;
        };
        let by_stream = self.clock(stream).newest.and_then(|n| n.checked_sub(span));
        match (by_stream, min_ts) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        }
    }

    /// Whether `event` joins the batch (then it counts in its stream's ts); if not, it starts
    /// the next one.
    fn fits(
        &mut self,
        event: &Event,
        stream: i32,
        controls: persona_dataflows::ControlKinds,
    ) -> bool {
        if withdraws(event, controls) {
            // Applied however late, and moves no clock.
            return true;
        }
        let span = self.span;
        let clock = self.clock(stream);
        if !controls.is_control(event) {
            let seal = span.and_then(|span| event.ts.checked_sub(span));
            if seal.is_some_and(|seal| clock.batch_oldest <= seal) {
                return false;
            }
            clock.newest = clock.newest.max(Some(event.ts));
        }
        // A grant of consent moves no clock, but a newer event can make it too late.
        clock.batch_oldest = clock.batch_oldest.min(event.ts);
        true
    }
}

/// The stream a record is judged in (see [`BatchCut`]): its Kafka partition, or the file.
fn stream_of(origin: &Origin<'_>) -> i32 {
    match origin {
        Origin::Message { partition, .. } => *partition,
        Origin::Line { .. } => -1,
    }
}

impl BatchCut {
    /// Parses one record into `batch`, judged against its stream so far. `false`: the event
    /// would make an older one of its stream in the batch too late, so it is kept in `carried`
    /// to start the next batch.
    fn record(
        &mut self,
        raw: &[u8],
        origin: Origin<'_>,
        (min_ts, max_ts): (Option<u64>, Option<u64>),
        (batch, carried): (&mut Vec<Event>, &mut Option<(Event, i32)>),
        shared: &Shared,
    ) -> bool {
        let stream = stream_of(&origin);
        let before = batch.len();
        let min_ts = self.min_ts(stream, min_ts);
        event_record(raw, origin, (min_ts, max_ts), batch, shared);
        if batch
            .get(before)
            .is_some_and(|e| !self.fits(e, stream, shared.controls))
        {
            *carried = batch.pop().map(|e| (e, stream));
            return false;
        }
        true
    }
}

/// The ts the event clock follows (less the allowed lateness). A replaying worker's `own`
/// newest while it reads. A Kafka worker reading a backlog: the newest ts of its slowest
/// events partition still in it (`Reader::backlog`; 0 before its first event, and while the
/// worker connects), a watermark: librdkafka hands a worker its partitions' messages in
/// chunks and workers read at their own pace, so the newest ts read anywhere would make a
/// lagging partition too late. Otherwise that ts, by any worker (`global`).
fn clock_basis(own: Option<u64>, feed: &Feed, cut: &BatchCut, global: impl FnOnce() -> u64) -> u64 {
    let basis = match feed {
        _ if own.is_some() => own,
        // Nothing read yet: a cluster's other processes may be far into their backlogs.
        Feed::Kafka(reader) if reader.connecting() => Some(0),
        Feed::Kafka(reader) => reader.backlog().map(|p| cut.newest(p).unwrap_or(0)).min(),
        Feed::File { .. } => None,
    };
    basis.unwrap_or_else(global)
}

/// The times the events of a replayed batch enter at: the clock as it stands once each is
/// read, as if the clock moved record by record. They never decrease and stay within `limit`
/// ([`BatchCut::entry_limit`]) unless the clock before the batch already passed it. Control
/// records do not move the clock.
struct RecordClock {
    /// The clock before the batch.
    before: Time,
    /// The largest `ts` read so far.
    newest: u64,
    lateness: u64,
    limit: Time,
}

impl RecordClock {
    fn time(&mut self, e: &Event, controls: persona_dataflows::ControlKinds) -> Time {
        if !controls.is_control(e) {
            self.newest = self.newest.max(e.ts);
        }
        self.before
            .max(self.newest.saturating_sub(self.lateness).min(self.limit))
    }
}

/// Starts a batch with the event that ended the last one, if any; returns how many it took.
fn start_batch(
    cut: &mut BatchCut,
    carried: &mut Option<(Event, i32)>,
    batch: &mut Vec<Event>,
    controls: persona_dataflows::ControlKinds,
) -> usize {
    cut.start();
    let Some((e, stream)) = carried.take() else {
        return 0;
    };
    cut.fits(&e, stream, controls);
    batch.push(e);
    1
}

/// Why [`read_lines`] stopped before its limit.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum LinesEnd {
    /// A line that starts the next batch is in `carried` (see [`BatchCut`]).
    Carried,
    /// Following the file, and nothing new yet.
    Wait,
    /// The file is done.
    End,
}

/// Reads up to `limit` of this worker's lines of a file into `batch`; returns how many it read
/// and, if it stopped early, why.
fn read_lines(
    events: &mut LineSource,
    label: &str,
    limit: usize,
    (cut, ts_bounds): (&mut BatchCut, (Option<u64>, Option<u64>)),
    (batch, carried): (&mut Vec<Event>, &mut Option<(Event, i32)>),
    shared: &Shared,
) -> Result<(usize, Option<LinesEnd>)> {
    let mut read = 0;
    while read < limit {
        match events.next_line()? {
            Next::Line { number, oversize } => {
                read += 1;
                let line = events.line();
                let mut taken = true;
                if !line.iter().all(u8::is_ascii_whitespace) {
                    let origin = Origin::Line {
                        path: label,
                        number,
                    };
                    if oversize {
                        shared.metrics.event_read();
                        shared
                            .dead
                            .reject(&oversize_rejection(), &origin.to_string(), line);
                    } else {
                        taken = cut.record(
                            line,
                            origin,
                            ts_bounds,
                            (&mut *batch, &mut *carried),
                            shared,
                        );
                    }
                }
                events.clear();
                if !taken {
                    return Ok((read, Some(LinesEnd::Carried)));
                }
            }
            Next::Wait => return Ok((read, Some(LinesEnd::Wait))),
            Next::End => return Ok((read, Some(LinesEnd::End))),
        }
    }
    Ok((read, None))
}

/// Whether `event` is an erasure or a revocation: records that are applied however late.
fn withdraws(event: &Event, c: persona_dataflows::ControlKinds) -> bool {
    event.kind == c.erasure || (event.kind == c.consent && event.value() <= 0.0)
}

fn too_late(event: &Event, seal: u64) -> parse::Rejection {
    parse::Rejection::new(
        "too_late",
        format!(
            "ts {} is at or before {seal} (the engine clock less engine.retention): too late to apply",
            event.ts
        ),
    )
}

/// Dead-letters the records the gate finds later than the retention: ones read before another
/// worker's (or process's) newer events moved the shared event clock past them. Their raw line
/// is gone by then, so the record shows the event as the engine read it.
struct LateRecords(Arc<Shared>);

impl persona_dataflows::LateObserver for LateRecords {
    fn too_late(&self, event: &Event, seal: u64) {
        let names = &self.0.names;
        let mut raw = serde_json::json!({
            "event_id": names.shared(event.id).as_ref(),
            "user_id": names.shared(event.user).as_ref(),
            "type": names.shared(event.kind).as_ref(),
            "ts": event.ts,
        });
        if event.has_item() {
            raw["item_id"] = names.shared(event.item).as_ref().into();
        }
        if event.value_bits != 0 {
            raw["value"] = event.value().into();
        }
        if let Some(d) = event.device {
            raw["device"] = serde_json::json!({"type": d.as_str()});
        }
        if event.kind == self.0.controls.consent {
            raw["properties"] = serde_json::json!({"personalization": event.value() > 0.0});
            raw.as_object_mut().map(|o| o.remove("value"));
        }
        let raw = raw.to_string();
        self.0
            .dead
            .reject(&too_late(event, seal), "engine", raw.as_bytes());
        if event.device.is_some() {
            names.forget_event_id(event.id);
        }
    }
}

/// A catalog file, read by worker 0.
struct CatalogFile {
    source: LineSource,
    label: String,
}

impl CatalogFile {
    /// Reads up to `budget` records; returns whether the file is (for now) exhausted.
    fn read(
        &mut self,
        budget: usize,
        catalog: &mut Catalog,
        input: &mut InputSession<Time, (u64, u64), isize>,
        mut names: Option<&mut crate::cluster::Announcer>,
        shared: &Shared,
    ) -> Result<bool> {
        for _ in 0..budget {
            match self.source.next_line()? {
                Next::Line { number, oversize } => {
                    let line = self.source.line();
                    if !line.iter().all(u8::is_ascii_whitespace) {
                        let origin = Origin::Line {
                            path: &self.label,
                            number,
                        };
                        if oversize {
                            shared
                                .dead
                                .reject(&oversize_rejection(), &origin.to_string(), line);
                        } else {
                            catalog.record(line, origin, input, names.as_deref_mut(), shared);
                        }
                    }
                    self.source.clear();
                }
                Next::Wait | Next::End => return Ok(true),
            }
        }
        Ok(false)
    }
}

/// Where a worker's records come from.
enum Feed {
    File {
        events: LineSource,
        label: String,
        catalog: Option<CatalogFile>,
    },
    Kafka(kafka::Reader),
}

fn oversize_rejection() -> Rejection {
    Rejection {
        reason: "oversize",
        detail: format!("line is longer than {} bytes", parse::MAX_EVENT_BYTES),
    }
}

fn run_worker(
    worker: &mut Worker,
    shared: &Arc<Shared>,
    mode: &Mode,
    dump: Option<&Sender<Result<DumpPart, String>>>,
) -> Result<()> {
    let index = worker.index();
    let peers = worker.peers();
    let settings = &shared.settings;
    // This process's workers are global indices `process * workers ..`.
    let local = index % settings.workers;
    let queries = shared.router.attach(local);
    let record_clock = matches!(
        mode,
        Mode::Replay {
            record_clock: true,
            ..
        }
    );
    let (events_path, catalog_path, follow, clock_mode, replay, serve_after) = match mode {
        Mode::Replay {
            events,
            catalog,
            serve,
            ..
        } => (
            events.clone(),
            catalog.clone(),
            false,
            ClockMode::Event,
            true,
            *serve,
        ),
        Mode::Run => {
            let s = &settings.source;
            let catalog = (!s.catalog_path.as_os_str().is_empty()).then(|| s.catalog_path.clone());
            (
                s.path.clone(),
                catalog,
                s.follow,
                settings.clock,
                false,
                true,
            )
        }
    };
    let restore = shared
        .restore
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone();
    let mut feed = if matches!(mode, Mode::Run) && settings.source.kind == "kafka" {
        let monitor = shared
            .kafka
            .clone()
            .ok_or_else(|| anyhow!("the Kafka source has no monitor"))?;
        Feed::Kafka(kafka::Reader::new(
            monitor,
            index,
            peers,
            settings.start_offset,
            restore.as_ref().map_or(&[], |c| &c.positions[..]),
        ))
    } else {
        Feed::File {
            events: LineSource::open(&events_path, follow, index, peers)?,
            label: events_path.display().to_string(),
            catalog: match (&catalog_path, index) {
                (Some(path), 0) => Some(CatalogFile {
                    source: LineSource::open(path, follow, 0, 1)?,
                    label: path.display().to_string(),
                }),
                _ => None,
            },
        }
    };
    let mut catalog = Catalog::default();
    let start_clock: Time = match clock_mode {
        ClockMode::Live => wall_ms() / settings.tick_ms * settings.tick_ms,
        ClockMode::Event => 0,
    };

    let view_config = ViewConfig {
        window_retention_ms: {
            let widest = settings.widest_window_ms();
            // Replay reads its final state at the largest *kept* ts, which a dropped conflicting
            // duplicate can put before the clock: keep records one more window for that read.
            if replay {
                widest.saturating_mul(2)
            } else {
                widest
            }
        },
        session_gap_ms: settings.session_gap_ms,
        dedup_horizon_ms: settings.dedup_horizon_ms,
        purchase_kind: shared.names.intern("purchase"),
        controls: shared.controls,
        names: shared.names.order(),
        event_ids: shared.names.event_order(),
        retention: settings.retention_ms.map(|retention_ms| Retention {
            retention_ms,
            late: Arc::new(LateRecords(shared.clone())),
            restore_time: restore
                .as_ref()
                .map(|c| restore_time(c, clock_mode, start_clock)),
        }),
        forget_event_id: settings.retention_ms.map(|_| {
            let names = shared.names.clone();
            Arc::new(move |id| names.forget_event_id(id)) as persona_dataflows::event::Forget
        }),
    };
    let recommend_config = settings
        .recommendations
        .as_ref()
        .map(|r| recommend_config(r, shared));
    // Replay ticks once, at its final time: its result must not depend on where batches fall,
    // and re-ranking at every batch would cost as much as the rest of the engine.
    let refresh_every = settings
        .recommendations
        .as_ref()
        .map(|r| r.refresh_ms)
        .filter(|ms| !replay && *ms > 1);
    let refresh_ticks = settings.recommendations.is_some() && (replay || refresh_every.is_some());
    let segment_config = segment_config(settings, shared);
    let mut last_refresh = 0u64;
    let mut last_refresh_at = Instant::now();
    let observer: Arc<dyn persona_dataflows::DedupObserver> = Arc::new(shared.metrics.clone());
    let dataflow_id = worker.next_dataflow_index();
    let operator_times = settings
        .operator_times
        .then(|| {
            let times = crate::optimes::OperatorTimes::register(worker);
            if times.is_none() {
                tracing::warn!("engine.operator_times: this worker has no log registry");
            }
            times
        })
        .flatten();
    #[allow(clippy::type_complexity)]
    let (
        mut inputs,
        mut traces,
        mut recommend,
        probe,
        mut agreements,
        (gate, basics_state),
        publisher,
        watched,
    ): (
        Inputs,
        ProfileTraces,
        Option<RecommendTraces>,
        ProbeHandle<Time>,
        Option<[crate::cluster::Agreement; 2]>,
        (persona_dataflows::GateState, persona_dataflows::BasicsState),
        Rc<RefCell<Publisher>>,
        ProbeHandle<Time>,
    ) = worker.dataflow::<Time, _, _>(|scope| {
        let (events_in, raw) = scope.new_collection::<Event, isize>();
        let (catalog_in, catalog) = scope.new_collection::<(u64, u64), isize>();
        let (controls_in, controls) = scope.new_collection::<Event, isize>();
        let raw = raw.concat(controls);
        // In a cluster, the event clock follows the largest ts parsed by any process.
        let max_share = settings.cluster.as_ref().map(|_| {
            let shared = shared.clone();
            crate::cluster::MaxShare::new(scope, move |v| {
                shared.max_ts.fetch_max(v, Ordering::AcqRel);
            })
        });
        // In a cluster, events and catalog records wait for their strings to be installed in
        // every process that needs them.
        let (announcer, raw, catalog) = if settings.cluster.is_some() {
            let (announcer, installed) =
                crate::cluster::Announcer::new(scope, shared.names.clone());
            let raw = crate::cluster::after_names(raw, &installed);
            let catalog = crate::cluster::after_names(catalog, &installed);
            (Some(announcer), raw, catalog)
        } else {
            (None, raw, catalog)
        };
        // Replay's end: the largest ts of the whole log, then the largest kept one.
        let agreements = replay.then(|| {
            [
                crate::cluster::Agreement::new(scope),
                crate::cluster::Agreement::new(scope),
            ]
        });
        let (refresh_in, refresh) = if refresh_ticks {
            let (input, ticks) = scope.new_collection::<(), isize>();
            (Some(input), Some(ticks))
        } else {
            (None, None)
        };
        let views = profiles(
            raw,
            catalog,
            &view_config,
            recommend_config.as_ref(),
            segment_config.as_ref(),
            refresh.as_ref(),
            observer,
        );
        let (probe, _) = views.basics.stream.clone().probe();
        views.features.stream.clone().probe_with(&probe);
        let (publisher, watched) = watch_changes(&views, shared, &probe, local);
        let recommend = views.recommend.as_ref().map(|r| {
            r.affinity.stream.clone().probe_with(&probe);
            r.neighbours.stream.clone().probe_with(&probe);
            r.popular.stream.clone().probe_with(&probe);
            r.catalog.stream.clone().probe_with(&probe);
            r.traces()
        });
        (
            Inputs {
                events: Some(events_in),
                controls: controls_in,
                catalog: Some(catalog_in),
                refresh: refresh_in,
                names: announcer,
                max_ts: max_share,
            },
            ProfileTraces {
                basics: views.basics.trace,
                features: views.features.trace,
                segments: views.segments.map(|s| s.trace),
            },
            recommend,
            probe,
            agreements,
            (views.gate, views.basics_state),
            publisher,
            watched,
        )
    });

    let batch_lines = settings.batch_lines.unwrap_or(if replay {
        REPLAY_BATCH_LINES
    } else {
        LIVE_BATCH_LINES
    });
    let status = &shared.workers[local];
    let mut clock: Time = start_clock;
    inputs.advance_to(clock);
    // `run` under the event clock: the time this worker last put records in at. Its records
    // complete only once the clock passes it (see `seal_when_idle`). The start time counts, so
    // that sources with nothing to read still complete a time: an empty topic is readable
    // (unknown users are 404, not 503), as with a restored checkpoint, which is below its clock.
    let mut entered_at: Option<Time> = Some(clock);
    // The erasure log's records enter before any event (one worker of each process).
    if local == 0 {
        let start = std::mem::take(&mut *shared.erased.lock().unwrap_or_else(|p| p.into_inner()));
        for e in start {
            let record = erasure_event(e.user_hash, e.through_ms, &view_config);
            inputs.controls.update(record, 1);
        }
    }
    if let Some(c) = restore {
        entered_at = None;
        restore_share(
            &c,
            clock_mode,
            &mut clock,
            (&mut inputs, &basics_state),
            &mut catalog,
            index,
            peers,
            local,
            shared,
        );
    }
    let mut turn = crate::checkpoint::Turn::default();
    // This worker's part in the checkpoint rounds, at its three places in the loop.
    macro_rules! poll_checkpoint {
        ($coordinator:expr, $reader:expr) => {
            poll_checkpoint(
                $coordinator,
                $reader,
                local,
                &mut turn,
                clock,
                (&gate, &basics_state),
                &catalog,
                shared,
            )
        };
    }
    let mut pending: Vec<Query> = Vec::new();
    let mut batch: Vec<Event> = Vec::with_capacity(batch_lines);
    let mut cut = BatchCut::new(settings, clock_mode);
    // The event that ended the last batch (see `BatchCut`): the next one's first.
    let mut carried: Option<(Event, i32)> = None;
    let mut last_status = Instant::now()
        .checked_sub(STATUS_EVERY)
        .unwrap_or_else(Instant::now);
    let mut input_done = false;
    let mut dumped = !replay;
    let mut final_time: Option<Time> = None;
    // Replay: the final state, waiting for the cluster to agree on its time.
    let mut final_state: Option<Vec<(u64, ProfileState)>> = None;
    let mut worker_max_ts = 0u64;
    // The clock before the last batch read, while that batch is not fully processed.
    let mut in_flight: Option<Time> = None;
    // Lines of the next batch a replay read while it waited for the last one to be processed,
    // and why that reading stopped early, if it did.
    let mut pre_read: Option<(usize, Option<LinesEnd>)> = None;

    // Replay reads the whole catalog before the events (it applies retroactively either way).
    if replay {
        if let Feed::File {
            catalog: Some(c), ..
        } = &mut feed
        {
            if let Some(input) = inputs.catalog.as_mut() {
                while !c.read(
                    batch_lines,
                    &mut catalog,
                    input,
                    inputs.names.as_mut(),
                    shared,
                )? {}
            }
        }
    }

    loop {
        if shared.stopping() {
            if let (Some(coordinator), Feed::Kafka(reader)) = (shared.checkpoints.get(), &feed) {
                last_checkpoint(coordinator, reader.connected(), local, || {
                    // The copy may wait for the basics to apply what the gate has.
                    worker.step();
                    poll_checkpoint!(coordinator, reader);
                });
            }
            break;
        }
        if let (Some(coordinator), Feed::Kafka(reader)) = (shared.checkpoints.get(), &feed) {
            if coordinator.copy_due(&turn) && !copy_ready(&gate, &basics_state) {
                // With a retention the copy waits until the basics have applied everything
                // the gate has: no new input meanwhile, so they catch up within a few steps.
                worker.step_or_park(Some(Duration::from_millis(1)));
                poll_checkpoint!(coordinator, reader);
                continue;
            }
        }
        // 1. Read a bounded batch of this worker's records, once the last one has been processed
        // (see step 3).
        let mut read = 0usize;
        // This worker has read everything its sources hold for now.
        let mut at_end = input_done;
        let reading = !input_done;
        let held_back = in_flight.is_some_and(|t| probe.less_than(&t));
        if !held_back {
            in_flight = None;
        }
        if reading && !held_back {
            let max_ts = match clock_mode {
                ClockMode::Live => Some(wall_ms().saturating_add(settings.max_future_skew_ms)),
                ClockMode::Event => None,
            };
            let min_ts = settings.retention_ms.and_then(|r| clock.checked_sub(r));
            let ts_bounds = (min_ts, max_ts);
            match &mut feed {
                Feed::File {
                    events,
                    label,
                    catalog: catalog_file,
                } => {
                    if let (Some(c), Some(input)) = (catalog_file.as_mut(), inputs.catalog.as_mut())
                    {
                        c.read(
                            batch_lines,
                            &mut catalog,
                            input,
                            inputs.names.as_mut(),
                            shared,
                        )?;
                    }
                    // A replay may have read part or all of this batch while it waited for the
                    // last one (step 3).
                    let (got, end) = match pre_read.take() {
                        Some(p) => p,
                        None => (
                            start_batch(&mut cut, &mut carried, &mut batch, shared.controls),
                            None,
                        ),
                    };
                    read += got;
                    let end = match end {
                        Some(end) => Some(end),
                        None => {
                            let (n, end) = read_lines(
                                events,
                                label,
                                batch_lines - read,
                                (&mut cut, ts_bounds),
                                (&mut batch, &mut carried),
                                shared,
                            )?;
                            read += n;
                            end
                        }
                    };
                    match end {
                        Some(LinesEnd::Wait) => at_end = true,
                        Some(LinesEnd::End) => {
                            input_done = true;
                            at_end = true;
                        }
                        Some(LinesEnd::Carried) | None => {}
                    }
                    status.lines.store(events.lines(), Ordering::Relaxed);
                    status.offset.store(events.offset(), Ordering::Relaxed);
                    // Unknown for a .gz log: its offset counts uncompressed bytes.
                    let len = events.file_len().unwrap_or(u64::MAX);
                    status.file_len.store(len, Ordering::Relaxed);
                }
                Feed::Kafka(reader) => {
                    read += start_batch(&mut cut, &mut carried, &mut batch, shared.controls);
                    let outcome = reader.read(batch_lines - read, &mut |stream, raw, origin| {
                        match stream {
                            Stream::Events => {
                                // Not taken: kept for the next batch, and the reader holds
                                // its position until then.
                                return cut.record(
                                    raw,
                                    origin,
                                    ts_bounds,
                                    (&mut batch, &mut carried),
                                    shared,
                                );
                            }
                            Stream::Catalog => {
                                if let Some(input) = inputs.catalog.as_mut() {
                                    catalog.record(
                                        raw,
                                        origin,
                                        input,
                                        inputs.names.as_mut(),
                                        shared,
                                    )
                                }
                            }
                        }
                        true
                    })?;
                    read += outcome.records;
                    at_end = outcome.caught_up && read < batch_lines;
                    if reader.reads_nothing() && inputs.events.is_some() {
                        tracing::info!(
                            worker = index,
                            "kafka: no partition to read; this worker's input is closed"
                        );
                        inputs.close();
                    }
                }
            }
            // Under the live clock records go in at the clock; under the event clock a worker
            // marks its end once the clock is past them (step 2).
            if at_end && clock_mode == ClockMode::Live {
                status.mark_end(clock);
            }
        }
        // Recommendations are re-ranked at a refresh tick, once per `every` of engine time, put
        // in before this batch: at the current clock, the tick covers every earlier batch and
        // fires as soon as this one moves the clock. While a backlog is read (a first start on
        // a full topic, a restart), once per `every` of wall time at most: under the event
        // clock a backlog spans days of event time in seconds, and re-ranking popular items
        // thousands of times over made reading it several times slower, for answers nobody
        // could read (every answer is at the latest time). Its last batches count as the
        // tail, so that the tick before the last batch covers all the others.
        if let Some(every) = refresh_every.filter(|every| clock / every > last_refresh / every) {
            let backlog = match &feed {
                Feed::Kafka(reader) => reader.in_backlog(2 * batch_lines as i64),
                Feed::File { .. } => held_back || read >= batch_lines,
            };
            if !backlog || last_refresh_at.elapsed() >= Duration::from_millis(every) {
                last_refresh = clock;
                last_refresh_at = Instant::now();
                inputs.advance_to(clock);
                inputs.tick();
            }
        }
        if reading && !held_back {
            // The batch enters at a clock that has seen it (a Kafka backlog: its slowest
            // partition's newest ts, see `clock_basis`), so that windows and segments are
            // evaluated at times that have seen the events, not at time 0. Control records do not
            // move it: they act by their ts whenever they arrive, and one stamped far ahead of
            // the events would otherwise age out windows (and, with a retention, make the
            // events after it too late) before the replay's final time, the last event's ts.
            let local_max = batch
                .iter()
                .filter(|e| !shared.controls.is_control(e))
                .map(|e| e.ts)
                .max()
                .unwrap_or(0);
            // With `record_clock`, each event enters at the clock as it stands once that event
            // is read (see `record_times`): its windows and segments see it at its own time,
            // whatever the batching. Otherwise the whole batch enters at the clock after it.
            let per_record = (record_clock && final_time.is_none()).then_some(RecordClock {
                before: clock,
                newest: worker_max_ts,
                lateness: settings.allowed_lateness_ms,
                limit: cut.entry_limit(),
            });
            worker_max_ts = worker_max_ts.max(local_max);
            if let Some(m) = inputs.max_ts.as_mut() {
                m.offer(worker_max_ts);
            }
            let seen = shared
                .max_ts
                .fetch_max(local_max, Ordering::AcqRel)
                .max(local_max);
            if clock_mode == ClockMode::Event && final_time.is_none() {
                // A replaying worker's clock follows its own lines while it reads, so the times
                // events enter at (and the triggers they cause) depend only on the log and the
                // number of workers, not on how fast the others read. A Kafka worker's follows
                // its slowest partition while it reads a backlog (see `clock_basis`).
                let own = (replay && reading).then_some(worker_max_ts);
                let basis = clock_basis(own, &feed, &cut, || seen);
                let entry = basis.saturating_sub(settings.allowed_lateness_ms);
                clock = clock.max(entry.min(cut.entry_limit()));
                if per_record.is_none() {
                    inputs.advance_to(clock);
                }
            }
            if let Some(n) = inputs.names.as_mut() {
                for event in &batch {
                    n.event(event, &shared.names);
                }
            }
            if let Some(input) = inputs.events.as_mut() {
                match per_record {
                    Some(mut records) => {
                        for event in batch.drain(..) {
                            let t = records.time(&event, shared.controls);
                            input.update_at(event, t, 1);
                        }
                    }
                    None => {
                        for event in batch.drain(..) {
                            input.update(event, 1);
                        }
                    }
                }
            }
            inputs.advance_to(clock);
            if read > 0 {
                entered_at = Some(clock);
            }
            if let (true, Some([ends, _])) = (input_done, agreements.as_mut()) {
                ends.offer(worker_max_ts);
            }
            if let Feed::Kafka(reader) = &mut feed {
                reader.input_at(clock);
            }
        }

        // 2. Advance the engine clock.
        let previous = clock;
        match clock_mode {
            ClockMode::Live => clock = clock.max(wall_ms() / settings.tick_ms * settings.tick_ms),
            ClockMode::Event => {
                if final_time.is_none() {
                    let own = (replay && !input_done).then_some(worker_max_ts);
                    let basis =
                        clock_basis(own, &feed, &cut, || shared.max_ts.load(Ordering::Acquire));
                    clock = clock.max(basis.saturating_sub(settings.allowed_lateness_ms));
                    if !replay && at_end && read == 0 {
                        if entered_at == Some(clock) {
                            clock = seal_when_idle(
                                clock,
                                settings,
                                &mut worker_max_ts,
                                &mut inputs,
                                shared,
                            );
                        }
                        // Everything this worker put in is before the clock.
                        status.mark_end(clock);
                    }
                }
            }
        }
        // Replay: once every worker's input has ended, move the clock to the largest ts.
        let ended = agreements.as_ref().and_then(|[ends, _]| ends.result());
        if let (None, Some(last)) = (final_time, ended) {
            final_time = Some(last);
            inputs.advance_to(last);
            inputs.tick();
            clock = clock.max(last + 1);
        }
        inputs.advance_to(clock);
        status.clock.store(clock, Ordering::Relaxed);
        inputs.flush();

        // 3. Step: busy while there is input, else park until the next tick or a wake-up.
        if read > 0 {
            worker.step();
            // Backpressure: keep at most about one epoch of input in flight. A replay waits
            // here. `run` waits for a slice at most, then answers queries and reads nothing
            // until the epoch is complete: under the event clock another worker's slow
            // partition can hold it for long.
            let waiting = Instant::now();
            while probe.less_than(&previous)
                && !shared.stopping()
                && (replay || waiting.elapsed() < BACKPRESSURE_SLICE)
            {
                worker.step();
                // A replay reads ahead while it waits (mostly for the other workers): the next
                // batch is the same whenever its lines are read, since the clock that judges
                // them moves only once a batch is in. Not under a retention: there, sealing in
                // the running batch forgets event ids (and a too-late line forgets its own),
                // and an id the next batch reuses must be interned after that, not before.
                if let (true, false, None, Feed::File { events, label, .. }) =
                    (replay, input_done, settings.retention_ms, &mut feed)
                {
                    let (got, end) = match pre_read.take() {
                        Some(p) => p,
                        None => (
                            start_batch(&mut cut, &mut carried, &mut batch, shared.controls),
                            None,
                        ),
                    };
                    let more = if end.is_none() && got < batch_lines {
                        read_lines(
                            events,
                            label,
                            (batch_lines - got).min(READ_AHEAD_LINES),
                            (&mut cut, (None, None)),
                            (&mut batch, &mut carried),
                            shared,
                        )?
                    } else {
                        (0, end)
                    };
                    pre_read = Some((got + more.0, more.1));
                }
            }
            in_flight = Some(previous);
        } else {
            let park = match clock_mode {
                _ if held_back => Duration::from_millis(1),
                ClockMode::Live => {
                    Duration::from_millis(settings.tick_ms - wall_ms() % settings.tick_ms)
                }
                ClockMode::Event if replay => Duration::from_millis(1),
                ClockMode::Event => Duration::from_millis(settings.tick_ms),
            };
            worker.step_or_park(Some(park));
        }

        // 4. Progress, readiness, queries, compaction.
        let latest = match (traces.latest(), recommend.as_mut().map(|r| r.latest())) {
            (a, None) => a,
            (Some(a), Some(Some(b))) => Some(a.min(b)),
            (_, Some(_)) => None,
        };
        let completed = latest.map(|l| l.saturating_add(1)).unwrap_or(0);
        status.frontier.store(completed, Ordering::Release);
        // Reads are answered at the latest time whose changes the watch has also seen, so that
        // no published profile is older than an answer already given (see `profile_cache`).
        let ready = match watched.with_frontier(|f| f.first().copied()) {
            None => latest,
            Some(0) => None,
            Some(w) => latest.map(|l| l.min(w - 1)),
        };
        if let Feed::Kafka(reader) = &mut feed {
            reader.completed(completed);
            // For /v1/status only: a few times a second is enough, not every step; but every
            // step until ready, so that the positions shown once `/readyz` says 200 are those
            // it was judged on.
            if last_status.elapsed() >= STATUS_EVERY || !status.caught_up.load(Ordering::Acquire) {
                last_status = Instant::now();
                let partitions = reader.status();
                *status.partitions.lock().unwrap_or_else(|p| p.into_inner()) = partitions;
            }
        }
        if let (Some(coordinator), Feed::Kafka(reader)) = (shared.checkpoints.get(), &feed) {
            poll_checkpoint!(coordinator, reader);
        }
        if index == 0 {
            if let Some(c) = shared.clock() {
                shared.metrics.set_clock(c);
            }
        }
        if !replay && !status.caught_up.load(Ordering::Acquire) {
            // Caught up once the clock every worker has completed is past the point where the
            // *last* worker reached its end: a user's lines are spread over all workers' shares.
            let reached = shared
                .workers
                .iter()
                .map(|w| w.reached_end_at.load(Ordering::Acquire))
                .max()
                .unwrap_or(u64::MAX);
            let done = shared
                .workers
                .iter()
                .map(|w| w.frontier.load(Ordering::Acquire))
                .min()
                .unwrap_or(0);
            // Under the event clock a worker marks its end once the clock is past all it put
            // in (see `seal_when_idle`); under the live clock, with records at the clock.
            let caught_up = reached != u64::MAX
                && match clock_mode {
                    ClockMode::Live => done > reached,
                    ClockMode::Event => done >= reached,
                };
            if caught_up {
                status.caught_up.store(true, Ordering::Release);
            }
        }
        if !dumped {
            if let (Some(t), None) = (final_time, final_state.as_ref()) {
                if completed > t && !probe.less_equal(&t) {
                    let profiles = traces
                        .read_all(t)
                        .map_err(|e| anyhow!("cannot read the final state at {t}: {e:?}"))?;
                    // SPEC §3: the dump is taken at the largest ts of the accepted events.
                    let last = profiles
                        .iter()
                        .filter_map(|(_, s)| s.basics.map(|b| b.last))
                        .max()
                        .unwrap_or(0);
                    if let Some([_, lasts]) = agreements.as_mut() {
                        lasts.offer(last);
                    }
                    final_state = Some(profiles);
                }
            }
            // The state read stays until the cluster agrees on the dump's time: taking it
            // sooner dropped it, and every step in between read the whole state again.
            let kept = agreements.as_ref().and_then(|[_, lasts]| lasts.result());
            let profiles = kept.and_then(|_| final_state.take());
            if let (Some(as_of), Some(profiles)) = (kept, profiles) {
                if let Some(d) = dump {
                    d.send(Ok(DumpPart { as_of, profiles }))
                        .context("replay output channel closed")?;
                }
                dumped = true;
                status.caught_up.store(true, Ordering::Release);
                if !serve_after {
                    // All that is left here is freeing this worker's state, which would take
                    // the CPU from the dump's rendering and writing (and from workers still
                    // reading their final state): let them go first. Best effort.
                    let _ = set_nice(19);
                    break;
                }
            }
        }
        for mut q in queries.try_iter() {
            if matches!(q.ask, Ask::Erase { through: None }) {
                let now = Now {
                    replay,
                    clock_mode,
                    clock,
                };
                match start_erasure(
                    q,
                    now,
                    &mut inputs,
                    &view_config,
                    &mut worker_max_ts,
                    shared,
                ) {
                    Some(waiting) => q = waiting,
                    None => continue,
                }
            }
            pending.push(q);
        }
        if !pending.is_empty() {
            answer(
                &mut traces,
                recommend.as_mut(),
                ready,
                &mut pending,
                index,
                shared,
                &mut publisher.borrow_mut(),
            );
        }
        if let Some(l) = ready {
            // After the answers: they may have published entries at `l` already.
            publisher
                .borrow_mut()
                .publish(l, |user| traces.read_user(user, l));
            // Answers are always given at the latest ready time, so no history is kept.
            traces.compact_to(l);
            if let Some(r) = recommend.as_mut() {
                r.compact_to(l);
            }
        }
    }

    if let Some(times) = &operator_times {
        eprint!("{}", times.report());
    }
    for q in pending.drain(..) {
        let _ = q.reply.send(Answer::Unavailable);
    }
    // Stop without draining: draining would process every future window retraction first.
    drop(traces);
    drop(recommend);
    drop(inputs);
    worker.drop_dataflow(dataflow_id);
    Ok(())
}

/// This worker's part in the checkpoint rounds (see [`crate::checkpoint::Coordinator::poll`]).
#[allow(clippy::too_many_arguments)]
fn poll_checkpoint(
    coordinator: &crate::checkpoint::Coordinator,
    reader: &kafka::Reader,
    local: usize,
    turn: &mut crate::checkpoint::Turn,
    clock: Time,
    (gate, basics): (
        &persona_dataflows::GateState,
        &persona_dataflows::BasicsState,
    ),
    catalog: &Catalog,
    shared: &Shared,
) {
    if reader.connected() {
        coordinator.poll(
            local,
            turn,
            || reader.reflected_positions(),
            || {
                if !copy_ready(gate, basics) {
                    return None;
                }
                // Without a retention nothing is sealed, and this seals nothing.
                let seal = gate.seal_all();
                Some(crate::checkpoint::Part {
                    clock,
                    max_ts: shared.max_ts.load(Ordering::Acquire),
                    records: gate.records(shared.controls),
                    sealed: gate.sealed_records(),
                    // Without a retention no user has a sealed part: skip the walk over them.
                    basics: if gate.seals() {
                        basics.sealed_parts(seal)
                    } else {
                        Vec::new()
                    },
                    catalog: catalog.entries(&shared.settings.kafka.catalog_topic),
                })
            },
        );
    }
}

/// Whether this worker's state can be copied: with a retention, the gate's sealed records and
/// the basics' sealed parts must describe the same events, so the basics must have applied
/// every time the gate has (without one, the gate alone is copied: always ready).
fn copy_ready(
    gate: &persona_dataflows::GateState,
    basics: &persona_dataflows::BasicsState,
) -> bool {
    !gate.seals() || gate.applied().is_none_or(|t| basics.applied_through(t))
}

/// The time a checkpoint's records are fed at: just below its clock under the event clock
/// (the inputs then pass it, so the restored state is readable at once), else the start.
fn restore_time(c: &crate::checkpoint::Checkpoint, clock_mode: ClockMode, start: Time) -> Time {
    match clock_mode {
        ClockMode::Event => c.clock.saturating_sub(1).max(start),
        ClockMode::Live => start,
    }
}

/// How long a stopping worker waits for the other workers' shares of the last checkpoint.
const LAST_CHECKPOINT_WAIT: Duration = Duration::from_secs(10);

/// On a graceful stop: takes part in one last checkpoint round (`poll`: this worker's turn),
/// so that a restart resumes from here. A worker that never arrives (it failed) only delays
/// the stop by [`LAST_CHECKPOINT_WAIT`]; the checkpoints before stay valid.
fn last_checkpoint(
    coordinator: &crate::checkpoint::Coordinator,
    connected: bool,
    local: usize,
    mut poll: impl FnMut(),
) {
    if !connected || crate::cluster::peer_lost() {
        return;
    }
    coordinator.close();
    let deadline = Instant::now() + LAST_CHECKPOINT_WAIT;
    while !coordinator.closed() {
        if Instant::now() >= deadline {
            if local == 0 {
                tracing::warn!("no last checkpoint: not every worker took part in time");
            }
            return;
        }
        poll();
        std::thread::sleep(Duration::from_millis(1));
    }
}

/// Feeds this worker's share of checkpoint `c`: every `peers`-th record (the exchanges route
/// them to their owners), and the catalog entries of the partitions this worker reads.
#[allow(clippy::too_many_arguments)]
fn restore_share(
    c: &crate::checkpoint::Checkpoint,
    clock_mode: ClockMode,
    clock: &mut Time,
    (inputs, basics): (&mut Inputs, &persona_dataflows::BasicsState),
    catalog: &mut Catalog,
    index: usize,
    peers: usize,
    local: usize,
    shared: &Shared,
) {
    if clock_mode == ClockMode::Event {
        // At the clock itself the restored state would wait for a later ts to be complete.
        inputs.advance_to(restore_time(c, clock_mode, *clock));
        *clock = (*clock).max(c.clock);
    }
    // The basics' sealed parts are seeded on their users' workers before any record arrives.
    basics.restore(
        c.basics
            .iter()
            .filter(|b| persona_dataflows::owner(b.user, peers) == index)
            .cloned(),
    );
    for e in c.records.iter().skip(index).step_by(peers.max(1)) {
        if shared.controls.is_control(e) {
            inputs.controls.update(*e, 1);
        } else if let Some(input) = inputs.events.as_mut() {
            input.update(*e, 1);
        }
    }
    for (e, n) in c.sealed.iter().skip(index).step_by(peers.max(1)) {
        inputs.controls.update(*e, *n as isize);
    }
    if let Some(input) = inputs.catalog.as_mut() {
        for entry in &c.catalog {
            if kafka::partition_reader(entry.partition, peers) == index {
                catalog
                    .current
                    .insert(entry.item, (entry.category, entry.partition));
                input.update((entry.item, entry.category), 1);
            }
        }
    }
    if clock_mode == ClockMode::Event {
        inputs.advance_to(*clock);
    }
    let done = shared.restored.fetch_add(1, Ordering::AcqRel) + 1;
    if done == shared.workers.len() {
        *shared.restore.lock().unwrap_or_else(|p| p.into_inner()) = None;
    }
    tracing::debug!(worker = local, "checkpoint share fed");
}

/// Where a worker's clock stands.
#[derive(Clone, Copy)]
struct Now {
    replay: bool,
    clock_mode: ClockMode,
    clock: Time,
}

/// Records the erasure `q` asks for (erasure log, then the controls input) and makes `q` wait
/// until every view has taken it in; returns `None` if `q` was answered instead.
fn start_erasure(
    mut q: Query,
    now: Now,
    inputs: &mut Inputs,
    config: &ViewConfig,
    worker_max_ts: &mut u64,
    shared: &Shared,
) -> Option<Query> {
    if now.replay {
        let _ = q.reply.send(Answer::Refused(
            "a replay's served state is read-only: erase on the running engine (its erasure log also applies to later replays)".into(),
        ));
        return None;
    }
    let settings = &shared.settings;
    // Everything accepted so far: no event has a ts beyond the largest parsed one (nor, under
    // the live clock, beyond the allowed skew).
    let parsed = shared.max_ts.load(Ordering::Acquire);
    let cut = match now.clock_mode {
        ClockMode::Live => wall_ms()
            .saturating_add(settings.max_future_skew_ms)
            .max(parsed),
        // The event clock moves only with records' ts: this one moves it past the current
        // time, in every process, so that the erasure completes.
        ClockMode::Event => now
            .clock
            .saturating_add(settings.allowed_lateness_ms)
            .max(parsed)
            .saturating_add(1),
    };
    let record = crate::erasure::Erasure {
        user_hash: q.user,
        through_ms: cut,
        requested_at_ms: wall_ms(),
    };
    if let Err(e) = shared.erasures.append(&record) {
        tracing::error!("erasure not applied: {e:#}");
        let _ = q.reply.send(Answer::Failed(format!("{e:#}")));
        return None;
    }
    inputs
        .controls
        .update(erasure_event(q.user, cut, config), 1);
    q.ask = Ask::Erase { through: Some(cut) };
    q.min_as_of = Some(*inputs.controls.time());
    if now.clock_mode == ClockMode::Event {
        *worker_max_ts = (*worker_max_ts).max(cut);
        shared.max_ts.fetch_max(cut, Ordering::AcqRel);
        if let Some(m) = inputs.max_ts.as_mut() {
            m.offer(*worker_max_ts);
        }
    }
    shared.metrics.erased();
    Some(q)
}

/// `run` under the event clock, once a worker has read everything its sources hold: the clock
/// moves 1 ms past the time its last records went in at, so that they complete without
/// waiting for a later event (a batch at the clock completes only once the clock passes it).
/// It moves in every worker and process, as the newest `ts` does: the new clock's basis is
/// shared as one. The clock runs ahead of the events by at most 1 ms for each batch read
/// while no newer `ts` came.
fn seal_when_idle(
    clock: Time,
    settings: &Settings,
    worker_max_ts: &mut u64,
    inputs: &mut Inputs,
    shared: &Shared,
) -> Time {
    let sealed = clock.saturating_add(1);
    let basis = sealed.saturating_add(settings.allowed_lateness_ms);
    *worker_max_ts = (*worker_max_ts).max(basis);
    shared.max_ts.fetch_max(basis, Ordering::AcqRel);
    if let Some(m) = inputs.max_ts.as_mut() {
        m.offer(*worker_max_ts);
    }
    sealed
}

/// The type hashes of the control records (SPEC §2 types reserved by the engine).
fn control_kinds(names: &Names) -> persona_dataflows::ControlKinds {
    persona_dataflows::ControlKinds {
        erasure: names.intern(parse::ERASURE_TYPE),
        consent: names.intern(parse::CONSENT_TYPE),
    }
}

/// The control record of an erasure of `user` through `through`.
fn erasure_event(user: u64, through: u64, config: &ViewConfig) -> Event {
    Event {
        ts: through,
        user,
        id: 0,
        kind: config.controls.erasure,
        item: persona_dataflows::NO_ITEM,
        value_bits: 0,
        device: None,
    }
}

/// The segment view's configuration (`None` without segments).
fn segment_config(settings: &Settings, shared: &Shared) -> Option<SegmentConfig> {
    if settings.segments.is_empty() {
        return None;
    }
    let labels: Vec<&str> = settings.windows.iter().map(|w| w.label.as_str()).collect();
    // Compiled again with the name table, so that names rules mention can be shown.
    let rules = settings
        .segments
        .iter()
        .map(|s| {
            Rule::compile(s.rule.text(), &labels, &mut |n| shared.names.intern(n))
                .unwrap_or_else(|_| s.rule.clone())
        })
        .collect();
    Some(SegmentConfig {
        rules: Arc::new(rules),
        windows_ms: settings.windows.iter().map(|w| w.width_ms).collect(),
        score_window_ms: crate::config::SCORE_WINDOW_MS,
        weights: Arc::new(
            settings
                .weights
                .iter()
                .map(|(kind, w)| (shared.names.intern(kind), *w))
                .collect(),
        ),
        default_weight: settings.default_weight,
        names: shared.names.order(),
    })
}

/// Calls `$f(user, value, time, diff)` for every update of an arrangement batch keyed by user.
macro_rules! for_each_update {
    ($span:expr, $f:expr) => {{
        use differential_dataflow::trace::{Cursor, Navigable};
        if let Some(batch) = $span.inner.as_ref() {
            let batch = &**batch;
            let mut cursor = batch.cursor();
            while let Some(user) = cursor.get_key(batch).copied() {
                while let Some(val) = cursor.get_val(batch) {
                    cursor.map_times(batch, |t, r| $f(user.0, val, *t, *r));
                    cursor.step_val(batch);
                }
                cursor.step_key(batch);
            }
        }
    }};
}

/// Hooks the triggers sink, live subscribers and the published profiles to the arrangements'
/// batches: each batch holds exactly the changes of times that just completed, once. Returns
/// the publisher and a probe that has passed a time once every change through it was seen.
fn watch_changes(
    views: &persona_dataflows::Views<'_>,
    shared: &Arc<Shared>,
    probe: &ProbeHandle<Time>,
    local: usize,
) -> (Rc<RefCell<Publisher>>, ProbeHandle<Time>) {
    use timely::dataflow::operators::Inspect;
    let publisher = Rc::new(RefCell::new(Publisher::new(shared.profiles.clone(), local)));
    let watched = ProbeHandle::new();
    // Every change of a user's records, once per (user, time) of a batch.
    let changed = |shared: Arc<Shared>, publisher: Rc<RefCell<Publisher>>| {
        move |user: u64, t: Time, last: &mut Option<(u64, Time)>| {
            if *last == Some((user, t)) {
                return;
            }
            *last = Some((user, t));
            publisher.borrow_mut().changed(user, t);
            if shared.live.hub.active() {
                shared.live.hub.changed(user, t);
            }
        }
    };
    if let Some(segments) = views.segments.as_ref() {
        let shared = shared.clone();
        let on_change = changed(shared.clone(), publisher.clone());
        segments
            .stream
            .clone()
            .inspect(move |batch| {
                let mut changes: Vec<(u64, u64, u32, isize)> = Vec::new();
                for_each_update!(batch, |user, id: &u32, t, r| changes
                    .push((t, user, *id, r)));
                changes.sort_unstable();
                shared.live.triggers(&changes);
                let mut last = None;
                for (t, user, _, _) in &changes {
                    on_change(*user, *t, &mut last);
                }
            })
            // A replay stops once its final time passed here: every trigger is out by then.
            .probe_with(probe)
            .probe_with(&watched);
    }
    // A profile changes with its basics (every event) and its features (windows moving).
    macro_rules! watch_users {
        ($stream:expr) => {{
            let on_change = changed(shared.clone(), publisher.clone());
            $stream
                .clone()
                .inspect(move |batch| {
                    let mut last = None;
                    for_each_update!(batch, |user, _, t, _| on_change(user, t, &mut last));
                })
                .probe_with(&watched);
        }};
    }
    watch_users!(views.basics.stream);
    watch_users!(views.features.stream);
    (publisher, watched)
}

/// The recommendation views' configuration, from the settings.
fn recommend_config(r: &crate::config::RecommendSettings, shared: &Shared) -> RecommendConfig {
    let names = shared.names.order();
    let milli = |w: f64| (w * 1000.0).round().clamp(0.0, f64::from(u32::MAX)) as u32;
    RecommendConfig {
        interactions: InteractionConfig {
            recent_items: r.recent_items,
            horizon_ms: r.horizon_ms,
            weights: Arc::new(
                r.weights
                    .iter()
                    .map(|(kind, w)| (shared.names.intern(kind), milli(*w)))
                    .collect(),
            ),
            default_weight: milli(r.default_weight),
            purchase_kind: shared.names.intern("purchase"),
            names: names.clone(),
        },
        similar: SimilarConfig {
            neighbours: r.neighbours,
            similarity: r.similarity,
            min_cooccurrence: r.min_cooccurrence,
            names: names.clone(),
        },
        popular: PopularConfig {
            window_ms: r.popular_window_ms,
            size: r.popular_size,
            names,
        },
    }
}

/// Answers the queries whose time is complete; keeps the others until their deadline.
fn answer(
    traces: &mut ProfileTraces,
    mut recommend: Option<&mut RecommendTraces>,
    latest: Option<Time>,
    pending: &mut Vec<Query>,
    worker: usize,
    shared: &Shared,
    publisher: &mut Publisher,
) {
    let now = Instant::now();
    let names = shared.names.order();
    let mut waiting = Vec::new();
    for q in pending.drain(..) {
        if q.reply.is_closed() {
            continue;
        }
        let ready = match (latest, q.min_as_of) {
            (Some(l), Some(min)) => l >= min,
            (Some(_), None) => true,
            (None, _) => false,
        };
        if !ready {
            if now >= q.deadline {
                let _ = q.reply.send(Answer::Timeout { as_of: latest });
            } else {
                waiting.push(q);
            }
            continue;
        }
        let as_of = latest.unwrap_or(0);
        let read = match (&q.ask, recommend.as_deref_mut()) {
            (Ask::Profile, _) => traces.read_user(q.user, as_of).map(|state| {
                let state = state.map(Arc::new);
                publisher.offer(q.user, as_of, state.clone());
                Answer::Profile {
                    as_of,
                    worker,
                    state,
                }
            }),
            (Ask::Erase { through }, _) => Ok({
                publisher.erased(q.user);
                // Taken in: the next checkpoint holds none of the user's data; take it now.
                if let Some(c) = shared.checkpoints.get() {
                    c.erased();
                }
                Answer::Erased {
                    as_of,
                    worker,
                    through: through.unwrap_or(0),
                }
            }),
            (Ask::SegmentCounts, _) => traces
                .segment_counts(as_of, shared.settings.segments.len())
                .map(|counts| Answer::SegmentCounts { as_of, counts }),
            (Ask::Recommend { .. } | Ask::Similar { .. }, None) => Ok(Answer::Disabled),
            (Ask::Recommend { strategy, limit }, Some(r)) => traces
                .read_user(q.user, as_of)
                .and_then(|state| {
                    let categories = state.map(|s| s.categories).unwrap_or_default();
                    r.recommend(q.user, &categories, as_of, strategy, *limit, &names)
                })
                .map(|items| Answer::Recommendations {
                    as_of,
                    worker,
                    items,
                }),
            (Ask::Similar { item, limit }, Some(r)) => {
                r.similar(*item, as_of, &names).map(|mut items| {
                    items.truncate(*limit);
                    Answer::Similar {
                        as_of,
                        worker,
                        items,
                    }
                })
            }
        };
        match read {
            Ok(a) => {
                let _ = q.reply.send(a);
            }
            Err(e) => {
                tracing::warn!(worker, "cannot read at {as_of}: {e:?}");
                waiting.push(q);
            }
        }
    }
    *pending = waiting;
}

/// Receives every worker's dump part; returns the final time and all profiles.
pub fn collect_dump(
    parts: &Receiver<Result<DumpPart, String>>,
    workers: usize,
) -> Result<(u64, Vec<(u64, ProfileState)>)> {
    let mut all = Vec::new();
    let mut as_of = 0;
    for _ in 0..workers {
        let part = parts
            .recv()
            .map_err(|_| anyhow!("the workers stopped before the replay finished"))?
            .map_err(|e| anyhow!(e))?;
        as_of = part.as_of;
        all.extend(part.profiles);
    }
    Ok((as_of, all))
}
