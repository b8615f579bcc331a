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
        crate::cluster::formed();
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
    let erased = shared.erased_users();
    let mut stale = false;
    let said = match loaded {
        Some((path, mut c)) => {
            // A crash between an erasure and the checkpoint after it leaves the user in the
            // newest one: restore without them (their sealed part too, which the erasure
            // record at start cannot reach: it is seeded, not fed), and replace it (and every
            // older one) at once, as right after a `DELETE`.
            stale = holds_erased(&c, &erased, shared.controls);
            if stale {
                withdraw_erased(&mut c, &erased, shared.controls);
            }
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
        tracing::warn!(
            "the checkpoint holds events of an erased user; restored without them, and replacing it now"
        );
        coordinator.erased();
    }
    let _ = shared.checkpoints.set(coordinator);
    Ok(said)
}

/// Whether an erasure in `erased` (user → through) removes `user`'s event at `ts`.
fn erases(erased: &std::collections::HashMap<u64, u64>, user: u64, ts: u64) -> bool {
    erased.get(&user).is_some_and(|&through| ts <= through)
}

/// Takes out of `c` what the erasures in `erased` (user → through) remove: the events up to
/// `through`, and all of a user's sealed part once `through` reaches into it.
fn withdraw_erased(
    c: &mut crate::checkpoint::Checkpoint,
    erased: &std::collections::HashMap<u64, u64>,
    kinds: persona_dataflows::ControlKinds,
) {
    let erases = |user, ts| erases(erased, user, ts);
    c.records
        .retain(|e| kinds.is_control(e) || !erases(e.user, e.ts));
    let reached: std::collections::HashSet<u64> = c
        .sealed
        .iter()
        .map(|(e, _)| (e.user, e.ts))
        .chain(c.basics.iter().map(|b| (b.user, b.first())))
        .filter(|&(user, ts)| erases(user, ts))
        .map(|(user, _)| user)
        .collect();
    c.sealed.retain(|(e, _)| !reached.contains(&e.user));
    c.basics.retain(|b| !reached.contains(&b.user));
    // Nor the id strings nothing left names (an erased user's own).
    let named = c.named_ids(kinds);
    c.names.retain(|(h, _)| named.contains(h));
}

/// Whether `c` holds an event that an erasure in `erased` (user → through) removes.
fn holds_erased(
    c: &crate::checkpoint::Checkpoint,
    erased: &std::collections::HashMap<u64, u64>,
    kinds: persona_dataflows::ControlKinds,
) -> bool {
    let erases = |user, ts| erases(erased, user, ts);
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

        // Withdrawn: u1's events up to 10, all of u3's sealed part; the rest stays.
        let gone = erased(&[(1, 10), (3, 5)]);
        let mut w = c.clone();
        withdraw_erased(&mut w, &gone, kinds);
        assert!(!holds_erased(&w, &gone, kinds));
        assert_eq!(
            w.records,
            vec![event(1, 20, 7), event(2, 50, kinds.erasure)]
        );
        assert!(w.sealed.is_empty());
        let mut kept = c.clone();
        withdraw_erased(&mut kept, &erased(&[(3, 4)]), kinds);
        assert_eq!(kept.sealed, c.sealed, "an erasure before the sealed part");
    }
}
