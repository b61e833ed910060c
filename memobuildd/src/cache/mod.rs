//! Build results by key, in tiers: L1 in memory ([`l1`]), L2 on disk (the [`store`](crate::store):
//! content-addressed blobs, the action cache, unpacked layers), L3 a shared remote cache
//! ([`remote`]). [`tier`] is the trait they share and their composition.

pub mod l1;
pub mod remote;
pub mod tier;

pub use l1::L1;
pub use tier::{Found, L2, Tier, TierError, Tiered};
