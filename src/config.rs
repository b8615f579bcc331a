//! Configuration: TOML with environment overrides, validated once at start.
//!
//! Two stages: [`Config`] is what the file says (every key optional, unknown keys rejected);
//! [`Settings`] is the validated form the engine runs with (durations in ms, window widths).

use anyhow::{bail, Context, Result};
use persona_dataflows::rules::Rule;
use persona_dataflows::{Similarity, Strategy, StrategyKind};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// The embedded default configuration (`config/default.toml`).
pub const DEFAULT_TOML: &str = include_str!("../config/default.toml");

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct Config {
    pub engine: EngineConfig,
    pub source: SourceConfig,
    pub kafka: KafkaConfig,
    pub http: HttpConfig,
    pub recommendations: RecommendationsConfig,
    pub cluster: ClusterConfig,
    /// `[segments]`: segment name → rule over profile fields (see `persona_dataflows::rules`).
    /// Leaving the section out keeps the default segments; an empty `[segments]` has none.
    pub segments: BTreeMap<String, String>,
    pub triggers: TriggersConfig,
}

impl Default for Config {
    fn default() -> Self {
        Config {
            engine: EngineConfig::default(),
            source: SourceConfig::default(),
            kafka: KafkaConfig::default(),
            http: HttpConfig::default(),
            recommendations: RecommendationsConfig::default(),
            cluster: ClusterConfig::default(),
            segments: default_segments(),
            triggers: TriggersConfig::default(),
        }
    }
}

/// The segments of `config/default.toml`, also what a config without `[segments]` gets.
fn default_segments() -> BTreeMap<String, String> {
    [
        ("buyer", "counts.purchase >= 1"),
        (
            "cart_abandoner",
            "windows.24h.add_to_cart >= 1 && windows.24h.purchase == 0",
        ),
        ("engaged", "engagement_score >= 50"),
        ("mobile", "last_device == \"mobile\""),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v.to_string()))
    .collect()
}

/// `[triggers]`: where segment entries and exits go.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct TriggersConfig {
    /// "file" (JSON Lines at `path`), "kafka" (`kafka.triggers_topic`, with `path` as the
    /// fallback for records Kafka does not take) or "none".
    pub sink: String,
    pub path: PathBuf,
    /// Messages a live subscriber (`/v1/users/{id}/stream`) may have waiting before it is
    /// dropped as too slow.
    pub stream_buffer: usize,
}

impl Default for TriggersConfig {
    fn default() -> Self {
        TriggersConfig {
            sink: "file".into(),
            path: "triggers.jsonl".into(),
            stream_buffer: 256,
        }
    }
}

#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum ClockMode {
    Live,
    Event,
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct EngineConfig {
    pub workers: usize,
    pub clock: ClockMode,
    pub tick: String,
    pub windows: Vec<String>,
    pub session_gap: String,
    pub allowed_lateness: String,
    pub max_future_skew: String,
    pub dedup_horizon: String,
    /// How long event detail is kept behind the clock ("": all of it). Older detail is sealed
    /// into per-user summaries, and events that arrive older than this are dead letters.
    pub retention: String,
    pub default_weight: f64,
    pub weights: BTreeMap<String, f64>,
    /// Erasures (`DELETE /v1/users/{id}`) are appended here, and applied again at every start.
    pub erasure_log: PathBuf,
    /// Where checkpoints are written ("": none; a restart re-reads Kafka from the beginning).
    pub checkpoint_dir: PathBuf,
    pub checkpoint_every: String,
    /// Nice value of the worker threads (0..=19): above 0, the HTTP threads win the CPU when
    /// both want it, so reads stay fast while the workers run a long step.
    pub worker_nice: i32,
    /// CPUs the worker threads and the checkpoint writer run on (empty: any), so that CPUs
    /// left out (`http.cpus`) stay free for reads.
    pub worker_cpus: Vec<usize>,
    /// Print each worker's time per dataflow operator to stderr when its run ends.
    pub operator_times: bool,
}

