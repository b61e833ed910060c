//! The HTTP/1.1 (and h2) side: Bazel's HTTP cache (`GET`/`HEAD`/`PUT` on `[prefix/]cas/HASH`
//! and `[prefix/]ac/HASH`), `/status` (JSON), `/metrics` (Prometheus text), and the build
//! analytics endpoints `POST /v1/builds` and `GET /v1/clients`. The entry point is
//! [`handle`]; `listener` calls it for every request that is not gRPC, after authentication.
//! Blob bodies stream to and from disk; only bodies of known small size are collected.

use std::net::SocketAddr;
use std::sync::Arc;
use std::time::Instant;

use bytes::Bytes;
use http::{Method, Request, Response, StatusCode, header};
use http_body::Frame;
use http_body_util::{BodyExt as _, Full, StreamBody};
use serde_json::json;
use tonic::body::Body;

use super::State;
use super::analytics::BuildReport;
use super::auth::{Access, Client};
use super::digest::{self, Digest, Key, Kind};
use super::grpc::{AcEntry, MAX_ACTION_RESULT_BYTES};
use super::index::now_millis;
use super::store::StoreError;
use super::webhook::Summary;

/// Bodies up to this size are read whole; bigger ones stream to disk.
const SMALL_BODY: u64 = 1 << 20;
/// The largest build report.
const MAX_REPORT_BYTES: u64 = 64 << 10;

/// The access a request needs: writes need read-write; reporting a build, like reading,
/// needs any valid token.
pub fn required_access(method: &Method) -> Access {
    if method == Method::PUT {
        Access::ReadWrite
    } else {
        Access::ReadOnly
    }
}

/// Answers one HTTP request and records it in the metrics.
pub async fn handle<B>(
    state: Arc<State>,
    request: Request<B>,
    client: Option<Client>,
    peer: SocketAddr,
) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    let started = Instant::now();
    let method = request.method().clone();
    let path = request.uri().path().to_owned();
    let (kind, response) = route(&state, request, client, peer).await;
    let status = response.status();
    tracing::debug!(%method, path, status = status.as_u16(), "http");
    state
        .metrics
        .request(kind, status.as_str(), started.elapsed());
    response
}

async fn route<B>(
    state: &Arc<State>,
    request: Request<B>,
    client: Option<Client>,
    peer: SocketAddr,
) -> (&'static str, Response<Body>)
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    let method = request.method().clone();
    match (method.as_str(), request.uri().path()) {
        ("GET", "/status") => ("http_status", status(state)),
        ("GET", "/metrics") => (
            "http_metrics",
            full(
                StatusCode::OK,
                "application/openmetrics-text; version=1.0.0; charset=utf-8",
                state.metrics.encode(&state.store),
            ),
        ),
        ("POST", "/v1/builds") => (
            "http_builds",
            report_build(state, request, client, peer).await,
        ),
        ("GET", "/v1/clients") => ("http_clients", clients(state).await),
        (_, path) => match digest::from_http_path(path) {
            Some(key) => {
                let kind = match (key.kind, method.as_str()) {
                    (Kind::Cas, "GET") => "http_cas_get",
                    (Kind::Cas, "HEAD") => "http_cas_head",
                    (Kind::Cas, "PUT") => "http_cas_put",
                    (Kind::Ac, "GET") => "http_ac_get",
                    (Kind::Ac, "HEAD") => "http_ac_head",
                    (Kind::Ac, "PUT") => "http_ac_put",
                    _ => {
                        return (
                            "http_other",
                            error(StatusCode::METHOD_NOT_ALLOWED, "use GET, HEAD or PUT"),
                        );
                    }
                };
                let response = match method.as_str() {
                    "PUT" => put(state, key, request).await,
                    _ => get(state, key, method == Method::HEAD).await,
                };
                (kind, response)
            }
            None => (
                "http_other",
                error(StatusCode::NOT_FOUND, "no such endpoint"),
            ),
        },
    }
}

pub fn full(status: StatusCode, content_type: &str, body: impl Into<Bytes>) -> Response<Body> {
    let mut response = Response::new(Body::new(Full::new(body.into())));
    *response.status_mut() = status;
    if let Ok(value) = header::HeaderValue::from_str(content_type) {
        response.headers_mut().insert(header::CONTENT_TYPE, value);
    }
    response
}

pub fn error(status: StatusCode, message: &str) -> Response<Body> {
    full(status, "text/plain; charset=utf-8", format!("{message}\n"))
}

/// The one place store errors become HTTP statuses.
fn store_error(err: &StoreError) -> Response<Body> {
    let status = match err {
        StoreError::NoSpace { .. } => StatusCode::INSUFFICIENT_STORAGE,
        StoreError::TooLarge { .. } => StatusCode::PAYLOAD_TOO_LARGE,
        StoreError::Mismatch { .. } => StatusCode::BAD_REQUEST,
        StoreError::Incomplete(_) => StatusCode::BAD_REQUEST,
        StoreError::Io { .. } | StoreError::Index(_) | StoreError::Task(_) => {
            tracing::warn!(error = %err, "store failure");
            StatusCode::INTERNAL_SERVER_ERROR
        }
    };
    error(status, &err.to_string())
}

