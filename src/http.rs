//! The HTTP API (SPEC §5): profiles, status, health, readiness and metrics.
//!
//! Profile reads go to the worker that owns the user ([`crate::query`]); nothing here keeps a
//! copy of engine state. Every error is `{"error": {"code", "message"}}` with a fitting status.

use crate::engine::Shared;
use crate::query::{Answer, Ask};
use crate::render;
use http_body_util::{Either, Full};
use hyper::body::{Bytes, Incoming};
use hyper::header::{HeaderValue, CONTENT_TYPE};
use hyper::server::conn::http1;
use hyper::service::service_fn;
use hyper::{Method, Request, Response, StatusCode};
use hyper_util::rt::TokioIo;
use serde_json::json;
use std::convert::Infallible;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};
use tokio::net::TcpListener;

/// Waiting for `min_as_of_ms` is capped at this.
pub const MAX_TIMEOUT_MS: u64 = 60_000;
/// Default wait for `min_as_of_ms`, and for a first complete time.
pub const DEFAULT_TIMEOUT_MS: u64 = 5_000;

/// A whole body, or a stream of server-sent events.
pub type Body = Either<Full<Bytes>, crate::stream::SseBody>;
pub type Reply = Response<Body>;

/// The OpenAPI 3 description of this API.
pub const OPENAPI: &str = include_str!("../docs/openapi.json");

/// The dashboard (SPEC §6 live delivery): one static page, no build step.
const DASHBOARD: &str = include_str!("dashboard.html");

fn json_reply(status: StatusCode, body: &serde_json::Value) -> Reply {
    json_bytes(status, body.to_string().into_bytes())
}

fn json_bytes(status: StatusCode, body: Vec<u8>) -> Reply {
    let mut r = Response::new(Either::Left(Full::new(Bytes::from(body))));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(CONTENT_TYPE, HeaderValue::from_static("application/json"));
    r
}

fn dashboard() -> Reply {
    let mut r = Response::new(Either::Left(Full::new(Bytes::from_static(
        DASHBOARD.as_bytes(),
    ))));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static("text/html; charset=utf-8"),
    );
    r
}

/// `reply` with the header naming the (cluster-wide) worker that answered it.
fn answered_by(mut reply: Reply, worker: usize) -> Reply {
    reply
        .headers_mut()
        .insert("x-persona-worker", HeaderValue::from(worker as u64));
    reply
}

fn error(status: StatusCode, code: &str, message: impl Into<String>) -> Reply {
    json_reply(
        status,
        &json!({"error": {"code": code, "message": message.into()}}),
    )
}

/// Serves `listener` until `shutdown` resolves; over TLS when `tls` is given.
pub async fn serve(
    listener: TcpListener,
    shared: Arc<Shared>,
    tls: Option<tokio_rustls::TlsAcceptor>,
    shutdown: impl std::future::Future<Output = ()>,
) {
    tokio::pin!(shutdown);
    loop {
        tokio::select! {
            _ = &mut shutdown => return,
            accepted = listener.accept() => {
                let (stream, _) = match accepted {
                    Ok(s) => s,
                    Err(e) => {
                        tracing::warn!("accept failed: {e}");
                        tokio::time::sleep(Duration::from_millis(50)).await;
                        continue;
                    }
                };
                // Answers are small and written as soon as they are ready: without this, one
                // written in two segments waits for the client's delayed ACK (Nagle).
                let _ = stream.set_nodelay(true);
                let shared = shared.clone();
                let tls = tls.clone();
                tokio::spawn(async move {
                    let Some(acceptor) = tls else {
                        return connection(TokioIo::new(stream), shared).await;
                    };
                    // A client that never finishes its handshake is a slow client too.
                    let limit = Duration::from_millis(shared.settings.http.header_timeout_ms);
                    match tokio::time::timeout(limit, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => connection(TokioIo::new(tls_stream), shared).await,
                        Ok(Err(e)) => tracing::debug!("TLS handshake failed: {e}"),
                        Err(_) => tracing::debug!("TLS handshake timed out"),
                    }
                });
            }
        }
    }
}

/// Serves one connection, within the configured request limits.
async fn connection<I>(io: I, shared: Arc<Shared>)
where
    I: hyper::rt::Read + hyper::rt::Write + Unpin + Send + 'static,
{
    let limits = shared.settings.http.clone();
    let service = service_fn(move |req| {
        let shared = shared.clone();
        async move { Ok::<_, Infallible>(route(req, &shared).await) }
    });
    let conn = http1::Builder::new()
        .max_buf_size(MAX_HEAD_BYTES)
        .max_headers(limits.max_headers)
        .header_read_timeout(Duration::from_millis(limits.header_timeout_ms))
        .timer(hyper_util::rt::TokioTimer::new())
        .serve_connection(io, service);
    if let Err(e) = conn.await {
        tracing::debug!("connection ended: {e}");
    }
}

