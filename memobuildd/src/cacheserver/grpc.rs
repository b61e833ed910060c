//! The REAPI v2 side: Capabilities, ActionCache, ContentAddressableStorage and ByteStream as
//! tonic services over the store. The main type is [`Reapi`], one value serving all four;
//! `listener` routes gRPC requests to it after authentication. Instance names are accepted
//! and ignored (one store serves every instance); only SHA-256 is served; blobs above the
//! batch limit go through ByteStream, streamed to and from disk.

use std::pin::Pin;
use std::sync::Arc;
use std::time::Instant;

use bazel_remote_apis::build::bazel::remote::execution::v2 as reapi;
use bazel_remote_apis::build::bazel::semver::SemVer;
use bazel_remote_apis::google::bytestream as bs;
use bazel_remote_apis::google::rpc;
use bytes::Bytes;
use futures_util::Stream;
use prost::Message as _;
use tonic::{Code, Request, Response, Status, Streaming};

use super::State;
use super::digest::{self, Digest, DigestError, Key, Kind};
use super::store::StoreError;

/// Capabilities' `max_batch_total_size_bytes`: what one BatchUpdate/BatchRead may carry (the
/// common 4 MiB, so clients tuned for other servers behave the same here).
pub const MAX_BATCH_BYTES: u64 = 4 << 20;
/// The largest gRPC message decoded: a full batch and its framing.
pub const MAX_MESSAGE_BYTES: usize = (MAX_BATCH_BYTES as usize) + (64 << 10);
/// Largest action result stored.
pub const MAX_ACTION_RESULT_BYTES: u64 = MAX_BATCH_BYTES;

/// Every REAPI service, over one [`State`].
#[derive(Debug, Clone)]
pub struct Reapi {
    state: Arc<State>,
}

type ResponseStream<T> = Pin<Box<dyn Stream<Item = Result<T, Status>> + Send + 'static>>;

impl Reapi {
    pub fn new(state: Arc<State>) -> Self {
        Self { state }
    }

    /// Records a finished call in the metrics.
    fn observe<T>(&self, kind: &'static str, started: Instant, result: &Result<T, Status>) {
        let code = match result {
            Ok(_) => Code::Ok,
            Err(status) => status.code(),
        };
        self.state
            .metrics
            .request(kind, code_name(code), started.elapsed());
    }
}

fn code_name(code: Code) -> &'static str {
    match code {
        Code::Ok => "OK",
        Code::Cancelled => "CANCELLED",
        Code::Unknown => "UNKNOWN",
        Code::InvalidArgument => "INVALID_ARGUMENT",
        Code::DeadlineExceeded => "DEADLINE_EXCEEDED",
        Code::NotFound => "NOT_FOUND",
        Code::AlreadyExists => "ALREADY_EXISTS",
        Code::PermissionDenied => "PERMISSION_DENIED",
        Code::ResourceExhausted => "RESOURCE_EXHAUSTED",
        Code::FailedPrecondition => "FAILED_PRECONDITION",
        Code::Aborted => "ABORTED",
        Code::OutOfRange => "OUT_OF_RANGE",
        Code::Unimplemented => "UNIMPLEMENTED",
        Code::Internal => "INTERNAL",
        Code::Unavailable => "UNAVAILABLE",
        Code::DataLoss => "DATA_LOSS",
        Code::Unauthenticated => "UNAUTHENTICATED",
    }
}

fn invalid(err: &DigestError) -> Status {
    Status::invalid_argument(err.to_string())
}

/// The one place store errors become gRPC codes.
pub fn store_status(err: &StoreError) -> Status {
    let code = match err {
        StoreError::NoSpace { .. } | StoreError::TooLarge { .. } => Code::ResourceExhausted,
        StoreError::Mismatch { .. } => Code::InvalidArgument,
        StoreError::Incomplete(_) => Code::Cancelled,
        StoreError::Io { .. } | StoreError::Index(_) | StoreError::Task(_) => Code::Internal,
    };
    Status::new(code, err.to_string())
}

fn rpc_status(status: &Status) -> rpc::Status {
    rpc::Status {
        code: status.code() as i32,
        message: status.message().to_owned(),
        details: Vec::new(),
    }
}

