//! Profiles published by the workers, so that `GET /v1/users/{id}` is answered on the HTTP
//! thread without waiting for the owner worker to finish its dataflow step.
//!
//! A worker answers a read between two steps, so a read that arrives during a long step (a
//! large input batch, a recommendations refresh, an arrangement merge) waits for it. Here a
//! worker keeps, for every user some read asked about, that user's [`ProfileState`] and the
//! span of times it is the user's state at. A user's state changes only through updates to its
//! records in the profile arrangements, and every update passes the worker's watch on their
//! batches ([`Publisher::changed`]): an update at `t` ends the entry's span at `t - 1`, and
//! the entry is read again after the step. Windows are computed at render time, so one state
//! serves every `as_of` of its span.
//!
//! Consistency: each worker publishes the time through which every update of its users has
//! been watched (`valid`). An answer from an entry is at the latest time of its span not
//! after that, so it is consistent at its `as_of`, and one user's answers never go back in
//! time. An erasure drops the entry before it is answered, so no read after a `DELETE` sees
//! the erased profile. A read with `min_as_of_ms` beyond an entry's span waits for the worker.
//!
//! Cost: the worker ends one entry's span per updated user per batch, and re-reads each such
//! user once per step (a read it would otherwise do for the next request). Memory: one state
//! per user read since the start (bounded by users, not events); unknown ids are cached up to
//! [`MAX_ABSENT`] entries, so random ids cannot grow it without bound.

use dashmap::DashMap;
use persona_dataflows::ProfileState;
use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::Arc;

/// At most this many "no such user" answers are kept.
pub const MAX_ABSENT: usize = 100_000;

#[derive(Clone)]
struct Entry {
    /// The state is the user's at every time in `as_of..=until`; `until` is `u64::MAX`
    /// while no later update was watched.
    as_of: u64,
    until: u64,
    state: Option<Arc<ProfileState>>,
}

/// A hit: the user's state (`None`: no events) at `as_of`, from local worker `worker`.
pub struct Hit {
    pub as_of: u64,
    pub worker: usize,
    pub state: Option<Arc<ProfileState>>,
}

/// The published profiles of this process's workers.
pub struct ProfileCache {
    enabled: AtomicBool,
    entries: DashMap<u64, Entry>,
    /// Per local worker: 1 + the time through which its updates were watched (0: none yet).
    valid: Vec<AtomicU64>,
    absent: AtomicUsize,
}

impl ProfileCache {
    /// A cache for `workers` local workers, disabled until [`ProfileCache::enable`]: a replay
    /// skips the per-update work, and its `--serve` answers from the workers.
    pub fn new(workers: usize) -> Self {
        ProfileCache {
            enabled: AtomicBool::new(false),
            entries: DashMap::new(),
            valid: (0..workers).map(|_| AtomicU64::new(0)).collect(),
            absent: AtomicUsize::new(0),
        }
    }

    /// Turns the cache on; called before the workers start, never after.
    pub fn enable(&self) {
        self.enabled.store(true, Ordering::Release);
    }

    fn enabled(&self) -> bool {
        self.enabled.load(Ordering::Relaxed)
    }

    /// The state of `user` (owned by local worker `worker`) at a time at or after `min_as_of`,
    /// if it is published.
    pub fn get(&self, user: u64, worker: usize, min_as_of: Option<u64>) -> Option<Hit> {
        if !self.enabled() {
            return None;
        }
        let through = self
            .valid
            .get(worker)?
            .load(Ordering::Acquire)
            .checked_sub(1)?;
        let entry = self.entries.get(&user)?.clone();
        let as_of = entry.as_of.max(through).min(entry.until);
        if min_as_of.is_some_and(|m| as_of < m) {
            return None;
        }
        Some(Hit {
            as_of,
            worker,
            state: entry.state,
        })
    }

