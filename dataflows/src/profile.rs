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
use crate::event::{Device, Event, NameOrder, Time, UserKey};
use crate::recommend::{recommendation_views, RecommendConfig, RecommendViews};
use crate::segments::{self, SegmentConfig};
use crate::windows::{self, Ticks};
use crate::{categories, counts, dedup, gate};
use differential_dataflow::operators::arrange::{Arranged, TraceAgent};
use differential_dataflow::trace::cursor::{cursor_list, Cursor, CursorList, Navigable};
use differential_dataflow::trace::implementations::ValSpine;
use differential_dataflow::trace::TraceReader;
use differential_dataflow::VecCollection;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;
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
/// Segment memberships: `(user, segment id)`.
pub type SegmentTrace = TraceAgent<ValSpine<UserKey, u32, Time, isize>>;

/// The maintained profile arrangements of one worker.
pub struct ProfileTraces {
    pub basics: BasicsTrace,
    pub features: FeatureTrace,
    /// Present when segments are configured.
    pub segments: Option<SegmentTrace>,
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
    /// Type hashes of the erasure and consent control records.
    pub controls: gate::ControlKinds,
    pub names: NameOrder,
    /// Orders event ids (the `last_device` tie rule).
    pub event_ids: NameOrder,
    /// Detail older than this behind the clock is sealed (`None`: kept, see [`gate`]).
    pub retention: Option<gate::Retention>,
    /// Hears of the event ids sealed detail no longer needs.
    pub forget_event_id: Option<crate::event::Forget>,
}

/// The arrangements every worker maintains.
pub struct Views<'s> {
    pub basics: Arranged<'s, BasicsTrace>,
    pub features: Arranged<'s, FeatureTrace>,
    /// Present when segments are configured; its batches are the triggers.
    pub segments: Option<Arranged<'s, SegmentTrace>>,
    /// Present when recommendations are on.
    pub recommend: Option<RecommendViews<'s>>,
    /// The admitted input's state, for checkpoints.
    pub gate: gate::GateState,
    /// The basics' sealed parts, for checkpoints with a retention.
    pub basics_state: basics::BasicsState,
}

