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
use std::cmp::Reverse;
use std::collections::BinaryHeap;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::vec::Map;
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

/// Moves every update to the next multiple of `refresh_ms` at or after its time (identity for
/// 0 or 1), held back until due: downstream then works once per refresh, however many updates
/// arrived in between.
pub fn coarsen<'s, D: differential_dataflow::Data>(
    updates: VecCollection<'s, Time, D>,
    refresh_ms: u64,
) -> VecCollection<'s, Time, D> {
    if refresh_ms <= 1 {
        return updates;
    }
    let rounded = updates
        .inner
        .map(move |(d, t, r)| (d, t.div_ceil(refresh_ms).saturating_mul(refresh_ms), r))
        .as_collection();
    release_when_due(rounded)
}
