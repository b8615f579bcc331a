//! Property tests: `persona replay` on random logs — duplicates, conflicting duplicates, late
//! and out-of-order events, bad lines, catalog updates and deletions, erasures and consent
//! records — equals the from-scratch
//! reference of SPEC §4 in `support/reference.rs`, field by field, on 1, 2 and 4 workers.

mod support;

use proptest::prelude::*;
use serde_json::json;
use support::reference;

const BASE: u64 = 1_700_000_000_000;
const HOUR: u64 = 3_600_000;
const DAY: u64 = 24 * HOUR;
/// Offsets from BASE: random ones, and ones that land exactly on (or one ms off) session-gap
/// and window boundaries relative to the log's last event at BASE + SPAN.
const SPAN: u64 = 9 * DAY;

fn offset() -> impl Strategy<Value = u64> {
    let edges: Vec<u64> = [HOUR, DAY, 7 * DAY]
        .iter()
        .flat_map(|w| [SPAN - w, SPAN - w + 1, SPAN - w - 1])
        .chain((0..6).flat_map(|k| [SPAN - k * 1_800_000, SPAN - k * 1_800_000 - 1]))
        .chain([SPAN, 0])
        .collect();
    prop_oneof![
        4 => 0..SPAN,
        2 => (SPAN - 3 * HOUR)..SPAN,
        2 => proptest::sample::select(edges),
    ]
}

#[derive(Debug, Clone)]
struct GenEvent {
    user: usize,
    kind: usize,
    offset: u64,
    item: Option<usize>,
    value: Option<usize>,
    device: Option<usize>,
    rfc3339: bool,
}

const USERS: [&str; 5] = ["u1", "u2", "user-3", "ü4", "u5"];
const KINDS: [&str; 10] = [
    "page_view",
    "product_view",
    "click",
    "search",
    "add_to_cart",
    "remove_from_cart",
    "purchase",
    "onboarding_step",
    "fav",
    "signup_2",
];
const ITEMS: [&str; 7] = ["i1", "i2", "i3", "b", "a", "item-with-a-longer-id", "Z"];
const VALUES: [f64; 4] = [0.0, 1.5, 19.99, 100.0];
const DEVICES: [&str; 4] = ["desktop", "mobile", "tablet", "other"];
const CATEGORIES: [&str; 3] = ["shoes", "bags", "hats"];
const BAD_LINES: [&str; 11] = [
    r#"{"event_id":"bad8","user_id":"u1","type":"consent","ts":1700000000000}"#,
    r#"{"event_id":"bad9","user_id":"u1","type":"consent","ts":1700000000000,"properties":{"personalization":"no"}}"#,
    "not json at all",
    "[1,2,3]",
    r#"{"event_id":"bad1","type":"click","ts":1700000000000}"#,
    r#"{"event_id":"bad2","user_id":"u1","type":"Click","ts":1700000000000}"#,
    r#"{"event_id":"bad3","user_id":"u1","type":"purchase","ts":1700000000000}"#,
    r#"{"event_id":"bad4","user_id":"u1","type":"click","ts":-5}"#,
    r#"{"event_id":"bad5","user_id":"u1","type":"click","ts":1700000000000,"schema_version":9}"#,
    r#"{"event_id":"bad6","user_id":"u1","type":"click","ts":1700000000000,"value":-1}"#,
    r#"{"event_id":"bad7","user_id":"u1","type":"click","ts":"yesterday"}"#,
];

fn gen_event() -> impl Strategy<Value = GenEvent> {
    (
        0..USERS.len(),
        0..KINDS.len(),
        offset(),
        proptest::option::of(0..ITEMS.len()),
        proptest::option::of(0..VALUES.len()),
        proptest::option::weighted(0.6, 0..7usize),
        any::<bool>(),
    )
        .prop_map(
            |(user, kind, offset, item, value, device, rfc3339)| GenEvent {
                user,
                kind,
                offset,
                item,
                value,
                device,
                rfc3339,
            },
        )
}

