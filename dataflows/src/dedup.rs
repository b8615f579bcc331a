//! De-duplicates events by `event_id`, keyed by the event id hash.
//!
//! An event id is remembered for `horizon` of engine-clock time after it was first accepted,
//! or after its `ts` if that is later (a Kafka backlog enters events at its slowest
//! partition's clock, behind their ts); within that horizon a redelivery changes nothing.
//! The output is an all-time collection: forgetting an id never retracts its event.
//!
//! # Notes
//! * Tie rule for conflicting duplicates (same id, different content): the smallest
//!   [`Event`] (by `ts` first) is kept, whatever the arrival order. If a smaller one arrives
//!   after a larger one was emitted, the larger is retracted and the smaller inserted.
//! * Input times are processed in time order once complete, so the kept event at any time
//!   is the one a from-scratch run over the same prefix would keep.
//! * A duplicate arriving more than `horizon` after the first copy is counted again: the
//!   horizon is what bounds this operator's memory.
//! * A copy counts as conflicting when it is a version of its id (content) not seen before, so
//!   that the count (versions beyond the first) does not depend on the arrival order or on how
//!   ids spread over workers. The versions are kept only for ids that have more than one.
//!
//! Cost: O(1) hash-map work per event (O(log n) more for an id entered before its ts); memory:
//! one entry per id within its horizon.

use crate::event::{Event, Pending, Time};
use differential_dataflow::{AsCollection, VecCollection};
use foldhash::HashMap;
use std::cmp::Reverse;
use std::collections::hash_map::Entry as Slot;
use std::collections::{BinaryHeap, VecDeque};
use std::sync::Arc;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;

/// Told about every de-duplication decision (the I/O shell counts them in its metrics).
pub trait DedupObserver: Send + Sync {
    /// `n` new event ids were accepted (told once per batch: a shared counter bumped per event
    /// from every worker costs more than the count).
    fn accepted(&self, n: u64);
    /// A copy of a known id was dropped or replaced the kept event; `conflicting` if it is a
    /// version of the id not seen before.
    fn duplicate(&self, conflicting: bool);
}

struct Entry {
    kept: Event,
}

/// Keeps one event per id, see the module doc.
pub fn dedup<'s>(
    events: VecCollection<'s, Time, Event>,
    horizon: u64,
    stats: Arc<dyn DedupObserver>,
) -> VecCollection<'s, Time, Event> {
    let pact = Exchange::new(|update: &(Event, Time, isize)| update.0.id);
    events
        .inner
        .unary_frontier(pact, "Dedup", move |_cap, _info| {
            let mut pending: Pending<Event> = Pending::default();
            let mut seen: HashMap<u64, Entry> = HashMap::default();
            // Every version seen of each id that has more than one.
            let mut versions: HashMap<u64, Vec<Event>> = HashMap::default();
            let mut expiry = Expiry::default();
            move |(input, frontier), output| {
                input.for_each(|cap, data| {
                    for (event, time, diff) in data.drain(..) {
                        if diff <= 0 {
                            continue; // raw events are only ever inserted
                        }
                        let slot = pending.at(&cap, time);
                        for _ in 0..diff {
                            slot.push(event);
                        }
                    }
                });
                // Process complete times, oldest first.
                if let Some(cap) = pending.held.clone() {
                    let mut session = output.session(&cap);
                    while let Some((time, mut batch)) =
                        pending.next_complete(|t| !frontier.less_equal(t))
                    {
                        // A copy at `time` counts again if its id's horizon ended at or before it,
                        // however the times were batched.
                        expiry.forget((&mut seen, &mut versions), horizon, |expires| {
                            expires <= time
                        });
                        batch.sort_unstable();
                        let mut accepted = 0;
                        for event in batch {
                            match seen.entry(event.id) {
                                Slot::Vacant(slot) => {
                                    slot.insert(Entry { kept: event });
                                    expiry
                                        .fifo
                                        .push_back((time.saturating_add(horizon), event.id));
                                    accepted += 1;
                                    session.give((event, time, 1isize));
                                }
                                Slot::Occupied(mut slot) => {
                                    let entry = slot.get_mut();
                                    let new_version = entry.kept != event && {
                                        let known = versions
                                            .entry(event.id)
                                            .or_insert_with(|| vec![entry.kept]);
                                        let new = !known.contains(&event);
                                        if new {
                                            known.push(event);
                                        }
                                        new
                                    };
                                    stats.duplicate(new_version);
                                    // Conflicting and smaller: the tie rule says it replaces the kept one.
                                    if event < entry.kept {
                                        session.give((entry.kept, time, -1isize));
                                        session.give((event, time, 1isize));
                                        entry.kept = event;
                                    }
                                }
                            }
                        }
                        if accepted > 0 {
                            stats.accepted(accepted);
                        }
                    }
                }
                pending.release();
                // Forget the ids no time still to come remembers.
                expiry.forget((&mut seen, &mut versions), horizon, |expires| {
                    !frontier.frontier().iter().any(|f| *f < expires)
                });
            }
        })
        .as_collection()
}

/// When ids are forgotten: at their entry time plus the horizon, in entry order; an id whose
/// `ts` is later than its entry time (a Kafka backlog's clock follows its slowest partition)
/// then waits in `later` until its ts plus the horizon.
#[derive(Default)]
struct Expiry {
    fifo: VecDeque<(Time, u64)>,
    later: BinaryHeap<Reverse<(Time, u64)>>,
}

