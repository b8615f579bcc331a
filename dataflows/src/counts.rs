//! Maintains all-time counts by event type and by device type, keyed by user.
//!
//! Each event becomes a `(user, Count(type))` update, and a `(user, Device(d))` update if it
//! has a device; the profile arrangement accumulates them, so a count is the record's
//! multiplicity. Cost: O(1) per event; memory: one record per (user, type) and (user, device)
//! once compacted.

use crate::event::{Event, Time, UserKey};
use crate::profile::Feature;
use differential_dataflow::VecCollection;

pub fn counts<'s>(
    events: VecCollection<'s, Time, Event>,
) -> VecCollection<'s, Time, (UserKey, Feature)> {
    events.flat_map(|e| {
        let user = UserKey(e.user);
        std::iter::once((user, Feature::Count(e.kind)))
            .chain(e.device.map(|d| (user, Feature::Device(d))))
    })
}
