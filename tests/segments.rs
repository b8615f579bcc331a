//! Segments and triggers (SPEC §6) against a from-scratch reference, on random logs with
//! duplicates, conflicting copies, late events and bad lines, replayed with 1, 2 and 3 workers.
//!
//! The reference knows when each line enters the engine: a replaying worker reads its share of
//! the log (line `i` goes to worker `i % workers`), and with `--triggers` enters each line at its
//! clock once that line is read, the largest `ts` of its share so far less `allowed_lateness`. Membership at time `t` is then the default
//! config's rules, written out by hand ([`support::reference::segments`]), over the reference
//! profile at `now = t` of the lines entered by `t`. The expected triggers are the changes of
//! that membership between the times at which anything can change (entries, event times, and
//! window ends), up to the dump's time.

mod support;

use proptest::prelude::*;
use serde_json::Value;
use std::collections::{BTreeMap, BTreeSet, HashMap};
use support::reference;

const BASE: u64 = 1_700_000_000_000;
const HOUR: u64 = 3_600_000;
const LATENESS: u64 = 5_000;
const TYPES: [&str; 6] = [
    "page_view",
    "product_view",
    "add_to_cart",
    "purchase",
    "click",
    "search",
];

#[derive(Clone, Debug)]
struct Gen {
    user: u8,
    kind: u8,
    /// Hours after BASE, plus milliseconds: logs span about 10 days.
    hours: u64,
    ms: u64,
    item: u8,
    device: u8,
    /// 0: a new event; 1: a copy of an earlier line; 2: an earlier id, another ts; 3: a bad line.
    shape: u8,
}

fn gen() -> impl Strategy<Value = Gen> {
    (
        0u8..4,
        0u8..6,
        0u64..240,
        0u64..3_600_000,
        0u8..5,
        0u8..3,
        prop_oneof![8 => Just(0u8), 1 => Just(1u8), 1 => Just(2u8), 1 => Just(3u8)],
    )
        .prop_map(|(user, kind, hours, ms, item, device, shape)| Gen {
            user,
            kind,
            hours,
            ms,
            item,
            device,
            shape,
        })
}

fn event_line(id: &str, g: &Gen, ts: u64) -> String {
    let kind = TYPES[g.kind as usize];
    let mut v = serde_json::json!({
        "event_id": id, "user_id": format!("u{}", g.user), "type": kind, "ts": ts,
        "item_id": format!("i{}", g.item),
    });
    if kind == "purchase" {
        v["value"] = serde_json::json!(10.0 + g.item as f64);
    }
    match g.device {
        0 => v["device"] = serde_json::json!({"type": "mobile"}),
        1 => v["device"] = serde_json::json!({"type": "desktop"}),
        _ => {}
    }
    v.to_string()
}

/// A log of the generated events; ts roughly in order, with some hours out of place.
fn log(gens: &[Gen]) -> Vec<String> {
    let mut lines: Vec<String> = Vec::new();
    for (n, g) in gens.iter().enumerate() {
        let ts = BASE + g.hours * HOUR + g.ms;
        let line = match (g.shape, n) {
            (1, n) if n > 0 => lines[(g.ms as usize) % lines.len()].clone(),
            (2, n) if n > 0 => {
                // Same id as an earlier event, different content: a conflicting duplicate.
                event_line(&format!("e{}", (g.ms as usize) % n), g, ts)
            }
            (3, _) => format!("{{\"event_id\": \"bad{n}\", \"ts\": \"yesterday\""),
            _ => event_line(&format!("e{n}"), g, ts),
        };
        lines.push(line);
    }
    lines
}

/// A trigger as `(user, as_of_ms, segment, change)`.
type Trigger = (String, u64, String, String);

/// Membership `(user, segment)` at `t`, from the lines entered by `t`.
fn membership(
    lines: &[String],
    entry: &[u64],
    catalog: &HashMap<String, String>,
    t: u64,
) -> BTreeSet<(String, String)> {
    let entered: Vec<String> = lines
        .iter()
        .zip(entry)
        .filter(|(_, e)| **e <= t)
        .map(|(l, _)| l.clone())
        .collect();
    let (kept, _) = reference::accepted(&entered);
    let mut by_user: BTreeMap<String, Vec<reference::Ev>> = BTreeMap::new();
    for e in kept.into_values() {
        by_user.entry(e.user.clone()).or_default().push(e);
    }
    let mut out = BTreeSet::new();
    for (user, evs) in &by_user {
        let profile = reference::profile(user, evs, catalog, t);
        for s in reference::segments(&profile) {
            out.insert((user.clone(), s.to_string()));
        }
    }
    out
}

