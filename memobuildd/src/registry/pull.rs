//! Resolving a reference to a platform manifest, and pulling the image into the CAS.

use std::io::Write as _;

use bytes::Bytes;
use futures_util::{StreamExt as _, TryStreamExt as _};
use oci_client::errors::OciDistributionError;

use super::error::Subject;
use super::manifest::{self, Descriptor, Document, Platform};
use super::{Host, Reference, Registry, RegistryError};
use crate::store::{Blob, BlobWriter, Cas, CasError, Digest, blocking};

/// Layers downloaded at once; more rarely helps against one registry.
const PARALLEL_DOWNLOADS: usize = 3;
/// Chunks in flight between the network and the blocking writer.
const WRITE_QUEUE: usize = 16;

/// A reference resolved for one platform.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Resolved {
    /// The platform-specific image manifest (not the index).
    pub manifest_digest: Digest,
    pub media_type: String,
}

/// An image now in the CAS.
#[derive(Debug, Clone)]
pub struct Pulled {
    pub manifest: Blob,
    pub manifest_bytes: Vec<u8>,
    pub config: Blob,
    pub config_bytes: Vec<u8>,
    pub layers: Vec<PulledLayer>,
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PulledLayer {
    pub blob: Blob,
    pub media_type: String,
}

/// A platform manifest as fetched: its bytes are verified against `digest`.
struct Fetched {
    /// Where it was found, pinned to its digest.
    reference: Reference,
    digest: Digest,
    media_type: String,
    bytes: Bytes,
    config: Descriptor,
    layers: Vec<Descriptor>,
}

impl Registry {
    /// The manifest `reference` names for `platform`, choosing from an index if it names
    /// one.
    #[tracing::instrument(skip_all, fields(reference = %reference, platform = %platform))]
    pub async fn resolve(
        &self,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<Resolved, RegistryError> {
        let result = async {
            let host = self.host(reference).await?;
            let fetched = self.fetch_manifest(&host, reference, platform).await?;
            Ok(Resolved {
                manifest_digest: fetched.digest,
                media_type: fetched.media_type,
            })
        }
        .await;
        self.forget_refused(reference.registry(), result)
    }

    /// Pulls the image `reference` names for `platform` into `cas`: manifest, config and
    /// layers, each verified against its digest. Blobs already in the CAS are not fetched.
    #[tracing::instrument(skip_all, fields(reference = %reference, platform = %platform))]
    pub async fn pull(
        &self,
        cas: &Cas,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<Pulled, RegistryError> {
        let result = self.pull_from(cas, reference, platform).await;
        self.forget_refused(reference.registry(), result)
    }

    async fn pull_from(
        &self,
        cas: &Cas,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<Pulled, RegistryError> {
        let host = self.host(reference).await?;
        let fetched = self.fetch_manifest(&host, reference, platform).await?;
        let manifest = store(
            cas,
            fetched.bytes.clone(),
            fetched.digest.clone(),
            &fetched.reference,
        )
        .await?;

        let config = self
            .download(&host, cas, &fetched.reference, &fetched.config)
            .await?;
        let config_bytes = read(cas, &config.digest).await?;
        // Each future owns its descriptor: a closure taking `&Descriptor` is higher-ranked
        // over that borrow, and rustc then cannot prove the whole pull `Send`.
        let (host, image) = (&host, &fetched.reference);
        let downloads = fetched.layers.iter().cloned().map(|layer| async move {
            let blob = self.download(host, cas, image, &layer).await?;
            Ok::<_, RegistryError>(PulledLayer {
                blob,
                media_type: layer.media_type,
            })
        });
        let layers: Vec<PulledLayer> = futures_util::stream::iter(downloads)
            .buffered(PARALLEL_DOWNLOADS)
            .try_collect()
            .await?;
        tracing::info!(manifest = %manifest.digest, layers = layers.len(), "pulled");
        Ok(Pulled {
            manifest,
            manifest_bytes: fetched.bytes.to_vec(),
            config,
            config_bytes,
            layers,
        })
    }

    async fn fetch_manifest(
        &self,
        host: &Host,
        reference: &Reference,
        platform: &Platform,
    ) -> Result<Fetched, RegistryError> {
        let (bytes, digest, pinned) = self.fetch_document(host, reference).await?;
        let (bytes, digest, pinned) = match parse(&bytes, &pinned)? {
            Document::Manifest { .. } => (bytes, digest, pinned),
            Document::Index { manifests } => {
                let entry = manifest::select(&manifests, platform).map_err(|available| {
                    RegistryError::NoMatchingPlatform {
                        reference: reference.to_string(),
                        wanted: platform.clone(),
                        available,
                    }
                })?;
                let platform_manifest = reference.with_digest(entry.digest.clone());
                self.fetch_document(host, &platform_manifest).await?
            }
        };
        match parse(&bytes, &pinned)? {
            Document::Manifest {
                media_type,
                config,
                layers,
            } => Ok(Fetched {
                reference: pinned,
                digest,
                media_type,
                bytes,
                config,
                layers,
            }),
            Document::Index { .. } => Err(RegistryError::Protocol {
                registry: pinned.registry().to_owned(),
                reason: format!("{pinned}: an index entry for {platform} is itself an index"),
            }),
        }
    }

    /// Fetches a manifest or index; oci-client checks its bytes against the reference's
    /// digest (or the registry's digest header).
    async fn fetch_document(
        &self,
        host: &Host,
        reference: &Reference,
    ) -> Result<(Bytes, Digest, Reference), RegistryError> {
        let oci = reference.to_oci();
        let subject = Subject {
            registry: reference.registry(),
            reference: &reference.to_string(),
            digest: reference.digest(),
        };
        let (bytes, digest) = self
            .backoff
            .run("fetch manifest", || {
                host.client
                    .pull_manifest_raw(&oci, &host.auth, manifest::ACCEPTED)
            })
            .await
            .map_err(|err| subject.classify(err))?;
        let digest = Digest::parse(&digest).map_err(|err| subject.protocol(err))?;
        let pinned = reference.with_digest(digest.clone());
        Ok((bytes, digest, pinned))
    }

    /// Makes sure the blob `descriptor` names is in the CAS, downloading it if not.
    async fn download(
        &self,
        host: &Host,
        cas: &Cas,
        image: &Reference,
        descriptor: &Descriptor,
    ) -> Result<Blob, RegistryError> {
        let digest = &descriptor.digest;
        if let Some(size) = cas.size(digest) {
            tracing::debug!(%digest, "already in the CAS");
            return Ok(Blob {
                digest: digest.clone(),
                size,
            });
        }
        let blob_name = format!("{}/{}@{digest}", image.registry(), image.repository());
        let subject = Subject {
            registry: image.registry(),
            reference: &blob_name,
            digest: Some(digest),
        };
        let oci = image.to_oci();
        let fetched = self
            .backoff
            .run("download blob", || async {
                let stream = host.client.pull_blob_stream(&oci, digest.as_str()).await?;
                stream_into(cas, digest, descriptor.size, stream.stream).await
            })
            .await;
        let writer = match fetched {
            Ok(Ok(writer)) => writer,
            Ok(Err(Local::TooLong)) => return Err(subject.corrupt(digest)),
            Ok(Err(Local::Store(err))) => return Err(RegistryError::Store(err)),
            Err(err) => return Err(subject.classify(err)),
        };
        let expected = digest.clone();
        match blocking(move || writer.commit(Some(&expected))).await {
            Ok(blob) => {
                tracing::debug!(%digest, size = blob.size, "downloaded");
                Ok(blob)
            }
            Err(CasError::Mismatch { .. }) => Err(subject.corrupt(digest)),
            Err(err) => Err(RegistryError::Store(err)),
        }
    }
}

/// A download that failed on this side, or that cannot be the blob it claims to be: not
/// worth retrying.
enum Local {
    /// The registry sent more bytes than the descriptor's size.
    TooLong,
    Store(CasError),
}

fn parse(bytes: &[u8], pinned: &Reference) -> Result<Document, RegistryError> {
    Document::parse(bytes).map_err(|err| RegistryError::Protocol {
        registry: pinned.registry().to_owned(),
        reason: format!("{pinned}: {err}"),
    })
}

/// Copies a download into a new CAS writer on a blocking thread. On any failure the
/// writer is dropped, which deletes its temp file.
async fn stream_into(
    cas: &Cas,
    digest: &Digest,
    size: u64,
    mut stream: futures_util::stream::BoxStream<'static, std::io::Result<Bytes>>,
) -> Result<Result<BlobWriter, Local>, OciDistributionError> {
    let writer = match cas.writer() {
        Ok(writer) => writer,
        Err(err) => return Ok(Err(Local::Store(err))),
    };
    let (tx, mut rx) = tokio::sync::mpsc::channel::<Bytes>(WRITE_QUEUE);
    let task = tokio::task::spawn_blocking(move || {
        let mut writer = writer;
        while let Some(chunk) = rx.blocking_recv() {
            writer.write_all(&chunk)?;
        }
        Ok::<_, std::io::Error>(writer)
    });
    let mut received = 0u64;
    let mut outcome = Ok(Ok(()));
    while let Some(chunk) = stream.next().await {
        match chunk {
            Ok(chunk) => {
                received += chunk.len() as u64;
                if received > size {
                    outcome = Ok(Err(Local::TooLong));
                    break;
                }
                if tx.send(chunk).await.is_err() {
                    // The writer stopped: its error is collected below.
                    break;
                }
            }
            Err(err) => {
                outcome = Err(OciDistributionError::IoError(err));
                break;
            }
        }
    }
    drop(tx);
    let written = task
        .await
        .unwrap_or_else(|err| std::panic::resume_unwind(err.into_panic()));
    let writer = match written {
        Ok(writer) => writer,
        Err(source) => {
            return Ok(Err(Local::Store(CasError::Io {
                path: cas.path(digest),
                source,
            })));
        }
    };
    outcome.map(|fine| fine.map(|()| writer))
}

/// Stores a manifest's bytes, verified against the digest they were fetched by.
async fn store(
    cas: &Cas,
    bytes: Bytes,
    digest: Digest,
    reference: &Reference,
) -> Result<Blob, RegistryError> {
    if let Some(size) = cas.size(&digest) {
        return Ok(Blob { digest, size });
    }
    let cas = cas.clone();
    let expected = digest.clone();
    let stored = blocking(move || {
        let mut writer = cas.writer()?;
        writer.write_all(&bytes).map_err(|source| CasError::Io {
            path: cas.path(&expected),
            source,
        })?;
        writer.commit(Some(&expected))
    })
    .await;
    stored.map_err(|err| match err {
        CasError::Mismatch { .. } => RegistryError::Corrupt {
            digest,
            repository: format!("{}/{}", reference.registry(), reference.repository()),
        },
        err => RegistryError::Store(err),
    })
}

async fn read(cas: &Cas, digest: &Digest) -> Result<Vec<u8>, RegistryError> {
    let cas = cas.clone();
    let digest = digest.clone();
    blocking(move || cas.read(&digest))
        .await
        .map_err(RegistryError::Store)
}