impl Default for EngineConfig {
    fn default() -> Self {
        let weights = [
            ("page_view", 1.0),
            ("product_view", 2.0),
            ("click", 1.0),
            ("search", 1.0),
            ("add_to_cart", 5.0),
            ("purchase", 20.0),
        ];
        EngineConfig {
            workers: 1,
            clock: ClockMode::Live,
            tick: "20ms".into(),
            windows: vec!["1h".into(), "24h".into(), "7d".into()],
            session_gap: "30m".into(),
            allowed_lateness: "5s".into(),
            max_future_skew: "5m".into(),
            dedup_horizon: "7d".into(),
            retention: String::new(),
            default_weight: 1.0,
            weights: weights.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            erasure_log: "erasures.jsonl".into(),
            checkpoint_dir: PathBuf::new(),
            checkpoint_every: "1m".into(),
            worker_nice: 0,
            worker_cpus: Vec::new(),
            operator_times: false,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct SourceConfig {
    pub kind: String,
    pub path: PathBuf,
    pub catalog_path: PathBuf,
    pub follow: bool,
    pub dead_letter_path: PathBuf,
}

impl Default for SourceConfig {
    fn default() -> Self {
        SourceConfig {
            kind: "file".into(),
            path: "data/sample-events.jsonl".into(),
            catalog_path: "data/sample-catalog.jsonl".into(),
            follow: true,
            dead_letter_path: "dead-letters.jsonl".into(),
        }
    }
}

/// `[kafka]`: used when `source.kind = "kafka"`, and by `persona produce` / `persona record`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct KafkaConfig {
    /// Bootstrap brokers, `host:port[,host:port…]`.
    pub brokers: String,
    pub events_topic: String,
    /// Item catalog records; "" for none.
    pub catalog_topic: String,
    /// Rejected messages; "" writes them to `source.dead_letter_path` instead.
    pub dead_letter_topic: String,
    /// Segment entries and exits, when `triggers.sink = "kafka"`.
    pub triggers_topic: String,
    /// Where reading starts when the engine starts: "earliest" (the whole retained topic) or
    /// "latest" (only new messages).
    pub start_offset: String,
    /// Passed to librdkafka as they are, for every client persona makes (security settings:
    /// `security.protocol`, `sasl.*`, `ssl.*`; tuning). Values are strings.
    pub properties: BTreeMap<String, String>,
}

impl Default for KafkaConfig {
    fn default() -> Self {
        KafkaConfig {
            brokers: "127.0.0.1:9092".into(),
            events_topic: "persona-events".into(),
            catalog_topic: "persona-catalog".into(),
            dead_letter_topic: "persona-dead-letters".into(),
            triggers_topic: "persona-triggers".into(),
            start_offset: "earliest".into(),
            properties: BTreeMap::new(),
        }
    }
}

/// Where reading starts on a topic's partitions.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StartOffset {
    Earliest,
    Latest,
}

/// Configured weights override the defaults one by one, not as a whole table.
fn over_defaults(
    defaults: &BTreeMap<String, f64>,
    given: &BTreeMap<String, f64>,
) -> BTreeMap<String, f64> {
    let mut all = defaults.clone();
    all.extend(given.iter().map(|(k, v)| (k.clone(), *v)));
    all
}

/// Refuses a secret `kafka.properties` value that is not a string before the typed parse,
/// whose message would quote the value.
fn check_secret_types(table: &toml::Table) -> Result<()> {
    let properties = table
        .get("kafka")
        .and_then(|k| k.get("properties"))
        .and_then(toml::Value::as_table);
    for (key, value) in properties.into_iter().flatten() {
        if is_secret(key) && !value.is_str() {
            bail!(
                "kafka.properties.\"{key}\" must be a string (a {}; its value is a secret and not shown)",
                value.type_str()
            );
        }
    }
    Ok(())
}

/// Keys whose values are secrets: masked when the configuration is printed.
fn is_secret(key: &str) -> bool {
    let k = key.to_ascii_lowercase();
    [
        "password",
        "secret",
        "token",
        "key.pem",
        "ssl.key",
        "oauthbearer.config",
    ]
    .iter()
    .any(|s| k.contains(s))
}

/// `[recommendations]`: item-item recommendations, trending lists and the experiment that
/// splits users between strategies.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct RecommendationsConfig {
    pub enabled: bool,
    /// K: distinct recent items per user that co-occurrence and scoring use.
    pub recent_items: usize,
    /// Items touched longer ago than this leave the recent set.
    pub horizon: String,
    /// M: neighbours kept per item.
    pub neighbours: usize,
    /// "jaccard", "cosine", "lift" or "count".
    pub similarity: Similarity,
    /// Pairs seen together by fewer users are ignored.
    pub min_cooccurrence: u64,
    /// How often similarities and trending lists are re-ranked in `run` (replay: always).
    pub refresh: String,
    /// Trending lists count item events within this window.
    pub popular_window: String,
    /// Items kept per trending list (the overall one and one per catalog category).
    pub popular_size: usize,
    /// Interaction weight of a type not listed in `weights`.
    pub default_weight: f64,
    /// Interaction weight by event type: an item's weight is its strongest in-horizon touch.
    pub weights: BTreeMap<String, f64>,
    /// Named strategies that the experiment can assign.
    pub strategies: BTreeMap<String, StrategyConfig>,
    /// Strategy name → relative share of users. A user's variant is a hash of the salt and
    /// the user id, so it is stable across restarts and processes.
    pub experiment: BTreeMap<String, u32>,
    pub experiment_salt: String,
}

impl Default for RecommendationsConfig {
    fn default() -> Self {
        let weights = [
            ("page_view", 1.0),
            ("product_view", 1.0),
            ("click", 1.0),
            ("add_to_cart", 3.0),
            ("purchase", 5.0),
        ];
        RecommendationsConfig {
            enabled: true,
            recent_items: 20,
            horizon: "3650d".into(),
            neighbours: 20,
            similarity: Similarity::Jaccard,
            min_cooccurrence: 1,
            refresh: "5s".into(),
            popular_window: "3650d".into(),
            popular_size: 100,
            default_weight: 1.0,
            weights: weights.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            strategies: [
                ("item_item".to_string(), StrategyConfig::default()),
                (
                    "popular".to_string(),
                    StrategyConfig {
                        kind: "popular".into(),
                        ..StrategyConfig::default()
                    },
                ),
            ]
            .into(),
            experiment: [("item_item".to_string(), 100)].into(),
            experiment_salt: "persona".into(),
        }
    }
}

/// `[recommendations.strategies.NAME]`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct StrategyConfig {
    /// "item_item" or "popular".
    pub kind: String,
    /// Never recommend the user's recent items (purchases are never recommended).
    pub exclude_seen: bool,
    /// Do recommend the recent items the user came back to, even with `exclude_seen`.
    pub returned: bool,
    /// Fill a list shorter than asked with the user's recent items (largest weight first),
    /// before the trending lists, even with `exclude_seen`.
    pub fill_recent: bool,
    /// Candidates in the user's categories score up to `1 + category_boost` times higher.
    pub category_boost: f64,
}

impl Default for StrategyConfig {
    fn default() -> Self {
        StrategyConfig {
            kind: "item_item".into(),
            exclude_seen: true,
            returned: false,
            fill_recent: false,
            category_boost: 0.5,
        }
    }
}

#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct HttpConfig {
    pub listen: String,
    /// Bearer token for reads (GET); "" leaves reads open.
    pub read_token: String,
    /// Bearer token for erasure and admin endpoints, which also passes reads; "" leaves them open.
    pub admin_token: String,
    /// Requests whose path and query are longer than this get 414.
    pub max_uri_bytes: usize,
    /// Requests with more header fields than this are refused.
    pub max_headers: usize,
    /// A client must send its whole request head (and finish a TLS handshake) within this.
    pub header_timeout: String,
    /// PEM certificate chain and private key: both set serves HTTPS instead of HTTP.
    pub tls_cert: PathBuf,
    pub tls_key: PathBuf,
    /// Threads of the HTTP runtime: with more than one, a thread the OS has descheduled does
    /// not hold up the connections of the others.
    pub threads: usize,
    /// CPUs the HTTP threads run on (empty: any).
    pub cpus: Vec<usize>,
}

