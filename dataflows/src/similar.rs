//! Maintains, per item, its top-M most similar items, from the co-occurrence of items in
//! users' recent sets ([`crate::interactions`]). Keyed by item.
//!
//! `c(i)` is the number of users whose recent set holds item `i`, `c(i, j)` the number holding
//! both. Similarity is computed from those counts as Microsoft Recommenders' SAR does:
//! Jaccard `c(i,j) / (c(i) + c(j) - c(i,j))` (default), cosine `c(i,j) / sqrt(c(i) c(j))`,
//! lift `c(i,j) / (c(i) c(j))`, or the raw count. Pairs seen by fewer than
//! `min_cooccurrence` users are ignored. Each item keeps its `neighbours` best: similarity
//! descending, ties by item id string.
//!
//! Cost: a change to one user's recent set is K pair updates (a self-join on the user, whose
//! set holds at most K items). Re-ranking an item's neighbours reads all its co-occurring
//! items, which grows with its popularity, so the sets' changes reach the join only on refresh
//! ticks ([`crate::windows::refreshed`]): each item is re-ranked at most once per refresh,
//! whatever the event rate, and set changes that cancel within a refresh cost nothing.
//! Memory: one record per co-occurring pair.

use crate::event::{largest, NameOrder, Time, UserKey};
use crate::interactions::Affinity;
use crate::windows::{refreshed, Ticks};
use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};

/// How similarity is computed from co-occurrence counts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Similarity {
    Jaccard,
    Cosine,
    Lift,
    Count,
}

impl Similarity {
    /// From `c(i,j)`, `c(i)` and `c(j)`.
    pub fn score(self, both: u64, a: u64, b: u64) -> f64 {
        let (both, a, b) = (both as f64, a as f64, b as f64);
        match self {
            Similarity::Jaccard => both / (a + b - both),
            Similarity::Cosine => both / (a * b).sqrt(),
            Similarity::Lift => both / (a * b),
            Similarity::Count => both,
        }
    }
}

#[derive(Clone)]
pub struct SimilarConfig {
    /// M: neighbours kept per item.
    pub neighbours: usize,
    pub similarity: Similarity,
    pub min_cooccurrence: u64,
    pub names: NameOrder,
}

/// One of an item's most similar items. `sim_bits` is a non-negative `f64`'s bits, so the
/// derived order is the numeric order.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Neighbour {
    pub item: u64,
    pub sim_bits: u64,
}

impl Neighbour {
    pub fn similarity(&self) -> f64 {
        f64::from_bits(self.sim_bits)
    }
}

/// `(item, neighbour)` for every item with at least one neighbour.
pub fn similar_items<'s>(
    affinity: VecCollection<'s, Time, (UserKey, Affinity)>,
    refresh: Option<&Ticks<'s>>,
    config: &SimilarConfig,
) -> VecCollection<'s, Time, (u64, Neighbour)> {
    // Held until a refresh tick before the self-join (which is bilinear, so its result at a
    // tick is the same): the join then works once per tick on each user's net change, and a
    // set that churns in between (a replay's whole log) costs no pair updates at all.
    let user_items = refreshed(
        affinity.flat_map(|(user, a)| match a {
            Affinity::Recent { item, .. } => Some((user, item)),
            Affinity::Purchased(_) => None,
        }),
        refresh,
    );
    let by_user = user_items
        .clone()
        .arrange_by_key_named("Arrange: recent items");
    let pairs = by_user
        .clone()
        .join_core(by_user, |_user, i: &u64, j: &u64| {
            (i != j).then_some((*j, *i))
        });
    let counts = user_items.map(|(_, item)| item).count();
    // The reduce's input per item `i`: `(j, c(j))` with multiplicity `c(i, j)` for each
    // co-occurring `j`, and `(i, c(i))` once (the join above drops `i == j`, so `co` never
    // holds `(i, (i, _))` and the self pair is the own count). Plain pairs sort
    // and move faster in its arrangement than an enum of the two.
    let co = pairs.join_map(counts.clone(), |j, i, cj| (*i, (*j, *cj as u64)));
    let own = counts.map(|(i, c)| (i, (i, c as u64)));
    let (m, similarity, min_co, names) = (
        config.neighbours,
        config.similarity,
        config.min_cooccurrence.max(1),
        config.names.clone(),
    );
    co.concat(own)
        .reduce_named("TopNeighbours", move |i, input, output| {
            // The input is sorted by `(j, c(j))`.
            let own = input.partition_point(|((j, _), _)| j < i);
            let Some(ci) = input
                .get(own)
                .and_then(|((j, c), _)| (j == i).then_some(*c))
            else {
                return;
            };
            // Positive finite f64s order as their bits do.
            let scored: Vec<(u64, u64)> = input
                .iter()
                .filter(|((j, _), both)| j != i && *both > 0 && *both as u64 >= min_co)
                .map(|((j, cj), both)| (similarity.score(*both as u64, ci, *cj), *j))
                .filter(|(s, _)| s.is_finite() && *s > 0.0)
                .map(|(s, j)| (s.to_bits(), j))
                .collect();
            output.extend(
                largest(scored, m, &names)
                    .into_iter()
                    .map(|(sim_bits, item)| (Neighbour { item, sim_bits }, 1isize)),
            );
        })
}
