//! Maintains, per user, the recent interactions the recommender works from: the last K
//! distinct items the user touched within a time horizon, each with its strongest interaction
//! weight, and every item the user ever purchased. Keyed by user.
//!
//! "Recent" at time `now` means an item event with `now - horizon < ts`; the set holds the K
//! items with the latest such touch (newest first, ties by item id string), and an item's
//! weight is the largest type weight among its in-horizon touches; it is `returned` when the
//! user touched it in two or more events within the horizon. Touches age out at
//! `ts + horizon` on a timer, so the set is exact at every time, late events and retractions
//! included.
//!
//! Output records: [`Affinity::Recent`] (one per item of the set, re-emitted only when the set
//! or a weight changes: a re-view of an item already in the set emits nothing) and
//! [`Affinity::Purchased`] (multiplicity = purchases of the item).
//!
//! Cost per event: O(log n + K) in the user's in-horizon touches. Memory: one entry per item
//! event within the horizon (inline while an item has one touch), plus one record per (user,
//! purchased item).

use crate::event::{newest_items, release_to, Event, NameOrder, Pending, Time, UserKey};
use differential_dataflow::{AsCollection, VecCollection};
use foldhash::HashMap;
use serde::{Deserialize, Serialize};
use std::cmp::Reverse;
use std::collections::{BTreeMap, BTreeSet, BinaryHeap};
use std::sync::Arc;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::Capability;

/// What a user's recommendations are computed from.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub enum Affinity {
    /// An item of the user's recent set, with its weight in thousandths, and whether the user
    /// came back to it (two or more in-horizon touches).
    Recent {
        item: u64,
        weight: u32,
        returned: bool,
    },
    /// An item the user bought (never recommended to them).
    Purchased(u64),
}

/// How interactions are weighed and bounded.
#[derive(Clone)]
pub struct InteractionConfig {
    /// K: items kept per user.
    pub recent_items: usize,
    pub horizon_ms: u64,
    /// Type hash → weight in thousandths; other types weigh `default_weight`.
    pub weights: Arc<HashMap<u64, u32>>,
    pub default_weight: u32,
    pub purchase_kind: u64,
    pub names: NameOrder,
}

impl InteractionConfig {
    pub fn weight(&self, kind: u64) -> u32 {
        self.weights
            .get(&kind)
            .copied()
            .unwrap_or(self.default_weight)
    }
}

/// One item's in-horizon touches by one user. Most items are touched once within the
/// horizon, so a single touch is kept inline; ordered maps (one node allocation each, sized
/// for a dozen entries) only from the second.
#[derive(Default)]
enum Touches {
    #[default]
    None,
    /// `(ts, event id)`, its weight and multiplicity.
    One((u64, u64), u32, u64),
    Many {
        /// `(ts, event id)` → (weight, multiplicity).
        times: BTreeMap<(u64, u64), (u32, u64)>,
        /// weight → number of touches with it.
        weights: BTreeMap<u32, u64>,
    },
}

impl Touches {
    fn latest(&self) -> Option<u64> {
        match self {
            Touches::None => None,
            Touches::One((ts, _), ..) => Some(*ts),
            Touches::Many { times, .. } => times.keys().next_back().map(|(ts, _)| *ts),
        }
    }
    fn weight(&self) -> u32 {
        match self {
            Touches::None => 0,
            Touches::One(_, w, _) => *w,
            Touches::Many { weights, .. } => weights.keys().next_back().copied().unwrap_or(0),
        }
    }
    fn returned(&self) -> bool {
        matches!(self, Touches::Many { times, .. } if times.len() > 1)
    }

    /// Adds `n` touches of `key`; returns whether the touch is new.
    fn add(&mut self, key: (u64, u64), weight: u32, n: u64) -> bool {
        // A second distinct touch promotes the inline one to the maps first.
        if let Touches::One(k, w, count) = *self {
            if k != key || w != weight {
                *self = Touches::Many {
                    times: BTreeMap::from([(k, (w, count))]),
                    weights: BTreeMap::from([(w, count)]),
                };
            }
        }
        match self {
            Touches::None => {
                *self = Touches::One(key, weight, n);
                true
            }
            Touches::One(_, _, count) => {
                *count += n;
                false
            }
            Touches::Many { times, weights } => {
                let entry = times.entry(key).or_insert((weight, 0));
                let new = entry.1 == 0;
                entry.1 += n;
                *weights.entry(weight).or_insert(0) += n;
                new
            }
        }
    }

