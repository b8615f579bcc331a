//! Builds the recommendation views and reads recommendations out of them at a chosen time.
//!
//! * `affinity` (by user, on the user's worker): the user's recent set and purchases
//!   ([`crate::interactions`]).
//! * `neighbours` (by item), `popular` (by category) and `catalog` (by item): small tables
//!   (items × M, categories × size, items) replicated to every worker, so the user's worker
//!   answers alone.
//!
//! A user's top-N is computed when it is read, from K recent items × M neighbours each: the
//! user's own new events change it at once, and a popular item's neighbour list changing does
//! not fan out to every user holding that item. A read costs O(K·M log(K·M)).
//!
//! Scoring (item-item): `score(c) = Σ weight(r) · sim(r, c)` over the user's recent items `r`
//! (summed in item-id order, so the float result is reproducible); the `reason` is the `r`
//! with the largest term. A strategy with `returned` also recommends the recent items the user
//! came back to (two or more touches within the horizon), each its own neighbour with
//! similarity 1 (SAR's diagonal under Jaccard), even when `exclude_seen`: people return to what
//! they returned to. With a category boost `b`, a candidate whose catalog category holds
//! share `s` of the user's categorised item events scores `score · (1 + b·s)`. Purchased items,
//! and with `exclude_seen` the recent items, are never returned. Lists shorter than asked are
//! filled, with `fill_recent`, from the user's recent items (strongest touch first: on session
//! logs the next touch is often a re-touch), then from the trending list of the user's top
//! category, then from the overall one.

use crate::event::{NameOrder, Time, UserKey};
use crate::interactions::{self, Affinity, InteractionConfig};
use crate::popular::{self, Popular, PopularConfig, ALL};
use crate::profile::ReadError;
use crate::similar::{self, Neighbour, SimilarConfig};
use crate::windows::Ticks;
use differential_dataflow::operators::arrange::arrangement::arrange_core;
use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::cursor::{cursor_list, Cursor};
use differential_dataflow::trace::implementations::{ValBatcher, ValSpine};
use differential_dataflow::trace::TraceReader;
use differential_dataflow::{ExchangeData, VecCollection};
use foldhash::HashMap;
use timely::dataflow::channels::pact::Pipeline;
use timely::dataflow::operators::vec::Broadcast;
use timely::progress::Antichain;

pub type Trace<K, V> = TraceAgent<ValSpine<K, V, Time, isize>>;
pub type AffinityTrace = Trace<UserKey, Affinity>;
pub type NeighbourTrace = Trace<u64, Neighbour>;
pub type PopularTrace = Trace<u64, Popular>;
pub type CatalogTrace = Trace<u64, u64>;

#[derive(Clone)]
pub struct RecommendConfig {
    pub interactions: InteractionConfig,
    pub similar: SimilarConfig,
    pub popular: PopularConfig,
}

/// The arrangements the recommender reads, on one worker.
pub struct RecommendTraces {
    pub affinity: AffinityTrace,
    pub neighbours: NeighbourTrace,
    pub popular: PopularTrace,
    pub catalog: CatalogTrace,
}

/// The recommendation arrangements, as built in the dataflow.
pub struct RecommendViews<'s> {
    pub affinity: Arranged<'s, AffinityTrace>,
    pub neighbours: Arranged<'s, NeighbourTrace>,
    pub popular: Arranged<'s, PopularTrace>,
    pub catalog: Arranged<'s, CatalogTrace>,
}

impl<'s> RecommendViews<'s> {
    pub fn traces(&self) -> RecommendTraces {
        RecommendTraces {
            affinity: self.affinity.trace.clone(),
            neighbours: self.neighbours.trace.clone(),
            popular: self.popular.trace.clone(),
            catalog: self.catalog.trace.clone(),
        }
    }
}

/// Every worker gets all of `c`, arranged in place.
fn replicated<'s, K, V>(c: VecCollection<'s, Time, (K, V)>, name: &str) -> Arranged<'s, Trace<K, V>>
where
    K: ExchangeData + Ord,
    V: ExchangeData + Ord,
{
    arrange_core::<_, _, ValBatcher<K, V, Time, isize>, ValSpine<K, V, Time, isize>>(
        c.inner.broadcast(),
        Pipeline,
        name,
        ValBatcher::new,
    )
}

/// Builds the recommendation views from de-duplicated events (already on their user's worker)
/// and the catalog `(item, category)`. Neighbours and trending lists move on `refresh` ticks
/// (`None`: at every time).
pub fn recommendation_views<'s>(
    events: VecCollection<'s, Time, crate::Event>,
    catalog: VecCollection<'s, Time, (u64, u64)>,
    refresh: Option<&Ticks<'s>>,
    config: &RecommendConfig,
) -> RecommendViews<'s> {
    let affinity = interactions::interactions(events.clone(), &config.interactions);
    let neighbours = similar::similar_items(affinity.clone(), refresh, &config.similar);
    let popular = popular::popular(events, catalog.clone(), refresh, &config.popular);
    RecommendViews {
        affinity: affinity.arrange_by_key_named("Arrange: affinity"),
        neighbours: replicated(neighbours, "Replicate: neighbours"),
        popular: replicated(popular, "Replicate: popular"),
        catalog: replicated(catalog, "Replicate: catalog"),
    }
}