/// The largest request head served (request line and header fields).
const MAX_HEAD_BYTES: usize = 64 * 1024;

/// What a request asks for, by method and path segments (ids still percent-encoded).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Route<'a> {
    Dashboard,
    Stream(&'a str),
    Segments,
    Profile(&'a str),
    Erase(&'a str),
    OpenApi,
    Recommendations(&'a str),
    Similar(&'a str),
    Status,
    Healthz,
    Readyz,
    Metrics,
    /// A known path with another method (405).
    NotAllowed,
    NotFound,
}

/// The route table. `HEAD` is answered as `GET` (hyper sends no body for it).
pub fn route_of<'a>(method: &Method, segments: &[&'a str]) -> Route<'a> {
    let get = method == Method::GET || method == Method::HEAD;
    match segments {
        [""] if get => Route::Dashboard,
        ["v1", "users", user, "stream"] if get => Route::Stream(user),
        ["v1", "segments"] if get => Route::Segments,
        ["v1", "users", user] if get => Route::Profile(user),
        ["v1", "users", user] if method == Method::DELETE => Route::Erase(user),
        ["openapi.json"] if get => Route::OpenApi,
        ["v1", "users", user, "recommendations"] if get => Route::Recommendations(user),
        ["v1", "items", item, "similar"] if get => Route::Similar(item),
        ["v1", "status"] if get => Route::Status,
        ["healthz"] if get => Route::Healthz,
        ["readyz"] if get => Route::Readyz,
        ["metrics"] if get => Route::Metrics,
        ["v1", "users", _]
        | [""]
        | ["v1", "users", _, "stream"]
        | ["v1", "segments"]
        | ["v1", "users", _, "recommendations"]
        | ["v1", "items", _, "similar"]
        | ["v1", "status"]
        | ["healthz"]
        | ["readyz"]
        | ["metrics"]
        | ["openapi.json"] => Route::NotAllowed,
        _ => Route::NotFound,
    }
}

async fn route(req: Request<Incoming>, shared: &Arc<Shared>) -> Reply {
    let started = Instant::now();
    let path = req.uri().path().to_string();
    let segments: Vec<&str> = path.trim_start_matches('/').split('/').collect();
    let forwarded = req.headers().contains_key(crate::forward::FORWARDED);
    let process = shared.settings.cluster.as_ref().map_or(0, |c| c.process);
    if let Some(mut refused) = refuse(&req, &segments, shared) {
        refused
            .headers_mut()
            .insert("x-persona-process", HeaderValue::from(process as u64));
        return refused;
    }
    if let (Some(cluster), false) = (&shared.settings.cluster, forwarded) {
        let method = req.method();
        let routed = [Method::GET, Method::HEAD, Method::DELETE]
            .contains(method)
            .then(|| routing_key(method, &segments))
            .flatten();
        if let Some((label, key)) = routed {
            let process = cluster.process_of(shared.router.owner(key));
            if process != cluster.process {
                let target = req
                    .uri()
                    .path_and_query()
                    .map_or(path.as_str(), |p| p.as_str());
                let reply =
                    forward(shared, method.clone(), process, target, req.uri().query()).await;
                shared
                    .metrics
                    .observe_query(label, started.elapsed().as_secs_f64());
                return reply;
            }
        }
    }
    let query = req.uri().query();
    let (label, mut reply) = match route_of(req.method(), &segments) {
        Route::Dashboard => ("dashboard", dashboard()),
        Route::Stream(user) => ("stream", stream(shared, user)),
        Route::Segments => ("segments", segment_list(shared, forwarded).await),
        Route::Profile(user) => ("profile", profile(shared, user, query).await),
        Route::Erase(user) => ("erase", erase(shared, user).await),
        Route::OpenApi => ("openapi", openapi(shared)),
        Route::Recommendations(user) => (
            "recommendations",
            recommendations(shared, user, query, req.method() == Method::HEAD).await,
        ),
        Route::Similar(item) => ("similar", similar(shared, item, query).await),
        Route::Status => ("status", status(shared, forwarded).await),
        Route::Healthz => (
            "healthz",
            json_reply(StatusCode::OK, &json!({"status": "ok"})),
        ),
        Route::Readyz => ("readyz", readyz(shared)),
        Route::Metrics => (
            "metrics",
            metrics(shared, req.headers().get(hyper::header::ACCEPT)),
        ),
        Route::NotAllowed => ("other", not_allowed(req.method(), &path, &segments)),
        Route::NotFound => (
            "other",
            error(
                StatusCode::NOT_FOUND,
                "not_found",
                format!("no route for {path}"),
            ),
        ),
    };
    reply
        .headers_mut()
        .insert("x-persona-process", HeaderValue::from(process as u64));
    shared
        .metrics
        .observe_query(label, started.elapsed().as_secs_f64());
    reply
}

/// The metrics label and routing key (user or item hash) of a request that its owner answers.
fn routing_key(method: &Method, segments: &[&str]) -> Option<(&'static str, u64)> {
    let (label, id, what) = match segments {
        ["v1", "users", user] if method == Method::DELETE => ("erase", user, "user"),
        _ if method != Method::GET && method != Method::HEAD => return None,
        ["v1", "users", user] => ("profile", user, "user"),
        ["v1", "users", user, "recommendations"] => ("recommendations", user, "user"),
        ["v1", "items", item, "similar"] => ("similar", item, "item"),
        _ => return None,
    };
    // An id that does not decode is answered here, with the local 400.
    let id = path_id(id, what).ok()?;
    Some((label, crate::names::hash(&id)))
}

/// Relays a read to `process`, which owns its user or item.
async fn forward(
    shared: &Arc<Shared>,
    method: Method,
    process: usize,
    target: &str,
    query: Option<&str>,
) -> Reply {
    let Some(cluster) = shared.settings.cluster.as_ref() else {
        return error(StatusCode::INTERNAL_SERVER_ERROR, "internal", "no cluster");
    };
    // The owner may wait up to timeout_ms for min_as_of_ms (an erasure: up to the maximum);
    // give it that and a margin.
    let wait = match method {
        Method::DELETE => MAX_TIMEOUT_MS,
        _ => number_param(query, "timeout_ms")
            .ok()
            .flatten()
            .unwrap_or(DEFAULT_TIMEOUT_MS)
            .min(MAX_TIMEOUT_MS),
    };
    let timeout = Duration::from_millis(wait + 2_000);
    let address = &cluster.http[process];
    let token = crate::auth::internal_token(&shared.settings.http, &method);
    let sent = crate::forward::send(method, address, target, cluster.process, token, timeout);
    match sent.await {
        Ok(reply) => reply.map(Either::Left),
        Err(e) => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "process_unavailable",
            format!("process {process} ({address}), which owns this id, did not answer: {e}"),
        ),
    }
}