/// The expected triggers `(user, as_of, segment, change)` of replaying `lines` with `workers`.
fn expected(lines: &[String], workers: usize) -> Vec<Trigger> {
    let valid: Vec<Option<u64>> = lines
        .iter()
        .map(|l| reference::validate(l).map(|e| e.ts))
        .collect();
    // Each worker enters each line of its share at its clock once that line is read: the
    // largest ts of its share so far, less the lateness.
    let mut newest = vec![0u64; workers];
    let entry: Vec<u64> = (0..lines.len())
        .map(|i| {
            let w = i % workers;
            newest[w] = newest[w].max(valid[i].unwrap_or(0));
            newest[w].saturating_sub(LATENESS)
        })
        .collect();
    // The replay's last time is the largest ts parsed (a dropped conflicting copy's included).
    let Some(end) = valid.iter().flatten().max().copied() else {
        return Vec::new();
    };
    let mut times: BTreeSet<u64> = entry.iter().copied().collect();
    for ts in valid.iter().flatten() {
        for d in [0, 24 * HOUR, 7 * 24 * HOUR] {
            times.insert(ts + d);
        }
    }
    let catalog = HashMap::new();
    let mut before = BTreeSet::new();
    let mut out = Vec::new();
    for &t in times.range(..=end) {
        let now = membership(lines, &entry, &catalog, t);
        for (u, s) in before.difference(&now) {
            out.push((u.clone(), t, s.clone(), "exit".to_string()));
        }
        for (u, s) in now.difference(&before) {
            out.push((u.clone(), t, s.clone(), "enter".to_string()));
        }
        before = now;
    }
    out.sort();
    out
}

/// Replays `lines` with `persona replay --triggers`; the triggers and the dump.
fn replay(lines: &[String], workers: usize) -> (Vec<Trigger>, Vec<Value>) {
    replay_with(lines, workers, None)
}

/// [`replay`] with a config file's text.
fn replay_with(
    lines: &[String],
    workers: usize,
    config: Option<&str>,
) -> (Vec<Trigger>, Vec<Value>) {
    let dir = tempfile::tempdir().unwrap();
    let (events, _) = support::write_log(dir.path(), lines, &[]);
    let mut extra: Vec<std::ffi::OsString> = Vec::new();
    if let Some(text) = config {
        let path = dir.path().join("persona.toml");
        std::fs::write(&path, text).unwrap();
        extra.extend(["--config".into(), path.into_os_string()]);
    }
    let (triggers, dump) = (
        dir.path().join("triggers.jsonl"),
        dir.path().join("dump.jsonl"),
    );
    let out = std::process::Command::new(env!("CARGO_BIN_EXE_persona"))
        .args(["replay", "--events"])
        .arg(&events)
        .arg("--triggers")
        .arg(&triggers)
        .arg("--dump")
        .arg(&dump)
        .arg("--dead-letters")
        .arg(dir.path().join("dead.jsonl"))
        .args(["--workers", &workers.to_string()])
        .args(&extra)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "replay failed: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    let read = |p: &std::path::Path| -> Vec<Value> {
        std::fs::read_to_string(p)
            .unwrap_or_default()
            .lines()
            .map(|l| serde_json::from_str(l).unwrap())
            .collect()
    };
    let mut got: Vec<Trigger> = read(&triggers)
        .iter()
        .map(|t| {
            (
                t["user_id"].as_str().unwrap().to_string(),
                t["as_of_ms"].as_u64().unwrap(),
                t["segment"].as_str().unwrap().to_string(),
                t["change"].as_str().unwrap().to_string(),
            )
        })
        .collect();
    // Per user the file is in time order already; across users workers interleave.
    let mut last: HashMap<String, u64> = HashMap::new();
    for (u, t, _, _) in &got {
        let prev = last.insert(u.clone(), *t).unwrap_or(0);
        assert!(prev <= *t, "triggers of {u} out of time order");
    }
    got.sort();
    (got, read(&dump))
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 64, ..ProptestConfig::default() })]

    #[test]
    fn triggers_and_segments_match_the_reference(
        gens in prop::collection::vec(gen(), 1..60),
        workers in 1usize..4,
    ) {
        let lines = log(&gens);
        let (got, dump) = replay(&lines, workers);
        let want = expected(&lines, workers);
        prop_assert_eq!(&got, &want, "triggers, {} workers", workers);
        // The dump's segments are the rules over the dump's own profile, and where the
        // triggers leave each user.
        let as_of = dump.first().and_then(|p| p["as_of_ms"].as_u64()).unwrap_or(0);
        let mut member: BTreeSet<(String, String)> = BTreeSet::new();
        for (u, _, s, change) in got.iter().filter(|t| t.1 <= as_of) {
            if change == "enter" {
                member.insert((u.clone(), s.clone()));
            } else {
                member.remove(&(u.clone(), s.clone()));
            }
        }
        // Triggers run to the largest ts parsed; the dump shows the largest kept one.
        let horizon = lines.iter().filter_map(|l| reference::validate(l)).map(|e| e.ts).max();
        for p in &dump {
            let user = p["user_id"].as_str().unwrap();
            let listed: Vec<&str> = p["segments"].as_array().unwrap().iter().map(|s| s.as_str().unwrap()).collect();
            prop_assert_eq!(&listed, &reference::segments(p), "segments of {}", user);
            let held: Vec<&str> = member.iter().filter(|(u, _)| u == user).map(|(_, s)| s.as_str()).collect();
            if horizon == Some(as_of) {
                prop_assert_eq!(&listed, &held, "triggers of {} end where the dump is", user);
            }
        }
    }
}

