//! Hashing of string ids to the `u64` keys the dataflow uses, and the table that maps them back.
//!
//! Ids are hashed once, at parse time, with xxh3 (stable across versions and processes). The
//! strings are kept here, shared by all workers of a process, for output and for the tie rules
//! that SPEC §4 defines on strings. A 64-bit hash makes a collision between two distinct ids
//! vanishingly unlikely (about 2^-64 per pair); it is not detected.

use dashmap::DashMap;
use foldhash::fast::RandomState;
use persona_dataflows::{NameOrder, NO_ITEM};
use std::sync::Arc;

/// The key of a string id. Never [`NO_ITEM`].
pub fn hash(s: &str) -> u64 {
    match xxhash_rust::xxh3::xxh3_64(s.as_bytes()) {
        NO_ITEM => 1,
        h => h,
    }
}

/// Shared hash → string table.
#[derive(Clone, Default)]
pub struct Names {
    table: Arc<DashMap<u64, Arc<str>, RandomState>>,
}

impl Names {
    /// Hashes `s` and remembers its string.
    pub fn intern(&self, s: &str) -> u64 {
        let h = hash(s);
        if !self.table.contains_key(&h) {
            self.table.entry(h).or_insert_with(|| Arc::from(s));
        }
        h
    }

    /// Remembers `s` as the string of `h` (announced by another process of a cluster).
    pub fn insert(&self, h: u64, s: &str) {
        if !self.table.contains_key(&h) {
            self.table.entry(h).or_insert_with(|| Arc::from(s));
        }
    }

    pub fn get(&self, h: u64) -> Option<Arc<str>> {
        self.table.get(&h).map(|s| s.clone())
    }

    /// The string of `h`, or its hash in hex if unknown (never expected).
    pub fn name(&self, h: u64) -> String {
        self.get(h)
            .map(|s| s.to_string())
            .unwrap_or_else(|| format!("#{h:016x}"))
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
