//! Maintains each user's all-time basics — first/last seen, event count, spend, last device,
//! distinct and recent items, sessions — keyed by user.
//!
//! A `reduce` would re-read a user's whole history on every event (differential issue #618),
//! so this is a keyed operator instead: it keeps per-user ordered indexes and updates them in
//! O(log n) per event, late events and retractions included. Complete times are applied in
//! time order; for every user touched at a time it emits the retraction of the previously
//! emitted [`Basics`] and the new one, so downstream it is an ordinary collection with one
//! record per user.
//!
//! # Notes
//! * Sessions are kept as the set of session starts (the first `ts`, and every `ts` whose gap
//!   to the previous distinct `ts` exceeds the session gap, equal gaps staying in the session);
//!   an insertion or removal re-examines only the `ts` and its successor.
//! * `recent_items`: newest latest-touch first, ties by item id string ascending; `last_device`:
//!   the largest `(ts, event_id string)` among events with a device.
//!
//! * With a retention `r` (see [`crate::gate`]), detail with `ts <= t - r` at engine time `t`
//!   is **sealed**: the distinct times, session starts and device events at or before that
//!   point fold into a [`SealedPart`] (first ts, last ts, sessions and their gaps, the last
//!   session's start and events, the newest device event), and an item's entries there shrink
//!   to its latest one. Nothing later than the retention can be inserted (the gate turns it
//!   away), so sealing never changes the output. A sealed retraction from the gate (an erasure
//!   reaching the sealed part) clears the sealed part; a single retraction older than the
//!   retention (a conflicting duplicate that late) takes the event out of the counts and spend
//!   but leaves sessions, items and devices as they were.
//! * Checkpoints copy the sealed parts ([`BasicsState`]); a restore seeds them before the
//!   checkpoint's records arrive, and the gate's sealed records then bring back only counts
//!   and spend (a sealed record that adds, rather than retracts, leaves the sealed part alone).
//!
//! Cost per event: O(log n) in the user's distinct timestamps and items (a late event that
//! moves the start of the current session also recounts that session); sealing a user costs
//! O(their detail and items), at most once per `r / 16` of engine time. Memory: one ordered
//! entry per distinct (user, ts), per (user, item, ts) and per device event (with a retention:
//! within it, plus one entry per (user, item) and a fixed-size sealed part), and one emitted
//! [`Basics`] per user. (Counts by type and devices are additive and live in
//! [`crate::counts`].)

use crate::event::{newest_items, Device, Event, Forget, NameOrder, Pending, Time, UserKey, NANOS};
use differential_dataflow::{AsCollection, VecCollection};
use foldhash::HashMap;
use serde::{Deserialize, Serialize};
use std::cell::{Cell, RefCell};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::rc::Rc;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;

/// How many recent items a profile shows (SPEC §4).
pub const RECENT_ITEMS: usize = 10;

/// A user's all-time basics at one time. Fixed-size on purpose: arrangements clone records
/// on every merge, and a heap allocation per clone dominated the cost.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct Basics {
    pub first: u64,
    pub last: u64,
    pub events: u64,
    /// Sum of purchase values, as `f64` bits.
    pub spend_bits: u64,
    pub last_device: Option<Device>,
    pub distinct_items: u64,
    /// Item hashes, newest first; the first `recent_len` are valid.
    pub recent: [u64; RECENT_ITEMS],
    pub recent_len: u8,
    pub sessions: u64,
    pub duration_sum: u64,
    pub current_start: u64,
    pub current_events: u64,
}

impl Basics {
    pub fn recent_items(&self) -> &[u64] {
        &self.recent[..self.recent_len as usize]
    }
    pub fn spend(&self) -> f64 {
        f64::from_bits(self.spend_bits)
    }
    /// Mean session duration, rounded down.
    pub fn avg_duration(&self) -> u64 {
        self.duration_sum / self.sessions.max(1)
    }
}

