//! Bearer-token access control for the HTTP API.
//!
//! Two scopes: reads (GET) and admin (erasure). The admin token also passes reads. A scope
//! with no token configured is open; `persona run` warns about it at start. Tokens are
//! compared in constant time and never logged.
//!
//! Reads also accept the token from a `persona_token` cookie, because the dashboard's
//! EventSource cannot send an `Authorization` header. Admin requests never do: a cookie is
//! sent by the browser on its own, so it must not be able to erase anyone.

use crate::config::HttpSettings;
use hyper::header::HeaderValue;
use hyper::Method;
use subtle::ConstantTimeEq;

/// What a route needs.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Scope {
    /// Health probes, the API description and the dashboard page (which holds no data).
    Public,
    Read,
    Admin,
}

/// Why a request was refused.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Refusal {
    /// No `Authorization: Bearer` header (401).
    Missing,
    /// A token that matches neither configured token (401).
    Invalid,
    /// A read token on an admin route (403).
    Forbidden,
}

/// The scope of a request, by its route. A path the server does not serve with that method
/// is public, so that it gets its 404 or 405 whatever the token.
pub fn scope(method: &Method, segments: &[&str]) -> Scope {
    use crate::http::Route;
    match crate::http::route_of(method, segments) {
        Route::Healthz
        | Route::Readyz
        | Route::OpenApi
        | Route::Dashboard
        | Route::NotAllowed
        | Route::NotFound => Scope::Public,
        Route::Erase(_) => Scope::Admin,
        Route::Stream(_)
        | Route::Segments
        | Route::Profile(_)
        | Route::Recommendations(_)
        | Route::Similar(_)
        | Route::Status
        | Route::Metrics => Scope::Read,
    }
}

/// Checks the `Authorization` header against the tokens `scope` accepts.
pub fn check(
    http: &HttpSettings,
    scope: Scope,
    header: Option<&HeaderValue>,
) -> Result<(), Refusal> {
    let accepted: Vec<&str> = match scope {
        Scope::Public => return Ok(()),
        Scope::Read => match (&http.read_token, &http.admin_token) {
            (None, _) => return Ok(()),
            (Some(r), a) => std::iter::once(r.as_str()).chain(a.as_deref()).collect(),
        },
        Scope::Admin => match &http.admin_token {
            None => return Ok(()),
            Some(a) => vec![a.as_str()],
        },
    };
    let presented = header
        .and_then(|h| h.to_str().ok())
        .and_then(|h| {
            let (scheme, token) = h.split_once(' ')?;
            scheme.eq_ignore_ascii_case("bearer").then(|| token.trim())
        })
        .ok_or(Refusal::Missing)?;
    // Every configured token is compared, each in constant time over fixed-length digests:
    // neither the answer's timing nor a length mismatch tells how close a guess was.
    let matches = accepted.iter().fold(0u8, |m, t| m | same(t, presented));
    if matches == 1 {
        return Ok(());
    }
    let reads = http.read_token.as_deref();
    if scope == Scope::Admin && reads.is_some_and(|r| same(r, presented) == 1) {
        return Err(Refusal::Forbidden);
    }
    Err(Refusal::Invalid)
}

/// 1 if `a == b`, else 0, in time independent of where they differ and of their lengths.
fn same(a: &str, b: &str) -> u8 {
    let digest = |s: &str| ring::digest::digest(&ring::digest::SHA256, s.as_bytes());
    digest(a).as_ref().ct_eq(digest(b).as_ref()).unwrap_u8()
}

/// The cookie that carries a read token for the dashboard.
pub const COOKIE: &str = "persona_token";

/// The `persona_token` value of a `Cookie` header, if it has one.
pub fn cookie_token(cookie: &HeaderValue) -> Option<&str> {
    cookie.to_str().ok()?.split(';').find_map(|pair| {
        let (name, value) = pair.split_once('=')?;
        (name.trim() == COOKIE).then(|| value.trim().trim_matches('"'))
    })
}