/// What a strategy does.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum StrategyKind {
    /// Item-item neighbours of the user's recent items, filled from trending lists.
    ItemItem,
    /// The overall trending list only (the baseline).
    Popular,
}

#[derive(Clone, Debug, PartialEq)]
pub struct Strategy {
    pub kind: StrategyKind,
    pub exclude_seen: bool,
    /// Recommend the recent items the user came back to (item-item only).
    pub returned: bool,
    /// Fill a short list with the user's recent items before the trending lists.
    pub fill_recent: bool,
    pub category_boost: f64,
}

/// Why an item is recommended.
#[derive(Clone, Copy, Debug, PartialEq)]
pub enum Reason {
    /// Co-occurs with this recent item of the user's.
    Similar(u64),
    /// A recent item the user came back to.
    Returned,
    /// One of the user's recent items, filling a short list.
    Recent,
    /// Trending in this category (`None`: overall).
    Popular(Option<u64>),
}

#[derive(Clone, Debug, PartialEq)]
pub struct Scored {
    pub item: u64,
    pub score: f64,
    pub reason: Reason,
}

/// Values of `key` with positive accumulated multiplicity at `as_of`, in value order.
fn values_at<K, V>(
    trace: &mut Trace<K, V>,
    key: &K,
    as_of: Time,
) -> Result<Vec<(V, isize)>, ReadError>
where
    K: ExchangeData + Ord,
    V: ExchangeData + Ord,
{
    let mut upper = Antichain::new();
    trace.read_upper(&mut upper);
    if upper.less_equal(&as_of) {
        return Err(ReadError::NotReady);
    }
    if !trace.get_logical_compaction().less_equal(&as_of) {
        return Err(ReadError::Compacted);
    }
    let batches = trace
        .batches_through(upper.borrow())
        .expect("reads go through the current upper");
    let (mut cursor, storage) = cursor_list(batches);
    let mut out = Vec::new();
    cursor.seek_key(&storage, key);
    if cursor.get_key(&storage) == Some(key) {
        while let Some(val) = cursor.get_val(&storage) {
            let mut n = 0isize;
            cursor.map_times(&storage, |t, r| {
                if *t <= as_of {
                    n += *r;
                }
            });
            if n > 0 {
                out.push((val.clone(), n));
            }
            cursor.step_val(&storage);
        }
    }
    Ok(out)
}

fn upper_of<K, V>(trace: &mut Trace<K, V>) -> Option<Time>
where
    K: ExchangeData + Ord,
    V: ExchangeData + Ord,
{
    let mut upper = Antichain::new();
    trace.read_upper(&mut upper);
    upper.as_option().copied()
}

fn compact<K, V>(trace: &mut Trace<K, V>, as_of: Time)
where
    K: ExchangeData + Ord,
    V: ExchangeData + Ord,
{
    trace.set_logical_compaction(Antichain::from_elem(as_of).borrow());
    let mut upper = Antichain::new();
    trace.read_upper(&mut upper);
    trace.set_physical_compaction(upper.borrow());
}

impl RecommendTraces {
    /// The latest time every arrangement has completed (`Some(MAX)` once all are closed).
    pub fn latest(&mut self) -> Option<Time> {
        let uppers = [
            upper_of(&mut self.affinity),
            upper_of(&mut self.neighbours),
            upper_of(&mut self.popular),
            upper_of(&mut self.catalog),
        ];
        match uppers.iter().flatten().min() {
            Some(u) => u.checked_sub(1),
            None => Some(Time::MAX),
        }
    }

    pub fn compact_to(&mut self, as_of: Time) {
        compact(&mut self.affinity, as_of);
        compact(&mut self.neighbours, as_of);
        compact(&mut self.popular, as_of);
        compact(&mut self.catalog, as_of);
    }

    /// `item`'s neighbours at `as_of`: similarity descending, ties by item id.
    pub fn similar(
        &mut self,
        item: u64,
        as_of: Time,
        names: &NameOrder,
    ) -> Result<Vec<Neighbour>, ReadError> {
        let mut list: Vec<Neighbour> = values_at(&mut self.neighbours, &item, as_of)?
            .into_iter()
            .map(|(n, _)| n)
            .collect();
        list.sort_by(|a, b| {
            b.similarity()
                .total_cmp(&a.similarity())
                .then_with(|| names(a.item, b.item))
        });
        Ok(list)
    }

