//! The tier abstraction (STYLE §10): every cache level implements [`Tier`] — look a node key
//! up, store a result — and [`Tiered`] composes them: look up in order, promote a hit into the
//! tiers above the one that had it, write through to all. L1 (`l1`, memory), L2 ([`L2`]: the
//! store's action cache, through a build's lease) and L3 (`remote::L3`) implement it; [`suite`] is the test suite every
//! implementation runs (STYLE §9). The engine (next stage) asks the composition.

use std::sync::Arc;

use async_trait::async_trait;

use crate::context::Hash;
use crate::store::{ActionResult, Lease, StoreError};

/// One level of the cache, for results of type `V`.
#[async_trait]
pub trait Tier<V>: Send + Sync + std::fmt::Debug {
    /// For logs and events: `L1`, `L2`, `L3`.
    fn name(&self) -> &'static str;

    async fn get(&self, key: &Hash) -> Result<Option<V>, TierError>;

    /// Remembers `value` for `key`. A tier may do it later (L3 uploads in the background).
    async fn put(&self, key: &Hash, value: &V) -> Result<(), TierError>;
}

#[derive(Debug, thiserror::Error)]
pub enum TierError {
    #[error(transparent)]
    Store(#[from] StoreError),
}

/// A hit and the tier it came from.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Found<V> {
    pub tier: &'static str,
    pub value: V,
}

/// Tiers looked up in order (fastest first).
#[derive(Debug)]
pub struct Tiered<V> {
    tiers: Vec<Arc<dyn Tier<V>>>,
}

impl<V: Send + Sync> Tiered<V> {
    pub fn new(tiers: Vec<Arc<dyn Tier<V>>>) -> Self {
        Self { tiers }
    }

    /// The first tier's hit, promoted into every tier above it.
    pub async fn find(&self, key: &Hash) -> Result<Option<Found<V>>, TierError> {
        for (depth, tier) in self.tiers.iter().enumerate() {
            if let Some(value) = tier.get(key).await? {
                for upper in &self.tiers[..depth] {
                    upper.put(key, &value).await?;
                }
                return Ok(Some(Found {
                    tier: tier.name(),
                    value,
                }));
            }
        }
        Ok(None)
    }
}

#[async_trait]
impl<V: Send + Sync + std::fmt::Debug> Tier<V> for Tiered<V> {
    fn name(&self) -> &'static str {
        "tiered"
    }

    async fn get(&self, key: &Hash) -> Result<Option<V>, TierError> {
        Ok(self.find(key).await?.map(|found| found.value))
    }

    async fn put(&self, key: &Hash, value: &V) -> Result<(), TierError> {
        for tier in &self.tiers {
            tier.put(key, value).await?;
        }
        Ok(())
    }
}

/// L2 as a tier: the store's action cache, seen through a build's lease (what it finds is
/// held for the build), trusting an entry only while the store holds its layer blobs (an entry
/// whose blob is gone is forgotten). The store blocks: it runs on a blocking thread.
#[derive(Debug, Clone)]
pub struct L2 {
    lease: Lease,
}

impl L2 {
    pub fn new(lease: Lease) -> Self {
        Self { lease }
    }
}

async fn blocking<T: Send + 'static>(work: impl FnOnce() -> T + Send + 'static) -> T {
    match tokio::task::spawn_blocking(work).await {
        Ok(value) => value,
        Err(err) => std::panic::resume_unwind(err.into_panic()),
    }
}

#[async_trait]
impl Tier<ActionResult> for L2 {
    fn name(&self) -> &'static str {
        "L2"
    }

    async fn get(&self, key: &Hash) -> Result<Option<ActionResult>, TierError> {
        let (lease, key) = (self.lease.clone(), *key);
        blocking(move || {
            let Some(result) = lease.action(&key)? else {
                return Ok(None);
            };
            if lease.claim(&key, &result) {
                Ok(Some(result))
            } else {
                lease.forget_action(&key)?;
                Ok(None)
            }
        })
        .await
    }

    async fn put(&self, key: &Hash, value: &ActionResult) -> Result<(), TierError> {
        let (lease, key, value) = (self.lease.clone(), *key, value.clone());
        blocking(move || Ok(lease.record_action(&key, &value)?)).await
    }
}

/// The behaviour every tier must show, run against each implementation (here and in the
/// end-to-end tests against real remote caches).
#[doc(hidden)]
pub mod suite {
    use super::*;

