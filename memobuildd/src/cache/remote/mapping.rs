//! What a step's result looks like in a remote cache — pure functions, no I/O.
//!
//! - **Action digest**: SHA-256 of `ACTION_DOMAIN ∥ node key` ([`action_digest`]); the node key
//!   is the engine's 32-byte, machine-independent key, so every machine asks for the same
//!   digest. The domain keeps our entries apart from anything else in a shared cache.
//! - **Layer blobs** travel as the uncompressed layer tar, so their REAPI digest *is* the OCI
//!   diff-id and their size the tar's size ([`RemoteLayer::blob`]): the store identifies layers
//!   the same way, compression stays a matter of export and push (it depends on the backend and
//!   level, so it could not be a key), and a blob one machine uploaded is found by any other.
//!   No compression on the wire: BuildGrid advertises none, and loopback or LAN bandwidth is
//!   the case that matters.
//! - **Result blob** ([`encode`]/[`decode`]): our own versioned serialization of the layers in
//!   order (diff-id, size, media type, content id — what the next step's key needs, so a hit
//!   is usable without reading its layers) and the signature (`signing`):
//!   `MAGIC ∥ version ∥ signed (0|1) ∥ [tag] ∥ postcard([layer])`.
//! - **ActionResult**: the REAPI entry under the action digest names the result blob as the
//!   output file [`RESULT_PATH`] and each layer blob as `memobuild/layers/NNN`, so servers that
//!   check an entry's outputs (BuildGrid, bazel-remote) keep and validate the layers too. Only
//!   the result blob is trusted on the way back; the other names are for the server.

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use serde::{Deserialize, Serialize};

use super::signing::{Signer, TAG_LEN};
use crate::context::Hash;
use crate::store::{Blob, Digest};

const ACTION_DOMAIN: &[u8] = b"memobuild/l3/action/v1\0";
const MAGIC: &[u8] = b"memobuild-result";
/// 2: layers carry their content id.
const VERSION: u8 = 2;
/// The output file of an ActionResult that holds the result blob.
pub const RESULT_PATH: &str = "memobuild/result";
/// A result blob is a few hundred bytes; anything much bigger is not ours.
pub const MAX_RESULT_BLOB: u64 = 1 << 20;

/// A layer as the remote knows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct RemoteLayer {
    /// sha256 of the uncompressed tar.
    pub diff_id: Digest,
    /// Bytes of the uncompressed tar.
    pub size: u64,
    /// The image layer's media type as the producing machine had it.
    pub media_type: String,
    /// What cache keys see of the layer (`image::layer::Layer::content_id`).
    pub content_id: [u8; 32],
}

impl RemoteLayer {
    /// The blob the remote holds this layer as: the uncompressed tar.
    pub fn blob(&self) -> Blob {
        Blob {
            digest: self.diff_id.clone(),
            size: self.size,
        }
    }
}

/// A step's result as stored remotely: its layers, bottom first (none for an empty diff).
#[derive(Debug, Clone, PartialEq, Eq, Default)]
pub struct RemoteResult {
    pub layers: Vec<RemoteLayer>,
}

