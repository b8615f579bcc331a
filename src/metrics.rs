//! Prometheus metrics (text exposition at `GET /metrics`).

use persona_dataflows::DedupObserver;
use prometheus_client::encoding::EncodeLabelSet;
use prometheus_client::metrics::counter::Counter;
use prometheus_client::metrics::family::Family;
use prometheus_client::metrics::gauge::Gauge;
use prometheus_client::metrics::histogram::{exponential_buckets, Histogram};
use prometheus_client::registry::Registry;
use std::sync::atomic::AtomicU64;
use std::sync::Arc;

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct ReasonLabel {
    pub reason: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct StrategyLabel {
    pub strategy: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TriggerLabel {
    pub segment: String,
    pub change: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct TableLabel {
    pub table: String,
}

#[derive(Clone, Debug, Hash, PartialEq, Eq, EncodeLabelSet)]
pub struct RouteLabel {
    pub route: String,
}

fn latency_histogram() -> Histogram {
    Histogram::new(exponential_buckets(0.000_05, 2.0, 16))
}

/// All counters, shared by workers and the HTTP server.
#[derive(Clone)]
pub struct Metrics {
    inner: Arc<Inner>,
}

struct Inner {
    registry: Registry,
    events_read: Counter,
    accepted: Counter,
    duplicates: Counter,
    conflicting: Counter,
    dead_letters: Family<ReasonLabel, Counter>,
    catalog_records: Counter,
    clock: Gauge<u64, AtomicU64>,
    query_latency: Family<RouteLabel, Histogram, fn() -> Histogram>,
    recommendation_requests: Family<StrategyLabel, Counter>,
    exposures: Family<StrategyLabel, Counter>,
    triggers: Family<TriggerLabel, Counter>,
    streams: Gauge,
    streams_dropped: Counter,
    erasures: Counter,
    controls: Counter,
    refused: Family<ReasonLabel, Counter>,
    checkpoints: Counter,
    checkpoint_failures: Counter,
    checkpoint_bytes: Gauge,
    names: Family<TableLabel, Gauge>,
}

impl Default for Metrics {
    fn default() -> Self {
        Self::new()
    }
}

impl Metrics {
    pub fn new() -> Self {
        let mut registry = Registry::with_prefix("persona");
        let events_read = Counter::default();
        let accepted = Counter::default();
        let duplicates = Counter::default();
        let conflicting = Counter::default();
        let dead_letters = Family::<ReasonLabel, Counter>::default();
        let catalog_records = Counter::default();
        let clock = Gauge::<u64, AtomicU64>::default();
        let query_latency =
            Family::<RouteLabel, Histogram, fn() -> Histogram>::new_with_constructor(
                latency_histogram,
            );
        registry.register(
            "events_in",
            "Event lines read from sources, valid or not",
            events_read.clone(),
        );
        registry.register(
            "events_accepted",
            "Events accepted after validation and de-duplication",
            accepted.clone(),
        );
        registry.register(
            "duplicates",
            "Events dropped as duplicates of an accepted event id",
            duplicates.clone(),
        );
        registry.register(
            "conflicting_duplicates",
            "Duplicates whose content differed from the kept event",
            conflicting.clone(),
        );
        registry.register(
            "dead_letters",
            "Rejected lines by reason",
            dead_letters.clone(),
        );
        registry.register(
            "catalog_records",
            "Catalog records applied",
            catalog_records.clone(),
        );
        registry.register(
            "engine_clock_ms",
            "Engine clock: the latest time every worker has completed",
            clock.clone(),
        );
        registry.register(
            "query_duration_seconds",
            "HTTP request latency by route",
            query_latency.clone(),
        );
        let recommendation_requests = Family::<StrategyLabel, Counter>::default();
        let exposures = Family::<StrategyLabel, Counter>::default();
        registry.register(
            "recommendation_requests",
            "Recommendation lists served, by strategy (the user's experiment variant)",
            recommendation_requests.clone(),
        );
        registry.register(
            "recommendation_exposures",
            "Items shown in served recommendation lists, by strategy",
            exposures.clone(),
        );
        let triggers = Family::<TriggerLabel, Counter>::default();
        registry.register(
            "triggers",
            "Segment entries and exits emitted, by segment and change",
            triggers.clone(),
        );
        let streams = Gauge::default();
        registry.register(
            "stream_subscribers",
            "Open /v1/users/{id}/stream connections",
            streams.clone(),
        );
        let streams_dropped = Counter::default();
        registry.register(
            "streams_dropped",
            "Live streams closed because their client fell behind",
            streams_dropped.clone(),
        );
        let erasures = Counter::default();
        registry.register(
            "erasures",
            "Users erased through DELETE /v1/users/{id}",
            erasures.clone(),
        );
        let controls = Counter::default();
        registry.register(
            "control_records",
            "Erasure and consent records read from sources (not counted as events)",
            controls.clone(),
        );
        let refused = Family::<ReasonLabel, Counter>::default();
        registry.register(
            "requests_refused",
            "HTTP requests refused before routing, by reason (unauthorized, forbidden, uri_too_long)",
            refused.clone(),
        );
        let checkpoints = Counter::default();
        registry.register(
            "checkpoints",
            "Checkpoints written to engine.checkpoint_dir",
            checkpoints.clone(),
        );
        let checkpoint_failures = Counter::default();
        registry.register(
            "checkpoint_failures",
            "Checkpoints that could not be written (the previous one stays in use)",
            checkpoint_failures.clone(),
        );
        let checkpoint_bytes = Gauge::default();
        registry.register(
            "checkpoint_bytes",
            "Size of the newest checkpoint written",
            checkpoint_bytes.clone(),
        );
        let names = Family::<TableLabel, Gauge>::default();
        registry.register(
            "names",
            "Strings remembered for hashes: user and item ids and names (`names`), and the event ids of device events not yet sealed (`event_ids`)",
            names.clone(),
        );
        Metrics {
            inner: Arc::new(Inner {
                names,
                checkpoints,
                checkpoint_failures,
                checkpoint_bytes,
                erasures,
                controls,
                refused,
                triggers,
                streams,
                streams_dropped,
                recommendation_requests,
                exposures,
                registry,
                events_read,
                accepted,
                duplicates,
                conflicting,
                dead_letters,
                catalog_records,
                clock,
                query_latency,
            }),
        }
    }

    pub fn checkpoint_written(&self, bytes: u64) {
        self.inner.checkpoints.inc();
        self.inner.checkpoint_bytes.set(bytes as i64);
    }

    pub fn checkpoint_failed(&self) {
        self.inner.checkpoint_failures.inc();
    }

    pub fn erased(&self) {
        self.inner.erasures.inc();
    }

    pub fn control_record(&self) {
        self.inner.controls.inc();
    }

    pub fn control_records(&self) -> u64 {
        self.inner.controls.get()
    }

    pub fn refused(&self, reason: &str) {
        self.inner
            .refused
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }

    pub fn event_read(&self) {
        self.inner.events_read.inc();
    }
    pub fn events_read(&self) -> u64 {
        self.inner.events_read.get()
    }
    pub fn accepted(&self) -> u64 {
        self.inner.accepted.get()
    }
    pub fn duplicates(&self) -> u64 {
        self.inner.duplicates.get()
    }
    pub fn conflicting(&self) -> u64 {
        self.inner.conflicting.get()
    }
    pub fn dead_letter(&self, reason: &str) {
        self.inner
            .dead_letters
            .get_or_create(&ReasonLabel {
                reason: reason.to_string(),
            })
            .inc();
    }
    /// Dead letters by reason, sorted.
    pub fn dead_letters(&self) -> Vec<(String, u64)> {
        let mut out = Vec::new();
        for reason in crate::parse::REASONS {
            let n = self
                .inner
                .dead_letters
                .get_or_create(&ReasonLabel {
                    reason: reason.to_string(),
                })
                .get();
            if n > 0 {
                out.push((reason.to_string(), n));
            }
        }
        out
    }
    pub fn dead_letters_total(&self) -> u64 {
        self.dead_letters().iter().map(|(_, n)| n).sum()
    }
    pub fn catalog_record(&self) {
        self.inner.catalog_records.inc();
    }
    pub fn catalog_records(&self) -> u64 {
        self.inner.catalog_records.get()
    }
    pub fn set_clock(&self, ms: u64) {
        self.inner.clock.set(ms);
    }
    pub fn observe_query(&self, route: &str, seconds: f64) {
        self.inner
            .query_latency
            .get_or_create(&RouteLabel {
                route: route.to_string(),
            })
            .observe(seconds);
    }

    /// A recommendation list of `items` items was served under `strategy`.
    pub fn exposed(&self, strategy: &str, items: usize) {
        let label = StrategyLabel {
            strategy: strategy.to_string(),
        };
        self.inner
            .recommendation_requests
            .get_or_create(&label)
            .inc();
        self.inner
            .exposures
            .get_or_create(&label)
            .inc_by(items as u64);
    }

    /// A segment entry or exit was emitted.
    pub fn trigger(&self, segment: &str, change: &str) {
        self.inner
            .triggers
            .get_or_create(&TriggerLabel {
                segment: segment.to_string(),
                change: change.to_string(),
            })
            .inc();
    }

    /// A live stream opened (+1) or closed (-1).
    pub fn stream(&self, delta: i64) {
        self.inner.streams.inc_by(delta);
    }

    pub fn stream_dropped(&self) {
        self.inner.streams_dropped.inc();
    }

    /// Sizes of the name tables, set when the metrics are read.
    pub fn set_names(&self, names: usize, event_ids: usize) {
        for (table, n) in [("names", names), ("event_ids", event_ids)] {
            self.inner
                .names
                .get_or_create(&TableLabel {
                    table: table.to_string(),
                })
                .set(i64::try_from(n).unwrap_or(i64::MAX));
        }
    }

    /// The metrics in OpenMetrics text, or (`openmetrics` false) in the Prometheus text
    /// format 0.0.4.
    pub fn render(&self, openmetrics: bool) -> String {
        let mut out = String::new();
        if let Err(e) = prometheus_client::encoding::text::encode(&mut out, &self.inner.registry) {
            tracing::error!("cannot encode metrics: {e}");
        }
        if openmetrics {
            out
        } else {
            text_0_0_4(&out)
        }
    }
}

/// OpenMetrics text as Prometheus text format 0.0.4: the same samples, but a counter's
/// `# HELP` and `# TYPE` name its `_total` samples (in OpenMetrics they name the family
/// without it, which a 0.0.4 parser reads as untyped samples), and no `# UNIT` or `# EOF`.
fn text_0_0_4(openmetrics: &str) -> String {
    let counters: std::collections::HashSet<&str> = openmetrics
        .lines()
        .filter_map(|l| l.strip_prefix("# TYPE ")?.strip_suffix(" counter"))
        .collect();
    let mut out = String::with_capacity(openmetrics.len() + 16 * counters.len());
    for line in openmetrics.lines() {
        if line == "# EOF" || line.starts_with("# UNIT ") {
            continue;
        }
        let renamed = ["# HELP ", "# TYPE "].iter().find_map(|prefix| {
            let (name, rest) = line.strip_prefix(prefix)?.split_once(' ')?;
            counters
                .contains(name)
                .then(|| format!("{prefix}{name}_total {rest}"))
        });
        out.push_str(renamed.as_deref().unwrap_or(line));
        out.push('\n');
    }
    out
}

impl DedupObserver for Metrics {
    fn accepted(&self, n: u64) {
        self.inner.accepted.inc_by(n);
    }
    fn duplicate(&self, conflicting: bool) {
        self.inner.duplicates.inc();
        if conflicting {
            self.inner.conflicting.inc();
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Every sample of the 0.0.4 text belongs to a family its `# TYPE` names: the sample's
    /// own name, or a histogram's with `_bucket`, `_sum` or `_count`.
    #[test]
    fn the_0_0_4_text_types_every_sample() {
        let m = Metrics::new();
        DedupObserver::accepted(&m, 3);
        m.duplicate(true);
        m.observe_query("profile", 0.001);
        let text = m.render(false);
        let types: std::collections::HashMap<&str, &str> = text
            .lines()
            .filter_map(|l| l.strip_prefix("# TYPE ")?.split_once(' '))
            .collect();
        assert_eq!(types.get("persona_events_accepted_total"), Some(&"counter"));
        for line in text
            .lines()
            .filter(|l| !l.starts_with('#') && !l.is_empty())
        {
            let name = line.split(['{', ' ']).next().unwrap_or_default();
            let family = ["_bucket", "_sum", "_count"]
                .iter()
                .filter_map(|suffix| name.strip_suffix(suffix))
                .find(|base| types.get(base) == Some(&"histogram"))
                .unwrap_or(name);
            assert!(types.contains_key(family), "{name} has no # TYPE: {text}");
        }
        assert!(!text.contains("# EOF"));
        assert!(m.render(true).ends_with("# EOF\n"));
    }
}
