//! Parsing and validation of events and catalog records (SPEC §2).
//!
//! Lines are parsed straight into borrowed structs (no `Value` tree) on the fast path. When
//! that fails, a slow path re-reads the line as a `Value` only to name the offending field in
//! the error, since rejected lines are rare and deserve a clear reason.

use crate::names::Names;
use persona_dataflows::{Device, Event, NO_ITEM};
use serde::de::{self, Deserializer, IgnoredAny, MapAccess, Visitor};
use serde::Deserialize;
use std::borrow::Cow;
use std::fmt;

/// Largest accepted event, in bytes.
pub const MAX_EVENT_BYTES: usize = 64 * 1024;
/// Largest id (`event_id`, `user_id`, `item_id`), in bytes.
pub const MAX_ID_BYTES: usize = 128;
/// Latest accepted `ts`: 9999-12-31T23:59:59.999Z.
pub const MAX_TS: u64 = 253_402_300_799_999;
/// The largest `value` accepted. Spend is summed exactly, in billionths in 128 bits: with
/// values up to 1e18 a user's sum cannot overflow within any number of events a log can hold.
pub const MAX_VALUE: f64 = 1e18;
/// Types that must carry an `item_id`.
pub const ITEM_TYPES: [&str; 4] = [
    "product_view",
    "add_to_cart",
    "remove_from_cart",
    "purchase",
];

/// Control record type: erases the user's events with `ts` at or before its own.
pub const ERASURE_TYPE: &str = "erasure";
/// Control record type: `properties.personalization` (bool) grants or revokes profiling.
pub const CONSENT_TYPE: &str = "consent";

/// Every rejection reason code.
pub const REASONS: [&str; 9] = [
    "invalid_json",
    "invalid_utf8",
    "not_an_object",
    "missing_field",
    "invalid_field",
    "oversize",
    "unknown_schema_version",
    "future_ts",
    "too_late",
];

/// Why a line was rejected: a stable machine-readable code and a human message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Rejection {
    pub reason: &'static str,
    pub detail: String,
}

impl Rejection {
    pub(crate) fn new(reason: &'static str, detail: impl Into<String>) -> Self {
        Rejection {
            reason,
            detail: detail.into(),
        }
    }
}

impl fmt::Display for Rejection {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}: {}", self.reason, self.detail)
    }
}

/// `T` from a JSON object only: a derived struct also accepts an array of its fields in order,
/// which would let `["e1", "u1", "click", 1]` pass for an event and `[false]` for a consent's
/// properties.
struct Object<T>(T);

impl<'de, T: Deserialize<'de>> Deserialize<'de> for Object<T> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V<T>(std::marker::PhantomData<T>);
        impl<'de, T: Deserialize<'de>> Visitor<'de> for V<T> {
            type Value = Object<T>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an object")
            }
            fn visit_map<A: MapAccess<'de>>(self, map: A) -> Result<Object<T>, A::Error> {
                T::deserialize(de::value::MapAccessDeserializer::new(map)).map(Object)
            }
        }
        d.deserialize_map(V(std::marker::PhantomData))
    }
}

/// The one property the engine reads (the rest of the object is skipped unread).
#[derive(Deserialize)]
struct RawProperties {
    #[serde(default)]
    personalization: Option<serde_json::Value>,
}

/// `ts` as written: an integer or a string.
enum RawTs<'a> {
    Int(u64),
    Negative,
    Str(Cow<'a, str>),
}

impl<'de: 'a, 'a> Deserialize<'de> for RawTs<'a> {
    fn deserialize<D: Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct V;
        impl<'de> Visitor<'de> for V {
            type Value = RawTs<'de>;
            fn expecting(&self, f: &mut fmt::Formatter) -> fmt::Result {
                f.write_str("an integer (epoch ms) or an RFC 3339 string")
            }
            fn visit_u64<E: de::Error>(self, v: u64) -> Result<RawTs<'de>, E> {
                Ok(RawTs::Int(v))
            }
            fn visit_i64<E: de::Error>(self, v: i64) -> Result<RawTs<'de>, E> {
                Ok(if v < 0 {
                    RawTs::Negative
                } else {
                    RawTs::Int(v as u64)
                })
            }
            fn visit_borrowed_str<E: de::Error>(self, v: &'de str) -> Result<RawTs<'de>, E> {
                Ok(RawTs::Str(Cow::Borrowed(v)))
            }
            fn visit_str<E: de::Error>(self, v: &str) -> Result<RawTs<'de>, E> {
                Ok(RawTs::Str(Cow::Owned(v.to_owned())))
            }
        }
        d.deserialize_any(V)
    }
}