/// A user's detail at or before the seal point, folded.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct SealedPart {
    /// Sealed events (approximate single retractions included).
    events: u64,
    first: u64,
    last: u64,
    /// Session starts among the sealed times, and the sum of their gaps.
    starts: u64,
    gap_sum: u64,
    /// The last sealed session's start and number of events.
    tail_start: u64,
    tail_events: u64,
    /// The newest sealed device event: `(ts, event id, device)`.
    device: Option<(u64, u64, Device)>,
}

#[derive(Default)]
struct UserState {
    /// Distinct `ts` → number of events.
    times: BTreeMap<u64, u64>,
    /// Session starts → the gap before them (0 for the first).
    starts: BTreeMap<u64, u64>,
    gap_sum: u64,
    events: u64,
    spend_nanos: i128,
    /// `(ts, event id)` → device, per event that has one.
    device_events: BTreeMap<(u64, u64), (Device, u64)>,
    /// `(item, ts)` → number of events.
    item_times: BTreeMap<(u64, u64), u64>,
    /// `(latest ts, item)` for every item.
    latest: BTreeSet<(Reverse<u64>, u64)>,
    /// The current (last) session's start and number of events, kept up to date so that a
    /// long-running session costs O(1) per event, not O(its length).
    current: Option<(u64, u64)>,
    emitted: Option<Basics>,
    sealed: Option<SealedPart>,
    /// Whether the seal queue has an entry for this user.
    queued: bool,
}

impl UserState {
    fn is_empty(&self) -> bool {
        self.events == 0
    }

    /// Re-derives whether `ts` (a present distinct time) starts a session.
    fn restatus(&mut self, ts: u64, gap: u64) {
        let before = self
            .times
            .range(..ts)
            .next_back()
            .map(|(t, _)| *t)
            .or(self.sealed.map(|s| s.last));
        let contribution = match before {
            None => Some(0),
            Some(p) if ts - p > gap => Some(ts - p),
            Some(_) => None,
        };
        if let Some(old) = self.starts.remove(&ts) {
            self.gap_sum -= old;
        }
        if let Some(c) = contribution {
            self.starts.insert(ts, c);
            self.gap_sum += c;
        }
    }

    fn successor(&self, ts: u64) -> Option<u64> {
        self.times.range(ts + 1..).next().map(|(t, _)| *t)
    }

    fn item_latest(&self, item: u64) -> Option<u64> {
        self.item_times
            .range((item, 0)..=(item, u64::MAX))
            .next_back()
            .map(|((_, t), _)| *t)
    }

    /// The start of the last session, sealed or not.
    fn latest_start(&self) -> Option<u64> {
        self.starts
            .keys()
            .next_back()
            .copied()
            .or(self.sealed.map(|s| s.tail_start))
    }

    /// The events of the session starting at `start` (the latest start).
    fn count_from(&self, start: u64) -> u64 {
        match self.sealed {
            Some(s) if start <= s.last => s.tail_events + self.times.values().sum::<u64>(),
            _ => self.times.range(start..).map(|(_, c)| *c).sum(),
        }
    }

    fn add_spend(&mut self, e: &Event, diff: i64, purchase_kind: u64) {
        if e.kind == purchase_kind {
            // Saturating: a sum beyond 128 bits is out of reach of bounded values, but a
            // wrapped one would turn negative.
            self.spend_nanos = self
                .spend_nanos
                .saturating_add(e.value_nanos().saturating_mul(diff as i128));
        }
    }

