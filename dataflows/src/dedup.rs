//! De-duplicates events by `event_id`, keyed by the event id hash.
//!
//! An event id is remembered for `horizon` of engine-clock time after it was first accepted;
//! within that horizon a redelivery changes nothing. The output is an all-time collection:
//! forgetting an id never retracts its event.
//!
//! # Notes
//! * Tie rule for conflicting duplicates (same id, different content): the smallest
//!   [`Event`] (by `ts` first) is kept, whatever the arrival order. If a smaller one arrives
//!   after a larger one was emitted, the larger is retracted and the smaller inserted.
//! * Input times are processed in time order once complete, so the kept event at any time
//!   is the one a from-scratch run over the same prefix would keep.
//! * A duplicate arriving more than `horizon` after the first copy is counted again: the
//!   horizon is what bounds this operator's memory.
//!
//! Cost: O(1) hash-map work per event; memory: one entry per id accepted within `horizon`.

use crate::event::{Event, PendingByTime, Time};
use differential_dataflow::{AsCollection, VecCollection};
use foldhash::HashMap;
use std::collections::{BTreeMap, VecDeque};
use std::sync::Arc;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;

/// Told about every de-duplication decision (the I/O shell counts them in its metrics).
pub trait DedupObserver: Send + Sync {
    /// A new event id was accepted.
    fn accepted(&self);
    /// A copy of a known id was dropped or replaced the kept event; `conflicting` if it differed.
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
            let mut pending: PendingByTime<Event> = BTreeMap::new();
            let mut seen: HashMap<u64, Entry> = HashMap::default();
            let mut expiry: VecDeque<(Time, u64)> = VecDeque::new();
            move |(input, frontier), output| {
                input.for_each(|cap, data| {
                    for (event, time, diff) in data.drain(..) {
                        if diff <= 0 {
                            continue; // raw events are only ever inserted
                        }
                        let slot = pending
                            .entry(time)
                            .or_insert_with(|| (cap.delayed(&time, 0), Vec::new()));
                        for _ in 0..diff {
                            slot.1.push(event);
                        }
                    }
                });
                // Process complete times, oldest first.
                while let Some(entry) = pending.first_entry() {
                    if frontier.less_equal(entry.key()) {
                        break;
                    }
                    let (time, (cap, mut batch)) = entry.remove_entry();
                    batch.sort_unstable();
                    let mut session = output.session(&cap);
                    for event in batch {
                        match seen.get_mut(&event.id) {
                            None => {
                                seen.insert(event.id, Entry { kept: event });
                                expiry.push_back((time.saturating_add(horizon), event.id));
                                stats.accepted();
                                session.give((event, time, 1isize));
                            }
                            Some(entry) => {
                                stats.duplicate(entry.kept != event);
                                // Conflicting and smaller: the tie rule says it replaces the kept one.
                                if event < entry.kept {
                                    session.give((entry.kept, time, -1isize));
                                    session.give((event, time, 1isize));
                                    entry.kept = event;
                                }
                            }
                        }
                    }
                }
                // Forget ids whose horizon has passed.
                while let Some(&(expires, id)) = expiry.front() {
                    if frontier.less_equal(&expires) {
                        break;
                    }
                    expiry.pop_front();
                    seen.remove(&id);
                }
            }
        })
        .as_collection()
}