fn ok_status() -> Option<rpc::Status> {
    Some(rpc::Status::default())
}

/// Every blob an action result names.
fn named_blobs(result: &reapi::ActionResult) -> Vec<Digest> {
    let mut digests = Vec::new();
    let mut push = |d: Option<&reapi::Digest>| {
        if let Some(d) = d
            && let Ok(d) = Digest::from_proto(Some(d))
        {
            digests.push(d);
        }
    };
    for file in &result.output_files {
        push(file.digest.as_ref());
    }
    for dir in &result.output_directories {
        push(dir.tree_digest.as_ref());
        push(dir.root_directory_digest.as_ref());
    }
    push(result.stdout_digest.as_ref());
    push(result.stderr_digest.as_ref());
    digests
}

/// What the action cache holds under a key.
#[derive(Debug)]
pub enum AcEntry {
    /// An action result whose blobs are all present.
    Valid(Bytes, Box<reapi::ActionResult>),
    /// Bytes that are no ActionResult, stored by an HTTP client: served as they are over
    /// HTTP, a miss over gRPC.
    Opaque(Bytes),
    Miss,
}

impl State {
    /// Looks up an action result. One that names a blob no longer present is a miss, never
    /// an error; a hit refreshes the access times of the blobs it names, so they outlive it
    /// a while.
    pub async fn action_result(&self, hash: digest::Hash) -> Result<AcEntry, StoreError> {
        let key = Key::ac(hash);
        let Some(bytes) = self.store.get_bytes(key).await? else {
            self.metrics.lookups(Kind::Ac, 0, 1);
            return Ok(AcEntry::Miss);
        };
        let Ok(result) = reapi::ActionResult::decode(bytes.as_ref()) else {
            self.store.touch(&[(key, None)], true);
            self.metrics.lookups(Kind::Ac, 1, 0);
            return Ok(AcEntry::Opaque(bytes));
        };
        let blobs: Vec<(Key, Option<u64>)> = named_blobs(&result)
            .into_iter()
            .map(|d| (Key::cas(d.hash), Some(d.size)))
            .collect();
        let complete = self.store.touch(&blobs, false).iter().all(|p| *p);
        if !complete {
            tracing::debug!(%key, "action result names evicted blobs: a miss");
            self.metrics.lookups(Kind::Ac, 0, 1);
            return Ok(AcEntry::Miss);
        }
        self.store.touch(&[(key, None)], true);
        self.metrics.lookups(Kind::Ac, 1, 0);
        Ok(AcEntry::Valid(bytes, Box::new(result)))
    }
}

#[tonic::async_trait]
impl reapi::capabilities_server::Capabilities for Reapi {
    async fn get_capabilities(
        &self,
        _request: Request<reapi::GetCapabilitiesRequest>,
    ) -> Result<Response<reapi::ServerCapabilities>, Status> {
        let started = Instant::now();
        let version = |minor| SemVer {
            major: 2,
            minor,
            patch: 0,
            prerelease: String::new(),
        };
        let result = Ok(Response::new(reapi::ServerCapabilities {
            cache_capabilities: Some(reapi::CacheCapabilities {
                digest_functions: vec![reapi::digest_function::Value::Sha256 as i32],
                action_cache_update_capabilities: Some(reapi::ActionCacheUpdateCapabilities {
                    update_enabled: true,
                }),
                max_batch_total_size_bytes: MAX_BATCH_BYTES as i64,
                symlink_absolute_path_strategy:
                    reapi::symlink_absolute_path_strategy::Value::Allowed as i32,
                max_cas_blob_size_bytes: i64::try_from(self.state.store.max_size())
                    .unwrap_or(i64::MAX),
                ..reapi::CacheCapabilities::default()
            }),
            low_api_version: Some(version(0)),
            high_api_version: Some(version(3)),
            ..reapi::ServerCapabilities::default()
        }));
        self.observe("capabilities", started, &result);
        result
    }
}