pub fn param(query: Option<&str>, name: &str) -> Option<String> {
    form_urlencoded::parse(query?.as_bytes())
        .find(|(k, _)| k == name)
        .map(|(_, v)| v.into_owned())
}

pub fn number_param(query: Option<&str>, name: &str) -> Result<Option<u64>, Box<Reply>> {
    match param(query, name) {
        None => Ok(None),
        Some(v) => v.parse::<u64>().map(Some).map_err(|_| {
            Box::new(error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("{name} must be a non-negative integer, got {v:?}"),
            ))
        }),
    }
}

/// A percent-decoded user or item id, checked against SPEC §2's length rule.
pub fn path_id(raw: &str, what: &str) -> Result<String, Box<Reply>> {
    // `%` must start an escape: the decoder would keep a stray one, or `%ZZ`, as it is.
    let bytes = raw.as_bytes();
    let stray = bytes.iter().enumerate().any(|(i, &b)| {
        b == b'%'
            && !bytes
                .get(i + 1..i + 3)
                .is_some_and(|h| h.iter().all(u8::is_ascii_hexdigit))
    });
    if stray {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{what} id has a malformed percent escape (write % as %25)"),
        )));
    }
    let id = match percent_encoding::percent_decode_str(raw).decode_utf8() {
        Ok(u) => u.into_owned(),
        Err(_) => {
            return Err(Box::new(error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!("{what} id is not valid UTF-8"),
            )))
        }
    };
    if id.is_empty() || id.len() > crate::parse::MAX_ID_BYTES {
        return Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("{what} id must be 1..={} bytes", crate::parse::MAX_ID_BYTES),
        )));
    }
    Ok(id)
}

/// Most items a recommendation or similar-items list returns.
pub const MAX_LIMIT: u64 = 100;
const DEFAULT_LIMIT: u64 = 10;

pub fn limit_param(query: Option<&str>) -> Result<usize, Box<Reply>> {
    let Some(v) = param(query, "limit") else {
        return Ok(DEFAULT_LIMIT as usize);
    };
    match v.parse::<u64>() {
        Ok(n) if (1..=MAX_LIMIT).contains(&n) => Ok(n as usize),
        _ => Err(Box::new(error(
            StatusCode::BAD_REQUEST,
            "bad_request",
            format!("limit must be an integer from 1 to {MAX_LIMIT}, got {v:?}"),
        ))),
    }
}

