//! Pushing an image from the CAS: each blob the registry lacks is mounted from a sibling
//! repository or streamed from disk, then the manifest is put under the target's tag.

use std::sync::Arc;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use bytes::{Bytes, BytesMut};
use futures_util::{StreamExt as _, TryStreamExt as _};
use oci_client::errors::OciDistributionError;
use tokio::io::AsyncReadExt as _;

use super::error::Subject;
use super::{Host, Reference, Registry, RegistryError};
use crate::store::{Blob, Cas, CasError, Digest};

const PARALLEL_UPLOADS: usize = 3;
const READ_CHUNK: usize = 256 * 1024;
/// How often an upload reports its progress.
const PROGRESS_EVERY: Duration = Duration::from_millis(200);

/// An image to push: its blobs must be in the CAS.
#[derive(Debug, Clone)]
pub struct PushImage {
    pub manifest_bytes: Vec<u8>,
    pub manifest_media_type: String,
    pub config: Blob,
    pub layers: Vec<Blob>,
    /// Repositories of the target's registry that may hold these blobs already (the base
    /// image's, an earlier push's): a blob found there is mounted, not uploaded.
    pub mount_from: Vec<String>,
}

/// What happened to one blob of a push.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum PushEvent {
    /// The registry has it already.
    Skipped { digest: Digest, size: u64 },
    /// Mounted from another repository of the registry.
    Mounted { digest: Digest, from: String },
    /// Upload in progress: `sent` of `total` bytes.
    Uploading {
        digest: Digest,
        sent: u64,
        total: u64,
    },
    /// Uploaded.
    Done { digest: Digest, size: u64 },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PushReport {
    /// The manifest's digest, now pullable as `target@digest`.
    pub digest: Digest,
    pub blobs_uploaded: usize,
    pub blobs_skipped: usize,
    pub blobs_mounted: usize,
    pub bytes_uploaded: u64,
}

enum Outcome {
    Skipped,
    Mounted,
    Uploaded(u64),
}

impl Registry {
    /// Pushes `image` to `target`, reporting each blob through `progress`.
    #[tracing::instrument(skip_all, fields(target = %target))]
    pub async fn push(
        &self,
        cas: &Cas,
        image: &PushImage,
        target: &Reference,
        progress: &(dyn Fn(PushEvent) + Send + Sync),
    ) -> Result<PushReport, RegistryError> {
        let result = self.push_to(cas, image, target, progress).await;
        self.forget_refused(target.registry(), result)
    }

    async fn push_to(
        &self,
        cas: &Cas,
        image: &PushImage,
        target: &Reference,
        progress: &(dyn Fn(PushEvent) + Send + Sync),
    ) -> Result<PushReport, RegistryError> {
        let digest = Digest::of(&image.manifest_bytes);
        if let Some(pinned) = target.digest()
            && pinned != &digest
        {
            return Err(RegistryError::Protocol {
                registry: target.registry().to_owned(),
                reason: format!("cannot push a manifest with digest {digest} as {target}"),
            });
        }
        let host = self.host(target).await?;

        let mut blobs: Vec<Blob> = Vec::with_capacity(image.layers.len() + 1);
        for blob in std::iter::once(&image.config).chain(&image.layers) {
            if !blobs.iter().any(|b| b.digest == blob.digest) {
                blobs.push(blob.clone());
            }
        }
        // Each future owns its blob: see `pull` for why.
        let host = &host;
        let uploads = blobs.into_iter().map(|blob| async move {
            self.push_blob(host, cas, image, target, &blob, progress)
                .await
        });
        let outcomes: Vec<Outcome> = futures_util::stream::iter(uploads)
            .buffer_unordered(PARALLEL_UPLOADS)
            .try_collect()
            .await?;

        let subject = Subject {
            registry: target.registry(),
            reference: &target.to_string(),
            digest: Some(&digest),
        };
        let content_type = reqwest::header::HeaderValue::from_str(&image.manifest_media_type)
            .map_err(|_| {
                subject.protocol(format_args!(
                    "{:?} is not a media type",
                    image.manifest_media_type
                ))
            })?;
        let oci = target.to_oci();
        let body = Bytes::from(image.manifest_bytes.clone());
        self.backoff
            .run("push manifest", || {
                host.client
                    .push_manifest_raw(&oci, body.clone(), content_type.clone())
            })
            .await
            .map_err(|err| subject.classify(err))?;

        let mut report = PushReport {
            digest,
            blobs_uploaded: 0,
            blobs_skipped: 0,
            blobs_mounted: 0,
            bytes_uploaded: 0,
        };
        for outcome in outcomes {
            match outcome {
                Outcome::Skipped => report.blobs_skipped += 1,
                Outcome::Mounted => report.blobs_mounted += 1,
                Outcome::Uploaded(bytes) => {
                    report.blobs_uploaded += 1;
                    report.bytes_uploaded += bytes;
                }
            }
        }
        tracing::info!(
            digest = %report.digest,
            uploaded = report.blobs_uploaded,
            skipped = report.blobs_skipped,
            mounted = report.blobs_mounted,
            bytes = report.bytes_uploaded,
            "pushed"
        );
        Ok(report)
    }

