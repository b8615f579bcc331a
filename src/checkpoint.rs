//! Checkpoints: what a restart needs to resume from stored Kafka positions instead of re-reading
//! every topic from the beginning of retention.
//!
//! A checkpoint holds, for the whole process:
//! * every worker's gate records: the de-duplicated events the views are built from (admitted
//!   or withheld by consent) and the erasure and consent records in force. Erased events are
//!   not in it: the gate no longer holds them;
//! * the catalog read from the catalog topic, with the partition each item came from;
//! * the engine clock, the largest `ts` seen, and the Kafka positions: every message below a
//!   position is in the records;
//! * with a retention, what sealing folded away: the gate's sealed counts, as sealed records
//!   ([`Event::is_sealed`]) fed back as control records, and the basics' sealed parts, seeded
//!   on their users' workers before the records are fed. Both are copied sealed to the same
//!   point (the seal point of the latest time the gate applied), once the basics have applied
//!   everything the gate emitted: the worker steps without reading until they have;
//! * the strings of the ids those records name.
//!
//! Consistency: taken in two phases across the process's workers. Each worker first notes the
//! positions its state reflects (messages entered at complete times); once every worker has,
//! each copies its gate state. A copy taken after a position was noted holds every record below
//! it, and may hold later ones, which are de-duplicated when they are read again after a restart.
//! A round whose noted positions equal those of the newest checkpoint on disk ends there: the
//! copy would hold the same records, so an idle engine writes nothing. A graceful stop takes one
//! last round ([`Coordinator::close`]), so a restart after it reads nothing again.
//!
//! File: magic, format version, payload length and xxh3-64 checksum, then the bincode payload.
//! Written to a temporary file, fsynced, renamed into place, directory fsynced. The newest two are
//! kept; one that fails its checks (truncated, corrupt, other version) is logged and the one
//! before it used.

use crate::metrics::Metrics;
use crate::names::Names;
use anyhow::{bail, Context, Result};
use persona_dataflows::{ControlKinds, Event, SealedBasics, NO_ITEM, SEALED_ID};
use serde::{Deserialize, Serialize};
use std::collections::HashSet;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

/// Format version: a checkpoint of another version is not used.
pub const VERSION: u32 = 2;
const MAGIC: &[u8; 8] = b"PRSNCKPT";
/// Magic, version, length, checksum.
const HEADER: usize = 8 + 4 + 8 + 8;
/// Checkpoints kept: the newest, and the one used if it turns out unreadable.
const KEEP: usize = 2;

/// A Kafka partition's next offset to read.
#[derive(Clone, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Position {
    pub topic: String,
    pub partition: i32,
    pub next: i64,
}

/// A catalog upsert in force, and the partition of the catalog topic it was read from (its
/// reader owns it, so that a later record for the item replaces it).
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct CatalogEntry {
    pub topic: String,
    pub partition: i32,
    pub item: u64,
    pub category: u64,
}

#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct Checkpoint {
    /// Wall clock when it was taken, epoch ms.
    pub taken_at_ms: u64,
    /// The earliest engine clock of the workers when they copied their state. What the gate
    /// had applied is at or before it; a restore resumes every worker there, so that a worker
    /// still behind in its Kafka backlog is not made too late by a faster one's clock.
    pub clock: u64,
    /// The largest valid `ts` parsed.
    pub max_ts: u64,
    pub positions: Vec<Position>,
    pub catalog: Vec<CatalogEntry>,
    /// Gate records: events, then control records, in no particular order.
    pub records: Vec<Event>,
    /// With a retention: the gate's sealed records, and how many events each stands for.
    pub sealed: Vec<(Event, u64)>,
    /// With a retention: the basics' sealed parts.
    pub basics: Vec<SealedBasics>,
    /// Strings of the ids that `records` and `catalog` name.
    pub names: Vec<(u64, String)>,
}