#[tonic::async_trait]
impl reapi::action_cache_server::ActionCache for Reapi {
    async fn get_action_result(
        &self,
        request: Request<reapi::GetActionResultRequest>,
    ) -> Result<Response<reapi::ActionResult>, Status> {
        let started = Instant::now();
        let result = async {
            let request = request.into_inner();
            digest::check_function(request.digest_function).map_err(|e| invalid(&e))?;
            let action =
                Digest::from_proto(request.action_digest.as_ref()).map_err(|e| invalid(&e))?;
            match self.state.action_result(action.hash).await {
                Ok(AcEntry::Valid(bytes, result)) => {
                    self.state.metrics.sent(bytes.len() as u64);
                    Ok(Response::new(*result))
                }
                Ok(AcEntry::Opaque(_) | AcEntry::Miss) => {
                    Err(Status::not_found(format!("no action result for {action}")))
                }
                Err(err) => Err(store_status(&err)),
            }
        }
        .await;
        self.observe("get_action_result", started, &result);
        result
    }

    async fn update_action_result(
        &self,
        request: Request<reapi::UpdateActionResultRequest>,
    ) -> Result<Response<reapi::ActionResult>, Status> {
        let started = Instant::now();
        let result = async {
            let request = request.into_inner();
            digest::check_function(request.digest_function).map_err(|e| invalid(&e))?;
            let action =
                Digest::from_proto(request.action_digest.as_ref()).map_err(|e| invalid(&e))?;
            let result = request
                .action_result
                .ok_or_else(|| Status::invalid_argument("no action_result"))?;
            let bytes = Bytes::from(result.encode_to_vec());
            self.state.metrics.received(bytes.len() as u64);
            self.state
                .store
                .put_bytes(Key::ac(action.hash), None, MAX_ACTION_RESULT_BYTES, bytes)
                .await
                .map_err(|e| store_status(&e))?;
            Ok(Response::new(result))
        }
        .await;
        self.observe("update_action_result", started, &result);
        result
    }
}

