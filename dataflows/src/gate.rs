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
//! The gate's state is readable between steps ([`GateState`]): it is what a restart needs to
//! rebuild every view, so checkpoints copy it (with a retention, together with the basics'
//! sealed parts, which the gate's sealed counts cannot rebuild). A checkpoint's sealed records
//! come back as control records and restore the sealed counts.
//!
//! # Retention (`retention: Some(r)`)
//! At engine time `t` the **seal point** is `t - r`. An event (or a grant) with `ts` at or
//! before the seal point when it reaches the gate is *too late*: it is not admitted, and the
//! [`LateObserver`] hears of it (the shell dead-letters it). Held events at or before the seal
//! point are **sealed**: admitted ones are folded into per-user counts by (type, item) with their
//! summed value, and by device, which is all the all-time views need to retract them (so this
//! grows with the items a user touched, not with their events); withheld ones are dropped (only
//! a too-late grant could still admit them). Sealing is lazy (a time-ordered queue visits a user
//! somewhat after its oldest event passes the seal point) but always completed for a user before
//! a control record or a retraction of theirs is applied, so what is sealed at `t` is exactly
//! "the admitted events with `ts <= t - r`", on every worker, whatever the schedule.
//!
//! An erasure or revocation that withdraws any sealed event withdraws all of them (the sealed
//! part has no timestamps to cut at): it emits retraction records whose types, items, devices
//! and values add up to the sealed events', each an event with [`SEALED_ID`] as its id and `ts` 0
//! ([`Event::is_sealed`]); a record's value is summed nanos ([`Event::value_nanos`]). No view
//! reads the pairing of type and item with device, so any pairing that adds up is exact. For a
//! control record stamped after the seal point, which covers everything sealed, that is exact;
//! only control records older than the retention over-erase (the safe side).
//!
//! Cost: O(1) per event (a push onto the user's held events); a control record costs O(the
//! user's held events and sealed (type, item) pairs); sealing costs O(the user's held events) per visit, a
//! visit at most every `r / 16` of engine time per user. Memory: every held event (a user's
//! events after their last erasure and last revocation, and within the retention when it is
//! set), the sealed counts, the erasure time and the consent records of each user that has them.

use crate::event::{route_hash, Device, Event, Pending, Time, SEALED_ID};
use differential_dataflow::{AsCollection, VecCollection};
use foldhash::HashMap;
use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BTreeSet, BinaryHeap};
use std::rc::Rc;
use std::sync::Arc;
use timely::dataflow::channels::pact::Exchange;
use timely::dataflow::operators::generic::Operator;

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

/// Told about the records the gate turns away because they arrived later than the retention
/// (the I/O shell counts and dead-letters them).
pub trait LateObserver: Send + Sync {
    /// `event` (an event or a consent grant) has `ts <= seal`, the seal point at its arrival.
    fn too_late(&self, event: &Event, seal: u64);
}

/// A user's sealed events, reduced to what the all-time views read of them: how many of each
/// (type, item) with their summed value, and how many of each device. Keeping the two apart
/// (rather than counting by type, item, device and value) bounds this by the items a user
/// touched, not by their purchases' distinct prices.
#[derive(Default)]
struct Sealed {
    /// (type, item) → (events, summed value in nanos).
    items: HashMap<(u64, u64), (u64, i128)>,
    /// Events by device: index 0 is no device, then [`Device`] in order.
    devices: [u64; 5],
    /// The oldest sealed `ts`: a control record withdrawing it reaches into the sealed part.
    min_ts: u64,
}

fn device_index(device: Option<Device>) -> usize {
    match device {
        None => 0,
        Some(Device::Desktop) => 1,
        Some(Device::Mobile) => 2,
        Some(Device::Other) => 3,
        Some(Device::Tablet) => 4,
    }
}

const DEVICES: [Option<Device>; 5] = [
    None,
    Some(Device::Desktop),
    Some(Device::Mobile),
    Some(Device::Other),
    Some(Device::Tablet),
];

