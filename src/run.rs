//! `persona run`: the engine and the HTTP server on the configured source.

use crate::config::Settings;
use crate::engine::{self, Mode, Shared};
use crate::server::Server;
use crate::sink::{FileSink, KafkaSink, Sink};
use crate::source::kafka::Monitor;
use anyhow::{bail, Result};
use std::sync::atomic::Ordering;
use std::sync::Arc;

pub fn command(settings: Settings) -> Result<()> {
    let source = settings.source.clone();
    let kafka = source.kind == "kafka";
    let (label, monitor, dead) = if kafka {
        let k = &settings.kafka;
        let dead = if k.dead_letter_topic.is_empty() {
            Sink::File(FileSink::new(&source.dead_letter_path))
        } else {
            Sink::Kafka(KafkaSink::new(
                k,
                &k.dead_letter_topic,
                &source.dead_letter_path,
            )?)
        };
        (
            format!("kafka {} topic {}", k.brokers, k.events_topic),
            Some(Monitor::start(k)?),
            dead,
        )
    } else {
        if !source.path.is_file() {
            bail!("source.path {} does not exist or is not a file (run from the repository root, or set PERSONA_SOURCE_PATH)", source.path.display());
        }
        if !source.catalog_path.as_os_str().is_empty() && !source.catalog_path.is_file() {
            bail!("source.catalog_path {} does not exist or is not a file (set it to \"\" for no catalog)", source.catalog_path.display());
        }
        (
            format!("file {} (follow: {})", source.path.display(), source.follow),
            None,
            Sink::File(FileSink::new(&source.dead_letter_path)),
        )
    };
    let listen = settings.listen.clone();
    let triggers = crate::live::sink(&settings)?;
    for warning in crate::auth::warnings(&settings.http, &listen) {
        tracing::warn!("{warning}");
    }
    let shared = Shared::new(settings, source.path.clone(), dead, triggers, monitor);
    shared.profiles.enable();
    let erased = shared.load_erasures()?;
    let restored = match &shared.settings.checkpoints {
        Some(c) if kafka => restore_checkpoint(&shared, c)?,
        Some(c) => {
            tracing::warn!(
                dir = %c.dir.display(),
                "engine.checkpoint_dir applies to the Kafka source; a file source is read again from its start"
            );
            "off (file source)".to_string()
        }
        None => "off".to_string(),
    };
    let server = Server::start(&listen, shared.clone(), true)?;
    tracing::info!(
        workers = shared.workers.len(),
        source = label,
        dead_letters = shared.dead.describe(),
        segments = shared.settings.segments.len(),
        triggers = shared.live.describe(),
        erasures = erased,
        checkpoint = restored,
        "persona listening on {}://{}",
        server.scheme,
        server.addr
    );
    let guards = engine::start(shared.clone(), Mode::Run, None)?;
    if let Some(cluster) = &shared.settings.cluster {
        // timely has connected every process by now.
        tracing::info!(
            process = cluster.process,
            processes = cluster.processes(),
            workers = cluster.peers(),
            "cluster formed"
        );
        let (stop, wake) = (shared.clone(), shared.clone());
        crate::cluster::watch_peers(
            cluster,
            move || stop.stopping(),
            move || wake.router.wake_all(),
        );
    }
    let result = engine::join(guards);
    shared.shutdown();
    server.join();
    shared.dead.flush();
    shared.live.flush();
    if result.is_ok() {
        tracing::info!("stopped");
    }
    result
}

/// Loads the newest valid checkpoint for the workers to start from, and starts taking new ones.
/// Returns what the start line says about it.
fn restore_checkpoint(
    shared: &Arc<Shared>,
    settings: &crate::config::CheckpointSettings,
) -> Result<String> {
    let store = Arc::new(crate::checkpoint::Store::new(settings.dir.clone()));
    let loaded = store.load()?;
    let said = match loaded {
        Some((path, c)) => {
            for (h, s) in &c.names {
                shared.names.insert(*h, s);
            }
            shared.max_ts.fetch_max(c.max_ts, Ordering::AcqRel);
            tracing::info!(
                path = %path.display(),
                records = c.records.len(),
                partitions = c.positions.len(),
                clock = c.clock,
                "resuming from checkpoint"
            );
            let said = format!("{} ({} records)", path.display(), c.records.len());
            *shared.restore.lock().unwrap_or_else(|p| p.into_inner()) = Some(Arc::new(c));
            said
        }
        None => format!(
            "none yet in {} (reading the topics from kafka.start_offset)",
            settings.dir.display()
        ),
    };
    let coordinator = crate::checkpoint::Coordinator::start(
        store,
        std::time::Duration::from_millis(settings.every_ms),
        shared.workers.len(),
        shared.names.clone(),
        shared.controls,
        shared.metrics.clone(),
    )?;
    let _ = shared.checkpoints.set(coordinator);
    Ok(said)
}