impl Default for HttpConfig {
    fn default() -> Self {
        HttpConfig {
            listen: "127.0.0.1:8080".into(),
            read_token: String::new(),
            admin_token: String::new(),
            max_uri_bytes: 2048,
            max_headers: 64,
            header_timeout: "10s".into(),
            tls_cert: PathBuf::new(),
            tls_key: PathBuf::new(),
            threads: 2,
            cpus: Vec::new(),
        }
    }
}

/// `[http]` as the server runs with it.
#[derive(Clone, Debug, PartialEq)]
pub struct HttpSettings {
    pub read_token: Option<String>,
    pub admin_token: Option<String>,
    pub max_uri_bytes: usize,
    pub max_headers: usize,
    pub header_timeout_ms: u64,
    /// (certificate chain, private key) PEM files, when HTTPS is on.
    pub tls: Option<(PathBuf, PathBuf)>,
    pub threads: usize,
    /// CPUs the HTTP threads run on (empty: any).
    pub cpus: Vec<usize>,
}

/// `[cluster]`: the processes of a multi-process cluster (timely's own cluster mode). Empty
/// `addresses` (the default) runs one process.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ClusterConfig {
    /// timely's `host:port` of every process, in the same order in every process's config.
    pub addresses: Vec<String>,
    /// Every process's HTTP `host:port`, same order; a process serves on its own entry and
    /// forwards queries for users that live elsewhere to the owner's.
    pub http: Vec<String>,
    /// Worker threads of every process, same order (timely needs them equal). Empty: every
    /// process runs `engine.workers`.
    pub workers: Vec<usize>,
}