    /// Removes up to `n` touches of `key` (all of them with `None`).
    fn remove(&mut self, key: (u64, u64), n: Option<u64>) {
        match self {
            Touches::None => {}
            Touches::One(k, _, count) => {
                if *k == key {
                    *count -= n.unwrap_or(*count).min(*count);
                    if *count == 0 {
                        *self = Touches::None;
                    }
                }
            }
            Touches::Many { times, weights } => {
                let Some(entry) = times.get_mut(&key) else {
                    return;
                };
                let removed = n.unwrap_or(entry.1).min(entry.1);
                entry.1 -= removed;
                let w = entry.0;
                if entry.1 == 0 {
                    times.remove(&key);
                }
                if let Some(c) = weights.get_mut(&w) {
                    *c = c.saturating_sub(removed);
                    if *c == 0 {
                        weights.remove(&w);
                    }
                }
            }
        }
    }
}

#[derive(Default)]
struct UserItems {
    items: HashMap<u64, Touches>,
    /// `(latest ts, item)` of every item with in-horizon touches.
    latest: BTreeSet<(Reverse<u64>, u64)>,
    /// The recent set last emitted, `(item, weight, returned)` sorted by item.
    emitted: Vec<(u64, u32, bool)>,
}

impl UserItems {
    /// Applies `f` to the touches of `item` and keeps `latest` in step.
    fn with_item<R>(&mut self, item: u64, f: impl FnOnce(&mut Touches) -> R) -> R {
        let touches = self.items.entry(item).or_default();
        let before = touches.latest();
        let r = f(touches);
        let after = touches.latest();
        if after.is_none() {
            self.items.remove(&item);
        }
        if before != after {
            if let Some(t) = before {
                self.latest.remove(&(Reverse(t), item));
            }
            if let Some(t) = after {
                self.latest.insert((Reverse(t), item));
            }
        }
        r
    }

    /// Adds (or removes) `n` touches; returns whether the touch is new.
    fn apply(&mut self, item: u64, ts: u64, id: u64, weight: u32, diff: i64) -> bool {
        let n = diff.unsigned_abs();
        self.with_item(item, |t| {
            if diff > 0 {
                t.add((ts, id), weight, n)
            } else {
                t.remove((ts, id), Some(n));
                false
            }
        })
    }

    /// Drops a touch that aged out (all its multiplicity).
    fn expire(&mut self, item: u64, ts: u64, id: u64) {
        self.with_item(item, |t| t.remove((ts, id), None));
    }

    /// The current recent set, sorted by item.
    fn recent(&self, k: usize, names: &NameOrder) -> Vec<(u64, u32, bool)> {
        let mut out: Vec<(u64, u32, bool)> = newest_items(&self.latest, k, names)
            .iter()
            .map(|(_, item)| {
                let touches = self.items.get(item);
                (
                    *item,
                    touches.map_or(0, Touches::weight),
                    touches.is_some_and(Touches::returned),
                )
            })
            .collect();
        out.sort_unstable();
        out
    }
}

/// A touch's expiry: `(due time, user, item, ts, event id)`.
type Expiry = Reverse<(Time, u64, u64, u64, u64)>;

