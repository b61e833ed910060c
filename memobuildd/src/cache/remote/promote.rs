//! L3 as a tier of local results, for the engine's composition L1 → L2 → L3: [`RemoteTier`]
//! turns a verified remote hit into an [`ActionResult`] this machine can use — each layer blob
//! it lacks downloaded into the store's CAS through the build's lease, checked against its
//! diff-id as it streams and linked only when it matched — so the composition's promotion
//! records it in L2 and L1, and a later RUN unpacks its layers as it would local ones.
//! [`StoreLayers`] is where uploads read the layers from: the store's blobs.

use std::io::Read;

use async_trait::async_trait;

use super::{L3, LayerSource, RemoteLayer, RemoteMode, RemoteResult};
use crate::cache::tier::{Tier, TierError};
use crate::context::Hash;
use crate::store::{ActionResult, LayerRecord, Lease, Store, blocking};

/// The remote tier for one build: its lease holds what it downloads, its mode says whether
/// what it executes is uploaded.
#[derive(Debug, Clone)]
pub struct RemoteTier {
    l3: L3,
    lease: Lease,
    mode: RemoteMode,
}

impl RemoteTier {
    pub fn new(l3: L3, lease: Lease, mode: RemoteMode) -> Self {
        Self { l3, lease, mode }
    }

    pub fn l3(&self) -> &L3 {
        &self.l3
    }

    /// Makes `layer`'s blob present in the store: already there with its size, or fetched.
    async fn present(&self, layer: &RemoteLayer) -> bool {
        let cas = self.lease.cas();
        let blob = layer.blob();
        let (writer, there) = {
            let cas = cas.clone();
            blocking(move || {
                if cas.size(&blob.digest) == Some(blob.size) {
                    (None, true)
                } else {
                    (cas.writer().ok(), false)
                }
            })
            .await
        };
        if there {
            return true;
        }
        let Some(writer) = writer else {
            return false;
        };
        let Some(writer) = self.l3.fetch_layer(layer, writer).await else {
            return false;
        };
        let diff_id = layer.diff_id.clone();
        match blocking(move || writer.commit(Some(&diff_id))).await {
            Ok(_) => true,
            Err(err) => {
                tracing::warn!(layer = %layer.diff_id, error = %err, "storing a remote layer failed");
                false
            }
        }
    }
}

#[async_trait]
impl Tier<ActionResult> for RemoteTier {
    fn name(&self) -> &'static str {
        "L3"
    }

    async fn get(&self, key: &Hash) -> Result<Option<ActionResult>, TierError> {
        let Some(found) = self.l3.lookup(key).await else {
            return Ok(None);
        };
        for layer in &found.layers {
            if !self.present(layer).await {
                return Ok(None);
            }
        }
        Ok(Some(to_local(&found)))
    }

    /// Queues the upload and returns at once; only in read-write mode, and only results
    /// whose layers are MemoBuild's own plain tars (what the remote carries).
    async fn put(&self, key: &Hash, value: &ActionResult) -> Result<(), TierError> {
        if self.mode == RemoteMode::ReadWrite
            && let Some(result) = to_remote(value)
        {
            self.l3.store(key, &result);
        }
        Ok(())
    }
}

/// A remote result as the store records it: each layer's blob is its plain tar.
pub fn to_local(result: &RemoteResult) -> ActionResult {
    ActionResult {
        layers: result
            .layers
            .iter()
            .map(|layer| LayerRecord {
                blob: layer.blob(),
                diff_id: layer.diff_id.clone(),
                media_type: layer.media_type.clone(),
                content_id: layer.content_id,
            })
            .collect(),
    }
}

/// A local result as the remote stores it; `None` when a layer's blob is not its plain tar.
pub fn to_remote(result: &ActionResult) -> Option<RemoteResult> {
    let layers = result
        .layers
        .iter()
        .map(|layer| {
            (layer.blob.digest == layer.diff_id).then(|| RemoteLayer {
                diff_id: layer.diff_id.clone(),
                size: layer.blob.size,
                media_type: layer.media_type.clone(),
                content_id: layer.content_id,
            })
        })
        .collect::<Option<Vec<_>>>()?;
    Some(RemoteResult { layers })
}

/// Uploads read layer tars from the store, checked against their digest as they are read.
#[derive(Debug, Clone)]
pub struct StoreLayers(pub Store);

