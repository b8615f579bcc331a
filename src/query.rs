//! Point queries from the HTTP server to the worker that owns a user.
//!
//! Arrangements are per worker and never leave their thread, so a query travels to its owner
//! (by [`persona_dataflows::owner`], the same routing the views use) over a channel; the worker
//! answers between dataflow steps and replies on a oneshot.

use crossbeam_channel::{Receiver, Sender};
use persona_dataflows::{owner, Neighbour, ProfileState, Scored, Strategy};
use std::sync::{Arc, Mutex, OnceLock};
use std::thread::Thread;
use std::time::Instant;
use tokio::sync::oneshot;

/// What a query reads.
#[derive(Debug, Clone)]
pub enum Ask {
    Profile,
    /// The user's top `limit` under `strategy`.
    Recommend {
        strategy: Strategy,
        limit: usize,
    },
    /// The neighbours of item `item` (any worker holds them; routed by the item).
    Similar {
        item: u64,
        limit: usize,
    },
    /// Members of each segment among this worker's users (every worker is asked).
    SegmentCounts,
    /// Erase the user (the owner fills in `through` when it records the erasure).
    Erase {
        through: Option<u64>,
    },
}

/// A read, sent to the worker that owns `user`.
pub struct Query {
    /// The routing key: the user's hash (the item's for [`Ask::Similar`]).
    pub user: u64,
    pub ask: Ask,
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
        state: Option<Arc<ProfileState>>,
    },
    /// The user's recommendations at `as_of` (any user: no history means trending items).
    Recommendations {
        as_of: u64,
        worker: usize,
        items: Vec<Scored>,
    },
    /// The item's neighbours at `as_of`, best first.
    Similar {
        as_of: u64,
        worker: usize,
        items: Vec<Neighbour>,
    },
    /// This worker's member count of each segment (by id) at `as_of`.
    SegmentCounts { as_of: u64, counts: Vec<u64> },
    /// The user's events with `ts <= through` are gone from every view as of `as_of`.
    Erased {
        as_of: u64,
        worker: usize,
        through: u64,
    },
    /// The request could not be carried out (the reason is for the client).
    Failed(String),
    /// The request is not possible in this mode (the reason is for the client).
    Refused(String),
    /// Recommendations are turned off in the configuration.
    Disabled,
    /// `min_as_of` was not reached before the deadline; the clock is at `as_of`.
    Timeout { as_of: Option<u64> },
    /// The engine is shutting down.
    Unavailable,
}

/// Channels to this process's workers, and their threads to wake them.
pub struct Router {
    /// Workers in the whole cluster (this process's alone without one).
    peers: usize,
    /// Global index of this process's first worker.
    first: usize,
    senders: Vec<Sender<Query>>,
    receivers: Mutex<Vec<Option<Receiver<Query>>>>,
    threads: Vec<OnceLock<Thread>>,
}

impl Router {
    /// A router for `workers` local workers, the first of them global worker `first` of
    /// `peers`.
    pub fn new(workers: usize, first: usize, peers: usize) -> Self {
        let (senders, receivers): (Vec<_>, Vec<_>) =
            (0..workers).map(|_| crossbeam_channel::unbounded()).unzip();
        Router {
            peers,
            first,
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

    /// The global index of the worker that owns routing key `key` (a user's hash, or an
    /// item's for similar items).
    pub fn owner(&self, key: u64) -> usize {
        owner(key, self.peers)
    }

    /// The local index of the worker that owns `key`, if it runs in this process.
    pub fn local(&self, key: u64) -> Option<usize> {
        self.owner(key)
            .checked_sub(self.first)
            .filter(|w| *w < self.senders.len())
    }

    /// Sends `query` to the owner of its user and wakes that worker; a user owned by another
    /// process is answered `Unavailable` (the HTTP layer forwards those first).
    pub fn send(&self, query: Query) {
        let Some(worker) = self.local(query.user) else {
            let _ = query.reply.send(Answer::Unavailable);
            return;
        };
        if let Err(e) = self.senders[worker].send(query) {
            let _ = e.into_inner().reply.send(Answer::Unavailable);
            return;
        }
        self.wake(worker);
    }

    /// Sends `query` to local worker `worker`, whatever its routing key.
    fn send_to(&self, worker: usize, query: Query) {
        match self.senders.get(worker).map(|s| s.send(query)) {
            Some(Ok(())) => self.wake(worker),
            Some(Err(e)) => {
                let _ = e.into_inner().reply.send(Answer::Unavailable);
            }
            None => {}
        }
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

impl Router {
    /// Sends a query and waits for its answer, up to `timeout` (plus a second for a worker
    /// busy in a long step).
    pub async fn ask(
        &self,
        user: u64,
        ask: Ask,
        min_as_of: Option<u64>,
        timeout: std::time::Duration,
    ) -> Answer {
        let (tx, rx) = oneshot::channel();
        self.send(Query {
            user,
            ask,
            min_as_of,
            deadline: Instant::now() + timeout,
            reply: tx,
        });
        match tokio::time::timeout(timeout + std::time::Duration::from_secs(1), rx).await {
            Ok(Ok(a)) => a,
            Ok(Err(_)) => Answer::Unavailable,
            Err(_) => Answer::Timeout { as_of: None },
        }
    }

    /// Asks every local worker, and waits for all their answers (in worker order).
    pub async fn ask_all(&self, ask: Ask, timeout: std::time::Duration) -> Vec<Answer> {
        let mut replies = Vec::new();
        for worker in 0..self.senders.len() {
            let (tx, rx) = oneshot::channel();
            self.send_to(
                worker,
                Query {
                    user: 0,
                    ask: ask.clone(),
                    min_as_of: None,
                    deadline: Instant::now() + timeout,
                    reply: tx,
                },
            );
            replies.push(rx);
        }
        let mut answers = Vec::new();
        for rx in replies {
            let answer =
                match tokio::time::timeout(timeout + std::time::Duration::from_secs(1), rx).await {
                    Ok(Ok(a)) => a,
                    Ok(Err(_)) => Answer::Unavailable,
                    Err(_) => Answer::Timeout { as_of: None },
                };
            answers.push(answer);
        }
        answers
    }

    /// [`Router::ask`] for callers outside an async runtime (commands, tests).
    pub fn ask_blocking(&self, user: u64, ask: Ask, timeout: std::time::Duration) -> Answer {
        let (tx, rx) = oneshot::channel();
        self.send(Query {
            user,
            ask,
            min_as_of: None,
            deadline: Instant::now() + timeout,
            reply: tx,
        });
        rx.blocking_recv().unwrap_or(Answer::Unavailable)
    }
}
