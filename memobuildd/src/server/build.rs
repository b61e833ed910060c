//! The `Build` request: run the engine, stream its progress to the client as it happens,
//! stream the outputs for the client to write, answer with the result. A client that goes away cancels its build
//! (containers killed, mounts and scratch directories removed by the engine's guards).

use std::collections::{BTreeMap, HashMap};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::Instant;

use memobuild_protocol::{
    BuildEvent, BuildEventKind, BuildRequest, BuildResult, ErrorCode, FrameError, ImageSummary,
    LayerCompression, LogStream, OutputKind, OutputSpec, PushProgress, PushState, Response,
    write_frame,
};
use tokio::io::AsyncReadExt;
use tokio::net::UnixStream;
use tokio::sync::mpsc;

use super::Shared;
use super::events::{self, Events};
use super::requests::DockerfileText;
use crate::caller::Caller;
use crate::engine::{
    BuildError, BuildSpec, Built, Engine, ImageForm, Progress, PushError, StepError, normalize_tag,
};
use crate::exec::{self, Network};
use crate::export::{self, Chunks, Format};
use crate::image::Compression;
use crate::image::compress::ZSTD_DEFAULT_LEVEL;
use crate::image::oci::MediaTypes;
use crate::registry::{PushEvent, RegistryError};
use crate::store::{ImageRecord, Store, blocking};
use crate::watch::BuildRecipe;

/// The builds in progress, as `status` lists them.
#[derive(Debug, Default)]
pub(crate) struct RunningBuilds {
    next_id: AtomicU64,
    builds: std::sync::Mutex<BTreeMap<u64, Running>>,
}

#[derive(Debug)]
struct Running {
    context: PathBuf,
    dockerfile: PathBuf,
    started: Instant,
    /// Step names by node, from the build's `Queued` events.
    names: HashMap<u32, String>,
    current: Option<u32>,
    done: u64,
}

/// Keeps a build listed while it lives.
struct Listed<'a> {
    builds: &'a RunningBuilds,
    id: u64,
}

impl Drop for Listed<'_> {
    fn drop(&mut self) {
        self.builds.lock().remove(&self.id);
    }
}

impl RunningBuilds {
    fn lock(&self) -> std::sync::MutexGuard<'_, BTreeMap<u64, Running>> {
        self.builds
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    fn start(&self, context: &Path, dockerfile: &Path) -> Listed<'_> {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        self.lock().insert(
            id,
            Running {
                context: context.to_owned(),
                dockerfile: dockerfile.to_owned(),
                started: Instant::now(),
                names: HashMap::new(),
                current: None,
                done: 0,
            },
        );
        Listed { builds: self, id }
    }

    fn observe(&self, id: u64, event: &Progress) {
        let mut builds = self.lock();
        let Some(build) = builds.get_mut(&id) else {
            return;
        };
        match event {
            Progress::Queued { node, name } => {
                build.names.insert(*node, name.clone());
            }
            Progress::Started { node } => build.current = Some(*node),
            Progress::Cached { node } | Progress::Done { node, .. } => {
                if build.names.contains_key(node) {
                    build.done += 1;
                }
                if build.current == Some(*node) {
                    build.current = None;
                }
            }
            Progress::Log { .. }
            | Progress::Failed { .. }
            | Progress::Reason { .. }
            | Progress::Warning { .. }
            | Progress::Prebuilt { .. } => {}
        }
    }

    pub(crate) fn list(&self) -> Vec<memobuild_protocol::RunningBuild> {
        self.lock()
            .values()
            .map(|build| memobuild_protocol::RunningBuild {
                context: build.context.clone(),
                dockerfile: build.dockerfile.clone(),
                step: build
                    .current
                    .and_then(|node| build.names.get(&node).cloned()),
                steps_done: build.done,
                steps_total: build.names.len() as u64,
                elapsed_ms: u64::try_from(build.started.elapsed().as_millis()).unwrap_or(u64::MAX),
            })
            .collect()
    }
}

