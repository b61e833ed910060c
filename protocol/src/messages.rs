//! Every message that crosses the socket.
//!
//! postcard is not self-describing: a field added in the middle, or a reordered variant, reads
//! as garbage on the other side. So variants are only appended, and [`Hello`]/[`HelloReply`]
//! keep their layout forever so that even mismatched versions can say who they are.

use std::path::PathBuf;

use serde::{Deserialize, Serialize};

use crate::{MAGIC, PACKAGE_VERSION, PROTOCOL_VERSION};

/// The client's first frame. Frozen layout: never add fields.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub magic: [u8; 4],
    pub protocol_version: u32,
    pub client_version: String,
}

impl Hello {
    /// The hello this build of the client sends.
    pub fn current(client_version: &str) -> Self {
        Self {
            magic: MAGIC,
            protocol_version: PROTOCOL_VERSION,
            client_version: client_version.to_owned(),
        }
    }
}

/// The daemon's answer to [`Hello`]. Frozen layout: never add fields.
/// `refusal` is set when the daemon will not serve this connection (version mismatch,
/// permission); the daemon then closes it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloReply {
    pub protocol_version: u32,
    pub daemon_version: String,
    pub pid: u32,
    pub refusal: Option<ErrorReply>,
}

impl HelloReply {
    pub fn accepted(pid: u32) -> Self {
        Self {
            protocol_version: PROTOCOL_VERSION,
            daemon_version: PACKAGE_VERSION.to_owned(),
            pid,
            refusal: None,
        }
    }

    pub fn refused(pid: u32, code: ErrorCode, message: String) -> Self {
        Self {
            refusal: Some(ErrorReply { code, message }),
            ..Self::accepted(pid)
        }
    }
}

/// What an error is about, so a client can act on it without parsing text.
/// The server maps its internal errors to these in one place.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ErrorCode {
    /// The request (or a file it names: Dockerfile, context, config) is wrong.
    InvalidInput,
    NotFound,
    /// A dependency is down or missing (registry, runtime, remote cache).
    Unavailable,
    PermissionDenied,
    /// A bug or an unexpected failure in the daemon.
    Internal,
    /// The request is part of the protocol but this daemon does not serve it yet.
    NotImplemented,
    VersionMismatch,
    Cancelled,
    /// The request conflicts with the daemon's state (already exists, in use).
    Conflict,
    /// A limit was hit: disk full, frame too large, too many watches.
    ResourceExhausted,
    /// The build itself failed: a step exited non-zero or could not be carried out.
    Failed,
}

impl ErrorCode {
    pub fn as_str(self) -> &'static str {
        match self {
            Self::InvalidInput => "invalid-input",
            Self::NotFound => "not-found",
            Self::Unavailable => "unavailable",
            Self::PermissionDenied => "permission-denied",
            Self::Internal => "internal",
            Self::NotImplemented => "not-implemented",
            Self::VersionMismatch => "version-mismatch",
            Self::Cancelled => "cancelled",
            Self::Conflict => "conflict",
            Self::ResourceExhausted => "resource-exhausted",
            Self::Failed => "failed",
        }
    }
}

impl std::fmt::Display for ErrorCode {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, thiserror::Error)]
#[error("{message}")]
pub struct ErrorReply {
    pub code: ErrorCode,
    pub message: String,
}

/// One request per round; the daemon answers with [`Response`] frames until a terminal one.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Request {
    Status,
    Build(BuildRequest),
    Watch(WatchRequest),
    Unwatch(UnwatchRequest),
    /// Editor hook: these paths changed (absolute paths).
    Notify(NotifyRequest),
    Gc(GcRequest),
    Push(PushRequest),
    Images,
    CacheStats,
    /// Stop accepting connections, finish or cancel in-flight work, exit.
    Shutdown,
    Graph(GraphRequest),
    DumpDockerfile(DumpDockerfileRequest),
    /// Remove a tag from the image store (blobs are left to GC).
    RemoveImage(String),
    /// The log of a workspace's last prebuild.
    PrebuildLog(PrebuildLogRequest),
}

impl Request {
    /// Short name for logs and error messages.
    pub fn name(&self) -> &'static str {
        match self {
            Self::Status => "status",
            Self::Build(_) => "build",
            Self::Watch(_) => "watch",
            Self::Unwatch(_) => "unwatch",
            Self::Notify(_) => "notify",
            Self::Gc(_) => "gc",
            Self::Push(_) => "push",
            Self::Images => "images",
            Self::CacheStats => "cache-stats",
            Self::Shutdown => "shutdown",
            Self::Graph(_) => "graph",
            Self::DumpDockerfile(_) => "dump-dockerfile",
            Self::RemoveImage(_) => "rmi",
            Self::PrebuildLog(_) => "prebuild-log",
        }
    }
}