/// Each event's effects happen at its own `ts`, though the log enters in one batch: a cart
/// left a day before the log ends enters `cart_abandoner` and leaves it 24 hours later, and a
/// purchase a second after a cart is a second of membership.
#[test]
fn triggers_follow_the_log_record_by_record() {
    let t = BASE;
    let lines = [
        serde_json::json!({"event_id": "t1", "user_id": "tu", "type": "add_to_cart", "ts": t,
            "item_id": "a", "device": {"type": "mobile"}}),
        serde_json::json!({"event_id": "t2", "user_id": "tu", "type": "purchase", "ts": t + 1_000,
            "item_id": "a", "value": 1.0}),
        serde_json::json!({"event_id": "t3", "user_id": "tu", "type": "click", "ts": t + 2_000,
            "device": {"type": "desktop"}}),
        serde_json::json!({"event_id": "t4", "user_id": "tv", "type": "add_to_cart",
            "ts": t + 3_000, "item_id": "a"}),
        serde_json::json!({"event_id": "t5", "user_id": "tw", "type": "click",
            "ts": t + 100_000_000}),
    ]
    .map(|v| v.to_string());
    let trigger =
        |u: &str, at: u64, s: &str, c: &str| (u.to_string(), at, s.to_string(), c.to_string());
    let mut want = vec![
        trigger("tu", t, "cart_abandoner", "enter"),
        trigger("tu", t, "mobile", "enter"),
        trigger("tu", t + 1_000, "buyer", "enter"),
        trigger("tu", t + 1_000, "cart_abandoner", "exit"),
        trigger("tu", t + 2_000, "mobile", "exit"),
        trigger("tv", t + 3_000, "cart_abandoner", "enter"),
        trigger("tv", t + 3_000 + 24 * HOUR, "cart_abandoner", "exit"),
    ];
    want.sort();
    for workers in [1, 2] {
        let (got, _) = replay_with(
            &lines,
            workers,
            Some("[engine]\nallowed_lateness = \"0s\"\n"),
        );
        assert_eq!(got, want, "{workers} workers");
    }
}

/// The same log replayed twice gives the same trigger sequence.
#[test]
fn replaying_twice_gives_the_same_triggers() {
    let gens: Vec<Gen> = (0..400u64)
        .map(|n| Gen {
            user: (n % 7) as u8 % 4,
            kind: (n * 5 % 6) as u8,
            hours: n * 3 % 230,
            ms: n * 7919 % 3_600_000,
            item: (n % 5) as u8,
            device: (n % 3) as u8,
            shape: if n % 11 == 0 { 1 } else { 0 },
        })
        .collect();
    let lines = log(&gens);
    for workers in [1, 2] {
        let (first, _) = replay(&lines, workers);
        let (second, _) = replay(&lines, workers);
        assert!(!first.is_empty());
        assert_eq!(first, second, "{workers} workers");
    }
}

