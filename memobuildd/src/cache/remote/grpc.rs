//! REAPI v2 over gRPC ([`GrpcCache`]): Capabilities, ActionCache, CAS batches for blobs up to
//! the server's batch limit, ByteStream for bigger ones (streamed in [`CHUNK`]s, never whole in
//! memory), instance names, TLS with an extra CA, bearer or basic auth in the metadata.
//! Message and client types are the `bazel-remote-apis` crate's, generated from the official
//! protos.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use bazel_remote_apis::google::bytestream::byte_stream_client::ByteStreamClient;
use bazel_remote_apis::google::bytestream::{ReadRequest, WriteRequest};
use bytes::Bytes;
use tokio::sync::mpsc;
use tonic::metadata::AsciiMetadataValue;
use tonic::transport::{Certificate, Channel, ClientTlsConfig};

use super::chunks::CHUNK;
use super::mapping::{from_reapi, to_reapi};
use super::reapi::action_cache_client::ActionCacheClient;
use super::reapi::capabilities_client::CapabilitiesClient;
use super::reapi::content_addressable_storage_client::ContentAddressableStorageClient;
use super::reapi::{self, batch_update_blobs_request, digest_function};
use super::settings::{Auth, Endpoint};
use super::{Capabilities, Chunks, RemoteCache, RemoteError, Sink};
use crate::store::Blob;

/// Batches are capped here even when a server allows more: gRPC's usual message limit.
const MAX_BATCH: u64 = 4 << 20;
/// Room for a batch's framing over its blob bytes.
const MESSAGE_OVERHEAD: usize = 64 << 10;
const SHA256: i32 = digest_function::Value::Sha256 as i32;

#[derive(Debug)]
pub struct GrpcCache {
    endpoint: String,
    instance: String,
    auth: Option<AsciiMetadataValue>,
    channel: Channel,
    capabilities: Mutex<Option<Capabilities>>,
}

impl GrpcCache {
    /// A client for `endpoint`; nothing is sent until the first request, so this succeeds
    /// whether or not the server is up.
    pub fn new(
        endpoint: &Endpoint,
        auth: Option<&Auth>,
        ca_file: Option<&Path>,
        connect_timeout: Duration,
    ) -> Result<Self, RemoteError> {
        let scheme = if endpoint.tls { "https" } else { "http" };
        let host = if endpoint.host.contains(':') {
            format!("[{}]", endpoint.host)
        } else {
            endpoint.host.clone()
        };
        let mut builder =
            tonic::transport::Endpoint::from_shared(format!("{scheme}://{host}:{}", endpoint.port))
                .map_err(|err| RemoteError::Setup(Box::new(err)))?
                .connect_timeout(connect_timeout)
                .tcp_nodelay(true)
                .http2_keep_alive_interval(Duration::from_secs(30))
                .keep_alive_timeout(Duration::from_secs(10));
        if endpoint.tls {
            let mut tls = ClientTlsConfig::new()
                .with_native_roots()
                .domain_name(endpoint.host.clone());
            if let Some(path) = ca_file {
                let pem = std::fs::read(path).map_err(|source| RemoteError::CaFile {
                    path: path.to_owned(),
                    source,
                })?;
                tls = tls.ca_certificate(Certificate::from_pem(pem));
            }
            builder = builder
                .tls_config(tls)
                .map_err(|err| RemoteError::Setup(Box::new(err)))?;
        }
        let auth = auth
            .map(|auth| {
                let mut value = AsciiMetadataValue::try_from(auth.header_value().as_slice())
                    .map_err(|err| RemoteError::Setup(Box::new(err)))?;
                value.set_sensitive(true);
                Ok::<_, RemoteError>(value)
            })
            .transpose()?;
        Ok(Self {
            endpoint: endpoint.display(),
            instance: endpoint.path.clone(),
            auth,
            channel: builder.connect_lazy(),
            capabilities: Mutex::new(None),
        })
    }

    fn request<T>(&self, message: T) -> tonic::Request<T> {
        let mut request = tonic::Request::new(message);
        if let Some(auth) = &self.auth {
            request.metadata_mut().insert("authorization", auth.clone());
        }
        request
    }

    /// `{instance}/` or nothing, the start of every resource name.
    fn prefix(&self) -> String {
        if self.instance.is_empty() {
            String::new()
        } else {
            format!("{}/", self.instance)
        }
    }

    fn cas(&self) -> ContentAddressableStorageClient<Channel> {
        let limit = MAX_BATCH as usize + MESSAGE_OVERHEAD;
        ContentAddressableStorageClient::new(self.channel.clone())
            .max_decoding_message_size(limit)
            .max_encoding_message_size(limit)
    }

    fn byte_stream(&self) -> ByteStreamClient<Channel> {
        ByteStreamClient::new(self.channel.clone())
            .max_decoding_message_size(CHUNK.max(MAX_BATCH as usize) + MESSAGE_OVERHEAD)
    }