impl Expiry {
    /// Forgets the ids whose horizon has `ended`.
    fn forget(
        &mut self,
        (seen, versions): (&mut HashMap<u64, Entry>, &mut HashMap<u64, Vec<Event>>),
        horizon: u64,
        ended: impl Fn(Time) -> bool,
    ) {
        while let Some(&(expires, id)) = self.fifo.front() {
            if !ended(expires) {
                break;
            }
            self.fifo.pop_front();
            match seen.get(&id).map(|e| e.kept.ts.saturating_add(horizon)) {
                Some(by_ts) if !ended(by_ts) => self.later.push(Reverse((by_ts, id))),
                _ => {
                    seen.remove(&id);
                    versions.remove(&id);
                }
            }
        }
        while let Some(&Reverse((expires, id))) = self.later.peek() {
            if !ended(expires) {
                break;
            }
            self.later.pop();
            seen.remove(&id);
            versions.remove(&id);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use differential_dataflow::input::InputSession;
    use std::cell::RefCell;
    use std::rc::Rc;
    use timely::dataflow::operators::Inspect;

    struct Quiet;
    impl DedupObserver for Quiet {
        fn accepted(&self, _: u64) {}
        fn duplicate(&self, _conflicting: bool) {}
    }

    fn ev(id: u64, ts: u64) -> Event {
        Event {
            ts,
            user: 1,
            id,
            kind: 1,
            item: 0,
            value_bits: 0,
            device: None,
        }
    }

    /// `(id, ts)` entered at each engine time; returns the `(id, time)` of every accepted copy.
    /// `step_each`: the worker steps after every arrival, else only at the end (the frontier
    /// then passes every time at once).
    fn accepted(horizon: u64, arrivals: &[(u64, u64, u64)], step_each: bool) -> Vec<(u64, u64)> {
        let arrivals = arrivals.to_vec();
        timely::execute_directly(move |worker| {
            let out = Rc::new(RefCell::new(Vec::new()));
            let mut input = InputSession::<Time, Event, isize>::new();
            worker.dataflow(|scope| {
                let sink = out.clone();
                dedup(input.to_collection(scope), horizon, Arc::new(Quiet))
                    .inner
                    .inspect(move |(e, t, d)| {
                        if *d > 0 {
                            sink.borrow_mut().push((e.id, *t))
                        }
                    });
            });
            for &(time, id, ts) in &arrivals {
                input.advance_to(time);
                input.insert(ev(id, ts));
                if step_each {
                    input.flush();
                    worker.step();
                }
            }
            input.close();
            while worker.step() {}
            let mut v = out.borrow().clone();
            v.sort_by_key(|&(id, t)| (t, id));
            v
        })
    }

    /// Counts duplicates and conflicting ones.
    #[derive(Default)]
    struct Counts(std::sync::Mutex<(u64, u64)>);
    impl DedupObserver for Counts {
        fn accepted(&self, _: u64) {}
        fn duplicate(&self, conflicting: bool) {
            let mut c = self.0.lock().unwrap();
            c.0 += 1;
            c.1 += u64::from(conflicting);
        }
    }

    /// `(duplicates, conflicting)` of entering `copies` of one id, one engine time each.
    fn counted(copies: &[u64]) -> (u64, u64) {
        let copies = copies.to_vec();
        let counts = Arc::new(Counts::default());
        let observer = counts.clone();
        timely::execute_directly(move |worker| {
            let mut input = InputSession::<Time, Event, isize>::new();
            worker.dataflow(|scope| {
                dedup(input.to_collection(scope), 1_000, observer.clone());
            });
            for (time, &ts) in copies.iter().enumerate() {
                input.advance_to(time as u64);
                input.insert(ev(7, ts));
                input.flush();
                worker.step();
            }
            input.close();
            while worker.step() {}
        });
        let c = *counts.0.lock().unwrap();
        c
    }

    /// A copy conflicts when it is a version not seen before: the count does not depend on the
    /// order the copies arrive in (nor, then, on how a log's lines spread over workers).
    #[test]
    fn conflicting_copies_are_new_versions_whatever_the_order() {
        // Versions 10 (twice), 20 and 5: three duplicates, two versions beyond the first.
        let copies = [10, 20, 10, 5];
        let mut orders = vec![copies.to_vec()];
        for i in 0..copies.len() {
            for j in 0..copies.len() {
                let mut o = copies.to_vec();
                o.swap(i, j);
                orders.push(o);
            }
        }
        for order in orders {
            assert_eq!(counted(&order), (3, 2), "arrival order {order:?}");
        }
    }

    /// An id is remembered for the horizon after the later of its entry time and its ts: a
    /// Kafka backlog enters events at its slowest partition's clock, far behind their ts.
    #[test]
    fn an_id_is_remembered_for_the_horizon_after_its_entry_or_its_ts() {
        let arrivals = [
            (0, 1, 100),   // entered 90 before its ts: remembered until 110
            (0, 2, 5),     // remembered until 15
            (12, 2, 5),    // a copy within: dropped
            (50, 1, 100),  // within 100 + 10, though 50 after entry: dropped
            (20, 2, 5),    // after 15: counts again
            (120, 1, 100), // after 110: counts again
        ];
        let mut arrivals = arrivals.to_vec();
        arrivals.sort_by_key(|a| a.0);
        for step_each in [true, false] {
            assert_eq!(
                accepted(10, &arrivals, step_each),
                vec![(1, 0), (2, 0), (2, 20), (1, 120)],
                "step_each: {step_each}"
            );
        }
    }
}
