//! A from-scratch reference of the recommender (README "Recommendations"): recent sets,
//! co-occurrence, Jaccard neighbours, trending lists and scoring, recomputed by definition
//! from the accepted events at one `now`. Naive on purpose: nested loops over everything.

use super::reference::Ev;
use std::collections::{BTreeMap, BTreeSet, HashMap};

pub struct Params {
    pub k: usize,
    pub horizon: u64,
    pub m: usize,
    pub min_co: u64,
    pub window: u64,
    pub popular_size: usize,
    pub exclude_seen: bool,
    /// Recommend recent items touched in two or more events, with similarity 1 to themselves.
    pub returned: bool,
    /// Fill a short list with the recent items (largest weight first) before trending ones.
    pub fill_recent: bool,
    pub boost: f64,
}

/// Interaction weight in thousandths (the defaults of config/default.toml).
fn weight(kind: &str) -> u32 {
    match kind {
        "add_to_cart" => 3000,
        "purchase" => 5000,
        _ => 1000,
    }
}

pub struct Model<'a> {
    events: &'a [Ev],
    cat: &'a HashMap<String, String>,
    p: &'a Params,
    /// user → recent set, item → (weight, touched in two or more events).
    pub recent: BTreeMap<String, BTreeMap<String, (u32, bool)>>,
    pub neighbours: BTreeMap<String, Vec<(String, f64)>>,
}

impl<'a> Model<'a> {
    pub fn new(
        events: &'a [Ev],
        cat: &'a HashMap<String, String>,
        now: u64,
        p: &'a Params,
    ) -> Self {
        let mut recent = BTreeMap::new();
        let users: BTreeSet<&str> = events.iter().map(|e| e.user.as_str()).collect();
        for u in users {
            let mut latest: BTreeMap<&str, (u64, u32, usize)> = BTreeMap::new();
            for e in events
                .iter()
                .filter(|e| e.user == u && e.ts + p.horizon > now)
            {
                let Some(item) = &e.item else { continue };
                let entry = latest.entry(item.as_str()).or_insert((0, 0, 0));
                entry.0 = entry.0.max(e.ts);
                entry.1 = entry.1.max(weight(&e.kind));
                entry.2 += 1;
            }
            let mut order: Vec<(&str, (u64, u32, usize))> = latest.into_iter().collect();
            order.sort_by(|a, b| b.1 .0.cmp(&a.1 .0).then(a.0.cmp(b.0)));
            let set: BTreeMap<String, (u32, bool)> = order
                .into_iter()
                .take(p.k)
                .map(|(i, (_, w, n))| (i.to_string(), (w, n > 1)))
                .collect();
            if !set.is_empty() {
                recent.insert(u.to_string(), set);
            }
        }
        let items: BTreeSet<String> = recent.values().flat_map(|s| s.keys().cloned()).collect();
        let count = |i: &str| recent.values().filter(|s| s.contains_key(i)).count() as u64;
        let both = |i: &str, j: &str| {
            recent
                .values()
                .filter(|s| s.contains_key(i) && s.contains_key(j))
                .count() as u64
        };
        let mut neighbours = BTreeMap::new();
        for i in &items {
            let mut list: Vec<(String, f64)> = Vec::new();
            for j in &items {
                let c = both(i, j);
                if i == j || c < p.min_co.max(1) {
                    continue;
                }
                let (c, a, b) = (c as f64, count(i) as f64, count(j) as f64);
                list.push((j.clone(), c / (a + b - c)));
            }
            list.sort_by(|x, y| y.1.total_cmp(&x.1).then(x.0.cmp(&y.0)));
            list.truncate(p.m);
            if !list.is_empty() {
                neighbours.insert(i.clone(), list);
            }
        }
        Model {
            events,
            cat,
            p,
            recent,
            neighbours: {
                let _ = now;
                neighbours
            },
        }
    }

