//! Assembles every per-user view into two arrangements keyed by user, and reads profiles out
//! of them at a chosen time.
//!
//! * `basics`: one [`Basics`] record per user.
//! * `features`: small additive records whose multiplicity is their value — counts by type
//!   and device, per-category counts — and one `Recent` record per event within the widest
//!   window, from which window counts of any width are computed at read time.
//!
//! Both are keyed by [`UserKey`] with the same routing, so a profile is two cursor seeks on the
//! one worker that owns the user, at one `as_of`: every answer is consistent at its time.

use crate::basics::{self, Basics};
use crate::event::{route_hash, Device, Event, NameOrder, Time, UserKey};
use crate::recommend::{recommendation_views, RecommendConfig, RecommendViews};
use crate::windows::{self, Ticks};
use crate::{categories, counts, dedup};
use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::cursor::{cursor_list, Cursor, CursorList, Navigable};
use differential_dataflow::trace::implementations::ValSpine;
use differential_dataflow::trace::TraceReader;
use differential_dataflow::AsCollection;
use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
use timely::dataflow::operators::Exchange;
use timely::progress::Antichain;

/// An additive fact about a user: its value is the record's multiplicity.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
pub enum Feature {
    /// All-time count of a type (hash).
    Count(u64),
    /// Events seen on a device type.
    Device(Device),
    /// Item events whose item is currently in this category (hash).
    Category(u64),
    /// An event within the widest window: its time and type hash.
    Recent { ts: u64, kind: u64 },
}

pub type BasicsTrace = TraceAgent<ValSpine<UserKey, Basics, Time, isize>>;
pub type FeatureTrace = TraceAgent<ValSpine<UserKey, Feature, Time, isize>>;

/// The maintained profile arrangements of one worker.
pub struct ProfileTraces {
    pub basics: BasicsTrace,
    pub features: FeatureTrace,
}

/// What the views are built with.
#[derive(Clone)]
pub struct ViewConfig {
    /// How long a `Recent` record is kept after its `ts`: at least the widest window. Replay
    /// keeps it longer so that its final state can also be read at an earlier `now`.
    pub window_retention_ms: u64,
    pub session_gap_ms: u64,
    pub dedup_horizon_ms: u64,
    /// Hash of the type name `purchase`, whose `value`s are spend.
    pub purchase_kind: u64,
    pub names: NameOrder,
}

/// The arrangements every worker maintains.
pub struct Views<'s> {
    pub basics: Arranged<'s, BasicsTrace>,
    pub features: Arranged<'s, FeatureTrace>,
    /// Present when recommendations are on.
    pub recommend: Option<RecommendViews<'s>>,
}

/// Builds every view from raw (not yet de-duplicated) events and the catalog; `refresh` ticks
/// move the recommenders' neighbours and trending lists (`None`: at every time).
pub fn profiles<'s>(
    raw: VecCollection<'s, Time, Event>,
    catalog: VecCollection<'s, Time, (u64, u64)>,
    config: &ViewConfig,
    recommend: Option<&RecommendConfig>,
    refresh: Option<&Ticks<'s>>,
    stats: Arc<dyn dedup::DedupObserver>,
) -> Views<'s> {
    // One move to the user's worker; every view downstream is keyed by user, so their own
    // exchanges then stay on this worker.
    let events = dedup::dedup(raw, config.dedup_horizon_ms, stats)
        .inner
        .exchange(|update: &(Event, Time, isize)| route_hash(update.0.user))
        .as_collection();
    let basics = basics::basics(
        events.clone(),
        config.session_gap_ms,
        config.purchase_kind,
        config.names.clone(),
    )
    .arrange_by_key_named("Arrange: basics");
    let recommend =
        recommend.map(|r| recommendation_views(events.clone(), catalog.clone(), refresh, r));
    let features = counts::counts(events.clone())
        .concat(windows::windows(events.clone(), config.window_retention_ms))
        .concat(categories::categories(events, catalog))
        .arrange_by_key_named("Arrange: features");
    Views {
        basics,
        features,
        recommend,
    }
}

/// The features of one user at one time, with additive values accumulated.
#[derive(Clone, Debug, Default, PartialEq)]
pub struct ProfileState {
    pub basics: Option<Basics>,
    /// (type hash, count), positive only.
    pub counts: Vec<(u64, i64)>,
    /// Sorted.
    pub devices: Vec<Device>,
    /// (category hash, count), positive only.
    pub categories: Vec<(u64, i64)>,
    /// (ts, type hash, count) of events within the widest window, positive only.
    pub recent: Vec<(u64, u64, i64)>,
}

impl ProfileState {
    fn add(&mut self, feature: &Feature, n: isize) {
        if n <= 0 {
            return;
        }
        let n = n as i64;
        match feature {
            Feature::Count(kind) => self.counts.push((*kind, n)),
            Feature::Device(d) => self.devices.push(*d),
            Feature::Category(c) => self.categories.push((*c, n)),
            Feature::Recent { ts, kind } => self.recent.push((*ts, *kind, n)),
        }
    }

    /// Events by type with `now - width < ts <= now`.
    pub fn window(&self, now: u64, width: u64) -> Vec<(u64, i64)> {
        let mut by_kind: BTreeMap<u64, i64> = BTreeMap::new();
        for (ts, kind, n) in &self.recent {
            if *ts <= now && now - ts < width {
                *by_kind.entry(*kind).or_insert(0) += n;
            }
        }
        by_kind.into_iter().collect()
    }
}