impl Checkpoint {
    /// The item ids its events and catalog name.
    pub fn items(&self) -> impl Iterator<Item = u64> + '_ {
        self.records
            .iter()
            .map(|e| e.item)
            .chain(self.sealed.iter().map(|(e, _)| e.item))
            .chain(self.basics.iter().flat_map(|b| b.items()))
            .chain(self.catalog.iter().map(|c| c.item))
            .filter(|i| *i != NO_ITEM && *i != SEALED_ID)
    }

    /// Fills in the strings of every id the events and catalog name. Control records name
    /// none: an erased user's id string is not written.
    fn name_ids(&mut self, names: &Names, kinds: ControlKinds) {
        self.names = self
            .named_ids(kinds)
            .into_iter()
            .filter_map(|h| names.get(h).map(|s| (h, s.to_string())))
            .collect();
    }

    /// Every id the events (control records aside) and catalog name.
    pub fn named_ids(&self, kinds: ControlKinds) -> HashSet<u64> {
        let mut ids: HashSet<u64> = HashSet::new();
        for e in self.records.iter().filter(|e| !kinds.is_control(e)) {
            ids.extend([e.user, e.id, e.kind, e.item]);
        }
        for (e, _) in &self.sealed {
            ids.extend([e.user, e.kind, e.item]);
        }
        for b in &self.basics {
            ids.insert(b.user);
            ids.extend(b.items());
        }
        for c in &self.catalog {
            ids.extend([c.item, c.category]);
        }
        ids.remove(&NO_ITEM);
        ids.remove(&SEALED_ID);
        ids
    }
}

/// Serialises `c` with its header.
pub fn encode(c: &Checkpoint) -> Result<Vec<u8>> {
    let payload = bincode::serialize(c).context("cannot serialise the checkpoint")?;
    let mut out = Vec::with_capacity(HEADER + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&xxhash_rust::xxh3::xxh3_64(&payload).to_le_bytes());
    out.extend_from_slice(&payload);
    Ok(out)
}

/// Checks the header, length and checksum of `bytes`, then deserialises.
pub fn decode(bytes: &[u8]) -> Result<Checkpoint> {
    if bytes.len() < HEADER || &bytes[..8] != MAGIC {
        bail!("not a persona checkpoint (bad magic or shorter than its header)");
    }
    let word = |at: usize, n: usize| -> u64 {
        let mut b = [0u8; 8];
        b[..n].copy_from_slice(&bytes[at..at + n]);
        u64::from_le_bytes(b)
    };
    let version = word(8, 4) as u32;
    if version != VERSION {
        bail!("format version {version}, this build reads version {VERSION}");
    }
    let len = word(12, 8);
    let sum = word(20, 8);
    let payload = &bytes[HEADER..];
    if payload.len() as u64 != len {
        bail!(
            "truncated or padded: {} payload bytes, the header says {len}",
            payload.len()
        );
    }
    if xxhash_rust::xxh3::xxh3_64(payload) != sum {
        bail!("checksum mismatch: the file is corrupt");
    }
    bincode::deserialize(payload).context("checksum matches but the payload does not decode")
}

/// The checkpoint directory.
pub struct Store {
    dir: PathBuf,
}

const PREFIX: &str = "checkpoint-";
const SUFFIX: &str = ".bin";

