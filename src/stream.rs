//! `GET /v1/users/{id}/stream`: server-sent events about one user, as they happen.
//!
//! Events: `profile` (the profile JSON, or `null` while the user has none) on connect and
//! whenever it changes; `segment` (a trigger, [`crate::live::Trigger`]) the moment a segment is
//! entered or left; `recommendations` whenever the user's list changes; `dropped` before the
//! server ends a stream whose client fell behind. A comment line every 15 s keeps proxies from
//! closing an idle stream.
//!
//! The engine only pokes a subscriber ([`crate::live::Hub`]); this task then reads the profile
//! through the query router at the time of the change, like any GET. The engine never waits
//! for a client: one that reads too slowly for its triggers gets `dropped` and is closed; one
//! that stops reading is disconnected once the socket's buffers and [`BODY_FRAMES`] frames
//! have waited [`STALL`] (it cannot be told).

use crate::engine::Shared;
use crate::query::{Answer, Ask};
use crate::render;
use hyper::body::{Bytes, Frame};
use std::pin::Pin;
use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;
use tokio::sync::mpsc;

/// Frames waiting for a client before it counts as stalled.
const BODY_FRAMES: usize = 64;
/// How long a frame may wait for room before the client counts as gone.
const STALL: Duration = Duration::from_secs(5);
const KEEPALIVE: Duration = Duration::from_secs(15);
/// Recommendations also change when neighbours are re-ranked, which pokes no one: look again
/// this often.
const RECHECK: Duration = Duration::from_secs(5);

/// A response body fed by a channel.
pub struct SseBody {
    rx: mpsc::Receiver<Bytes>,
}

impl hyper::body::Body for SseBody {
    type Data = Bytes;
    type Error = std::convert::Infallible;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        self.rx.poll_recv(cx).map(|b| b.map(|b| Ok(Frame::data(b))))
    }
}

/// One server-sent event.
fn event(name: &str, data: &[u8]) -> Bytes {
    let mut out = Vec::with_capacity(data.len() + name.len() + 16);
    out.extend_from_slice(b"event: ");
    out.extend_from_slice(name.as_bytes());
    out.extend_from_slice(b"\ndata: ");
    // JSON has no raw newlines; keep the frame valid whatever comes.
    out.extend(data.iter().map(|&b| if b == b'\n' { b' ' } else { b }));
    out.extend_from_slice(b"\n\n");
    Bytes::from(out)
}

/// Starts streaming `user_id`; the body ends when the client goes or falls behind, or the
/// engine stops.
pub fn start(shared: Arc<Shared>, user_id: String) -> SseBody {
    let (tx, rx) = mpsc::channel(BODY_FRAMES);
    tokio::spawn(async move {
        shared.metrics.stream(1);
        if let Err(reason) = run(&shared, &user_id, &tx).await {
            tracing::debug!(user = %user_id, "stream ended: {reason}");
        }
        shared.metrics.stream(-1);
    });
    SseBody { rx }
}

async fn send(tx: &mpsc::Sender<Bytes>, frame: Bytes) -> Result<(), &'static str> {
    match tokio::time::timeout(STALL, tx.send(frame)).await {
        Ok(Ok(())) => Ok(()),
        Ok(Err(_)) => Err("client went away"),
        Err(_) => Err("client stalled"),
    }
}

