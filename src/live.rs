//! Triggers and live subscribers (SPEC §6).
//!
//! Workers see every change of the membership arrangement once, when its time is complete:
//! each becomes a trigger record for the triggers sink and, for users someone watches, a message
//! to their `/v1/users/{id}/stream` subscribers ([`Hub`]). Workers never wait on a subscriber: a
//! message that does not fit in a subscriber's buffer drops that subscriber instead.

use crate::config::{Segment, Settings};
use crate::names::Names;
use crate::sink::{FileSink, KafkaSink, Sink};
use dashmap::DashMap;
use hyper::body::Bytes;
use serde::Serialize;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::Duration;
use tokio::sync::{mpsc, Notify};

/// The configured triggers sink (`None` without segments or with `triggers.sink = "none"`).
pub fn sink(settings: &Settings) -> anyhow::Result<Option<Sink>> {
    let t = &settings.triggers;
    if settings.segments.is_empty() {
        return Ok(None);
    }
    Ok(match t.sink.as_str() {
        "file" => Some(Sink::File(FileSink::new(&t.path))),
        "kafka" => Some(Sink::Kafka(KafkaSink::new(
            &settings.kafka,
            &settings.kafka.triggers_topic,
            &t.path,
        )?)),
        _ => None,
    })
}

/// One segment entry or exit.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, serde::Deserialize)]
pub struct Trigger {
    pub user_id: String,
    pub segment: String,
    /// "enter" or "exit".
    pub change: String,
    /// The engine time at which the membership changed.
    pub as_of_ms: u64,
}

/// Where a worker's membership changes go.
pub struct Live {
    sink: Option<Sink>,
    metrics: crate::metrics::Metrics,
    pub hub: Hub,
    segments: Vec<String>,
    names: Names,
}

impl Live {
    pub fn new(
        sink: Option<Sink>,
        segments: &[Segment],
        names: Names,
        buffer: usize,
        metrics: crate::metrics::Metrics,
    ) -> Self {
        Live {
            sink,
            metrics,
            hub: Hub::new(buffer),
            segments: segments.iter().map(|s| s.name.clone()).collect(),
            names,
        }
    }

    /// Emits a worker's membership changes `(time, user, segment id, diff)`, which it sorted by
    /// time: one trigger each, to the sink and to the user's subscribers.
    pub fn triggers(&self, changes: &[(u64, u64, u32, isize)]) {
        let watched = self.hub.active();
        for &(time, user, segment, diff) in changes {
            let Some(name) = self.segments.get(segment as usize) else {
                continue;
            };
            let change = if diff > 0 { "enter" } else { "exit" };
            self.metrics.trigger(name, change);
            if self.sink.is_none() && !watched {
                continue;
            }
            let user_id = self.names.name(user);
            let trigger = Trigger {
                user_id,
                segment: name.clone(),
                change: change.to_string(),
                as_of_ms: time,
            };
            let Ok(line) = serde_json::to_vec(&trigger) else {
                continue;
            };
            if let Some(sink) = &self.sink {
                sink.send(Some(trigger.user_id.as_bytes()), &line);
            }
            if watched {
                self.hub.segment(user, Bytes::from(line));
            }
        }
    }

    /// Delivers what is still queued (Kafka) before the process exits.
    pub fn flush(&self) {
        if let Some(s) = &self.sink {
            s.flush(Duration::from_secs(10));
        }
    }

    pub fn describe(&self) -> String {
        self.sink
            .as_ref()
            .map_or_else(|| "none".to_string(), Sink::describe)
    }
}

/// A live subscriber to one user.
pub struct Subscriber {
    /// Segment triggers, as JSON.
    segments: mpsc::Sender<Bytes>,
    /// One more than the latest time at which the user's profile changed (0: none yet).
    changed: AtomicU64,
    /// Set when a trigger did not fit: the stream ends with a `dropped` event.
    dropped: AtomicBool,
    notify: Notify,
}

impl Subscriber {
    /// Waits until the profile changed, a trigger arrived or the subscriber was dropped.
    pub async fn wait(&self) {
        self.notify.notified().await
    }

    /// The time of the latest unseen profile change, if any (and forgets it).
    pub fn take_change(&self) -> Option<u64> {
        self.changed.swap(0, Ordering::AcqRel).checked_sub(1)
    }

    pub fn is_dropped(&self) -> bool {
        self.dropped.load(Ordering::Acquire)
    }

    fn poke(&self) {
        self.notify.notify_one();
    }
}

/// Subscribers by user hash.
pub struct Hub {
    users: DashMap<u64, Vec<Arc<Subscriber>>>,
    count: AtomicUsize,
    buffer: usize,
}

/// Unsubscribes when dropped (the client went away).
pub struct Subscription<'h> {
    hub: &'h Hub,
    user: u64,
    pub subscriber: Arc<Subscriber>,
    pub triggers: mpsc::Receiver<Bytes>,
}

impl Drop for Subscription<'_> {
    fn drop(&mut self) {
        let mut empty = false;
        if let Some(mut subs) = self.hub.users.get_mut(&self.user) {
            subs.retain(|s| !Arc::ptr_eq(s, &self.subscriber));
            empty = subs.is_empty();
        }
        if empty {
            self.hub
                .users
                .remove_if(&self.user, |_, subs| subs.is_empty());
        }
        self.hub.count.fetch_sub(1, Ordering::AcqRel);
    }
}

impl Hub {
    pub fn new(buffer: usize) -> Self {
        Hub {
            users: DashMap::new(),
            count: AtomicUsize::new(0),
            buffer: buffer.max(1),
        }
    }

    /// Whether anyone is subscribed (workers skip all work for subscribers otherwise).
    pub fn active(&self) -> bool {
        self.count.load(Ordering::Acquire) > 0
    }

    pub fn subscribe(&self, user: u64) -> Subscription<'_> {
        let (tx, rx) = mpsc::channel(self.buffer);
        let subscriber = Arc::new(Subscriber {
            segments: tx,
            changed: AtomicU64::new(0),
            dropped: AtomicBool::new(false),
            notify: Notify::new(),
        });
        self.users.entry(user).or_default().push(subscriber.clone());
        self.count.fetch_add(1, Ordering::AcqRel);
        Subscription {
            hub: self,
            user,
            subscriber,
            triggers: rx,
        }
    }

    /// The user's profile changed at `time`.
    pub fn changed(&self, user: u64, time: u64) {
        if let Some(subs) = self.users.get(&user) {
            for s in subs.iter() {
                s.changed
                    .fetch_max(time.saturating_add(1), Ordering::AcqRel);
                s.poke();
            }
        }
    }

    /// A trigger for the user; a subscriber without room for it is dropped.
    fn segment(&self, user: u64, json: Bytes) {
        if let Some(subs) = self.users.get(&user) {
            for s in subs.iter() {
                if s.segments.try_send(json.clone()).is_err() {
                    s.dropped.store(true, Ordering::Release);
                }
                s.poke();
            }
        }
    }
}
