//! The one listener: accepts TCP (optionally TLS) connections, serves each with hyper
//! (HTTP/1.1 and h2 detected per connection), authenticates every request, and routes it by
//! its content type — `application/grpc…` to the tonic services (`grpc::routes`), anything
//! else to `http::handle`. Limits live here: connections at once, header size and read time,
//! h2 streams; a connection that speaks garbage is closed by hyper and costs only itself.

use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::Arc;
use std::time::{Duration, Instant};

use http::{Request, Response, StatusCode, header};
use hyper::body::Incoming;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;
use tokio_rustls::TlsAcceptor;
use tonic::body::Body;
use tower::ServiceExt as _;

use super::auth::{Access, Denied};
use super::{CacheServerError, State, grpc, http as cache_http};
use crate::config::TlsFiles;

/// Connections served at once; more wait in the kernel's accept queue.
const MAX_CONNECTIONS: usize = 4096;
/// A client must send its request headers (or finish a TLS handshake) within this.
const HEADER_TIMEOUT: Duration = Duration::from_secs(15);
/// How long in-flight requests may finish after a shutdown signal.
const SHUTDOWN_GRACE: Duration = Duration::from_secs(10);

/// A rustls acceptor for a PEM certificate chain and key, offering h2 and HTTP/1.1.
pub fn tls_acceptor(files: &TlsFiles) -> Result<TlsAcceptor, CacheServerError> {
    use rustls::pki_types::pem::PemObject as _;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs = CertificateDer::pem_file_iter(&files.cert)
        .and_then(Iterator::collect::<Result<Vec<_>, _>>)
        .map_err(|_| CacheServerError::Tls {
            path: files.cert.clone(),
            message: "not a readable PEM certificate chain",
        })?;
    if certs.is_empty() {
        return Err(CacheServerError::Tls {
            path: files.cert.clone(),
            message: "holds no certificate",
        });
    }
    let key = PrivateKeyDer::from_pem_file(&files.key).map_err(|_| CacheServerError::Tls {
        path: files.key.clone(),
        message: "not a readable PEM private key",
    })?;
    let mut config = rustls::ServerConfig::builder_with_provider(Arc::new(
        rustls::crypto::ring::default_provider(),
    ))
    .with_safe_default_protocol_versions()?
    .with_no_client_auth()
    .with_single_cert(certs, key)?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(TlsAcceptor::from(Arc::new(config)))
}