#[derive(Deserialize)]
struct RawDevice<'a> {
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user_agent: Option<Cow<'a, str>>,
}

#[derive(Deserialize)]
struct RawEvent<'a> {
    #[serde(borrow, default)]
    event_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    user_id: Option<Cow<'a, str>>,
    #[serde(rename = "type", borrow, default)]
    kind: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    ts: Option<RawTs<'a>>,
    #[serde(borrow, default)]
    item_id: Option<Cow<'a, str>>,
    #[serde(default)]
    value: Option<f64>,
    #[serde(borrow, default)]
    device: Option<Object<RawDevice<'a>>>,
    #[serde(default)]
    #[allow(dead_code)]
    context: Option<Object<IgnoredAny>>,
    #[serde(default)]
    properties: Option<Object<RawProperties>>,
    #[serde(default)]
    schema_version: Option<i64>,
}

/// The event in a line, or why it is rejected. `max_ts` is the live clock plus the allowed
/// future skew (`None`: no future check, as in replay).
pub fn parse_event(line: &[u8], names: &Names, max_ts: Option<u64>) -> Result<Event, Rejection> {
    if line.len() > MAX_EVENT_BYTES {
        return Err(Rejection::new(
            "oversize",
            format!(
                "event is {} bytes, the limit is {MAX_EVENT_BYTES}",
                line.len()
            ),
        ));
    }
    let raw: RawEvent = match serde_json::from_slice(line) {
        Ok(Object(raw)) => raw,
        Err(e) => return Err(explain(line, e)),
    };
    if let Some(v) = raw.schema_version {
        if v != 1 {
            return Err(Rejection::new(
                "unknown_schema_version",
                format!("schema_version {v} is not known (this engine knows 1)"),
            ));
        }
    }
    let event_id = id_field("event_id", raw.event_id.as_deref())?;
    let user_id = id_field("user_id", raw.user_id.as_deref())?;
    let kind = raw.kind.as_deref().ok_or_else(|| missing("type"))?;
    if !valid_type(kind) {
        return Err(Rejection::new(
            "invalid_field",
            format!(
                "type {:?} must match ^[a-z][a-z0-9_]{{0,63}}$",
                truncate(kind, 80)
            ),
        ));
    }
    let ts = match raw.ts.ok_or_else(|| missing("ts"))? {
        RawTs::Int(ms) => ms,
        RawTs::Negative => return Err(Rejection::new("invalid_field", "ts must not be negative")),
        RawTs::Str(s) => parse_rfc3339(&s)?,
    };
    if ts > MAX_TS {
        return Err(Rejection::new(
            "invalid_field",
            format!("ts {ts} is beyond year 9999"),
        ));
    }
    if let Some(limit) = max_ts {
        if ts > limit {
            return Err(Rejection::new(
                "future_ts",
                format!("ts {ts} is ahead of the engine clock by more than max_future_skew"),
            ));
        }
    }
    let item = match raw.item_id.as_deref() {
        Some(id) => Some(id_field("item_id", Some(id))?),
        None if ITEM_TYPES.contains(&kind) => return Err(missing_because("item_id", kind)),
        None => None,
    };
    // A consent record carries its grant as `value` (1 granted, 0 revoked).
    let consent = if kind == CONSENT_TYPE {
        match raw.properties.and_then(|p| p.0.personalization) {
            Some(serde_json::Value::Bool(b)) => Some(b),
            _ => {
                return Err(Rejection::new(
                    "invalid_field",
                    "a consent event needs properties.personalization = true or false",
                ))
            }
        }
    } else {
        None
    };
    let value = match raw.value {
        Some(v) if !v.is_finite() || v < 0.0 => {
            return Err(Rejection::new(
                "invalid_field",
                format!("value {v} must be a finite number >= 0"),
            ))
        }
        Some(v) if v > MAX_VALUE => {
            return Err(Rejection::new(
                "invalid_field",
                format!("value {v} is above the largest accepted, {MAX_VALUE:e}"),
            ))
        }
        Some(v) => v + 0.0, // normalises -0.0
        None => 0.0,
    };
    let value = consent.map_or(value, |granted| if granted { 1.0 } else { 0.0 });
    let device = match raw.device.map(|d| d.0) {
        None => None,
        Some(d) => match d.kind.as_deref() {
            Some("desktop") => Some(Device::Desktop),
            Some("mobile") => Some(Device::Mobile),
            Some("tablet") => Some(Device::Tablet),
            Some("other") => Some(Device::Other),
            Some(other) => {
                return Err(Rejection::new(
                    "invalid_field",
                    format!(
                        "device.type {:?} must be desktop, mobile, tablet or other",
                        truncate(other, 80)
                    ),
                ))
            }
            None => d.user_agent.as_deref().map(device_of_user_agent),
        },
    };
    Ok(Event {
        ts,
        user: names.intern(user_id),
        id: if device.is_some() {
            names.intern_event_id(event_id)
        } else {
            crate::names::hash(event_id)
        },
        kind: names.intern(kind),
        item: item.map(|i| names.intern_item(i)).unwrap_or(NO_ITEM),
        value_bits: value.to_bits(),
        device,
    })
}