    /// Folds the detail with `ts <= seal` into the sealed part (see the module doc).
    fn seal(&mut self, seal: u64, ids: &NameOrder, forget: Option<&Forget>) {
        if self.times.range(..=seal).next().is_none() {
            return;
        }
        let detail = self.times.split_off(&(seal + 1));
        let old = std::mem::replace(&mut self.times, detail);
        let detail_starts = self.starts.split_off(&(seal + 1));
        let old_starts = std::mem::replace(&mut self.starts, detail_starts);
        let first = old.keys().next().copied().unwrap_or(0);
        let sealed = self.sealed.get_or_insert(SealedPart {
            first,
            ..SealedPart::default()
        });
        for (ts, n) in old {
            if let Some(gap) = old_starts.get(&ts) {
                sealed.starts += 1;
                sealed.gap_sum += gap;
                sealed.tail_start = ts;
                sealed.tail_events = n;
            } else {
                sealed.tail_events += n;
            }
            sealed.events += n;
            sealed.last = ts;
        }
        let detail_devices = self.device_events.split_off(&(seal + 1, 0));
        let old_devices = std::mem::replace(&mut self.device_events, detail_devices);
        if let Some(((top, _), _)) = old_devices.iter().next_back() {
            let top = *top;
            if let Some(((ts, id), (device, _))) = old_devices
                .range((top, 0)..)
                .max_by(|a, b| ids(a.0 .1, b.0 .1))
            {
                sealed.device = Some((*ts, *id, *device));
            }
        }
        if let Some(forget) = forget {
            for (_, id) in old_devices.keys() {
                forget(*id);
            }
        }
        // An item's sealed entries shrink to its latest: all that recent items need.
        let mut drop: Vec<(u64, u64)> = Vec::new();
        let mut previous: Option<(u64, u64)> = None;
        for &(item, ts) in self.item_times.keys() {
            if let Some(p) = previous {
                if p.0 == item && ts <= seal {
                    drop.push(p);
                }
            }
            previous = (ts <= seal).then_some((item, ts));
        }
        for key in drop {
            self.item_times.remove(&key);
        }
    }

    /// The sealed part as a checkpoint holds it.
    fn sealed_basics(&self, user: u64) -> Option<SealedBasics> {
        let part = self.sealed?;
        let items = self
            .item_times
            .iter()
            .filter(|((_, ts), _)| *ts <= part.last)
            .map(|(k, n)| (*k, *n))
            .collect();
        Some(SealedBasics { user, part, items })
    }

    /// Puts a checkpoint's sealed part into a state that has nothing yet; the sealed events'
    /// counts and spend come with the gate's sealed records.
    fn restore(&mut self, SealedBasics { part, items, .. }: SealedBasics) {
        self.item_times.extend(items);
        let mut previous: Option<(u64, u64)> = None;
        for &(item, ts) in self.item_times.keys() {
            // Keys ascend: an item's last entry is its latest.
            if let Some(p) = previous.filter(|p| p.0 != item) {
                self.latest.insert((Reverse(p.1), p.0));
            }
            previous = Some((item, ts));
        }
        if let Some(p) = previous {
            self.latest.insert((Reverse(p.1), p.0));
        }
        self.gap_sum += part.gap_sum;
        self.current = Some((part.tail_start, part.tail_events));
        self.sealed = Some(part);
    }

    /// Forgets the sealed part: its events were all retracted (their counts and spend by the
    /// sealed retractions themselves).
    fn clear_sealed(&mut self, gap: u64) {
        let Some(sealed) = self.sealed.take() else {
            return;
        };
        self.gap_sum -= sealed.gap_sum;
        let gone: Vec<(u64, u64)> = self
            .item_times
            .keys()
            .filter(|(_, ts)| *ts <= sealed.last)
            .copied()
            .collect();
        for (item, ts) in gone {
            self.item_times.remove(&(item, ts));
            self.latest.remove(&(Reverse(ts), item));
            if let Some(t) = self.item_latest(item) {
                self.latest.insert((Reverse(t), item));
            }
        }
        if let Some(&first) = self.times.keys().next() {
            self.restatus(first, gap);
        }
        self.current = self.latest_start().map(|s| (s, self.count_from(s)));
    }