/// The reply for an answer that carries no state.
fn unanswered(shared: &Arc<Shared>, answer: Answer, what: &str) -> Reply {
    match answer {
        Answer::Disabled => error(
            StatusCode::NOT_FOUND,
            "disabled",
            format!("{what} are turned off ([recommendations] enabled = false)"),
        ),
        Answer::Timeout { as_of: None } if shared.clock().is_none() => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the engine has not completed any time yet",
        ),
        Answer::Timeout { .. } => error(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!("no answer for {what} in time"),
        ),
        _ => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "unavailable",
            "the engine is shutting down",
        ),
    }
}

/// `head`: a `HEAD` request, which shows no items, so it counts as no exposure.
async fn recommendations(
    shared: &Arc<Shared>,
    raw_user: &str,
    query: Option<&str>,
    head: bool,
) -> Reply {
    let (user_id, limit) = match (path_id(raw_user, "user"), limit_param(query)) {
        (Ok(u), Ok(l)) => (u, l),
        (Err(r), _) | (_, Err(r)) => return *r,
    };
    let Some(rec) = shared.settings.recommendations.as_ref() else {
        return unanswered(shared, Answer::Disabled, "recommendations");
    };
    // The experiment assigns the strategy; `?strategy=` overrides it (evaluation, debugging).
    let name = match param(query, "strategy") {
        Some(s) if rec.strategies.contains_key(&s) => s,
        Some(s) => {
            return error(
                StatusCode::BAD_REQUEST,
                "bad_request",
                format!(
                    "unknown strategy {s:?} (configured: {})",
                    rec.strategies
                        .keys()
                        .cloned()
                        .collect::<Vec<_>>()
                        .join(", ")
                ),
            )
        }
        None => rec.variant(&user_id).to_string(),
    };
    let Some(strategy) = rec.strategies.get(&name).cloned() else {
        return unanswered(shared, Answer::Disabled, "recommendations");
    };
    let answer = shared
        .router
        .ask(
            crate::names::hash(&user_id),
            Ask::Recommend { strategy, limit },
            None,
            Duration::from_millis(DEFAULT_TIMEOUT_MS),
        )
        .await;
    match answer {
        Answer::Recommendations {
            as_of,
            worker,
            items,
        } => {
            if !head {
                shared.metrics.exposed(&name, items.len());
            }
            let body = render::recommendations(&user_id, as_of, &name, &items, &shared.names);
            answered_by(json_reply(StatusCode::OK, &body), worker)
        }
        other => unanswered(shared, other, "recommendations"),
    }
}

async fn similar(shared: &Arc<Shared>, raw_item: &str, query: Option<&str>) -> Reply {
    let (item_id, limit) = match (path_id(raw_item, "item"), limit_param(query)) {
        (Ok(i), Ok(l)) => (i, l),
        (Err(r), _) | (_, Err(r)) => return *r,
    };
    if shared.settings.recommendations.is_none() {
        return unanswered(shared, Answer::Disabled, "similar items");
    }
    let item = crate::names::hash(&item_id);
    let answer = shared
        .router
        .ask(
            item,
            Ask::Similar { item, limit },
            None,
            Duration::from_millis(DEFAULT_TIMEOUT_MS),
        )
        .await;
    match answer {
        // An id no event or catalog record ever named is unknown; a known item may have none.
        Answer::Similar { as_of, .. } if !shared.names.is_item(item) => missing_at(
            "item_not_found",
            format!("no event or catalog record names item {item_id:?} as of {as_of}"),
            as_of,
        ),
        Answer::Similar {
            as_of,
            items,
            worker,
        } => answered_by(
            json_reply(
                StatusCode::OK,
                &render::similar(&item_id, as_of, &items, &shared.names),
            ),
            worker,
        ),
        other => unanswered(shared, other, "similar items"),
    }
}