/// Builds every view from raw (not yet de-duplicated) events and the catalog; `refresh` ticks
/// move the recommenders' neighbours and trending lists (`None`: at every time).
pub fn profiles<'s>(
    raw: VecCollection<'s, Time, Event>,
    catalog: VecCollection<'s, Time, (u64, u64)>,
    config: &ViewConfig,
    recommend: Option<&RecommendConfig>,
    segment_config: Option<&SegmentConfig>,
    refresh: Option<&Ticks<'s>>,
    stats: Arc<dyn dedup::DedupObserver>,
) -> Views<'s> {
    // The gate is the one move to the user's worker; every view downstream is keyed by user,
    // so their own exchanges then stay on this worker.
    let (raw, controls) = gate::split(raw, config.controls);
    let (events, gate) = gate::gate(
        dedup::dedup(raw, config.dedup_horizon_ms, stats),
        controls,
        config.controls,
        config.retention.clone(),
    );
    let (basics, basics_state) = basics::basics(
        events.clone(),
        config.session_gap_ms,
        config.purchase_kind,
        (config.names.clone(), config.event_ids.clone()),
        config.retention.as_ref().map(|r| r.retention_ms),
        config.forget_event_id.clone(),
        config.retention.as_ref().and_then(|r| r.restore_time),
    );
    let recommend =
        recommend.map(|r| recommendation_views(events.clone(), catalog.clone(), refresh, r));
    let counts = counts::counts(events.clone());
    let categories = categories::categories(events.clone(), catalog);
    let segments = segment_config.map(|s| {
        segments::segments(
            events.clone(),
            basics.clone(),
            counts.clone(),
            categories.clone(),
            s,
        )
        .arrange_by_key_named("Arrange: segments")
    });
    let features = counts
        .concat(windows::windows(events, config.window_retention_ms))
        .concat(categories)
        .arrange_by_key_named("Arrange: features");
    Views {
        basics: basics.arrange_by_key_named("Arrange: basics"),
        features,
        segments,
        recommend,
        gate,
        basics_state,
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
    /// Ids of the segments the user is in, ascending.
    pub segments: Vec<u32>,
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
    /// The uppers of every arrangement (basics, features, then segments if any).
    fn uppers(&mut self) -> Vec<Antichain<Time>> {
        let mut out = vec![Antichain::new(), Antichain::new()];
        self.basics.read_upper(&mut out[0]);
        self.features.read_upper(&mut out[1]);
        if let Some(s) = self.segments.as_mut() {
            let mut u = Antichain::new();
            s.read_upper(&mut u);
            out.push(u);
        }
        out
    }

    /// The latest time every arrangement has completed, if any.
    pub fn latest(&mut self) -> Option<Time> {
        let upper = self
            .uppers()
            .iter()
            .filter_map(|u| u.as_option().copied())
            .min();
        match upper {
            Some(u) => u.checked_sub(1),
            None => Some(Time::MAX),
        }
    }

    /// Lets the arrangements forget history before `as_of` (the oldest time still to be read).
    pub fn compact_to(&mut self, as_of: Time) {
        fn compact<Tr: TraceReader<Time = Time>>(trace: &mut Tr, since: &Antichain<Time>) {
            trace.set_logical_compaction(since.borrow());
            let mut upper = Antichain::new();
            trace.read_upper(&mut upper);
            trace.set_physical_compaction(upper.borrow());
        }
        let since = Antichain::from_elem(as_of);
        compact(&mut self.basics, &since);
        compact(&mut self.features, &since);
        if let Some(s) = self.segments.as_mut() {
            compact(s, &since);
        }
    }

    fn check(&mut self, as_of: Time) -> Result<Vec<Antichain<Time>>, ReadError> {
        let uppers = self.uppers();
        if uppers.iter().any(|u| u.less_equal(&as_of)) {
            return Err(ReadError::NotReady);
        }
        // Reads below the compaction frontier would be silently wrong.
        if !self.basics.get_logical_compaction().less_equal(&as_of)
            || !self.features.get_logical_compaction().less_equal(&as_of)
            || self
                .segments
                .as_mut()
                .is_some_and(|s| !s.get_logical_compaction().less_equal(&as_of))
        {
            return Err(ReadError::Compacted);
        }
        Ok(uppers)
    }

    /// Cursors over the arrangements through their current uppers.
    fn cursors(&mut self, uppers: &[Antichain<Time>]) -> ProfileCursors {
        ProfileCursors {
            basics: cursors_of(&mut self.basics, &uppers[0]),
            features: cursors_of(&mut self.features, &uppers[1]),
            segments: self
                .segments
                .as_mut()
                .zip(uppers.get(2))
                .map(|(s, u)| cursors_of(s, u)),
        }
    }

    /// The profile state of `user` at `as_of`; `Ok(None)` if the user has no events then.
    pub fn read_user(&mut self, user: u64, as_of: Time) -> Result<Option<ProfileState>, ReadError> {
        let uppers = self.check(as_of)?;
        let mut c = self.cursors(&uppers);
        Ok(state_of(&mut c, UserKey(user), as_of))
    }

    /// Every user's profile state at `as_of` on this worker, in key order: one pass over the
    /// arrangements, the other cursors only ever seeking forward.
    pub fn read_all(&mut self, as_of: Time) -> Result<Vec<(u64, ProfileState)>, ReadError> {
        let uppers = self.check(as_of)?;
        let mut c = self.cursors(&uppers);
        let mut out = Vec::new();
        while let Some(key) = c.basics.0.get_key(&c.basics.1).copied() {
            if let Some(state) = state_of(&mut c, key, as_of) {
                out.push((key.0, state));
            }
            c.basics.0.step_key(&c.basics.1);
        }
        Ok(out)
    }

    /// How many users are in each segment at `as_of` on this worker (`counts[id]`).
    pub fn segment_counts(&mut self, as_of: Time, segments: usize) -> Result<Vec<u64>, ReadError> {
        let uppers = self.check(as_of)?;
        let mut counts = vec![0u64; segments];
        let Some((mut cursor, storage)) = self.cursors(&uppers).segments else {
            return Ok(counts);
        };
        while cursor.key_valid(&storage) {
            while let Some(id) = cursor.get_val(&storage).copied() {
                if accumulate(&mut cursor, &storage, as_of) > 0 {
                    if let Some(n) = counts.get_mut(id as usize) {
                        *n += 1;
                    }
                }
                cursor.step_val(&storage);
            }
            cursor.step_key(&storage);
        }
        Ok(counts)
    }
}

/// A cursor over a trace's batches, with the batches it reads.
type Cursors<Tr> = (
    CursorList<<<Tr as TraceReader>::Batch as Navigable>::Cursor>,
    Vec<<Tr as TraceReader>::Batch>,
);

fn cursors_of<Tr: TraceReader<Time = Time>>(trace: &mut Tr, upper: &Antichain<Time>) -> Cursors<Tr>
where
    Tr::Batch: Navigable,
{
    let batches = trace
        .batches_through(upper.borrow())
        .expect("reads go through the current upper");
    cursor_list(batches)
}

struct ProfileCursors {
    basics: Cursors<BasicsTrace>,
    features: Cursors<FeatureTrace>,
    segments: Option<Cursors<SegmentTrace>>,
}

/// Seeks the cursors (forward) to `key` and accumulates its values at `as_of`.
fn state_of(c: &mut ProfileCursors, key: UserKey, as_of: Time) -> Option<ProfileState> {
    let mut state = ProfileState::default();
    let b = &mut c.basics;
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
    let f = &mut c.features;
    f.0.seek_key(&f.1, &key);
    if f.0.get_key(&f.1) == Some(&key) {
        while let Some(val) = f.0.get_val(&f.1) {
            let n = accumulate(&mut f.0, &f.1, as_of);
            state.add(val, n);
            f.0.step_val(&f.1);
        }
    }
    if let Some(s) = c.segments.as_mut() {
        s.0.seek_key(&s.1, &key);
        if s.0.get_key(&s.1) == Some(&key) {
            while let Some(id) = s.0.get_val(&s.1).copied() {
                if accumulate(&mut s.0, &s.1, as_of) > 0 {
                    state.segments.push(id);
                }
                s.0.step_val(&s.1);
            }
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