#[tonic::async_trait]
impl reapi::content_addressable_storage_server::ContentAddressableStorage for Reapi {
    async fn find_missing_blobs(
        &self,
        request: Request<reapi::FindMissingBlobsRequest>,
    ) -> Result<Response<reapi::FindMissingBlobsResponse>, Status> {
        let started = Instant::now();
        let result = (|| {
            let request = request.into_inner();
            digest::check_function(request.digest_function).map_err(|e| invalid(&e))?;
            let digests = request
                .blob_digests
                .iter()
                .map(|d| Digest::from_proto(Some(d)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(&e))?;
            let keys: Vec<(Key, Option<u64>)> = digests
                .iter()
                .map(|d| (Key::cas(d.hash), Some(d.size)))
                .collect();
            let present = self.state.store.touch(&keys, false);
            let missing: Vec<reapi::Digest> = digests
                .iter()
                .zip(&present)
                .filter(|(_, p)| !**p)
                .map(|(d, _)| d.to_proto())
                .collect();
            let found = present.len() - missing.len();
            self.state
                .metrics
                .lookups(Kind::Cas, found as u64, missing.len() as u64);
            Ok(Response::new(reapi::FindMissingBlobsResponse {
                missing_blob_digests: missing,
            }))
        })();
        self.observe("find_missing_blobs", started, &result);
        result
    }

    async fn batch_update_blobs(
        &self,
        request: Request<reapi::BatchUpdateBlobsRequest>,
    ) -> Result<Response<reapi::BatchUpdateBlobsResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let request = request.into_inner();
            digest::check_function(request.digest_function).map_err(|e| invalid(&e))?;
            let total: u64 = request.requests.iter().map(|r| r.data.len() as u64).sum();
            if total > MAX_BATCH_BYTES {
                return Err(Status::invalid_argument(format!(
                    "batch of {total} bytes exceeds max_batch_total_size_bytes {MAX_BATCH_BYTES}"
                )));
            }
            self.state.metrics.received(total);
            let store = Arc::clone(&self.state.store);
            // One blocking task hashes and writes the whole batch.
            let responses = tokio::task::spawn_blocking(move || {
                request
                    .requests
                    .into_iter()
                    .map(|item| {
                        let status = if item.compressor != 0 {
                            Status::invalid_argument("compressed uploads are not served")
                        } else {
                            match Digest::from_proto(item.digest.as_ref()) {
                                Err(e) => invalid(&e),
                                Ok(d) => {
                                    match store.put(Key::cas(d.hash), Some(d), 0, &item.data) {
                                        Ok(_) => Status::ok(""),
                                        Err(e) => store_status(&e),
                                    }
                                }
                            }
                        };
                        reapi::batch_update_blobs_response::Response {
                            digest: item.digest,
                            status: Some(rpc_status(&status)),
                        }
                    })
                    .collect()
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
            Ok(Response::new(reapi::BatchUpdateBlobsResponse { responses }))
        }
        .await;
        self.observe("batch_update_blobs", started, &result);
        result
    }

    async fn batch_read_blobs(
        &self,
        request: Request<reapi::BatchReadBlobsRequest>,
    ) -> Result<Response<reapi::BatchReadBlobsResponse>, Status> {
        let started = Instant::now();
        let result = async {
            let request = request.into_inner();
            digest::check_function(request.digest_function).map_err(|e| invalid(&e))?;
            let digests = request
                .digests
                .iter()
                .map(|d| Digest::from_proto(Some(d)))
                .collect::<Result<Vec<_>, _>>()
                .map_err(|e| invalid(&e))?;
            let total: u64 = digests.iter().map(|d| d.size).sum();
            if total > MAX_BATCH_BYTES {
                return Err(Status::invalid_argument(format!(
                    "batch of {total} bytes exceeds max_batch_total_size_bytes {MAX_BATCH_BYTES}"
                )));
            }
            let keys: Vec<(Key, Option<u64>)> = digests
                .iter()
                .map(|d| (Key::cas(d.hash), Some(d.size)))
                .collect();
            let present = self.state.store.touch(&keys, true);
            let store = Arc::clone(&self.state.store);
            let read = tokio::task::spawn_blocking(move || {
                digests
                    .into_iter()
                    .zip(present)
                    .map(|(d, present)| {
                        let data = if present {
                            store.read(&Key::cas(d.hash))
                        } else {
                            Ok(None)
                        };
                        (d, data)
                    })
                    .collect::<Vec<_>>()
            })
            .await
            .map_err(|e| Status::internal(e.to_string()))?;
            let (mut hits, mut misses, mut sent) = (0, 0, 0);
            let responses = read
                .into_iter()
                .map(|(d, data)| {
                    let (data, status) = match data {
                        Ok(Some(data)) if data.len() as u64 == d.size => {
                            hits += 1;
                            sent += d.size;
                            (data, ok_status())
                        }
                        Ok(_) => {
                            misses += 1;
                            (
                                Vec::new(),
                                Some(rpc_status(&Status::not_found(format!("{d} is not stored")))),
                            )
                        }
                        Err(e) => (Vec::new(), Some(rpc_status(&store_status(&e)))),
                    };
                    reapi::batch_read_blobs_response::Response {
                        digest: Some(d.to_proto()),
                        data,
                        compressor: 0,
                        status,
                    }
                })
                .collect();
            self.state.metrics.lookups(Kind::Cas, hits, misses);
            self.state.metrics.sent(sent);
            Ok(Response::new(reapi::BatchReadBlobsResponse { responses }))
        }
        .await;
        self.observe("batch_read_blobs", started, &result);
        result
    }

    type GetTreeStream = ResponseStream<reapi::GetTreeResponse>;

    async fn get_tree(
        &self,
        _request: Request<reapi::GetTreeRequest>,
    ) -> Result<Response<Self::GetTreeStream>, Status> {
        Err(Status::unimplemented(
            "GetTree is not served: a cache for MemoBuild stores no Directory trees",
        ))
    }

    async fn split_blob(
        &self,
        _request: Request<reapi::SplitBlobRequest>,
    ) -> Result<Response<reapi::SplitBlobResponse>, Status> {
        Err(Status::unimplemented("split blobs are not served"))
    }

    type GetChunkMappingStream = ResponseStream<reapi::GetChunkMappingResponse>;

    async fn get_chunk_mapping(
        &self,
        _request: Request<reapi::GetChunkMappingRequest>,
    ) -> Result<Response<Self::GetChunkMappingStream>, Status> {
        Err(Status::unimplemented("chunk mappings are not served"))
    }

    async fn splice_blob(
        &self,
        _request: Request<reapi::SpliceBlobRequest>,
    ) -> Result<Response<reapi::SpliceBlobResponse>, Status> {
        Err(Status::unimplemented("spliced blobs are not served"))
    }

    async fn register_chunk_mapping(
        &self,
        _request: Request<Streaming<reapi::RegisterChunkMappingRequest>>,
    ) -> Result<Response<reapi::RegisterChunkMappingResponse>, Status> {
        Err(Status::unimplemented("chunk mappings are not served"))
    }
}

#[tonic::async_trait]
impl bs::byte_stream_server::ByteStream for Reapi {
    type ReadStream = ResponseStream<bs::ReadResponse>;

