//! Multi-process clusters: timely's own cluster mode, configured from `[cluster]`.
//!
//! Every process runs the same dataflow; timely connects them over TCP and its exchanges move
//! each user's events to the worker that owns the user (`persona_dataflows::owner` of the
//! user's hash over all the cluster's workers). Three things a single process gets for free
//! need help here:
//!
//! - **Names.** Ids are hashed at parse time and their strings kept in a per-process table.
//!   A worker announces every string it parses for the first time: user and event ids to the
//!   user's owner, item ids, event types and categories to every process. The events enter
//!   the views only once the announcements of their time are installed ([`after_names`]), so a
//!   view or a reply never meets a hash its process cannot name.
//! - **Agreement.** A replay ends at the largest `ts` of the whole log; [`Agreement`] computes
//!   such maxima over all workers through the dataflow.
//! - **Failure.** timely has no failover: when a process dies, the others' network threads
//!   panic (or, when it stopped cleanly, go quiet). [`watch_for_peer_loss`] and [`watch_peers`]
//!   turn either into one clear log line, "not ready", and a clean stop of this process.

use crate::config::Cluster;
use crate::names::Names;
use differential_dataflow::input::{Input, InputSession};
use differential_dataflow::{AsCollection, VecCollection};
use persona_dataflows::event::Pending;
use persona_dataflows::{route_hash, Event, Time};
use std::cell::Cell;
use std::collections::HashSet;
use std::rc::Rc;
use std::sync::atomic::{AtomicBool, Ordering};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::operator::Operator;
use timely::dataflow::operators::probe::Handle as ProbeHandle;
use timely::dataflow::operators::vec::Broadcast;
use timely::dataflow::operators::{Concat, Exchange, Inspect, Probe};
use timely::dataflow::{Scope, StreamVec};

/// timely's configuration for this process of `cluster`.
pub fn timely_config(cluster: &Cluster) -> timely::Config {
    timely::Config {
        communication: timely::CommunicationConfig::Cluster {
            threads: cluster.threads,
            process: cluster.process,
            addresses: cluster.addresses.clone(),
            report: false,
            zerocopy: false,
        },
        worker: timely::WorkerConfig::default(),
    }
}

/// A string a worker parsed for the first time: `(routing user hash, hash, string)`.
type Note = (u64, u64, String);

/// The `user` of a note that names an item (no user's hash is ever this).
const ITEM_NOTE: u64 = persona_dataflows::SEALED_ID;

/// One worker's announcements of the strings it parses (cluster only).
pub struct Announcer {
    announced: HashSet<u64, foldhash::fast::RandomState>,
    /// Strings only the owner of a user needs: the user id, and event ids (tie rules).
    owned: InputSession<Time, Note, isize>,
    /// Strings every process needs: item ids, event types, categories.
    shared: InputSession<Time, Note, isize>,
}

impl Announcer {
    /// Builds the announcement inputs into `scope`, and the stream that completes a time once
    /// every announcement of that time is installed in its process's table.
    pub fn new<'s>(scope: Scope<'s, Time>, names: Names) -> (Announcer, StreamVec<'s, Time, ()>) {
        let (owned, owned_notes) = scope.new_collection::<Note, isize>();
        let (shared, shared_notes) = scope.new_collection::<Note, isize>();
        let routed = owned_notes
            .inner
            .exchange(|((user, _, _), _, _): &(Note, Time, isize)| route_hash(*user))
            .concat(shared_notes.inner.broadcast());
        let installed: StreamVec<'s, Time, ()> = routed
            .unary::<timely::container::CapacityContainerBuilder<Vec<()>>, _, _, _>(
                Pipeline,
                "InstallNames",
                move |_, _| {
                    move |input, _output| {
                        input.for_each(|_, data| {
                            for ((user, hash, name), _, _) in data.drain(..) {
                                let name: String = name;
                                // Owned notes are a user's name or one of its event ids.
                                if user == ITEM_NOTE {
                                    names.insert(hash, &name);
                                    names.mark_item(hash);
                                } else if user != persona_dataflows::NO_ITEM && hash != user {
                                    names.insert_event_id(hash, &name);
                                } else {
                                    names.insert(hash, &name);
                                }
                            }
                        });
                    }
                },
            );
        (
            Announcer {
                announced: HashSet::default(),
                owned,
                shared,
            },
            installed,
        )
    }

    fn note(&mut self, owned: bool, user: u64, hash: u64, names: &Names) {
        // An item is announced as one even if its string was announced as another kind of id.
        let key = if user == ITEM_NOTE {
            hash.rotate_left(32)
        } else {
            hash
        };
        if hash == persona_dataflows::NO_ITEM || !self.announced.insert(key) {
            return;
        }
        if let Some(name) = names.get(hash) {
            let input = if owned {
                &mut self.owned
            } else {
                &mut self.shared
            };
            input.update((user, hash, name.to_string()), 1);
        }
    }

    /// Announces the strings of `event` this worker has not announced yet.
    pub fn event(&mut self, event: &Event, names: &Names) {
        self.note(true, event.user, event.user, names);
        if event.device.is_some() {
            self.note(true, event.user, event.id, names);
        }
        self.note(false, 0, event.kind, names);
        self.note(false, ITEM_NOTE, event.item, names);
    }

    /// Announces a catalog record's item and category.
    pub fn catalog(&mut self, item: u64, category: u64, names: &Names) {
        self.note(false, ITEM_NOTE, item, names);
        self.note(false, 0, category, names);
    }

    pub fn advance_to(&mut self, t: Time) {
        if t > *self.owned.time() {
            self.owned.advance_to(t);
            self.shared.advance_to(t);
        }
    }

    pub fn flush(&mut self) {
        self.owned.flush();
        self.shared.flush();
    }
}