async fn get(state: &Arc<State>, key: Key, head: bool) -> Response<Body> {
    let octets = "application/octet-stream";
    if key.kind == Kind::Ac {
        return match state.action_result(key.hash).await {
            Ok(AcEntry::Valid(bytes, _) | AcEntry::Opaque(bytes)) => {
                let len = bytes.len() as u64;
                if head {
                    return sized(full(StatusCode::OK, octets, Bytes::new()), Some(len));
                }
                state.metrics.sent(len);
                full(StatusCode::OK, octets, bytes)
            }
            Ok(AcEntry::Miss) => error(StatusCode::NOT_FOUND, "not in the action cache"),
            Err(err) => store_error(&err),
        };
    }
    if !state.store.touch(&[(key, None)], !head)[0] {
        state.metrics.lookups(Kind::Cas, 0, 1);
        return error(StatusCode::NOT_FOUND, "not in the CAS");
    }
    let size = state.store.meta(&key).map_or(0, |m| m.size);
    if head {
        return sized(full(StatusCode::OK, octets, Bytes::new()), Some(size));
    }
    if size <= SMALL_BODY {
        return match state.store.get_bytes(key).await {
            Ok(Some(bytes)) => {
                state.metrics.lookups(Kind::Cas, 1, 0);
                state.metrics.sent(bytes.len() as u64);
                full(StatusCode::OK, octets, bytes)
            }
            Ok(None) => {
                state.metrics.lookups(Kind::Cas, 0, 1);
                error(StatusCode::NOT_FOUND, "not in the CAS")
            }
            Err(err) => store_error(&err),
        };
    }
    match state.store.read_stream(key, 0, 0).await {
        Ok(Some(read)) => {
            state.metrics.lookups(Kind::Cas, 1, 0);
            let metrics = Arc::clone(&state.metrics);
            let frames = futures_util::stream::unfold(read.chunks, move |mut chunks| {
                let metrics = Arc::clone(&metrics);
                async move {
                    let chunk = chunks.recv().await?;
                    if let Ok(data) = &chunk {
                        metrics.sent(data.len() as u64);
                    }
                    Some((chunk.map(Frame::data), chunks))
                }
            });
            let mut response = Response::new(Body::new(StreamBody::new(frames)));
            response.headers_mut().insert(
                header::CONTENT_TYPE,
                header::HeaderValue::from_static("application/octet-stream"),
            );
            sized(response, Some(read.len))
        }
        Ok(None) => {
            state.metrics.lookups(Kind::Cas, 0, 1);
            error(StatusCode::NOT_FOUND, "not in the CAS")
        }
        Err(err) => store_error(&err),
    }
}

fn sized(mut response: Response<Body>, len: Option<u64>) -> Response<Body> {
    if let Some(len) = len {
        response
            .headers_mut()
            .insert(header::CONTENT_LENGTH, header::HeaderValue::from(len));
    }
    response
}

fn content_length<B>(request: &Request<B>) -> Option<u64> {
    request
        .headers()
        .get(header::CONTENT_LENGTH)?
        .to_str()
        .ok()?
        .parse()
        .ok()
}

/// The next body frame's data, waiting at most the idle timeout. `Ok(None)`: the end.
async fn next_data<B>(body: &mut B) -> Result<Option<Bytes>, Response<Body>>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    loop {
        match tokio::time::timeout(super::IDLE_TIMEOUT, body.frame()).await {
            Err(_) => return Err(error(StatusCode::REQUEST_TIMEOUT, "no data for too long")),
            Ok(None) => return Ok(None),
            Ok(Some(Err(err))) => {
                return Err(error(
                    StatusCode::BAD_REQUEST,
                    &format!("reading the body: {err}"),
                ));
            }
            Ok(Some(Ok(frame))) => {
                if let Ok(data) = frame.into_data() {
                    return Ok(Some(data));
                }
            }
        }
    }
}

/// Reads a whole body of at most `limit` bytes.
async fn collect<B>(body: &mut B, limit: u64) -> Result<Bytes, Response<Body>>
where
    B: http_body::Body<Data = Bytes> + Unpin,
    B::Error: std::fmt::Display,
{
    let mut buf = bytes::BytesMut::new();
    while let Some(data) = next_data(body).await? {
        if (buf.len() + data.len()) as u64 > limit {
            return Err(error(
                StatusCode::PAYLOAD_TOO_LARGE,
                &format!("the body exceeds {limit} bytes"),
            ));
        }
        buf.extend_from_slice(&data);
    }
    Ok(buf.freeze())
}

