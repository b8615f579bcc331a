//! Event and catalog lines: any bytes give an event or a rejection, never a panic.
#![no_main]

use libfuzzer_sys::fuzz_target;
use persona::names::Names;
use persona::parse::{parse_catalog, parse_event, MAX_TS};

fuzz_target!(|data: &[u8]| {
    let names = Names::default();
    if let Ok(e) = parse_event(data, &names, None) {
        assert!(e.ts <= MAX_TS);
        assert!(e.value().is_finite() && e.value() >= 0.0);
        // With a clock limit, the same line is accepted only if it is not ahead of it.
        let limited = parse_event(data, &names, Some(e.ts.saturating_sub(1)));
        assert_eq!(limited.is_ok(), e.ts == 0);
    }
    let _ = parse_catalog(data, &names);
});
