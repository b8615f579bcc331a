//! A from-scratch reference of SPEC §2 (validation, de-duplication) and §4 (profile fields).
//!
//! Deliberately naive and independent of the engine: it reads lines as `serde_json::Value`,
//! keeps every accepted event in memory and recomputes each field by the definition.
//! Conflicting duplicates keep the event with the smallest `ts` (tests only generate
//! conflicts that differ in `ts`).

use serde_json::{json, Map, Value};
use std::collections::{BTreeMap, BTreeSet, HashMap};

pub const GAP: u64 = 30 * 60 * 1000;
pub const WINDOWS: [(&str, u64); 3] = [("1h", 3_600_000), ("24h", 86_400_000), ("7d", 604_800_000)];
const ITEM_TYPES: [&str; 4] = [
    "product_view",
    "add_to_cart",
    "remove_from_cart",
    "purchase",
];

fn weight(kind: &str) -> f64 {
    match kind {
        "page_view" | "click" | "search" => 1.0,
        "product_view" => 2.0,
        "add_to_cart" => 5.0,
        "purchase" => 20.0,
        _ => 1.0,
    }
}

/// The user agents the generators use, and what each is.
pub const USER_AGENTS: [(&str, &str); 3] = [
    (
        "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile/15E148",
        "mobile",
    ),
    (
        "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/120.0",
        "desktop",
    ),
    ("Mozilla/5.0 (iPad; CPU OS 17_0 like Mac OS X)", "tablet"),
];

#[derive(Clone, Debug, PartialEq)]
pub struct Ev {
    pub id: String,
    pub user: String,
    pub kind: String,
    pub ts: u64,
    pub item: Option<String>,
    pub value: f64,
    pub device: Option<String>,
    /// `consent` records: `properties.personalization`.
    pub granted: Option<bool>,
}

fn id_ok(v: Option<&Value>) -> Option<String> {
    let s = v?.as_str()?;
    (!s.is_empty() && s.len() <= 128).then(|| s.to_string())
}

fn absent(v: Option<&Value>) -> bool {
    v.is_none() || v == Some(&Value::Null)
}

/// The event of a line, or `None` if SPEC §2 rejects it.
pub fn validate(line: &str) -> Option<Ev> {
    if line.len() > 64 * 1024 {
        return None;
    }
    let v: Value = serde_json::from_str(line).ok()?;
    let o = v.as_object()?;
    if !absent(o.get("schema_version")) && o["schema_version"].as_i64() != Some(1) {
        return None;
    }
    let id = id_ok(o.get("event_id"))?;
    let user = id_ok(o.get("user_id"))?;
    let kind = o.get("type")?.as_str()?.to_string();
    let mut chars = kind.chars();
    let first_ok = chars.next().is_some_and(|c| c.is_ascii_lowercase());
    if !first_ok
        || kind.len() > 64
        || !kind
            .chars()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '_')
    {
        return None;
    }
    let ts = match o.get("ts")? {
        Value::Number(n) => n.as_u64()?,
        Value::String(s) => u64::try_from(
            chrono::DateTime::parse_from_rfc3339(s)
                .ok()?
                .timestamp_millis(),
        )
        .ok()?,
        _ => return None,
    };
    let item = if absent(o.get("item_id")) {
        if ITEM_TYPES.contains(&kind.as_str()) {
            return None;
        }
        None
    } else {
        Some(id_ok(o.get("item_id"))?)
    };
    let value = if absent(o.get("value")) {
        0.0
    } else {
        let x = o["value"].as_f64()?;
        if !(x.is_finite() && x >= 0.0) {
            return None;
        }
        x
    };
    for f in ["context", "properties"] {
        if !absent(o.get(f)) && !o[f].is_object() {
            return None;
        }
    }
    let granted = if kind == "consent" {
        Some(o.get("properties")?.get("personalization")?.as_bool()?)
    } else {
        None
    };
    let device = if absent(o.get("device")) {
        None
    } else {
        let d = o["device"].as_object()?;
        match d.get("type").and_then(|t| t.as_str()) {
            Some(t) if ["desktop", "mobile", "tablet", "other"].contains(&t) => Some(t.to_string()),
            Some(_) => return None,
            None => d.get("user_agent").and_then(|u| u.as_str()).map(|ua| {
                USER_AGENTS
                    .iter()
                    .find(|(s, _)| *s == ua)
                    .map(|(_, t)| t.to_string())
                    .unwrap_or_else(|| panic!("unknown UA {ua}"))
            }),
        }
    };
    Some(Ev {
        id,
        user,
        kind,
        ts,
        item,
        value,
        device,
        granted,
    })
}