impl Sealed {
    fn add(&mut self, e: &Event) {
        let entry = self.items.entry((e.kind, e.item)).or_insert((0, 0));
        entry.0 += 1;
        entry.1 = entry.1.saturating_add(e.value_nanos());
        self.devices[device_index(e.device)] += 1;
        self.min_ts = self.min_ts.min(e.ts);
    }

    /// Takes up to `n` events like `e` out (same type, item and device); how many.
    fn take(&mut self, e: &Event, n: u64) -> u64 {
        let d = device_index(e.device);
        let Some(entry) = self.items.get_mut(&(e.kind, e.item)) else {
            return 0;
        };
        let taken = n.min(entry.0).min(self.devices[d]);
        entry.0 -= taken;
        entry.1 = (entry.1 - e.value_nanos().saturating_mul(taken as i128)).max(0);
        self.devices[d] -= taken;
        if entry.0 == 0 {
            self.items.remove(&(e.kind, e.item));
        }
        taken
    }

    fn is_empty(&self) -> bool {
        self.items.is_empty()
    }

    /// Adds `n` sealed events as one of [`Sealed::records`] describes them (a restore).
    fn add_record(&mut self, e: &Event, n: u64) {
        let entry = self.items.entry((e.kind, e.item)).or_insert((0, 0));
        entry.0 += n;
        entry.1 = entry
            .1
            .saturating_add(e.value_nanos().saturating_mul(n as i128));
        self.devices[device_index(e.device)] += n;
        self.min_ts = self.min_ts.min(e.ts);
    }

    /// Retractions of every sealed event of `user`: records whose types, items, devices and
    /// summed values add up to the sealed ones' (the all-time views read nothing else).
    fn retractions(self, user: u64) -> Vec<(Event, isize)> {
        self.records(user, 0)
            .into_iter()
            .map(|(e, n)| (e, -(n as isize)))
            .collect()
    }

    /// The sealed events of `user` as records stamped `ts`, with their counts: each (type,
    /// item) is paired with devices in turn; its summed value rides on one record
    /// ([`Event::value_nanos`]), in `u64::MAX`-nanos pieces if it must.
    fn records(&self, user: u64, ts: u64) -> Vec<(Event, u64)> {
        let mut items: Vec<((u64, u64), (u64, i128))> =
            self.items.iter().map(|(k, v)| (*k, *v)).collect();
        items.sort_unstable();
        let mut devices = self.devices;
        let mut d = 0;
        let mut out = Vec::new();
        let mut emit =
            |kind: u64, item: u64, mut n: u64, nanos: u64, out: &mut Vec<(Event, u64)>| {
                while n > 0 {
                    while d < devices.len() - 1 && devices[d] == 0 {
                        d += 1;
                    }
                    // The device counts add up to the events; were they ever short, the rest
                    // would go without a device rather than be lost.
                    let m = if devices[d] == 0 {
                        n
                    } else {
                        n.min(devices[d])
                    };
                    devices[d] = devices[d].saturating_sub(m);
                    let event = Event {
                        ts,
                        user,
                        id: SEALED_ID,
                        kind,
                        item,
                        value_bits: nanos,
                        device: DEVICES[d],
                    };
                    out.push((event, m));
                    n -= m;
                }
            };
        for ((kind, item), (mut n, nanos)) in items {
            let mut nanos = u128::try_from(nanos).unwrap_or(0);
            // One record per piece of the summed value, then the rest with none.
            while nanos > 0 && n > 0 {
                let piece = u64::try_from(nanos).unwrap_or(u64::MAX);
                emit(kind, item, 1, piece, &mut out);
                nanos -= u128::from(piece);
                n -= 1;
            }
            emit(kind, item, n, 0, &mut out);
        }
        out
    }
}