async fn put<B>(state: &Arc<State>, key: Key, request: Request<B>) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    let Some(len) = content_length(&request) else {
        return error(StatusCode::LENGTH_REQUIRED, "PUT needs a Content-Length");
    };
    let (expected, limit) = match key.kind {
        Kind::Cas => (
            Some(Digest {
                hash: key.hash,
                size: len,
            }),
            0,
        ),
        Kind::Ac => (None, MAX_ACTION_RESULT_BYTES),
    };
    if len > state.store.max_size() || (key.kind == Kind::Ac && len > limit) {
        return error(StatusCode::PAYLOAD_TOO_LARGE, "larger than the cache takes");
    }
    let mut body = request.into_body();
    let stored = if len <= SMALL_BODY {
        match collect(&mut body, len).await {
            Ok(bytes) => {
                state.metrics.received(bytes.len() as u64);
                state.store.put_bytes(key, expected, limit, bytes).await
            }
            Err(response) => return response,
        }
    } else {
        let mut upload = state.store.upload(key, expected, limit);
        loop {
            match next_data(&mut body).await {
                Ok(Some(data)) => {
                    state.metrics.received(data.len() as u64);
                    if let Err(err) = upload.write(data).await {
                        return store_error(&err);
                    }
                }
                Ok(None) => break upload.finish().await,
                // Dropping `upload` discards what was written.
                Err(response) => return response,
            }
        }
    };
    match stored {
        Ok(_) => full(StatusCode::OK, "text/plain", Bytes::new()),
        Err(err) => store_error(&err),
    }
}

fn status(state: &State) -> Response<Body> {
    let stats = state.store.stats();
    let totals = state.metrics.totals();
    let evictions = &state.store.evictions;
    let lookups = totals.hits + totals.misses;
    #[expect(clippy::cast_precision_loss, reason = "a ratio for display")]
    let hit_rate = if lookups == 0 {
        0.0
    } else {
        totals.hits as f64 / lookups as f64
    };
    let body = json!({
        "version": env!("CARGO_PKG_VERSION"),
        "uptime_secs": state.started.elapsed().as_secs(),
        "listen": state.config.listen.to_string(),
        "tls": state.config.tls.is_some(),
        "auth": state.tokens.enabled(),
        "webhooks": state.config.webhooks.len(),
        "store": {
            "dir": state.store.dir(),
            "bytes": stats.bytes,
            "max_size": state.store.max_size(),
            "cas_entries": stats.cas_entries,
            "ac_entries": stats.ac_entries,
            "evictions": evictions.entries.load(std::sync::atomic::Ordering::Relaxed),
            "evicted_bytes": evictions.bytes.load(std::sync::atomic::Ordering::Relaxed),
        },
        "requests": totals.requests,
        "hits": totals.hits,
        "misses": totals.misses,
        "hit_rate": hit_rate,
        "received_bytes": totals.received_bytes,
        "sent_bytes": totals.sent_bytes,
    });
    full(StatusCode::OK, "application/json", body.to_string())
}

async fn report_build<B>(
    state: &Arc<State>,
    request: Request<B>,
    client: Option<Client>,
    peer: SocketAddr,
) -> Response<Body>
where
    B: http_body::Body<Data = Bytes> + Send + Unpin + 'static,
    B::Error: std::fmt::Display,
{
    if content_length(&request).is_some_and(|len| len > MAX_REPORT_BYTES) {
        return error(
            StatusCode::PAYLOAD_TOO_LARGE,
            "a build report is at most 64 KiB",
        );
    }
    let body = match collect(&mut request.into_body(), MAX_REPORT_BYTES).await {
        Ok(body) => body,
        Err(response) => return response,
    };
    let report = match BuildReport::parse(&body) {
        Ok(report) => report,
        Err(err) => return error(StatusCode::BAD_REQUEST, &err.to_string()),
    };
    let name = match client {
        Some(client) => client.name,
        None => report
            .client
            .clone()
            .unwrap_or_else(|| peer.ip().to_string()),
    };
    let received = now_millis();
    let analytics = Arc::clone(&state.analytics);
    let (name, report, recorded) = match tokio::task::spawn_blocking(move || {
        let recorded = analytics.record(&name, received, &report);
        (name, report, recorded)
    })
    .await
    {
        Ok(done) => done,
        Err(err) => return error(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string()),
    };
    let id = match recorded {
        Ok(id) => id,
        Err(err) => {
            tracing::warn!(error = %err, "cannot record a build report");
            return error(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string());
        }
    };
    state.metrics.build_reported();
    state.webhooks.send(Summary {
        event: "build.completed",
        id,
        client: name.clone(),
        received_unix_ms: received,
        build: report,
    });
    full(
        StatusCode::CREATED,
        "application/json",
        json!({ "id": id, "client": name }).to_string(),
    )
}

async fn clients(state: &Arc<State>) -> Response<Body> {
    let analytics = Arc::clone(&state.analytics);
    match tokio::task::spawn_blocking(move || analytics.clients()).await {
        Ok(Ok(clients)) => full(
            StatusCode::OK,
            "application/json",
            json!({ "clients": clients }).to_string(),
        ),
        Ok(Err(err)) => error(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string()),
        Err(err) => error(StatusCode::INTERNAL_SERVER_ERROR, &err.to_string()),
    }
}