/// `data`, each update held back until `installed` has completed its time: until then a
/// string it refers to may still be on its way to this process.
pub fn after_names<'s, D>(
    data: VecCollection<'s, Time, D>,
    installed: &StreamVec<'s, Time, ()>,
) -> VecCollection<'s, Time, D>
where
    D: differential_dataflow::Data,
{
    data.inner
        .binary_frontier(
            installed.clone(),
            Pipeline,
            Pipeline,
            "AfterNames",
            |_, _| {
                let mut held: Pending<(D, Time, isize)> = Pending::default();
                move |(input, _), (names, names_frontier), output| {
                    input.for_each(|cap, data| {
                        for (d, t, r) in data.drain(..) {
                            held.at(&cap, t).push((d, t, r));
                        }
                    });
                    names.for_each(|_, _| {});
                    if let Some(cap) = held.held.clone() {
                        let mut session = output.session(&cap);
                        while let Some((_, mut data)) =
                            held.next_complete(|t| !names_frontier.frontier().less_equal(t))
                        {
                            session.give_container(&mut data);
                        }
                    }
                    held.release();
                }
            },
        )
        .as_collection()
}

/// The maximum of one value offered by every worker of the cluster, computed through the
/// dataflow (so across processes too).
pub struct Agreement {
    input: Option<InputSession<Time, u64, isize>>,
    max: Rc<Cell<u64>>,
    probe: ProbeHandle<Time>,
}

impl Agreement {
    pub fn new(scope: Scope<'_, Time>) -> Agreement {
        let (input, offers) = scope.new_collection::<u64, isize>();
        let max = Rc::new(Cell::new(0u64));
        let seen = max.clone();
        let (probe, _) = offers
            .inner
            .broadcast()
            .inspect(move |(v, _, _)| seen.set(seen.get().max(*v)))
            .probe();
        Agreement {
            input: Some(input),
            max,
            probe,
        }
    }

    /// This worker's value; its last word.
    pub fn offer(&mut self, value: u64) {
        if let Some(mut input) = self.input.take() {
            input.update(value, 1);
            input.close();
        }
    }

    /// The maximum, once every worker has offered.
    pub fn result(&self) -> Option<u64> {
        self.probe.done().then(|| self.max.get())
    }

    pub fn offered(&self) -> bool {
        self.input.is_none()
    }
}

/// Shares the largest event `ts` each worker has parsed with every process, so that the event
/// clock moves alike everywhere: without it, a process whose sources went quiet would hold the
/// clock (and with it every process's progress) back at its own largest `ts`.
pub struct MaxShare {
    input: InputSession<Time, u64, isize>,
    sent: u64,
    /// Its own epochs: it feeds no view, and each new epoch pushes the exchange's buffers.
    epoch: Time,
}

impl MaxShare {
    /// `on_max` runs (on every worker) with every value any worker shares.
    pub fn new(scope: Scope<'_, Time>, on_max: impl Fn(u64) + 'static) -> MaxShare {
        let (input, shared) = scope.new_collection::<u64, isize>();
        shared
            .inner
            .broadcast()
            .inspect(move |(v, _, _)| on_max(*v));
        MaxShare {
            input,
            sent: 0,
            epoch: 0,
        }
    }