    /// Checks `tier` with `values` (at least three distinct ones, which it must be able to
    /// store: their blobs exist where the tier needs them). `settle` waits for background
    /// writes (L3's uploads); `keys` makes keys no earlier run used.
    pub async fn check<V, S>(tier: &dyn Tier<V>, values: &[V], settle: S, keys: impl Fn(u8) -> Hash)
    where
        V: Clone + PartialEq + std::fmt::Debug + Send + Sync,
        S: AsyncFn(),
    {
        assert!(values.len() >= 3, "the suite needs three values");
        let name = tier.name();
        assert_eq!(
            tier.get(&keys(0)).await.expect("get"),
            None,
            "{name}: a key never stored is a miss"
        );
        for (i, value) in values.iter().enumerate() {
            tier.put(&keys(i as u8 + 1), value).await.expect("put");
        }
        settle().await;
        for (i, value) in values.iter().enumerate() {
            assert_eq!(
                tier.get(&keys(i as u8 + 1)).await.expect("get").as_ref(),
                Some(value),
                "{name}: key {i} gives back what was stored, nothing else"
            );
        }
        tier.put(&keys(1), &values[2]).await.expect("overwrite");
        settle().await;
        assert_eq!(
            tier.get(&keys(1)).await.expect("get").as_ref(),
            Some(&values[2]),
            "{name}: the last store wins"
        );
        assert_eq!(
            tier.get(&keys(0)).await.expect("get"),
            None,
            "{name}: still a miss"
        );
    }

    /// Keys for one run of the suite: `salt` apart from any other run's.
    pub fn keys(salt: u8) -> impl Fn(u8) -> Hash {
        move |n| {
            let mut key = [salt; 32];
            key[0] = n;
            key
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::L1;
    use crate::layout::Layout;
    use crate::store::{Blob, Cas, Digest, LayerRecord, Store, StoreOptions};

    fn action(cas: &Cas, n: usize) -> ActionResult {
        ActionResult {
            layers: (0..n)
                .map(|i| LayerRecord {
                    blob: cas.put(format!("blob {n} {i}").as_bytes()).expect("put"),
                    diff_id: Digest::of(format!("tar {n} {i}").as_bytes()),
                    media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                    content_id: [i as u8; 32],
                })
                .collect(),
        }
    }

    fn l2() -> (tempfile::TempDir, Store, L2) {
        let dir = tempfile::tempdir().expect("tempdir");
        let store = Store::open(&Layout::new(dir.path()), StoreOptions::default()).expect("store");
        let l2 = L2::new(store.lease());
        (dir, store, l2)
    }

    #[tokio::test]
    async fn the_suite_holds_for_l1_l2_and_their_composition() {
        let (_dir, store, l2) = l2();
        let values: Vec<ActionResult> = (0..3).map(|n| action(&store.cas(), n)).collect();
        suite::check(
            &L1::<ActionResult>::new(1 << 20),
            &values,
            async || {},
            suite::keys(1),
        )
        .await;
        suite::check(&l2, &values, async || {}, suite::keys(2)).await;
        let tiered = Tiered::new(vec![
            Arc::new(L1::<ActionResult>::new(1 << 20)) as Arc<dyn Tier<ActionResult>>,
            Arc::new(l2.clone()),
        ]);
        suite::check(&tiered, &values, async || {}, suite::keys(3)).await;
    }

    #[tokio::test]
    async fn a_lower_hit_is_promoted_and_stores_write_through() {
        let (_dir, store, l2) = l2();
        let l1 = Arc::new(L1::<ActionResult>::new(1 << 20));
        let tiered = Tiered::new(vec![
            Arc::clone(&l1) as Arc<dyn Tier<ActionResult>>,
            Arc::new(l2.clone()),
        ]);
        let value = action(&store.cas(), 2);
        l2.put(&[1; 32], &value).await.expect("put");
        assert_eq!(l1.get(&[1; 32]), None);
        let found = tiered.find(&[1; 32]).await.expect("find").expect("hit");
        assert_eq!((found.tier, &found.value), ("L2", &value));
        assert_eq!(l1.get(&[1; 32]), Some(value.clone()), "promoted");
        assert_eq!(
            tiered.find(&[1; 32]).await.expect("find").map(|f| f.tier),
            Some("L1")
        );

        tiered.put(&[2; 32], &value).await.expect("put");
        assert_eq!(l1.get(&[2; 32]), Some(value.clone()));
        assert_eq!(l2.get(&[2; 32]).await.expect("get"), Some(value.clone()));
    }

    #[tokio::test]
    async fn an_l2_entry_whose_blob_is_gone_is_a_miss_and_forgotten() {
        let (_dir, store, l2) = l2();
        let mut value = action(&store.cas(), 1);
        value.layers[0].blob = Blob {
            digest: Digest::of(b"never stored"),
            size: 12,
        };
        l2.put(&[1; 32], &value).await.expect("put");
        assert_eq!(l2.get(&[1; 32]).await.expect("get"), None);
        assert_eq!(store.stats().actions, 0);
    }
}
