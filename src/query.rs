//! Point queries from the HTTP server to the worker that owns a user.
//!
//! Arrangements are per worker and never leave their thread, so a query travels to its owner
//! (by [`persona_dataflows::owner`], the same routing the views use) over a channel; the worker
//! answers between dataflow steps and replies on a oneshot.

use crossbeam_channel::{Receiver, Sender};
use persona_dataflows::{owner, ProfileState};
use std::sync::{Mutex, OnceLock};
use std::thread::Thread;
use std::time::Instant;
use tokio::sync::oneshot;

/// A profile read.
pub struct Query {
    pub user: u64,
    /// Wait until the engine clock has reached this time (read-your-writes).
    pub min_as_of: Option<u64>,
    /// Give up waiting at this instant.
    pub deadline: Instant,
    pub reply: oneshot::Sender<Answer>,
}

/// A worker's reply.
#[derive(Debug)]
pub enum Answer {
    /// The user's state at `as_of` (`None`: no events for this user at that time).
    Profile {
        as_of: u64,
        worker: usize,
        state: Option<Box<ProfileState>>,
    },
    /// `min_as_of` was not reached before the deadline; the clock is at `as_of`.
    Timeout { as_of: Option<u64> },
    /// The engine is shutting down.
    Unavailable,
}

/// Channels to every worker, and their threads to wake them.
pub struct Router {
    senders: Vec<Sender<Query>>,
    receivers: Mutex<Vec<Option<Receiver<Query>>>>,
    threads: Vec<OnceLock<Thread>>,
}

impl Router {
    pub fn new(workers: usize) -> Self {
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..workers).map(|_| crossbeam_channel::unbounded()).unzip();
        Router {
            senders,
            receivers: Mutex::new(receivers.into_iter().map(Some).collect()),
            threads: (0..workers).map(|_| OnceLock::new()).collect(),
        }
    }

    /// Called once by each worker: takes its queue and registers its thread for wake-ups.
    pub fn attach(&self, worker: usize) -> Receiver<Query> {
        let _ = self.threads[worker].set(std::thread::current());
        let mut receivers = self.receivers.lock().unwrap_or_else(|p| p.into_inner());
        receivers[worker].take().expect("each worker attaches once")
    }

    /// Sends `query` to the owner of its user and wakes that worker.
    pub fn send(&self, query: Query) {
        let worker = owner(query.user, self.senders.len());
        if let Err(e) = self.senders[worker].send(query) {
            let _ = e.into_inner().reply.send(Answer::Unavailable);
            return;
        }
        self.wake(worker);
    }

    pub fn wake(&self, worker: usize) {
        if let Some(t) = self.threads[worker].get() {
            t.unpark();
        }
    }

    pub fn wake_all(&self) {
        (0..self.threads.len()).for_each(|w| self.wake(w));
    }
}