async fn profile(shared: &Arc<Shared>, raw_user: &str, query: Option<&str>) -> Reply {
    let user_id = match path_id(raw_user, "user") {
        Ok(u) => u,
        Err(r) => return *r,
    };
    let (min_as_of, timeout_ms) = match (
        number_param(query, "min_as_of_ms"),
        number_param(query, "timeout_ms"),
    ) {
        (Ok(m), Ok(t)) => (m, t.unwrap_or(DEFAULT_TIMEOUT_MS).min(MAX_TIMEOUT_MS)),
        (Err(r), _) | (_, Err(r)) => return *r,
    };
    let user = crate::names::hash(&user_id);
    // Published by the owner worker: answered here, without waiting for its step to end.
    let published = shared
        .router
        .local(user)
        .and_then(|w| shared.profiles.get(user, w, min_as_of));
    let answer = match published {
        Some(hit) => Answer::Profile {
            as_of: hit.as_of,
            worker: shared.router.owner(user),
            state: hit.state,
        },
        None => match shared
            .router
            .ask(
                user,
                Ask::Profile,
                min_as_of,
                Duration::from_millis(timeout_ms),
            )
            .await
        {
            Answer::Timeout { as_of: None } => Answer::Timeout {
                as_of: shared.clock(),
            },
            a => a,
        },
    };
    match answer {
        Answer::Profile {
            as_of,
            worker,
            state: Some(state),
        } => match render::profile(
            user_id.clone(),
            as_of,
            &state,
            &shared.names,
            &shared.settings,
        ) {
            Some(p) => {
                // Serialized from the struct, so fields keep SPEC §4's order.
                answered_by(
                    json_bytes(StatusCode::OK, serde_json::to_vec(&p).unwrap_or_default()),
                    worker,
                )
            }
            None => not_found(&user_id, as_of),
        },
        Answer::Profile {
            as_of, state: None, ..
        } => not_found(&user_id, as_of),
        Answer::Timeout { as_of: None } => error(
            StatusCode::SERVICE_UNAVAILABLE,
            "not_ready",
            "the engine has not completed any time yet",
        ),
        Answer::Timeout { as_of: Some(t) } => error(
            StatusCode::GATEWAY_TIMEOUT,
            "timeout",
            format!(
                "the engine clock is at {t}, short of min_as_of_ms {} after {timeout_ms} ms",
                min_as_of.unwrap_or(0)
            ),
        ),
        other => unanswered(shared, other, "profiles"),
    }
}

/// 405, with the `Allow` header RFC 9110 asks for.
fn not_allowed(method: &Method, path: &str, segments: &[&str]) -> Reply {
    let allow = match segments {
        ["v1", "users", _] => "GET, HEAD, DELETE",
        _ => "GET, HEAD",
    };
    let mut r = error(
        StatusCode::METHOD_NOT_ALLOWED,
        "method_not_allowed",
        format!("{method} is not allowed on {path} (allowed: {allow})"),
    );
    r.headers_mut()
        .insert(hyper::header::ALLOW, HeaderValue::from_static(allow));
    r
}

/// Refuses a request that is too long or not authorised (before it is routed or forwarded).
fn refuse(req: &Request<Incoming>, segments: &[&str], shared: &Arc<Shared>) -> Option<Reply> {
    let limits = &shared.settings.http;
    let length = req.uri().path_and_query().map_or(0, |p| p.as_str().len());
    if length > limits.max_uri_bytes {
        shared.metrics.refused("uri_too_long");
        return Some(error(
            StatusCode::URI_TOO_LONG,
            "uri_too_long",
            format!(
                "path and query are {length} bytes; the limit is {} (http.max_uri_bytes)",
                limits.max_uri_bytes
            ),
        ));
    }
    // hyper's buffer limit bounds a head only as read: one that arrives in one piece can pass.
    let head: usize = length
        + req
            .headers()
            .iter()
            .map(|(name, value)| name.as_str().len() + value.len() + 4)
            .sum::<usize>();
    if head > MAX_HEAD_BYTES {
        shared.metrics.refused("header_too_large");
        let mut reply = error(
            StatusCode::REQUEST_HEADER_FIELDS_TOO_LARGE,
            "header_too_large",
            format!("the request head is about {head} bytes; the limit is {MAX_HEAD_BYTES}"),
        );
        reply
            .headers_mut()
            .insert(hyper::header::CONNECTION, HeaderValue::from_static("close"));
        return Some(reply);
    }
    let scope = crate::auth::scope(req.method(), segments);
    let header = req.headers().get(hyper::header::AUTHORIZATION);
    // Reads only: the dashboard's token cookie (see `crate::auth`).
    let from_cookie = (header.is_none() && scope == crate::auth::Scope::Read)
        .then(|| {
            req.headers()
                .get_all(hyper::header::COOKIE)
                .iter()
                .find_map(crate::auth::cookie_token)
                .and_then(|t| HeaderValue::from_str(&format!("Bearer {t}")).ok())
        })
        .flatten();
    let header = header.or(from_cookie.as_ref());
    let (status, code, message) = match crate::auth::check(limits, scope, header) {
        Ok(()) => return None,
        Err(crate::auth::Refusal::Missing) => (
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "this endpoint needs an Authorization: Bearer token (reads: or a persona_token cookie)",
        ),
        Err(crate::auth::Refusal::Invalid) => (
            StatusCode::UNAUTHORIZED,
            "unauthorized",
            "the bearer token is not valid",
        ),
        Err(crate::auth::Refusal::Forbidden) => (
            StatusCode::FORBIDDEN,
            "forbidden",
            "this endpoint needs the admin token; the read token does not pass",
        ),
    };
    shared.metrics.refused(code);
    let mut r = error(status, code, message);
    if status == StatusCode::UNAUTHORIZED {
        r.headers_mut().insert(
            hyper::header::WWW_AUTHENTICATE,
            HeaderValue::from_static("Bearer realm=\"persona\""),
        );
    }
    Some(r)
}