/// The recent sets and purchases of every user in `events` (de-duplicated, and on their user's
/// worker: exchanged by [`route_hash`](crate::event::route_hash) of the user).
pub fn interactions<'s>(
    events: VecCollection<'s, Time, Event>,
    config: &InteractionConfig,
) -> VecCollection<'s, Time, (UserKey, Affinity)> {
    let purchases = {
        let purchase = config.purchase_kind;
        events
            .clone()
            .filter(move |e| e.kind == purchase && e.has_item())
            .map(|e| (UserKey(e.user), Affinity::Purchased(e.item)))
    };
    let config = config.clone();
    // The events are already on their user's worker: read them where they are.
    let pact = Pipeline;
    let recent = events
        .inner
        .unary_frontier(pact, "RecentItems", move |_cap, _info| {
            let mut pending: Pending<(Event, isize)> = Pending::default();
            let mut users: HashMap<u64, UserItems> = HashMap::default();
            let mut expiries: BinaryHeap<Expiry> = BinaryHeap::new();
            let mut held: Option<Capability<Time>> = None;
            let mut touched: Vec<u64> = Vec::new();
            move |(input, frontier), output| {
                input.for_each(|cap, data| {
                    for (event, time, diff) in data.drain(..) {
                        pending.at(&cap, time).push((event, diff));
                    }
                });
                // One session for the activation, on the earlier of the two capabilities.
                let cap = match (pending.held.as_ref(), held.as_ref()) {
                    (Some(a), Some(b)) if b.time() < a.time() => Some(b.clone()),
                    (a, b) => a.or(b).cloned(),
                };
                let Some(cap) = cap else {
                    return;
                };
                let mut session = output.session(&cap);
                loop {
                    let next_input = pending.by_time.keys().next().copied();
                    let next_expiry = expiries.peek().map(|Reverse(e)| e.0);
                    let Some(time) = next_input.into_iter().chain(next_expiry).min() else {
                        break;
                    };
                    if frontier.less_equal(&time) {
                        break;
                    }
                    let batch = if next_input == Some(time) {
                        pending.by_time.remove(&time).unwrap_or_default()
                    } else {
                        Vec::new()
                    };
                    touched.clear();
                    // Age out first: a touch is recent at `time` only if `time < ts + horizon`.
                    while let Some(Reverse((due, user, item, ts, id))) = expiries.peek().copied() {
                        if due > time {
                            break;
                        }
                        expiries.pop();
                        if let Some(state) = users.get_mut(&user) {
                            state.expire(item, ts, id);
                            touched.push(user);
                        }
                    }
                    for (e, diff) in &batch {
                        let due = e.ts.saturating_add(config.horizon_ms);
                        // Sealed retractions stand for touches older than the horizon.
                        if !e.has_item() || due <= time || e.is_sealed() {
                            continue;
                        }
                        let weight = config.weight(e.kind);
                        let state = users.entry(e.user).or_default();
                        if state.apply(e.item, e.ts, e.id, weight, *diff as i64) {
                            expiries.push(Reverse((due, e.user, e.item, e.ts, e.id)));
                            if held.as_ref().is_none_or(|h| due < *h.time()) {
                                held = Some(cap.delayed(&due));
                            }
                        }
                        touched.push(e.user);
                    }
                    touched.sort_unstable();
                    touched.dedup();
                    for user in &touched {
                        let Some(state) = users.get_mut(user) else {
                            continue;
                        };
                        let new = state.recent(config.recent_items, &config.names);
                        let old = std::mem::take(&mut state.emitted);
                        // Both sorted by item: emit only what changed.
                        let (mut i, mut j) = (0, 0);
                        while i < old.len() || j < new.len() {
                            let (o, n) = (old.get(i), new.get(j));
                            match (o, n) {
                                (Some(a), Some(b)) if a == b => {
                                    i += 1;
                                    j += 1;
                                }
                                (Some(a), Some(b)) if a.0 == b.0 => {
                                    session.give(((UserKey(*user), recent(*a)), time, -1isize));
                                    session.give(((UserKey(*user), recent(*b)), time, 1isize));
                                    i += 1;
                                    j += 1;
                                }
                                (Some(a), Some(b)) if a.0 < b.0 => {
                                    session.give(((UserKey(*user), recent(*a)), time, -1isize));
                                    i += 1;
                                    let _ = b;
                                }
                                (Some(a), None) => {
                                    session.give(((UserKey(*user), recent(*a)), time, -1isize));
                                    i += 1;
                                }
                                (_, Some(b)) => {
                                    session.give(((UserKey(*user), recent(*b)), time, 1isize));
                                    j += 1;
                                }
                                (None, None) => break,
                            }
                        }
                        if state.items.is_empty() {
                            users.remove(user);
                        } else {
                            state.emitted = new;
                        }
                    }
                    release_to(&mut held, expiries.peek().map(|Reverse((next, ..))| next));
                }
                drop(session);
                pending.release();
            }
        })
        .as_collection();
    recent.concat(purchases)
}

fn recent((item, weight, returned): (u64, u32, bool)) -> Affinity {
    Affinity::Recent {
        item,
        weight,
        returned,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn recent_set_keeps_the_newest_k_with_their_strongest_weight_and_returns() {
        let names: NameOrder = Arc::new(|a: u64, b: u64| a.cmp(&b));
        let mut u = UserItems::default();
        u.apply(10, 1, 1, 1000, 1);
        u.apply(11, 2, 2, 1000, 1);
        u.apply(10, 3, 3, 5000, 1);
        u.apply(12, 3, 4, 1000, 1);
        assert_eq!(
            u.recent(2, &names),
            vec![(10, 5000, true), (12, 1000, false)]
        );
        // The strong touch is retracted: the item keeps its weaker one, and its latest ts falls.
        u.apply(10, 3, 3, 5000, -1);
        assert_eq!(
            u.recent(2, &names),
            vec![(11, 1000, false), (12, 1000, false)]
        );
        u.expire(11, 2, 2);
        u.expire(12, 3, 4);
        assert_eq!(u.recent(2, &names), vec![(10, 1000, false)]);
        u.expire(10, 1, 1);
        assert!(u.items.is_empty() && u.latest.is_empty());
        // One touch twice (multiplicity 2), one retraction: the touch stays, and is not a return.
        assert!(u.apply(20, 5, 9, 1000, 1));
        assert!(!u.apply(20, 5, 9, 1000, 1));
        u.apply(20, 5, 9, 1000, -1);
        assert_eq!(u.recent(2, &names), vec![(20, 1000, false)]);
        u.expire(20, 5, 9);
        assert!(u.items.is_empty() && u.latest.is_empty());
    }
}
