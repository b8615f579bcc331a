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

use crate::event::{hold_at, release_to, Event, Time, UserKey};
use crate::profile::Feature;
use differential_dataflow::consolidation::consolidate;
use differential_dataflow::{AsCollection, VecCollection};
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
        // Sealed retractions (see `gate`) stand for events older than every window: none.
        [
            (record, 0, 1isize),
            (record, e.ts.saturating_add(retention_ms), -1isize),
        ]
        .into_iter()
        .take(if e.is_sealed() { 0 } else { 2 })
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
                            hold_at(&mut held, &cap, t);
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
                release_to(&mut held, stash.peek().map(|Reverse((next, _, _))| next));
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
/// Memory: the updates since the last tick, consolidated whenever they double, one list per
/// distinct time that a pending tick could still separate from the others. Sorting (rather
/// than a hash map) keeps a replay's tens of millions of pair updates cache-friendly.
pub fn refreshed<'s, D>(
    updates: VecCollection<'s, Time, D>,
    ticks: Option<&Ticks<'s>>,
) -> VecCollection<'s, Time, D>
where
    D: differential_dataflow::Data,
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
                let mut stash: BTreeMap<Time, Consolidating<D>> = BTreeMap::new();
                let mut pending: BTreeMap<Time, Capability<Time>> = BTreeMap::new();
                move |(data, data_frontier), (tick, tick_frontier), output| {
                    data.for_each(|_cap, batch| {
                        for (d, t, r) in batch.drain(..) {
                            stash.entry(t).or_default().push(d, r);
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
                        let mut all = Consolidating::default();
                        for list in due.into_values() {
                            all.absorb(list);
                        }
                        let mut session = output.session(&cap);
                        for (d, r) in all.finish() {
                            session.give((d, t, r));
                        }
                    }
                    // Times that no tick can separate any more (none pending between them, and
                    // future ticks come at or after the tick frontier) share one list.
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
                            if let (Some(mut x), Some(y)) = (stash.remove(&a), stash.remove(&b)) {
                                x.absorb(y);
                                stash.insert(b, x);
                            }
                        }
                    }
                }
            },
        )
        .as_collection()
}

/// Updates summed by sorting: the list is consolidated each time it doubles past its last
/// consolidated length, so it stays within about twice its distinct records.
struct Consolidating<D> {
    updates: Vec<(D, isize)>,
    clean: usize,
}

impl<D> Default for Consolidating<D> {
    fn default() -> Self {
        Consolidating {
            updates: Vec::new(),
            clean: 0,
        }
    }
}

impl<D: Ord> Consolidating<D> {
    /// Below this many updates a list is left as it is (tests consolidate early and often).
    const SMALL: usize = if cfg!(test) { 4 } else { 1024 };

    fn push(&mut self, d: D, r: isize) {
        self.updates.push((d, r));
        self.tidy();
    }

    fn absorb(&mut self, other: Consolidating<D>) {
        if other.updates.len() > self.updates.len() {
            let mine = std::mem::replace(self, other);
            self.updates.extend(mine.updates);
        } else {
            self.updates.extend(other.updates);
        }
        self.tidy();
    }

    fn tidy(&mut self) {
        if self.updates.len() >= Self::SMALL.max(2 * self.clean) {
            // The consolidated prefix is one sorted run: the stable sort merges the tail into it.
            consolidate(&mut self.updates);
            self.clean = self.updates.len();
        }
    }

    fn finish(mut self) -> Vec<(D, isize)> {
        consolidate(&mut self.updates);
        self.updates
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use differential_dataflow::input::InputSession;
    use proptest::prelude::*;
    use std::cell::RefCell;
    use std::rc::Rc;
    use timely::dataflow::operators::probe::Handle;
    use timely::dataflow::operators::{Inspect, Probe};

    /// `(data, time, diff)` sent at `time`, ticks at their times, stepping the worker `steps`
    /// times after each time so that batches split differently; returns what left the operator.
    fn run(updates: &[(u8, u64, isize)], ticks: &[u64], steps: &[u8]) -> Vec<(u8, u64, isize)> {
        timely::execute_directly({
            let updates = updates.to_vec();
            let ticks = ticks.to_vec();
            let steps = steps.to_vec();
            move |worker| {
                let out = Rc::new(RefCell::new(Vec::new()));
                let mut data = InputSession::<Time, u8, isize>::new();
                let mut tick = InputSession::<Time, (), isize>::new();
                let probe = Handle::new();
                worker.dataflow(|scope| {
                    let ticks = tick.to_collection(scope);
                    let sink = out.clone();
                    refreshed(data.to_collection(scope), Some(&ticks))
                        .inner
                        .inspect(move |x| sink.borrow_mut().push(*x))
                        .probe_with(&probe);
                });
                let end = 1 + updates
                    .iter()
                    .map(|u| u.1)
                    .chain(ticks.iter().copied())
                    .max()
                    .unwrap_or(0);
                for t in 0..end {
                    data.advance_to(t);
                    tick.advance_to(t);
                    for (d, _, r) in updates.iter().filter(|u| u.1 == t) {
                        data.update(*d, *r);
                    }
                    if ticks.contains(&t) {
                        tick.insert(());
                    }
                    data.flush();
                    tick.flush();
                    for _ in 0..steps[t as usize % steps.len()] {
                        worker.step();
                    }
                }
                drop((data, tick));
                while worker.step() {}
                let mut got = out.borrow().clone();
                got.sort();
                got
            }
        })
    }

    proptest! {
        #[test]
        fn updates_leave_at_the_first_tick_at_or_after_them_consolidated(
            updates in proptest::collection::vec((0u8..6, 0u64..30, -2isize..3), 0..80),
            ticks in proptest::collection::btree_set(0u64..35, 0..6),
            steps in proptest::collection::vec(0u8..3, 1..5),
        ) {
            let ticks: Vec<u64> = ticks.into_iter().collect();
            let mut expected: BTreeMap<(u8, u64), isize> = BTreeMap::new();
            for (d, t, r) in &updates {
                // Updates after the last tick are still held at the end.
                if let Some(due) = ticks.iter().find(|k| **k >= *t) {
                    *expected.entry((*d, *due)).or_insert(0) += r;
                }
            }
            let expected: Vec<(u8, u64, isize)> = expected
                .into_iter()
                .filter(|(_, r)| *r != 0)
                .map(|((d, t), r)| (d, t, r))
                .collect();
            prop_assert_eq!(run(&updates, &ticks, &steps), expected);
        }
    }
}
