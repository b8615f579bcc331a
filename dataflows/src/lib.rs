//! persona's differential computations: pure views over user events, no I/O.
//!
//! ```text
//! raw events ─┬─ dedup (by event id) ─┐
//!             └─ erasure, consent ────┴─ gate (by user) ─▶ events ──┬─ basics ─────▶ Basics (first/last seen, spend,
//!                                                                   │                items, last device, sessions)
//!                                                                   │                  └▶ arranged by user: `basics`
//!                                                                   ├─ counts ─────▶ Count(type), Device(d) ─┐
//!                                                                   ├─ windows ────▶ Recent { ts, type } ────┤ arranged by
//! catalog (item → category) ────────────────────────────────────────┴─ categories ─▶ Category(c) ────────────┘ user: `features`
//! ```
//!
//! | view | per event | state |
//! |---|---|---|
//! | [`dedup`] | O(1) | one entry per id within the dedup horizon |
//! | [`gate`] | O(1); an erasure or consent record costs O(the user's events) | every event since the user's last erasure (with a retention: within it, plus sealed counts) |
//! | [`basics`] | O(log n) in the user's history | one ordered entry per distinct (user, ts), (user, item, ts), device event (with a retention: within it, plus one per (user, item) and a sealed summary) |
//! | [`counts`] | 1-2 updates | one record per (user, type / device) |
//! | [`windows`] | 2 updates, O(log pending) | one record per event within the widest window |
//! | [`categories`] | O(1); a catalog change costs O(users of the item) | one record per (item, user) |
//! | [`interactions`] | O(log n + K) | one entry per item event within the horizon; one per (user, purchased item) |
//! | [`similar`] | O(K) pair updates; re-ranking an item is O(its co-items), once per refresh | one record per co-occurring pair; items × M neighbours per worker |
//! | [`popular`] | O(1); re-ranking a list is O(its items), once per refresh | one record per event in the window |
//! | [`segments`] | O(1) facts (2 per window a rule reads) + one evaluation of the rules | per user: its basics and the facts rules read; one pending retraction per event and window read |
//! | [`recommend`] | nothing: a read costs O(K·M) | (reads the three above, and the catalog copied to every worker) |
//!
//! Every key routes by [`event::route_hash`] of the user, so one user's state is on one worker.

pub mod basics;
pub mod categories;
pub mod counts;
pub mod dedup;
pub mod event;
pub mod gate;
pub mod interactions;
pub mod popular;
pub mod profile;
pub mod recommend;
pub mod rules;
pub mod segments;
pub mod similar;
pub mod windows;

pub use basics::{Basics, BasicsState, SealedBasics};
pub use dedup::DedupObserver;
pub use event::{owner, route_hash, Device, Event, NameOrder, Time, UserKey, NO_ITEM, SEALED_ID};
pub use gate::{ControlKinds, GateState, LateObserver, Retention};
pub use interactions::{Affinity, InteractionConfig};
pub use popular::{Popular, PopularConfig};
pub use profile::{
    profiles, Feature, ProfileState, ProfileTraces, ReadError, SegmentTrace, ViewConfig, Views,
};
pub use recommend::{Reason, RecommendConfig, RecommendTraces, Scored, Strategy, StrategyKind};
pub use segments::SegmentConfig;
pub use similar::{Neighbour, SimilarConfig, Similarity};
pub use windows::Ticks;
