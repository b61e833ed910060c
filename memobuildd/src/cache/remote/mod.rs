//! L3: the shared remote cache, as a client of what existing caches serve — REAPI v2 over gRPC
//! ([`grpc`]) and Bazel's HTTP cache ([`http`]) — behind one trait, [`RemoteCache`].
//!
//! The main type is [`L3`], the tier: it looks a node key up remotely and trusts a hit only
//! when its entry verifies (signature, result blob digest) and its layer blobs are still there;
//! it queues uploads in the background ([`uploads`]), bounded and deduplicated; and it turns
//! every remote failure into a miss behind a circuit breaker ([`breaker`]), so a dead or slow
//! remote makes builds local, never failed. [`mapping`] is the pure translation between a
//! step's result and REAPI's entries; [`signing`] the HMAC; [`settings`] the URL and
//! credentials; [`chunks`] the streaming plumbing; [`promote`] the tier the engine composes
//! after L1 and L2 (`cache::tier`), which brings a hit's layers into the store.

pub mod breaker;
pub mod chunks;
pub mod grpc;
pub mod http;
mod l3;
pub mod mapping;
#[cfg(test)]
mod memory;
pub mod promote;
pub mod settings;
pub mod signing;
pub mod uploads;

use std::time::Duration;

use async_trait::async_trait;
pub use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;

pub use chunks::{Chunks, Opener, Sink};
pub use l3::{L3, LayerSource, RemoteEvent, RemoteOptions, RemoteStatus};
pub use mapping::{RemoteLayer, RemoteResult};
pub use promote::{RemoteTier, StoreLayers};
pub use settings::{Auth, Endpoint, Protocol, RemoteMode, RemoteSettings, Secret};

use crate::store::{Blob, Digest};

/// What a server says it can do.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Capabilities {
    /// The largest total of blob bytes one batch request may carry; bigger blobs stream.
    /// 0 where the protocol has no batches (HTTP).
    pub max_batch_bytes: u64,
    /// Whether clients may write action entries.
    pub action_updates: bool,
}

/// One remote cache protocol. Methods do one request each (or one stream); timeouts, the
/// breaker and verification belong to the caller ([`L3`]).
#[async_trait]
pub trait RemoteCache: Send + Sync + std::fmt::Debug {
    /// The endpoint without credentials, for logs and status.
    fn endpoint(&self) -> String;

    /// What the server supports; also the health probe. Fails when the server cannot hold
    /// SHA-256 blobs.
    async fn capabilities(&self) -> Result<Capabilities, RemoteError>;

    /// The entry stored under an action digest, `None` when there is none.
    async fn get_action(&self, action: &Blob) -> Result<Option<reapi::ActionResult>, RemoteError>;

    async fn update_action(
        &self,
        action: &Blob,
        entry: &reapi::ActionResult,
    ) -> Result<(), RemoteError>;

    /// Which of `blobs` the server does not have.
    async fn find_missing(&self, blobs: &[Blob]) -> Result<Vec<Blob>, RemoteError>;

    /// Stores `blob` from `data`, streamed.
    async fn upload(&self, blob: &Blob, data: Chunks) -> Result<(), RemoteError>;

    /// Streams `blob` into `sink`; `false` when the server does not have it.
    async fn download(&self, blob: &Blob, sink: &mut Sink) -> Result<bool, RemoteError>;
}

#[derive(Debug, thiserror::Error)]
pub enum RemoteError {
    #[error("{call}: {status}")]
    Grpc {
        call: &'static str,
        #[source]
        status: Box<tonic::Status>,
    },
    #[error("{method} {url}: HTTP {status}")]
    HttpStatus {
        method: &'static str,
        url: String,
        status: reqwest::StatusCode,
    },
    #[error("{method} {url}: {source}")]
    Http {
        method: &'static str,
        url: String,
        #[source]
        source: reqwest::Error,
    },
    #[error("{call}: no answer within {after:?}")]
    Timeout { call: &'static str, after: Duration },
    #[error("the server does not store SHA-256 blobs")]
    NoSha256,
    #[error("blob {digest}: {status}")]
    BlobStatus {
        digest: Digest,
        status: Box<tonic::Status>,
    },
    #[error("the server broke the protocol: {0}")]
    Protocol(&'static str),
    #[error("the server's entry does not parse: {0}")]
    Decode(#[from] prost::DecodeError),
    #[error("blob {expected} arrived as {actual} ({size} bytes)")]
    Corrupt {
        expected: Digest,
        actual: Digest,
        size: u64,
    },
    #[error("remote cache client: {0}")]
    Setup(#[source] Box<dyn std::error::Error + Send + Sync>),
    #[error("CA file {}: {source}", path.display())]
    CaFile {
        path: std::path::PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("local: {0}")]
    Local(#[source] std::io::Error),
}

impl RemoteError {
    /// Whether this says the remote is unreachable, failing or refusing us — what the
    /// circuit breaker counts. A corrupt blob or a local read error is not an outage.
    pub fn is_outage(&self) -> bool {
        !matches!(
            self,
            Self::Corrupt { .. } | Self::Local(_) | Self::Decode(_) | Self::BlobStatus { .. }
        )
    }

    fn grpc(call: &'static str, status: tonic::Status) -> Self {
        Self::Grpc {
            call,
            status: Box::new(status),
        }
    }
}