/// Why a read could not be served.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ReadError {
    /// `as_of` is not complete yet: wait until the upper frontier passes it.
    NotReady,
    /// `as_of` is older than the compaction frontier: history is gone.
    Compacted,
}

impl ProfileTraces {
    /// The latest time both arrangements have completed, if any.
    pub fn latest(&mut self) -> Option<Time> {
        let (mut a, mut b) = (Antichain::new(), Antichain::new());
        self.basics.read_upper(&mut a);
        self.features.read_upper(&mut b);
        let upper = match (a.as_option(), b.as_option()) {
            (Some(x), Some(y)) => *x.min(y),
            (Some(x), None) | (None, Some(x)) => *x,
            (None, None) => return Some(Time::MAX),
        };
        upper.checked_sub(1)
    }

    /// Lets both arrangements forget history before `as_of` (the oldest time still to be read).
    pub fn compact_to(&mut self, as_of: Time) {
        let since = Antichain::from_elem(as_of);
        self.basics.set_logical_compaction(since.borrow());
        self.features.set_logical_compaction(since.borrow());
        let mut upper = Antichain::new();
        self.basics.read_upper(&mut upper);
        self.basics.set_physical_compaction(upper.borrow());
        self.features.read_upper(&mut upper);
        self.features.set_physical_compaction(upper.borrow());
    }

    fn check(&mut self, as_of: Time) -> Result<(Antichain<Time>, Antichain<Time>), ReadError> {
        let (mut a, mut b) = (Antichain::new(), Antichain::new());
        self.basics.read_upper(&mut a);
        self.features.read_upper(&mut b);
        if a.less_equal(&as_of) || b.less_equal(&as_of) {
            return Err(ReadError::NotReady);
        }
        // Reads below the compaction frontier would be silently wrong.
        if !self.basics.get_logical_compaction().less_equal(&as_of)
            || !self.features.get_logical_compaction().less_equal(&as_of)
        {
            return Err(ReadError::Compacted);
        }
        Ok((a, b))
    }

    /// Cursors over both arrangements through their current uppers.
    fn cursors(
        &mut self,
        upper_b: &Antichain<Time>,
        upper_f: &Antichain<Time>,
    ) -> (Cursors<BasicsTrace>, Cursors<FeatureTrace>) {
        let b = self
            .basics
            .batches_through(upper_b.borrow())
            .expect("reads go through the current upper");
        let f = self
            .features
            .batches_through(upper_f.borrow())
            .expect("reads go through the current upper");
        (cursor_list(b), cursor_list(f))
    }

    /// The profile state of `user` at `as_of`; `Ok(None)` if the user has no events then.
    pub fn read_user(&mut self, user: u64, as_of: Time) -> Result<Option<ProfileState>, ReadError> {
        let (upper_b, upper_f) = self.check(as_of)?;
        let (mut b, mut f) = self.cursors(&upper_b, &upper_f);
        Ok(state_of(&mut b, &mut f, UserKey(user), as_of))
    }

    /// Every user's profile state at `as_of` on this worker, in key order: one pass over both
    /// arrangements, the features cursor only ever seeking forward.
    pub fn read_all(&mut self, as_of: Time) -> Result<Vec<(u64, ProfileState)>, ReadError> {
        let (upper_b, upper_f) = self.check(as_of)?;
        let (mut b, mut f) = self.cursors(&upper_b, &upper_f);
        let mut out = Vec::new();
        while let Some(key) = b.0.get_key(&b.1).copied() {
            if let Some(state) = state_of(&mut b, &mut f, key, as_of) {
                out.push((key.0, state));
            }
            b.0.step_key(&b.1);
        }
        Ok(out)
    }
}

/// A cursor over a trace's batches, with the batches it reads.
type Cursors<Tr> = (
    CursorList<<<Tr as TraceReader>::Batch as Navigable>::Cursor>,
    Vec<<Tr as TraceReader>::Batch>,
);

/// Seeks both cursors (forward) to `key` and accumulates its values at `as_of`.
fn state_of(
    b: &mut Cursors<BasicsTrace>,
    f: &mut Cursors<FeatureTrace>,
    key: UserKey,
    as_of: Time,
) -> Option<ProfileState> {
    let mut state = ProfileState::default();
    b.0.seek_key(&b.1, &key);
    if b.0.get_key(&b.1) == Some(&key) {
        b.0.rewind_vals(&b.1);
        while let Some(val) = b.0.get_val(&b.1) {
            if accumulate(&mut b.0, &b.1, as_of) > 0 {
                state.basics = Some(*val);
            }
            b.0.step_val(&b.1);
        }
    }
    state.basics?;
    f.0.seek_key(&f.1, &key);
    if f.0.get_key(&f.1) == Some(&key) {
        while let Some(val) = f.0.get_val(&f.1) {
            let n = accumulate(&mut f.0, &f.1, as_of);
            state.add(val, n);
            f.0.step_val(&f.1);
        }
    }
    state.devices.sort();
    Some(state)
}

/// The accumulated multiplicity of the cursor's current value at `as_of`.
fn accumulate<C: Cursor<Time = Time, Diff = isize>>(
    cursor: &mut C,
    storage: &C::Storage,
    as_of: Time,
) -> isize {
    let mut n = 0isize;
    cursor.map_times(storage, |t, r| {
        if C::owned_time(t) <= as_of {
            n += C::owned_diff(r);
        }
    });
    n
}