/// Each user's segments as its triggers leave them.
fn held(triggers: &[Trigger]) -> BTreeSet<(String, String)> {
    let mut member = BTreeSet::new();
    for (u, _, s, change) in triggers {
        if change == "enter" {
            member.insert((u.clone(), s.clone()));
        } else {
            member.remove(&(u.clone(), s.clone()));
        }
    }
    member
}

/// Rules see only the window facts of the types they read, and the score only those of
/// types that weigh something; what they see must still be what the profile shows.
#[test]
fn rules_read_only_the_types_they_name() {
    let line = |n: usize, user: &str, kind: &str, minutes: u64| {
        let mut v = serde_json::json!({
            "event_id": format!("e{n}"), "user_id": user, "type": kind,
            "ts": BASE + minutes * 60_000, "item_id": "i1",
        });
        if kind == "purchase" {
            v["value"] = serde_json::json!(5.0);
        }
        v.to_string()
    };
    let mut lines = Vec::new();
    let mut add = |user: &str, kind: &str, minutes: &[u64]| {
        for m in minutes {
            lines.push(line(lines.len(), user, kind, *m));
        }
    };
    // The log ends at minute 180: two clicks in its last hour are busy, and page views around
    // them count for nothing; a search among them is not.
    add("clicker", "click", &[170, 175]);
    add("clicker", "page_view", &[171, 172, 173]);
    add("searcher", "click", &[170, 175]);
    add("searcher", "search", &[176]);
    // Page views weigh nothing; one purchase weighs 60, five shares 10 each by default (a
    // type no default weight names).
    add("viewer", "page_view", &(0..100).collect::<Vec<_>>());
    add("buyer", "page_view", &[1, 2, 3]);
    add("buyer", "purchase", &[4]);
    add("sharer", "share", &[5, 6, 7, 8, 9]);
    add("late", "page_view", &[180]);
    // Devices are read with no `counts.<type>` rule.
    lines.push(
        serde_json::json!({"event_id": "phone-1", "user_id": "phone", "type": "page_view",
            "ts": BASE + 60_000, "device": {"type": "mobile"}})
        .to_string(),
    );
    let rules = "[segments]\nengaged = \"engagement_score >= 50\"\n\
                 busy = \"windows.1h.click >= 2 && windows.1h.search == 0\"\n\
                 on_mobile = \"'mobile' in devices\"\n";
    let pair = |u: &str, s: &str| (u.to_string(), s.to_string());
    let always = [pair("clicker", "busy"), pair("phone", "on_mobile")];
    for (default_weight, engaged) in [("0.0", vec!["buyer"]), ("10.0", vec!["buyer", "sharer"])] {
        let members: Vec<_> = engaged
            .iter()
            .map(|u| pair(u, "engaged"))
            .chain(always.iter().cloned())
            .collect();
        let config = format!(
            "[engine]\ndefault_weight = {default_weight}\n\
             [engine.weights]\npage_view = 0.0\npurchase = 60.0\n{rules}"
        );
        for workers in [1, 2] {
            let (triggers, dump) = replay_with(&lines, workers, Some(&config));
            let what = format!("default_weight {default_weight}, {workers} workers");
            let want: BTreeSet<_> = members.iter().cloned().collect();
            assert_eq!(held(&triggers), want, "{what}: {triggers:?}");
            for p in &dump {
                let user = p["user_id"].as_str().unwrap();
                let listed: BTreeSet<_> = p["segments"]
                    .as_array()
                    .unwrap()
                    .iter()
                    .map(|s| pair(user, s.as_str().unwrap()))
                    .collect();
                let mine: BTreeSet<_> = want.iter().filter(|(u, _)| u == user).cloned().collect();
                assert_eq!(listed, mine, "{what}: the dump's segments of {user}");
                // The operator's score is the profile's.
                let score = p["engagement_score"].as_f64().unwrap();
                assert_eq!(
                    score >= 50.0,
                    want.contains(&pair(user, "engaged")),
                    "{what}: {user}'s score {score}"
                );
            }
        }
    }
}
