//! Maintains each user's segment memberships (SPEC §6), keyed by user: `(user, segment)` is
//! present exactly while the segment's rule holds on the user's profile at that time.
//!
//! The rules read the same features a profile shows, from compact facts: the user's
//! [`Basics`], all-time counts and devices, category counts, and one `Window(w, type)` fact per
//! event and window a rule reads that event's type in, present while `now - w < ts <= now`
//! (inserted at `max(arrival, ts)`, retracted at `ts + w`). Only the inputs some rule reads are
//! built, down to the types: `windows.24h.purchase` keeps no facts for page views, whose
//! retractions would otherwise each be a time at which the user's rules run again. A keyed
//! operator keeps those facts per user, applies complete times in order, re-evaluates the rules
//! of every user touched at a time and emits the membership changes, so downstream the
//! membership is an ordinary collection whose changes are the triggers.
//!
//! Cost per event: O(1) fact updates (two per window that reads its type), then one evaluation
//! of every rule for the user, whose cost is bounded by the number of distinct types, categories
//! and windows the user has, never by their history. Memory: per user, those facts and the
//! basics; per event, one pending retraction per window that reads its type, until it is due.

use crate::basics::Basics;
use crate::event::{hold_at, release_to, Device, Event, NameOrder, Time, UserKey};
use crate::profile::Feature;
use crate::rules::{Fields, Needs, Number, Rule};
use crate::windows::release_when_due;
use differential_dataflow::{AsCollection, VecCollection};
use foldhash::HashMap;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::generic::Operator;
use timely::dataflow::operators::{Capability, Exchange};

/// The window index of the engagement score's window in [`Fact::Window`].
const SCORE: u8 = u8::MAX;

/// How many categories count as a user's top categories (SPEC §4).
pub const TOP_CATEGORIES: usize = 5;

/// What segment rules are evaluated with.
#[derive(Clone)]
pub struct SegmentConfig {
    /// The rules, by segment id (the index).
    pub rules: Arc<Vec<Rule>>,
    /// Width of each configured window, in the order rules index them.
    pub windows_ms: Vec<u64>,
    /// The engagement score's window and weights (by type hash; others weigh `default_weight`).
    pub score_window_ms: u64,
    pub weights: Arc<HashMap<u64, f64>>,
    pub default_weight: f64,
    pub names: NameOrder,
}

impl SegmentConfig {
    /// What the rules read, together.
    pub fn needs(&self) -> Needs {
        let mut needs = Needs::default();
        for rule in self.rules.iter() {
            needs.merge(&rule.needs());
        }
        needs
    }
}

/// A fact about a user that some rule reads; its value is its multiplicity. The user's
/// [`Basics`] travel apart: they are five times the size of every other fact.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Fact {
    Feature(Feature),
    /// An event of this type within window `w` (index; [`SCORE`] for the score's window).
    Window(u8, u64),
}