/// What is known of one user's controls, and the events that may still be admitted.
#[derive(Default)]
struct UserGate {
    held: Vec<Event>,
    erased_to: Option<u64>,
    /// Consent records: (ts, granted). A revocation and a grant at one ts are both kept.
    consents: BTreeSet<(u64, bool)>,
    sealed: Option<Box<Sealed>>,
    /// Whether the seal queue has an entry for this user.
    queued: bool,
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
        Self::admits_ts(bounds, e.ts)
    }

    fn admits_ts(bounds: (Option<u64>, u64), ts: u64) -> bool {
        let (to, from) = bounds;
        to.is_none_or(|to| ts > to) && ts >= from
    }

    /// Seals the held events with `ts <= seal` (admitted ones into counts, withheld ones away).
    fn seal(&mut self, seal: u64) {
        if !self.held.iter().any(|e| e.ts <= seal) {
            return;
        }
        let bounds = self.bounds();
        let mut kept = Vec::with_capacity(self.held.len());
        for e in self.held.drain(..) {
            if e.ts > seal {
                kept.push(e);
            } else if Self::admits(bounds, &e) {
                self.sealed
                    .get_or_insert_with(|| {
                        Box::new(Sealed {
                            min_ts: e.ts,
                            ..Sealed::default()
                        })
                    })
                    .add(&e);
            }
        }
        self.held = kept;
    }

    /// The oldest held `ts`.
    fn oldest(&self) -> Option<u64> {
        self.held.iter().map(|e| e.ts).min()
    }
}

/// How much later than its seal point a user with held events is visited: sealing then moves
/// a batch of events at once instead of rescanning the held events for every one.
fn seal_slack(retention: u64) -> u64 {
    (retention / 16).max(1)
}

enum Update {
    Control(Event),
    /// Sealed events restored from a checkpoint, and how many.
    Sealed(Event, u64),
    Event(Event, isize),
}

/// Splits control records from `raw` events: returns (ordinary events, control records). The
/// sealed records of a checkpoint ([`Event::is_sealed`]) go with the control records: they
/// bypass de-duplication (they all share one id) and restore the gate's sealed counts.
pub fn split<'s>(
    raw: VecCollection<'s, Time, Event>,
    kinds: ControlKinds,
) -> (
    VecCollection<'s, Time, Event>,
    VecCollection<'s, Time, Event>,
) {
    let controls = raw
        .clone()
        .filter(move |e| kinds.is_control(e) || e.is_sealed());
    let events = raw.filter(move |e| !kinds.is_control(e) && !e.is_sealed());
    (events, controls)
}

/// This worker's gate state, readable between steps: what a restart needs to rebuild every view
/// of this worker's users.
#[derive(Clone, Default)]
pub struct GateState {
    users: Rc<RefCell<HashMap<u64, UserGate>>>,
    /// The latest time applied.
    applied: Rc<Cell<Option<Time>>>,
    retention_ms: Option<u64>,
}

impl GateState {
    /// Whether it seals (a retention is set).
    pub fn seals(&self) -> bool {
        self.retention_ms.is_some()
    }

    /// The latest time the gate applied (`None`: none yet).
    pub fn applied(&self) -> Option<Time> {
        self.applied.get()
    }

    /// With a retention: seals every user's held events up to the seal point of the latest
    /// time applied, as the gate's own visits would, and returns that point. A checkpoint
    /// seals the basics to the same point (see [`crate::basics::BasicsState::sealed_parts`]).
    pub fn seal_all(&self) -> Option<u64> {
        let seal = self.applied.get()?.checked_sub(self.retention_ms?)?;
        let mut users = self.users.borrow_mut();
        for gate in users.values_mut() {
            gate.seal(seal);
        }
        users.retain(|_, gate| !gate.is_empty());
        Some(seal)
    }

    /// Every user's sealed events, as sealed records ([`Event::is_sealed`]) stamped with the
    /// oldest sealed `ts`, and their counts. Fed again as control records at the restore time,
    /// they restore the sealed counts and add the sealed events to every all-time view.
    pub fn sealed_records(&self) -> Vec<(Event, u64)> {
        let users = self.users.borrow();
        let mut out = Vec::new();
        for (&user, gate) in users.iter() {
            if let Some(sealed) = &gate.sealed {
                out.extend(sealed.records(user, sealed.min_ts));
            }
        }
        out
    }