    async fn push_blob(
        &self,
        host: &Host,
        cas: &Cas,
        image: &PushImage,
        target: &Reference,
        blob: &Blob,
        progress: &(dyn Fn(PushEvent) + Send + Sync),
    ) -> Result<Outcome, RegistryError> {
        let digest = &blob.digest;
        // Checked before asking the registry: a missing local blob is our bug, not theirs.
        let size = cas
            .size(digest)
            .ok_or_else(|| RegistryError::Store(CasError::Missing(digest.clone())))?;
        let blob_name = format!("{}/{}@{digest}", target.registry(), target.repository());
        let subject = Subject {
            registry: target.registry(),
            reference: &blob_name,
            digest: Some(digest),
        };
        let oci = &target.to_oci();

        let exists = self
            .backoff
            .run("check blob", || {
                host.client.blob_exists(oci, digest.as_str())
            })
            .await
            .map_err(|err| subject.classify(err))?;
        if exists {
            progress(PushEvent::Skipped {
                digest: digest.clone(),
                size,
            });
            return Ok(Outcome::Skipped);
        }

        for from in image
            .mount_from
            .iter()
            .filter(|r| *r != target.repository())
        {
            let source = oci_client::Reference::with_tag(
                target.registry().to_owned(),
                from.clone(),
                "latest".to_owned(),
            );
            // A registry that cannot mount answers 202 and an upload session; oci-client
            // reports that as an error, and so does a source without the blob. Either way
            // the next candidate, or an upload, follows.
            match host.client.mount_blob(oci, &source, digest.as_str()).await {
                Ok(()) => {
                    progress(PushEvent::Mounted {
                        digest: digest.clone(),
                        from: from.clone(),
                    });
                    return Ok(Outcome::Mounted);
                }
                Err(err) => tracing::debug!(%digest, from, error = %err, "not mounted"),
            }
        }

        let sent = Arc::new(AtomicU64::new(0));
        let path = cas.path(digest);
        let upload = self.backoff.run("upload blob", || {
            sent.store(0, Ordering::Relaxed);
            let (path, sent) = (path.clone(), Arc::clone(&sent));
            async move {
                // A local failure is not the registry's, and not worth a retry.
                let file = match tokio::fs::File::open(&path).await {
                    Ok(file) => file,
                    Err(source) => return Ok(Err(CasError::Io { path, source })),
                };
                host.client
                    .push_blob_stream(oci, read_stream(file, sent), digest.as_str(), Some(size))
                    .await
                    .map(Ok)
            }
        });
        tokio::pin!(upload);
        let mut tick = tokio::time::interval(PROGRESS_EVERY);
        let uploaded = loop {
            tokio::select! {
                result = &mut upload => break result,
                _ = tick.tick() => progress(PushEvent::Uploading {
                    digest: digest.clone(),
                    sent: sent.load(Ordering::Relaxed),
                    total: size,
                }),
            }
        };
        uploaded
            .map_err(|err| subject.classify(err))?
            .map_err(RegistryError::Store)?;
        progress(PushEvent::Done {
            digest: digest.clone(),
            size,
        });
        Ok(Outcome::Uploaded(size))
    }
}

/// A file as a stream of chunks, counting what has been read (and so sent).
fn read_stream(
    file: tokio::fs::File,
    sent: Arc<AtomicU64>,
) -> impl futures_util::Stream<Item = Result<Bytes, OciDistributionError>> + Send + 'static {
    futures_util::stream::try_unfold(file, move |mut file| {
        let sent = Arc::clone(&sent);
        async move {
            let mut buf = BytesMut::with_capacity(READ_CHUNK);
            let n = file.read_buf(&mut buf).await?;
            if n == 0 {
                return Ok(None);
            }
            sent.fetch_add(n as u64, Ordering::Relaxed);
            Ok(Some((buf.freeze(), file)))
        }
    })
}
