//! The HTTP router's input handling: any method, path, query and Authorization (or Cookie)
//! header give a route and parsed parameters or a 4xx error, never a panic.
#![no_main]

use hyper::header::HeaderValue;
use hyper::Method;
use libfuzzer_sys::fuzz_target;
use persona::auth;
use persona::config::HttpSettings;
use persona::http::{limit_param, number_param, param, path_id, route_of, Route};

fuzz_target!(|input: (&str, &str, Option<&str>, &[u8])| {
    let (method, target, query, authorization) = input;
    let Ok(method) = Method::from_bytes(method.as_bytes()) else {
        return;
    };
    let segments: Vec<&str> = target.trim_start_matches('/').split('/').collect();
    let route = route_of(&method, &segments);
    let id = match route {
        Route::Stream(u) | Route::Profile(u) | Route::Erase(u) | Route::Recommendations(u) => {
            Some(u)
        }
        Route::Similar(i) => Some(i),
        _ => None,
    };
    if let Some(raw) = id {
        match path_id(raw, "user") {
            Ok(id) => assert!(!id.is_empty() && id.len() <= persona::parse::MAX_ID_BYTES),
            Err(reply) => assert_eq!(reply.status(), 400),
        }
    }
    for name in ["min_as_of_ms", "timeout_ms"] {
        if let Err(reply) = number_param(query, name) {
            assert_eq!(reply.status(), 400);
        }
    }
    if let Ok(n) = limit_param(query) {
        assert!((1..=100).contains(&n));
    }
    let _ = param(query, "strategy");
    let http = HttpSettings {
        read_token: Some("r".into()),
        admin_token: Some("a".into()),
        max_uri_bytes: 2048,
        max_headers: 64,
        header_timeout_ms: 10_000,
        tls: None,
        threads: 1,
        cpus: Vec::new(),
    };
    let header = HeaderValue::from_bytes(authorization).ok();
    let scope = auth::scope(&method, &segments);
    // Only a bearer token equal to a configured one passes a guarded scope.
    if auth::check(&http, scope, header.as_ref()).is_ok() && scope != auth::Scope::Public {
        let presented = header
            .as_ref()
            .and_then(|h| h.to_str().ok())
            .and_then(|h| h.split_once(' '))
            .filter(|(scheme, _)| scheme.eq_ignore_ascii_case("bearer"))
            .map(|(_, t)| t.trim());
        assert!(
            matches!(presented, Some("a" | "r")),
            "{header:?} passed {scope:?}"
        );
    }
    // The same bytes as a Cookie header: a token found there is one cookie's value.
    if let Some(token) = header.as_ref().and_then(auth::cookie_token) {
        assert!(!token.contains(';'), "{header:?} gave {token:?}");
    }
});