/// Whether the erasure and consent records of `controls` (one user's) admit an event at `ts`:
/// not erased (no erasure at or after it), not before the last revocation, and after a later
/// grant if there is a revocation.
pub fn admitted(ts: u64, controls: &[&Ev]) -> bool {
    if controls.iter().any(|c| c.kind == "erasure" && ts <= c.ts) {
        return false;
    }
    let revoked = controls
        .iter()
        .filter(|c| c.granted == Some(false))
        .map(|c| c.ts)
        .max();
    match revoked {
        None => true,
        Some(r) => {
            ts > r
                && controls
                    .iter()
                    .any(|c| c.granted == Some(true) && c.ts > r && c.ts <= ts)
        }
    }
}

#[derive(Debug, Default, PartialEq, Eq)]
pub struct Stats {
    pub lines: u64,
    pub accepted: u64,
    pub duplicates: u64,
    pub dead: u64,
}

/// Final catalog: the last record per item wins; deleted or category-less items have none.
pub fn catalog(lines: &[String]) -> HashMap<String, String> {
    let mut cat = HashMap::new();
    for line in lines {
        let Ok(v) = serde_json::from_str::<Value>(line) else {
            continue;
        };
        let Some(item) = v.get("item_id").and_then(|i| i.as_str()) else {
            continue;
        };
        let deleted = v.get("deleted").and_then(|d| d.as_bool()).unwrap_or(false);
        match v.get("category").and_then(|c| c.as_str()) {
            Some(c) if !deleted => cat.insert(item.to_string(), c.to_string()),
            _ => cat.remove(item),
        };
    }
    cat
}

/// Profiles (sorted by user id) of a log, at `now` = the largest accepted `ts`.
pub fn profiles(events: &[String], catalog_lines: &[String]) -> (Vec<Value>, Stats) {
    let (kept, stats) = accepted(events);
    let cat = catalog(catalog_lines);
    let now = kept.values().map(|e| e.ts).max().unwrap_or(0);
    let mut by_user: BTreeMap<String, Vec<Ev>> = BTreeMap::new();
    for e in kept.into_values() {
        by_user.entry(e.user.clone()).or_default().push(e);
    }
    let out = by_user
        .iter()
        .map(|(user, evs)| profile(user, evs, &cat, now))
        .collect();
    (out, stats)
}

/// The accepted, de-duplicated events of a log that erasures and consent admit, by event id,
/// and the counts (`accepted` counts events before erasures and consent apply).
pub fn accepted(events: &[String]) -> (BTreeMap<String, Ev>, Stats) {
    let mut stats = Stats::default();
    let mut kept: BTreeMap<String, Ev> = BTreeMap::new();
    let mut controls: Vec<Ev> = Vec::new();
    for line in events {
        if line.trim().is_empty() {
            continue;
        }
        stats.lines += 1;
        let Some(ev) = validate(line) else {
            stats.dead += 1;
            continue;
        };
        if ev.kind == "erasure" || ev.kind == "consent" {
            controls.push(ev); // facts: no de-duplication, never counted as events
            continue;
        }
        match kept.get(&ev.id) {
            None => {
                kept.insert(ev.id.clone(), ev);
            }
            Some(k) => {
                stats.duplicates += 1;
                if ev.ts < k.ts {
                    kept.insert(ev.id.clone(), ev);
                }
            }
        }
    }
    stats.accepted = kept.len() as u64;
    kept.retain(|_, e| {
        let mine: Vec<&Ev> = controls.iter().filter(|c| c.user == e.user).collect();
        admitted(e.ts, &mine)
    });
    (kept, stats)
}

