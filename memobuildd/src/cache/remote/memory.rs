//! An in-memory [`RemoteCache`] for the unit tests of the remote tier's policy (breaker,
//! timeouts, signatures, corruption, upload bounds), with switches to make it fail or hang.
//! The real transports are tested against BuildGrid and nginx in `tests/`.

use std::collections::HashMap;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Mutex, PoisonError};

use async_trait::async_trait;
use bytes::Bytes;

use super::{Capabilities, Chunks, RemoteCache, RemoteError, Sink, reapi};
use crate::store::{Blob, Digest};

#[derive(Debug, Default)]
pub(super) struct MemoryCache {
    pub actions: Mutex<HashMap<Digest, reapi::ActionResult>>,
    pub blobs: Mutex<HashMap<Digest, Vec<u8>>>,
    /// Answer every request with UNAVAILABLE.
    pub down: AtomicBool,
    /// Never answer.
    pub hang: AtomicBool,
    pub requests: AtomicU64,
    pub uploads: AtomicU64,
}

impl MemoryCache {
    async fn answer(&self) -> Result<(), RemoteError> {
        self.requests.fetch_add(1, Ordering::Relaxed);
        if self.hang.load(Ordering::Relaxed) {
            std::future::pending::<()>().await;
        }
        if self.down.load(Ordering::Relaxed) {
            return Err(RemoteError::grpc(
                "memory",
                tonic::Status::unavailable("switched off"),
            ));
        }
        Ok(())
    }

    pub(super) fn blobs(&self) -> std::sync::MutexGuard<'_, HashMap<Digest, Vec<u8>>> {
        self.blobs.lock().unwrap_or_else(PoisonError::into_inner)
    }

    pub(super) fn actions(
        &self,
    ) -> std::sync::MutexGuard<'_, HashMap<Digest, reapi::ActionResult>> {
        self.actions.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

#[async_trait]
impl RemoteCache for MemoryCache {
    fn endpoint(&self) -> String {
        "memory://".to_owned()
    }

    async fn capabilities(&self) -> Result<Capabilities, RemoteError> {
        self.answer().await?;
        Ok(Capabilities {
            max_batch_bytes: 1 << 10,
            action_updates: true,
        })
    }

    async fn get_action(&self, action: &Blob) -> Result<Option<reapi::ActionResult>, RemoteError> {
        self.answer().await?;
        Ok(self.actions().get(&action.digest).cloned())
    }

    async fn update_action(
        &self,
        action: &Blob,
        entry: &reapi::ActionResult,
    ) -> Result<(), RemoteError> {
        self.answer().await?;
        self.actions().insert(action.digest.clone(), entry.clone());
        Ok(())
    }

    async fn find_missing(&self, blobs: &[Blob]) -> Result<Vec<Blob>, RemoteError> {
        self.answer().await?;
        let held = self.blobs();
        Ok(blobs
            .iter()
            .filter(|b| !held.contains_key(&b.digest))
            .cloned()
            .collect())
    }

    async fn upload(&self, blob: &Blob, data: Chunks) -> Result<(), RemoteError> {
        self.answer().await?;
        let bytes = data.collect(blob.size).await.map_err(RemoteError::Local)?;
        self.uploads.fetch_add(1, Ordering::Relaxed);
        self.blobs().insert(blob.digest.clone(), bytes);
        Ok(())
    }

    async fn download(&self, blob: &Blob, sink: &mut Sink) -> Result<bool, RemoteError> {
        self.answer().await?;
        let Some(bytes) = self.blobs().get(&blob.digest).cloned() else {
            return Ok(false);
        };
        for chunk in bytes.chunks(7) {
            sink.push(Bytes::copy_from_slice(chunk)).await?;
        }
        Ok(true)
    }
}
