//! `persona replay`: a log, as fast as possible, to the final profiles.

use crate::config::Settings;
use crate::engine::{self, Mode, Shared};
use crate::render::{self, Profile};
use crate::server::Server;
use crate::sink::{FileSink, Sink};
use anyhow::{bail, Context, Result};
use persona_dataflows::ProfileState;
use std::io::{BufWriter, Write};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// What a replay did.
#[derive(Debug, Clone)]
pub struct Summary {
    pub lines: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub conflicting_duplicates: u64,
    pub dead_letters: u64,
    /// Erasure and consent records (not events: never accepted nor duplicates).
    pub control_records: u64,
    pub users: usize,
    pub as_of_ms: u64,
    pub elapsed: Duration,
}

impl std::fmt::Display for Summary {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let secs = self.elapsed.as_secs_f64();
        let rate = if secs > 0.0 {
            self.lines as f64 / secs
        } else {
            0.0
        };
        write!(
            f,
            "replayed {} events: {} accepted, {} duplicates ({} conflicting), {} dead letters; {} users as of {}; elapsed {:.3} s, {:.0} events/s",
            self.lines, self.accepted, self.duplicates, self.conflicting_duplicates, self.dead_letters, self.users, self.as_of_ms, secs, rate
        )?;
        if self.control_records > 0 {
            write!(f, ", {} erasure/consent records", self.control_records)?;
        }
        if let Some(kib) = peak_rss_kib() {
            write!(f, ", peak RSS {} MiB", kib / 1024)?;
        }
        Ok(())
    }
}

/// Peak resident memory of this process (Linux `VmHWM`).
pub fn peak_rss_kib() -> Option<u64> {
    let status = std::fs::read_to_string("/proc/self/status").ok()?;
    let line = status.lines().find(|l| l.starts_with("VmHWM:"))?;
    line.split_whitespace().nth(1)?.parse().ok()
}

/// A finished replay: the engine (still serving if asked to) and its final profiles.
pub struct Replayed {
    pub shared: Arc<Shared>,
    pub summary: Summary,
    /// Sorted by `user_id`.
    pub profiles: Vec<Profile>,
    guards: timely::communication::WorkerGuards<Result<(), String>>,
}

impl Replayed {
    /// Waits for the workers to stop (after [`Shared::shutdown`] when serving).
    pub fn join(self) -> Result<()> {
        engine::join(self.guards)
    }
}

/// Replays `events` (and `catalog`) with `settings`; with `serve`, the workers keep answering
/// queries on the final state until shut down.
pub fn replay(
    settings: Settings,
    events: &Path,
    catalog: Option<&Path>,
    dead_letters: &Path,
    triggers: Option<&Path>,
    serve: bool,
) -> Result<Replayed> {
    if !events.is_file() {
        bail!(
            "events log {} does not exist or is not a file",
            events.display()
        );
    }
    if let Some(c) = catalog {
        if !c.is_file() {
            bail!("catalog {} does not exist or is not a file", c.display());
        }
    }
    let mut settings = settings;
    // A replay de-duplicates across the whole log, whatever its span: the result must be the
    // log's, not a function of how far apart its copies happen to be. Under a retention, an
    // id need only be remembered for it: a copy of an event accepted longer ago than that has
    // that event's `ts`, now at or before the seal point, so it is too late anyway.
    settings.dedup_horizon_ms = settings
        .retention_ms
        .map_or(u64::MAX, |r| r.max(settings.dedup_horizon_ms));
    let workers = settings.workers;
    let shared = Shared::new(
        settings,
        events.to_path_buf(),
        Sink::File(FileSink::new(dead_letters)),
        triggers.map(|t| Sink::File(FileSink::new(t))),
        None,
    );
    // A backfill must not bring erased users back.
    let erased = shared.load_erasures()?;
    if erased > 0 {
        let files: Vec<String> = crate::erasure::family_files(shared.erasures.path())
            .iter()
            .map(|p| p.display().to_string())
            .collect();
        eprintln!("applying {erased} erasures from {}", files.join(", "));
    }
    let (tx, rx) = crossbeam_channel::unbounded();
    let mode = Mode::Replay {
        events: events.to_path_buf(),
        catalog: catalog.map(Path::to_path_buf),
        serve,
        // Only the triggers show the times events enter at; the dump does not depend on them.
        record_clock: triggers.is_some(),
    };
    let guards = engine::start(shared.clone(), mode, Some(tx))?;
    // After the start: in a cluster that is when every process has connected.
    let started = Instant::now();
    let progress = progress_bar(&shared, events);
    let collected = engine::collect_dump(&rx, workers);
    if let Some(p) = progress {
        p.finish_and_clear();
    }
    // SPEC §3: the dump is taken at the largest ts of the accepted events (of the whole
    // cluster: the workers agree on it).
    let (as_of, states) = match collected {
        Ok(x) => x,
        Err(e) => {
            shared.shutdown();
            let joined = Replayed {
                shared,
                summary: empty_summary(),
                profiles: Vec::new(),
                guards,
            }
            .join();
            return Err(match joined {
                Err(worker) => worker.context(e.to_string()),
                Ok(()) => e,
            });
        }
    };
    let mut profiles = render_all(&shared, as_of, &states);
    profiles.sort_unstable_by(|a, b| a.user_id.cmp(&b.user_id));
    let m = &shared.metrics;
    let summary = Summary {
        lines: m.events_read(),
        accepted: m.accepted(),
        duplicates: m.duplicates(),
        conflicting_duplicates: m.conflicting(),
        dead_letters: m.dead_letters_total(),
        control_records: m.control_records(),
        users: profiles.len(),
        as_of_ms: as_of,
        elapsed: started.elapsed(),
    };
    Ok(Replayed {
        shared,
        summary,
        profiles,
        guards,
    })
}