pub fn profile(user: &str, evs: &[Ev], cat: &HashMap<String, String>, now: u64) -> Value {
    let first = evs.iter().map(|e| e.ts).min().unwrap();
    let last = evs.iter().map(|e| e.ts).max().unwrap();
    let mut counts: BTreeMap<&str, i64> = BTreeMap::new();
    for e in evs {
        *counts.entry(&e.kind).or_default() += 1;
    }
    let mut windows = Map::new();
    let mut week: BTreeMap<&str, i64> = BTreeMap::new();
    for (label, w) in WINDOWS {
        let mut m: BTreeMap<&str, i64> = BTreeMap::new();
        for e in evs.iter().filter(|e| now - w < e.ts && e.ts <= now) {
            *m.entry(&e.kind).or_default() += 1;
        }
        if label == "7d" {
            week = m.clone();
        }
        windows.insert(label.to_string(), json!(m));
    }
    let items: BTreeSet<&str> = evs.iter().filter_map(|e| e.item.as_deref()).collect();
    let mut latest: BTreeMap<&str, u64> = BTreeMap::new();
    for e in evs {
        if let Some(i) = &e.item {
            let t = latest.entry(i).or_insert(0);
            *t = (*t).max(e.ts);
        }
    }
    let mut recent: Vec<(&str, u64)> = latest.into_iter().collect();
    recent.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let recent: Vec<&str> = recent.into_iter().take(10).map(|(i, _)| i).collect();
    let spend: f64 = evs
        .iter()
        .filter(|e| e.kind == "purchase")
        .map(|e| e.value)
        .fold(0.0, |a, b| a + b);
    let devices: BTreeSet<&str> = evs.iter().filter_map(|e| e.device.as_deref()).collect();
    let last_device = evs
        .iter()
        .filter(|e| e.device.is_some())
        .max_by(|a, b| (a.ts, &a.id).cmp(&(b.ts, &b.id)))
        .and_then(|e| e.device.clone());
    let mut cats: BTreeMap<&str, i64> = BTreeMap::new();
    for e in evs {
        if let Some(c) = e.item.as_ref().and_then(|i| cat.get(i)) {
            *cats.entry(c).or_default() += 1;
        }
    }
    let mut cats: Vec<(&str, i64)> = cats.into_iter().collect();
    cats.sort_by(|a, b| b.1.cmp(&a.1).then(a.0.cmp(b.0)));
    let top: Vec<Value> = cats
        .into_iter()
        .take(5)
        .map(|(c, n)| json!({"category": c, "count": n}))
        .collect();
    let mut ts: Vec<u64> = evs.iter().map(|e| e.ts).collect();
    ts.sort_unstable();
    let mut sessions: Vec<(u64, u64, u64)> = Vec::new();
    for t in ts {
        match sessions.last_mut() {
            Some(s) if t - s.1 <= GAP => {
                s.1 = t;
                s.2 += 1;
            }
            _ => sessions.push((t, t, 1)),
        }
    }
    let total: u64 = sessions.iter().map(|s| s.1 - s.0).sum();
    let current = *sessions
        .iter()
        .find(|s| s.0 <= last && last <= s.1)
        .unwrap();
    let score: f64 = week
        .iter()
        .map(|(k, n)| weight(k) * *n as f64)
        .fold(0.0, |a, b| a + b);
    let mut profile = json!({
        "user_id": user, "as_of_ms": now, "first_seen_ms": first, "last_seen_ms": last,
        "event_count": evs.len(), "counts": counts, "windows": windows,
        "distinct_items": items.len(), "recent_items": recent, "total_spend": spend,
        "devices": devices, "last_device": last_device, "top_categories": top,
        "sessions": {"count": sessions.len(), "avg_duration_ms": total / sessions.len() as u64,
                     "current": {"start_ms": current.0, "last_ms": current.1, "events": current.2}},
        "engagement_score": score, "segments": [],
    });
    profile["segments"] = json!(segments(&profile));
    profile
}

/// The default config's segments (config/default.toml), each written out by hand over the
/// profile JSON: the names of those the profile is in, ascending.
pub fn segments(p: &Value) -> Vec<&'static str> {
    let n = |v: &Value| v.as_f64().unwrap_or(0.0);
    let rules: [(&str, bool); 4] = [
        ("buyer", n(&p["counts"]["purchase"]) >= 1.0),
        (
            "cart_abandoner",
            n(&p["windows"]["24h"]["add_to_cart"]) >= 1.0
                && n(&p["windows"]["24h"]["purchase"]) == 0.0,
        ),
        ("engaged", n(&p["engagement_score"]) >= 50.0),
        ("mobile", p["last_device"] == "mobile"),
    ];
    rules
        .into_iter()
        .filter_map(|(name, holds)| holds.then_some(name))
        .collect()
}