impl Config {
    /// Loads `path` (or the embedded default) and applies `PERSONA_*` overrides from `env`.
    pub fn load(
        path: Option<&Path>,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config> {
        let (text, origin) = match path {
            Some(p) => (
                std::fs::read_to_string(p)
                    .with_context(|| format!("cannot read config file {}", p.display()))?,
                p.display().to_string(),
            ),
            None => (
                DEFAULT_TOML.to_string(),
                "embedded config/default.toml".to_string(),
            ),
        };
        Config::parse(&text, &origin, env)
    }

    /// Parses config `text` (from `origin`, for messages) with `PERSONA_*` overrides from `env`.
    pub fn parse(
        text: &str,
        origin: &str,
        env: impl IntoIterator<Item = (String, String)>,
    ) -> Result<Config> {
        let mut table: toml::Table =
            toml::from_str(text).with_context(|| format!("invalid TOML in {origin}"))?;
        apply_env(&mut table, env)?;
        check_secret_types(&table)?;
        let config: Config = toml::Value::Table(table).try_into().with_context(|| {
            format!("invalid configuration ({origin} with PERSONA_* overrides)")
        })?;
        Ok(config)
    }

    /// The effective configuration as TOML, for the start-up log, with secrets masked.
    pub fn to_toml(&self) -> String {
        let mut shown = self.clone();
        for (k, v) in shown.kafka.properties.iter_mut() {
            if is_secret(k) {
                *v = "***".into();
            }
        }
        // Weights as the engine uses them.
        shown.engine.weights =
            over_defaults(&EngineConfig::default().weights, &self.engine.weights);
        shown.recommendations.weights = over_defaults(
            &RecommendationsConfig::default().weights,
            &self.recommendations.weights,
        );
        for token in [&mut shown.http.read_token, &mut shown.http.admin_token] {
            if !token.is_empty() {
                *token = "***".into();
            }
        }
        toml::to_string_pretty(&shown).unwrap_or_else(|e| format!("# cannot print config: {e}"))
    }
}

const SECTIONS: [&str; 8] = [
    "engine",
    "source",
    "kafka",
    "http",
    "recommendations",
    "cluster",
    "segments",
    "triggers",
];

/// `PERSONA_<SECTION>_<KEY>=value`: the value is read as a TOML value (number, bool, array,
/// inline table), falling back to a plain string.
fn apply_env(
    table: &mut toml::Table,
    env: impl IntoIterator<Item = (String, String)>,
) -> Result<()> {
    for (name, value) in env {
        let Some(rest) = name.strip_prefix("PERSONA_") else {
            continue;
        };
        let rest = rest.to_ascii_lowercase();
        let Some((section, key)) = rest.split_once('_') else {
            bail!("environment variable {name}: expected PERSONA_<SECTION>_<KEY>");
        };
        if !SECTIONS.contains(&section) {
            bail!(
                "environment variable {name}: unknown section `{section}` (known: {})",
                SECTIONS.join(", ")
            );
        }
        // A token such as "1e10" must not turn into a number, nor a segment rule such as
        // `true` into a boolean (a quoted TOML string is still read as one).
        let parsed = (!key.ends_with("token"))
            .then(|| toml::from_str::<toml::Table>(&format!("v = {value}")).ok())
            .flatten()
            .and_then(|mut t| t.remove("v"))
            .filter(|v| section != "segments" || v.is_str())
            .unwrap_or_else(|| toml::Value::String(value.clone()));
        let entry = table
            .entry(section.to_string())
            .or_insert_with(|| toml::Value::Table(toml::Table::new()));
        let Some(section_table) = entry.as_table_mut() else {
            bail!("config section [{section}] is not a table")
        };
        section_table.insert(key.to_string(), parsed);
    }
    Ok(())
}

/// A sliding window: its label as configured and its width.
#[derive(Clone, Debug, PartialEq)]
pub struct Window {
    pub label: String,
    pub width_ms: u64,
}

/// Validated settings the engine runs with.
#[derive(Clone, Debug)]
pub struct Settings {
    pub workers: usize,
    /// Nice value the worker threads set for themselves (0: unchanged).
    pub worker_nice: i32,
    /// CPUs the worker threads and the checkpoint writer run on (empty: any).
    pub worker_cpus: Vec<usize>,
    /// See [`crate::optimes`].
    pub operator_times: bool,
    pub clock: ClockMode,
    pub tick_ms: u64,
    pub windows: Vec<Window>,
    pub session_gap_ms: u64,
    pub allowed_lateness_ms: u64,
    pub max_future_skew_ms: u64,
    pub dedup_horizon_ms: u64,
    /// `None`: all detail is kept (exact under any lateness).
    pub retention_ms: Option<u64>,
    /// Lines a worker reads per step (`None`: the engine's defaults). Not a config key: tests
    /// make it small so that the event clock moves between lines, as it does on large logs.
    pub batch_lines: Option<usize>,
    pub default_weight: f64,
    pub weights: BTreeMap<String, f64>,
    pub source: SourceConfig,
    pub kafka: KafkaConfig,
    pub start_offset: StartOffset,
    pub listen: String,
    pub http: HttpSettings,
    pub erasure_log: PathBuf,
    /// `None`: no checkpoints.
    pub checkpoints: Option<CheckpointSettings>,
    /// `None` when recommendations are off.
    pub recommendations: Option<RecommendSettings>,
    /// `None`: a single process.
    pub cluster: Option<Cluster>,
    /// Segments by name (ascending: a segment's id is its index).
    pub segments: Vec<Segment>,
    pub triggers: TriggersConfig,
}

/// Where and how often checkpoints are taken.
#[derive(Clone, Debug)]
pub struct CheckpointSettings {
    pub dir: PathBuf,
    pub every_ms: u64,
}

/// A configured segment.
#[derive(Clone, Debug)]
pub struct Segment {
    pub name: String,
    pub rule: Rule,
}

/// A validated cluster layout, as seen by one of its processes.
#[derive(Clone, Debug, PartialEq)]
pub struct Cluster {
    /// This process's index.
    pub process: usize,
    pub addresses: Vec<String>,
    pub http: Vec<String>,
    /// Workers per process (the same in all).
    pub threads: usize,
}

impl Cluster {
    pub fn processes(&self) -> usize {
        self.addresses.len()
    }
    /// Workers in the whole cluster.
    pub fn peers(&self) -> usize {
        self.threads * self.processes()
    }
    /// The process that runs global worker `worker`.
    pub fn process_of(&self, worker: usize) -> usize {
        worker / self.threads
    }
}

/// Validated `[recommendations]`.
#[derive(Clone, Debug)]
pub struct RecommendSettings {
    pub recent_items: usize,
    pub horizon_ms: u64,
    pub neighbours: usize,
    pub similarity: Similarity,
    pub min_cooccurrence: u64,
    pub refresh_ms: u64,
    pub popular_window_ms: u64,
    pub popular_size: usize,
    pub default_weight: f64,
    pub weights: BTreeMap<String, f64>,
    pub strategies: BTreeMap<String, Strategy>,
    /// `(strategy, share)`, shares positive.
    pub experiment: Vec<(String, u32)>,
    pub experiment_salt: String,
}

impl RecommendSettings {
    fn from_config(r: &RecommendationsConfig) -> Result<RecommendSettings> {
        if r.recent_items == 0 || r.recent_items > 1000 {
            bail!(
                "recommendations.recent_items = {} must be between 1 and 1000",
                r.recent_items
            );
        }
        if r.neighbours == 0 || r.neighbours > 1000 {
            bail!(
                "recommendations.neighbours = {} must be between 1 and 1000",
                r.neighbours
            );
        }
        if r.popular_size == 0 || r.popular_size > 10_000 {
            bail!(
                "recommendations.popular_size = {} must be between 1 and 10000",
                r.popular_size
            );
        }
        for (name, w) in r
            .weights
            .iter()
            .chain([(&"default_weight".to_string(), &r.default_weight)])
        {
            if !(w.is_finite() && *w >= 0.0 && *w <= 1_000_000.0) {
                bail!("recommendations weight {name} = {w} must be a number between 0 and 1000000");
            }
        }
        let mut strategies = BTreeMap::new();
        for (name, s) in &r.strategies {
            let kind = match s.kind.as_str() {
                "item_item" => StrategyKind::ItemItem,
                "popular" => StrategyKind::Popular,
                other => bail!(
                    "recommendations.strategies.{name}.kind = {other:?}: expected \"item_item\" or \"popular\""
                ),
            };
            if !(s.category_boost.is_finite() && s.category_boost >= 0.0) {
                bail!("recommendations.strategies.{name}.category_boost must be a number >= 0");
            }
            strategies.insert(
                name.clone(),
                Strategy {
                    kind,
                    exclude_seen: s.exclude_seen,
                    returned: s.returned,
                    fill_recent: s.fill_recent,
                    category_boost: s.category_boost,
                },
            );
        }
        let mut experiment = Vec::new();
        for (name, share) in &r.experiment {
            if !strategies.contains_key(name) {
                bail!(
                    "recommendations.experiment names strategy {name:?}, which is not in [recommendations.strategies] (known: {})",
                    strategies.keys().cloned().collect::<Vec<_>>().join(", ")
                );
            }
            if *share > 0 {
                experiment.push((name.clone(), *share));
            }
        }
        if experiment.is_empty() {
            bail!("recommendations.experiment gives no strategy a positive share");
        }
        Ok(RecommendSettings {
            recent_items: r.recent_items,
            horizon_ms: duration_ms("recommendations.horizon", &r.horizon)?,
            neighbours: r.neighbours,
            similarity: r.similarity,
            min_cooccurrence: r.min_cooccurrence,
            refresh_ms: duration_ms("recommendations.refresh", &r.refresh)?,
            popular_window_ms: duration_ms("recommendations.popular_window", &r.popular_window)?,
            popular_size: r.popular_size,
            default_weight: r.default_weight,
            weights: over_defaults(&RecommendationsConfig::default().weights, &r.weights),
            strategies,
            experiment,
            experiment_salt: r.experiment_salt.clone(),
        })
    }

