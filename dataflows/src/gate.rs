//! Admits each user's events through their erasures and consent, keyed by user.
//!
//! Two control records act on a user's events (both are parsed like events, but never counted):
//! * an **erasure** at `ts` removes every event of the user with `ts` at or before it, for good:
//!   they are retracted from every view downstream and no longer held here;
//! * a **consent** record at `ts` grants (`value` 1) or revokes (`value` 0) personalisation. A
//!   revocation clears the profile (events at or before it are withheld) and withholds later
//!   events until a grant with a larger `ts`.
//!
//! So an event is admitted iff `ts > max(last erasure, last revocation)` and, when the user has
//! a revocation, some grant lies in `(last revocation, ts]`. The rule depends on event time
//! only, so a replay gives the same result whatever the arrival order, late records included.
//! Control records are facts, idempotent by content: they bypass de-duplication, and a record
//! seen twice changes nothing. At equal `ts`, a revocation wins over a grant.
//!
//! The gate's state is readable between steps ([`GateState`]): it is exactly what a restart
//! needs to rebuild every view, so checkpoints copy it.
//!
//! Cost: O(1) per event (a push onto the user's held events); a control record costs O(the
//! user's held events). Memory: every held event (a user's events after their last erasure and
//! last revocation: the ones a later control record can still admit or withdraw), the erasure
//! time and the consent records of each user that has them.

use crate::event::{route_hash, Event, Time};
use differential_dataflow::{AsCollection, VecCollection};
use foldhash::HashMap;
use std::cell::RefCell;
use std::collections::{BTreeMap, BTreeSet};
use std::rc::Rc;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;

/// The event types that are control records, by name hash.
#[derive(Clone, Copy, Debug)]
pub struct ControlKinds {
    pub erasure: u64,
    pub consent: u64,
}

impl ControlKinds {
    pub fn is_control(&self, e: &Event) -> bool {
        e.kind == self.erasure || e.kind == self.consent
    }
}

/// What is known of one user's controls, and the events that may still be admitted.
#[derive(Default)]
struct UserGate {
    held: Vec<Event>,
    erased_to: Option<u64>,
    /// Consent records: (ts, granted). A revocation and a grant at one ts are both kept.
    consents: BTreeSet<(u64, bool)>,
}

impl UserGate {
    /// Events with `ts >= from` and `ts > to` are admitted (`None`: nothing is withheld).
    fn bounds(&self) -> (Option<u64>, u64) {
        let revoked = self
            .consents
            .iter()
            .rev()
            .find(|(_, granted)| !granted)
            .map(|(ts, _)| *ts);
        let to = match (self.erased_to, revoked) {
            (Some(a), Some(b)) => Some(a.max(b)),
            (a, b) => a.or(b),
        };
        // After a revocation, nothing until the first grant strictly after it.
        let from = match revoked {
            None => 0,
            Some(u64::MAX) => u64::MAX,
            Some(r) => self
                .consents
                .range((r + 1, false)..)
                .find(|(_, granted)| *granted)
                .map_or(u64::MAX, |(ts, _)| *ts),
        };
        (to, from)
    }

    fn admits(bounds: (Option<u64>, u64), e: &Event) -> bool {
        let (to, from) = bounds;
        to.is_none_or(|to| e.ts > to) && e.ts >= from
    }
}

enum Update {
    Event(Event, isize),
    Control(Event),
}

/// Splits control records from `raw` events: returns (ordinary events, control records).
pub fn split<'s>(
    raw: VecCollection<'s, Time, Event>,
    kinds: ControlKinds,
) -> (
    VecCollection<'s, Time, Event>,
    VecCollection<'s, Time, Event>,
) {
    let controls = raw.clone().filter(move |e| kinds.is_control(e));
    let events = raw.filter(move |e| !kinds.is_control(e));
    (events, controls)
}

/// This worker's gate state, readable between steps: what a restart needs to rebuild every view
/// of this worker's users.
#[derive(Clone, Default)]
pub struct GateState {
    users: Rc<RefCell<HashMap<u64, UserGate>>>,
}

impl GateState {
    /// Every held event and every control record in force, as records that, fed again as input
    /// (events through de-duplication, control records as controls), rebuild this state and so
    /// every view downstream. Events of every complete time are in it; later ones may be too.
    pub fn records(&self, kinds: ControlKinds) -> Vec<Event> {
        let users = self.users.borrow();
        let mut out = Vec::new();
        for (&user, gate) in users.iter() {
            out.extend_from_slice(&gate.held);
            let control = |kind, ts, value: f64| Event {
                ts,
                user,
                id: 0,
                kind,
                item: crate::NO_ITEM,
                value_bits: value.to_bits(),
                device: None,
            };
            if let Some(ts) = gate.erased_to {
                out.push(control(kinds.erasure, ts, 0.0));
            }
            for &(ts, granted) in &gate.consents {
                out.push(control(kinds.consent, ts, if granted { 1.0 } else { 0.0 }));
            }
        }
        out
    }
}