/// Serves one build on `stream`: events, then output chunks, then the final answer.
pub(crate) async fn serve(
    stream: &mut UnixStream,
    shared: &Shared,
    request: BuildRequest,
    caller: &Caller,
) -> Result<(), FrameError> {
    let (engine, hub) = (&shared.engine, &shared.hub);
    let keep_watching = shared.config.watch_built_contexts;
    let dockerfile = match DockerfileText::read(&request.source, caller) {
        Ok(dockerfile) => dockerfile,
        Err(err) => return write_frame(stream, &err.into_response()).await,
    };
    if pushes(&request).any(|names| names.is_empty()) {
        let refusal = Response::error(
            ErrorCode::InvalidInput,
            "--push needs a name to push to: give -t NAME (or -o type=image,name=NAME,push=true)",
        );
        return write_frame(stream, &refusal).await;
    }
    let spec = BuildSpec {
        context: dockerfile.context.clone(),
        dockerfile: dockerfile.path.clone(),
        dockerfile_text: dockerfile.text.clone(),
        build_args: request.build_args.clone(),
        target: request.target.clone(),
        no_cache: request.no_cache,
        pull: request.pull,
        network: match request.network {
            memobuild_protocol::NetworkMode::Host => Network::Host,
            memobuild_protocol::NetworkMode::None => Network::None,
        },
        source_date_epoch: request.source_date_epoch.map(|s| s as i64),
        secrets: crate::engine::Secrets::new(
            request
                .secrets
                .iter()
                .map(|s| (s.id.clone(), s.value.clone())),
        ),
        ssh: request
            .ssh
            .iter()
            .map(|a| (a.id.clone(), a.socket.clone()))
            .collect(),
        remote_cache: request.remote_cache.map(super::remote_mode),
        caller: (!caller.is_unrestricted()).then(|| caller.clone()),
        background: false,
    };
    if let Some(denied) = request
        .ssh
        .iter()
        .find_map(|a| caller.may_connect(&a.socket).err())
    {
        return write_frame(
            stream,
            &super::requests::HandlerError::from(denied).into_response(),
        )
        .await;
    }
    // Every change made before this request must be in the fingerprints it uses.
    hub.sync(&dockerfile.context).await;
    let was_watched = hub.is_watched(&dockerfile.context);
    let mut attempts = 0;
    loop {
        attempts += 1;
        let outcome = stream_build(stream, shared, &dockerfile, spec.clone()).await;
        if !was_watched && !keep_watching {
            let _ = hub.unwatch(&dockerfile.context);
        }
        let Some(outcome) = outcome else {
            tokio::task::spawn_blocking(release_freed_memory);
            // Gone or stalled mid-frame: nothing more can be said on this connection.
            return Err(FrameError::Io(std::io::ErrorKind::BrokenPipe.into()));
        };
        let built = match outcome {
            Ok(built) => built,
            Err(err) => {
                tokio::task::spawn_blocking(release_freed_memory);
                return write_frame(stream, &Response::error(code(&err), err.to_string())).await;
            }
        };
        // What this build read is the new baseline: the workspace is clean again, but for
        // edits made after the build took its snapshot. The request is what a prebuild of
        // the workspace repeats.
        let (hub, context, baseline) = (
            Arc::clone(hub),
            dockerfile.context.clone(),
            built.baseline.clone(),
        );
        let recipe = recipe(&request, &dockerfile.path, caller);
        let _ = tokio::task::spawn_blocking(move || {
            if let Some(baseline) = &baseline {
                hub.mark_built(&context, baseline);
            }
            hub.remember_build(&context, &recipe);
        })
        .await;
        match write_outputs(engine, &built, &request, stream).await {
            Ok(()) => {
                if let Err(refusal) = push_outputs(engine, &request).await {
                    return write_frame(stream, &refusal).await;
                }
            }
            // The store found a blob of this image damaged while writing an output, and
            // repaired it (removed it and the steps that made it): building again makes it
            // anew, and the client drops what it received of the outputs. Once: a second
            // failure is not damage that a rebuild mends.
            Err(message) if attempts == 1 && built.lease.saw_damage() => {
                tracing::warn!(%message, "an output found a damaged blob; building again");
                write_frame(stream, &Response::OutputRestart).await?;
                continue;
            }
            Err(message) => {
                return write_frame(stream, &Response::error(ErrorCode::Internal, message)).await;
            }
        }
        return finish(stream, engine, built).await;
    }
}

