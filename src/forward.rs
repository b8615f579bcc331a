//! Forwarding of reads to the process that owns the user (or item), in a cluster.
//!
//! Any process answers for any user (SPEC §5): a read for a user whose worker lives in another
//! process is sent on, unchanged, to that process's HTTP address, and its answer is relayed
//! as it is (its `x-persona-process` / `x-persona-worker` headers name the owner). A forwarded
//! request carries `x-persona-forwarded`, and is never forwarded again.

use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Bytes;
use hyper::{Request, Response};
use hyper_util::rt::TokioIo;
use std::time::Duration;

/// Marks a request one process sent to another.
pub const FORWARDED: &str = "x-persona-forwarded";

/// GETs `path_and_query` from the process at `address` (from process `from`), within `timeout`.
pub async fn get(
    address: &str,
    path_and_query: &str,
    from: usize,
    timeout: Duration,
) -> Result<Response<Full<Bytes>>, String> {
    match tokio::time::timeout(timeout, get_inner(address, path_and_query, from)).await {
        Ok(r) => r,
        Err(_) => Err(format!(
            "no answer from {address} within {} ms",
            timeout.as_millis()
        )),
    }
}

async fn get_inner(
    address: &str,
    path_and_query: &str,
    from: usize,
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
    let request = Request::get(path_and_query)
        .header(hyper::header::HOST, address)
        .header(FORWARDED, from)
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