    /// The strategy `user_id` is assigned to: a hash of the salt and the id picks a share.
    pub fn variant(&self, user_id: &str) -> &str {
        let total: u64 = self.experiment.iter().map(|(_, s)| u64::from(*s)).sum();
        let key = format!("{}\u{0}{user_id}", self.experiment_salt);
        let mut point = xxhash_rust::xxh3::xxh3_64(key.as_bytes()) % total.max(1);
        for (name, share) in &self.experiment {
            if point < u64::from(*share) {
                return name;
            }
            point -= u64::from(*share);
        }
        &self.experiment[0].0
    }

    pub fn weight(&self, kind: &str) -> f64 {
        self.weights
            .get(kind)
            .copied()
            .unwrap_or(self.default_weight)
    }
}

/// `dir/name.ext` → `dir/name.pN.ext`: process N's own file.
fn per_process(path: &Path, process: usize) -> PathBuf {
    if path.as_os_str().is_empty() {
        return path.to_path_buf();
    }
    let stem = path.file_stem().unwrap_or_default().to_string_lossy();
    let name = match path.extension() {
        Some(ext) => format!("{stem}.p{process}.{}", ext.to_string_lossy()),
        None => format!("{stem}.p{process}"),
    };
    path.with_file_name(name)
}

/// Compiles every `[segments]` rule; a bad one fails with its name and the column.
fn segments(config: &Config, labels: &[&str]) -> Result<Vec<Segment>> {
    let mut out = Vec::new();
    for (name, text) in &config.segments {
        let valid = name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
            && !name.is_empty()
            && name.len() <= 64;
        if !valid {
            bail!("segments.{name}: a segment name is 1 to 64 letters, digits, '_' or '-'");
        }
        let rule = Rule::compile(text, labels, &mut |s| crate::names::hash(s))
            .map_err(|e| anyhow::anyhow!("segments.{name} = {text:?}: {e}"))?;
        out.push(Segment {
            name: name.clone(),
            rule,
        });
    }
    Ok(out)
}

fn triggers(config: &Config) -> Result<TriggersConfig> {
    let t = &config.triggers;
    match t.sink.as_str() {
        "none" => {}
        "file" => {
            if t.path.as_os_str().is_empty() {
                bail!("triggers.path is empty (triggers.sink = \"file\" writes there)");
            }
        }
        "kafka" => {
            if config.kafka.triggers_topic.trim().is_empty() {
                bail!("kafka.triggers_topic is empty (triggers.sink = \"kafka\" writes there)");
            }
        }
        other => bail!("triggers.sink = {other:?}: expected \"file\", \"kafka\" or \"none\""),
    }
    if t.stream_buffer == 0 {
        bail!("triggers.stream_buffer must be at least 1");
    }
    Ok(t.clone())
}

/// Width of the window the engagement score is defined on (SPEC §4).
pub const SCORE_WINDOW_MS: u64 = 7 * 24 * 3_600_000;

fn duration_ms(key: &str, text: &str) -> Result<u64> {
    let d = humantime::parse_duration(text).with_context(|| {
        format!("{key} = {text:?} is not a duration (examples: \"20ms\", \"30m\", \"7d\")")
    })?;
    Ok(d.as_millis() as u64)
}

/// `engine.retention`, checked against what must fit inside it: every horizon after which a
/// view forgets an event by itself, so that only the all-time views see sealed retractions.
/// The recommenders' horizons are capped at it.
fn retention(
    config: &Config,
    windows: &[Window],
    recommendations: Option<&mut RecommendSettings>,
) -> Result<Option<u64>> {
    let e = &config.engine;
    if e.retention.trim().is_empty() {
        return Ok(None);
    }
    let r = duration_ms("engine.retention", &e.retention)?;
    let widest = windows
        .iter()
        .map(|w| w.width_ms)
        .fold(SCORE_WINDOW_MS, u64::max);
    if r < widest {
        bail!(
            "engine.retention = {:?} is shorter than the widest window ({} ms, the engagement score's 7d included); windowed counts need their events",
            e.retention,
            widest
        );
    }
    if let Some(rec) = recommendations {
        // The defaults (years) would make every retention an error: cap them, and say so.
        for (key, ms) in [
            ("recommendations.horizon", &mut rec.horizon_ms),
            ("recommendations.popular_window", &mut rec.popular_window_ms),
        ] {
            if *ms > r {
                tracing::warn!(
                    "{key} ({} ms) is capped at engine.retention ({r} ms): sealed events no longer count there",
                    *ms
                );
                *ms = r;
            }
        }
    }
    Ok(Some(r))
}

/// CPU ids as Linux numbers them; whether this process may use them is checked at start
/// ([`crate::affinity::check`]).
fn cpu_ids(key: &str, cpus: &[usize]) -> Result<()> {
    if let Some(c) = cpus.iter().find(|&&c| c >= 1024) {
        bail!("{key} names CPU {c}; CPU ids go from 0 to 1023");
    }
    Ok(())
}

fn http_settings(h: &HttpConfig) -> Result<HttpSettings> {
    let token = |name: &str, t: &str| -> Result<Option<String>> {
        if t.is_empty() {
            return Ok(None);
        }
        // RFC 6750 token68 characters: anything else could not be sent in a header.
        if !t
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b"-._~+/=".contains(&b))
        {
            bail!("http.{name} may hold only letters, digits and -._~+/=");
        }
        Ok(Some(t.to_string()))
    };
    if h.max_uri_bytes < 64 || h.max_headers == 0 {
        bail!("http.max_uri_bytes must be at least 64 and http.max_headers at least 1");
    }
    if h.threads == 0 || h.threads > 256 {
        bail!("http.threads = {} must be between 1 and 256", h.threads);
    }
    cpu_ids("http.cpus", &h.cpus)?;
    Ok(HttpSettings {
        read_token: token("read_token", &h.read_token)?,
        admin_token: token("admin_token", &h.admin_token)?,
        max_uri_bytes: h.max_uri_bytes,
        max_headers: h.max_headers,
        header_timeout_ms: duration_ms("http.header_timeout", &h.header_timeout)?.max(1),
        threads: h.threads,
        cpus: h.cpus.clone(),
        tls: match (
            h.tls_cert.as_os_str().is_empty(),
            h.tls_key.as_os_str().is_empty(),
        ) {
            (true, true) => None,
            (false, false) => Some((h.tls_cert.clone(), h.tls_key.clone())),
            _ => {
                bail!("http.tls_cert and http.tls_key go together: set both for HTTPS, or neither")
            }
        },
    })
}