/// What an upload writes: the result blob and the entry that names it.
#[derive(Debug, Clone)]
pub struct Entry {
    pub action: Blob,
    pub result_blob: Blob,
    pub result_bytes: bytes::Bytes,
    pub action_result: reapi::ActionResult,
}

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum MappingError {
    #[error("the entry names no {RESULT_PATH} output: not written by MemoBuild")]
    NotOurs,
    #[error("the entry's digest {hash:?}/{size} is not a sha256 digest")]
    BadDigest { hash: String, size: i64 },
    #[error("the result blob is not in MemoBuild's format")]
    BadMagic,
    #[error("the result blob has format version {0}; this daemon reads version {VERSION}")]
    Version(u8),
    #[error("the result blob does not parse: {0}")]
    Malformed(&'static str),
    #[error("the entry is not signed, and a signing secret is configured")]
    Unsigned,
    #[error("the entry's signature does not verify with this daemon's secret")]
    BadSignature,
}

impl MappingError {
    /// A signature problem: counted and reported apart from other misses.
    pub fn is_signature(&self) -> bool {
        matches!(self, Self::Unsigned | Self::BadSignature)
    }
}

#[derive(Serialize, Deserialize)]
struct LayerV2 {
    diff_id: [u8; 32],
    size: u64,
    media_type: String,
    content_id: [u8; 32],
}

/// The digest a node key is looked up under: the blob `ACTION_DOMAIN ∥ key`.
pub fn action_digest(key: &Hash) -> Blob {
    let preimage = [ACTION_DOMAIN, key.as_slice()].concat();
    Blob {
        digest: Digest::of(&preimage),
        size: preimage.len() as u64,
    }
}

/// The entry to upload for `result` under `action`, signed when a signer is given.
pub fn encode(action: &Blob, result: &RemoteResult, signer: Option<&Signer>) -> Entry {
    let layers: Vec<LayerV2> = result
        .layers
        .iter()
        .map(|layer| LayerV2 {
            diff_id: raw(&layer.diff_id),
            size: layer.size,
            media_type: layer.media_type.clone(),
            content_id: layer.content_id,
        })
        .collect();
    let body = postcard::to_stdvec(&layers).expect("serializing to memory cannot fail");
    let mut bytes = Vec::with_capacity(MAGIC.len() + 2 + TAG_LEN + body.len());
    bytes.extend_from_slice(MAGIC);
    bytes.push(VERSION);
    match signer {
        Some(signer) => {
            bytes.push(1);
            bytes.extend_from_slice(&signer.sign(action, &body));
        }
        None => bytes.push(0),
    }
    bytes.extend_from_slice(&body);
    let result_blob = Blob {
        digest: Digest::of(&bytes),
        size: bytes.len() as u64,
    };
    let output = |path: String, blob: &Blob| reapi::OutputFile {
        path,
        digest: Some(to_reapi(blob)),
        ..Default::default()
    };
    let mut output_files = vec![output(RESULT_PATH.to_owned(), &result_blob)];
    output_files.extend(
        result
            .layers
            .iter()
            .enumerate()
            .map(|(i, layer)| output(format!("memobuild/layers/{i:03}"), &layer.blob())),
    );
    Entry {
        action: action.clone(),
        result_blob,
        result_bytes: bytes.into(),
        action_result: reapi::ActionResult {
            output_files,
            exit_code: 0,
            ..Default::default()
        },
    }
}

/// The result blob an entry names.
pub fn result_blob_of(entry: &reapi::ActionResult) -> Result<Blob, MappingError> {
    let file = entry
        .output_files
        .iter()
        .find(|f| f.path == RESULT_PATH)
        .ok_or(MappingError::NotOurs)?;
    let digest = file.digest.as_ref().ok_or(MappingError::NotOurs)?;
    from_reapi(digest)
}

/// Reads a result blob (already checked against its digest) fetched for `action`. With a
/// signer, only a result it signed is accepted; without one, signatures are not looked at.
pub fn decode(
    action: &Blob,
    bytes: &[u8],
    signer: Option<&Signer>,
) -> Result<RemoteResult, MappingError> {
    let rest = bytes.strip_prefix(MAGIC).ok_or(MappingError::BadMagic)?;
    let (&version, rest) = rest.split_first().ok_or(MappingError::BadMagic)?;
    if version != VERSION {
        return Err(MappingError::Version(version));
    }
    let (tag, body) = match rest.split_first() {
        Some((0, body)) => (None, body),
        Some((1, rest)) if rest.len() >= TAG_LEN => {
            let (tag, body) = rest.split_at(TAG_LEN);
            (Some(tag), body)
        }
        _ => return Err(MappingError::Malformed("signature flag")),
    };
    if let Some(signer) = signer {
        let tag = tag.ok_or(MappingError::Unsigned)?;
        if !signer.verify(action, body, tag) {
            return Err(MappingError::BadSignature);
        }
    }
    let (layers, trailing) = postcard::take_from_bytes::<Vec<LayerV2>>(body)
        .map_err(|_| MappingError::Malformed("layer list"))?;
    if !trailing.is_empty() {
        return Err(MappingError::Malformed("bytes after the layer list"));
    }
    let layers = layers
        .into_iter()
        .map(|layer| RemoteLayer {
            diff_id: Digest::parse(&format!("sha256:{}", hex::encode(layer.diff_id)))
                .expect("32 bytes are a sha256 digest"),
            size: layer.size,
            media_type: layer.media_type,
            content_id: layer.content_id,
        })
        .collect();
    Ok(RemoteResult { layers })
}

/// The REAPI form of a blob reference.
pub fn to_reapi(blob: &Blob) -> reapi::Digest {
    reapi::Digest {
        hash: blob.digest.hex().to_owned(),
        size_bytes: i64::try_from(blob.size).unwrap_or(i64::MAX),
    }
}

/// A blob reference from the REAPI form, refusing what is not SHA-256.
pub fn from_reapi(digest: &reapi::Digest) -> Result<Blob, MappingError> {
    let bad = || MappingError::BadDigest {
        hash: digest.hash.clone(),
        size: digest.size_bytes,
    };
    Ok(Blob {
        digest: Digest::parse(&format!("sha256:{}", digest.hash)).map_err(|_| bad())?,
        size: u64::try_from(digest.size_bytes).map_err(|_| bad())?,
    })
}

fn raw(digest: &Digest) -> [u8; 32] {
    let mut out = [0; 32];
    hex::decode_to_slice(digest.hex(), &mut out).expect("a parsed digest is 64 hex digits");
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::cache::remote::settings::Secret;

    fn result() -> RemoteResult {
        RemoteResult {
            layers: vec![
                RemoteLayer {
                    diff_id: Digest::of(b"tar one"),
                    size: 7,
                    media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                    content_id: [1; 32],
                },
                RemoteLayer {
                    diff_id: Digest::of(b"tar two"),
                    size: 7,
                    media_type: "application/vnd.oci.image.layer.v1.tar+gzip".into(),
                    content_id: [2; 32],
                },
            ],
        }
    }

    #[test]
    fn action_digests_are_domain_separated_and_stable() {
        let action = action_digest(&[7; 32]);
        assert_eq!(action.size, (ACTION_DOMAIN.len() + 32) as u64);
        assert_ne!(
            action.digest,
            Digest::of(&[7; 32]),
            "not the bare key's hash"
        );
        assert_ne!(action, action_digest(&[8; 32]));
        // Pinned: changing it would orphan every entry already in shared caches.
        assert_eq!(
            action.digest.hex(),
            hex::encode(<sha2::Sha256 as sha2::Digest>::digest(
                [b"memobuild/l3/action/v1\0".as_slice(), &[7; 32]].concat()
            ))
        );
    }

    #[test]
    fn entries_round_trip_signed_and_unsigned() {
        let action = action_digest(&[1; 32]);
        let signer = Signer::new(&Secret::new("s"));
        for signer in [None, Some(&signer)] {
            let entry = encode(&action, &result(), signer);
            assert_eq!(entry.result_blob.digest, Digest::of(&entry.result_bytes));
            assert_eq!(
                result_blob_of(&entry.action_result).expect("ours"),
                entry.result_blob
            );
            let names: Vec<&str> = entry
                .action_result
                .output_files
                .iter()
                .map(|f| f.path.as_str())
                .collect();
            assert_eq!(
                names,
                [RESULT_PATH, "memobuild/layers/000", "memobuild/layers/001"]
            );
            assert_eq!(
                from_reapi(
                    entry.action_result.output_files[2]
                        .digest
                        .as_ref()
                        .expect("d")
                )
                .expect("blob"),
                result().layers[1].blob()
            );
            assert_eq!(
                decode(&action, &entry.result_bytes, signer).expect("decode"),
                result()
            );
        }
        let empty = encode(&action, &RemoteResult::default(), None);
        assert_eq!(
            decode(&action, &empty.result_bytes, None).expect("empty diff"),
            RemoteResult::default()
        );
    }

    #[test]
    fn signatures_are_required_and_bound_to_secret_and_action() {
        let action = action_digest(&[1; 32]);
        let ours = Signer::new(&Secret::new("ours"));
        let theirs = Signer::new(&Secret::new("theirs"));
        let unsigned = encode(&action, &result(), None);
        assert_eq!(
            decode(&action, &unsigned.result_bytes, Some(&ours)),
            Err(MappingError::Unsigned)
        );
        let foreign = encode(&action, &result(), Some(&theirs));
        assert_eq!(
            decode(&action, &foreign.result_bytes, Some(&ours)),
            Err(MappingError::BadSignature)
        );
        let signed = encode(&action, &result(), Some(&ours));
        assert_eq!(
            decode(&action_digest(&[2; 32]), &signed.result_bytes, Some(&ours)),
            Err(MappingError::BadSignature),
            "a signed result moved under another action"
        );
        let mut tampered = signed.result_bytes.to_vec();
        *tampered.last_mut().expect("bytes") ^= 1;
        assert!(
            decode(&action, &tampered, Some(&ours))
                .expect_err("tampered")
                .is_signature()
        );
        assert_eq!(
            decode(&action, &signed.result_bytes, None).expect("no secret: not checked"),
            result()
        );
    }

    #[test]
    fn foreign_and_damaged_blobs_are_refused() {
        let action = action_digest(&[1; 32]);
        assert_eq!(
            result_blob_of(&reapi::ActionResult::default()),
            Err(MappingError::NotOurs)
        );
        assert_eq!(decode(&action, b"{}", None), Err(MappingError::BadMagic));
        let good = encode(&action, &result(), None).result_bytes.to_vec();
        let mut future = good.clone();
        future[MAGIC.len()] = 3;
        assert_eq!(
            decode(&action, &future, None),
            Err(MappingError::Version(3))
        );
        let mut trailing = good.clone();
        trailing.push(0);
        assert!(matches!(
            decode(&action, &trailing, None),
            Err(MappingError::Malformed(_))
        ));
        assert!(matches!(
            decode(&action, &good[..good.len() - 3], None),
            Err(MappingError::Malformed(_))
        ));
        assert!(
            from_reapi(&reapi::Digest {
                hash: "abc".into(),
                size_bytes: 3
            })
            .is_err()
        );
        assert!(
            from_reapi(&reapi::Digest {
                hash: "a".repeat(64),
                size_bytes: -1
            })
            .is_err()
        );
    }
}