/// Where the Dockerfile is and how to read it. Shared by build, graph and watch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DockerfileSource {
    /// Absolute path of the build context directory.
    pub context: PathBuf,
    /// Absolute path of the Dockerfile; `None` means `<context>/Dockerfile`.
    pub dockerfile: Option<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildRequest {
    pub source: DockerfileSource,
    pub tags: Vec<String>,
    pub build_args: Vec<(String, String)>,
    pub target: Option<String>,
    pub no_cache: bool,
    /// Re-resolve base image tags even if a remembered digest is still fresh.
    pub pull: bool,
    pub network: NetworkMode,
    pub outputs: Vec<OutputSpec>,
    pub push: bool,
    /// Clamp timestamps for reproducible images (`SOURCE_DATE_EPOCH`).
    pub source_date_epoch: Option<u64>,
    /// `--secret`: read by the client, kept by the daemon only in memory and in the tmpfs of
    /// the steps that mount them.
    pub secrets: Vec<BuildSecret>,
    /// `--ssh`: SSH agent sockets `RUN --mount=type=ssh` forwards.
    pub ssh: Vec<SshAgent>,
    /// This build's use of the daemon's remote cache; `None`: the daemon's mode. A build can
    /// only narrow it (a read-only daemon never uploads).
    pub remote_cache: Option<RemoteCacheMode>,
}

/// One `--secret id=…`: its bytes. Its `Debug` shows the id and the length only.
#[derive(Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildSecret {
    pub id: String,
    pub value: Vec<u8>,
}

impl std::fmt::Debug for BuildSecret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "BuildSecret({:?}, {} bytes)", self.id, self.value.len())
    }
}