fn line(id: &str, e: &GenEvent) -> String {
    let ts = BASE + e.offset;
    let mut o = json!({"event_id": id, "user_id": USERS[e.user], "type": KINDS[e.kind]});
    o["ts"] = if e.rfc3339 {
        json!(chrono::DateTime::from_timestamp_millis(ts as i64)
            .unwrap()
            .to_rfc3339())
    } else {
        json!(ts)
    };
    let needs_item = [
        "product_view",
        "add_to_cart",
        "remove_from_cart",
        "purchase",
    ]
    .contains(&KINDS[e.kind]);
    if let Some(i) = e.item.or(needs_item.then_some(0)) {
        o["item_id"] = json!(ITEMS[i]);
    }
    if let Some(v) = e.value {
        o["value"] = json!(VALUES[v]);
    }
    match e.device {
        Some(d) if d < 4 => o["device"] = json!({"type": DEVICES[d], "os": "x"}),
        Some(d) => o["device"] = json!({"user_agent": reference::USER_AGENTS[d - 4].0}),
        None => {}
    }
    o["context"] = json!({"country": "DE", "ip": "10.0.0.1"});
    o.to_string()
}

#[derive(Debug, Clone)]
struct Case {
    events: Vec<String>,
    catalog: Vec<String>,
}

fn case() -> impl Strategy<Value = Case> {
    let events = proptest::collection::vec(gen_event(), 1..60);
    let dups = proptest::collection::vec(
        (any::<proptest::sample::Index>(), 0..3u8, 1..100_000u64),
        0..12,
    );
    let bad = proptest::collection::vec(proptest::sample::select(BAD_LINES.to_vec()), 0..4);
    let catalog = proptest::collection::vec(
        (
            0..ITEMS.len(),
            proptest::option::weighted(0.8, 0..CATEGORIES.len()),
            proptest::bool::weighted(0.1),
        ),
        0..14,
    );
    // Erasures (0), revocations (1) and grants (2); some delivered twice.
    let controls = prop_oneof![
        2 => Just(Vec::new()),
        3 => proptest::collection::vec((0..USERS.len(), 0..3u8, offset(), proptest::bool::weighted(0.3)), 1..5),
    ];
    let order = proptest::collection::vec(any::<u64>(), 200);
    (events, dups, bad, catalog, controls, order).prop_map(|(events, dups, bad, catalog, controls, order)| {
        let mut lines: Vec<String> = events
            .iter()
            .enumerate()
            .map(|(n, e)| line(&format!("e{n}"), e))
            .collect();
        for (idx, how, shift) in dups {
            let n = idx.index(events.len());
            match how {
                // Redelivery: the same line again.
                0 | 1 => lines.push(lines[n].clone()),
                // Conflicting duplicate: same id, a different ts (the smaller one must win).
                _ => {
                    let mut e = events[n].clone();
                    e.offset = if e.offset >= shift {
                        e.offset - shift
                    } else {
                        e.offset + shift
                    };
                    lines.push(line(&format!("e{n}"), &e));
                }
            }
        }
        lines.extend(bad.iter().map(|s| s.to_string()));
        for (n, (user, what, offset, twice)) in controls.into_iter().enumerate() {
            let mut o = json!({"event_id": format!("c{n}"), "user_id": USERS[user], "ts": BASE + offset});
            if what == 0 {
                o["type"] = json!("erasure");
            } else {
                o["type"] = json!("consent");
                o["properties"] = json!({"personalization": what == 2, "source": "banner"});
            }
            lines.push(o.to_string());
            if twice {
                lines.push(o.to_string());
            }
        }
        // Arbitrary arrival order: late and out-of-order events everywhere.
        let mut keyed: Vec<(u64, String)> = lines
            .into_iter()
            .enumerate()
            .map(|(i, l)| (order[i % order.len()].rotate_left(i as u32), l))
            .collect();
        keyed.sort();
        let catalog = catalog
            .into_iter()
            .map(|(item, cat, deleted)| {
                let mut o = json!({"item_id": ITEMS[item], "price": 9.5});
                if let Some(c) = cat {
                    o["category"] = json!(CATEGORIES[c]);
                }
                if deleted {
                    o["deleted"] = json!(true);
                }
                o.to_string()
            })
            .collect();
        Case {
            events: keyed.into_iter().map(|(_, l)| l).collect(),
            catalog,
        }
    })
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 40, ..ProptestConfig::default() })]

    /// Every profile field, the accepted/duplicate/dead-letter counts, with 1, 2 and 4 workers,
    /// in one batch and in batches of 3 lines (where a worker waiting for a batch reads the
    /// next one ahead, and the log can end inside that read).
    #[test]
    fn replay_matches_the_reference(case in case()) {
        let (expected, stats) = reference::profiles(&case.events, &case.catalog);
        for (workers, batch) in [(1, None), (2, None), (4, None), (1, Some(3)), (2, Some(3))] {
            let mut settings = support::settings(workers);
            settings.batch_lines = batch;
            let ((actual, summary), _) =
                support::replay_with(&case.events, &case.catalog, settings);
            let run = format!("{workers} workers, batches of {batch:?} lines");
            support::assert_profiles_eq(&actual, &expected, &run);
            prop_assert_eq!(summary.accepted, stats.accepted, "accepted, {}", run);
            prop_assert_eq!(summary.duplicates, stats.duplicates, "duplicates, {}", run);
            prop_assert_eq!(summary.dead_letters, stats.dead, "dead letters, {}", run);
            prop_assert_eq!(summary.lines, stats.lines, "lines, {}", run);
        }
    }
}