async fn run(
    shared: &Arc<Shared>,
    user_id: &str,
    tx: &mpsc::Sender<Bytes>,
) -> Result<(), &'static str> {
    let user = crate::names::hash(user_id);
    let mut sub = shared.live.hub.subscribe(user);
    send(tx, Bytes::from_static(b": persona stream\nretry: 2000\n\n")).await?;
    let mut last_profile: Option<Vec<u8>> = None;
    let mut last_recs: Option<Vec<u8>> = None;
    let mut at: Option<u64> = None;
    let mut keepalive = tokio::time::interval(KEEPALIVE);
    let mut recheck = tokio::time::interval(RECHECK);
    keepalive.tick().await;
    loop {
        // Profile (and the list, which the user's own events change) at the change's time.
        let changed = sub.subscriber.take_change();
        if last_profile.is_none() || changed.is_some() {
            at = changed.or(at);
            let (profile, as_of) = read_profile(shared, user, user_id, at).await;
            at = as_of.or(at);
            match profile {
                Some((body, key)) if last_profile.as_ref() != Some(&key) => {
                    send(tx, event("profile", &body)).await?;
                    last_profile = Some(key);
                }
                Some(_) => {}
                // No events yet, or none any more (an erasure, a revocation): `null`, once
                // (an empty key stands for the `null` sent).
                None if last_profile.as_deref() != Some(&[]) => {
                    send(tx, event("profile", b"null")).await?;
                    last_profile = Some(Vec::new());
                }
                None => {}
            }
            send_recs(shared, user_id, tx, &mut last_recs).await?;
        }
        tokio::select! {
            trigger = sub.triggers.recv() => match trigger {
                Some(t) => send(tx, event("segment", &t)).await?,
                None => return Err("hub closed"),
            },
            _ = sub.subscriber.wait() => {}
            _ = keepalive.tick() => send(tx, Bytes::from_static(b": keepalive\n\n")).await?,
            _ = recheck.tick() => send_recs(shared, user_id, tx, &mut last_recs).await?,
            _ = tx.closed() => return Err("client went away"),
        }
        if sub.subscriber.is_dropped() {
            // What fitted is still sent, in order, before the notice.
            while let Ok(t) = sub.triggers.try_recv() {
                send(tx, event("segment", &t)).await?;
            }
            let notice = serde_json::json!({
                "reason": "slow_consumer",
                "message": format!(
                    "this stream fell more than {} triggers behind and was closed; reconnect to resume (the profile event then brings the current state)",
                    shared.settings.triggers.stream_buffer
                ),
            });
            shared.metrics.stream_dropped();
            tracing::warn!(user = %user_id, "live stream dropped: its client fell behind");
            send(tx, event("dropped", notice.to_string().as_bytes())).await?;
            return Err("dropped: slow consumer");
        }
        if shared.stopping() {
            return Err("engine stopping");
        }
    }
}

/// The rendered profile (body, and the body without `as_of_ms` to compare versions) at or
/// after `at`, and the time it was read at.
async fn read_profile(
    shared: &Arc<Shared>,
    user: u64,
    user_id: &str,
    at: Option<u64>,
) -> (Option<(Vec<u8>, Vec<u8>)>, Option<u64>) {
    let answer = shared
        .router
        .ask(user, Ask::Profile, at, Duration::from_secs(5))
        .await;
    match answer {
        Answer::Profile {
            as_of,
            state: Some(state),
            ..
        } => {
            let rendered = render::profile(
                user_id.to_string(),
                as_of,
                &state,
                &shared.names,
                &shared.settings,
            );
            let profile = rendered.map(|mut p| {
                let body = serde_json::to_vec(&p).unwrap_or_default();
                p.as_of_ms = 0;
                (body, serde_json::to_vec(&p).unwrap_or_default())
            });
            (profile, Some(as_of))
        }
        Answer::Profile { as_of, .. } => (None, Some(as_of)),
        _ => (None, None),
    }
}

/// Sends the user's recommendations if they changed since the last ones sent.
async fn send_recs(
    shared: &Arc<Shared>,
    user_id: &str,
    tx: &mpsc::Sender<Bytes>,
    last: &mut Option<Vec<u8>>,
) -> Result<(), &'static str> {
    let Some(rec) = shared.settings.recommendations.as_ref() else {
        return Ok(());
    };
    let name = rec.variant(user_id).to_string();
    let Some(strategy) = rec.strategies.get(&name).cloned() else {
        return Ok(());
    };
    let answer = shared
        .router
        .ask(
            crate::names::hash(user_id),
            Ask::Recommend {
                strategy,
                limit: 10,
            },
            None,
            Duration::from_secs(5),
        )
        .await;
    if let Answer::Recommendations { as_of, items, .. } = answer {
        let key = serde_json::to_vec(&render::recommendations(
            user_id,
            0,
            &name,
            &items,
            &shared.names,
        ))
        .unwrap_or_default();
        if last.as_ref() != Some(&key) {
            let body = render::recommendations(user_id, as_of, &name, &items, &shared.names);
            send(tx, event("recommendations", body.to_string().as_bytes())).await?;
            *last = Some(key);
        }
    }
    Ok(())
}
