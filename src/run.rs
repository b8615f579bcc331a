//! `persona run`: the engine and the HTTP server on the configured source.

use crate::config::Settings;
use crate::engine::{self, Mode, Shared};
use crate::server::Server;
use crate::sink::{FileSink, KafkaSink, Sink};
use crate::source::kafka::Monitor;
use anyhow::{bail, Result};

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
    let erased = shared.load_erasures()?;
    let server = Server::start(&listen, shared.clone(), true)?;
    tracing::info!(
        workers = shared.workers.len(),
        source = label,
        dead_letters = shared.dead.describe(),
        segments = shared.settings.segments.len(),
        triggers = shared.live.describe(),
        erasures = erased,
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