impl Store {
    pub fn new(dir: PathBuf) -> Store {
        Store { dir }
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Checkpoints present, newest first.
    fn list(&self) -> Result<Vec<(u64, PathBuf)>> {
        let mut found = Vec::new();
        let entries = match std::fs::read_dir(&self.dir) {
            Ok(e) => e,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(found),
            Err(e) => return Err(e).with_context(|| format!("cannot list {}", self.dir.display())),
        };
        for entry in entries {
            let entry = entry.with_context(|| format!("cannot list {}", self.dir.display()))?;
            let name = entry.file_name();
            let Some(name) = name.to_str() else { continue };
            let seq = name
                .strip_prefix(PREFIX)
                .and_then(|s| s.strip_suffix(SUFFIX))
                .and_then(|s| s.parse::<u64>().ok());
            if let Some(seq) = seq {
                found.push((seq, entry.path()));
            }
        }
        found.sort_by_key(|e| std::cmp::Reverse(e.0));
        Ok(found)
    }

    /// The newest checkpoint that passes its checks; each one that does not is logged and
    /// skipped. `None` when there is none.
    pub fn load(&self) -> Result<Option<(PathBuf, Checkpoint)>> {
        self.remove_temporaries();
        for (_, path) in self.list()? {
            let read = std::fs::read(&path)
                .map_err(anyhow::Error::from)
                .and_then(|b| decode(&b));
            match read {
                Ok(c) => return Ok(Some((path, c))),
                Err(e) => {
                    // Moved aside (kept for inspection): pruning must not count it as one of
                    // the checkpoints kept, or it would delete the valid one before it.
                    let aside = path.with_extension("bin.unusable");
                    let moved = std::fs::rename(&path, &aside).is_ok();
                    tracing::warn!(
                        path = %path.display(),
                        moved_to = %if moved { aside.display().to_string() } else { "-".into() },
                        "checkpoint unusable, trying the one before it: {e:#}"
                    );
                }
            }
        }
        Ok(None)
    }

    /// Deletes the checkpoints moved aside as unusable (after an erasure: they may name the user).
    fn remove_unusable(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            if entry
                .file_name()
                .to_string_lossy()
                .ends_with(".bin.unusable")
            {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Deletes the temporary files of writes a crash interrupted.
    fn remove_temporaries(&self) {
        let Ok(entries) = std::fs::read_dir(&self.dir) else {
            return;
        };
        for entry in entries.flatten() {
            let name = entry.file_name();
            let name = name.to_string_lossy();
            if name.starts_with(".checkpoint-") && name.ends_with(".tmp") {
                let _ = std::fs::remove_file(entry.path());
            }
        }
    }

    /// Writes `c` atomically as the newest checkpoint, then deletes all but the newest
    /// [`KEEP`] (all older ones if `only_newest`). Returns its path and size.
    pub fn write(&self, c: &Checkpoint, only_newest: bool) -> Result<(PathBuf, usize)> {
        std::fs::create_dir_all(&self.dir)
            .with_context(|| format!("cannot create {}", self.dir.display()))?;
        let existing = self.list()?;
        let seq = existing.first().map_or(1, |(s, _)| s + 1);
        let path = self.dir.join(format!("{PREFIX}{seq:010}{SUFFIX}"));
        let bytes = encode(c)?;
        let mut tmp = tempfile::Builder::new()
            .prefix(".checkpoint-")
            .suffix(".tmp")
            .tempfile_in(&self.dir)
            .with_context(|| format!("cannot create a file in {}", self.dir.display()))?;
        tmp.write_all(&bytes)
            .and_then(|_| tmp.as_file().sync_all())
            .with_context(|| format!("cannot write a checkpoint in {}", self.dir.display()))?;
        tmp.persist(&path)
            .map_err(|e| e.error)
            .with_context(|| format!("cannot rename the checkpoint to {}", path.display()))?;
        std::fs::File::open(&self.dir)
            .and_then(|d| d.sync_all())
            .with_context(|| format!("cannot fsync {}", self.dir.display()))?;
        if only_newest {
            self.remove_unusable();
        }
        let keep = if only_newest { 0 } else { KEEP - 1 };
        for (_, old) in existing.iter().skip(keep) {
            if let Err(e) = std::fs::remove_file(old) {
                tracing::warn!(path = %old.display(), "cannot delete an old checkpoint: {e}");
            }
        }
        Ok((path, bytes.len()))
    }
}

/// Positions in a fixed order: workers note theirs in any order.
fn sorted(positions: &[Position]) -> Vec<Position> {
    let mut p = positions.to_vec();
    p.sort();
    p
}

fn now_ms() -> u64 {
    std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_millis() as u64)
}

/// One worker's share of a checkpoint's state.
pub struct Part {
    pub clock: u64,
    pub max_ts: u64,
    pub records: Vec<Event>,
    pub sealed: Vec<(Event, u64)>,
    pub basics: Vec<SealedBasics>,
    pub catalog: Vec<CatalogEntry>,
}

/// A worker's progress through the rounds.
#[derive(Default)]
pub struct Turn {
    noted: u64,
    copied: u64,
}

/// The round being taken.
#[derive(Default)]
struct Round {
    id: u64,
    checkpoint: Checkpoint,
    copied: usize,
    /// Opened after an erasure was taken in: older checkpoints are deleted once it is written.
    after_erasure: bool,
    /// Nothing was read since the last checkpoint written: this round copies and writes nothing.
    skipped: bool,
}

/// What the writer thread needs: the id strings to write, and where to count and log.
pub struct WriterSetup {
    pub names: Names,
    pub kinds: ControlKinds,
    pub metrics: Metrics,
    /// Nice value of the writer thread (`engine.worker_nice`).
    pub nice: i32,
    /// CPUs of the writer thread (`engine.worker_cpus`).
    pub cpus: Vec<usize>,
}

/// The newest checkpoint on disk: its sorted positions and its file.
type Newest = (Vec<Position>, PathBuf);

/// Takes checkpoints every `every`, across the workers of the process (see the module doc).
pub struct Coordinator {
    store: Arc<Store>,
    every: Duration,
    workers: usize,
    /// The open round (0: none).
    open: AtomicU64,
    noted: AtomicUsize,
    round: Mutex<Round>,
    last: Mutex<Instant>,
    /// A checkpoint is being written: no new round opens until it is done.
    writing: Arc<AtomicBool>,
    /// An erasure since the last round: take one now, and delete every older one.
    erased: AtomicBool,
    writer: crossbeam_channel::Sender<(Checkpoint, bool)>,
    /// The newest checkpoint written or restored: its sorted positions and its file. A round
    /// that notes the same positions would write the same records again: an idle engine skips
    /// it, unless the file is gone (the directory was emptied by hand).
    written: Arc<Mutex<Option<Newest>>>,
    /// The engine is stopping: open one more round now, the last.
    closing: AtomicBool,
    /// The id of that last round (0: not opened yet).
    last_round: AtomicU64,
}

impl Coordinator {
    /// Starts the writer thread.
    pub fn start(
        store: Arc<Store>,
        every: Duration,
        workers: usize,
        writer: WriterSetup,
        restored: Option<(&Path, &Checkpoint)>,
    ) -> Result<Coordinator> {
        let WriterSetup {
            names,
            kinds,
            metrics,
            nice,
            cpus,
        } = writer;
        let (writer, jobs) = crossbeam_channel::bounded::<(Checkpoint, bool)>(1);
        let written = Arc::new(Mutex::new(
            restored.map(|(path, c)| (sorted(&c.positions), path.to_path_buf())),
        ));
        let on_disk = written.clone();
        let writing = Arc::new(AtomicBool::new(false));
        let busy = writing.clone();
        let s = store.clone();
        std::thread::Builder::new()
            .name("checkpoint-writer".into())
            .spawn(move || {
                crate::engine::lower_priority(nice, "checkpoint-writer");
                crate::affinity::pin_current(&cpus, "checkpoint-writer");
                for (mut c, only_newest) in jobs {
                    let started = Instant::now();
                    c.name_ids(&names, kinds);
                    match s.write(&c, only_newest) {
                        Ok((path, bytes)) => {
                            *on_disk.lock().unwrap_or_else(|p| p.into_inner()) =
                                Some((sorted(&c.positions), path.clone()));
                            metrics.checkpoint_written(bytes as u64);
                            tracing::info!(
                                path = %path.display(),
                                records = c.records.len(),
                                sealed_records = c.sealed.len(),
                                sealed_users = c.basics.len(),
                                bytes,
                                ms = started.elapsed().as_millis() as u64,
                                "checkpoint written"
                            );
                        }
                        Err(e) => {
                            metrics.checkpoint_failed();
                            tracing::error!("checkpoint failed (the previous one stays): {e:#}");
                        }
                    }
                    busy.store(false, Ordering::Release);
                }
            })
            .context("cannot start the checkpoint writer thread")?;
        Ok(Coordinator {
            store,
            every,
            workers,
            open: AtomicU64::new(0),
            noted: AtomicUsize::new(0),
            round: Mutex::new(Round::default()),
            last: Mutex::new(Instant::now()),
            writing,
            erased: AtomicBool::new(false),
            writer,
            written,
            closing: AtomicBool::new(false),
            last_round: AtomicU64::new(0),
        })
    }

    pub fn store(&self) -> &Store {
        &self.store
    }

    fn round(&self) -> std::sync::MutexGuard<'_, Round> {
        self.round.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Asks for a checkpoint now that drops every older one (after an erasure).
    pub fn erased(&self) {
        self.erased.store(true, Ordering::Release);
    }

    /// The engine is stopping: the next round opens at once and is the last, so a restart
    /// resumes from where the engine stopped rather than from the last periodic checkpoint.
    pub fn close(&self) {
        self.closing.store(true, Ordering::Release);
    }

    /// The last round has ended: it was handed to the writer (or had nothing new).
    pub fn closed(&self) -> bool {
        self.last_round.load(Ordering::Acquire) != 0 && self.open.load(Ordering::Acquire) == 0
    }

    /// Waits up to `limit` for the writer to finish the checkpoint it holds; false on timeout.
    pub fn wait_written(&self, limit: Duration) -> bool {
        let deadline = Instant::now() + limit;
        while self.writing.load(Ordering::Acquire) {
            if Instant::now() >= deadline {
                return false;
            }
            std::thread::sleep(Duration::from_millis(5));
        }
        true
    }

    /// Whether worker `local` (at `turn`) is to copy its state for the open round.
    pub fn copy_due(&self, turn: &Turn) -> bool {
        let open = self.open.load(Ordering::Acquire);
        open != 0
            && turn.noted >= open
            && turn.copied < open
            && self.noted.load(Ordering::Acquire) == self.workers
    }

    /// Called by worker `local` between steps. `positions` gives the Kafka positions its state
    /// reflects; `part` copies its state, or returns `None` when it cannot yet (it is called
    /// again at the next poll). Each succeeds at most once per round.
    pub fn poll(
        &self,
        local: usize,
        turn: &mut Turn,
        positions: impl FnOnce() -> Vec<Position>,
        part: impl FnOnce() -> Option<Part>,
    ) {
        if local == 0 && self.open.load(Ordering::Acquire) == 0 {
            let mut last = self.last.lock().unwrap_or_else(|p| p.into_inner());
            let last_due = self.closing.load(Ordering::Acquire)
                && self.last_round.load(Ordering::Acquire) == 0;
            let due = last.elapsed() >= self.every || self.erased.load(Ordering::Acquire);
            if (due || last_due) && !self.writing.load(Ordering::Acquire) {
                *last = Instant::now();
                let mut round = self.round();
                let id = round.id + 1;
                *round = Round {
                    id,
                    after_erasure: self.erased.swap(false, Ordering::AcqRel),
                    ..Round::default()
                };
                self.noted.store(0, Ordering::Release);
                self.open.store(id, Ordering::Release);
                // After the round is open, so that `closed` cannot see it before it opened.
                if last_due {
                    self.last_round.store(id, Ordering::Release);
                }
            }
        }
        let open = self.open.load(Ordering::Acquire);
        if open == 0 {
            return;
        }
        if turn.noted < open {
            turn.noted = open;
            let p = positions();
            let mut round = self.round();
            round.checkpoint.positions.extend(p);
            // Counted under the lock, so exactly one worker is last, and it decides before any
            // copy reads `skipped` (copies wait for the count, then take the lock).
            let last = self.noted.fetch_add(1, Ordering::AcqRel) + 1 == self.workers;
            if last && !round.after_erasure {
                let noted = sorted(&round.checkpoint.positions);
                let written = self.written.lock().unwrap_or_else(|p| p.into_inner());
                round.skipped = written
                    .as_ref()
                    .is_some_and(|(positions, path)| *positions == noted && path.is_file());
            }
            let skipped = round.skipped;
            drop(round);
            if skipped {
                // Closed after the count is complete: a new round resets the count only once
                // this one is closed.
                self.open.store(0, Ordering::Release);
                return;
            }
        }
        if turn.copied < open && self.noted.load(Ordering::Acquire) == self.workers {
            if self.round().skipped {
                turn.copied = open;
                return;
            }
            let Some(part) = part() else {
                return;
            };
            turn.copied = open;
            let mut round = self.round();
            let first = round.copied == 0;
            let c = &mut round.checkpoint;
            c.clock = if first {
                part.clock
            } else {
                c.clock.min(part.clock)
            };
            c.max_ts = c.max_ts.max(part.max_ts);
            c.records.extend(part.records);
            c.sealed.extend(part.sealed);
            c.basics.extend(part.basics);
            c.catalog.extend(part.catalog);
            round.copied += 1;
            if round.copied == self.workers {
                let mut c = std::mem::take(&mut round.checkpoint);
                c.taken_at_ms = now_ms();
                self.writing.store(true, Ordering::Release);
                if self.writer.try_send((c, round.after_erasure)).is_err() {
                    self.writing.store(false, Ordering::Release);
                }
                self.open.store(0, Ordering::Release);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn sample() -> Checkpoint {
        Checkpoint {
            taken_at_ms: 1,
            clock: 2,
            max_ts: 3,
            positions: vec![Position {
                topic: "events".into(),
                partition: 1,
                next: 42,
            }],
            catalog: vec![],
            records: vec![Event {
                ts: 5,
                user: 6,
                id: 7,
                kind: 8,
                item: 9,
                value_bits: 1.5f64.to_bits(),
                device: None,
            }],
            sealed: vec![(
                Event {
                    ts: 4,
                    user: 6,
                    id: SEALED_ID,
                    kind: 8,
                    item: 9,
                    value_bits: 15,
                    device: None,
                },
                3,
            )],
            basics: vec![],
            names: vec![(6, "u".into())],
        }
    }

    #[test]
    fn round_trips_and_detects_damage() {
        let c = sample();
        let bytes = encode(&c).unwrap();
        assert_eq!(decode(&bytes).unwrap(), c);
        assert!(decode(&bytes[..bytes.len() - 1]).is_err());
        let mut flipped = bytes.clone();
        let last = flipped.len() - 1;
        flipped[last] ^= 1;
        assert!(decode(&flipped)
            .unwrap_err()
            .to_string()
            .contains("checksum"));
        let mut other = bytes;
        other[8] = 99;
        assert!(decode(&other).unwrap_err().to_string().contains("version"));
    }

    /// One poll by each of the two workers; worker `w` notes `positions[w]`.
    fn poll_all(c: &Coordinator, turns: &mut [Turn; 2], positions: &[Vec<Position>; 2]) {
        for (w, turn) in turns.iter_mut().enumerate() {
            c.poll(w, turn, || positions[w].clone(), part);
        }
    }

    /// A worker's share: the sample's records.
    fn part() -> Option<Part> {
        Some(Part {
            clock: 1,
            max_ts: 1,
            records: sample().records,
            sealed: sample().sealed,
            basics: vec![],
            catalog: vec![],
        })
    }

    /// A worker that cannot copy yet (its basics lag its gate) is asked again at its next
    /// poll, and the round waits for it. The checkpoint holds the earliest worker clock.
    #[test]
    fn a_copy_that_is_not_ready_is_taken_at_a_later_poll() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path(), Duration::from_millis(1), None);
        let mut turns = [Turn::default(), Turn::default()];
        std::thread::sleep(Duration::from_millis(2));
        let positions = [vec![at(0, 1)], vec![at(1, 1)]];
        let [t0, t1] = &mut turns;
        c.poll(0, t0, || positions[0].clone(), || None);
        c.poll(1, t1, || positions[1].clone(), part);
        assert!(c.copy_due(t0), "worker 0 noted but did not copy");
        assert!(!c.copy_due(t1));
        c.poll(0, t0, || positions[0].clone(), || None);
        assert!(c.copy_due(t0));
        // Worker 0's clock is ahead of worker 1's (say, worker 1 is behind in its backlog).
        let ahead = || part().map(|p| Part { clock: 9, ..p });
        c.poll(0, t0, || positions[0].clone(), ahead);
        assert!(!c.copy_due(t0));
        assert!(c.wait_written(Duration::from_secs(10)));
        let (_, written) = c.store.load().unwrap().unwrap();
        assert_eq!(written.records.len(), 2);
        assert_eq!(written.sealed.len(), 2);
        // A restore resumes every worker at the earliest clock, which the slower one had.
        assert_eq!(written.clock, 1);
    }

    /// Two workers polling `c` until a round ends; each notes `positions[w]`. Returns how many
    /// checkpoints are on disk once the writer is done.
    fn round(c: &Coordinator, turns: &mut [Turn; 2], positions: &[Vec<Position>; 2]) -> usize {
        std::thread::sleep(Duration::from_millis(2)); // past `every`
        let before = c.round().id;
        for pass in 0.. {
            if c.round().id > before && c.open.load(Ordering::Acquire) == 0 {
                break;
            }
            assert!(pass < 10, "the round does not end");
            poll_all(c, turns, positions);
        }
        let deadline = Instant::now() + Duration::from_secs(10);
        while c.writing.load(Ordering::Acquire) && Instant::now() < deadline {
            std::thread::sleep(Duration::from_millis(1));
        }
        c.store.list().unwrap().len()
    }

    /// A coordinator of two workers writing to `dir/ck`.
    fn coordinator(
        dir: &Path,
        every: Duration,
        restored: Option<(&Path, &Checkpoint)>,
    ) -> Coordinator {
        let store = Arc::new(Store::new(dir.join("ck")));
        let setup = WriterSetup {
            names: Names::default(),
            kinds: ControlKinds {
                erasure: 1,
                consent: 2,
            },
            metrics: Metrics::default(),
            nice: 0,
            cpus: Vec::new(),
        };
        Coordinator::start(store, every, 2, setup, restored).unwrap()
    }

    fn at(partition: i32, next: i64) -> Position {
        Position {
            topic: "events".into(),
            partition,
            next,
        }
    }

    #[test]
    fn a_stop_takes_one_last_checkpoint_at_once() {
        let dir = tempfile::tempdir().unwrap();
        let c = coordinator(dir.path(), Duration::from_secs(3600), None);
        let mut turns = [Turn::default(), Turn::default()];
        let positions = [vec![at(0, 7)], vec![at(1, 9)]];
        for _ in 0..3 {
            poll_all(&c, &mut turns, &positions);
        }
        assert!(c.store.list().unwrap().is_empty(), "not due for an hour");
        c.close();
        assert!(!c.closed(), "the last round has not run yet");
        for pass in 0.. {
            assert!(pass < 10, "the last round does not end");
            poll_all(&c, &mut turns, &positions);
            if c.closed() {
                break;
            }
        }
        assert!(c.wait_written(Duration::from_secs(10)));
        let (_, written) = c.store.load().unwrap().expect("the last checkpoint");
        assert_eq!(sorted(&written.positions), vec![at(0, 7), at(1, 9)]);
    }

    fn seqs(store: &Store) -> Vec<u64> {
        store.list().unwrap().iter().map(|(s, _)| *s).collect()
    }

    #[test]
    fn an_idle_engine_writes_no_new_checkpoint() {
        let dir = tempfile::tempdir().unwrap();
        let start = |restored| coordinator(dir.path(), Duration::from_millis(1), restored);
        let c = start(None);
        let mut turns = [Turn::default(), Turn::default()];
        let mut positions = [vec![at(0, 10)], vec![at(1, 20)]];
        assert_eq!(round(&c, &mut turns, &positions), 1, "the first is written");
        assert_eq!(round(&c, &mut turns, &positions), 1, "nothing read since");
        // The same positions noted by the other worker first are still the same.
        positions.swap(0, 1);
        assert_eq!(round(&c, &mut turns, &positions), 1);
        assert_eq!(seqs(&c.store), vec![1]);
        positions[0][0].next = 11;
        assert_eq!(round(&c, &mut turns, &positions), 2, "a message was read");
        assert_eq!(seqs(&c.store), vec![2, 1]);
        assert_eq!(round(&c, &mut turns, &positions), 2);
        // An erasure is always taken in at once, and drops every older checkpoint.
        c.erased();
        assert_eq!(round(&c, &mut turns, &positions), 1);
        assert_eq!(seqs(&c.store), vec![3]);

        // A restart from the newest, with nothing new to read, writes nothing either...
        let (newest_path, newest) = c.store.load().unwrap().unwrap();
        drop(c);
        let c = start(Some((&newest_path, &newest)));
        let mut turns = [Turn::default(), Turn::default()];
        assert_eq!(round(&c, &mut turns, &positions), 1);
        assert_eq!(seqs(&c.store), vec![3]);
        // ...and one started without it (a stale restore) writes a new one.
        drop(c);
        let c = start(None);
        let mut turns = [Turn::default(), Turn::default()];
        assert_eq!(round(&c, &mut turns, &positions), 2);
        assert_eq!(seqs(&c.store), vec![4, 3]);
        // The directory emptied by hand: the idle engine writes one again.
        std::fs::remove_dir_all(c.store.dir()).unwrap();
        assert_eq!(round(&c, &mut turns, &positions), 1);
        assert_eq!(seqs(&c.store), vec![1]);
    }

    #[test]
    fn falls_back_to_the_previous_and_keeps_two() {
        let dir = tempfile::tempdir().unwrap();
        let store = Store::new(dir.path().join("ck"));
        assert!(store.load().unwrap().is_none());
        let mut c = sample();
        for clock in 1..=3 {
            c.clock = clock;
            store.write(&c, false).unwrap();
        }
        assert_eq!(store.list().unwrap().len(), 2);
        let (newest, loaded) = store.load().unwrap().unwrap();
        assert_eq!(loaded.clock, 3);
        let bytes = std::fs::read(&newest).unwrap();
        std::fs::write(&newest, &bytes[..bytes.len() / 2]).unwrap();
        assert_eq!(store.load().unwrap().unwrap().1.clock, 2);
        assert!(newest.with_extension("bin.unusable").exists());
        // The next write keeps the valid one before it, not the unusable one.
        c.clock = 4;
        store.write(&c, false).unwrap();
        let kept: Vec<u64> = store.list().unwrap().iter().map(|(s, _)| *s).collect();
        assert_eq!(kept.len(), 2);
        assert_eq!(store.load().unwrap().unwrap().1.clock, 4);
        store.write(&c, true).unwrap();
        assert_eq!(store.list().unwrap().len(), 1);
        assert!(!newest.with_extension("bin.unusable").exists());
    }
}