/// Runs one build, streaming its events (and listing it in `status` while it runs); `None`
/// when the client went away or stopped reading (the build was cancelled).
async fn stream_build(
    stream: &mut UnixStream,
    shared: &Shared,
    dockerfile: &DockerfileText,
    spec: BuildSpec,
) -> Option<Result<Built, BuildError>> {
    let (sender, events) = Events::new(events::LOG_BYTES);
    let cancel = Arc::new(AtomicBool::new(false));
    let listed = shared.builds.start(&dockerfile.context, &dockerfile.path);
    let build = tokio::spawn({
        let engine = Arc::clone(&shared.engine);
        let cancel = Arc::clone(&cancel);
        async move { engine.build(spec, Arc::new(sender), cancel).await }
    });

    let stall = shared.config.client_stall;
    let (mut reader, mut writer) = stream.split();
    let mut client_gone = false;
    let mut probe = [0u8; 1];
    loop {
        tokio::select! {
            event = events.next() => match event {
                Some(event) => {
                    shared.builds.observe(listed.id, &event);
                    if client_gone {
                        continue;
                    }
                    let frame = Response::Event(event_frame(event));
                    match tokio::time::timeout(stall, write_frame(&mut writer, &frame)).await {
                        Ok(Ok(())) => {}
                        Ok(Err(_)) => client_gone = true,
                        Err(_) => {
                            tracing::warn!(
                                "the client read none of its build's events for {stall:?}; \
                                 disconnecting it and cancelling its build"
                            );
                            client_gone = true;
                        }
                    }
                    if client_gone {
                        cancel.store(true, Ordering::Relaxed);
                    }
                }
                // The engine dropped the reporter: the build is over.
                None => break,
            },
            // The client sends nothing during a build; readable means it closed (or broke the
            // protocol): either way the build is cancelled, unless it already finished.
            read = reader.read(&mut probe), if !client_gone => {
                if !matches!(read, Ok(n) if n > 0) {
                    tracing::info!("client went away; cancelling its build");
                }
                client_gone = true;
                cancel.store(true, Ordering::Relaxed);
            }
        }
    }
    let outcome = build.await.unwrap_or_else(|err| Err(BuildError::Task(err)));
    (!client_gone).then_some(outcome)
}

/// Answers a finished build and lets the store check its budget.
async fn finish(
    stream: &mut UnixStream,
    engine: &Arc<Engine>,
    built: Built,
) -> Result<(), FrameError> {
    let result = BuildResult {
        image_digest: Some(built.image.manifest.digest.to_string()),
        steps: built.steps,
        cached: built.cached,
        executed: built.executed,
        duration_ms: built.duration.as_millis() as u64,
        config_digest: Some(built.image.config.digest.to_string()),
    };
    // A build leaves freed memory in the allocator's per-thread arenas; a resident daemon
    // gives it back, once outputs are written too. After executed steps it does so before
    // answering (measured on 1 GB COPY edits: 28–67 MB right after a build without this,
    // 26–28 MB with it); a build that executed nothing answers first, in milliseconds.
    let executed = built.executed;
    // The lease goes with `built`: what it held is GC's again, so the budget is checked now.
    drop(built);
    engine.store().check_budget();
    let released = tokio::task::spawn_blocking(release_freed_memory);
    if executed > 0 {
        let _ = released.await;
    }
    write_frame(stream, &Response::BuildDone(result)).await
}

#[cfg(all(target_os = "linux", target_env = "gnu"))]
fn release_freed_memory() {
    // SAFETY: malloc_trim has no preconditions; it only returns unused heap pages to the OS.
    #[expect(unsafe_code, reason = "glibc's malloc_trim has no safe wrapper")]
    unsafe {
        libc::malloc_trim(0);
    }
}

#[cfg(not(all(target_os = "linux", target_env = "gnu")))]
fn release_freed_memory() {}

fn event_frame(event: Progress) -> BuildEvent {
    let (node, kind) = match event {
        Progress::Queued { node, name } => (node, BuildEventKind::Queued { name }),
        Progress::Cached { node } => (node, BuildEventKind::Cached),
        Progress::Started { node } => (node, BuildEventKind::Started),
        Progress::Log { node, stream, line } => (
            node,
            BuildEventKind::Log {
                stream: match stream {
                    exec::LogStream::Stdout => LogStream::Stdout,
                    exec::LogStream::Stderr => LogStream::Stderr,
                },
                line,
            },
        ),
        Progress::Done { node, duration } => (
            node,
            BuildEventKind::Done {
                duration_ms: duration.as_millis() as u64,
            },
        ),
        Progress::Failed { node, message } => (node, BuildEventKind::Failed { message }),
        Progress::Reason { node, reason } => (node, BuildEventKind::Reason { reason }),
        Progress::Warning { message } => (0, BuildEventKind::Warning { message }),
        Progress::Prebuilt { node, ago, joined } => (
            node,
            BuildEventKind::Prebuilt {
                ago_ms: u64::try_from(ago.as_millis()).unwrap_or(u64::MAX),
                joined,
            },
        ),
    };
    BuildEvent { node, kind }
}