/// `DELETE /v1/users/{id}`: erases the user (see `crate::erasure`); answers once every view
/// has taken the erasure in.
async fn erase(shared: &Arc<Shared>, raw_user: &str) -> Reply {
    let user_id = match path_id(raw_user, "user") {
        Ok(u) => u,
        Err(r) => return *r,
    };
    let answer = shared
        .router
        .ask(
            crate::names::hash(&user_id),
            Ask::Erase { through: None },
            None,
            Duration::from_millis(MAX_TIMEOUT_MS),
        )
        .await;
    match answer {
        Answer::Erased {
            as_of,
            worker,
            through,
        } => {
            tracing::info!(erased_through_ms = through, as_of, "a user was erased");
            answered_by(
                json_reply(
                    StatusCode::OK,
                    &json!({"user_id": user_id, "erased": true, "erased_through_ms": through, "as_of_ms": as_of}),
                ),
                worker,
            )
        }
        Answer::Failed(message) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, "erasure_failed", message)
        }
        Answer::Refused(message) => error(StatusCode::CONFLICT, "read_only", message),
        other => unanswered(shared, other, "erasures"),
    }
}

/// `GET /openapi.json`: the API description (docs/openapi.json, embedded), with the configured
/// strategy names filled in.
fn openapi(shared: &Arc<Shared>) -> Reply {
    let Ok(mut doc) = serde_json::from_str::<serde_json::Value>(OPENAPI) else {
        return json_bytes(StatusCode::OK, OPENAPI.as_bytes().to_vec());
    };
    let strategies: Vec<&String> = shared
        .settings
        .recommendations
        .as_ref()
        .map(|r| r.strategies.keys().collect())
        .unwrap_or_default();
    let params = &mut doc["paths"]["/v1/users/{user_id}/recommendations"]["get"]["parameters"];
    if let Some(list) = params.as_array_mut() {
        for p in list.iter_mut().filter(|p| p["name"] == "strategy") {
            p["schema"]["enum"] = json!(strategies);
        }
    }
    json_reply(StatusCode::OK, &doc)
}

/// `GET /v1/users/{id}/stream`. In a cluster, a user of another process is redirected there:
/// a stream is not relayed.
fn stream(shared: &Arc<Shared>, raw_user: &str) -> Reply {
    let user_id = match path_id(raw_user, "user") {
        Ok(u) => u,
        Err(r) => return *r,
    };
    if let Some(cluster) = shared.settings.cluster.as_ref() {
        let process = cluster.process_of(shared.router.owner(crate::names::hash(&user_id)));
        if process != cluster.process {
            let mut r = error(
                StatusCode::TEMPORARY_REDIRECT,
                "redirect",
                format!("user {user_id:?} is streamed by process {process}"),
            );
            let location = format!(
                "http://{}/v1/users/{raw_user}/stream",
                cluster.http[process]
            );
            if let Ok(v) = HeaderValue::from_str(&location) {
                r.headers_mut().insert(hyper::header::LOCATION, v);
            }
            return r;
        }
    }
    if shared.stopping() {
        return unanswered(shared, Answer::Unavailable, "streams");
    }
    let mut r = Response::new(Either::Right(crate::stream::start(shared.clone(), user_id)));
    let h = r.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static("text/event-stream"));
    h.insert(
        hyper::header::CACHE_CONTROL,
        HeaderValue::from_static("no-cache"),
    );
    h.insert(
        hyper::header::ACCESS_CONTROL_ALLOW_ORIGIN,
        HeaderValue::from_static("*"),
    );
    r
}

