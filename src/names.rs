//! Hashing of string ids to the `u64` keys the dataflow uses, and the table that maps them back.
//!
//! Ids are hashed once, at parse time, with xxh3 (stable across versions and processes). The
//! strings are kept here, shared by all workers of a process, for output and for the tie rules
//! that SPEC §4 defines on strings. A 64-bit hash makes a collision between two distinct ids
//! vanishingly unlikely (about 2^-64 per pair); it is not detected.

use compact_str::CompactString;
use dashmap::DashMap;
use foldhash::fast::RandomState;
use persona_dataflows::{NameOrder, NO_ITEM, SEALED_ID};
use std::sync::Arc;

/// The key of a string id. Never [`NO_ITEM`] nor [`SEALED_ID`].
pub fn hash(s: &str) -> u64 {
    match xxhash_rust::xxh3::xxh3_64(s.as_bytes()) {
        NO_ITEM => 1,
        SEALED_ID => 2,
        h => h,
    }
}

/// Shared hash → string table.
#[derive(Clone)]
pub struct Names {
    table: Arc<DashMap<u64, Arc<str>, RandomState>>,
    /// Event ids, kept apart: only the `last_device` tie rule reads them, and only until the
    /// event's detail is sealed (`engine.retention`), when they are forgotten. One per device
    /// event: ids of up to 24 bytes are stored inline, without an allocation each.
    event_ids: Arc<DashMap<u64, CompactString, RandomState>>,
    /// The ids named as items (an event's `item_id`, a catalog record's): the table also holds
    /// users, types and categories, which are not items to `/similar`.
    items: Arc<DashMap<u64, (), RandomState>>,
    /// Unique per table (clones share it), for the per-thread cache.
    id: u64,
}

impl Default for Names {
    fn default() -> Self {
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(1);
        Names {
            table: Arc::default(),
            event_ids: Arc::default(),
            items: Arc::default(),
            id: NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed),
        }
    }
}

/// Slots of the per-thread cache of hashes known to be in a table.
const KNOWN_SLOTS: usize = 1 << 14;
/// Mixed into an item's hash for its entry in that cache (the item mark, not the string).
const ITEM_KEY: u64 = 0x9e37_79b9_7f4a_7c15;

thread_local! {
    /// Per thread: the table the cache is for (its id) and a direct-mapped set of hashes
    /// already in it. Hot ids (types, active users, popular items) then skip the table's lock,
    /// which both workers would otherwise touch for every id of every event.
    static KNOWN: std::cell::RefCell<(u64, Vec<u64>)> = const { std::cell::RefCell::new((0, Vec::new())) };
}

impl Names {
    /// Hashes `s` and remembers its string.
    pub fn intern(&self, s: &str) -> u64 {
        let h = hash(s);
        if !self.known_here(h) {
            if !self.table.contains_key(&h) {
                self.table.entry(h).or_insert_with(|| Arc::from(s));
            }
            self.remember_here(h);
        }
        h
    }

    /// [`Names::intern`] for an item id: also remembers that it names an item.
    pub fn intern_item(&self, s: &str) -> u64 {
        let h = self.intern(s);
        // Its own key in the per-thread cache, apart from the string's.
        let key = h.rotate_left(32) ^ ITEM_KEY;
        if !self.known_here(key) {
            self.mark_item(h);
            self.remember_here(key);
        }
        h
    }

    /// Remembers that `h` names an item (announced by another process, or restored).
    pub fn mark_item(&self, h: u64) {
        if !self.items.contains_key(&h) {
            self.items.insert(h, ());
        }
    }

    /// Whether an event or catalog record named `h` as an item.
    pub fn is_item(&self, h: u64) -> bool {
        self.items.contains_key(&h)
    }

    /// Whether this thread's cache holds `key` for this table.
    fn known_here(&self, key: u64) -> bool {
        let slot = (key as usize) & (KNOWN_SLOTS - 1);
        KNOWN.with_borrow(|(owner, set)| *owner == self.id && set[slot] == key)
    }

    fn remember_here(&self, key: u64) {
        let slot = (key as usize) & (KNOWN_SLOTS - 1);
        KNOWN.with_borrow_mut(|(owner, set)| {
            if *owner != self.id {
                *owner = self.id;
                set.clear();
                set.resize(KNOWN_SLOTS, NO_ITEM);
            }
            set[slot] = key;
        });
    }

    /// Remembers `s` as the string of `h` (announced by another process of a cluster).
    pub fn insert(&self, h: u64, s: &str) {
        if !self.table.contains_key(&h) {
            self.table.entry(h).or_insert_with(|| Arc::from(s));
        }
    }

    pub fn get(&self, h: u64) -> Option<Arc<str>> {
        match self.table.get(&h) {
            Some(s) => Some(s.clone()),
            None => self.event_ids.get(&h).map(|s| Arc::from(s.as_str())),
        }
    }

    /// Hashes an event id and remembers its string until [`Names::forget_event_id`].
    pub fn intern_event_id(&self, s: &str) -> u64 {
        let h = hash(s);
        // Event ids are nearly all new: one write lookup, not a read and then a write.
        self.event_ids
            .entry(h)
            .or_insert_with(|| CompactString::new(s));
        h
    }

    /// Remembers `s` as the event id of `h` (announced by another process of a cluster).
    pub fn insert_event_id(&self, h: u64, s: &str) {
        if !self.event_ids.contains_key(&h) {
            self.event_ids
                .entry(h)
                .or_insert_with(|| CompactString::new(s));
        }
    }

    pub fn forget_event_id(&self, h: u64) {
        self.event_ids.remove(&h);
    }

    /// How many ids and names (other than event ids) are remembered.
    pub fn len(&self) -> usize {
        self.table.len()
    }

    pub fn is_empty(&self) -> bool {
        self.table.is_empty()
    }

    /// How many event ids are remembered.
    pub fn event_ids(&self) -> usize {
        self.event_ids.len()
    }

    /// Orders event id hashes by their strings; for the `last_device` tie rule.
    pub fn event_order(&self) -> NameOrder {
        let names = self.clone();
        let get = move |h: u64| match names.event_ids.get(&h) {
            Some(s) => Some(s.clone()),
            None => names.table.get(&h).map(|s| CompactString::new(&**s)),
        };
        Arc::new(move |a: u64, b: u64| {
            if a == b {
                return std::cmp::Ordering::Equal;
            }
            match (get(a), get(b)) {
                (Some(x), Some(y)) => x.cmp(&y),
                _ => a.cmp(&b),
            }
        })
    }

    /// The string of `h`, or its hash in hex if unknown (never expected).
    pub fn name(&self, h: u64) -> String {
        self.shared(h).to_string()
    }

    /// [`Names::name`] without a copy of the string.
    pub fn shared(&self, h: u64) -> Arc<str> {
        self.get(h)
            .unwrap_or_else(|| Arc::from(format!("#{h:016x}").as_str()))
    }

    /// Orders hashes by their strings; for the dataflow's tie rules.
    pub fn order(&self) -> NameOrder {
        let names = self.clone();
        Arc::new(move |a: u64, b: u64| {
            if a == b {
                return std::cmp::Ordering::Equal;
            }
            match (names.get(a), names.get(b)) {
                (Some(x), Some(y)) => x.cmp(&y),
                _ => a.cmp(&b),
            }
        })
    }
}
