//! The compact event record every view consumes, and the keys views are arranged by.
//!
//! Strings never enter the dataflow: the I/O shell hashes ids to `u64` once at parse time and
//! keeps the strings in its name table for output. Every key type routes by the *user* hash
//! alone, so all of a user's state lives on one worker and a profile is read from one place.

use differential_dataflow::Hashable;
use serde::{Deserialize, Serialize};
use std::cmp::Ordering;
use std::sync::Arc;

/// Dataflow time: the engine clock in milliseconds.
pub type Time = u64;

/// Updates an operator holds until their time is complete, grouped by time, and one capability
/// at the earliest of those times. A replay with `--triggers` enters each event at its own
/// time: one capability (not one per time) costs timely one progress change per activation,
/// and one output session on it (see [`Pending::held`]) puts every complete time of an
/// activation into the same messages, not one small message per time.
pub struct Pending<D> {
    /// At or before every pending time; clone it for an activation's output session.
    pub held: Option<timely::dataflow::operators::Capability<Time>>,
    pub by_time: std::collections::BTreeMap<Time, Vec<D>>,
}

impl<D> Default for Pending<D> {
    fn default() -> Self {
        Pending {
            held: None,
            by_time: std::collections::BTreeMap::new(),
        }
    }
}

impl<D> Pending<D> {
    /// The updates at `time`, brought by a message with capability `cap`.
    pub fn at(
        &mut self,
        cap: &timely::dataflow::operators::InputCapability<Time>,
        time: Time,
    ) -> &mut Vec<D> {
        hold_at(&mut self.held, cap, time);
        self.by_time.entry(time).or_default()
    }

    /// The earliest pending time and its updates, if `complete` says that time is.
    pub fn next_complete(
        &mut self,
        complete: impl FnOnce(&Time) -> bool,
    ) -> Option<(Time, Vec<D>)> {
        let entry = self.by_time.first_entry()?;
        if !complete(entry.key()) {
            return None;
        }
        Some(entry.remove_entry())
    }

    /// Moves the capability up to the earliest time still pending, or drops it.
    pub fn release(&mut self) {
        release_to(&mut self.held, self.by_time.keys().next());
    }
}

/// Makes `held` a capability at or before `time` (taken from the message that brought it).
pub(crate) fn hold_at(
    held: &mut Option<timely::dataflow::operators::Capability<Time>>,
    cap: &timely::dataflow::operators::InputCapability<Time>,
    time: Time,
) {
    if held.as_ref().is_none_or(|h| time < *h.time()) {
        *held = Some(cap.delayed(&time, 0));
    }
}

/// Moves `held` up to the earliest time still pending, or drops it when none is.
pub(crate) fn release_to(
    held: &mut Option<timely::dataflow::operators::Capability<Time>>,
    next: Option<&Time>,
) {
    match next {
        Some(next) => {
            if let Some(h) = held.as_mut() {
                if h.time() < next {
                    h.downgrade(next);
                }
            }
        }
        None => *held = None,
    }
}

/// Orders two hashed names by their strings (item ids, event ids). Views need it for the
/// tie rules of SPEC §4, which are defined on the strings, not on their hashes.
pub type NameOrder = Arc<dyn Fn(u64, u64) -> Ordering + Send + Sync>;

/// Told that a hashed event id will not be compared again (its event's detail is sealed).
pub type Forget = Arc<dyn Fn(u64) + Send + Sync>;

/// The `k` newest items of a `(latest touch, item)` index, newest first, ties by item id
/// string: the order of SPEC §4's `recent_items`, and of the recommender's recent sets.
pub fn newest_items(
    latest: &std::collections::BTreeSet<(std::cmp::Reverse<u64>, u64)>,
    k: usize,
    names: &NameOrder,
) -> Vec<(u64, u64)> {
    // Take the newest k, plus everything tied with the k-th, then order ties by name.
    let mut top: Vec<(u64, u64)> = Vec::with_capacity(k + 2);
    for (std::cmp::Reverse(t), item) in latest {
        if top.len() >= k && top.last().is_some_and(|(lt, _)| lt != t) {
            break;
        }
        top.push((*t, *item));
    }
    top.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| names(a.1, b.1)));
    top.truncate(k);
    top
}

/// The `k` entries with the largest keys, largest first, ties by item id string. Selects before
/// it sorts, and compares names only among ties: rankings over thousands of items (trending
/// lists, an item's co-occurrences) would otherwise spend most of their time looking names up.
pub fn largest<K: Ord + Copy>(
    mut entries: Vec<(K, u64)>,
    k: usize,
    names: &NameOrder,
) -> Vec<(K, u64)> {
    if k == 0 {
        return Vec::new();
    }
    if entries.len() > k {
        entries.select_nth_unstable_by(k - 1, |a, b| b.0.cmp(&a.0));
        let cut = entries[k - 1].0;
        let (mut kept, mut tied): (Vec<_>, Vec<_>) = entries
            .into_iter()
            .filter(|e| e.0 >= cut)
            .partition(|e| e.0 > cut);
        tied.sort_by(|a, b| names(a.1, b.1));
        tied.truncate(k - kept.len());
        kept.append(&mut tied);
        entries = kept;
    }
    entries.sort_by(|a, b| b.0.cmp(&a.0).then_with(|| names(a.1, b.1)));
    entries
}