/// Logs whose records arrive at most [`LATENESS`] after their `ts`, over [`LONG_SPAN`]: with a
/// retention of 7 days (longer than the lateness), most detail is sealed along the way.
const LONG_SPAN: u64 = 30 * DAY;
const LATENESS: u64 = 2 * DAY;

fn in_bound_case() -> impl Strategy<Value = Case> {
    // (arrival: day and time of day, lateness)
    let arrival = (0..LONG_SPAN / DAY, 0..3 * HOUR, 0..LATENESS);
    let events = proptest::collection::vec((gen_event(), arrival.clone()), 1..70);
    let dups =
        proptest::collection::vec((any::<proptest::sample::Index>(), 0..3u8, 1..HOUR), 0..10);
    let bad = proptest::collection::vec(proptest::sample::select(BAD_LINES.to_vec()), 0..3);
    // Erasures (0), revocations (1) and grants (2), for every user but u1.
    let controls = proptest::collection::vec((1..USERS.len(), 0..3u8, arrival), 0..6);
    let catalog = proptest::collection::vec(
        (
            0..ITEMS.len(),
            proptest::option::weighted(0.8, 0..CATEGORIES.len()),
        ),
        0..10,
    );
    (events, dups, bad, controls, catalog).prop_map(|(events, dups, bad, controls, catalog)| {
        let at = |(day, time, late): (u64, u64, u64)| {
            let arrives = day * DAY + time;
            (arrives, arrives.saturating_sub(late))
        };
        // (arrival, line)
        let mut lines: Vec<(u64, String)> = Vec::new();
        let mut placed: Vec<(u64, GenEvent)> = Vec::new();
        for (n, (mut e, when)) in events.into_iter().enumerate() {
            let (arrives, offset) = at(when);
            e.offset = offset;
            lines.push((arrives, line(&format!("e{n}"), &e)));
            placed.push((arrives, e));
        }
        for (idx, how, shift) in dups {
            let n = idx.index(placed.len());
            let (arrives, e) = placed[n].clone();
            if how < 2 {
                lines.push((arrives + shift, line(&format!("e{n}"), &e)));
            } else {
                let mut c = e.clone();
                c.offset = e.offset.saturating_sub(shift);
                lines.push((arrives + shift, line(&format!("e{n}"), &c)));
            }
        }
        for (n, (user, what, when)) in controls.into_iter().enumerate() {
            let (arrives, offset) = at(when);
            let mut o =
                json!({"event_id": format!("c{n}"), "user_id": USERS[user], "ts": BASE + offset});
            if what == 0 {
                o["type"] = json!("erasure");
            } else {
                o["type"] = json!("consent");
                o["properties"] = json!({"personalization": what == 2});
            }
            lines.push((arrives, o.to_string()));
        }
        for (i, b) in bad.iter().enumerate() {
            lines.push((i as u64 * 7 * DAY, b.to_string()));
        }
        lines.sort_by_key(|(arrives, _)| *arrives);
        // The replay's dump is at its last admitted event, and its window records are kept one
        // widest window past that (engine.rs): an admitted event of u1 closes every log.
        let last = lines.last().map_or(0, |(arrives, _)| *arrives);
        lines.push((
            last + 1,
            json!({"event_id": "anchor", "user_id": "u1", "type": "click", "ts": BASE + last + 1})
                .to_string(),
        ));
        let catalog = catalog
            .into_iter()
            .map(|(item, cat)| {
                let mut o = json!({"item_id": ITEMS[item]});
                if let Some(c) = cat {
                    o["category"] = json!(CATEGORIES[c]);
                }
                o.to_string()
            })
            .collect();
        Case {
            events: lines.into_iter().map(|(_, l)| l).collect(),
            catalog,
        }
    })
}

