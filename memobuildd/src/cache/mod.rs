//! Build results by key, in tiers: L1 in memory ([`l1`]), L2 on disk (the [`store`](crate::store):
//! content-addressed blobs, the action cache, unpacked layers), L3 a shared remote cache.

pub mod l1;

pub use l1::L1;