    fn apply(&mut self, e: &Event, diff: i64, gap: u64, purchase_kind: u64) {
        let n = diff.unsigned_abs();
        if let Some(sealed) = self.sealed.as_mut().filter(|s| e.ts <= s.last) {
            // Older than the retention (the gate lets only retractions through): counts and
            // spend follow, sessions, items and devices stay.
            sealed.events = if diff > 0 {
                sealed.events + n
            } else {
                sealed.events.saturating_sub(n)
            };
            self.events = if diff > 0 {
                self.events + n
            } else {
                self.events.saturating_sub(n)
            };
            self.add_spend(e, diff, purchase_kind);
            return;
        }
        let start_before = self.latest_start();
        if diff > 0 {
            let entry = self.times.entry(e.ts).or_insert(0);
            *entry += n;
            if *entry == n {
                self.restatus(e.ts, gap);
                if let Some(s) = self.successor(e.ts) {
                    self.restatus(s, gap);
                }
            }
        } else {
            let Some(entry) = self.times.get_mut(&e.ts) else {
                return;
            };
            *entry = entry.saturating_sub(n);
            if *entry == 0 {
                self.times.remove(&e.ts);
                if let Some(old) = self.starts.remove(&e.ts) {
                    self.gap_sum -= old;
                }
                if let Some(s) = self.successor(e.ts) {
                    self.restatus(s, gap);
                }
            }
        }
        let add = |x: &mut u64| {
            *x = if diff > 0 {
                *x + n
            } else {
                x.saturating_sub(n)
            }
        };
        // The current session: adjust in place while its start stays; recount when it moves
        // (a new session began, which is short, or a late event merged sessions, which is rare).
        let start_after = self.latest_start();
        self.current = match (start_after, self.current) {
            (Some(s), Some((cs, mut count))) if Some(s) == start_before && cs == s => {
                if e.ts >= s {
                    add(&mut count);
                }
                Some((s, count))
            }
            (Some(s), _) => Some((s, self.count_from(s))),
            (None, _) => None,
        };
        add(&mut self.events);
        self.add_spend(e, diff, purchase_kind);
        if let Some(d) = e.device {
            let entry = self.device_events.entry((e.ts, e.id)).or_insert((d, 0));
            add(&mut entry.1);
            if entry.1 == 0 {
                self.device_events.remove(&(e.ts, e.id));
            }
        }
        if e.has_item() {
            let before = self.item_latest(e.item);
            let entry = self.item_times.entry((e.item, e.ts)).or_insert(0);
            add(entry);
            if *entry == 0 {
                self.item_times.remove(&(e.item, e.ts));
            }
            let after = self.item_latest(e.item);
            if before != after {
                if let Some(t) = before {
                    self.latest.remove(&(Reverse(t), e.item));
                }
                if let Some(t) = after {
                    self.latest.insert((Reverse(t), e.item));
                }
            }
        }
    }

    fn basics(&self, names: &NameOrder, ids: &NameOrder) -> Option<Basics> {
        if self.events == 0 {
            return None;
        }
        let first = match self.sealed {
            Some(s) => s.first,
            None => *self.times.keys().next()?,
        };
        let last = match self.times.keys().next_back() {
            Some(t) => *t,
            None => self.sealed?.last,
        };
        let (current_start, current_events) = self.current?;
        let recent = newest_items(&self.latest, RECENT_ITEMS, names);
        let mut recent_items = [0u64; RECENT_ITEMS];
        for (slot, (_, item)) in recent_items.iter_mut().zip(&recent) {
            *slot = *item;
        }
        let last_device = self
            .device_events
            .iter()
            .next_back()
            .map(|((ts, _), _)| *ts)
            .and_then(|top| {
                self.device_events
                    .range((top, 0)..)
                    .max_by(|a, b| ids(a.0 .1, b.0 .1))
                    .map(|(_, (d, _))| *d)
            })
            .or(self.sealed.and_then(|s| s.device.map(|(_, _, d)| d)));
        Some(Basics {
            first,
            last,
            events: self.events,
            spend_bits: (self.spend_nanos as f64 / NANOS).to_bits(),
            last_device,
            distinct_items: self.latest.len() as u64,
            recent: recent_items,
            recent_len: recent.len() as u8,
            sessions: self.starts.len() as u64 + self.sealed.map_or(0, |s| s.starts),
            duration_sum: (last - first) - self.gap_sum,
            current_start,
            current_events,
        })
    }
}