/// `GET /v1/segments`: every segment with its rule and members, at this process's latest
/// complete time; in a cluster, summed over the processes (each asked for its own).
async fn segment_list(shared: &Arc<Shared>, local: bool) -> Reply {
    let timeout = Duration::from_millis(DEFAULT_TIMEOUT_MS);
    let token = crate::auth::internal_token(&shared.settings.http, &Method::GET);
    let mut counts = vec![0u64; shared.settings.segments.len()];
    let mut as_of: Option<u64> = None;
    for answer in shared.router.ask_all(Ask::SegmentCounts, timeout).await {
        match answer {
            Answer::SegmentCounts {
                as_of: t,
                counts: c,
            } => {
                as_of = Some(as_of.map_or(t, |a| a.min(t)));
                counts.iter_mut().zip(c).for_each(|(n, m)| *n += m);
            }
            other => return unanswered(shared, other, "segments"),
        }
    }
    if let (Some(cluster), false) = (shared.settings.cluster.as_ref(), local) {
        let others = (0..cluster.processes()).filter(|p| *p != cluster.process);
        for p in others {
            let address = &cluster.http[p];
            let reply = crate::forward::send(
                Method::GET,
                address,
                "/v1/segments",
                cluster.process,
                token,
                timeout,
            )
            .await;
            let body = match reply {
                Ok(r) if r.status() == StatusCode::OK => {
                    use http_body_util::BodyExt;
                    r.into_body().collect().await.map(|b| b.to_bytes()).ok()
                }
                _ => None,
            };
            let Some(v) = body.and_then(|b| serde_json::from_slice::<serde_json::Value>(&b).ok())
            else {
                return error(
                    StatusCode::SERVICE_UNAVAILABLE,
                    "process_unavailable",
                    format!("process {p} ({address}) did not give its segment counts"),
                );
            };
            if let Some(t) = v["as_of_ms"].as_u64() {
                as_of = Some(as_of.map_or(t, |a| a.min(t)));
            }
            for (n, seg) in counts
                .iter_mut()
                .zip(v["segments"].as_array().into_iter().flatten())
            {
                *n += seg["members"].as_u64().unwrap_or(0);
            }
        }
    }
    let segments: Vec<_> = shared
        .settings
        .segments
        .iter()
        .zip(&counts)
        .map(|(s, n)| json!({"name": s.name, "rule": s.rule.text(), "members": n}))
        .collect();
    json_reply(
        StatusCode::OK,
        &json!({"as_of_ms": as_of, "segments": segments}),
    )
}

fn not_found(user_id: &str, as_of: u64) -> Reply {
    missing_at(
        "user_not_found",
        format!("no events for user {user_id:?} as of {as_of}"),
        as_of,
    )
}

/// A 404 about state: it says (in `x-persona-as-of-ms`) the time at which the id was unknown.
fn missing_at(code: &str, message: String, as_of: u64) -> Reply {
    let mut r = error(StatusCode::NOT_FOUND, code, message);
    r.headers_mut()
        .insert("x-persona-as-of-ms", HeaderValue::from(as_of));
    r
}

/// This process's status; in a cluster, with every other process's (asked over HTTP) under
/// `processes`. `local`: this process's alone (what the other processes ask for).
async fn status(shared: &Arc<Shared>, local: bool) -> Reply {
    let mut mine = process_status(shared);
    let Some(cluster) = shared.settings.cluster.as_ref() else {
        mine["processes"] = json!([process_entry(&mine, 0, None)]);
        return json_reply(StatusCode::OK, &mine);
    };
    if local {
        return json_reply(StatusCode::OK, &mine);
    }
    let asks = (0..cluster.processes())
        .filter(|p| *p != cluster.process)
        .map(|p| async move {
            let answer = crate::forward::send(
                Method::GET,
                &cluster.http[p],
                "/v1/status",
                cluster.process,
                crate::auth::internal_token(&shared.settings.http, &Method::GET),
                Duration::from_secs(2),
            )
            .await;
            let parsed = match answer {
                Ok(r) if r.status() == StatusCode::OK => {
                    use http_body_util::BodyExt;
                    match r.into_body().collect().await {
                        Ok(b) => serde_json::from_slice::<serde_json::Value>(&b.to_bytes())
                            .map_err(|e| format!("unreadable status: {e}")),
                        Err(e) => Err(format!("unreadable status: {e}")),
                    }
                }
                Ok(r) => Err(format!("status {}", r.status())),
                Err(e) => Err(e),
            };
            (p, parsed)
        });
    let answers = futures_join_all(asks).await;
    let mut processes = Vec::new();
    let mut all_ready = mine["ready"].as_bool().unwrap_or(false);
    for p in 0..cluster.processes() {
        if p == cluster.process {
            processes.push(process_entry(&mine, p, Some(&cluster.http[p])));
            continue;
        }
        match answers.iter().find(|(q, _)| *q == p).map(|(_, a)| a) {
            Some(Ok(s)) => {
                all_ready &= s["ready"].as_bool().unwrap_or(false);
                processes.push(process_entry(s, p, Some(&cluster.http[p])));
            }
            Some(Err(e)) => {
                all_ready = false;
                processes.push(json!({
                    "process": p, "http": cluster.http[p], "reachable": false, "ready": false, "error": e,
                }));
            }
            None => {}
        }
    }
    mine["cluster_ready"] = json!(all_ready);
    mine["processes"] = json!(processes);
    json_reply(StatusCode::OK, &mine)
}

/// Awaits every future (few, small: one per process).
async fn futures_join_all<F: std::future::Future>(
    futures: impl Iterator<Item = F>,
) -> Vec<F::Output> {
    let handles: Vec<_> = futures.map(Box::pin).collect();
    let mut out = Vec::with_capacity(handles.len());
    for h in handles {
        out.push(h.await);
    }
    out
}

