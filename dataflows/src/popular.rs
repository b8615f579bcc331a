//! Maintains the trending items: per catalog category, and over all items, the `size` items
//! with the most events within the popularity window. Keyed by category ([`ALL`] for all).
//!
//! An item event counts at `now` while `now - window < ts`: it is inserted on arrival and
//! retracted at `ts + window` (as in [`crate::windows`]). The recommender serves these lists
//! to users without history (cold start) and to fill lists that item-item leaves short.
//!
//! Cost: O(1) per event for the item counts. Ranking a category reads all its items in the
//! window, so counts move only on refresh ticks ([`crate::windows::refreshed`]) and each list
//! is re-ranked at most once per refresh. Memory: one record per event within the window,
//! one count per item.

use crate::event::{largest, Event, NameOrder, Time};
use crate::windows::{refreshed, release_when_due, Ticks};
use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};

/// The key of the list over all items (category hashes are never 0).
pub const ALL: u64 = 0;

#[derive(Clone)]
pub struct PopularConfig {
    pub window_ms: u64,
    /// Items kept per list.
    pub size: usize,
    pub names: NameOrder,
}

/// An item of a trending list and its number of events in the window.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
pub struct Popular {
    pub item: u64,
    pub count: u64,
}

/// `(category or ALL, popular item)`. `catalog` holds `(item, category)`.
pub fn popular<'s>(
    events: VecCollection<'s, Time, Event>,
    catalog: VecCollection<'s, Time, (u64, u64)>,
    refresh: Option<&Ticks<'s>>,
    config: &PopularConfig,
) -> VecCollection<'s, Time, (u64, Popular)> {
    let window = config.window_ms;
    let counted = release_when_due(
        events
            .filter(|e| e.has_item() && !e.is_sealed())
            .join_function(move |e| {
                [
                    (e.item, 0, 1isize),
                    (e.item, e.ts.saturating_add(window), -1),
                ]
            }),
    );
    let counts = refreshed(counted, refresh).count();
    let by_category = counts
        .clone()
        .join_map(catalog, |item, n, category| (*category, (*n, *item)));
    let overall = counts.map(|(item, n)| (ALL, (n, item)));
    let (size, names) = (config.size, config.names.clone());
    by_category
        .concat(overall)
        .reduce_named("TopPopular", move |_category, input, output| {
            let ranked: Vec<(isize, u64)> = input
                .iter()
                .filter(|(_, d)| *d > 0)
                .map(|((n, item), _)| (*n, *item))
                .collect();
            output.extend(largest(ranked, size, &names).into_iter().map(|(n, item)| {
                (
                    Popular {
                        item,
                        count: n as u64,
                    },
                    1isize,
                )
            }));
        })
}