/// A user's sealed basics, as a checkpoint holds them: the folded part and the latest sealed
/// entry of each item it names (the counts and spend come from the gate's sealed records).
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct SealedBasics {
    pub user: u64,
    part: SealedPart,
    /// `((item, ts), events)`.
    items: Vec<((u64, u64), u64)>,
}

/// This worker's basics state, readable between steps: the sealed parts a checkpoint copies,
/// and the seeding of a restore.
#[derive(Clone)]
pub struct BasicsState {
    users: Rc<RefCell<HashMap<u64, UserState>>>,
    /// The operator's input frontier when it last ran (`None`: empty, every time done).
    frontier: Rc<Cell<Option<Time>>>,
    ids: NameOrder,
    forget: Option<Forget>,
}

impl SealedBasics {
    /// The oldest sealed `ts`.
    pub fn first(&self) -> u64 {
        self.part.first
    }

    /// The items it names.
    pub fn items(&self) -> impl Iterator<Item = u64> + '_ {
        self.items.iter().map(|((item, _), _)| *item)
    }
}

impl BasicsState {
    /// Whether every time up to `t` is applied here (the gate's output through `t` included).
    pub fn applied_through(&self, t: Time) -> bool {
        self.frontier.get().is_none_or(|f| f > t)
    }

    /// Seals every user's detail up to `seal` (as the operator's own visits would, so the output
    /// does not change) and returns the sealed parts. With the gate sealed to the same point
    /// and every gate output applied here, the gate's sealed records and these describe the
    /// same events.
    pub fn sealed_parts(&self, seal: Option<u64>) -> Vec<SealedBasics> {
        let mut users = self.users.borrow_mut();
        let mut out = Vec::new();
        for (&user, state) in users.iter_mut() {
            if let Some(seal) = seal {
                state.seal(seal, &self.ids, self.forget.as_ref());
            }
            out.extend(state.sealed_basics(user));
        }
        out
    }

    /// Seeds restored sealed parts, before the checkpoint's records are applied.
    pub fn restore(&self, parts: impl IntoIterator<Item = SealedBasics>) {
        let mut users = self.users.borrow_mut();
        for sealed in parts {
            users.entry(sealed.user).or_default().restore(sealed);
        }
    }
}