/// The one place build errors become protocol codes.
fn code(err: &BuildError) -> ErrorCode {
    match err {
        BuildError::Dockerfile(_) | BuildError::Plan(_) => ErrorCode::InvalidInput,
        BuildError::Registry { source, .. } => registry_code(source),
        BuildError::BaseImage { .. } | BuildError::Invariant(_) | BuildError::Task(_) => {
            ErrorCode::Internal
        }
        BuildError::Full(_) | BuildError::OutOfSpace { .. } => ErrorCode::ResourceExhausted,
        BuildError::Step { source, .. } | BuildError::Failed(source) => step_code(source),
        BuildError::RunFailed { .. } => ErrorCode::Failed,
        BuildError::NoRuntime(_) => ErrorCode::Unavailable,
        BuildError::Context(err) => super::requests::watch_code(err),
        BuildError::Access(_) => ErrorCode::PermissionDenied,
        BuildError::Cancelled => ErrorCode::Cancelled,
        BuildError::Shared(err) => code(err),
    }
}

/// A step's failure: the user's mistake, the caller's permissions, or the step itself.
fn step_code(err: &StepError) -> ErrorCode {
    use crate::engine::add::AddError;
    use crate::engine::copy::CopyError;
    match err {
        StepError::Copy(CopyError::Access(_)) | StepError::Add(AddError::Access(_)) => {
            ErrorCode::PermissionDenied
        }
        StepError::Copy(
            CopyError::NotInContext(_)
            | CopyError::NotInImage(_)
            | CopyError::DanglingLink { .. }
            | CopyError::Pattern { .. },
        )
        | StepError::Add(
            AddError::UnsupportedRemote { .. }
            | AddError::BadChecksum(_)
            | AddError::ChecksumForLocal(_)
            | AddError::ChecksumMismatch { .. },
        )
        | StepError::User(_)
        | StepError::Ignore(_) => ErrorCode::InvalidInput,
        _ => ErrorCode::Failed,
    }
}

fn registry_code(err: &RegistryError) -> ErrorCode {
    match err {
        RegistryError::Unauthorized { .. } | RegistryError::Forbidden { .. } => {
            ErrorCode::PermissionDenied
        }
        RegistryError::NotFound { .. } | RegistryError::NoMatchingPlatform { .. } => {
            ErrorCode::NotFound
        }
        RegistryError::Reference(_) => ErrorCode::InvalidInput,
        _ => ErrorCode::Unavailable,
    }
}

async fn write_outputs(
    engine: &Arc<Engine>,
    built: &Built,
    request: &BuildRequest,
    stream: &mut UnixStream,
) -> Result<(), String> {
    let outputs: Vec<OutputSpec> = if request.outputs.is_empty() {
        vec![OutputSpec {
            kind: OutputKind::Image,
            name: None,
            push: request.push,
            compression: None,
            force_compression: false,
        }]
    } else {
        request.outputs.clone()
    };
    for output in outputs {
        let format = match output.kind {
            OutputKind::Oci => Format::Oci(ImageForm {
                compression: compression(&output),
                force: output.force_compression,
                media: MediaTypes::Oci,
            }),
            OutputKind::Docker => Format::Docker,
            OutputKind::Tar | OutputKind::Local => Format::RootfsTar,
            OutputKind::Image => {
                let names: Vec<String> = request
                    .tags
                    .iter()
                    .cloned()
                    .chain(output.name.clone())
                    .collect();
                let (engine_for_tag, built_for_tag) = (Arc::clone(engine), built.clone());
                blocking(move || tag(&engine_for_tag, &built_for_tag, &names)).await?;
                continue;
            }
        };
        stream_output(stream, engine, built, format, &request.tags).await?;
    }
    Ok(())
}