impl Settings {
    pub fn from_config(config: &Config) -> Result<Settings> {
        let e = &config.engine;
        if e.workers == 0 || e.workers > 1024 {
            bail!("engine.workers = {} must be between 1 and 1024", e.workers);
        }
        let tick_ms = duration_ms("engine.tick", &e.tick)?;
        if tick_ms == 0 {
            bail!("engine.tick must be at least 1ms");
        }
        let mut windows = Vec::new();
        for label in &e.windows {
            let width_ms = duration_ms("engine.windows", label)?;
            if width_ms == 0 {
                bail!("engine.windows: window {label:?} has zero width");
            }
            if windows.iter().any(|w: &Window| w.label == *label) {
                bail!("engine.windows: window {label:?} is listed twice");
            }
            windows.push(Window {
                label: label.clone(),
                width_ms,
            });
        }
        for (name, w) in &e.weights {
            if !w.is_finite() {
                bail!("engine.weights.{name} = {w} is not a finite number");
            }
        }
        if !e.default_weight.is_finite() {
            bail!("engine.default_weight must be a finite number");
        }
        if !["file", "kafka"].contains(&config.source.kind.as_str()) {
            bail!(
                "source.kind = {:?}: expected \"file\" or \"kafka\"",
                config.source.kind
            );
        }
        let k = &config.kafka;
        let start_offset = match k.start_offset.as_str() {
            "earliest" => StartOffset::Earliest,
            "latest" => StartOffset::Latest,
            other => bail!("kafka.start_offset = {other:?}: expected \"earliest\" or \"latest\""),
        };
        if config.source.kind == "kafka" {
            if k.brokers.trim().is_empty() {
                bail!("kafka.brokers is empty (example: \"127.0.0.1:9092\")");
            }
            if k.events_topic.trim().is_empty() {
                bail!("kafka.events_topic is empty");
            }
        }
        let labels: Vec<&str> = windows.iter().map(|w| w.label.as_str()).collect();
        let segments_compiled = segments(config, &labels)?;
        if !(0..=19).contains(&e.worker_nice) {
            bail!(
                "engine.worker_nice = {} must be between 0 (unchanged) and 19 (lowest priority)",
                e.worker_nice
            );
        }
        cpu_ids("engine.worker_cpus", &e.worker_cpus)?;
        let mut recommendations = if config.recommendations.enabled {
            Some(RecommendSettings::from_config(&config.recommendations)?)
        } else {
            None
        };
        let retention_ms = retention(config, &windows, recommendations.as_mut())?;
        Ok(Settings {
            workers: e.workers,
            worker_nice: e.worker_nice,
            worker_cpus: e.worker_cpus.clone(),
            operator_times: e.operator_times,
            clock: e.clock,
            tick_ms,
            windows,
            session_gap_ms: duration_ms("engine.session_gap", &e.session_gap)?,
            allowed_lateness_ms: duration_ms("engine.allowed_lateness", &e.allowed_lateness)?,
            max_future_skew_ms: duration_ms("engine.max_future_skew", &e.max_future_skew)?,
            dedup_horizon_ms: duration_ms("engine.dedup_horizon", &e.dedup_horizon)?,
            retention_ms,
            batch_lines: None,
            default_weight: e.default_weight,
            weights: over_defaults(&EngineConfig::default().weights, &e.weights),
            source: config.source.clone(),
            kafka: config.kafka.clone(),
            start_offset,
            listen: config.http.listen.clone(),
            http: http_settings(&config.http)?,
            erasure_log: e.erasure_log.clone(),
            checkpoints: if e.checkpoint_dir.as_os_str().is_empty() {
                None
            } else {
                let every_ms = duration_ms("engine.checkpoint_every", &e.checkpoint_every)?;
                if every_ms == 0 {
                    bail!("engine.checkpoint_every must be at least 1ms");
                }
                Some(CheckpointSettings {
                    dir: e.checkpoint_dir.clone(),
                    every_ms,
                })
            },
            recommendations,
            cluster: None,
            segments: segments_compiled,
            triggers: triggers(config)?,
        })
    }