fn missing(field: &str) -> Rejection {
    Rejection::new(
        "missing_field",
        format!("required field `{field}` is missing"),
    )
}

fn missing_because(field: &str, kind: &str) -> Rejection {
    Rejection::new(
        "missing_field",
        format!("required field `{field}` is missing (type {kind} needs it)"),
    )
}

fn id_field<'a>(field: &str, value: Option<&'a str>) -> Result<&'a str, Rejection> {
    let v = value.ok_or_else(|| missing(field))?;
    if v.is_empty() || v.len() > MAX_ID_BYTES {
        return Err(Rejection::new(
            "invalid_field",
            format!("{field} must be 1..={MAX_ID_BYTES} bytes, is {}", v.len()),
        ));
    }
    Ok(v)
}

fn valid_type(kind: &str) -> bool {
    let b = kind.as_bytes();
    !b.is_empty()
        && b.len() <= 64
        && b[0].is_ascii_lowercase()
        && b.iter()
            .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || *c == b'_')
}

fn parse_rfc3339(s: &str) -> Result<u64, Rejection> {
    let t = chrono::DateTime::parse_from_rfc3339(s).map_err(|e| {
        Rejection::new(
            "invalid_field",
            format!("ts {:?} is not RFC 3339: {e}", truncate(s, 80)),
        )
    })?;
    let ms = t.timestamp_millis();
    if ms < 0 {
        return Err(Rejection::new(
            "invalid_field",
            "ts must not be before 1970",
        ));
    }
    Ok(ms as u64)
}

fn truncate(s: &str, max: usize) -> &str {
    if s.len() <= max {
        return s;
    }
    let mut end = max;
    while !s.is_char_boundary(end) {
        end -= 1;
    }
    &s[..end]
}

/// Device type from a user agent alone: tablets first (iPad, Android without "Mobile"), then
/// phones, then desktop operating systems; anything else is `other`.
pub fn device_of_user_agent(ua: &str) -> Device {
    let ua = ua.to_ascii_lowercase();
    let has = |s: &str| ua.contains(s);
    if has("ipad")
        || has("tablet")
        || has("kindle")
        || has("silk/")
        || (has("android") && !has("mobile"))
    {
        Device::Tablet
    } else if has("mobi")
        || has("iphone")
        || has("ipod")
        || has("android")
        || has("windows phone")
        || has("blackberry")
    {
        Device::Mobile
    } else if has("windows")
        || has("macintosh")
        || has("mac os x")
        || has("x11")
        || has("linux")
        || has("cros")
    {
        Device::Desktop
    } else {
        Device::Other
    }
}

/// Turns a fast-path error into a rejection that names the field at fault.
fn explain(line: &[u8], err: serde_json::Error) -> Rejection {
    use serde_json::Value;
    let value: Value = match serde_json::from_slice(line) {
        Ok(v) => v,
        Err(e) => {
            let reason = if std::str::from_utf8(line).is_err() {
                "invalid_utf8"
            } else {
                "invalid_json"
            };
            return Rejection::new(reason, e.to_string());
        }
    };
    let Value::Object(map) = value else {
        return Rejection::new("not_an_object", "an event must be a JSON object");
    };
    let expect = |field: &str, ok: fn(&Value) -> bool, what: &str| -> Option<Rejection> {
        match map.get(field) {
            Some(v) if !v.is_null() && !ok(v) => Some(Rejection::new(
                "invalid_field",
                format!("{field} must be {what}"),
            )),
            _ => None,
        }
    };
    type Check<'a> = (&'a str, fn(&Value) -> bool, &'a str);
    let checks: [Check; 9] = [
        ("event_id", Value::is_string, "a string"),
        ("user_id", Value::is_string, "a string"),
        ("type", Value::is_string, "a string"),
        (
            "ts",
            |v| v.is_u64() || v.is_i64() || v.is_string(),
            "an integer (epoch ms) or an RFC 3339 string",
        ),
        ("item_id", Value::is_string, "a string"),
        ("value", Value::is_number, "a number"),
        ("device", Value::is_object, "an object"),
        ("context", Value::is_object, "an object"),
        ("properties", Value::is_object, "an object"),
    ];
    for (field, ok, what) in checks {
        if let Some(r) = expect(field, ok, what) {
            return r;
        }
    }
    if let Some(r) = expect("schema_version", |v| v.is_i64() || v.is_u64(), "an integer") {
        return r;
    }
    if let Some(Value::Object(d)) = map.get("device") {
        for f in ["type", "os", "user_agent"] {
            if d.get(f).is_some_and(|v| !v.is_null() && !v.is_string()) {
                return Rejection::new("invalid_field", format!("device.{f} must be a string"));
            }
        }
    }
    if let Some(v) = map.get("schema_version").and_then(|v| v.as_u64()) {
        if v != 1 {
            return Rejection::new(
                "unknown_schema_version",
                format!("schema_version {v} is not known (this engine knows 1)"),
            );
        }
    }
    Rejection::new("invalid_field", err.to_string())
}