    /// Every held event and every control record in force, as records that, fed again as input
    /// (events through de-duplication, control records as controls), rebuild this state and so
    /// every view downstream. Events of every complete time are in it; later ones may be too.
    /// Sealed events are not (their detail is gone): see [`GateState::sealed_records`].
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

/// How long the gate keeps event detail, and who hears of records later than that.
#[derive(Clone)]
pub struct Retention {
    pub retention_ms: u64,
    pub late: Arc<dyn LateObserver>,
    /// The time a checkpoint's records are fed at: they were admitted before, so none of them
    /// is too late, whatever the restore's seal point.
    pub restore_time: Option<Time>,
}

/// Admits `events` (de-duplicated) through `controls`, see the module doc. Both inputs are
/// exchanged by user; the output stays on the user's worker. The returned state is this
/// worker's share, for checkpoints.
pub fn gate<'s>(
    events: VecCollection<'s, Time, Event>,
    controls: VecCollection<'s, Time, Event>,
    kinds: ControlKinds,
    retention: Option<Retention>,
) -> (VecCollection<'s, Time, Event>, GateState) {
    let state = GateState {
        retention_ms: retention.as_ref().map(|r| r.retention_ms),
        ..GateState::default()
    };
    let shared = state.users.clone();
    let applied = state.applied.clone();
    let by_user = || Exchange::new(|u: &(Event, Time, isize)| route_hash(u.0.user));
    let admitted = events
        .inner
        .binary_frontier(
            controls.inner,
            by_user(),
            by_user(),
            "Gate",
            move |_cap, _info| {
                let mut pending: Pending<Update> = Pending::default();
                let users = shared;
                let mut changes: Vec<(Event, isize)> = Vec::new();
                // (due time, user): when to visit a user to seal its oldest held events.
                let mut queue: BinaryHeap<Reverse<(Time, u64)>> = BinaryHeap::new();
                move |(events, events_frontier), (controls, controls_frontier), output| {
                    events.for_each(|cap, data| {
                        for (e, time, diff) in data.drain(..) {
                            pending.at(&cap, time).push(Update::Event(e, diff));
                        }
                    });
                    controls.for_each(|cap, data| {
                        for (e, time, diff) in data.drain(..) {
                            // Facts: a retraction (none is ever sent) would not undo one.
                            if diff > 0 {
                                pending.at(&cap, time).push(if e.is_sealed() {
                                    Update::Sealed(e, diff as u64)
                                } else {
                                    Update::Control(e)
                                });
                            }
                        }
                    });
                    if let Some(cap) = pending.held.clone() {
                        let mut session = output.session(&cap);
                        while let Some((time, mut batch)) = pending.next_complete(|t| {
                            !events_frontier.less_equal(t) && !controls_frontier.less_equal(t)
                        }) {
                            applied.set(Some(time));
                            let mut users = users.borrow_mut();
                            let seal = retention
                                .as_ref()
                                .and_then(|r| time.checked_sub(r.retention_ms));
                            // A restore's records were admitted before: none is too late now.
                            let judged = seal.filter(|_| {
                                retention.as_ref().and_then(|r| r.restore_time) != Some(time)
                            });
                            if let (Some(seal), Some(r)) = (seal, retention.as_ref()) {
                                let slack = seal_slack(r.retention_ms);
                                while let Some(&Reverse((due, user))) = queue.peek() {
                                    if due > time {
                                        break;
                                    }
                                    queue.pop();
                                    let Some(gate) = users.get_mut(&user) else {
                                        continue;
                                    };
                                    gate.queued = false;
                                    gate.seal(seal);
                                    requeue(gate, user, r.retention_ms + slack, &mut queue);
                                    if gate.is_empty() {
                                        users.remove(&user);
                                    }
                                }
                            }
                            // Controls first: this time's events are judged by this time's rules.
                            batch.sort_by_key(|u| match u {
                                Update::Control(_) => 0,
                                Update::Sealed(..) => 1,
                                Update::Event(..) => 2,
                            });
                            for update in batch {
                                match update {
                                    Update::Sealed(e, n) => {
                                        let user = users.entry(e.user).or_default();
                                        user.sealed
                                            .get_or_insert_with(|| {
                                                Box::new(Sealed {
                                                    min_ts: e.ts,
                                                    ..Sealed::default()
                                                })
                                            })
                                            .add_record(&e, n);
                                        changes.push((e, n as isize));
                                    }
                                    Update::Control(c) => {
                                        if let (Some(seal), Some(r)) = (judged, retention.as_ref())
                                        {
                                            if c.kind == kinds.consent
                                                && c.value() > 0.0
                                                && c.ts <= seal
                                            {
                                                r.late.too_late(&c, seal);
                                                continue;
                                            }
                                        }
                                        let user = users.entry(c.user).or_default();
                                        if let Some(seal) = seal {
                                            user.seal(seal);
                                        }
                                        control(user, c, &kinds, &mut changes);
                                    }
                                    Update::Event(e, diff) => {
                                        if let (Some(seal), Some(r)) = (judged, retention.as_ref())
                                        {
                                            if diff > 0 && e.ts <= seal {
                                                r.late.too_late(&e, seal);
                                                continue;
                                            }
                                        }
                                        let user = users.entry(e.user).or_default();
                                        let bounds = user.bounds();
                                        // Erased, or before the last revocation: never admitted
                                        // again (both only grow), so not held either.
                                        if bounds.0.is_some_and(|to| e.ts <= to) {
                                            continue;
                                        }
                                        if diff > 0 {
                                            user.held.extend(std::iter::repeat_n(e, diff as usize));
                                            if let Some(r) = retention.as_ref() {
                                                let after =
                                                    r.retention_ms + seal_slack(r.retention_ms);
                                                requeue(user, e.user, after, &mut queue);
                                            }
                                        } else if seal.is_some_and(|s| e.ts <= s) {
                                            // A retraction of an event old enough to be sealed (a
                                            // conflicting duplicate later than the retention).
                                            if let Some(s) = seal {
                                                user.seal(s);
                                            }
                                            let n = unseal(user, &e, diff.unsigned_abs() as u64);
                                            if n > 0 {
                                                changes.push((e, -(n as isize)));
                                            }
                                            continue;
                                        } else {
                                            for _ in 0..diff.unsigned_abs() {
                                                if let Some(i) =
                                                    user.held.iter().position(|h| *h == e)
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
                            for (e, diff) in changes.drain(..) {
                                session.give((e, time, diff));
                            }
                        }
                    }
                    pending.release();
                }
            },
        )
        .as_collection();
    (admitted, state)
}

impl UserGate {
    fn is_empty(&self) -> bool {
        self.held.is_empty()
            && self.sealed.is_none()
            && self.erased_to.is_none()
            && self.consents.is_empty()
    }
}

/// Queues a visit of `user` for `after` past its oldest held event, unless one is queued.
fn requeue(
    gate: &mut UserGate,
    user: u64,
    after: u64,
    queue: &mut BinaryHeap<Reverse<(Time, u64)>>,
) {
    if gate.queued {
        return;
    }
    if let Some(oldest) = gate.oldest() {
        queue.push(Reverse((oldest.saturating_add(after), user)));
        gate.queued = true;
    }
}

/// Takes up to `n` sealed events like `e` out of `user`'s sealed part; how many.
fn unseal(user: &mut UserGate, e: &Event, n: u64) -> u64 {
    let Some(sealed) = user.sealed.as_mut() else {
        return 0;
    };
    let taken = sealed.take(e, n);
    if sealed.is_empty() {
        user.sealed = None;
    }
    taken
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
    // Sealed events were all admitted; withdrawing any of them withdraws them all.
    if let Some(sealed) = user
        .sealed
        .take_if(|s| !UserGate::admits_ts(after, s.min_ts))
    {
        changes.extend(sealed.retractions(c.user));
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

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// What the all-time views read of a multiset of events: counts by type, by device, by
    /// item, by (type, item), and summed value nanos by type.
    fn projections(events: &[(Event, i64)]) -> BTreeMap<String, i128> {
        let mut out: BTreeMap<String, i128> = BTreeMap::new();
        let mut add = |k: String, v: i128| {
            *out.entry(k).or_default() += v;
        };
        for (e, n) in events {
            let n = i128::from(*n);
            add(format!("type {}", e.kind), n);
            add(format!("device {:?}", e.device), n);
            add(format!("item {}", e.item), n);
            add(format!("type-item {} {}", e.kind, e.item), n);
            add(format!("value {}", e.kind), e.value_nanos() * n);
        }
        out.retain(|_, v| *v != 0);
        out
    }

    fn event() -> impl Strategy<Value = Event> {
        (
            0..50u64,
            1..4u64,
            0..4u64,
            prop::option::of(0..4usize),
            prop::option::of(0..3usize),
        )
            .prop_map(|(ts, kind, item, device, value)| Event {
                ts,
                user: 7,
                id: ts * 1000 + kind * 10 + item,
                kind,
                item,
                value_bits: value.map_or(0.0f64, |v| [0.1, 19.99, 1e9][v]).to_bits(),
                device: device.map(|d| DEVICES[d + 1].unwrap()),
            })
    }

    proptest! {
        /// The sealed part's retractions cancel exactly what its events added to the views,
        /// also after some of them were taken out again.
        #[test]
        fn retractions_cancel_the_sealed_events(
            events in prop::collection::vec(event(), 1..40),
            taken in prop::collection::vec(0..40usize, 0..5),
        ) {
            let mut sealed = Sealed { min_ts: u64::MAX, ..Sealed::default() };
            for e in &events {
                sealed.add(e);
            }
            let mut left: Vec<Event> = events.clone();
            for i in taken {
                if i < left.len() {
                    let e = left[i];
                    prop_assert_eq!(sealed.take(&e, 1), 1);
                    left.swap_remove(i);
                }
            }
            let mut all: Vec<(Event, i64)> = left.iter().map(|e| (*e, 1)).collect();
            let retractions = if sealed.is_empty() { Vec::new() } else { sealed.retractions(7) };
            for (r, n) in &retractions {
                prop_assert!(r.is_sealed() && r.user == 7 && *n < 0);
                all.push((*r, *n as i64));
            }
            prop_assert_eq!(projections(&all), BTreeMap::new());
        }

        /// A checkpoint's sealed records add what the sealed events added, and restore sealed
        /// counts whose retractions cancel them again.
        #[test]
        fn sealed_records_restore_the_sealed_counts(
            events in prop::collection::vec(event(), 1..40),
        ) {
            let mut sealed = Sealed { min_ts: u64::MAX, ..Sealed::default() };
            for e in &events {
                sealed.add(e);
            }
            let min_ts = events.iter().map(|e| e.ts).min().unwrap_or(0);
            prop_assert_eq!(sealed.min_ts, min_ts);
            let records = sealed.records(7, sealed.min_ts);
            let mut all: Vec<(Event, i64)> = events.iter().map(|e| (*e, -1)).collect();
            let mut restored = Sealed { min_ts: u64::MAX, ..Sealed::default() };
            for (r, n) in &records {
                prop_assert!(r.is_sealed() && r.user == 7 && r.ts == min_ts && *n > 0);
                all.push((*r, *n as i64));
                restored.add_record(r, *n);
            }
            prop_assert_eq!(projections(&all), BTreeMap::new());
            prop_assert_eq!(restored.min_ts, min_ts);
            let mut again: Vec<(Event, i64)> = records.iter().map(|(r, n)| (*r, *n as i64)).collect();
            again.extend(restored.retractions(7).into_iter().map(|(r, n)| (r, n as i64)));
            prop_assert_eq!(projections(&again), BTreeMap::new());
        }
    }
}