    /// Blobs up to this size go in batch requests.
    async fn batch_limit(&self) -> Result<u64, RemoteError> {
        let known = self
            .capabilities
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone();
        let capabilities = match known {
            Some(capabilities) => capabilities,
            None => self.capabilities().await?,
        };
        Ok(capabilities.max_batch_bytes)
    }

    async fn batch_read(&self, blob: &Blob, sink: &mut Sink) -> Result<bool, RemoteError> {
        let response = self
            .cas()
            .batch_read_blobs(self.request(reapi::BatchReadBlobsRequest {
                instance_name: self.instance.clone(),
                digests: vec![to_reapi(blob)],
                acceptable_compressors: vec![],
                digest_function: SHA256,
            }))
            .await
            .map_err(|status| RemoteError::grpc("BatchReadBlobs", status))?
            .into_inner();
        let answer = response
            .responses
            .into_iter()
            .find(|r| r.digest.as_ref().and_then(|d| from_reapi(d).ok()).as_ref() == Some(blob))
            .ok_or(RemoteError::Protocol("BatchReadBlobs left out the blob"))?;
        match status_of(answer.status) {
            None => {
                sink.push(Bytes::from(answer.data)).await?;
                Ok(true)
            }
            Some(status) if status.code() == tonic::Code::NotFound => Ok(false),
            Some(status) => Err(RemoteError::BlobStatus {
                digest: blob.digest.clone(),
                status: Box::new(status),
            }),
        }
    }

    async fn stream_read(&self, blob: &Blob, sink: &mut Sink) -> Result<bool, RemoteError> {
        let resource_name = format!("{}blobs/{}/{}", self.prefix(), blob.digest.hex(), blob.size);
        let not_found = |status: &tonic::Status| status.code() == tonic::Code::NotFound;
        let mut stream = match self
            .byte_stream()
            .read(self.request(ReadRequest {
                resource_name,
                read_offset: 0,
                read_limit: 0,
            }))
            .await
        {
            Ok(response) => response.into_inner(),
            Err(status) if not_found(&status) => return Ok(false),
            Err(status) => return Err(RemoteError::grpc("ByteStream.Read", status)),
        };
        let mut first = true;
        loop {
            match stream.message().await {
                Ok(Some(message)) => sink.push(Bytes::from(message.data)).await?,
                Ok(None) => return Ok(true),
                // Servers answer a missing blob with an error in place of the first message.
                Err(status) if first && not_found(&status) => return Ok(false),
                Err(status) => return Err(RemoteError::grpc("ByteStream.Read", status)),
            }
            first = false;
        }
    }

    async fn batch_update(&self, blob: &Blob, data: Chunks) -> Result<(), RemoteError> {
        let data = data.collect(blob.size).await.map_err(RemoteError::Local)?;
        let response = self
            .cas()
            .batch_update_blobs(self.request(reapi::BatchUpdateBlobsRequest {
                instance_name: self.instance.clone(),
                requests: vec![batch_update_blobs_request::Request {
                    digest: Some(to_reapi(blob)),
                    data,
                    compressor: 0,
                }],
                digest_function: SHA256,
            }))
            .await
            .map_err(|status| RemoteError::grpc("BatchUpdateBlobs", status))?
            .into_inner();
        for answer in response.responses {
            if let Some(status) = status_of(answer.status) {
                return Err(RemoteError::BlobStatus {
                    digest: blob.digest.clone(),
                    status: Box::new(status),
                });
            }
        }
        Ok(())
    }

    /// ByteStream.Write: the first message names the resource, the last one finishes the
    /// write. A local read error ends the stream early, so the server never commits.
    async fn stream_write(&self, blob: &Blob, mut data: Chunks) -> Result<(), RemoteError> {
        let resource_name = format!(
            "{}uploads/{}/blobs/{}/{}",
            self.prefix(),
            uuid::Uuid::new_v4(),
            blob.digest.hex(),
            blob.size
        );
        let (tx, mut rx) = mpsc::channel::<WriteRequest>(2);
        let local_error = Arc::new(Mutex::new(None));
        let pump = {
            let local_error = Arc::clone(&local_error);
            async move {
                let mut offset = 0i64;
                let mut resource = Some(resource_name);
                // One chunk is held back so the last message can carry finish_write.
                let mut held: Option<Bytes> = None;
                let mut send = async |data: Bytes, finish: bool| {
                    let length = data.len() as i64;
                    let message = WriteRequest {
                        resource_name: resource.take().unwrap_or_default(),
                        write_offset: offset,
                        finish_write: finish,
                        data: data.into(),
                    };
                    offset += length;
                    tx.send(message).await.is_ok()
                };
                while let Some(chunk) = data.next().await {
                    match chunk {
                        Ok(chunk) => {
                            if let Some(previous) = held.replace(chunk)
                                && !send(previous, false).await
                            {
                                return;
                            }
                        }
                        Err(err) => {
                            *local_error.lock().unwrap_or_else(PoisonError::into_inner) = Some(err);
                            return;
                        }
                    }
                }
                send(held.unwrap_or_default(), true).await;
            }
        };
        let requests = futures_util::stream::poll_fn(move |cx| rx.poll_recv(cx));
        let mut client = self.byte_stream();
        let (_, written) = tokio::join!(pump, client.write(self.request(requests)));
        if let Some(err) = local_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            return Err(RemoteError::Local(err));
        }
        let committed = written
            .map_err(|status| RemoteError::grpc("ByteStream.Write", status))?
            .into_inner()
            .committed_size;
        if committed != blob.size as i64 {
            return Err(RemoteError::Protocol(
                "ByteStream.Write committed another size than the blob's",
            ));
        }
        Ok(())
    }
}