/// The basics of every user in `events` (de-duplicated, and on their user's worker: exchanged
/// by [`route_hash`](crate::event::route_hash) of the user). `names` orders item ids, `ids`
/// event ids. `retention_ms`: the gate's retention, if any (detail older than it is sealed, see
/// the module doc); `forget` hears of the event ids sealing leaves behind. `restore_time`: the
/// time a checkpoint's records are fed at, whose detail is applied before any sealing.
#[allow(clippy::too_many_arguments)]
pub fn basics<'s>(
    events: VecCollection<'s, Time, Event>,
    session_gap_ms: u64,
    purchase_kind: u64,
    (names, ids): (NameOrder, NameOrder),
    retention_ms: Option<u64>,
    forget: Option<Forget>,
    restore_time: Option<Time>,
) -> (VecCollection<'s, Time, (UserKey, Basics)>, BasicsState) {
    let state = BasicsState {
        users: Rc::default(),
        frontier: Rc::new(Cell::new(Some(0))),
        ids: ids.clone(),
        forget: forget.clone(),
    };
    let shared = state.users.clone();
    let frontier_seen = state.frontier.clone();
    // The events are already on their user's worker: read them where they are.
    let pact = Pipeline;
    let out = events
        .inner
        .unary_frontier(pact, "Basics", move |_cap, _info| {
            let mut pending: Pending<(Event, isize)> = Pending::default();
            let users = shared;
            // (due time, user): when to visit a user to seal its oldest detail.
            let mut queue: BinaryHeap<Reverse<(Time, u64)>> = BinaryHeap::new();
            move |(input, frontier), output| {
                input.for_each(|cap, data| {
                    for (event, time, diff) in data.drain(..) {
                        pending.at(&cap, time).push((event, diff));
                    }
                });
                let mut users = users.borrow_mut();
                if let Some(cap) = pending.held.clone() {
                    let mut session = output.session(&cap);
                    while let Some((time, mut batch)) =
                        pending.next_complete(|t| !frontier.less_equal(t))
                    {
                        let seal = retention_ms.and_then(|r| time.checked_sub(r));
                        // A restore's detail is applied as it was before the restart; the visits
                        // seal it afterwards.
                        let judged = seal.filter(|_| restore_time != Some(time));
                        if let (Some(seal), Some(r)) = (seal, retention_ms) {
                            while let Some(&Reverse((due, user))) = queue.peek() {
                                if due > time {
                                    break;
                                }
                                queue.pop();
                                if let Some(state) = users.get_mut(&user) {
                                    state.queued = false;
                                    state.seal(seal, &ids, forget.as_ref());
                                    requeue(state, user, r, &mut queue);
                                }
                            }
                        }
                        // By user, each user's events in their order: a user's state is looked up
                        // once, and is still in cache when its new basics are read.
                        batch.sort_by_key(|(event, _)| event.user);
                        for run in batch.chunk_by(|(a, _), (b, _)| a.user == b.user) {
                            let user = run[0].0.user;
                            let state = users.entry(user).or_default();
                            for (event, diff) in run {
                                let diff = *diff as i64;
                                if let Some(seal) =
                                    judged.filter(|s| event.is_sealed() || event.ts <= *s)
                                {
                                    // Judged against exactly what the gate has sealed by now.
                                    state.seal(seal, &ids, forget.as_ref());
                                }
                                if event.is_sealed() {
                                    // A retraction withdraws the whole sealed part; a restore's
                                    // sealed records only bring its counts and spend back.
                                    if diff < 0 {
                                        state.clear_sealed(session_gap_ms);
                                    }
                                    let n = diff.unsigned_abs();
                                    state.events = if diff > 0 {
                                        state.events + n
                                    } else {
                                        state.events.saturating_sub(n)
                                    };
                                    state.add_spend(event, diff, purchase_kind);
                                } else {
                                    state.apply(event, diff, session_gap_ms, purchase_kind);
                                    if let Some(r) = retention_ms {
                                        requeue(state, event.user, r, &mut queue);
                                    }
                                }
                            }
                            let new = state.basics(&names, &ids);
                            if new == state.emitted {
                                continue;
                            }
                            if let Some(old) = state.emitted.take() {
                                session.give(((UserKey(user), old), time, -1isize));
                            }
                            if let Some(b) = new {
                                session.give(((UserKey(user), b), time, 1isize));
                            }
                            state.emitted = new;
                            if state.is_empty() {
                                users.remove(&user);
                            }
                        }
                    }
                }
                pending.release();
                frontier_seen.set(frontier.frontier().first().copied());
            }
        })
        .as_collection();
    (out, state)
}

