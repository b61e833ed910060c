//! `memobuildd serve-cache`: the team's remote cache server. One listener speaks REAPI v2
//! gRPC (`grpc`) and Bazel's HTTP cache plus `/status`, `/metrics` and build analytics
//! (`http`), told apart by `content-type: application/grpc` (`listener`); TLS through rustls.
//! Entries live in sharded files with a SQLite index (`store`, `index`), kept under a byte
//! budget by LRU eviction; tokens say who may read and write (`auth`); `metrics`,
//! `analytics` and `webhook` are the operations side.
//!
//! The main type is [`State`], everything a request needs; [`run`] builds it from a
//! [`ServeCacheConfig`] and serves until SIGTERM/SIGINT. This is a stage of its own, beside
//! the daemon's data flow: its clients are the daemons' L3 tier (`cache`), Bazel and any
//! other REAPI or Bazel-HTTP client.

pub mod analytics;
pub mod auth;
pub mod digest;
pub mod grpc;
pub mod http;
pub mod index;
pub mod listener;
pub mod metrics;
pub mod store;
pub mod webhook;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::config::ServeCacheConfig;

use analytics::{Analytics, AnalyticsError};
use auth::{AuthError, Tokens};
use metrics::Metrics;
use store::{Store, StoreError};
use webhook::Webhooks;

/// How long a request body or a ByteStream write may send nothing before it is dropped.
pub const IDLE_TIMEOUT: Duration = Duration::from_secs(60);

#[derive(Debug, thiserror::Error)]
pub enum CacheServerError {
    #[error("cannot listen on {addr}: {source}")]
    Bind {
        addr: std::net::SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("another serve-cache already uses {}", dir.display())]
    DirInUse { dir: PathBuf },
    #[error("TLS: {}: {message}", path.display())]
    Tls {
        path: PathBuf,
        message: &'static str,
    },
    #[error("TLS certificate and key do not fit together: {0}")]
    TlsConfig(#[from] rustls::Error),
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error(transparent)]
    Auth(#[from] AuthError),
    #[error(transparent)]
    Analytics(#[from] AnalyticsError),
    #[error("installing signal handlers: {0}")]
    Signals(#[source] std::io::Error),
    #[error("a startup task failed: {0}")]
    Task(#[from] tokio::task::JoinError),
}

/// Everything a request needs.
#[derive(Debug)]
pub struct State {
    pub config: ServeCacheConfig,
    pub store: Arc<Store>,
    pub tokens: Tokens,
    pub metrics: Arc<Metrics>,
    pub analytics: Arc<Analytics>,
    pub webhooks: Webhooks,
    pub started: Instant,
}

/// Serves the cache described by `config` until SIGTERM or SIGINT, then lets in-flight
/// requests finish (bounded) and returns.
pub async fn run(config: ServeCacheConfig) -> Result<(), CacheServerError> {
    let _ = rustls::crypto::ring::default_provider().install_default();
    let io = |path: &std::path::Path| {
        let path = path.to_owned();
        move |source| CacheServerError::Io { path, source }
    };
    let tokens = match &config.auth_file {
        Some(path) => Tokens::load(path)?,
        None => Tokens::open_to_all(),
    };
    let tls = config
        .tls
        .as_ref()
        .map(listener::tls_acceptor)
        .transpose()?;
    let webhook_secret = match &config.webhook_secret_file {
        Some(path) => Some(
            std::fs::read_to_string(path)
                .map_err(io(path))?
                .trim()
                .as_bytes()
                .to_vec(),
        ),
        None => None,
    };
    std::fs::create_dir_all(&config.dir).map_err(io(&config.dir))?;
    let lock_path = config.dir.join("serve-cache.lock");
    let lock = std::fs::File::create(&lock_path).map_err(io(&lock_path))?;
    if lock.try_lock().is_err() {
        return Err(CacheServerError::DirInUse {
            dir: config.dir.clone(),
        });
    }

    let (dir, max_size) = (config.dir.clone(), config.max_size);
    let store = tokio::task::spawn_blocking(move || Store::open(&dir, max_size)).await??;
    let analytics_path = config.dir.join("analytics.sqlite");
    let analytics =
        Arc::new(tokio::task::spawn_blocking(move || Analytics::open(&analytics_path)).await??);
    let metrics = Arc::new(Metrics::new());
    let webhooks = Webhooks::start(
        config.webhooks.clone(),
        webhook_secret,
        Arc::clone(&metrics),
    );
    let socket = tokio::net::TcpListener::bind(config.listen)
        .await
        .map_err(|source| CacheServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let addr = socket
        .local_addr()
        .map_err(|source| CacheServerError::Bind {
            addr: config.listen,
            source,
        })?;
    let state = Arc::new(State {
        config,
        store,
        tokens,
        metrics,
        analytics,
        webhooks,
        started: Instant::now(),
    });
    let stats = state.store.stats();
    tracing::info!(
        %addr,
        dir = %state.config.dir.display(),
        bytes = stats.bytes,
        max_size = state.config.max_size,
        auth = state.tokens.enabled(),
        tls = tls.is_some(),
        "serve-cache listening"
    );
    let _ = sd_notify::notify(&[
        sd_notify::NotifyState::Ready,
        sd_notify::NotifyState::Status(&format!("serving the cache on {addr}")),
    ]);

    let shutdown = shutdown_signal()?;
    listener::serve(socket, tls, Arc::clone(&state), shutdown).await;
    let _ = sd_notify::notify(&[sd_notify::NotifyState::Stopping]);
    let store = Arc::clone(&state.store);
    tokio::task::spawn_blocking(move || store.flush()).await?;
    drop(lock);
    tracing::info!("serve-cache stopped");
    Ok(())
}

/// Resolves at the first SIGTERM or SIGINT.
fn shutdown_signal() -> Result<impl Future<Output = ()> + Send + 'static, CacheServerError> {
    use tokio::signal::unix::{SignalKind, signal};
    let mut term = signal(SignalKind::terminate()).map_err(CacheServerError::Signals)?;
    let mut int = signal(SignalKind::interrupt()).map_err(CacheServerError::Signals)?;
    Ok(async move {
        tokio::select! {
            _ = term.recv() => {}
            _ = int.recv() => {}
        }
        tracing::info!("stopping: finishing in-flight requests");
    })
}
