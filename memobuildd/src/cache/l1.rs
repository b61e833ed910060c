//! L1: node key → action result, in memory, bounded by bytes (moka). A hit here costs no
//! SQLite round trip; an L2 hit is promoted here.
//!
//! LRU rather than moka's default TinyLFU admission: a result just computed must stay, and
//! TinyLFU may refuse a key it has seen only once.

use moka::policy::EvictionPolicy;
use moka::sync::Cache;

use crate::context::Hash;
use crate::store::ActionResult;

/// Rough bytes one entry costs: key, vector, moka's bookkeeping.
const ENTRY_OVERHEAD: u32 = 128;
/// And each layer it names: two digest strings and a size, besides its media type.
const LAYER_OVERHEAD: u32 = 160;

#[derive(Debug, Clone)]
pub struct L1 {
    actions: Cache<Hash, ActionResult>,
}

impl L1 {
    pub fn new(max_bytes: u64) -> Self {
        Self {
            actions: Cache::builder()
                .max_capacity(max_bytes)
                .weigher(|_, result: &ActionResult| {
                    ENTRY_OVERHEAD
                        + result
                            .layers
                            .iter()
                            .map(|l| LAYER_OVERHEAD + l.media_type.len() as u32)
                            .sum::<u32>()
                })
                .eviction_policy(EvictionPolicy::lru())
                .build(),
        }
    }

    pub fn get(&self, key: &Hash) -> Option<ActionResult> {
        self.actions.get(key)
    }

    pub fn insert(&self, key: Hash, result: ActionResult) {
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