    async fn read(
        &self,
        request: Request<bs::ReadRequest>,
    ) -> Result<Response<Self::ReadStream>, Status> {
        let started = Instant::now();
        let result = async {
            let request = request.into_inner();
            let d = Digest::from_read_resource(&request.resource_name).map_err(|e| invalid(&e))?;
            let (Ok(offset), Ok(limit)) = (
                u64::try_from(request.read_offset),
                u64::try_from(request.read_limit),
            ) else {
                return Err(Status::out_of_range("negative read_offset or read_limit"));
            };
            if offset > d.size {
                return Err(Status::out_of_range(format!(
                    "read_offset {offset} is past the end of {d}"
                )));
            }
            let key = Key::cas(d.hash);
            if !self.state.store.touch(&[(key, Some(d.size))], true)[0] {
                self.state.metrics.lookups(Kind::Cas, 0, 1);
                return Err(Status::not_found(format!("{d} is not stored")));
            }
            if d.is_empty_blob() {
                self.state.metrics.lookups(Kind::Cas, 1, 0);
                let empty: Self::ReadStream = Box::pin(futures_util::stream::empty());
                return Ok(Response::new(empty));
            }
            let Some(read) = self
                .state
                .store
                .read_stream(key, offset, limit)
                .await
                .map_err(|e| store_status(&e))?
            else {
                self.state.metrics.lookups(Kind::Cas, 0, 1);
                return Err(Status::not_found(format!("{d} is not stored")));
            };
            self.state.metrics.lookups(Kind::Cas, 1, 0);
            let metrics = Arc::clone(&self.state.metrics);
            let stream = futures_util::stream::unfold(read.chunks, move |mut chunks| {
                let metrics = Arc::clone(&metrics);
                async move {
                    let chunk = chunks.recv().await?;
                    let item = match chunk {
                        Ok(data) => {
                            metrics.sent(data.len() as u64);
                            Ok(bs::ReadResponse { data: data.into() })
                        }
                        Err(e) => Err(store_status(&e)),
                    };
                    Some((item, chunks))
                }
            });
            let stream: Self::ReadStream = Box::pin(stream);
            Ok(Response::new(stream))
        }
        .await;
        self.observe("bytestream_read", started, &result);
        result
    }

    async fn write(
        &self,
        request: Request<Streaming<bs::WriteRequest>>,
    ) -> Result<Response<bs::WriteResponse>, Status> {
        let started = Instant::now();
        let result = self.write_stream(request.into_inner()).await;
        self.observe("bytestream_write", started, &result);
        result
    }