impl LayerSource for StoreLayers {
    fn open(&self, layer: &RemoteLayer) -> std::io::Result<Box<dyn Read + Send>> {
        let reader = self
            .0
            .cas()
            .open(&layer.blob())
            .map_err(std::io::Error::other)?;
        Ok(Box::new(reader))
    }
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;
    use std::time::Duration;

    use super::super::memory::MemoryCache;
    use super::super::{RemoteCache, RemoteOptions};
    use super::*;
    use crate::cache::tier::{L2, Tiered};
    use crate::layout::Layout;
    use crate::store::{Digest, StoreOptions};

    fn store() -> (tempfile::TempDir, Store) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&Layout::new(dir.path()), StoreOptions::default()).expect("store");
        (dir, store)
    }

    fn l3(server: &Arc<MemoryCache>, store: &Store, mode: RemoteMode) -> L3 {
        L3::new(
            Arc::clone(server) as Arc<dyn RemoteCache>,
            mode,
            None,
            RemoteOptions::default(),
            Arc::new(StoreLayers(store.clone())),
        )
    }

    /// A step result of two plain-tar layers stored in `store`.
    fn result(store: &Store, salt: &str) -> ActionResult {
        let cas = store.cas();
        ActionResult {
            layers: (0..2)
                .map(|i| {
                    let blob = cas
                        .put(format!("tar {salt} {i} ").repeat(500).as_bytes())
                        .expect("put");
                    LayerRecord {
                        diff_id: blob.digest.clone(),
                        blob,
                        media_type: "application/vnd.oci.image.layer.v1.tar".into(),
                        content_id: [i; 32],
                    }
                })
                .collect(),
        }
    }

    #[tokio::test]
    async fn a_remote_hit_lands_in_l2_with_its_blobs_on_another_machine() {
        let server = Arc::new(MemoryCache::default());
        let (_a_dir, a) = store();
        let uploader = l3(&server, &a, RemoteMode::ReadWrite);
        let value = result(&a, "x");
        RemoteTier::new(uploader.clone(), a.lease(), RemoteMode::ReadWrite)
            .put(&[1; 32], &value)
            .await
            .expect("put");
        assert!(uploader.uploaded(Duration::from_secs(10)).await);

        let (_b_dir, b) = store();
        let lease = b.lease();
        let tiered = Tiered::new(vec![
            Arc::new(L2::new(lease.clone())) as Arc<dyn Tier<ActionResult>>,
            Arc::new(RemoteTier::new(
                l3(&server, &b, RemoteMode::ReadOnly),
                lease.clone(),
                RemoteMode::ReadOnly,
            )),
        ]);
        let found = tiered.find(&[1; 32]).await.expect("find").expect("hit");
        assert_eq!((found.tier, &found.value), ("L3", &value));
        for layer in &value.layers {
            let bytes = b.cas().read(&layer.blob.digest).expect("downloaded");
            assert_eq!(Digest::of(&bytes), layer.diff_id);
        }
        assert_eq!(
            lease.action(&[1; 32]).expect("index"),
            Some(value.clone()),
            "promoted into L2"
        );
        let again = tiered.find(&[1; 32]).await.expect("find").expect("hit");
        assert_eq!(again.tier, "L2");
    }

    #[tokio::test]
    async fn read_only_builds_upload_nothing_and_foreign_layers_are_not_uploaded() {
        let server = Arc::new(MemoryCache::default());
        let (_dir, store) = store();
        let l3 = l3(&server, &store, RemoteMode::ReadWrite);
        let value = result(&store, "y");
        RemoteTier::new(l3.clone(), store.lease(), RemoteMode::ReadOnly)
            .put(&[1; 32], &value)
            .await
            .expect("put");
        let mut pulled = value.clone();
        pulled.layers[0].blob.digest = Digest::of(b"a gzip blob");
        assert_eq!(to_remote(&pulled), None);
        RemoteTier::new(l3.clone(), store.lease(), RemoteMode::ReadWrite)
            .put(&[2; 32], &pulled)
            .await
            .expect("put");
        assert!(l3.uploaded(Duration::from_secs(10)).await);
        assert!(server.actions().is_empty());
        assert_eq!(l3.status().uploads_done, 0);
    }
}