/// Streams one output to the client while the exporter writes it (on a blocking thread,
/// a few chunks ahead), then says where it ends. The client writes it; the daemon keeps
/// nothing of it. A client that goes away stops the exporter at its next chunk.
async fn stream_output(
    stream: &mut UnixStream,
    engine: &Engine,
    built: &Built,
    format: Format,
    tags: &[String],
) -> Result<(), String> {
    let (chunks, mut received) = mpsc::channel(4);
    let (built, tags, scratch) = (built.clone(), tags.to_vec(), engine.store().tmp_dir());
    let exporter = tokio::task::spawn_blocking(move || {
        export::write(
            &built.lease,
            &built.image,
            format,
            &tags,
            &scratch,
            Chunks::new(chunks),
        )
    });
    let mut bytes = 0u64;
    let mut sent = Ok(());
    while let Some(chunk) = received.recv().await {
        bytes += chunk.len() as u64;
        sent = write_frame(stream, &Response::OutputChunk(chunk)).await;
        if sent.is_err() {
            break;
        }
    }
    drop(received);
    let exported = exporter
        .await
        .map_err(|e| format!("output task failed: {e}"))?;
    sent.map_err(|e| format!("sending the output: {e}"))?;
    exported.map_err(|e| e.to_string())?;
    write_frame(stream, &Response::OutputEnd { bytes })
        .await
        .map_err(|e| format!("sending the output: {e}"))
}

/// The pushes a build request asks for (`--push`, `type=image,push=true`): for each, the
/// names it pushes and the layer compression.
fn pushes(request: &BuildRequest) -> impl Iterator<Item = Vec<String>> + '_ {
    let default = request.outputs.is_empty() && request.push;
    let asked = request
        .outputs
        .iter()
        .filter(|o| o.kind == OutputKind::Image && o.push)
        .map(|o| o.name.clone());
    default
        .then_some(None)
        .into_iter()
        .chain(asked)
        .map(|name| request.tags.iter().cloned().chain(name).collect())
}

/// Pushes what the request asks to push, once the image is tagged. A failure answers with
/// its own kind: an auth failure is a permission error, an unknown registry unavailable.
async fn push_outputs(engine: &Arc<Engine>, request: &BuildRequest) -> Result<(), Response> {
    let compressions = request
        .outputs
        .iter()
        .filter(|o| o.kind == OutputKind::Image && o.push)
        .map(|o| (compression(o), o.force_compression))
        .chain(std::iter::repeat((Compression::Gzip, false)));
    for (names, (compression, force)) in pushes(request).zip(compressions) {
        for name in names {
            if let Err(err) = engine.push(&name, None, compression, force, &|_| {}).await {
                return Err(Response::error(
                    push_code(&err),
                    format!("pushing {name}: {err}"),
                ));
            }
        }
    }
    Ok(())
}

/// What a prebuild of this workspace repeats: this request, without outputs and push.
fn recipe(request: &BuildRequest, dockerfile: &Path, caller: &Caller) -> BuildRecipe {
    BuildRecipe {
        dockerfile: dockerfile.to_owned(),
        build_args: request.build_args.clone(),
        target: request.target.clone(),
        tags: request.tags.clone(),
        host_network: request.network == memobuild_protocol::NetworkMode::Host,
        source_date_epoch: request.source_date_epoch.map(|s| s as i64),
        uid: caller.uid,
        gid: caller.gid,
    }
}

/// Tags the image under every name; each tag pins what the build used. Blocking.
pub(super) fn tag(engine: &Engine, built: &Built, names: &[String]) -> Result<(), String> {
    let created_unix = std::time::SystemTime::now()
        .duration_since(std::time::UNIX_EPOCH)
        .map_or(0, |d| d.as_secs());
    for name in names {
        engine
            .store()
            .tag(
                &built.lease,
                &ImageRecord {
                    name: normalize_tag(name),
                    manifest: built.image.manifest.clone(),
                    config: built.image.config.digest.clone(),
                    created_unix,
                },
            )
            .map_err(|e| e.to_string())?;
    }
    Ok(())
}