/// Admits `events` (de-duplicated) through `controls`, see the module doc. Both inputs are
/// exchanged by user; the output stays on the user's worker. The returned state is this
/// worker's share, for checkpoints.
pub fn gate<'s>(
    events: VecCollection<'s, Time, Event>,
    controls: VecCollection<'s, Time, Event>,
    kinds: ControlKinds,
) -> (VecCollection<'s, Time, Event>, GateState) {
    let state = GateState::default();
    let shared = state.users.clone();
    let by_user = || Exchange::new(|u: &(Event, Time, isize)| route_hash(u.0.user));
    let admitted = events
        .inner
        .binary_frontier(
            controls.inner,
            by_user(),
            by_user(),
            "Gate",
            move |_cap, _info| {
                let mut pending: BTreeMap<Time, (Capability<Time>, Vec<Update>)> = BTreeMap::new();
                let users = shared;
                let mut changes: Vec<(Event, isize)> = Vec::new();
                move |(events, events_frontier), (controls, controls_frontier), output| {
                    events.for_each(|cap, data| {
                        for (e, time, diff) in data.drain(..) {
                            let slot = pending
                                .entry(time)
                                .or_insert_with(|| (cap.delayed(&time, 0), Vec::new()));
                            slot.1.push(Update::Event(e, diff));
                        }
                    });
                    controls.for_each(|cap, data| {
                        for (e, time, diff) in data.drain(..) {
                            // Facts: a retraction (none is ever sent) would not undo one.
                            if diff > 0 {
                                let slot = pending
                                    .entry(time)
                                    .or_insert_with(|| (cap.delayed(&time, 0), Vec::new()));
                                slot.1.push(Update::Control(e));
                            }
                        }
                    });
                    while let Some(entry) = pending.first_entry() {
                        let t = entry.key();
                        if events_frontier.less_equal(t) || controls_frontier.less_equal(t) {
                            break;
                        }
                        let (time, (cap, mut batch)) = entry.remove_entry();
                        let mut users = users.borrow_mut();
                        // Controls first: this time's events are judged by this time's rules.
                        batch.sort_by_key(|u| matches!(u, Update::Event(..)));
                        for update in batch {
                            match update {
                                Update::Control(c) => {
                                    let user = users.entry(c.user).or_default();
                                    control(user, c, &kinds, &mut changes);
                                }
                                Update::Event(e, diff) => {
                                    let user = users.entry(e.user).or_default();
                                    let bounds = user.bounds();
                                    // Erased, or before the last revocation: never admitted
                                    // again (both only grow), so not held either.
                                    if bounds.0.is_some_and(|to| e.ts <= to) {
                                        continue;
                                    }
                                    if diff > 0 {
                                        user.held.extend(std::iter::repeat_n(e, diff as usize));
                                    } else {
                                        for _ in 0..diff.unsigned_abs() {
                                            if let Some(i) = user.held.iter().position(|h| *h == e)
                                            {
                                                user.held.swap_remove(i);
                                            }
                                        }
                                    }
                                    if UserGate::admits(bounds, &e) {
                                        changes.push((e, diff));
                                    }
                                }
                            }
                        }
                        if !changes.is_empty() {
                            let mut session = output.session(&cap);
                            for (e, diff) in changes.drain(..) {
                                session.give((e, time, diff));
                            }
                        }
                    }
                }
            },
        )
        .as_collection();
    (admitted, state)
}

/// Applies control record `c` to `user`: emits the admissions it withdraws and grants.
fn control(user: &mut UserGate, c: Event, kinds: &ControlKinds, changes: &mut Vec<(Event, isize)>) {
    let before = user.bounds();
    if c.kind == kinds.erasure {
        user.erased_to = Some(user.erased_to.map_or(c.ts, |t| t.max(c.ts)));
    } else {
        user.consents.insert((c.ts, c.value() > 0.0));
    }
    let after = user.bounds();
    if before == after {
        return;
    }
    for e in &user.held {
        match (UserGate::admits(before, e), UserGate::admits(after, e)) {
            (true, false) => changes.push((*e, -1)),
            (false, true) => changes.push((*e, 1)),
            _ => {}
        }
    }
    if let Some(to) = after.0 {
        user.held.retain(|e| e.ts > to);
        user.held.shrink_to_fit();
    }
}
