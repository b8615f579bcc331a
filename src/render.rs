//! Turns a user's maintained state into the profile JSON of SPEC §4.

use crate::config::{Settings, SCORE_WINDOW_MS};
use crate::names::Names;
use indexmap::IndexMap;
use persona_dataflows::rules::{Fields, Number};
use persona_dataflows::{Device, Neighbour, ProfileState, Reason, Scored};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::sync::Arc;

/// How many categories a profile lists (the rules' `top_categories` is the same list).
pub use persona_dataflows::segments::TOP_CATEGORIES;

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CategoryCount {
    pub category: Name,
    pub count: i64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CurrentSession {
    pub start_ms: u64,
    pub last_ms: u64,
    pub events: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Sessions {
    pub count: u64,
    pub avg_duration_ms: u64,
    pub current: CurrentSession,
}

/// An id string as the name table holds it: shared, so rendering a profile copies no strings.
pub type Name = Arc<str>;

/// A profile, fields in the order SPEC §4 shows them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Profile {
    pub user_id: String,
    pub as_of_ms: u64,
    pub first_seen_ms: u64,
    pub last_seen_ms: u64,
    pub event_count: u64,
    pub counts: BTreeMap<Name, i64>,
    pub windows: IndexMap<String, BTreeMap<Name, i64>>,
    pub distinct_items: i64,
    pub recent_items: Vec<Name>,
    pub total_spend: f64,
    pub devices: Vec<String>,
    pub last_device: Option<String>,
    pub top_categories: Vec<CategoryCount>,
    pub sessions: Sessions,
    pub engagement_score: f64,
    pub segments: Vec<String>,
}

/// Renders `state` (which has basics: the user has events) as of `as_of`.
pub fn profile(
    user_id: String,
    as_of: u64,
    state: &ProfileState,
    names: &Names,
    settings: &Settings,
) -> Option<Profile> {
    let b = state.basics.as_ref()?;
    let counts = state
        .counts
        .iter()
        .map(|(k, n)| (names.shared(*k), *n))
        .collect();
    let windows = settings
        .windows
        .iter()
        .map(|w| {
            (
                w.label.clone(),
                state
                    .window(as_of, w.width_ms)
                    .into_iter()
                    .map(|(k, n)| (names.shared(k), n))
                    .collect(),
            )
        })
        .collect();
    let engagement_score = state
        .window(as_of, SCORE_WINDOW_MS)
        .iter()
        .map(|(k, n)| settings.weight(&names.shared(*k)) * *n as f64)
        // Not `sum()`: an empty f64 sum is -0.0, which JSON would show as `-0.0`.
        .fold(0.0, |a, b| a + b);
    let mut categories: Vec<CategoryCount> = state
        .categories
        .iter()
        .map(|(c, n)| CategoryCount {
            category: names.shared(*c),
            count: *n,
        })
        .collect();
    categories.sort_by(|a, b| {
        b.count
            .cmp(&a.count)
            .then_with(|| a.category.cmp(&b.category))
    });
    categories.truncate(TOP_CATEGORIES);
    Some(Profile {
        user_id,
        as_of_ms: as_of,
        first_seen_ms: b.first,
        last_seen_ms: b.last,
        event_count: b.events,
        counts,
        windows,
        distinct_items: b.distinct_items as i64,
        recent_items: b
            .recent_items()
            .iter()
            .map(|item| names.shared(*item))
            .collect(),
        total_spend: b.spend(),
        devices: state
            .devices
            .iter()
            .map(|d| d.as_str().to_string())
            .collect(),
        last_device: b.last_device.map(|d| d.as_str().to_string()),
        top_categories: categories,
        sessions: Sessions {
            count: b.sessions,
            avg_duration_ms: b.avg_duration(),
            current: CurrentSession {
                start_ms: b.current_start,
                last_ms: b.last,
                events: b.current_events,
            },
        },
        engagement_score,
        segments: state
            .segments
            .iter()
            .filter_map(|id| settings.segments.get(*id as usize).map(|s| s.name.clone()))
            .collect(),
    })
}

/// The human-readable reason for a recommended item.
pub fn reason(reason: &Reason, names: &Names) -> String {
    match reason {
        Reason::Similar(item) => format!("viewed together with {}", names.name(*item)),
        Reason::Returned => "you came back to it".to_string(),
        Reason::Recent => "you looked at it recently".to_string(),
        Reason::Popular(Some(category)) => format!("popular in {}", names.name(*category)),
        Reason::Popular(None) => "popular now".to_string(),
    }
}

/// `GET /v1/users/{id}/recommendations` (SPEC §5).
pub fn recommendations(
    user_id: &str,
    as_of: u64,
    strategy: &str,
    items: &[Scored],
    names: &Names,
) -> serde_json::Value {
    let items: Vec<_> = items
        .iter()
        .map(|s| {
            serde_json::json!({
                "item_id": names.name(s.item),
                "score": s.score,
                "reason": reason(&s.reason, names),
            })
        })
        .collect();
    serde_json::json!({"user_id": user_id, "as_of_ms": as_of, "strategy": strategy, "items": items})
}

/// `GET /v1/items/{id}/similar`: the neighbours with their similarity as the score.
pub fn similar(item_id: &str, as_of: u64, items: &[Neighbour], names: &Names) -> serde_json::Value {
    let items: Vec<_> = items
        .iter()
        .map(|n| {
            serde_json::json!({
                "item_id": names.name(n.item),
                "score": n.similarity(),
                "reason": format!("viewed together with {item_id}"),
            })
        })
        .collect();
    serde_json::json!({"item_id": item_id, "as_of_ms": as_of, "items": items})
}

/// A rendered profile as the fields segment rules read: for a profile shown at another time
/// than its state was read at (a replay's dump), whose segments are the rules over what it
/// shows.
struct Shown<'a> {
    profile: &'a Profile,
    settings: &'a Settings,
}