    fn insert(&self, user: u64, entry: Entry) {
        if entry.state.is_none() {
            if self.absent.load(Ordering::Relaxed) >= MAX_ABSENT {
                self.remove(user);
                return;
            }
            self.absent.fetch_add(1, Ordering::Relaxed);
        }
        if let Some(old) = self.entries.insert(user, entry) {
            if old.state.is_none() {
                self.absent.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    fn remove(&self, user: u64) {
        if let Some((_, old)) = self.entries.remove(&user) {
            if old.state.is_none() {
                self.absent.fetch_sub(1, Ordering::Relaxed);
            }
        }
    }

    /// Ends the span of `user`'s entry before `time`.
    fn end_span(&self, user: u64, time: u64) {
        if let Some(mut e) = self.entries.get_mut(&user) {
            if e.as_of < time {
                e.until = e.until.min(time - 1);
            }
        }
    }
}

/// One worker's side of the cache: it runs on the worker thread only.
pub struct Publisher {
    cache: Arc<ProfileCache>,
    worker: usize,
    /// Users with updates watched at times not yet published: those times, ascending.
    dirty: HashMap<u64, Vec<u64>>,
}

impl Publisher {
    pub fn new(cache: Arc<ProfileCache>, worker: usize) -> Self {
        Publisher {
            cache,
            worker,
            dirty: HashMap::new(),
        }
    }

    /// An update of `user`'s records at `time` passed the watch.
    pub fn changed(&mut self, user: u64, time: u64) {
        if !self.cache.enabled() {
            return;
        }
        self.cache.end_span(user, time);
        let times = self.dirty.entry(user).or_default();
        if let Err(at) = times.binary_search(&time) {
            times.insert(at, time);
        }
    }

    /// The last time of a span starting at `as_of`: before `user`'s next update after it.
    fn until(&self, user: u64, as_of: u64) -> u64 {
        self.dirty
            .get(&user)
            .and_then(|times| times.iter().find(|&&t| t > as_of))
            .map_or(u64::MAX, |t| t - 1)
    }

    /// A read of `user` at `as_of` (ready on this worker) is published, its span ending before
    /// any later update already watched.
    pub fn offer(&mut self, user: u64, as_of: u64, state: Option<Arc<ProfileState>>) {
        if !self.cache.enabled() {
            return;
        }
        let until = self.until(user, as_of);
        self.cache.insert(
            user,
            Entry {
                as_of,
                until,
                state,
            },
        );
    }

    /// `user` was erased: no read may see their entry any more (called before the erasure is
    /// answered; the next read goes to the worker).
    pub fn erased(&mut self, user: u64) {
        self.cache.remove(user);
    }

    /// After a step: re-reads (with `read`, at `ready`, complete and watched through) the users
    /// whose entries' spans ended before `ready`, then publishes `ready`.
    pub fn publish<E>(
        &mut self,
        ready: u64,
        mut read: impl FnMut(u64) -> Result<Option<ProfileState>, E>,
    ) {
        if !self.cache.enabled() {
            return;
        }
        let due: Vec<u64> = self
            .dirty
            .iter()
            .filter(|(_, times)| times.first().is_some_and(|&t| t <= ready))
            .map(|(user, _)| *user)
            .collect();
        for user in due {
            let stale = self
                .cache
                .entries
                .get(&user)
                .is_some_and(|e| e.until < ready);
            if stale {
                let Ok(state) = read(user) else {
                    // Left dirty: its entry is answered at the end of its span until then.
                    break;
                };
                let until = self.until(user, ready);
                self.cache.insert(
                    user,
                    Entry {
                        as_of: ready,
                        until,
                        state: state.map(Arc::new),
                    },
                );
            }
            if let Some(times) = self.dirty.get_mut(&user) {
                times.retain(|&t| t > ready);
                if times.is_empty() {
                    self.dirty.remove(&user);
                }
            }
        }
        self.cache.valid[self.worker].fetch_max(ready.saturating_add(1), Ordering::Release);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use proptest::prelude::*;
    use std::collections::BTreeMap;

    /// A stand-in profile: the number of changes the user had through the time read.
    fn state(n: i64) -> Option<ProfileState> {
        (n > 0).then(|| ProfileState {
            counts: vec![(0, n)],
            ..ProfileState::default()
        })
    }

    /// The user's changes, by time: the truth the cache is checked against.
    #[derive(Default)]
    struct Truth(HashMap<u64, BTreeMap<u64, i64>>);

    impl Truth {
        fn at(&self, user: u64, t: u64) -> Option<ProfileState> {
            let n = self
                .0
                .get(&user)
                .map_or(0, |m| m.range(..=t).map(|(_, n)| n).sum());
            state(n)
        }
    }

    #[derive(Clone, Debug)]
    enum Op {
        /// Changes watched at `ready + 1 + dt`, then the worker is ready `step` times later
        /// and publishes.
        Step { changes: Vec<(u64, u64)>, step: u64 },
        /// The worker answers a read of the user at its ready time.
        Read(u64),
        /// The HTTP thread reads the user, optionally not before `ready + d`.
        Get(u64, Option<u64>),
    }

    fn op() -> impl Strategy<Value = Op> {
        prop_oneof![
            (prop::collection::vec((0..6u64, 0..3u64), 0..5), 0..3u64)
                .prop_map(|(changes, step)| Op::Step { changes, step }),
            (0..6u64).prop_map(Op::Read),
            (0..6u64, prop::option::of(0..3u64)).prop_map(|(u, d)| Op::Get(u, d)),
        ]
    }

    proptest! {
        /// Every published answer is the user's state at its `as_of`, one user's answers never
        /// go back in time, none is ahead of the worker, and after a step every user read
        /// before is answered at the worker's ready time.
        #[test]
        fn answers_are_consistent(ops in prop::collection::vec(op(), 1..80)) {
            let cache = Arc::new(ProfileCache::new(1));
            cache.enable();
            let mut publisher = Publisher::new(cache.clone(), 0);
            let mut truth = Truth::default();
            let mut ready = 0u64;
            let mut offered = std::collections::HashSet::new();
            let mut last_as_of: HashMap<u64, u64> = HashMap::new();
            publisher.publish::<()>(ready, |u| Ok(truth.at(u, ready)));
            for op in ops {
                match op {
                    Op::Step { changes, step } => {
                        for (user, dt) in changes {
                            let t = ready + 1 + dt;
                            *truth.0.entry(user).or_default().entry(t).or_default() += 1;
                            publisher.changed(user, t);
                        }
                        ready += step;
                        publisher.publish::<()>(ready, |u| Ok(truth.at(u, ready)));
                        for &user in &offered {
                            let hit = cache.get(user, 0, None);
                            prop_assert_eq!(hit.map(|h| h.as_of), Some(ready));
                        }
                    }
                    Op::Read(user) => {
                        publisher.offer(user, ready, truth.at(user, ready).map(Arc::new));
                        offered.insert(user);
                    }
                    Op::Get(user, d) => {
                        let min = d.map(|d| ready + d);
                        let Some(hit) = cache.get(user, 0, min) else {
                            prop_assert!(!offered.contains(&user) || d.unwrap_or(0) > 0);
                            continue;
                        };
                        prop_assert!(hit.as_of <= ready);
                        prop_assert!(min.is_none_or(|m| hit.as_of >= m));
                        prop_assert_eq!(hit.state.as_deref().cloned(), truth.at(user, hit.as_of));
                        let last = last_as_of.entry(user).or_default();
                        prop_assert!(hit.as_of >= *last);
                        *last = hit.as_of;
                    }
                }
            }
        }
    }

    #[test]
    fn an_erased_user_is_not_answered_until_read_again() {
        let cache = Arc::new(ProfileCache::new(1));
        cache.enable();
        let mut publisher = Publisher::new(cache.clone(), 0);
        publisher.offer(7, 3, state(2).map(Arc::new));
        publisher.publish::<()>(3, |_| Ok(None));
        assert!(cache.get(7, 0, None).is_some());
        publisher.erased(7);
        assert!(cache.get(7, 0, None).is_none());
    }

    #[test]
    fn unknown_users_are_cached_up_to_the_limit() {
        let cache = Arc::new(ProfileCache::new(1));
        cache.enable();
        let mut publisher = Publisher::new(cache.clone(), 0);
        publisher.publish::<()>(1, |_| Ok(None));
        for user in 0..(MAX_ABSENT as u64 + 10) {
            publisher.offer(user, 1, None);
        }
        assert_eq!(cache.entries.len(), MAX_ABSENT);
        // A user with a profile is always kept.
        publisher.offer(u64::MAX, 1, state(1).map(Arc::new));
        assert!(cache.get(u64::MAX, 0, None).is_some());
    }

    #[test]
    fn a_disabled_cache_answers_nothing() {
        let cache = Arc::new(ProfileCache::new(1));
        let mut publisher = Publisher::new(cache.clone(), 0);
        publisher.offer(1, 1, state(1).map(Arc::new));
        publisher.publish::<()>(1, |_| Ok(None));
        assert!(cache.get(1, 0, None).is_none());
    }
}