/// Queues a visit of `user` a while after its oldest detail passes the seal point, unless one
/// is queued (the visit seals a batch of times at once, not one per event).
fn requeue(
    state: &mut UserState,
    user: u64,
    retention: u64,
    queue: &mut BinaryHeap<Reverse<(Time, u64)>>,
) {
    if state.queued {
        return;
    }
    if let Some(&oldest) = state.times.keys().next() {
        let after = retention.saturating_add((retention / 16).max(1));
        queue.push(Reverse((oldest.saturating_add(after), user)));
        state.queued = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Arc;

    fn ev(ts: u64, item: u64, id: u64) -> Event {
        Event {
            ts,
            user: 1,
            id,
            kind: 1,
            item,
            value_bits: 0,
            device: None,
        }
    }

    /// Sessions of a sorted ts list, the plain way: (start, last, events).
    fn sessions(ts: &[u64], gap: u64) -> Vec<(u64, u64, u64)> {
        let mut out: Vec<(u64, u64, u64)> = Vec::new();
        for &t in ts {
            match out.last_mut() {
                Some(s) if t - s.1 <= gap => {
                    s.1 = t;
                    s.2 += 1;
                }
                _ => out.push((t, t, 1)),
            }
        }
        out
    }

    #[test]
    fn sessions_match_a_plain_scan_under_any_insertion_order_and_removals() {
        let names: NameOrder = Arc::new(|a: u64, b: u64| a.cmp(&b));
        let gap = 10;
        let ts: Vec<u64> = vec![50, 0, 5, 5, 12, 30, 31, 60, 61, 62, 100, 20, 40, 41, 22];
        let mut state = UserState::default();
        let mut present: Vec<u64> = Vec::new();
        let check = |state: &UserState, present: &[u64]| {
            let mut sorted = present.to_vec();
            sorted.sort_unstable();
            let expect = sessions(&sorted, gap);
            let b = state.basics(&names, &names).unwrap();
            assert_eq!(b.sessions, expect.len() as u64, "{sorted:?}");
            assert_eq!(
                b.duration_sum,
                expect.iter().map(|s| s.1 - s.0).sum::<u64>(),
                "{sorted:?}"
            );
            let cur = expect.last().unwrap();
            assert_eq!(
                (b.current_start, b.last, b.current_events),
                (cur.0, cur.1, cur.2),
                "{sorted:?}"
            );
            assert_eq!(b.events, sorted.len() as u64);
        };
        for (i, t) in ts.iter().enumerate() {
            state.apply(&ev(*t, 0, i as u64), 1, gap, 99);
            present.push(*t);
            check(&state, &present);
        }
        for (i, t) in ts.iter().enumerate().step_by(2) {
            state.apply(&ev(*t, 0, i as u64), -1, gap, 99);
            let pos = present.iter().position(|p| p == t).unwrap();
            present.remove(pos);
            if !present.is_empty() {
                check(&state, &present);
            }
        }
    }

    #[test]
    fn recent_items_keep_the_latest_touch_and_order_ties_by_name() {
        let names: NameOrder = Arc::new(|a: u64, b: u64| a.cmp(&b));
        let mut state = UserState::default();
        for i in 0..30u64 {
            state.apply(&ev(i / 3, 100 + i % 12, i), 1, 1000, 99);
        }
        let b = state.basics(&names, &names).unwrap();
        assert_eq!(b.distinct_items, 12);
        // Latest touches: 103-105 at ts 9, 100-102 at 8, 109-111 at 7, 106-108 at 6.
        assert_eq!(
            b.recent_items(),
            [103, 104, 105, 100, 101, 102, 109, 110, 111, 106]
        );
    }

    /// Events of user 1 arriving as `steps` move the clock, each with the seal point it arrives
    /// at (`retention` behind the clock), and never at or before it.
    fn arrivals(steps: Vec<(u64, u64, u8, bool)>, retention: u64) -> Vec<(Event, Option<u64>)> {
        let mut clock = 0u64;
        let mut out = Vec::new();
        for (i, (advance, item, dev, purchase)) in steps.into_iter().enumerate() {
            clock += advance;
            let seal = clock.checked_sub(retention);
            let ts = seal.map_or(clock / 2, |s| s + 1 + (i as u64 * 7) % retention);
            let e = Event {
                ts,
                user: 1,
                id: 1000 - i as u64,
                kind: if purchase { 99 } else { 1 },
                item: if item == 0 {
                    crate::NO_ITEM
                } else {
                    100 + item
                },
                value_bits: (i as f64 * 0.5).to_bits(),
                device: [None, Some(Device::Mobile), Some(Device::Tablet)][dev as usize],
            };
            out.push((e, seal));
        }
        out
    }

    proptest::proptest! {
        /// Sealing is invisible: a state sealed behind every insert equals one that kept all of
        /// its detail; clearing the sealed part (with the sealed events' counts and spend taken
        /// out) equals a state that only ever saw the later events.
        #[test]
        fn sealing_never_changes_the_basics(
            steps in proptest::collection::vec((0..40u64, 0..6u64, 0..3u8, proptest::bool::ANY), 1..80),
            retention in 1..60u64,
        ) {
            let names: NameOrder = Arc::new(|a: u64, b: u64| a.cmp(&b));
            let gap = 10;
            let (mut plain, mut sealed) = (UserState::default(), UserState::default());
            let arrivals = arrivals(steps, retention);
            let all: Vec<Event> = arrivals.iter().map(|(e, _)| *e).collect();
            for (e, seal) in &arrivals {
                plain.apply(e, 1, gap, 99);
                if let Some(s) = seal {
                    sealed.seal(*s, &names, None);
                }
                sealed.apply(e, 1, gap, 99);
                if let Some(s) = seal {
                    sealed.seal(*s, &names, None);
                }
                proptest::prop_assert_eq!(sealed.basics(&names, &names), plain.basics(&names, &names));
            }
            // An erasure reaching the sealed part: the sealed retractions take out the counts
            // and spend, clear_sealed the rest.
            let Some(point) = sealed.sealed.map(|s| s.last) else { return Ok(()) };
            for e in all.iter().filter(|e| e.ts <= point) {
                sealed.events -= 1;
                sealed.add_spend(e, -1, 99);
            }
            sealed.clear_sealed(gap);
            let mut later = UserState::default();
            for e in all.iter().filter(|e| e.ts > point) {
                later.apply(e, 1, gap, 99);
            }
            proptest::prop_assert_eq!(sealed.basics(&names, &names), later.basics(&names, &names));
        }

        /// A checkpoint's sealed part, with the sealed events' counts and spend (as the gate's
        /// sealed records bring them) and the later events fed again in any order, restores the
        /// basics the state had.
        #[test]
        fn a_restored_sealed_part_gives_the_same_basics(
            steps in proptest::collection::vec((0..40u64, 0..6u64, 0..3u8, proptest::bool::ANY), 1..80),
            retention in 1..60u64,
            reversed in proptest::bool::ANY,
        ) {
            let names: NameOrder = Arc::new(|a: u64, b: u64| a.cmp(&b));
            let gap = 10;
            let mut state = UserState::default();
            let arrivals = arrivals(steps, retention);
            for (e, seal) in &arrivals {
                if let Some(s) = seal {
                    state.seal(*s, &names, None);
                }
                state.apply(e, 1, gap, 99);
            }
            // The copy seals to the current seal point first, as a checkpoint does.
            if let Some((_, Some(s))) = arrivals.last() {
                state.seal(*s, &names, None);
            }
            let all: Vec<Event> = arrivals.into_iter().map(|(e, _)| e).collect();
            let mut restored = UserState::default();
            let point = state.sealed.map(|s| s.last);
            if let Some(part) = state.sealed_basics(1) {
                restored.restore(part);
            }
            let (old, mut later): (Vec<Event>, Vec<Event>) =
                all.into_iter().partition(|e| point.is_some_and(|p| e.ts <= p));
            for e in &old {
                restored.events += 1;
                restored.add_spend(e, 1, 99);
            }
            if reversed {
                later.reverse();
            }
            for e in &later {
                restored.apply(e, 1, gap, 99);
            }
            proptest::prop_assert_eq!(restored.basics(&names, &names), state.basics(&names, &names));
        }
    }
}