/// Device types, declared in alphabetical order so that `Ord` sorts them as SPEC §4 lists them.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Device {
    Desktop,
    Mobile,
    Other,
    Tablet,
}

impl Device {
    pub fn as_str(self) -> &'static str {
        match self {
            Device::Desktop => "desktop",
            Device::Mobile => "mobile",
            Device::Other => "other",
            Device::Tablet => "tablet",
        }
    }
}

/// `item` value of an event that carries no item.
pub const NO_ITEM: u64 = 0;

/// One accepted user event, as the views see it.
///
/// # Notes
/// The derived `Ord` (by `ts` first) is the tie rule for conflicting duplicates: of several
/// events sharing an `event_id`, the smallest one is kept, whatever the arrival order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Event {
    /// Event time, epoch milliseconds.
    pub ts: u64,
    /// Hash of `user_id`.
    pub user: u64,
    /// Hash of `event_id`: the idempotency key.
    pub id: u64,
    /// Hash of the event type name.
    pub kind: u64,
    /// Hash of `item_id`, or [`NO_ITEM`].
    pub item: u64,
    /// `value` as `f64` bits (non-negative, so the bit order is the numeric order); 0 if absent.
    /// In a sealed retraction ([`Event::is_sealed`]): summed nanos, see [`Event::value_nanos`].
    pub value_bits: u64,
    pub device: Option<Device>,
}

/// Billionths per unit of `value`: spend is summed in whole nanos, exact for decimal prices.
pub const NANOS: f64 = 1e9;

/// `id` of a sealed-detail retraction (see [`crate::gate`]): never the hash of an event id.
pub const SEALED_ID: u64 = u64::MAX;

impl Event {
    /// A retraction of events the gate sealed: it stands for their kind, item, device and value,
    /// not for one event at its `ts`. Only the all-time views read it; windowed views skip it.
    pub fn is_sealed(&self) -> bool {
        self.id == SEALED_ID
    }
    pub fn value(&self) -> f64 {
        f64::from_bits(self.value_bits)
    }
    /// `value` in billionths, the unit spend is summed in (exact for decimal prices). A sealed
    /// retraction carries its events' summed nanos in `value_bits` instead (see [`crate::gate`]).
    pub fn value_nanos(&self) -> i128 {
        if self.is_sealed() {
            i128::from(self.value_bits)
        } else {
            (self.value() * NANOS).round() as i128
        }
    }
    pub fn has_item(&self) -> bool {
        self.item != NO_ITEM
    }
}

/// A well-mixed, version-stable hash of a user hash: the routing function for every view,
/// the query router and (later) the Kafka partitioner.
pub fn route_hash(user: u64) -> u64 {
    // splitmix64 finaliser: good low bits for `%` and power-of-two masks.
    let mut z = user.wrapping_add(0x9E37_79B9_7F4A_7C15);
    z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
    z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
    z ^ (z >> 31)
}

/// The worker (of `peers`) that owns `user`'s state. Agrees with timely's exchange, which
/// routes by `hashed() % peers` (or the equal `& (peers - 1)` for powers of two).
pub fn owner(user: u64, peers: usize) -> usize {
    (route_hash(user) % peers as u64) as usize
}

/// A user. No `Hash` derive on purpose: routing must use [`route_hash`], not the blanket impl.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UserKey(pub u64);

impl Hashable for UserKey {
    type Output = u64;
    fn hashed(&self) -> u64 {
        route_hash(self.0)
    }
}

/// A user and a time bucket (rollup levels); routed by the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UserBucket {
    pub user: u64,
    pub bucket: u64,
}

impl Hashable for UserBucket {
    type Output = u64;
    fn hashed(&self) -> u64 {
        route_hash(self.user)
    }
}

/// A user and an item; routed by the user.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub struct UserItem {
    pub user: u64,
    pub item: u64,
}

impl Hashable for UserItem {
    type Output = u64;
    fn hashed(&self) -> u64 {
        route_hash(self.user)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn every_key_routes_like_its_user() {
        for user in [0u64, 1, 7, u64::MAX, 0xDEAD_BEEF] {
            for peers in [1usize, 2, 3, 4, 7] {
                let w = owner(user, peers);
                assert_eq!((UserKey(user).hashed() % peers as u64) as usize, w);
                let ub = UserBucket { user, bucket: 99 };
                assert_eq!((ub.hashed() % peers as u64) as usize, w);
                let ui = UserItem { user, item: 5 };
                assert_eq!((ui.hashed() % peers as u64) as usize, w);
            }
        }
    }

    #[test]
    fn device_order_is_alphabetical() {
        let mut all = [
            Device::Tablet,
            Device::Other,
            Device::Mobile,
            Device::Desktop,
        ];
        all.sort();
        let names: Vec<_> = all.iter().map(|d| d.as_str()).collect();
        let mut sorted = names.clone();
        sorted.sort();
        assert_eq!(names, sorted);
    }
}