/// Accepts and serves connections until `shutdown` resolves, then waits (bounded) for the
/// connections still open.
pub async fn serve(
    socket: TcpListener,
    tls: Option<TlsAcceptor>,
    state: Arc<State>,
    shutdown: impl Future<Output = ()> + Send + 'static,
) {
    let routes = grpc::routes(&state);
    let graceful = hyper_util::server::graceful::GracefulShutdown::new();
    let slots = Arc::new(Semaphore::new(MAX_CONNECTIONS));
    tokio::pin!(shutdown);
    loop {
        let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
            break;
        };
        let (stream, peer) = tokio::select! {
            () = &mut shutdown => break,
            accepted = socket.accept() => match accepted {
                Ok(accepted) => accepted,
                Err(err) => {
                    // Out of file descriptors and the like: pause instead of spinning.
                    tracing::warn!(error = %err, "accept failed");
                    tokio::time::sleep(Duration::from_millis(100)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let state = Arc::clone(&state);
        let routes = routes.clone();
        let watcher = graceful.watcher();
        let tls = tls.clone();
        tokio::spawn(async move {
            match tls {
                None => serve_connection(stream, peer, state, routes, watcher).await,
                Some(acceptor) => {
                    match tokio::time::timeout(HEADER_TIMEOUT, acceptor.accept(stream)).await {
                        Ok(Ok(stream)) => {
                            serve_connection(stream, peer, state, routes, watcher).await;
                        }
                        Ok(Err(err)) => {
                            tracing::debug!(%peer, error = %err, "TLS handshake failed")
                        }
                        Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
                    }
                }
            }
            drop(slot);
        });
    }
    drop(socket);
    tracing::debug!(
        connections = graceful.count(),
        "waiting for open connections"
    );
    if tokio::time::timeout(SHUTDOWN_GRACE, graceful.shutdown())
        .await
        .is_err()
    {
        tracing::warn!("connections still open after {SHUTDOWN_GRACE:?}: closing them");
    }
}

async fn serve_connection<IO>(
    io: IO,
    peer: SocketAddr,
    state: Arc<State>,
    routes: tonic::service::Routes,
    watcher: hyper_util::server::graceful::Watcher,
) where
    IO: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(HEADER_TIMEOUT)
        .max_buf_size(64 << 10);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_concurrent_streams(512)
        .max_header_list_size(16 << 10)
        .initial_stream_window_size(1 << 20)
        .initial_connection_window_size(4 << 20)
        .keep_alive_interval(Some(Duration::from_secs(30)))
        .keep_alive_timeout(Duration::from_secs(20));
    let service = hyper::service::service_fn(move |request: Request<Incoming>| {
        let state = Arc::clone(&state);
        let routes = routes.clone();
        async move { Ok::<_, Infallible>(dispatch(state, routes, request, peer).await) }
    });
    let connection = builder.serve_connection(TokioIo::new(io), service);
    if let Err(err) = watcher.watch(connection).await {
        // Malformed requests, resets, clients gone: that connection ends, nothing else.
        tracing::debug!(%peer, error = %err, "connection ended with an error");
    }
}

fn is_grpc(request: &Request<Incoming>) -> bool {
    request
        .headers()
        .get(header::CONTENT_TYPE)
        .is_some_and(|v| v.as_bytes().starts_with(b"application/grpc"))
}

async fn dispatch(
    state: Arc<State>,
    routes: tonic::service::Routes,
    request: Request<Incoming>,
    peer: SocketAddr,
) -> Response<Body> {
    let started = Instant::now();
    let grpc = is_grpc(&request);
    let need = if grpc {
        if grpc::is_write(request.uri().path()) {
            Access::ReadWrite
        } else {
            Access::ReadOnly
        }
    } else {
        cache_http::required_access(request.method())
    };
    let authorization = request
        .headers()
        .get(header::AUTHORIZATION)
        .map(http::HeaderValue::as_bytes);
    let client = match state.tokens.check(authorization, need) {
        Ok(client) => client.cloned(),
        Err(denied) => {
            tracing::debug!(%peer, path = request.uri().path(), ?denied, "refused");
            let response = refusal(grpc, denied);
            let http_status = response.status();
            let status = if grpc {
                match denied {
                    Denied::Unauthenticated => "UNAUTHENTICATED",
                    Denied::ReadOnly => "PERMISSION_DENIED",
                }
            } else {
                http_status.as_str()
            };
            state.metrics.request("denied", status, started.elapsed());
            return response;
        }
    };
    if grpc {
        let span = tracing::debug_span!("grpc", %peer, path = request.uri().path());
        let _entered = span.enter();
        match routes.oneshot(request).await {
            Ok(response) => response,
            Err(never) => match never {},
        }
    } else {
        cache_http::handle(state, request, client, peer).await
    }
}

fn refusal(grpc: bool, denied: Denied) -> Response<Body> {
    match (grpc, denied) {
        (true, Denied::Unauthenticated) => {
            tonic::Status::unauthenticated("a valid token is required").into_http()
        }
        (true, Denied::ReadOnly) => {
            tonic::Status::permission_denied("this token may only read").into_http()
        }
        (false, Denied::Unauthenticated) => {
            let mut response =
                cache_http::error(StatusCode::UNAUTHORIZED, "a valid token is required");
            response.headers_mut().insert(
                header::WWW_AUTHENTICATE,
                http::HeaderValue::from_static("Basic realm=\"memobuild-cache\""),
            );
            response
        }
        (false, Denied::ReadOnly) => {
            cache_http::error(StatusCode::FORBIDDEN, "this token may only read")
        }
    }
}