/// Renders every profile, on as many threads as the engine has workers.
fn render_all(shared: &Shared, as_of: u64, states: &[(u64, ProfileState)]) -> Vec<Profile> {
    let chunk = states.len().div_ceil(shared.settings.workers.max(1)).max(1);
    std::thread::scope(|scope| {
        let parts: Vec<_> = states
            .chunks(chunk)
            .map(|part| {
                scope.spawn(move || {
                    part.iter()
                        .filter_map(|(user, state)| {
                            let mut p = render::profile(
                                shared.names.name(*user),
                                as_of,
                                state,
                                &shared.names,
                                &shared.settings,
                            )?;
                            // The state was read at the final time, which a dropped
                            // conflicting copy can put after `as_of`: the segments are the
                            // rules over what the dump shows.
                            p.segments = render::segments_shown(&p, &shared.settings);
                            Some(p)
                        })
                        .collect::<Vec<_>>()
                })
            })
            .collect();
        parts
            .into_iter()
            .flat_map(|p| p.join().unwrap_or_default())
            .collect()
    })
}

fn empty_summary() -> Summary {
    Summary {
        lines: 0,
        accepted: 0,
        duplicates: 0,
        conflicting_duplicates: 0,
        dead_letters: 0,
        control_records: 0,
        users: 0,
        as_of_ms: 0,
        elapsed: Duration::ZERO,
    }
}

/// A progress bar over the log's bytes, drawn only on a terminal.
fn progress_bar(shared: &Arc<Shared>, events: &Path) -> Option<indicatif::ProgressBar> {
    use std::io::IsTerminal;
    if !std::io::stderr().is_terminal() {
        return None;
    }
    let len = std::fs::metadata(events).ok()?.len();
    let bar = indicatif::ProgressBar::new(len);
    bar.set_style(
        indicatif::ProgressStyle::with_template(
            "{spinner} replay [{bar:40}] {bytes}/{total_bytes} {bytes_per_sec} eta {eta}",
        )
        .ok()?
        .progress_chars("=> "),
    );
    let (bar2, shared) = (bar.clone(), shared.clone());
    std::thread::spawn(move || {
        while !bar2.is_finished() {
            let offset = shared
                .workers
                .iter()
                .map(|w| w.offset.load(std::sync::atomic::Ordering::Relaxed))
                .min()
                .unwrap_or(0);
            bar2.set_position(offset);
            std::thread::sleep(Duration::from_millis(100));
        }
    });
    Some(bar)
}

/// Writes profiles as JSON Lines to `path` (`-`: standard output).
pub fn write_dump(path: &Path, profiles: &[Profile]) -> Result<()> {
    let out: Box<dyn Write> = if path == Path::new("-") {
        Box::new(std::io::stdout().lock())
    } else {
        Box::new(
            std::fs::File::create(path)
                .with_context(|| format!("cannot create dump file {}", path.display()))?,
        )
    };
    let mut out = BufWriter::new(out);
    let threads = std::thread::available_parallelism().map_or(1, |n| n.get());
    write_lines(&mut out, profiles, DUMP_BLOCK, threads)?;
    out.flush()
        .with_context(|| format!("cannot write dump file {}", path.display()))?;
    Ok(())
}