fn hashed_count(counts: &BTreeMap<Name, i64>, kind: u64) -> f64 {
    counts
        .iter()
        .find(|(name, _)| crate::names::hash(name) == kind)
        .map_or(0.0, |(_, n)| *n as f64)
}

fn device(name: &str) -> Option<Device> {
    [
        Device::Desktop,
        Device::Mobile,
        Device::Other,
        Device::Tablet,
    ]
    .into_iter()
    .find(|d| d.as_str() == name)
}

impl Fields for Shown<'_> {
    fn number(&self, field: Number) -> f64 {
        let p = self.profile;
        match field {
            Number::EventCount => p.event_count as f64,
            Number::FirstSeen => p.first_seen_ms as f64,
            Number::LastSeen => p.last_seen_ms as f64,
            Number::DistinctItems => p.distinct_items as f64,
            Number::TotalSpend => p.total_spend,
            Number::EngagementScore => p.engagement_score,
            Number::SessionsCount => p.sessions.count as f64,
            Number::SessionsAvgDuration => p.sessions.avg_duration_ms as f64,
            Number::CurrentStart => p.sessions.current.start_ms as f64,
            Number::CurrentLast => p.sessions.current.last_ms as f64,
            Number::CurrentEvents => p.sessions.current.events as f64,
            Number::Count(kind) => hashed_count(&p.counts, kind),
            Number::Window(w, kind) => self
                .settings
                .windows
                .get(w)
                .and_then(|w| p.windows.get(&w.label))
                .map_or(0.0, |counts| hashed_count(counts, kind)),
        }
    }

    fn last_device(&self) -> Option<Device> {
        self.profile.last_device.as_deref().and_then(device)
    }

    fn has_device(&self, d: Device) -> bool {
        self.profile.devices.iter().any(|x| x == d.as_str())
    }

    fn in_top_categories(&self, category: u64) -> bool {
        self.profile
            .top_categories
            .iter()
            .any(|c| crate::names::hash(&c.category) == category)
    }

    fn in_recent_items(&self, item: u64) -> bool {
        self.profile
            .recent_items
            .iter()
            .any(|i| crate::names::hash(i) == item)
    }
}

/// The configured segments whose rules hold on `profile` as it shows.
pub fn segments_shown(profile: &Profile, settings: &Settings) -> Vec<String> {
    let shown = Shown { profile, settings };
    settings
        .segments
        .iter()
        .filter(|s| s.rule.eval(&shown))
        .map(|s| s.name.clone())
        .collect()
}
