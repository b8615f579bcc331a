//! `persona validate`: reads and validates a log with the engine's own reader and parser, on
//! as many threads as a replay would use, and keeps no state.
//!
//! It answers "which lines of this log would be dead letters, and why" before a replay or a
//! backfill, and it is the floor row of `scripts/bench.sh`: what reading and parsing alone
//! cost, so the gap to a full replay is the price of the maintained views.

use crate::names::Names;
use crate::parse::{self, Rejection, MAX_EVENT_BYTES};
use crate::source::file::{LineSource, Next};
use anyhow::{anyhow, Result};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::Instant;

#[derive(clap::Args)]
pub struct ValidateArgs {
    /// Event log, JSON Lines (.gz accepted).
    #[arg(long)]
    pub events: PathBuf,
    /// Reader threads; each takes every N-th line, as replay workers do.
    #[arg(long, default_value_t = 1)]
    pub workers: usize,
}

/// What one thread saw.
#[derive(Default)]
struct Tally {
    lines: u64,
    valid: u64,
    /// Rejections by reason, with the first line number of each.
    rejected: BTreeMap<&'static str, (u64, u64)>,
}

impl Tally {
    fn reject(&mut self, r: &Rejection, line: u64) {
        let entry = self.rejected.entry(r.reason).or_insert((0, line));
        entry.0 += 1;
        entry.1 = entry.1.min(line);
    }

    fn merge(&mut self, other: Tally) {
        self.lines += other.lines;
        self.valid += other.valid;
        for (reason, (n, first)) in other.rejected {
            let entry = self.rejected.entry(reason).or_insert((0, first));
            entry.0 += n;
            entry.1 = entry.1.min(first);
        }
    }
}

fn read_share(path: &Path, index: usize, peers: usize, names: &Names) -> Result<Tally> {
    let mut source = LineSource::open(path, false, index, peers)?;
    let mut tally = Tally::default();
    loop {
        match source.next_line()? {
            Next::Line { number, oversize } => {
                let line = source.line();
                if !line.iter().all(u8::is_ascii_whitespace) {
                    tally.lines += 1;
                    if oversize {
                        let r = Rejection {
                            reason: "oversize",
                            detail: format!("line is over {MAX_EVENT_BYTES} bytes"),
                        };
                        tally.reject(&r, number);
                    } else {
                        // No engine clock here, so no future check: that one depends on when
                        // the event arrives.
                        match parse::parse_event(line, names, None) {
                            Ok(_) => tally.valid += 1,
                            Err(r) => tally.reject(&r, number),
                        }
                    }
                }
                source.clear();
            }
            Next::Wait => {}
            Next::End => return Ok(tally),
        }
    }
}

pub fn validate(args: &ValidateArgs) -> Result<()> {
    let peers = args.workers.max(1);
    // One table for all threads, as the engine's workers share theirs.
    let names = Names::default();
    let started = Instant::now();
    let tally = std::thread::scope(|s| {
        let handles: Vec<_> = (0..peers)
            .map(|i| {
                let names = &names;
                s.spawn(move || read_share(&args.events, i, peers, names))
            })
            .collect();
        let mut total = Tally::default();
        for h in handles {
            total.merge(
                h.join()
                    .map_err(|_| anyhow!("a reader thread panicked"))??,
            );
        }
        Ok::<_, anyhow::Error>(total)
    })?;
    let secs = started.elapsed().as_secs_f64();
    let rejected: u64 = tally.rejected.values().map(|(n, _)| n).sum();
    println!(
        "validated {} lines: {} valid, {} rejected; elapsed {:.3} s, {:.0} lines/s, peak RSS {} MiB",
        tally.lines,
        tally.valid,
        rejected,
        secs,
        tally.lines as f64 / secs.max(1e-9),
        crate::replay::peak_rss_kib().unwrap_or(0) / 1024,
    );
    for (reason, (n, first)) in &tally.rejected {
        println!("  {reason}: {n} (first at line {first})");
    }
    Ok(())
}