/// The layer compression an output asks for (gzip by default, as Docker and buildx).
fn compression(output: &OutputSpec) -> Compression {
    match output.compression {
        None | Some(LayerCompression::Gzip) => Compression::Gzip,
        Some(LayerCompression::Uncompressed) => Compression::Uncompressed,
        Some(LayerCompression::Zstd { level }) => Compression::Zstd {
            level: level.unwrap_or(ZSTD_DEFAULT_LEVEL),
        },
    }
}

/// The image store as `memobuild images` lists it.
pub(crate) async fn images(engine: &Engine) -> Response {
    let store = engine.store().clone();
    let listed = blocking(move || {
        store.images().map(|images| {
            images
                .into_iter()
                .map(|image| ImageSummary {
                    size: image_size(&store, &image),
                    name: image.name,
                    digest: image.manifest.digest.to_string(),
                    created_unix: image.created_unix,
                })
                .collect()
        })
    })
    .await;
    match listed {
        Ok(images) => Response::Images(images),
        Err(err) => Response::error(ErrorCode::Internal, err.to_string()),
    }
}

/// Config plus layers, from the stored manifest.
fn image_size(store: &Store, image: &ImageRecord) -> u64 {
    store
        .cas()
        .read(&image.manifest.digest)
        .ok()
        .and_then(|bytes| crate::image::oci::Manifest::parse(&bytes).ok())
        .map_or(0, |m| {
            m.config.size + m.layers.iter().map(|l| l.size).sum::<u64>()
        })
}

/// `memobuild push`: progress per blob as it happens, then the report.
pub(crate) async fn push(
    stream: &mut UnixStream,
    engine: &Arc<Engine>,
    request: memobuild_protocol::PushRequest,
) -> Result<(), FrameError> {
    let (events, mut received) = mpsc::unbounded_channel();
    let task = tokio::spawn({
        let engine = Arc::clone(engine);
        let request = request.clone();
        async move {
            let report = move |event| {
                let _ = events.send(event);
            };
            engine
                .push(
                    &request.image,
                    request.destination.as_deref(),
                    Compression::Gzip,
                    false,
                    &report,
                )
                .await
        }
    });
    while let Some(event) = received.recv().await {
        write_frame(stream, &Response::PushProgress(push_progress(event))).await?;
    }
    let pushed = task.await.unwrap_or_else(|err| Err(PushError::Task(err)));
    let reply = match pushed {
        Ok(report) => Response::Pushed(memobuild_protocol::PushReport {
            reference: request
                .destination
                .unwrap_or_else(|| normalize_tag(&request.image)),
            digest: report.digest.to_string(),
            blobs_uploaded: report.blobs_uploaded as u64,
            blobs_skipped: (report.blobs_skipped + report.blobs_mounted) as u64,
            bytes_uploaded: report.bytes_uploaded,
        }),
        Err(err) => Response::error(push_code(&err), err.to_string()),
    };
    write_frame(stream, &reply).await
}

fn push_progress(event: PushEvent) -> PushProgress {
    let (digest, state, sent, total) = match event {
        PushEvent::Skipped { digest, size } => (digest, PushState::Skipped, size, size),
        PushEvent::Mounted { digest, from } => (digest, PushState::Mounted(from), 0, 0),
        PushEvent::Uploading {
            digest,
            sent,
            total,
        } => (digest, PushState::Uploading, sent, total),
        PushEvent::Done { digest, size } => (digest, PushState::Done, size, size),
    };
    PushProgress {
        digest: digest.to_string(),
        state,
        sent,
        total,
    }
}

fn push_code(err: &PushError) -> ErrorCode {
    match err {
        PushError::NoSuchImage(_) => ErrorCode::NotFound,
        PushError::Reference(_) => ErrorCode::InvalidInput,
        PushError::Registry(source) => registry_code(source),
        PushError::Store(_) | PushError::Image(_) | PushError::Task(_) => ErrorCode::Internal,
    }
}

/// `memobuild rmi`: the tag goes; its blobs stay until GC.
pub(crate) async fn remove_image(engine: &Engine, name: &str) -> Response {
    let (store, tag) = (engine.store().clone(), normalize_tag(name));
    match blocking(move || store.untag(&tag)).await {
        Ok(true) => Response::ImageRemoved,
        Ok(false) => Response::error(
            ErrorCode::NotFound,
            format!("no image {} in the store", normalize_tag(name)),
        ),
        Err(err) => Response::error(ErrorCode::Internal, err.to_string()),
    }
}
