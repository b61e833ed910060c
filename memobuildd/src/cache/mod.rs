//! Build results by key, in tiers: L1 in memory, L2 on disk (content-addressed blobs in
//! [`cas`] plus the SQLite [`index`]: action cache, image tags, base image resolutions), L3 a
//! shared remote cache ([`remote`]). [`tier`] is the trait they share and their composition.

pub mod cas;
pub mod index;
pub mod l1;
pub mod remote;
pub mod tier;

pub use cas::{Blob, BlobWriter, Cas, CasError, Digest};
pub use index::{ActionResult, ImageRecord, Index, IndexError, LayerRecord};
pub use l1::L1;
pub use tier::{Found, L2, Tier, TierError, Tiered};