/// An item catalog record: upsert (or delete) by `item_id`.
#[derive(Debug, Clone, PartialEq)]
pub struct CatalogRecord {
    pub item: u64,
    /// Category hash; `None` when the record has no category (the item then counts nowhere).
    pub category: Option<u64>,
    pub deleted: bool,
}

#[derive(Deserialize)]
struct RawCatalog<'a> {
    #[serde(borrow, default)]
    item_id: Option<Cow<'a, str>>,
    #[serde(borrow, default)]
    category: Option<Cow<'a, str>>,
    #[serde(default)]
    deleted: Option<bool>,
    #[serde(default)]
    #[allow(dead_code)]
    tags: Option<Vec<IgnoredAny>>,
    #[serde(default)]
    #[allow(dead_code)]
    price: Option<f64>,
    #[serde(default)]
    #[allow(dead_code)]
    title: Option<IgnoredAny>,
}

pub fn parse_catalog(line: &[u8], names: &Names) -> Result<CatalogRecord, Rejection> {
    if line.len() > MAX_EVENT_BYTES {
        return Err(Rejection::new(
            "oversize",
            format!(
                "record is {} bytes, the limit is {MAX_EVENT_BYTES}",
                line.len()
            ),
        ));
    }
    let Object::<RawCatalog>(raw) = serde_json::from_slice(line).map_err(|e| {
        let reason = if e.is_data() {
            "invalid_field"
        } else {
            "invalid_json"
        };
        Rejection::new(reason, e.to_string())
    })?;
    let item = id_field("item_id", raw.item_id.as_deref())?;
    let category = match raw.category.as_deref() {
        Some("") => {
            return Err(Rejection::new(
                "invalid_field",
                "category must not be empty",
            ))
        }
        Some(c) if c.len() > 256 => {
            return Err(Rejection::new(
                "invalid_field",
                "category must be at most 256 bytes",
            ))
        }
        Some(c) => Some(names.intern(c)),
        None => None,
    };
    Ok(CatalogRecord {
        item: names.intern_item(item),
        category,
        deleted: raw.deleted.unwrap_or(false),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(s: &str) -> Result<Event, Rejection> {
        parse_event(s.as_bytes(), &Names::default(), None)
    }

    #[test]
    fn accepts_a_full_event() {
        let e = parse(r#"{"event_id":"e1","user_id":"u1","type":"purchase","ts":"2023-11-14T22:13:20.5Z","item_id":"i1","value":19.99,"device":{"type":"mobile"},"context":{"ip":"1.2.3.4"},"properties":{"x":[1]},"schema_version":1}"#).unwrap();
        assert_eq!(e.ts, 1_700_000_000_500);
        assert_eq!(e.value(), 19.99);
        assert_eq!(e.device, Some(Device::Mobile));
    }

    #[test]
    fn names_the_reason() {
        let cases = [
            ("not json", "invalid_json"),
            ("[1,2]", "not_an_object"),
            // Arrays are never read as the objects they stand in for.
            (r#"["e","u","click",1]"#, "not_an_object"),
            (
                r#"{"event_id":"e","user_id":"u","type":"click","ts":1,"device":["mobile"]}"#,
                "invalid_field",
            ),
            (
                r#"{"event_id":"e","user_id":"u","type":"consent","ts":1,"properties":[false]}"#,
                "invalid_field",
            ),
            (
                r#"{"event_id":"e","user_id":"u","type":"click","ts":1,"properties":[]}"#,
                "invalid_field",
            ),
            (
                r#"{"event_id":"e","user_id":"u","type":"purchase","ts":1,"item_id":"i","value":1.5e18}"#,
                "invalid_field",
            ),
            (r#"{"user_id":"u","type":"click","ts":1}"#, "missing_field"),
            (
                r#"{"event_id":"e","user_id":5,"type":"click","ts":1}"#,
                "invalid_field",
            ),
            (
                r#"{"event_id":"e","user_id":"u","type":"Click","ts":1}"#,
                "invalid_field",
            ),
            (
                r#"{"event_id":"e","user_id":"u","type":"click","ts":-1}"#,
                "invalid_field",
            ),
            (
                r#"{"event_id":"e","user_id":"u","type":"click","ts":1.5}"#,
                "invalid_field",
            ),
            (
                r#"{"event_id":"e","user_id":"u","type":"purchase","ts":1}"#,
                "missing_field",
            ),
            (
                r#"{"event_id":"e","user_id":"u","type":"click","ts":1,"value":-2}"#,
                "invalid_field",
            ),
            (
                r#"{"event_id":"e","user_id":"u","type":"click","ts":1,"schema_version":2}"#,
                "unknown_schema_version",
            ),
            (
                r#"{"event_id":"","user_id":"u","type":"click","ts":1}"#,
                "invalid_field",
            ),
            (
                r#"{"event_id":"e","user_id":"u","type":"click","ts":1,"device":{"type":"phone"}}"#,
                "invalid_field",
            ),
            (
                r#"{"event_id":"e","user_id":"u","type":"click","ts":1,"context":"x"}"#,
                "invalid_field",
            ),
        ];
        for (line, reason) in cases {
            let r = parse(line).unwrap_err();
            assert_eq!(r.reason, reason, "{line}: {r}");
        }
        let field = parse(r#"{"event_id":"e","user_id":5,"type":"click","ts":1}"#).unwrap_err();
        assert!(field.detail.contains("user_id"), "{field}");
        let big = format!(
            r#"{{"event_id":"e","user_id":"u","type":"click","ts":1,"properties":{{"p":"{}"}}}}"#,
            "x".repeat(MAX_EVENT_BYTES)
        );
        assert_eq!(parse(&big).unwrap_err().reason, "oversize");
        let id = "x".repeat(129);
        assert_eq!(
            parse(&format!(
                r#"{{"event_id":"{id}","user_id":"u","type":"click","ts":1}}"#
            ))
            .unwrap_err()
            .reason,
            "invalid_field"
        );
    }

    #[test]
    fn future_events_are_rejected_only_with_a_limit() {
        let line = br#"{"event_id":"e","user_id":"u","type":"click","ts":1000}"#;
        assert!(parse_event(line, &Names::default(), Some(999)).is_err());
        assert!(parse_event(line, &Names::default(), Some(1000)).is_ok());
    }

    #[test]
    fn user_agents_map_to_device_types() {
        let ipad = "Mozilla/5.0 (iPad; CPU OS 13_2 like Mac OS X) AppleWebKit/605.1.15";
        let iphone = "Mozilla/5.0 (iPhone; CPU iPhone OS 17_0 like Mac OS X) Mobile/15E148";
        let android_phone =
            "Mozilla/5.0 (Linux; Android 14; Pixel 8) Chrome/120.0 Mobile Safari/537.36";
        let android_tab = "Mozilla/5.0 (Linux; Android 13; SM-X700) Chrome/120.0 Safari/537.36";
        let win = "Mozilla/5.0 (Windows NT 10.0; Win64; x64) Chrome/120.0";
        assert_eq!(device_of_user_agent(ipad), Device::Tablet);
        assert_eq!(device_of_user_agent(iphone), Device::Mobile);
        assert_eq!(device_of_user_agent(android_phone), Device::Mobile);
        assert_eq!(device_of_user_agent(android_tab), Device::Tablet);
        assert_eq!(device_of_user_agent(win), Device::Desktop);
        assert_eq!(device_of_user_agent("curl/8.0"), Device::Other);
    }

    #[test]
    fn a_catalog_record_is_an_object() {
        let names = Names::default();
        assert!(parse_catalog(br#"{"item_id":"i1","category":"shoes"}"#, &names).is_ok());
        let array = parse_catalog(br#"["i1","shoes"]"#, &names);
        assert_eq!(array.map_err(|r| r.reason).err(), Some("invalid_field"));
    }
}