    async fn query_write_status(
        &self,
        request: Request<bs::QueryWriteStatusRequest>,
    ) -> Result<Response<bs::QueryWriteStatusResponse>, Status> {
        let started = Instant::now();
        let result = (|| {
            let request = request.into_inner();
            let d = Digest::from_write_resource(&request.resource_name).map_err(|e| invalid(&e))?;
            // Partial uploads are never kept, so a write is either complete or unknown.
            if self
                .state
                .store
                .touch(&[(Key::cas(d.hash), Some(d.size))], false)[0]
            {
                Ok(Response::new(bs::QueryWriteStatusResponse {
                    committed_size: i64::try_from(d.size).unwrap_or(i64::MAX),
                    complete: true,
                }))
            } else {
                Err(Status::not_found(format!("no write of {d} in progress")))
            }
        })();
        self.observe("query_write_status", started, &result);
        result
    }
}

impl Reapi {
    async fn write_stream(
        &self,
        mut stream: Streaming<bs::WriteRequest>,
    ) -> Result<Response<bs::WriteResponse>, Status> {
        let first = next_message(&mut stream)
            .await?
            .ok_or_else(|| Status::invalid_argument("empty write stream"))?;
        let d = Digest::from_write_resource(&first.resource_name).map_err(|e| invalid(&e))?;
        let done = |size: u64| {
            Ok(Response::new(bs::WriteResponse {
                committed_size: i64::try_from(size).unwrap_or(i64::MAX),
            }))
        };
        if first.write_offset != 0 {
            return Err(Status::invalid_argument(
                "write_offset must start at 0: partial uploads are not kept",
            ));
        }
        // Already stored: the spec lets the server end the upload at once.
        if self
            .state
            .store
            .touch(&[(Key::cas(d.hash), Some(d.size))], false)[0]
        {
            return done(d.size);
        }
        let mut upload = self.state.store.upload(Key::cas(d.hash), Some(d), 0);
        let mut offset = 0u64;
        let mut message = first;
        loop {
            if u64::try_from(message.write_offset).ok() != Some(offset) {
                return Err(Status::invalid_argument(format!(
                    "write_offset {} where {offset} was expected",
                    message.write_offset
                )));
            }
            if !message.resource_name.is_empty() && offset > 0 {
                let again =
                    Digest::from_write_resource(&message.resource_name).map_err(|e| invalid(&e))?;
                if again != d {
                    return Err(Status::invalid_argument("resource_name changed mid-write"));
                }
            }
            let len = message.data.len() as u64;
            if len > 0 {
                upload
                    .write(Bytes::from(message.data))
                    .await
                    .map_err(|e| store_status(&e))?;
                self.state.metrics.received(len);
                offset += len;
            }
            if message.finish_write {
                let size = upload.finish().await.map_err(|e| store_status(&e))?;
                return done(size);
            }
            // A stream that ends before finish_write drops `upload`: nothing is stored.
            message = next_message(&mut stream).await?.ok_or_else(|| {
                Status::invalid_argument("write stream ended before finish_write")
            })?;
        }
    }
}

/// The next message, waiting at most [`super::IDLE_TIMEOUT`] for it.
async fn next_message(
    stream: &mut Streaming<bs::WriteRequest>,
) -> Result<Option<bs::WriteRequest>, Status> {
    match tokio::time::timeout(super::IDLE_TIMEOUT, stream.message()).await {
        Ok(result) => result,
        Err(_) => Err(Status::deadline_exceeded("no data for too long")),
    }
}

/// The router's gRPC half: every service, with message size limits.
pub fn routes(state: &Arc<State>) -> tonic::service::Routes {
    let reapi = Reapi::new(Arc::clone(state));
    tonic::service::Routes::new(
        reapi::capabilities_server::CapabilitiesServer::new(reapi.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
    )
    .add_service(
        reapi::action_cache_server::ActionCacheServer::new(reapi.clone())
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
    )
    .add_service(
        reapi::content_addressable_storage_server::ContentAddressableStorageServer::new(
            reapi.clone(),
        )
        .max_decoding_message_size(MAX_MESSAGE_BYTES)
        .max_encoding_message_size(MAX_MESSAGE_BYTES),
    )
    .add_service(
        bs::byte_stream_server::ByteStreamServer::new(reapi)
            .max_decoding_message_size(MAX_MESSAGE_BYTES),
    )
}

/// Whether a gRPC method writes (needs a read-write token).
pub fn is_write(path: &str) -> bool {
    matches!(
        path,
        "/build.bazel.remote.execution.v2.ActionCache/UpdateActionResult"
            | "/build.bazel.remote.execution.v2.ContentAddressableStorage/BatchUpdateBlobs"
            | "/google.bytestream.ByteStream/Write"
    ) || path.starts_with("/build.bazel.remote.execution.v2.ContentAddressableStorage/Splice")
        || path.starts_with("/build.bazel.remote.execution.v2.ContentAddressableStorage/Register")
}