    /// Trending items of `category` (None: all) at `now`.
    pub fn trending(&self, category: Option<&str>, now: u64) -> Vec<(String, u64)> {
        let mut counts: BTreeMap<&str, u64> = BTreeMap::new();
        for e in self.events.iter().filter(|e| e.ts + self.p.window > now) {
            let Some(item) = &e.item else { continue };
            if category.is_none_or(|c| self.cat.get(item).map(String::as_str) == Some(c)) {
                *counts.entry(item).or_insert(0) += 1;
            }
        }
        let mut list: Vec<(String, u64)> = counts
            .into_iter()
            .map(|(i, n)| (i.to_string(), n))
            .collect();
        list.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(&b.0)));
        list.truncate(self.p.popular_size);
        list
    }

    /// `(item, score, reason)` for `user`; `popular_only` is the popularity strategy.
    pub fn recommend(
        &self,
        user: &str,
        now: u64,
        limit: usize,
        popular_only: bool,
    ) -> Vec<(String, f64, String)> {
        let empty = BTreeMap::new();
        let recent = self.recent.get(user).unwrap_or(&empty);
        let mut excluded: BTreeSet<&str> = self
            .events
            .iter()
            .filter(|e| e.user == user && e.kind == "purchase")
            .filter_map(|e| e.item.as_deref())
            .collect();
        let returns = |returned: bool| returned && self.p.returned && !popular_only;
        if self.p.exclude_seen {
            excluded.extend(
                recent
                    .iter()
                    .filter(|(_, (_, returned))| !returns(*returned))
                    .map(|(i, _)| i.as_str()),
            );
        }
        let mut categories: BTreeMap<&str, i64> = BTreeMap::new();
        for e in self.events.iter().filter(|e| e.user == user) {
            if let Some(c) = e.item.as_ref().and_then(|i| self.cat.get(i)) {
                *categories.entry(c).or_insert(0) += 1;
            }
        }
        let mut out: Vec<(String, f64, String)> = Vec::new();
        if !popular_only {
            // Summed over the recent items in item-id order, as the engine does.
            let mut scores: BTreeMap<&str, (f64, f64, &str)> = BTreeMap::new();
            for (r, (w, returned)) in recent {
                let own = returns(*returned).then_some((r.as_str(), 1.0));
                let listed = self.neighbours.get(r).into_iter().flatten();
                for (c, sim) in listed.map(|(c, s)| (c.as_str(), *s)).chain(own) {
                    if excluded.contains(c) {
                        continue;
                    }
                    let term = f64::from(*w) / 1000.0 * sim;
                    let e = scores.entry(c).or_insert((0.0, f64::MIN, r));
                    e.0 += term;
                    if term > e.1 {
                        e.1 = term;
                        e.2 = r;
                    }
                }
            }
            let total: i64 = categories.values().sum();
            for (item, (mut score, _, because)) in scores {
                if self.p.boost > 0.0 && total > 0 {
                    if let Some(n) = self.cat.get(item).and_then(|c| categories.get(c.as_str())) {
                        score *= 1.0 + self.p.boost * (*n as f64 / total as f64);
                    }
                }
                let reason = if because == item {
                    "you came back to it".to_string()
                } else {
                    format!("viewed together with {because}")
                };
                out.push((item.to_string(), score, reason));
            }
            out.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(&b.0)));
            out.truncate(limit);
        }
        if self.p.fill_recent {
            let purchased: BTreeSet<&str> = self
                .events
                .iter()
                .filter(|e| e.user == user && e.kind == "purchase")
                .filter_map(|e| e.item.as_deref())
                .collect();
            let mut fill: Vec<(&String, u32)> = recent.iter().map(|(i, (w, _))| (i, *w)).collect();
            fill.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
            for (item, w) in fill {
                if out.len() >= limit {
                    break;
                }
                if purchased.contains(item.as_str()) || out.iter().any(|o| &o.0 == item) {
                    continue;
                }
                let reason = "you looked at it recently".to_string();
                out.push((item.clone(), f64::from(w) / 1000.0, reason));
            }
        }
        let mut lists: Vec<Option<&str>> = Vec::new();
        if !popular_only {
            let top = categories
                .iter()
                .filter(|(_, n)| **n > 0)
                .min_by(|a, b| b.1.cmp(a.1).then(a.0.cmp(b.0)));
            lists.extend(top.map(|(c, _)| Some(*c)));
        }
        lists.push(None);
        for list in lists {
            for (item, n) in self.trending(list, now) {
                if out.len() >= limit {
                    break;
                }
                if excluded.contains(item.as_str()) || out.iter().any(|o| o.0 == item) {
                    continue;
                }
                let reason = match list {
                    Some(c) => format!("popular in {c}"),
                    None => "popular now".to_string(),
                };
                out.push((item, n as f64, reason));
            }
        }
        out
    }
}
