//! `persona generate`: a synthetic, reproducible event log (and catalog) for benchmarks.
//!
//! Users and items have skewed popularity; events mostly move forward in time with a share of
//! late ones; some lines are exact duplicates (redelivery) and a few are invalid, so a
//! benchmark exercises de-duplication and dead letters too.

use anyhow::{Context, Result};
use rand::rngs::StdRng;
use rand::{Rng, SeedableRng};
use std::io::{BufWriter, Write};
use std::path::PathBuf;

#[derive(clap::Args, Debug, Clone)]
pub struct Options {
    /// Where to write the event log.
    #[arg(long)]
    pub out: PathBuf,
    /// Where to write a matching item catalog.
    #[arg(long)]
    pub catalog: Option<PathBuf>,
    #[arg(long, default_value_t = 1_000_000)]
    pub events: u64,
    #[arg(long, default_value_t = 100_000)]
    pub users: u64,
    #[arg(long, default_value_t = 20_000)]
    pub items: u64,
    #[arg(long, default_value_t = 40)]
    pub categories: u64,
    /// Time the log covers, e.g. "3d".
    #[arg(long = "span", value_name = "DURATION", default_value = "3d", value_parser = parse_span)]
    pub span_ms: u64,
    #[arg(long, default_value_t = 1_700_000_000_000)]
    pub start_ms: u64,
    #[arg(long, default_value_t = 7)]
    pub seed: u64,
    /// Fraction of lines that repeat the previous event (redelivery).
    #[arg(long, default_value_t = 0.01)]
    pub duplicates: f64,
    /// Fraction of events up to two hours late.
    #[arg(long, default_value_t = 0.02)]
    pub late: f64,
    /// Fraction of invalid lines.
    #[arg(long, default_value_t = 0.001)]
    pub invalid: f64,
}

fn parse_span(s: &str) -> Result<u64, String> {
    humantime::parse_duration(s)
        .map(|d| d.as_millis() as u64)
        .map_err(|e| format!("{s:?}: {e}"))
}

const TYPES: [(&str, u32); 8] = [
    ("page_view", 350),
    ("product_view", 300),
    ("click", 150),
    ("search", 80),
    ("add_to_cart", 70),
    ("remove_from_cart", 10),
    ("purchase", 30),
    ("onboarding_step", 10),
];
const DEVICES: [&str; 4] = ["desktop", "mobile", "tablet", "other"];
const USER_AGENTS: [&str; 3] = [
    "Mozilla/5.0 (Windows NT 10.0; Win64; x64) AppleWebKit/537.36 Chrome/120.0 Safari/537.36",
    "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) AppleWebKit/605.1.15 Mobile/15E148",
    "Mozilla/5.0 (iPad; CPU OS 17_0 like Mac OS X) AppleWebKit/605.1.15",
];

/// A skewed pick in `0..n`: low ids are much more popular (roughly Zipf-like).
fn skewed(rng: &mut StdRng, n: u64) -> u64 {
    let u: f64 = rng.gen();
    ((n as f64) * u.powi(3)) as u64 % n.max(1)
}

fn pick_type(rng: &mut StdRng) -> &'static str {
    let total: u32 = TYPES.iter().map(|t| t.1).sum();
    let mut x = rng.gen_range(0..total);
    for (name, w) in TYPES {
        if x < w {
            return name;
        }
        x -= w;
    }
    "page_view"
}

pub fn generate(o: &Options) -> Result<()> {
    let mut rng = StdRng::seed_from_u64(o.seed);
    let file = std::fs::File::create(&o.out)
        .with_context(|| format!("cannot create {}", o.out.display()))?;
    let mut w = BufWriter::with_capacity(1 << 20, file);
    let step = (o.span_ms / o.events.max(1)).max(1);
    let mut ts = o.start_ms;
    let mut last_line = String::new();
    let mut line = String::with_capacity(256);
    for n in 0..o.events {
        let roll: f64 = rng.gen();
        if roll < o.invalid {
            writeln!(
                w,
                "{{\"event_id\":\"bad{n}\",\"user_id\":42,\"type\":\"click\""
            )?;
            continue;
        }
        if roll < o.invalid + o.duplicates && !last_line.is_empty() {
            w.write_all(last_line.as_bytes())?;
            continue;
        }
        ts += rng.gen_range(0..=2 * step);
        let mut event_ts = ts;
        if rng.gen::<f64>() < o.late {
            event_ts = ts.saturating_sub(rng.gen_range(0..2 * 3_600_000));
        }
        let user = skewed(&mut rng, o.users);
        let kind = pick_type(&mut rng);
        line.clear();
        use std::fmt::Write as _;
        let _ = write!(
            line,
            "{{\"event_id\":\"e{n}\",\"user_id\":\"u{user}\",\"type\":\"{kind}\",\"ts\":{event_ts}"
        );
        let needs_item = matches!(
            kind,
            "product_view" | "add_to_cart" | "remove_from_cart" | "purchase"
        );
        if needs_item || (kind == "click" && rng.gen_bool(0.5)) {
            let _ = write!(line, ",\"item_id\":\"i{}\"", skewed(&mut rng, o.items));
        }
        if kind == "purchase" {
            let _ = write!(line, ",\"value\":{:.2}", rng.gen_range(1.0..250.0));
        }
        let d: f64 = rng.gen();
        if d < 0.6 {
            let _ = write!(
                line,
                ",\"device\":{{\"type\":\"{}\",\"os\":\"x\"}}",
                DEVICES[(user % 7).min(3) as usize]
            );
        } else if d < 0.7 {
            let _ = write!(
                line,
                ",\"device\":{{\"user_agent\":\"{}\"}}",
                USER_AGENTS[(user % 3) as usize]
            );
        }
        if kind == "search" {
            let _ = write!(
                line,
                ",\"properties\":{{\"query\":\"q{}\"}}",
                rng.gen_range(0..1000)
            );
        }
        line.push_str(",\"context\":{\"country\":\"DE\"}}\n");
        w.write_all(line.as_bytes())?;
        std::mem::swap(&mut last_line, &mut line);
    }
    w.flush()?;
    if let Some(path) = &o.catalog {
        let file = std::fs::File::create(path)
            .with_context(|| format!("cannot create {}", path.display()))?;
        let mut w = BufWriter::new(file);
        for i in 0..o.items {
            writeln!(
                w,
                "{{\"item_id\":\"i{i}\",\"category\":\"cat{:02}\",\"price\":{:.2}}}",
                (i * 7919) % o.categories.max(1),
                1.0 + (i % 200) as f64
            )?;
        }
        w.flush()?;
    }
    Ok(())
}