    /// Shares `max` if it is larger than what this worker shared before.
    pub fn offer(&mut self, max: u64) {
        if max > self.sent {
            self.sent = max;
            self.input.update(max, 1);
            self.epoch += 1;
            self.input.advance_to(self.epoch);
            self.input.flush();
        }
    }
}

static PEER_LOST: AtomicBool = AtomicBool::new(false);
static STOP_REQUESTED: AtomicBool = AtomicBool::new(false);
static FORMED: AtomicBool = AtomicBool::new(false);

/// Records that timely has connected every process (the workers run).
pub fn formed() {
    FORMED.store(true, Ordering::Release);
}

/// Whether this process of `cluster` still waits for the others to connect: timely blocks
/// the start until they do, so a stop then cannot go through the workers.
pub fn forming(cluster: Option<&Cluster>) -> bool {
    cluster.is_some() && !FORMED.load(Ordering::Acquire)
}

/// Whether this process has lost its connection to another process of the cluster.
pub fn peer_lost() -> bool {
    PEER_LOST.load(Ordering::Acquire)
}

/// Records that this process was asked to stop: a peer that goes away after that is no news.
pub fn stop_requested() {
    STOP_REQUESTED.store(true, Ordering::Release);
}

/// Whether this process was asked to stop before (or while) it lost a peer.
pub fn stopping_anyway() -> bool {
    STOP_REQUESTED.load(Ordering::Acquire)
}

fn lose(reason: &str) {
    if !PEER_LOST.swap(true, Ordering::AcqRel) && !stopping_anyway() {
        tracing::error!(
            "cluster: {reason}; timely has no failover, so this process stops too. Restart every process of the cluster: sources are read again from their start positions"
        );
    }
}

/// Watches the other processes' HTTP ports once the cluster has formed: a process that
/// stopped cleanly closes timely's connections without an error, and would otherwise leave
/// this one waiting forever for its progress. Three failed checks in a row (a second apart)
/// count as lost. `wake` is called once a peer is lost, to let the workers see it.
pub fn watch_peers(
    cluster: &Cluster,
    stopping: impl Fn() -> bool + Send + 'static,
    wake: impl Fn() + Send + 'static,
) {
    let peers: Vec<(usize, String)> = (0..cluster.processes())
        .filter(|p| *p != cluster.process)
        .map(|p| (p, cluster.http[p].clone()))
        .collect();
    let spawned = std::thread::Builder::new()
        .name("cluster-watch".into())
        .spawn(move || {
            let mut failures = vec![0u32; peers.len()];
            while !stopping() && !peer_lost() {
                std::thread::sleep(std::time::Duration::from_secs(1));
                for (i, (p, address)) in peers.iter().enumerate() {
                    let up = std::net::ToSocketAddrs::to_socket_addrs(address.as_str())
                        .ok()
                        .and_then(|mut a| a.next())
                        .is_some_and(|a| {
                            std::net::TcpStream::connect_timeout(
                                &a,
                                std::time::Duration::from_secs(1),
                            )
                            .is_ok()
                        });
                    failures[i] = if up { 0 } else { failures[i] + 1 };
                    if failures[i] >= 3 && !stopping() {
                        lose(&format!("process {p} ({address}) stopped answering"));
                        wake();
                        return;
                    }
                }
            }
        });
    if let Err(e) = spawned {
        tracing::warn!("cannot start the cluster watch thread: {e}");
    }
}

/// Turns timely's panics on a lost connection into one clear error line and the
/// [`peer_lost`] flag; the engine then reports not ready and stops. Other panics keep the
/// default report.
pub fn watch_for_peer_loss() {
    let default = std::panic::take_hook();
    std::panic::set_hook(Box::new(move |info| {
        let message = info
            .payload()
            .downcast_ref::<String>()
            .map(String::as_str)
            .or_else(|| info.payload().downcast_ref::<&str>().copied())
            .unwrap_or("");
        let network = message.contains("timely communication error")
            || message.contains("MergeQueue")
            || message.contains("Send thread panic")
            || message.contains("Recv thread panic");
        if network || peer_lost() {
            lose(&format!(
                "lost the connection to another process ({message})"
            ));
            return;
        }
        default(info)
    }));
}