/// One row of `processes` from a process's own status.
fn process_entry(
    status: &serde_json::Value,
    process: usize,
    http: Option<&str>,
) -> serde_json::Value {
    json!({
        "process": process,
        "http": http,
        "reachable": true,
        "ready": status["ready"],
        "as_of_ms": status["as_of_ms"],
        "workers": status["workers"],
        "first_worker": status["first_worker"],
        "events_in": status["counters"]["events_in"],
        "accepted": status["counters"]["accepted"],
    })
}

fn process_status(shared: &Arc<Shared>) -> serde_json::Value {
    let first = shared
        .settings
        .cluster
        .as_ref()
        .map_or(0, |c| c.process * c.threads);
    let sources: Vec<_> = if shared.kafka.is_some() {
        let mut parts: Vec<_> = shared
            .workers
            .iter()
            .flat_map(|w| {
                w.partitions
                    .lock()
                    .unwrap_or_else(|p| p.into_inner())
                    .clone()
            })
            .collect();
        parts.sort_by(|a, b| (&a.topic, a.partition).cmp(&(&b.topic, b.partition)));
        parts
            .into_iter()
            .map(|p| {
                json!({
                    "kind": "kafka", "topic": p.topic, "partition": p.partition, "worker": p.worker,
                    "position": p.position, "position_as_of_ms": p.as_of_ms, "read_position": p.read_position,
                    "high_watermark": p.high_watermark, "lag": p.lag,
                })
            })
            .collect()
    } else {
        shared
            .workers
            .iter()
            .enumerate()
            .map(|(i, w)| {
                let offset = w.offset.load(Ordering::Relaxed);
                // `u64::MAX`: a .gz log, whose compressed size says nothing of the offset.
                let len = Some(w.file_len.load(Ordering::Relaxed)).filter(|l| *l != u64::MAX);
                json!({
                    "kind": "file", "path": shared.source_path.display().to_string(), "worker": first + i,
                    "lines": w.lines.load(Ordering::Relaxed), "offset_bytes": offset,
                    "file_bytes": len, "lag_bytes": len.map(|l| l.saturating_sub(offset)),
                    "clock_ms": w.clock.load(Ordering::Relaxed),
                })
            })
            .collect()
    };
    let m = &shared.metrics;
    let dead: serde_json::Map<String, serde_json::Value> = m
        .dead_letters()
        .into_iter()
        .map(|(k, v)| (k, json!(v)))
        .collect();
    let (process, first_worker, cluster_workers) = match &shared.settings.cluster {
        Some(c) => (c.process, c.process * c.threads, c.peers()),
        None => (0, 0, shared.workers.len()),
    };
    json!({
        "as_of_ms": shared.clock(),
        "ready": shared.ready(),
        "uptime_ms": shared.started.elapsed().as_millis() as u64,
        "clock": format!("{:?}", shared.settings.clock).to_lowercase(),
        "process": process,
        "workers": shared.workers.len(),
        "first_worker": first_worker,
        "cluster_workers": cluster_workers,
        "sources": sources,
        "counters": {
            "events_in": m.events_read(), "accepted": m.accepted(), "duplicates": m.duplicates(),
            "conflicting_duplicates": m.conflicting(), "dead_letters": dead, "catalog_records": m.catalog_records(),
        },
    })
}

fn readyz(shared: &Arc<Shared>) -> Reply {
    if shared.ready() {
        json_reply(
            StatusCode::OK,
            &json!({"ready": true, "as_of_ms": shared.clock()}),
        )
    } else {
        let message = match &shared.kafka {
            _ if crate::cluster::peer_lost() => {
                "lost the connection to another process of the cluster; stopping".to_string()
            }
            Some(k) if k.layout().is_none() => format!(
                "waiting for the Kafka brokers at {} or its topics (see the log)",
                k.brokers()
            ),
            _ => "the engine is still reading its sources' initial contents".to_string(),
        };
        error(StatusCode::SERVICE_UNAVAILABLE, "not_ready", message)
    }
}

/// Prometheus text format 0.0.4, or OpenMetrics for a scraper that asks for it.
fn metrics(shared: &Arc<Shared>, accept: Option<&HeaderValue>) -> Reply {
    shared
        .metrics
        .set_names(shared.names.len(), shared.names.event_ids());
    let openmetrics = accept
        .and_then(|a| a.to_str().ok())
        .is_some_and(|a| a.contains("application/openmetrics-text"));
    let mut r = Response::new(Either::Left(Full::new(Bytes::from(
        shared.metrics.render(openmetrics),
    ))));
    r.headers_mut().insert(
        CONTENT_TYPE,
        HeaderValue::from_static(if openmetrics {
            "application/openmetrics-text; version=1.0.0; charset=utf-8"
        } else {
            "text/plain; version=0.0.4; charset=utf-8"
        }),
    );
    r
}
