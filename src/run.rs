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
    // After the bind: the address it names is the one bound (`:0` picks a port).
    for warning in crate::auth::warnings(&shared.settings.http, &server.addr.to_string()) {
        tracing::warn!("{warning}");
    }
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
    if let Some(c) = shared.checkpoints.get() {
        if !c.wait_written(LAST_CHECKPOINT_WRITE) {
            tracing::warn!(
                "stopping before the last checkpoint was written; the one before it stays"
            );
        }
    }
    server.join();
    shared.dead.flush();
    shared.live.flush();
    if result.is_ok() {
        tracing::info!("stopped");
    }
    result
}

/// How long a graceful stop waits for the last checkpoint to reach the disk.
const LAST_CHECKPOINT_WRITE: std::time::Duration = std::time::Duration::from_secs(60);

/// Loads the newest valid checkpoint for the workers to start from, and starts taking new ones.
/// Returns what the start line says about it.
fn restore_checkpoint(
    shared: &Arc<Shared>,
    settings: &crate::config::CheckpointSettings,
) -> Result<String> {
    let store = Arc::new(crate::checkpoint::Store::new(settings.dir.clone()));
    let loaded = store.load()?;
    let mut restored = None;
    let said = match loaded {
        Some((path, c)) => {
            for (h, s) in &c.names {
                shared.names.insert(*h, s);
            }
            for item in c.items() {
                shared.names.mark_item(item);
            }
            shared.max_ts.fetch_max(c.max_ts, Ordering::AcqRel);
            tracing::info!(
                path = %path.display(),
                records = c.records.len(),
                sealed_records = c.sealed.len(),
                sealed_users = c.basics.len(),
                partitions = c.positions.len(),
                clock = c.clock,
                "resuming from checkpoint"
            );
            let said = format!("{} ({} records)", path.display(), c.records.len());
            let c = Arc::new(c);
            *shared.restore.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
            restored = Some((path, c));
            said
        }
        None => format!(
            "none yet in {} (reading the topics from kafka.start_offset)",
            settings.dir.display()
        ),
    };
    // A crash between an erasure and the checkpoint after it leaves the user in the newest
    // one: replace it (and every older one) at once, as right after a `DELETE`.
    let stale = restored
        .as_ref()
        .is_some_and(|(_, c)| holds_erased(c, &shared.erased_users(), shared.controls));
    let coordinator = crate::checkpoint::Coordinator::start(
        store,
        std::time::Duration::from_millis(settings.every_ms),
        shared.workers.len(),
        crate::checkpoint::WriterSetup {
            names: shared.names.clone(),
            kinds: shared.controls,
            metrics: shared.metrics.clone(),
            nice: shared.settings.worker_nice,
            cpus: shared.settings.worker_cpus.clone(),
        },
        restored
            .as_ref()
            .filter(|_| !stale)
            .map(|(path, c)| (path.as_path(), &**c)),
    )?;
    if stale {
        tracing::warn!("the checkpoint holds events of an erased user; replacing it now");
        coordinator.erased();
    }
    let _ = shared.checkpoints.set(coordinator);
    Ok(said)
}

/// Whether `c` holds an event that an erasure in `erased` (user → through) removes.
fn holds_erased(
    c: &crate::checkpoint::Checkpoint,
    erased: &std::collections::HashMap<u64, u64>,
    kinds: persona_dataflows::ControlKinds,
) -> bool {
    let erases = |user: u64, ts: u64| erased.get(&user).is_some_and(|&through| ts <= through);
    !erased.is_empty()
        && (c
            .records
            .iter()
            .any(|e| !kinds.is_control(e) && erases(e.user, e.ts))
            || c.sealed.iter().any(|(e, _)| erases(e.user, e.ts))
            || c.basics.iter().any(|b| erases(b.user, b.first())))
}

#[cfg(test)]
mod tests {
    use super::*;
    use persona_dataflows::{ControlKinds, Event};

    #[test]
    fn a_checkpoint_holding_an_erased_users_events_is_stale() {
        let kinds = ControlKinds {
            erasure: 100,
            consent: 101,
        };
        let event = |user, ts, kind| Event {
            ts,
            user,
            id: ts,
            kind,
            item: persona_dataflows::NO_ITEM,
            value_bits: 0,
            device: None,
        };
        let c = crate::checkpoint::Checkpoint {
            // u1's events at 10 and 20, and the control record of u2's erasure through 50.
            records: vec![
                event(1, 10, 7),
                event(1, 20, 7),
                event(2, 50, kinds.erasure),
            ],
            ..Default::default()
        };
        let erased = |pairs: &[(u64, u64)]| pairs.iter().copied().collect();
        assert!(!holds_erased(&c, &erased(&[]), kinds));
        assert!(
            !holds_erased(&c, &erased(&[(2, 50)]), kinds),
            "u2's are gone"
        );
        assert!(
            !holds_erased(&c, &erased(&[(1, 9)]), kinds),
            "later events stay"
        );
        assert!(holds_erased(&c, &erased(&[(1, 10)]), kinds));
        assert!(holds_erased(&c, &erased(&[(2, 50), (1, 30)]), kinds));
        // u3's sealed events, the oldest at 5.
        let mut sealed = event(3, 5, 7);
        sealed.id = persona_dataflows::SEALED_ID;
        let c = crate::checkpoint::Checkpoint {
            sealed: vec![(sealed, 4)],
            ..c
        };
        assert!(!holds_erased(&c, &erased(&[(3, 4)]), kinds));
        assert!(holds_erased(&c, &erased(&[(3, 5)]), kinds));
    }
}