fn status_of(status: Option<bazel_remote_apis::google::rpc::Status>) -> Option<tonic::Status> {
    status
        .filter(|s| s.code != 0)
        .map(|s| tonic::Status::new(tonic::Code::from(s.code), s.message))
}

#[async_trait]
impl RemoteCache for GrpcCache {
    fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    async fn capabilities(&self) -> Result<Capabilities, RemoteError> {
        let response = CapabilitiesClient::new(self.channel.clone())
            .get_capabilities(self.request(reapi::GetCapabilitiesRequest {
                instance_name: self.instance.clone(),
            }))
            .await
            .map_err(|status| RemoteError::grpc("GetCapabilities", status))?
            .into_inner();
        let cache = response.cache_capabilities.unwrap_or_default();
        if !cache.digest_functions.contains(&SHA256) {
            return Err(RemoteError::NoSha256);
        }
        let max_batch_bytes = match u64::try_from(cache.max_batch_total_size_bytes) {
            Ok(0) | Err(_) => MAX_BATCH,
            Ok(limit) => limit.min(MAX_BATCH),
        };
        let capabilities = Capabilities {
            max_batch_bytes,
            action_updates: cache
                .action_cache_update_capabilities
                .is_some_and(|c| c.update_enabled),
        };
        *self
            .capabilities
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some(capabilities.clone());
        Ok(capabilities)
    }

    async fn get_action(&self, action: &Blob) -> Result<Option<reapi::ActionResult>, RemoteError> {
        let request = reapi::GetActionResultRequest {
            instance_name: self.instance.clone(),
            action_digest: Some(to_reapi(action)),
            digest_function: SHA256,
            ..Default::default()
        };
        match ActionCacheClient::new(self.channel.clone())
            .get_action_result(self.request(request))
            .await
        {
            Ok(response) => Ok(Some(response.into_inner())),
            Err(status) if status.code() == tonic::Code::NotFound => Ok(None),
            Err(status) => Err(RemoteError::grpc("GetActionResult", status)),
        }
    }

    async fn update_action(
        &self,
        action: &Blob,
        entry: &reapi::ActionResult,
    ) -> Result<(), RemoteError> {
        ActionCacheClient::new(self.channel.clone())
            .update_action_result(self.request(reapi::UpdateActionResultRequest {
                instance_name: self.instance.clone(),
                action_digest: Some(to_reapi(action)),
                action_result: Some(entry.clone()),
                results_cache_policy: None,
                digest_function: SHA256,
            }))
            .await
            .map_err(|status| RemoteError::grpc("UpdateActionResult", status))?;
        Ok(())
    }

    async fn find_missing(&self, blobs: &[Blob]) -> Result<Vec<Blob>, RemoteError> {
        let response = self
            .cas()
            .find_missing_blobs(self.request(reapi::FindMissingBlobsRequest {
                instance_name: self.instance.clone(),
                blob_digests: blobs.iter().map(to_reapi).collect(),
                digest_function: SHA256,
            }))
            .await
            .map_err(|status| RemoteError::grpc("FindMissingBlobs", status))?
            .into_inner();
        response
            .missing_blob_digests
            .iter()
            .map(|d| {
                from_reapi(d).map_err(|_| RemoteError::Protocol("a missing digest is not sha256"))
            })
            .collect()
    }

    async fn upload(&self, blob: &Blob, data: Chunks) -> Result<(), RemoteError> {
        if blob.size <= self.batch_limit().await? {
            self.batch_update(blob, data).await
        } else {
            self.stream_write(blob, data).await
        }
    }

    async fn download(&self, blob: &Blob, sink: &mut Sink) -> Result<bool, RemoteError> {
        if blob.size <= self.batch_limit().await? {
            self.batch_read(blob, sink).await
        } else {
            self.stream_read(blob, sink).await
        }
    }
}