/// Serializing is most of a dump's cost: `threads` blocks of `block` lines at a time are
/// serialized in parallel, then written in order, so memory stays at one group of blocks
/// however many users there are.
fn write_lines(
    out: &mut impl Write,
    profiles: &[Profile],
    block: usize,
    threads: usize,
) -> Result<()> {
    let mut blocks = Vec::with_capacity(threads);
    for group in profiles.chunks(block * threads) {
        std::thread::scope(|scope| -> Result<()> {
            let parts: Vec<_> = group
                .chunks(block)
                .map(|block| scope.spawn(move || dump_lines(block)))
                .collect();
            blocks.clear();
            for part in parts {
                blocks.push(
                    part.join()
                        .map_err(|_| anyhow::anyhow!("a dump thread panicked"))??,
                );
            }
            Ok(())
        })?;
        for b in &blocks {
            out.write_all(b)?;
        }
    }
    Ok(())
}

/// Profiles per block of a dump, serialized by one thread.
const DUMP_BLOCK: usize = 4096;

/// One JSON line per profile.
fn dump_lines(profiles: &[Profile]) -> serde_json::Result<Vec<u8>> {
    let mut out = Vec::with_capacity(profiles.len() * 768);
    for p in profiles {
        serde_json::to_writer(&mut out, p)?;
        out.push(b'\n');
    }
    Ok(out)
}

/// The `replay` command.
pub struct Command {
    pub events: PathBuf,
    pub catalog: Option<PathBuf>,
    pub dump: Option<PathBuf>,
    pub dead_letters: Option<PathBuf>,
    /// Write every segment entry and exit here (JSON Lines, created anew).
    pub triggers: Option<PathBuf>,
    pub serve: bool,
}

/// Runs the command. Without `serve` (and outside a cluster) it returns without joining the
/// workers or freeing the final state: a program that calls it is expected to exit after.
pub fn command(settings: Settings, cmd: Command) -> Result<()> {
    let dead = cmd
        .dead_letters
        .clone()
        .unwrap_or_else(|| settings.source.dead_letter_path.clone());
    let listen = settings.listen.clone();
    if let Some(t) = &cmd.triggers {
        // A replay's triggers are the log's alone: never appended to an older run's.
        std::fs::File::create(t)
            .with_context(|| format!("cannot create triggers file {}", t.display()))?;
    }
    let replayed = replay(
        settings,
        &cmd.events,
        cmd.catalog.as_deref(),
        &dead,
        cmd.triggers.as_deref(),
        cmd.serve,
    )?;
    if let Some(path) = &cmd.dump {
        write_dump(path, &replayed.profiles)?;
    }
    let to_stdout = cmd.dump.as_deref() != Some(Path::new("-"));
    let line = replayed.summary.to_string();
    if to_stdout {
        println!("{line}");
    } else {
        eprintln!("{line}");
    }
    if replayed.summary.dead_letters > 0 {
        eprintln!("dead letters written to {}", dead.display());
    }
    if cmd.serve {
        let server = Server::start(&listen, replayed.shared.clone(), true)?;
        eprintln!(
            "serving the final state on {}://{} (Ctrl-C to stop)",
            server.scheme, server.addr
        );
        let shared = replayed.shared.clone();
        let result = replayed.join();
        shared.shutdown();
        server.join();
        result
    } else if replayed.shared.settings.cluster.is_none() {
        // Everything is written (the sinks flush every record) and the workers have stopped
        // reading: not waiting for them to free their state, nor freeing the profiles, spares
        // seconds on a large log, for nothing. They end with the process.
        std::mem::forget(replayed);
        Ok(())
    } else {
        replayed.shared.shutdown();
        replayed.join()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_dump_of_many_blocks_keeps_the_profiles_order() {
        let template: Profile = serde_json::from_str(
            r#"{"user_id":"u0","as_of_ms":9,"first_seen_ms":1,"last_seen_ms":5,"event_count":2,
            "counts":{"view":2},"windows":{"1h":{"view":1}},"distinct_items":1,
            "recent_items":["i1"],"total_spend":0.0,"devices":["mobile"],"last_device":"mobile",
            "top_categories":[{"category":"c","count":2}],
            "sessions":{"count":1,"avg_duration_ms":4,"current":{"start_ms":1,"last_ms":5,"events":2}},
            "engagement_score":1.0,"segments":[]}"#,
        )
        .expect("a profile");
        // Three groups of blocks, the last of them with a block that is not full.
        let (block, threads) = (4, 3);
        let n = 2 * block * threads + 7;
        let profiles: Vec<Profile> = (0..n)
            .map(|i| Profile {
                user_id: format!("u{i}"),
                event_count: i as u64,
                ..template.clone()
            })
            .collect();
        let mut out = Vec::new();
        write_lines(&mut out, &profiles, block, threads).expect("the dump is written");
        let text = String::from_utf8(out).expect("the dump is text");
        let read: Vec<Profile> = text
            .lines()
            .map(|l| serde_json::from_str(l).expect("each line is a profile"))
            .collect();
        assert_eq!(read, profiles);
    }
}