/// Settings with `engine.retention = 7d`, reading `batch_lines` lines per step (1: the event
/// clock, and with it the seal point, moves line by line; `None`: the replay's default, where
/// one batch spans the whole log and only its cuts keep it judged line by line).
fn retention_settings(workers: usize, batch_lines: Option<usize>) -> persona::config::Settings {
    let mut s = support::settings(workers);
    s.retention_ms = Some(7 * DAY);
    s.batch_lines = batch_lines;
    s
}

proptest! {
    #![proptest_config(ProptestConfig { cases: 24, ..ProptestConfig::default() })]

    /// With a retention longer than any record's lateness, sealing loses nothing: every profile
    /// equals the reference that keeps all detail, erasures and consent included.
    #[test]
    fn retention_within_its_lateness_bound_changes_no_profile(case in in_bound_case()) {
        let (expected, stats) = reference::profiles(&case.events, &case.catalog);
        for (workers, batch) in [(1, Some(1)), (2, Some(1)), (4, Some(1)), (1, None), (2, None)] {
            let settings = retention_settings(workers, batch);
            let ((actual, summary), dead) =
                support::replay_with(&case.events, &case.catalog, settings);
            let run = format!("{workers} workers, batches of {batch:?} lines");
            support::assert_profiles_eq(&actual, &expected, &run);
            prop_assert_eq!(summary.dead_letters, stats.dead, "dead letters, {}: {:?}", run, dead);
            prop_assert_eq!(summary.accepted, stats.accepted, "accepted, {}", run);
        }
    }
}

/// Records older than the retention when they arrive are dead letters with reason `too_late`,
/// with their raw line, judged as if the clock moved line by line: whatever the batch size, a
/// record is never too late because of a newer record after it in its batch. Erasures are
/// applied however late; profiles keep everything else.
#[test]
fn records_older_than_the_retention_are_dead_letters() {
    let ev = |id: &str, user: &str, offset: u64| {
        json!({"event_id": id, "user_id": user, "type": "click", "ts": BASE + offset, "device": {"type": "mobile"}}).to_string()
    };
    let events = vec![
        // First: on time, though the next line is 10 days newer.
        ev("old-first", "u1", 0),
        ev("new", "u1", 10 * DAY),
        ev("old-after", "u2", DAY),
        ev("kept", "u2", 9 * DAY),
        json!({"event_id": "x", "user_id": "u2", "type": "erasure", "ts": BASE + DAY}).to_string(),
    ];
    for batch in [Some(1), Some(2), None] {
        let mut settings = support::settings(1);
        settings.retention_ms = Some(7 * DAY);
        settings.batch_lines = batch;
        let ((profiles, summary), dead) = support::replay_with(&events, &[], settings);
        let late: Vec<(String, String, String)> = dead
            .iter()
            .map(|d| {
                let source = d["source"].as_str().unwrap();
                let raw: serde_json::Value =
                    serde_json::from_str(d["raw"].as_str().unwrap()).unwrap();
                (
                    d["reason"].as_str().unwrap().to_string(),
                    source.rsplit(':').next().unwrap().to_string(),
                    raw["event_id"].as_str().unwrap().to_string(),
                )
            })
            .collect();
        let expected = [("too_late", "3", "old-after")]
            .map(|(r, s, i)| (r.to_string(), s.to_string(), i.to_string()));
        assert_eq!(late, expected, "batches of {batch:?}: {dead:?}");
        assert_eq!(summary.dead_letters, 1);
        let counts: Vec<(String, u64)> = profiles
            .iter()
            .map(|p| {
                (
                    p["user_id"].as_str().unwrap().to_string(),
                    p["event_count"].as_u64().unwrap(),
                )
            })
            .collect();
        // u2's event at 9 days survives its late erasure (stamped at day 1).
        assert_eq!(
            counts,
            [("u1".to_string(), 2), ("u2".to_string(), 1)],
            "batches of {batch:?}"
        );
    }
}
