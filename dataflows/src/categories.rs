//! Maintains, per user, how many of their item events fall in each catalog category.
//!
//! Item events are joined with the current catalog (`item → category`), so a catalog change
//! moves every affected user's counts retroactively. The profile arrangement accumulates
//! `(user, Category(c))` multiplicities; the top five are picked when a profile is read.
//!
//! Cost: O(1) per event; O(users who touched the item) per catalog change, which is inherent
//! to retroactive categories. Memory: one record per distinct (item, user) and per catalog item.

use crate::event::{Event, Time, UserKey};
use crate::profile::Feature;
use differential_dataflow::VecCollection;

/// `catalog` holds `(item hash, category hash)`, at most one category per item.
pub fn categories<'s>(
    events: VecCollection<'s, Time, Event>,
    catalog: VecCollection<'s, Time, (u64, u64)>,
) -> VecCollection<'s, Time, (UserKey, Feature)> {
    events
        .filter(|e| e.has_item())
        .map(|e| (e.item, e.user))
        .join_map(catalog, |_item, user, category| {
            (UserKey(*user), Feature::Category(*category))
        })
}
