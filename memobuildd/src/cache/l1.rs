//! L1: node key → result, in memory, bounded by bytes (moka). A hit here costs no SQLite
//! round trip; an L2 (or L3) hit is promoted here. Generic over the result type so the
//! local and the remote form of a result can both be held ([`Weigh`] says what each costs).
//!
//! LRU rather than moka's default TinyLFU admission: a result just computed must stay, and
//! TinyLFU may refuse a key it has seen only once.

use async_trait::async_trait;
use moka::policy::EvictionPolicy;
use moka::sync::Cache;

use super::remote::RemoteResult;
use super::tier::{Tier, TierError};
use crate::context::Hash;
use crate::store::ActionResult;

/// Rough bytes one entry costs: key, vector, moka's bookkeeping.
const ENTRY_OVERHEAD: u32 = 128;
/// And each layer it names: digest strings and sizes, besides its media type.
const LAYER_OVERHEAD: u32 = 160;

/// What an entry costs in L1's byte budget.
pub trait Weigh {
    fn weight(&self) -> u32;
}

/// The weight of an entry naming layers with these media types.
fn weight_of<'a>(media_types: impl Iterator<Item = &'a str>) -> u32 {
    ENTRY_OVERHEAD
        + media_types
            .map(|m| LAYER_OVERHEAD + m.len() as u32)
            .sum::<u32>()
}

impl Weigh for ActionResult {
    fn weight(&self) -> u32 {
        weight_of(self.layers.iter().map(|l| l.media_type.as_str()))
    }
}

impl Weigh for RemoteResult {
    fn weight(&self) -> u32 {
        weight_of(self.layers.iter().map(|l| l.media_type.as_str()))
    }
}

#[derive(Clone)]
pub struct L1<V = ActionResult> {
    actions: Cache<Hash, V>,
}

impl<V> std::fmt::Debug for L1<V> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("L1")
            .field("entries", &self.actions.entry_count())
            .finish_non_exhaustive()
    }
}

impl<V: Weigh + Clone + Send + Sync + 'static> L1<V> {
    pub fn new(max_bytes: u64) -> Self {
        Self {
            actions: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_, result: &V| result.weight())
                .eviction_policy(EvictionPolicy::lru())
                .build(),
        }
    }

    pub fn get(&self, key: &Hash) -> Option<V> {
        self.actions.get(key)
    }

    pub fn insert(&self, key: Hash, result: V) {
        self.actions.insert(key, result);
    }

    pub fn remove(&self, key: &Hash) {
        self.actions.invalidate(key);
    }

    /// (entries, bytes), after moka settles its pending bookkeeping.
    pub fn usage(&self) -> (u64, u64) {
        self.actions.run_pending_tasks();
        (self.actions.entry_count(), self.actions.weighted_size())
    }
}

#[async_trait]
impl<V: Weigh + Clone + Send + Sync + std::fmt::Debug + 'static> Tier<V> for L1<V> {
    fn name(&self) -> &'static str {
        "L1"
    }

    async fn get(&self, key: &Hash) -> Result<Option<V>, TierError> {
        Ok(L1::get(self, key))
    }

    async fn put(&self, key: &Hash, value: &V) -> Result<(), TierError> {
        self.insert(*key, value.clone());
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn holds_what_was_inserted_within_its_budget() {
        let l1 = L1::new(u64::from(ENTRY_OVERHEAD) * 3);
        for i in 0..10u8 {
            l1.insert([i; 32], ActionResult { layers: vec![] });
        }
        assert_eq!(
            l1.get(&[9; 32]),
            Some(ActionResult { layers: vec![] }),
            "the newest stays"
        );
        let (entries, bytes) = l1.usage();
        assert!(
            entries <= 3 && bytes <= u64::from(ENTRY_OVERHEAD) * 3,
            "{entries} {bytes}"
        );
        l1.remove(&[9; 32]);
        assert_eq!(l1.get(&[9; 32]), None);
    }
}