/// The membership of every user, from the de-duplicated events and the profile's own basics,
/// counts and categories collections.
///
/// `events`, `basics` and `counts` must be on their user's worker (exchanged by
/// [`route_hash`](crate::event::route_hash) of the user), as [`crate::profile::profiles`]
/// makes them: the operator reads them where they are.
pub fn segments<'s>(
    events: VecCollection<'s, Time, Event>,
    basics: VecCollection<'s, Time, (UserKey, Basics)>,
    counts: VecCollection<'s, Time, (UserKey, Feature)>,
    categories: VecCollection<'s, Time, (UserKey, Feature)>,
    config: &SegmentConfig,
) -> VecCollection<'s, Time, (UserKey, u32)> {
    let needs = config.needs();
    // Per window read: its fact index, its width and the types read in it.
    let mut widths: Vec<(u8, u64, Kinds)> = Vec::new();
    for &(w, kind) in &needs.windows {
        let (Ok(index), Some(&width)) = (u8::try_from(w), config.windows_ms.get(w)) else {
            continue;
        };
        match widths.last_mut() {
            Some((i, _, Kinds::Only(kinds))) if *i == index => kinds.push(kind),
            _ => widths.push((index, width, Kinds::Only(vec![kind]))),
        }
    }
    if needs.engagement {
        // A type weighing 0 adds nothing to the score.
        let weighed = |zero: bool| {
            let mut kinds: Vec<u64> = config
                .weights
                .iter()
                .filter(|(_, w)| (**w == 0.0) == zero)
                .map(|(k, _)| *k)
                .collect();
            kinds.sort_unstable();
            kinds
        };
        let kinds = if config.default_weight == 0.0 {
            Kinds::Only(weighed(false))
        } else {
            Kinds::AllBut(weighed(true))
        };
        widths.push((SCORE, config.score_window_ms, kinds));
    }
    let scope = events.inner.scope();
    let mut facts: VecCollection<'s, Time, (UserKey, Fact)> =
        VecCollection::new(timely::dataflow::operators::generic::operator::empty(scope));
    if !needs.counts.is_empty() || needs.devices {
        let (kinds, devices) = (needs.counts.clone(), needs.devices);
        facts = facts.concat(counts.flat_map(move |(u, f)| {
            let read = match f {
                Feature::Count(kind) => kinds.binary_search(&kind).is_ok(),
                Feature::Device(_) => devices,
                _ => true,
            };
            read.then_some((u, Fact::Feature(f)))
        }));
    }
    if needs.top_categories {
        // Joined by item, so on the item's worker: move them to the user's.
        let categories = categories
            .inner
            .exchange(|update: &((UserKey, Feature), Time, isize)| {
                crate::event::route_hash((update.0).0 .0)
            })
            .as_collection();
        facts = facts.concat(categories.map(|(u, f)| (u, Fact::Feature(f))));
    }
    if !widths.is_empty() {
        let windowed = events.join_function(move |e: Event| {
            let user = UserKey(e.user);
            // Sealed retractions stand for events far older than any window.
            let widths = if e.is_sealed() { &[][..] } else { &widths[..] };
            widths
                .iter()
                .filter(|(_, _, kinds)| kinds.contain(e.kind))
                .flat_map(|(w, width, _)| {
                    let fact = (user, Fact::Window(*w, e.kind));
                    [
                        (fact, e.ts, 1isize),
                        (fact, e.ts.saturating_add(*width), -1),
                    ]
                })
                .collect::<Vec<_>>()
        });
        facts = facts.concat(release_when_due(windowed));
    }
    membership(facts, basics, config.clone())
}

/// The event types a window's facts are kept for, sorted.
enum Kinds {
    Only(Vec<u64>),
    AllBut(Vec<u64>),
}

impl Kinds {
    fn contain(&self, kind: u64) -> bool {
        match self {
            Kinds::Only(kinds) => kinds.binary_search(&kind).is_ok(),
            Kinds::AllBut(kinds) => kinds.binary_search(&kind).is_err(),
        }
    }
}