    /// Takes the role of process `process` of the configured cluster: checks the layout, and
    /// sets the workers and the HTTP address to this process's entries. `workers` is the
    /// command line's `--workers`, which must agree with the layout.
    pub fn for_process(
        mut self,
        config: &ClusterConfig,
        process: usize,
        workers: Option<usize>,
    ) -> Result<Settings> {
        let n = config.addresses.len();
        if n == 0 {
            if process != 0 {
                bail!("--process {process}: no cluster is configured ([cluster] addresses is empty), so the only process is 0");
            }
            return Ok(self);
        }
        if process >= n {
            bail!(
                "--process {process} is out of range: [cluster] addresses lists {n} processes (0..={})",
                n - 1
            );
        }
        if config.http.len() != n {
            bail!(
                "[cluster] http lists {} addresses but addresses lists {n} processes: give every process its HTTP address, in the same order",
                config.http.len()
            );
        }
        for (key, list) in [("addresses", &config.addresses), ("http", &config.http)] {
            for (i, a) in list.iter().enumerate() {
                if a.trim().is_empty() {
                    bail!("[cluster] {key}[{i}] is empty (expected host:port)");
                }
                if let Some(j) = list[..i].iter().position(|b| b == a) {
                    bail!("[cluster] {key} lists {a:?} twice (processes {j} and {i}); every process needs its own address");
                }
            }
        }
        if let Some(a) = config.addresses.iter().find(|a| config.http.contains(a)) {
            bail!("[cluster] {a:?} is both a timely address and an HTTP address");
        }
        let threads = if config.workers.is_empty() {
            self.workers
        } else {
            if config.workers.len() != n {
                bail!(
                    "[cluster] workers lists {} counts but addresses lists {n} processes",
                    config.workers.len()
                );
            }
            let first = config.workers[0];
            if let Some((i, w)) = config
                .workers
                .iter()
                .enumerate()
                .find(|(_, w)| **w != first)
            {
                bail!("[cluster] workers: process {i} has {w} workers but process 0 has {first}; timely runs the same number of workers in every process");
            }
            first
        };
        if threads == 0 || threads > 1024 {
            bail!("[cluster] workers = {threads} must be between 1 and 1024");
        }
        if let Some(w) = workers {
            if w != threads {
                bail!("--workers {w} disagrees with the cluster layout's {threads} workers per process; drop --workers or fix [cluster] workers");
            }
        }
        self.workers = threads;
        self.listen = config.http[process].clone();
        // Processes on one machine must not append to one dead-letter or triggers file.
        self.source.dead_letter_path = per_process(&self.source.dead_letter_path, process);
        self.triggers.path = per_process(&self.triggers.path, process);
        self.erasure_log = per_process(&self.erasure_log, process);
        if self.checkpoints.is_some() {
            bail!("engine.checkpoint_dir: checkpoints are taken by a single process; a cluster re-reads Kafka from the beginning of retention at start (leave checkpoint_dir empty)");
        }
        if self.http.tls.is_some() {
            bail!("http.tls_cert: the processes of a cluster forward requests to each other over plain HTTP; terminate TLS in front of each process instead");
        }
        self.cluster = Some(Cluster {
            process,
            addresses: config.addresses.clone(),
            http: config.http.clone(),
            threads,
        });
        Ok(self)
    }

    /// The widest window the dataflow must keep events for: the configured ones and the
    /// score's 7 days.
    pub fn widest_window_ms(&self) -> u64 {
        self.windows
            .iter()
            .map(|w| w.width_ms)
            .fold(SCORE_WINDOW_MS, u64::max)
    }