/// The token a process sends with its own `method` requests to the other processes of its
/// cluster: the admin token only where a read token would not pass.
pub fn internal_token<'a>(http: &'a HttpSettings, method: &Method) -> Option<&'a str> {
    if method == Method::GET || method == Method::HEAD {
        http.read_token.as_deref().or(http.admin_token.as_deref())
    } else {
        http.admin_token.as_deref().or(http.read_token.as_deref())
    }
}

/// Start-up warnings for open scopes.
pub fn warnings(http: &HttpSettings, listen: &str) -> Vec<String> {
    let mut out = Vec::new();
    if http.read_token.is_none() {
        out.push(format!(
            "http.read_token is not set: profiles and recommendations on {listen} are readable without a token"
        ));
    }
    if http.admin_token.is_none() {
        out.push(format!(
            "http.admin_token is not set: anyone who reaches {listen} can erase users (DELETE /v1/users/{{id}})"
        ));
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn http(read: Option<&str>, admin: Option<&str>) -> HttpSettings {
        HttpSettings {
            read_token: read.map(String::from),
            admin_token: admin.map(String::from),
            max_uri_bytes: 2048,
            max_headers: 64,
            header_timeout_ms: 10_000,
            tls: None,
            threads: 1,
            cpus: Vec::new(),
        }
    }

    fn bearer(t: &str) -> HeaderValue {
        HeaderValue::from_str(&format!("Bearer {t}")).unwrap()
    }

    #[test]
    fn scopes_and_tokens() {
        let both = http(Some("r"), Some("a"));
        let read = scope(&Method::GET, &["v1", "users", "u"]);
        let admin = scope(&Method::DELETE, &["v1", "users", "u"]);
        assert_eq!((read, admin), (Scope::Read, Scope::Admin));
        assert_eq!(scope(&Method::GET, &["healthz"]), Scope::Public);
        assert_eq!(check(&both, Scope::Public, None), Ok(()));
        assert_eq!(check(&both, read, None), Err(Refusal::Missing));
        assert_eq!(check(&both, read, Some(&bearer("r"))), Ok(()));
        assert_eq!(check(&both, read, Some(&bearer("a"))), Ok(()));
        assert_eq!(
            check(&both, read, Some(&bearer("x"))),
            Err(Refusal::Invalid)
        );
        assert_eq!(
            check(&both, admin, Some(&bearer("r"))),
            Err(Refusal::Forbidden)
        );
        assert_eq!(check(&both, admin, Some(&bearer("a"))), Ok(()));
        let basic = HeaderValue::from_static("Basic YTpi");
        assert_eq!(check(&both, read, Some(&basic)), Err(Refusal::Missing));
        // No token: that scope is open; the other stays closed.
        let reads_open = http(None, Some("a"));
        assert_eq!(check(&reads_open, read, None), Ok(()));
        assert_eq!(check(&reads_open, admin, None), Err(Refusal::Missing));
        let admin_open = http(Some("r"), None);
        assert_eq!(check(&admin_open, admin, None), Ok(()));
        assert_eq!(check(&admin_open, read, None), Err(Refusal::Missing));
        assert_eq!(warnings(&http(None, None), "x").len(), 2);
        // Between processes: the read token for reads, the admin token only for the rest.
        assert_eq!(internal_token(&both, &Method::GET), Some("r"));
        assert_eq!(internal_token(&both, &Method::DELETE), Some("a"));
        assert_eq!(internal_token(&admin_open, &Method::DELETE), Some("r"));
        assert_eq!(
            (same("tok", "tok"), same("tok", "tok2"), same("", "x")),
            (1, 0, 0)
        );
        assert!(warnings(&both, "x").is_empty());
    }

    #[test]
    fn the_token_cookie_is_found_among_others() {
        let c = |s: &'static str| HeaderValue::from_static(s);
        assert_eq!(cookie_token(&c("persona_token=ab+/=")), Some("ab+/="));
        assert_eq!(cookie_token(&c("a=1; persona_token=t; b=2")), Some("t"));
        assert_eq!(cookie_token(&c("persona_token2=t; x=persona_token")), None);
        assert_eq!(cookie_token(&c("a=1")), None);
    }
}