/// The keyed operator: facts and basics in, membership changes out.
fn membership<'s>(
    facts: VecCollection<'s, Time, (UserKey, Fact)>,
    basics: VecCollection<'s, Time, (UserKey, Basics)>,
    config: SegmentConfig,
) -> VecCollection<'s, Time, (UserKey, u32)> {
    facts
        .inner
        .binary_frontier(
            basics.inner,
            Pipeline,
            Pipeline,
            "Segments",
            move |_cap, _info| {
                // A replay's window retractions fall on distinct milliseconds, and a map
                // entry, a capability and an output message per time cost more than the work
                // done at it. So: two flat lists, sorted by (time, user) when some time
                // completes, and one capability, at the earliest pending time.
                let mut facts: Vec<(Time, UserKey, Fact, isize)> = Vec::new();
                let mut basics: Vec<(Time, UserKey, Basics, isize)> = Vec::new();
                let mut earliest = Time::MAX;
                let mut held: Option<Capability<Time>> = None;
                let mut users: HashMap<u64, UserFacts> = HashMap::default();
                let mut members: Vec<u32> = Vec::new();
                let mut changes: Vec<((UserKey, u32), Time, isize)> = Vec::new();
                move |(facts_in, facts_frontier), (basics_in, basics_frontier), output| {
                    facts_in.for_each(|cap, data| {
                        for ((user, fact), time, diff) in data.drain(..) {
                            hold_at(&mut held, &cap, time);
                            earliest = earliest.min(time);
                            facts.push((time, user, fact, diff));
                        }
                    });
                    basics_in.for_each(|cap, data| {
                        for ((user, b), time, diff) in data.drain(..) {
                            hold_at(&mut held, &cap, time);
                            earliest = earliest.min(time);
                            basics.push((time, user, b, diff));
                        }
                    });
                    // Times before both frontiers are complete.
                    let bound = facts_frontier
                        .frontier()
                        .iter()
                        .chain(basics_frontier.frontier().iter())
                        .min()
                        .copied()
                        .unwrap_or(Time::MAX);
                    if earliest >= bound {
                        return;
                    }
                    facts.sort_unstable_by_key(|(t, u, ..)| (*t, *u));
                    basics.sort_unstable_by_key(|(t, u, ..)| (*t, *u));
                    let facts_done = facts.partition_point(|(t, ..)| *t < bound);
                    let basics_done = basics.partition_point(|(t, ..)| *t < bound);
                    let (mut f, mut b) = (0, 0);
                    loop {
                        let next_fact = (f < facts_done).then(|| facts[f].0);
                        let next_basics = (b < basics_done).then(|| basics[b].0);
                        let Some(time) = next_fact.into_iter().chain(next_basics).min() else {
                            break;
                        };
                        // User by user (both lists are sorted by user within a time): a user's
                        // state is looked up once, and is still in cache when its rules run.
                        loop {
                            let fact_user =
                                (f < facts_done && facts[f].0 == time).then(|| facts[f].1 .0);
                            let basics_user =
                                (b < basics_done && basics[b].0 == time).then(|| basics[b].1 .0);
                            let Some(user) = fact_user.into_iter().chain(basics_user).min() else {
                                break;
                            };
                            let state = users.entry(user).or_default();
                            while b < basics_done && basics[b].0 == time && basics[b].1 .0 == user {
                                state.apply_basics(&basics[b].2, basics[b].3 as i64);
                                b += 1;
                            }
                            while f < facts_done && facts[f].0 == time && facts[f].1 .0 == user {
                                state.apply(&facts[f].2, facts[f].3 as i64);
                                f += 1;
                            }
                            members.clear();
                            if state.basics.is_some() {
                                let view = View {
                                    facts: state,
                                    config: &config,
                                };
                                members.extend(
                                    config
                                        .rules
                                        .iter()
                                        .enumerate()
                                        .filter(|(_, rule)| rule.eval(&view))
                                        .map(|(id, _)| id as u32),
                                );
                            }
                            if members != state.members {
                                for id in state.members.iter().filter(|m| !members.contains(m)) {
                                    changes.push(((UserKey(user), *id), time, -1isize));
                                }
                                for id in members.iter().filter(|m| !state.members.contains(m)) {
                                    changes.push(((UserKey(user), *id), time, 1isize));
                                }
                                state.members.clone_from(&members);
                            }
                            if state.is_empty() {
                                users.remove(&user);
                            }
                        }
                    }
                    facts.drain(..facts_done);
                    basics.drain(..basics_done);
                    if let Some(cap) = held.as_ref() {
                        if !changes.is_empty() {
                            // Each change keeps its own time, at or after the capability's.
                            output.session(cap).give_iterator(changes.drain(..));
                        }
                    }
                    let next = facts.first().map(|x| x.0).into_iter();
                    let next = next.chain(basics.first().map(|y| y.0)).min();
                    earliest = next.unwrap_or(Time::MAX);
                    release_to(&mut held, next.as_ref());
                }
            },
        )
        .as_collection()
}

/// One user's facts, accumulated.
#[derive(Default)]
struct UserFacts {
    basics: Option<Basics>,
    /// Present Basics records with their multiplicity: a time's retraction and insertion may
    /// arrive in either order.
    basics_in: Vec<(Basics, i64)>,
    counts: Vec<(u64, i64)>,
    devices: [i64; 4],
    categories: Vec<(u64, i64)>,
    /// `(window, type)` → events, sorted (the score sums in type order, as a profile does).
    windows: BTreeMap<(u8, u64), i64>,
    /// Segments the user is in, as last emitted, ascending.
    members: Vec<u32>,
}

fn bump(entries: &mut Vec<(u64, i64)>, key: u64, diff: i64) {
    match entries.iter().position(|(k, _)| *k == key) {
        Some(i) => {
            entries[i].1 += diff;
            if entries[i].1 == 0 {
                entries.swap_remove(i);
            }
        }
        None => entries.push((key, diff)),
    }
}

