//! Maintains, per user, the events recent enough for any sliding window, keyed by user.
//!
//! Each event becomes a `(user, Recent { ts, type })` record, inserted when it arrives and
//! retracted at `ts + retention` (joined with its arrival time), retention being at least the
//! widest window. A profile read counts,
//! for each window `w`, the records with `now - w < ts <= now`; a record that is not yet or no
//! longer present could not count in any window at `now`, so the answer is exact for every
//! window width at every time, late events included.
//!
//! Future-dated updates wait in a time-ordered stash ([`release_when_due`]) and are handed on,
//! one message per frontier move, only when due; the arrangement's batcher would otherwise
//! re-scan every pending retraction each time the clock moves.
//!
//! Cost: two updates per event, O(log pending) each; memory: one record per event within the
//! widest window. A read costs O(the user's events within the widest window).

use crate::event::{Event, Time, UserKey};
use crate::profile::Feature;
use differential_dataflow::{AsCollection, VecCollection};
use foldhash::HashMap;
use std::cmp::Reverse;
use std::collections::{BTreeMap, BinaryHeap};
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;

pub fn windows<'s>(
    events: VecCollection<'s, Time, Event>,
    retention_ms: u64,
) -> VecCollection<'s, Time, (UserKey, Feature)> {
    let updates = events.join_function(move |e: Event| {
        let record = (
            UserKey(e.user),
            Feature::Recent {
                ts: e.ts,
                kind: e.kind,
            },
        );
        // Inserted on arrival (time 0 joins to the arrival time), retracted when too old.
        [
            (record, 0, 1isize),
            (record, e.ts.saturating_add(retention_ms), -1isize),
        ]
    });
    release_when_due(updates)
}

/// Passes updates through, holding back each one whose time is ahead of its message until
/// the input frontier reaches that time.
pub fn release_when_due<'s, D: differential_dataflow::Data>(
    updates: VecCollection<'s, Time, D>,
) -> VecCollection<'s, Time, D> {
    updates
        .inner
        .unary_frontier(Pipeline, "ReleaseWhenDue", |_cap, _info| {
            // One heap, not a map of vectors: most pending times are distinct milliseconds.
            let mut stash: BinaryHeap<Reverse<(Time, D, isize)>> = BinaryHeap::new();
            let mut held: Option<Capability<Time>> = None;
            move |(input, frontier), output| {
                input.for_each(|cap, data| {
                    let Some(&now) = cap.least() else { return };
                    let now_cap = cap.delayed(&now, 0);
                    let mut session = output.session(&now_cap);
                    for (d, t, r) in data.drain(..) {
                        if t <= now {
                            session.give((d, t, r));
                        } else {
                            stash.push(Reverse((t, d, r)));
                            if held.as_ref().is_none_or(|h| t < *h.time()) {
                                held = Some(cap.delayed(&t, 0));
                            }
                        }
                    }
                });
                // Release every stashed update whose time the frontier has reached, in one
                // message at the earliest of them (each update keeps its own, later or equal, time).
                let due = |t: &Time| !frontier.frontier().iter().any(|f| f < t);
                if let Some(h) = held.as_mut() {
                    if stash.peek().is_some_and(|Reverse((t, _, _))| due(t)) {
                        let mut session = output.session(&*h);
                        while stash.peek().is_some_and(|Reverse((t, _, _))| due(t)) {
                            if let Some(Reverse((t, d, r))) = stash.pop() {
                                session.give((d, t, r));
                            }
                        }
                    }
                }
                match stash.peek() {
                    Some(Reverse((next, _, _))) => {
                        if let Some(h) = held.as_mut() {
                            if h.time() < next {
                                h.downgrade(next);
                            }
                        }
                    }
                    None => held = None,
                }
            }
        })
        .as_collection()
}

/// Refresh ticks: a record at time `t` releases the updates [`refreshed`] holds up to `t`.
pub type Ticks<'s> = VecCollection<'s, Time, ()>;

/// Holds updates back until the first refresh tick at or after their time, then hands them on
/// at the tick's time, consolidated; identity without ticks. Downstream then works once per
/// tick, however many updates arrived in between, and updates that cancel within one refresh
/// (a user's recent set churning) never leave this operator.
///
/// Memory: the consolidated updates since the last tick, one map per distinct time that a
/// pending tick could still separate from the others.
pub fn refreshed<'s, D>(
    updates: VecCollection<'s, Time, D>,
    ticks: Option<&Ticks<'s>>,
) -> VecCollection<'s, Time, D>
where
    D: differential_dataflow::Data + std::hash::Hash,
{
    let Some(ticks) = ticks else {
        return updates;
    };
    updates
        .inner
        .binary_frontier(
            ticks.inner.clone(),
            Pipeline,
            Pipeline,
            "Refresh",
            |_cap, _info| {
                let mut stash: BTreeMap<Time, HashMap<D, isize>> = BTreeMap::new();
                let mut pending: BTreeMap<Time, Capability<Time>> = BTreeMap::new();
                move |(data, data_frontier), (tick, tick_frontier), output| {
                    data.for_each(|_cap, batch| {
                        for (d, t, r) in batch.drain(..) {
                            *stash.entry(t).or_default().entry(d).or_insert(0) += r;
                        }
                    });
                    tick.for_each(|cap, batch| {
                        for ((), t, _) in batch.drain(..) {
                            pending.entry(t).or_insert_with(|| cap.delayed(&t, 0));
                        }
                    });
                    // A tick at `t` fires once every update at or before `t` has arrived.
                    while let Some(entry) = pending.first_entry() {
                        let t = *entry.key();
                        if data_frontier.frontier().less_equal(&t) {
                            break;
                        }
                        let cap = entry.remove();
                        let later = stash.split_off(&t.saturating_add(1));
                        let due = std::mem::replace(&mut stash, later);
                        let mut session = output.session(&cap);
                        for (d, r) in merge(due.into_values()) {
                            if r != 0 {
                                session.give((d, t, r));
                            }
                        }
                    }
                    // Times that no tick can separate any more (none pending between them, and
                    // future ticks come at or after the tick frontier) share one map.
                    let bound = tick_frontier
                        .frontier()
                        .iter()
                        .min()
                        .copied()
                        .unwrap_or(Time::MAX);
                    let keys: Vec<Time> = stash.range(..=bound).map(|(k, _)| *k).collect();
                    for pair in keys.windows(2) {
                        let (a, b) = (pair[0], pair[1]);
                        if pending.range(a..b).next().is_none() {
                            if let (Some(x), Some(y)) = (stash.remove(&a), stash.remove(&b)) {
                                stash.insert(b, merge([x, y]));
                            }
                        }
                    }
                }
            },
        )
        .as_collection()
}

/// Sums maps of diffs into the largest of them.
fn merge<D: Eq + std::hash::Hash>(
    maps: impl IntoIterator<Item = HashMap<D, isize>>,
) -> HashMap<D, isize> {
    let mut maps: Vec<_> = maps.into_iter().collect();
    let Some(largest) = (0..maps.len()).max_by_key(|i| maps[*i].len()) else {
        return HashMap::default();
    };
    let mut into = maps.swap_remove(largest);
    for map in maps {
        for (d, r) in map {
            *into.entry(d).or_insert(0) += r;
        }
    }
    into
}