/// One `--ssh id=socket` (`default`: the client's `SSH_AUTH_SOCK`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct SshAgent {
    pub id: String,
    /// Absolute path of the agent's socket.
    pub socket: PathBuf,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum RemoteCacheMode {
    ReadWrite,
    ReadOnly,
    Off,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum NetworkMode {
    Host,
    None,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum OutputKind {
    /// OCI image layout, as a tar.
    Oci,
    /// An archive `docker load` accepts.
    Docker,
    /// The final root filesystem as one tar.
    Tar,
    /// The final root filesystem unpacked into a directory (streamed as a tar the client
    /// unpacks).
    Local,
    /// The daemon's image store, optionally pushed.
    Image,
}

/// What an output is made of. Where it goes is the client's business: every output but
/// `Image` streams back as [`Response::OutputChunk`]s ended by [`Response::OutputEnd`], in the
/// order of [`BuildRequest::outputs`], and the client writes it (`Local`: a tar it unpacks).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct OutputSpec {
    pub kind: OutputKind,
    pub name: Option<String>,
    pub push: bool,
    /// How layers are compressed in an OCI output or a push (gzip when `None`).
    pub compression: Option<LayerCompression>,
    /// Recompress layers already compressed in another format (buildx's
    /// `force-compression=true`).
    pub force_compression: bool,
}

/// A layer compression an output asks for (buildx's `compression=`, `compression-level=`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LayerCompression {
    Uncompressed,
    Gzip,
    /// `None`: zstd's default level.
    Zstd {
        level: Option<i32>,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WatchRequest {
    pub source: DockerfileSource,
    /// Turn prebuild on (`Some(true)`) or off for this workspace; `None` leaves it as it is.
    pub prebuild: Option<bool>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PrebuildLogRequest {
    /// Absolute path of the build context.
    pub context: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct UnwatchRequest {
    pub context: PathBuf,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyRequest {
    pub paths: Vec<PathBuf>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcRequest {
    /// Shrink the store to at most this many bytes; `None` uses the configured budget.
    pub keep_bytes: Option<u64>,
    pub dry_run: bool,
    /// Remove what was unused for longer than this; `None` uses the configured duration.
    pub keep_duration_secs: Option<u64>,
    /// Remove every cached step and base image that no tag and no running build holds.
    pub all: bool,
    /// Only cache mounts (`cache prune --filter type=exec.cachemount`).
    pub cache_mounts_only: bool,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushRequest {
    /// `NAME[:TAG]` of an image in the daemon's store.
    pub image: String,
    /// Push under another name than the stored one.
    pub destination: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphRequest {
    pub source: DockerfileSource,
    pub target: Option<String>,
    pub build_args: Vec<(String, String)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DumpDockerfileRequest {
    pub path: PathBuf,
}

/// Frames the daemon sends back.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Response {
    /// Terminal: the request failed.
    Error(ErrorReply),
    Status(StatusReport),
    /// Non-terminal: progress of a build.
    Event(BuildEvent),
    /// Non-terminal: bytes of the output being streamed.
    OutputChunk(#[serde(with = "byte_string")] Vec<u8>),
    BuildDone(BuildResult),
    Watched(WorkspaceStatus),
    Unwatched,
    Notified(NotifyReport),
    Gc(GcReport),
    Pushed(PushReport),
    Images(Vec<ImageSummary>),
    CacheStats(CacheStats),
    ShuttingDown,
    Graph(GraphView),
    Dockerfile(String),
    ImageRemoved,
    /// Non-terminal: one blob of a push moved on.
    PushProgress(PushProgress),
    /// Non-terminal: the output being streamed is complete, `bytes` long; the next chunks
    /// belong to the next streamed output.
    OutputEnd {
        bytes: u64,
    },
    /// Non-terminal: forget every output streamed so far; they all come again (the daemon
    /// found a damaged blob mid-output, repaired the store and builds again).
    OutputRestart,
    /// The last prebuild's log, one line each (step headers and output).
    PrebuildLog(Vec<String>),
}

/// Output bytes as one byte string: the same wire form as a sequence of `u8` (a length, then
/// the bytes), encoded and decoded as one copy instead of byte by byte, which is what lets an
/// output of gigabytes cross the socket at disk speed.
mod byte_string {
    use serde::{Deserializer, Serializer, de};

    pub(super) fn serialize<S: Serializer>(bytes: &[u8], serializer: S) -> Result<S::Ok, S::Error> {
        serializer.serialize_bytes(bytes)
    }

    pub(super) fn deserialize<'de, D: Deserializer<'de>>(
        deserializer: D,
    ) -> Result<Vec<u8>, D::Error> {
        deserializer.deserialize_byte_buf(Bytes)
    }

    struct Bytes;

    impl<'de> de::Visitor<'de> for Bytes {
        type Value = Vec<u8>;

        fn expecting(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
            f.write_str("bytes")
        }

        fn visit_bytes<E: de::Error>(self, bytes: &[u8]) -> Result<Vec<u8>, E> {
            Ok(bytes.to_vec())
        }

        fn visit_byte_buf<E: de::Error>(self, bytes: Vec<u8>) -> Result<Vec<u8>, E> {
            Ok(bytes)
        }
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushProgress {
    pub digest: String,
    pub state: PushState,
    /// Bytes sent so far (uploading) or the blob's size.
    pub sent: u64,
    pub total: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PushState {
    /// The registry has it already.
    Skipped,
    /// Mounted from this repository of the same registry.
    Mounted(String),
    Uploading,
    Done,
}

impl Response {
    /// Whether this frame ends the answer to a request.
    pub fn is_terminal(&self) -> bool {
        !matches!(
            self,
            Self::Event(_)
                | Self::OutputChunk(_)
                | Self::PushProgress(_)
                | Self::OutputEnd { .. }
                | Self::OutputRestart
        )
    }

    pub fn error(code: ErrorCode, message: impl Into<String>) -> Self {
        Self::Error(ErrorReply {
            code,
            message: message.into(),
        })
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StatusReport {
    pub daemon_version: String,
    pub protocol_version: u32,
    pub pid: u32,
    pub uid: u32,
    pub uptime_ms: u64,
    pub root: PathBuf,
    pub socket: PathBuf,
    /// The listening socket came from the service manager (systemd socket activation).
    pub socket_activated: bool,
    pub connections_active: u64,
    pub connections_total: u64,
    pub requests_total: u64,
    pub builds_active: u64,
    pub workspaces: Vec<WorkspaceStatus>,
    pub cache: CacheStats,
    /// The builds running now, oldest first.
    pub builds: Vec<RunningBuild>,
    /// The shared remote cache (L3), when one is configured.
    pub remote: Option<Box<RemoteCacheStatus>>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RemoteCacheStatus {
    /// The URL without credentials.
    pub endpoint: String,
    pub mode: RemoteCacheMode,
    /// `false` while repeated failures keep it skipped (builds are local-only meanwhile).
    pub healthy: bool,
    pub last_error: Option<String>,
    pub hits: u64,
    pub misses: u64,
    /// Entries ignored for a missing or wrong signature.
    pub bad_signatures: u64,
    /// Blobs that did not match their digest.
    pub corrupt_blobs: u64,
    pub errors: u64,
    pub bytes_down: u64,
    pub bytes_up: u64,
    /// Uploads waiting or running, and their bytes.
    pub upload_queue: u64,
    pub upload_queue_bytes: u64,
    pub uploads_done: u64,
    pub uploads_failed: u64,
    pub uploads_dropped: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct RunningBuild {
    pub context: PathBuf,
    pub dockerfile: PathBuf,
    /// The step executing (or waited for) now, e.g. `[build 2/5] RUN make`.
    pub step: Option<String>,
    pub steps_done: u64,
    pub steps_total: u64,
    pub elapsed_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct WorkspaceStatus {
    pub context: PathBuf,
    pub dockerfile: PathBuf,
    pub files: u64,
    pub bytes: u64,
    /// Milliseconds since the Unix epoch of the last change seen, if any.
    pub last_change_unix_ms: Option<u64>,
    /// The watcher is live; `false` means changes are found by scanning at build time.
    pub watching: bool,
    /// Why the watcher does not cover this workspace (watch limit, context gone), if so.
    pub degraded: Option<String>,
    /// Whether it was ever built; dirty marks compare with the last build.
    pub built: bool,
    /// Files whose content the last full scan had to read (the rest came from the stat cache).
    pub hashed_files: u64,
    pub dirty: Vec<DirtyNode>,
    /// Why the Dockerfile cannot be planned right now, if it cannot.
    pub error: Option<String>,
    pub prebuild: PrebuildStatus,
}

/// Where a workspace's prebuild stands.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum PrebuildStatus {
    Off,
    /// On, nothing to do: no change since the last build, or no build to repeat yet.
    Idle,
    /// A change is settling (debounce), or the prebuild waits for its turn.
    Waiting,
    Running {
        /// The step executing now, e.g. `[stage-0 2/3] RUN make`.
        step: Option<String>,
        steps_done: u64,
        steps_total: u64,
    },
    Ready {
        /// Manifest digest of the prebuilt image.
        digest: String,
        finished_unix_ms: u64,
    },
    Failed {
        /// The step that failed, if a step did.
        step: Option<String>,
        exit_code: Option<i32>,
        message: String,
        /// The last lines of the prebuild's log.
        log_tail: Vec<String>,
        finished_unix_ms: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DirtyNode {
    /// The node's instruction as the user wrote it, e.g. `COPY src/ /app/src/`.
    pub node: String,
    /// Context-relative path whose change made it dirty (the node upstream, if inherited).
    pub cause: String,
}

#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct CacheStats {
    pub l1_entries: u64,
    pub l1_bytes: u64,
    pub l2_blobs: u64,
    /// Bytes on disk of the blobs.
    pub l2_bytes: u64,
    /// `gc_keep_bytes`: automatic GC keeps [`CacheStats::total_bytes`] under it.
    pub l2_budget_bytes: u64,
    pub action_entries: u64,
    pub hits: u64,
    pub misses: u64,
    /// Unpacked layers (RUN's lower directories) and their bytes on disk.
    pub unpacked_layers: u64,
    pub unpacked_bytes: u64,
    /// The SQLite index, with its WAL.
    pub index_bytes: u64,
    /// The directories holding blobs and layers, and what GC removed that is still being
    /// deleted.
    pub other_bytes: u64,
    pub tags: u64,
    /// Builds, pushes and exports holding parts of the store now.
    pub leases: u64,
    /// Everything under the root that GC manages.
    pub total_bytes: u64,
    /// `gc_keep_duration`, if set.
    pub keep_duration_secs: Option<u64>,
    pub last_gc: Option<GcSummary>,
    /// A pass runs, or what it removed is still being deleted.
    pub gc_running: bool,
    /// `RUN --mount=type=cache` directories kept across builds, and their bytes on disk.
    pub cache_mounts: u64,
    pub cache_mount_bytes: u64,
}

/// The last GC pass.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcSummary {
    pub finished_unix: u64,
    /// What started it: `start`, `over-budget`, `disk-full`, `interval`, `manual`.
    pub trigger: String,
    pub report: GcReport,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildEvent {
    /// Build-local node number, stable for one build (BuildKit's `#N`).
    pub node: u32,
    pub kind: BuildEventKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum BuildEventKind {
    Queued {
        /// e.g. `[build 2/5] RUN make`.
        name: String,
    },
    Cached,
    Started,
    Log {
        stream: LogStream,
        line: Vec<u8>,
    },
    Done {
        duration_ms: u64,
    },
    Failed {
        message: String,
    },
    /// Why a started step runs: which of its inputs changed since the previous build of the
    /// same workspace and target (`src/main.js changed`, `build-arg V changed`, `--no-cache`).
    Reason {
        reason: String,
    },
    /// Something the user should know that does not fail the build (node 0: the build's,
    /// e.g. the remote cache is unreachable and the build goes on local-only).
    Warning {
        message: String,
    },
    /// The step's result came from a prebuild: finished `ago_ms` before this build needed it,
    /// or (`joined`) still running then, and this build waited for it.
    Prebuilt {
        ago_ms: u64,
        joined: bool,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum LogStream {
    Stdout,
    Stderr,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BuildResult {
    /// Manifest digest of the built image (`sha256:…`).
    pub image_digest: Option<String>,
    pub steps: u64,
    pub cached: u64,
    pub executed: u64,
    pub duration_ms: u64,
    /// Config digest of the built image: its image id, as Docker names images.
    pub config_digest: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct NotifyReport {
    /// Paths that belong to a watched workspace.
    pub matched: u64,
    /// Graph nodes newly marked dirty by these paths.
    pub dirtied: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GcReport {
    pub removed_blobs: u64,
    pub freed_bytes: u64,
    pub kept_bytes: u64,
    pub removed_actions: u64,
    pub removed_bases: u64,
    pub removed_layers: u64,
    pub dry_run: bool,
    /// `false`: the pass stopped at its time limit; the next one goes on.
    pub complete: bool,
    pub duration_ms: u64,
    pub removed_cache_mounts: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct PushReport {
    pub reference: String,
    pub digest: String,
    pub blobs_uploaded: u64,
    pub blobs_skipped: u64,
    pub bytes_uploaded: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct ImageSummary {
    pub name: String,
    pub digest: String,
    pub size: u64,
    pub created_unix: u64,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphView {
    pub stages: Vec<StageView>,
    pub nodes: Vec<GraphNodeView>,
    /// `(from, to)`: `to` depends on `from`.
    pub edges: Vec<(u32, u32)>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct StageView {
    pub index: u32,
    pub name: Option<String>,
    pub base: String,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct GraphNodeView {
    pub id: u32,
    /// base-image, context-source, filesystem, metadata, stage, export.
    pub kind: String,
    pub stage: Option<u32>,
    pub label: String,
    /// Dockerfile line of the instruction, when the node comes from one.
    pub line: Option<u32>,
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The handshake must stay readable by every future version: pin its bytes.
    #[test]
    fn hello_layout_is_frozen() {
        let bytes = postcard::to_stdvec(&Hello {
            magic: MAGIC,
            protocol_version: 1,
            client_version: "0.1.0".into(),
        })
        .expect("encode");
        assert_eq!(bytes, b"MBLD\x01\x050.1.0");
    }

    /// Output chunks are byte strings: a length and the bytes, as a `Vec<u8>` always was.
    #[test]
    fn output_chunks_are_a_length_and_the_bytes() {
        let chunk = Response::OutputChunk(vec![7; 200]);
        let bytes = postcard::to_stdvec(&chunk).expect("encode");
        let as_sequence = postcard::to_stdvec(&(3u8, vec![7u8; 200])).expect("encode");
        assert_eq!(bytes, as_sequence);
        assert_eq!(
            postcard::from_bytes::<Response>(&bytes).expect("decode"),
            chunk
        );
    }

    #[test]
    fn only_events_and_chunks_are_non_terminal() {
        assert!(!Response::OutputChunk(vec![1]).is_terminal());
        assert!(!Response::OutputEnd { bytes: 1 }.is_terminal());
        assert!(!Response::OutputRestart.is_terminal());
        assert!(
            !Response::Event(BuildEvent {
                node: 1,
                kind: BuildEventKind::Started
            })
            .is_terminal()
        );
        assert!(Response::Unwatched.is_terminal());
        assert!(Response::error(ErrorCode::Internal, "x").is_terminal());
    }
}