fn device_index(d: Device) -> usize {
    match d {
        Device::Desktop => 0,
        Device::Mobile => 1,
        Device::Other => 2,
        Device::Tablet => 3,
    }
}

impl UserFacts {
    fn apply_basics(&mut self, b: &Basics, diff: i64) {
        match self.basics_in.iter().position(|(x, _)| x == b) {
            Some(i) => {
                self.basics_in[i].1 += diff;
                if self.basics_in[i].1 == 0 {
                    self.basics_in.swap_remove(i);
                }
            }
            None => self.basics_in.push((*b, diff)),
        }
        self.basics = self.basics_in.iter().find(|(_, n)| *n > 0).map(|(b, _)| *b);
    }

    fn apply(&mut self, fact: &Fact, diff: i64) {
        match fact {
            Fact::Feature(Feature::Count(kind)) => bump(&mut self.counts, *kind, diff),
            Fact::Feature(Feature::Device(d)) => self.devices[device_index(*d)] += diff,
            Fact::Feature(Feature::Category(c)) => bump(&mut self.categories, *c, diff),
            Fact::Feature(Feature::Recent { .. }) => {}
            Fact::Window(w, kind) => {
                let n = self.windows.entry((*w, *kind)).or_insert(0);
                *n += diff;
                if *n == 0 {
                    self.windows.remove(&(*w, *kind));
                }
            }
        }
    }

    fn is_empty(&self) -> bool {
        self.basics_in.is_empty()
            && self.counts.is_empty()
            && self.devices == [0; 4]
            && self.categories.is_empty()
            && self.windows.is_empty()
            && self.members.is_empty()
    }
}

/// A user's facts as the fields rules read.
struct View<'a> {
    facts: &'a UserFacts,
    config: &'a SegmentConfig,
}

impl Fields for View<'_> {
    fn number(&self, field: Number) -> f64 {
        let f = self.facts;
        let Some(b) = f.basics.as_ref() else {
            return 0.0;
        };
        let positive = |n: i64| n.max(0) as f64;
        match field {
            Number::EventCount => b.events as f64,
            Number::FirstSeen => b.first as f64,
            Number::LastSeen => b.last as f64,
            Number::DistinctItems => b.distinct_items as f64,
            Number::TotalSpend => b.spend(),
            Number::SessionsCount => b.sessions as f64,
            Number::SessionsAvgDuration => b.avg_duration() as f64,
            Number::CurrentStart => b.current_start as f64,
            Number::CurrentLast => b.last as f64,
            Number::CurrentEvents => b.current_events as f64,
            Number::Count(kind) => f
                .counts
                .iter()
                .find(|(k, _)| *k == kind)
                .map_or(0.0, |(_, n)| positive(*n)),
            Number::Window(w, kind) => u8::try_from(w)
                .ok()
                .and_then(|w| f.windows.get(&(w, kind)))
                .map_or(0.0, |n| positive(*n)),
            Number::EngagementScore => f
                .windows
                .range((SCORE, 0)..=(SCORE, u64::MAX))
                .filter(|(_, n)| **n > 0)
                .map(|((_, kind), n)| {
                    let weight = self
                        .config
                        .weights
                        .get(kind)
                        .copied()
                        .unwrap_or(self.config.default_weight);
                    weight * *n as f64
                })
                .fold(0.0, |a, b| a + b),
        }
    }

    fn last_device(&self) -> Option<Device> {
        self.facts.basics.as_ref().and_then(|b| b.last_device)
    }

    fn has_device(&self, device: Device) -> bool {
        self.facts.devices[device_index(device)] > 0
    }

    fn in_top_categories(&self, category: u64) -> bool {
        let cats = &self.facts.categories;
        let Some(&(_, n)) = cats.iter().find(|(c, n)| *c == category && *n > 0) else {
            return false;
        };
        // Its rank: categories with more events, or as many and a smaller name, come first.
        let names = &self.config.names;
        let ahead = cats
            .iter()
            .filter(|(c, m)| *m > n || (*m == n && *c != category && names(*c, category).is_lt()))
            .count();
        ahead < TOP_CATEGORIES
    }

    fn in_recent_items(&self, item: u64) -> bool {
        self.facts
            .basics
            .as_ref()
            .is_some_and(|b| b.recent_items().contains(&item))
    }
}
