//! `persona evaluate`: offline evaluation of the recommendation strategies on a log.
//!
//! The log is split in time, globally (`--split-at` a timestamp) or per user (a fraction): the
//! training events are replayed through the engine exactly as `persona replay` would, the
//! rest are held out. Each user with held-out item interactions is asked for k
//! recommendations under every configured strategy; precision@k, recall@k and NDCG@k are
//! averaged over those users, under two definitions of the relevant items:
//! * `all`: every item the user interacts with in the held-out part, the ones they come back
//!   to included (shoppers re-view and re-buy);
//! * `new`: only the held-out items the user did not touch in training (users without any
//!   are left out), where showing a user what they just viewed cannot score.

use crate::config::Settings;
use crate::names::Names;
use crate::parse;
use crate::query::{Answer, Ask};
use anyhow::{bail, Context, Result};
use std::collections::{BTreeMap, HashMap, HashSet};
use std::io::{BufRead, BufReader, Write};
use std::path::{Path, PathBuf};
use std::time::Duration;

#[derive(clap::Args, Debug, Clone)]
pub struct EvaluateArgs {
    /// Event log, JSON Lines (.gz accepted).
    #[arg(long)]
    pub events: PathBuf,
    /// Item catalog, JSON Lines.
    #[arg(long)]
    pub catalog: Option<PathBuf>,
    /// Where training ends: an epoch-ms timestamp (events before it train), or a fraction in
    /// (0, 1): each user's earliest events up to that share train (0.8: the first 80 %).
    #[arg(long)]
    pub split_at: String,
    /// List length scored (precision@k, recall@k, NDCG@k).
    #[arg(long, default_value_t = 10)]
    pub k: usize,
    /// A name for the table's first column (default: the log's file name).
    #[arg(long)]
    pub label: Option<String>,
}

/// Which held-out items count as relevant.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Relevant {
    All,
    New,
}

impl std::fmt::Display for Relevant {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Relevant::All => "all",
            Relevant::New => "new",
        })
    }
}

/// Averages over the evaluated users of one strategy.
#[derive(Debug, Clone, PartialEq)]
pub struct Scores {
    pub users: usize,
    /// Of `users`, those with training history (the rest are cold starts).
    pub warm: usize,
    pub precision: f64,
    pub recall: f64,
    pub ndcg: f64,
}

/// How the log was split.
#[derive(Debug, Clone, Copy, PartialEq)]
pub enum Split {
    /// Events before this epoch-ms time train.
    At(u64),
    /// Each user's earliest fraction of events trains.
    Fraction(f64),
}

impl std::fmt::Display for Split {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Split::At(t) => write!(f, "at {t} ms"),
            Split::Fraction(x) => write!(f, "of each user's first {:.0} % of events", x * 100.0),
        }
    }
}

/// One log's evaluation.
#[derive(Debug, Clone)]
pub struct Evaluation {
    pub label: String,
    pub split: Split,
    pub train_events: usize,
    pub test_events: usize,
    pub strategies: BTreeMap<(Relevant, String), Scores>,
}

fn lines(path: &Path) -> Result<Vec<Vec<u8>>> {
    let file =
        std::fs::File::open(path).with_context(|| format!("cannot open {}", path.display()))?;
    let reader: Box<dyn BufRead> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(file)))
    } else {
        Box::new(BufReader::new(file))
    };
    let mut out = Vec::new();
    for line in reader.split(b'\n') {
        out.push(line.with_context(|| format!("cannot read {}", path.display()))?);
    }
    Ok(out)
}

/// Keeps one copy of each event id, the one the engine keeps (the smallest event, by `ts`
/// first), so that a redelivered copy neither moves a user's split nor scores as held out.
fn dedup(parsed: &mut [Option<persona_dataflows::Event>]) {
    let mut kept: HashMap<u64, usize> = HashMap::new();
    for n in 0..parsed.len() {
        let Some(e) = &parsed[n] else { continue };
        match kept.entry(e.id) {
            std::collections::hash_map::Entry::Vacant(v) => {
                v.insert(n);
            }
            std::collections::hash_map::Entry::Occupied(mut o) => {
                let k = *o.get();
                if parsed[k].as_ref().is_some_and(|old| e < old) {
                    parsed[k] = None;
                    o.insert(n);
                } else {
                    parsed[n] = None;
                }
            }
        }
    }
}