    pub fn weight(&self, kind: &str) -> f64 {
        self.weights
            .get(kind)
            .copied()
            .unwrap_or(self.default_weight)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn embedded_default_matches_code_defaults() {
        let loaded = Config::load(None, Vec::new()).unwrap();
        assert_eq!(loaded, Config::default());
    }

    #[test]
    fn env_overrides_keys_and_types() {
        let env = vec![
            (
                "PERSONA_HTTP_LISTEN".to_string(),
                "127.0.0.1:9999".to_string(),
            ),
            (
                "PERSONA_SOURCE_CATALOG_PATH".to_string(),
                "x/cat.jsonl".to_string(),
            ),
            ("PERSONA_ENGINE_WORKERS".to_string(), "3".to_string()),
            (
                "PERSONA_ENGINE_WINDOWS".to_string(),
                r#"["2h"]"#.to_string(),
            ),
            ("HOME".to_string(), "/root".to_string()),
            // Rules are strings, whatever else they parse as; a quoted one is unquoted.
            ("PERSONA_SEGMENTS_ALL".to_string(), "true".to_string()),
            ("PERSONA_SEGMENTS_ONE".to_string(), "1 == 1".to_string()),
            (
                "PERSONA_SEGMENTS_QUOTED".to_string(),
                r#""event_count > 2""#.to_string(),
            ),
        ];
        let c = Config::load(None, env).unwrap();
        assert_eq!(c.segments["all"], "true");
        assert_eq!(c.segments["one"], "1 == 1");
        assert_eq!(c.segments["quoted"], "event_count > 2");
        assert_eq!(c.http.listen, "127.0.0.1:9999");
        assert_eq!(c.source.catalog_path, PathBuf::from("x/cat.jsonl"));
        assert_eq!(c.engine.workers, 3);
        assert_eq!(c.engine.windows, vec!["2h".to_string()]);
    }

    #[test]
    fn unknown_keys_are_errors() {
        let err = Config::load(
            None,
            vec![("PERSONA_HTTP_LISTNE".to_string(), "x".to_string())],
        )
        .unwrap_err();
        assert!(format!("{err:#}").contains("listne"), "{err:#}");
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("c.toml");
        std::fs::write(&path, "[engine]\nwindowz = []\n").unwrap();
        let err = Config::load(Some(&path), Vec::new()).unwrap_err();
        assert!(format!("{err:#}").contains("windowz"), "{err:#}");
    }

    #[test]
    fn worker_nice_is_a_nice_value_that_only_lowers_priority() {
        let mut c = Config::default();
        for (nice, ok) in [(-1, false), (0, true), (19, true), (20, false)] {
            c.engine.worker_nice = nice;
            match Settings::from_config(&c) {
                Ok(s) => assert!(ok && s.worker_nice == nice, "{nice} accepted"),
                Err(e) => assert!(
                    !ok && format!("{e:#}").contains("engine.worker_nice"),
                    "{nice}: {e:#}"
                ),
            }
        }
    }

    #[test]
    fn cpu_lists_come_from_the_environment_and_stay_below_cpu_setsize() {
        let env = |k: &str, v: &str| vec![(k.to_string(), v.to_string())];
        let c = Config::load(None, env("PERSONA_ENGINE_WORKER_CPUS", "[0]")).unwrap();
        let s = Settings::from_config(&c).unwrap();
        assert_eq!((s.worker_cpus, s.http.cpus), (vec![0], vec![]));
        let c = Config::load(None, env("PERSONA_HTTP_CPUS", "[1, 2]")).unwrap();
        assert_eq!(Settings::from_config(&c).unwrap().http.cpus, vec![1, 2]);
        let c = Config::load(None, env("PERSONA_HTTP_CPUS", "[1024]")).unwrap();
        let e = format!("{:#}", Settings::from_config(&c).unwrap_err());
        assert!(e.contains("http.cpus names CPU 1024"), "{e}");
    }

    #[test]
    fn retention_covers_the_windows_and_caps_the_recommenders() {
        let mut c = Config::default();
        assert_eq!(Settings::from_config(&c).unwrap().retention_ms, None);
        c.engine.retention = "30d".into();
        let s = Settings::from_config(&c).unwrap();
        let day = 86_400_000;
        assert_eq!(s.retention_ms, Some(30 * day));
        let r = s.recommendations.unwrap();
        assert_eq!((r.horizon_ms, r.popular_window_ms), (30 * day, 30 * day));
        c.engine.retention = "6d".into();
        let e = format!("{:#}", Settings::from_config(&c).unwrap_err());
        assert!(e.contains("shorter than the widest window"), "{e}");
        c.engine.retention = "30d".into();
        c.engine.windows.push("60d".into());
        let e = format!("{:#}", Settings::from_config(&c).unwrap_err());
        assert!(e.contains("shorter than the widest window"), "{e}");
        c.engine.windows.pop();
        c.engine.checkpoint_dir = "ckpt".into();
        assert_eq!(
            Settings::from_config(&c).unwrap().retention_ms,
            Some(30 * day)
        );
    }

    #[test]
    fn weights_override_defaults_one_by_one() {
        let mut c = Config::default();
        c.engine.weights = [("purchase".to_string(), 30.0), ("fav".to_string(), 3.0)].into();
        let s = Settings::from_config(&c).unwrap();
        assert_eq!(
            (
                s.weight("purchase"),
                s.weight("fav"),
                s.weight("product_view"),
                s.weight("other")
            ),
            (30.0, 3.0, 2.0, 1.0)
        );
    }

    #[test]
    fn kafka_keys_from_env_and_secrets_masked() {
        let env = vec![
            ("PERSONA_SOURCE_KIND".to_string(), "kafka".to_string()),
            ("PERSONA_KAFKA_EVENTS_TOPIC".to_string(), "ev".to_string()),
            (
                "PERSONA_KAFKA_PROPERTIES".to_string(),
                r#"{ "sasl.password" = "hunter2", "security.protocol" = "sasl_ssl" }"#.to_string(),
            ),
        ];
        let c = Config::load(None, env).unwrap();
        assert_eq!(c.kafka.events_topic, "ev");
        let s = Settings::from_config(&c).unwrap();
        assert_eq!(s.source.kind, "kafka");
        let printed = c.to_toml();
        assert!(!printed.contains("hunter2"), "{printed}");
        assert!(printed.contains("sasl_ssl"), "{printed}");
        let mut bad = c.clone();
        bad.kafka.start_offset = "middle".into();
        assert!(format!("{:#}", Settings::from_config(&bad).unwrap_err()).contains("start_offset"));
        // A secret of the wrong type is refused without its value.
        let typo = [(
            "PERSONA_KAFKA_PROPERTIES".to_string(),
            r#"{ "sasl.password" = 31337 }"#.to_string(),
        )];
        let err = format!("{:#}", Config::load(None, typo).unwrap_err());
        assert!(
            err.contains("sasl.password") && !err.contains("31337"),
            "{err}"
        );
    }

    fn cluster(addresses: &[&str], http: &[&str], workers: &[usize]) -> ClusterConfig {
        ClusterConfig {
            addresses: addresses.iter().map(|s| s.to_string()).collect(),
            http: http.iter().map(|s| s.to_string()).collect(),
            workers: workers.to_vec(),
        }
    }

    fn role(c: &ClusterConfig, process: usize, workers: Option<usize>) -> Result<Settings> {
        Settings::from_config(&Config::default())
            .unwrap()
            .for_process(c, process, workers)
    }

    #[test]
    fn cluster_layouts_are_checked() {
        let good = cluster(&["h:1", "h:2"], &["h:81", "h:82"], &[2, 2]);
        let s = role(&good, 1, None).unwrap();
        assert_eq!((s.workers, s.listen.as_str()), (2, "h:82"));
        assert_eq!(
            s.source.dead_letter_path,
            PathBuf::from("dead-letters.p1.jsonl")
        );
        let c = s.cluster.unwrap();
        assert_eq!((c.peers(), c.process_of(3), c.process_of(1)), (4, 1, 0));
        let err = |c: &ClusterConfig, p: usize, w: Option<usize>| {
            format!("{:#}", role(c, p, w).unwrap_err())
        };
        assert!(err(&good, 2, None).contains("out of range"));
        assert!(err(&good, 0, Some(3)).contains("disagrees"));
        let dup = cluster(&["h:1", "h:1"], &["h:81", "h:82"], &[]);
        assert!(err(&dup, 0, None).contains("twice"));
        let mismatch = cluster(&["h:1", "h:2"], &["h:81", "h:82"], &[2, 3]);
        assert!(err(&mismatch, 0, None).contains("same number of workers"));
        let short = cluster(&["h:1", "h:2"], &["h:81"], &[]);
        assert!(err(&short, 0, None).contains("http lists 1"));
        assert!(err(&ClusterConfig::default(), 1, None).contains("no cluster"));
        assert!(role(&ClusterConfig::default(), 0, None)
            .unwrap()
            .cluster
            .is_none());
    }

    #[test]
    fn bundled_cluster_config_is_valid() {
        let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("config/cluster-2.toml");
        let c = Config::load(Some(&path), Vec::new()).unwrap();
        let s = Settings::from_config(&c)
            .unwrap()
            .for_process(&c.cluster, 1, None)
            .unwrap();
        assert_eq!(s.cluster.map(|c| (c.processes(), c.threads)), Some((2, 2)));
        assert_eq!(s.listen, "127.0.0.1:8081");
    }

    #[test]
    fn bad_durations_are_errors() {
        let mut c = Config::default();
        c.engine.session_gap = "soon".into();
        let err = Settings::from_config(&c).unwrap_err();
        assert!(format!("{err:#}").contains("session_gap"));
    }
}