    /// The trending list of `category` ([`ALL`]: overall) at `as_of`: count descending, ties
    /// by item id.
    pub fn trending(
        &mut self,
        category: u64,
        as_of: Time,
        names: &NameOrder,
    ) -> Result<Vec<Popular>, ReadError> {
        let mut list: Vec<Popular> = values_at(&mut self.popular, &category, as_of)?
            .into_iter()
            .map(|(p, _)| p)
            .collect();
        list.sort_by(|a, b| b.count.cmp(&a.count).then_with(|| names(a.item, b.item)));
        Ok(list)
    }

    /// `user`'s top `limit` at `as_of`. `categories` are the user's `(category, item events)`
    /// from the profile at the same time.
    pub fn recommend(
        &mut self,
        user: u64,
        categories: &[(u64, i64)],
        as_of: Time,
        strategy: &Strategy,
        limit: usize,
        names: &NameOrder,
    ) -> Result<Vec<Scored>, ReadError> {
        let returns = strategy.returned && strategy.kind == StrategyKind::ItemItem;
        let mut recent: Vec<(u64, u32, bool)> = Vec::new();
        let mut excluded: Vec<u64> = Vec::new();
        let mut purchased: Vec<u64> = Vec::new();
        for (a, _) in values_at(&mut self.affinity, &UserKey(user), as_of)? {
            match a {
                Affinity::Recent {
                    item,
                    weight,
                    returned,
                } => {
                    recent.push((item, weight, returned && returns));
                    if strategy.exclude_seen && !(returned && returns) {
                        excluded.push(item);
                    }
                }
                Affinity::Purchased(item) => {
                    excluded.push(item);
                    purchased.push(item);
                }
            }
        }
        excluded.sort_unstable();
        purchased.sort_unstable();
        let is_excluded = |item: u64| excluded.binary_search(&item).is_ok();
        let mut out: Vec<Scored> = Vec::new();
        if strategy.kind == StrategyKind::ItemItem {
            recent.sort_by(|a, b| names(a.0, b.0));
            // candidate → (score, best term, its recent item; the candidate itself: returned)
            let mut scores: HashMap<u64, (f64, f64, u64)> = HashMap::default();
            for (r, weight, returned) in &recent {
                let w = f64::from(*weight) / 1000.0;
                let own = returned.then_some(Neighbour {
                    item: *r,
                    sim_bits: 1f64.to_bits(),
                });
                for n in self.similar(*r, as_of, names)?.into_iter().chain(own) {
                    if is_excluded(n.item) {
                        continue;
                    }
                    let term = w * n.similarity();
                    let entry = scores.entry(n.item).or_insert((0.0, f64::MIN, *r));
                    entry.0 += term;
                    if term > entry.1 || (term == entry.1 && names(*r, entry.2).is_lt()) {
                        entry.1 = term;
                        entry.2 = *r;
                    }
                }
            }
            let total: i64 = categories.iter().map(|(_, n)| n).sum();
            for (item, (mut score, _, because)) in scores {
                if strategy.category_boost > 0.0 && total > 0 {
                    if let Some((category, _)) = values_at(&mut self.catalog, &item, as_of)?.first()
                    {
                        if let Some((_, n)) = categories.iter().find(|(c, _)| c == category) {
                            let share = *n as f64 / total as f64;
                            score *= 1.0 + strategy.category_boost * share;
                        }
                    }
                }
                out.push(Scored {
                    item,
                    score,
                    reason: if because == item {
                        Reason::Returned
                    } else {
                        Reason::Similar(because)
                    },
                });
            }
            out.sort_by(|a, b| {
                b.score
                    .total_cmp(&a.score)
                    .then_with(|| names(a.item, b.item))
            });
            out.truncate(limit);
        }
        if out.len() < limit && strategy.fill_recent {
            let mut fill: Vec<&(u64, u32, bool)> = recent
                .iter()
                .filter(|(item, _, _)| {
                    purchased.binary_search(item).is_err() && !out.iter().any(|s| s.item == *item)
                })
                .collect();
            fill.sort_by(|a, b| b.1.cmp(&a.1).then_with(|| names(a.0, b.0)));
            for (item, weight, _) in fill.into_iter().take(limit - out.len()) {
                out.push(Scored {
                    item: *item,
                    score: f64::from(*weight) / 1000.0,
                    reason: Reason::Recent,
                });
            }
        }
        if out.len() < limit {
            let mut lists: Vec<Option<u64>> = Vec::new();
            if strategy.kind == StrategyKind::ItemItem {
                let top = categories
                    .iter()
                    .filter(|(_, n)| *n > 0)
                    .min_by(|a, b| b.1.cmp(&a.1).then_with(|| names(a.0, b.0)));
                lists.extend(top.map(|(c, _)| Some(*c)));
            }
            lists.push(None);
            for list in lists {
                for p in self.trending(list.unwrap_or(ALL), as_of, names)? {
                    if out.len() >= limit {
                        break;
                    }
                    if is_excluded(p.item) || out.iter().any(|s| s.item == p.item) {
                        continue;
                    }
                    out.push(Scored {
                        item: p.item,
                        score: p.count as f64,
                        reason: Reason::Popular(list),
                    });
                }
            }
        }
        Ok(out)
    }
}