/// Precision, recall and NDCG of one list against one user's relevant items.
fn score_list(list: &[u64], relevant: &HashSet<u64>, k: usize) -> (f64, f64, f64) {
    let mut hits = 0usize;
    let mut dcg = 0.0;
    for (rank, item) in list.iter().take(k).enumerate() {
        if relevant.contains(item) {
            hits += 1;
            dcg += 1.0 / (rank as f64 + 2.0).log2();
        }
    }
    let ideal: f64 = (0..relevant.len().min(k))
        .map(|r| 1.0 / (r as f64 + 2.0).log2())
        .sum();
    (
        hits as f64 / k as f64,
        hits as f64 / relevant.len() as f64,
        if ideal > 0.0 { dcg / ideal } else { 0.0 },
    )
}

pub fn evaluate(settings: Settings, args: &EvaluateArgs) -> Result<Evaluation> {
    let Some(rec) = settings.recommendations.clone() else {
        bail!("recommendations are turned off in this configuration ([recommendations] enabled = false)");
    };
    if args.k == 0 || args.k > crate::http::MAX_LIMIT as usize {
        bail!("--k must be between 1 and {}", crate::http::MAX_LIMIT);
    }
    let names = Names::default();
    let raw = lines(&args.events)?;
    let mut parsed: Vec<Option<persona_dataflows::Event>> = raw
        .iter()
        .map(|l| parse::parse_event(l, &names, None).ok())
        .collect();
    dedup(&mut parsed);
    // Which lines train: before a timestamp, or each user's first fraction of events.
    let mut is_train = vec![false; raw.len()];
    let split = match args.split_at.parse::<u64>() {
        Ok(t) if t > 1 => {
            for (flag, e) in is_train.iter_mut().zip(&parsed) {
                *flag = e.is_some_and(|e| e.ts < t);
            }
            Split::At(t)
        }
        _ => {
            let f: f64 = args
                .split_at
                .parse()
                .ok()
                .filter(|f: &f64| *f > 0.0 && *f < 1.0)
                .with_context(|| {
                    format!(
                        "--split-at {:?}: expected an epoch-ms timestamp or a fraction in (0, 1)",
                        args.split_at
                    )
                })?;
            let mut by_user: HashMap<u64, Vec<(u64, usize)>> = HashMap::new();
            for (n, e) in parsed.iter().enumerate() {
                if let Some(e) = e {
                    by_user.entry(e.user).or_default().push((e.ts, n));
                }
            }
            for mut lines in by_user.into_values() {
                lines.sort_unstable();
                let keep = ((lines.len() as f64 * f).floor() as usize).max(1);
                for (_, n) in lines.iter().take(keep) {
                    is_train[*n] = true;
                }
            }
            Split::Fraction(f)
        }
    };

    let dir = tempfile::tempdir().context("cannot create a temporary directory")?;
    let train_path = dir.path().join("train.jsonl");
    let mut train = std::io::BufWriter::new(std::fs::File::create(&train_path)?);
    let mut seen: HashMap<u64, HashSet<u64>> = HashMap::new();
    let mut held_out: HashMap<u64, HashSet<u64>> = HashMap::new();
    let (mut train_events, mut test_events) = (0, 0);
    for ((line, event), in_train) in raw.iter().zip(&parsed).zip(&is_train) {
        let Some(e) = event else { continue };
        if *in_train {
            train.write_all(line)?;
            train.write_all(b"\n")?;
            train_events += 1;
            if e.has_item() {
                seen.entry(e.user).or_default().insert(e.item);
            }
        } else {
            test_events += 1;
            if e.has_item() {
                held_out.entry(e.user).or_default().insert(e.item);
            }
        }
    }
    train.flush()?;
    drop(train);
    if train_events == 0 || test_events == 0 {
        bail!("the split {split} leaves {train_events} training and {test_events} held-out events; both must be non-empty");
    }
    if held_out.is_empty() {
        bail!("the split {split} leaves {test_events} held-out events, none with an item: no user has anything to score");
    }
    // user → (all held-out items, those new to the user)
    let mut users: Vec<(u64, HashSet<u64>, HashSet<u64>)> = held_out
        .into_iter()
        .map(|(user, items)| {
            let old = seen.get(&user);
            let new: HashSet<u64> = items
                .iter()
                .copied()
                .filter(|i| old.is_none_or(|o| !o.contains(i)))
                .collect();
            (user, items, new)
        })
        .collect();
    users.sort_unstable_by_key(|(u, _, _)| *u);

    let replayed = crate::replay::replay(
        settings,
        &train_path,
        args.catalog.as_deref(),
        &dir.path().join("dead-letters.jsonl"),
        None,
        true,
    )?;
    let shared = replayed.shared.clone();
    let mut strategies = BTreeMap::new();
    let result = (|| -> Result<()> {
        for (name, strategy) in &rec.strategies {
            // per protocol: (users, warm users, precision, recall, NDCG) summed
            let mut sums = [(0usize, 0usize, 0.0, 0.0, 0.0); 2];
            for (user, all, new) in &users {
                let ask = Ask::Recommend {
                    strategy: strategy.clone(),
                    limit: args.k,
                };
                let items = match shared
                    .router
                    .ask_blocking(*user, ask, Duration::from_secs(60))
                {
                    Answer::Recommendations { items, .. } => items,
                    other => bail!("no recommendations for a user: {other:?}"),
                };
                let list: Vec<u64> = items.iter().map(|s| s.item).collect();
                let warm = usize::from(seen.contains_key(user));
                for (sum, relevant) in sums.iter_mut().zip([all, new]) {
                    if relevant.is_empty() {
                        continue;
                    }
                    let (p, r, n) = score_list(&list, relevant, args.k);
                    *sum = (sum.0 + 1, sum.1 + warm, sum.2 + p, sum.3 + r, sum.4 + n);
                }
            }
            for (protocol, (count, warm, p, r, n)) in
                [Relevant::All, Relevant::New].into_iter().zip(sums)
            {
                let div = count.max(1) as f64;
                strategies.insert(
                    (protocol, name.clone()),
                    Scores {
                        users: count,
                        warm,
                        precision: p / div,
                        recall: r / div,
                        ndcg: n / div,
                    },
                );
            }
        }
        Ok(())
    })();
    shared.shutdown();
    let joined = replayed.join();
    result?;
    joined?;
    let label = args.label.clone().unwrap_or_else(|| {
        args.events
            .file_name()
            .map(|f| f.to_string_lossy().into_owned())
            .unwrap_or_default()
    });
    Ok(Evaluation {
        label,
        split,
        train_events,
        test_events,
        strategies,
    })
}

/// The evaluation as Markdown table rows (see [`TABLE_HEADER`]).
pub fn table_rows(e: &Evaluation) -> String {
    let mut out = String::new();
    for ((relevant, name), s) in &e.strategies {
        // No user to average over: no score.
        let scores = if s.users == 0 {
            "- | - | -".to_string()
        } else {
            format!("{:.4} | {:.4} | {:.4}", s.precision, s.recall, s.ndcg)
        };
        out.push_str(&format!(
            "| {} | {} | {} | {} ({} warm) | {scores} |\n",
            e.label, relevant, name, s.users, s.warm
        ));
    }
    out
}

pub fn table_header(k: usize) -> String {
    format!(
        "| log | relevant | strategy | users | precision@{k} | recall@{k} | NDCG@{k} |\n|---|---|---|---|---|---|---|\n"
    )
}
