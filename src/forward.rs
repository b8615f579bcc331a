//! Forwarding of reads to the process that owns the user (or item), in a cluster.
//!
//! Any process answers for any user (SPEC §5): a read for a user whose worker lives in another
//! process is sent on, unchanged, to that process's HTTP address, and its answer is relayed
//! as it is (its `x-persona-process` / `x-persona-worker` headers name the owner). A forwarded
//! request carries `x-persona-forwarded`, and is never forwarded again.

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::{Method, Request, Response};
use hyper_util::rt::TokioIo;
use std::time::Duration;

/// Marks a request one process sent to another.
pub const FORWARDED: &str = "x-persona-forwarded";

/// Sends a bodiless `method` request to the process at `address`, with the cluster's own
/// bearer `token` (the caller has checked the client's).
pub async fn send(
    method: Method,
    address: &str,
    path_and_query: &str,
    from: usize,
    token: Option<&str>,
    timeout: Duration,
) -> Result<Response<Full<Bytes>>, String> {
    let sent = send_inner(method, address, path_and_query, from, token);
    match tokio::time::timeout(timeout, sent).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer from {address} within {} ms",
            timeout.as_millis()
        )),
    }
}

async fn send_inner(
    method: Method,
    address: &str,
    path_and_query: &str,
    from: usize,
    token: Option<&str>,
) -> Result<Response<Full<Bytes>>, String> {
    let stream = tokio::net::TcpStream::connect(address)
        .await
        .map_err(|e| format!("cannot connect to {address}: {e}"))?;
    let _ = stream.set_nodelay(true);
    let (mut sender, connection) = hyper::client::conn::http1::handshake(TokioIo::new(stream))
        .await
        .map_err(|e| format!("HTTP handshake with {address} failed: {e}"))?;
    tokio::spawn(async move {
        let _ = connection.await;
    });
    let mut request = Request::builder()
        .method(method)
        .uri(path_and_query)
        .header(hyper::header::HOST, address)
        .header(FORWARDED, from);
    if let Some(t) = token {
        request = request.header(hyper::header::AUTHORIZATION, format!("Bearer {t}"));
    }
    let request = request
        .body(Empty::<Bytes>::new())
        .map_err(|e| format!("cannot build the forwarded request: {e}"))?;
    let response = sender
        .send_request(request)
        .await
        .map_err(|e| format!("request to {address} failed: {e}"))?;
    let (parts, body) = response.into_parts();
    let body = body
        .collect()
        .await
        .map_err(|e| format!("reading the answer of {address} failed: {e}"))?
        .to_bytes();
    Ok(Response::from_parts(parts, Full::new(body)))
}
