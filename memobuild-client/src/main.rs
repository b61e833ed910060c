//! `memobuild`: parse the command line, talk to the daemon, print, exit with a documented code.

use std::io::IsTerminal;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Parser, Subcommand};
use memobuild_client::output::{Dest, Outputs};
use memobuild_client::progress::{Progress, ProgressMode};
use memobuild_client::{
    ClientError, ConnectError, Connection, DaemonPlace, Exit, RequestError, connect_or_start,
    daemon_place, launch, render,
};
use memobuild_protocol::{
    BuildRequest, BuildResult, BuildSecret, DockerfileSource, DumpDockerfileRequest, GcRequest,
    GraphRequest, LayerCompression, NetworkMode, NotifyRequest, OutputKind, OutputSpec,
    PACKAGE_VERSION, PROTOCOL_VERSION, PrebuildLogRequest, PushRequest, RemoteCacheMode, Request,
    Response, SshAgent, UnwatchRequest, WatchRequest,
};
use serde_json::json;
use tokio::signal::unix::SignalKind;

/// Incremental container image builds, served by a resident daemon.
#[derive(Debug, Parser)]
#[command(name = "memobuild", version, disable_help_subcommand = true)]
struct Cli {
    /// Daemon socket [default: per user; see the README]
    #[arg(long, global = true, env = "MEMOBUILD_SOCKET", value_name = "PATH")]
    socket: Option<PathBuf>,
    /// State root of a daemon this command starts
    #[arg(long, global = true, env = "MEMOBUILD_ROOT", value_name = "DIR")]
    root: Option<PathBuf>,
    #[command(subcommand)]
    command: Command,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Print client and daemon versions (does not start a daemon)
    Version {
        #[arg(long)]
        json: bool,
    },
    /// Show what the daemon is doing (starts it if needed)
    Status {
        #[arg(long)]
        json: bool,
    },
    /// Manage the daemon's life
    Daemon {
        #[command(subcommand)]
        action: DaemonAction,
    },
    /// Print a Dockerfile's build graph: stages, nodes and what each needs
    Graph {
        #[command(flatten)]
        source: SourceArgs,
        /// Build only what this stage needs
        #[arg(long)]
        target: Option<String>,
        /// Set a build-time variable (repeatable)
        #[arg(long = "build-arg", value_name = "KEY=VALUE", value_parser = parse_key_value)]
        build_args: Vec<(String, String)>,
        #[arg(long, value_enum, default_value_t = GraphFormat::Text)]
        format: GraphFormat,
    },
    /// Watch a workspace: keep its fingerprints hot and mark changed steps dirty as you edit
    Watch {
        #[command(flatten)]
        source: SourceArgs,
        /// Prebuild on save: after a change settles, repeat the workspace's last build
        /// (its Dockerfile, build args, target and tags; never outputs or a push)
        #[arg(long, conflicts_with = "no_prebuild")]
        prebuild: bool,
        /// Turn prebuild off for this workspace
        #[arg(long)]
        no_prebuild: bool,
        #[arg(long)]
        json: bool,
    },
    /// Print a log kept by the daemon
    Logs {
        /// The last prebuild's log of the workspace
        #[arg(long, required = true)]
        prebuild: bool,
        /// Build context directory
        #[arg(default_value = ".")]
        context: PathBuf,
    },
    /// Stop watching a workspace
    Unwatch {
        /// Build context directory
        #[arg(default_value = ".")]
        context: PathBuf,
    },
    /// Tell the daemon these paths changed (editor save hooks; filesystems inotify misses)
    Notify {
        #[arg(required = true)]
        paths: Vec<PathBuf>,
        #[arg(long)]
        json: bool,
    },
    /// Build an image from a Dockerfile (buildx's flags and meanings)
    Build(Box<BuildArgs>),
    /// List the images in the daemon's store
    Images {
        #[arg(long)]
        json: bool,
    },
    /// Push an image from the daemon's store to its registry
    Push {
        /// NAME[:TAG] in the store
        image: String,
        /// Push under another reference (REGISTRY/REPO[:TAG])
        #[arg(long = "as", value_name = "REFERENCE")]
        destination: Option<String>,
        #[arg(long)]
        json: bool,
    },
    /// Remove an image's tag from the store (its blobs are left to GC)
    Rmi { image: String },
    /// Collect garbage in the store: LRU within the budget, never what a tag or a running
    /// build holds; prints what it freed
    Gc {
        /// Shrink the store to at most this (e.g. 10GB) [default: gc_keep_bytes]
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        keep_bytes: Option<u64>,
        /// Also remove what was unused for longer than this (e.g. 24h, 7d)
        /// [default: gc_keep_duration]
        #[arg(long, value_name = "DURATION", value_parser = parse_duration)]
        keep_duration: Option<u64>,
        /// Remove every cached step and base image no tag and no running build holds
        #[arg(long)]
        all: bool,
        /// Say what would be removed, remove nothing
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
    /// The build cache: its figures, and pruning (buildx's vocabulary)
    Cache {
        #[command(subcommand)]
        action: CacheAction,
    },
    /// Tools for looking inside
    Debug {
        #[command(subcommand)]
        action: DebugAction,
    },
}

/// Where the build context and the Dockerfile are (paths resolved here, sent absolute).
#[derive(Debug, clap::Args)]
struct SourceArgs {
    /// Build context directory
    #[arg(default_value = ".")]
    context: PathBuf,
    /// Dockerfile [default: CONTEXT/Dockerfile]
    #[arg(short = 'f', long = "file", value_name = "FILE")]
    dockerfile: Option<PathBuf>,
}

impl SourceArgs {
    fn resolve(&self) -> DockerfileSource {
        DockerfileSource {
            context: absolute(&self.context),
            dockerfile: self.dockerfile.as_deref().map(absolute),
        }
    }
}

#[derive(Debug, clap::Args)]
struct BuildArgs {
    #[command(flatten)]
    source: SourceArgs,
    /// Name and optionally tag the image (`name:tag`); repeatable
    #[arg(short = 't', long = "tag", value_name = "NAME")]
    tags: Vec<String>,
    /// Set a build-time variable (repeatable)
    #[arg(long = "build-arg", value_name = "KEY=VALUE", value_parser = parse_key_value)]
    build_args: Vec<(String, String)>,
    /// Build only what this stage needs
    #[arg(long)]
    target: Option<String>,
    /// Run every step, ignoring cached results
    #[arg(long)]
    no_cache: bool,
    /// Ask the registry again for base image tags, even if resolved recently
    #[arg(long)]
    pull: bool,
    /// Network for RUN steps
    #[arg(long, value_enum, default_value_t = NetworkArg::Host)]
    network: NetworkArg,
    /// Progress output
    #[arg(long, value_enum, default_value_t = ProgressMode::Auto)]
    progress: ProgressMode,
    /// After the build, print each step's outcome: cached, or why it ran
    #[arg(long)]
    explain: bool,
    /// Output: type=oci|docker|tar|local|image,dest=PATH (`dest=-` for stdout; `tar=false`: an
    /// OCI or Docker layout as a directory); `PATH` alone is type=local, `-` alone a tar on
    /// stdout. This process writes it, as you, relative to the working directory
    #[arg(short = 'o', long = "output", value_name = "SPEC", value_parser = parse_output)]
    outputs: Vec<OutputArg>,
    /// Clamp timestamps for reproducible images [env: SOURCE_DATE_EPOCH]
    #[arg(long, env = "SOURCE_DATE_EPOCH", value_name = "SECONDS")]
    source_date_epoch: Option<u64>,
    /// Push the image to its registry after building
    #[arg(long)]
    push: bool,
    /// A secret for RUN --mount=type=secret: id=ID[,src=FILE|,env=VAR] (repeatable); read
    /// here, never stored by the daemon
    #[arg(long = "secret", value_name = "SPEC", value_parser = parse_secret)]
    secrets: Vec<BuildSecret>,
    /// An SSH agent for RUN --mount=type=ssh: `default` ($SSH_AUTH_SOCK) or ID=SOCKET
    /// (repeatable)
    #[arg(long = "ssh", value_name = "SPEC", value_parser = parse_ssh)]
    ssh: Vec<SshAgent>,
    /// Write the image id (its config digest) to this file
    #[arg(long, value_name = "FILE")]
    iidfile: Option<PathBuf>,
    /// Write buildx's build metadata (containerimage.digest, image.name, ...) as JSON here
    #[arg(long, value_name = "FILE")]
    metadata_file: Option<PathBuf>,
    /// No progress; print the image id on stdout when done
    #[arg(short, long)]
    quiet: bool,
    /// Target platform; only the host's can be built (no emulation yet)
    #[arg(long, value_name = "PLATFORM", value_parser = parse_platform)]
    platform: Option<String>,
    /// This build's use of the daemon's remote cache: off, read-only, or read-write (the
    /// daemon's mode, which a build can only narrow)
    #[arg(long, value_enum, value_name = "MODE")]
    remote_cache: Option<RemoteCacheArg>,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum RemoteCacheArg {
    Off,
    ReadOnly,
    ReadWrite,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum NetworkArg {
    Host,
    None,
}

#[derive(Debug, Clone, Copy, clap::ValueEnum)]
enum GraphFormat {
    Text,
    Dot,
    Json,
}

#[derive(Debug, Subcommand)]
enum CacheAction {
    /// Counts and bytes per kind, the budget, the hit rate and the last GC
    Stats {
        #[arg(long)]
        json: bool,
    },
    /// Remove build cache no tag and no running build holds: all of it, or as filtered
    Prune {
        /// `until=DURATION`: only what was unused for longer (e.g. until=24h);
        /// `type=exec.cachemount`: only RUN --mount=type=cache directories
        #[arg(long, value_name = "FILTER", value_parser = parse_prune_filter)]
        filter: Vec<PruneFilter>,
        /// Keep this much, removing the least recently used first (e.g. 10GB)
        #[arg(long, value_name = "SIZE", value_parser = parse_size)]
        keep_storage: Option<u64>,
        /// Accepted for buildx compatibility: pruning never asks
        #[arg(short, long)]
        force: bool,
        /// Say what would be removed, remove nothing
        #[arg(long)]
        dry_run: bool,
        #[arg(long)]
        json: bool,
    },
}

#[derive(Debug, Subcommand)]
enum DebugAction {
    /// Print the parse of a Dockerfile in BuildKit's parser dump format
    DumpDockerfile { file: PathBuf },
}

#[derive(Debug, Subcommand)]
enum DaemonAction {
    /// Start the daemon unless one is running
    Start,
    /// Stop the daemon and wait until it is gone
    Stop,
    /// Stop the daemon (if any) and start a new one, e.g. after an upgrade
    Restart,
    /// Is a daemon running? Exit code 0 if so, 3 if not
    Status {
        #[arg(long)]
        json: bool,
    },
}

fn main() -> ExitCode {
    restore_sigpipe();
    let cli = Cli::parse();
    let runtime = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(runtime) => runtime,
        Err(err) => {
            eprintln!("memobuild: cannot start the async runtime: {err}");
            return ExitCode::from(Exit::Failure as u8);
        }
    };
    let place = daemon_place(cli.socket.as_deref(), cli.root.as_deref());
    match runtime.block_on(run(cli.command, &place)) {
        Ok(exit) => ExitCode::from(exit as u8),
        Err(err) => {
            eprintln!("memobuild: {err}");
            if let Some(hint) = err.hint() {
                eprintln!("{hint}");
            }
            ExitCode::from(err.exit() as u8)
        }
    }
}

async fn run(command: Command, place: &DaemonPlace) -> Result<Exit, ClientError> {
    match command {
        Command::Version { json } => version(place, json).await,
        Command::Status { json } => {
            let mut conn = connect_or_start(place).await?;
            let Response::Status(report) = conn.call(&Request::Status).await? else {
                return Err(unexpected("status"));
            };
            if json {
                print_json(&report);
            } else {
                print!("{}", render::status(&report));
            }
            Ok(Exit::Success)
        }
        Command::Daemon { action } => daemon(action, place).await,
        Command::Graph {
            source,
            target,
            build_args,
            format,
        } => {
            let request = Request::Graph(GraphRequest {
                source: source.resolve(),
                target,
                build_args,
            });
            let mut conn = connect_or_start(place).await?;
            let Response::Graph(view) = conn.call(&request).await? else {
                return Err(unexpected("graph"));
            };
            match format {
                GraphFormat::Text => print!("{}", render::graph_text(&view)),
                GraphFormat::Dot => print!("{}", render::graph_dot(&view)),
                GraphFormat::Json => print_json(&view),
            }
            Ok(Exit::Success)
        }
        Command::Watch {
            source,
            prebuild,
            no_prebuild,
            json,
        } => {
            let request = Request::Watch(WatchRequest {
                source: source.resolve(),
                prebuild: match (prebuild, no_prebuild) {
                    (true, _) => Some(true),
                    (_, true) => Some(false),
                    _ => None,
                },
            });
            let mut conn = connect_or_start(place).await?;
            let Response::Watched(workspace) = conn.call(&request).await? else {
                return Err(unexpected("watch"));
            };
            if json {
                print_json(&workspace);
            } else {
                print!("watching\n{}", render::workspace(&workspace));
            }
            Ok(Exit::Success)
        }
        Command::Unwatch { context } => {
            let request = Request::Unwatch(UnwatchRequest {
                context: absolute(&context),
            });
            let mut conn = connect_or_start(place).await?;
            conn.call(&request).await?;
            println!("no longer watching {}", absolute(&context).display());
            Ok(Exit::Success)
        }
        Command::Logs {
            prebuild: _,
            context,
        } => {
            let request = Request::PrebuildLog(PrebuildLogRequest {
                context: absolute(&context),
            });
            let mut conn = connect_or_start(place).await?;
            let Response::PrebuildLog(lines) = conn.call(&request).await? else {
                return Err(unexpected("logs"));
            };
            for line in lines {
                println!("{line}");
            }
            Ok(Exit::Success)
        }
        Command::Notify { paths, json } => {
            let request = Request::Notify(NotifyRequest {
                paths: paths.iter().map(|p| absolute(p)).collect(),
            });
            let mut conn = connect_or_start(place).await?;
            let Response::Notified(report) = conn.call(&request).await? else {
                return Err(unexpected("notify"));
            };
            if json {
                print_json(&report);
            } else {
                println!(
                    "{} path(s) in watched workspaces; {} step(s) newly dirty",
                    report.matched, report.dirtied
                );
            }
            Ok(Exit::Success)
        }
        Command::Build(args) => build(*args, place).await,
        Command::Push {
            image,
            destination,
            json,
        } => {
            let mut conn = connect_or_start(place).await?;
            conn.send(&Request::Push(PushRequest { image, destination }))
                .await?;
            let report = loop {
                match conn.next().await? {
                    Response::PushProgress(progress) if !json => {
                        eprintln!("{}", render::push_progress(&progress));
                    }
                    Response::PushProgress(_) => {}
                    Response::Pushed(report) => break report,
                    _ => return Err(unexpected("push")),
                }
            };
            if json {
                print_json(&report);
            } else {
                println!(
                    "pushed {}@{}: {} blob(s) uploaded ({}), {} already there",
                    report.reference,
                    report.digest,
                    report.blobs_uploaded,
                    render::bytes(report.bytes_uploaded),
                    report.blobs_skipped
                );
            }
            Ok(Exit::Success)
        }
        Command::Rmi { image } => {
            let mut conn = connect_or_start(place).await?;
            conn.call(&Request::RemoveImage(image.clone())).await?;
            println!("untagged {image}");
            Ok(Exit::Success)
        }
        Command::Gc {
            keep_bytes,
            keep_duration,
            all,
            dry_run,
            json,
        } => {
            let request = GcRequest {
                keep_bytes,
                dry_run,
                keep_duration_secs: keep_duration,
                all,
                cache_mounts_only: false,
            };
            gc(place, request, json).await
        }
        Command::Cache {
            action: CacheAction::Stats { json },
        } => {
            let mut conn = connect_or_start(place).await?;
            let Response::CacheStats(stats) = conn.call(&Request::CacheStats).await? else {
                return Err(unexpected("cache-stats"));
            };
            if json {
                print_json(&stats);
            } else {
                print!("{}", render::cache_stats(&stats));
            }
            Ok(Exit::Success)
        }
        Command::Cache {
            action:
                CacheAction::Prune {
                    filter,
                    keep_storage,
                    force: _,
                    dry_run,
                    json,
                },
        } => {
            // As `buildx prune`: without a filter or a size, everything unused goes; with
            // `until`, only what is older, whatever the size.
            let until = filter
                .iter()
                .filter_map(|f| match f {
                    PruneFilter::Until(secs) => Some(*secs),
                    PruneFilter::CacheMounts => None,
                })
                .min();
            let request = GcRequest {
                keep_bytes: Some(keep_storage.unwrap_or(if until.is_some() {
                    u64::MAX
                } else {
                    0
                })),
                dry_run,
                keep_duration_secs: until,
                all: until.is_none() && keep_storage.is_none(),
                cache_mounts_only: filter.contains(&PruneFilter::CacheMounts),
            };
            gc(place, request, json).await
        }
        Command::Images { json } => {
            let mut conn = connect_or_start(place).await?;
            let Response::Images(images) = conn.call(&Request::Images).await? else {
                return Err(unexpected("images"));
            };
            if json {
                print_json(&images);
            } else {
                println!("{:<40} {:<20} {:>10}  CREATED", "NAME", "DIGEST", "SIZE");
                for image in images {
                    let short = image
                        .digest
                        .trim_start_matches("sha256:")
                        .get(..12)
                        .unwrap_or("");
                    println!(
                        "{:<40} {:<20} {:>10}  {}",
                        image.name,
                        format!("sha256:{short}"),
                        render::bytes(image.size),
                        image.created_unix
                    );
                }
            }
            Ok(Exit::Success)
        }
        Command::Debug {
            action: DebugAction::DumpDockerfile { file },
        } => {
            let request = Request::DumpDockerfile(DumpDockerfileRequest {
                path: absolute(&file),
            });
            let mut conn = connect_or_start(place).await?;
            let Response::Dockerfile(dump) = conn.call(&request).await? else {
                return Err(unexpected("dump-dockerfile"));
            };
            println!("{dump}");
            Ok(Exit::Success)
        }
    }
}

async fn gc(place: &DaemonPlace, request: GcRequest, json: bool) -> Result<Exit, ClientError> {
    let mut conn = connect_or_start(place).await?;
    let Response::Gc(report) = conn.call(&Request::Gc(request)).await? else {
        return Err(unexpected("gc"));
    };
    if json {
        print_json(&report);
    } else {
        print!("{}", render::gc_report(&report));
    }
    Ok(Exit::Success)
}

async fn build(args: BuildArgs, place: &DaemonPlace) -> Result<Exit, ClientError> {
    // Every destination is opened before the build starts: one the caller cannot write
    // fails now, and creates nothing.
    let dests = args.outputs.iter().filter_map(|o| o.dest.clone()).collect();
    let mut outputs = Outputs::open(dests)?;
    let request = Request::Build(BuildRequest {
        source: args.source.resolve(),
        tags: args.tags.clone(),
        build_args: args.build_args,
        target: args.target,
        no_cache: args.no_cache,
        pull: args.pull,
        network: match args.network {
            NetworkArg::Host => NetworkMode::Host,
            NetworkArg::None => NetworkMode::None,
        },
        outputs: args.outputs.into_iter().map(|o| o.spec).collect(),
        push: args.push,
        source_date_epoch: args.source_date_epoch,
        secrets: args.secrets,
        ssh: args.ssh,
        remote_cache: args.remote_cache.map(|mode| match mode {
            RemoteCacheArg::Off => RemoteCacheMode::Off,
            RemoteCacheArg::ReadOnly => RemoteCacheMode::ReadOnly,
            RemoteCacheArg::ReadWrite => RemoteCacheMode::ReadWrite,
        }),
    });
    let mut conn = connect_or_start(place).await?;
    conn.send(&request).await?;
    let mode = if args.quiet {
        ProgressMode::Quiet
    } else {
        args.progress.resolve(std::io::stderr().is_terminal())
    };
    let mut progress = Progress::new(mode, std::io::stderr());
    let mut terminate = signal(SignalKind::terminate())?;
    let mut hangup = signal(SignalKind::hangup())?;
    loop {
        let frame = tokio::select! {
            frame = conn.next() => frame?,
            // Dropping the connection is the cancel request: the daemon stops the build.
            // Outputs not yet whole are removed as `outputs` goes.
            _ = tokio::signal::ctrl_c() => {
                // The TTY view lets go of the screen first, so the notice is not drawn over.
                drop(progress);
                eprintln!("memobuild: cancelling the build");
                return Ok(Exit::Cancelled);
            }
            _ = terminate.recv() => return Ok(Exit::Cancelled),
            _ = hangup.recv() => return Ok(Exit::Cancelled),
        };
        match frame {
            Response::Event(event) => progress.event(&event),
            Response::OutputChunk(bytes) => outputs.chunk(bytes)?,
            Response::OutputEnd { bytes } => outputs.end(bytes)?,
            Response::OutputRestart => outputs.restart()?,
            Response::BuildDone(result) => {
                outputs.finish()?;
                progress.finished(&result);
                if args.explain {
                    eprint!("{}", progress.explanation());
                }
                write_build_files(&args.iidfile, &args.metadata_file, &args.tags, &result)?;
                if let (true, Some(id)) = (args.quiet, &result.config_digest) {
                    println!("{id}");
                }
                return Ok(Exit::Success);
            }
            _ => return Err(unexpected("build")),
        }
    }
}

/// `--iidfile` (the image id, as `docker build` writes it) and `--metadata-file` (buildx's
/// keys).
fn write_build_files(
    iidfile: &Option<PathBuf>,
    metadata_file: &Option<PathBuf>,
    tags: &[String],
    result: &BuildResult,
) -> Result<(), ClientError> {
    let write = |path: &PathBuf, text: String| {
        std::fs::write(path, text).map_err(|source| ClientError::Write {
            path: path.clone(),
            source,
        })
    };
    if let Some(path) = iidfile {
        write(path, result.config_digest.clone().unwrap_or_default())?;
    }
    if let Some(path) = metadata_file {
        let mut metadata = serde_json::Map::new();
        if let Some(digest) = &result.image_digest {
            metadata.insert("containerimage.digest".into(), json!(digest));
        }
        if let Some(config) = &result.config_digest {
            metadata.insert("containerimage.config.digest".into(), json!(config));
        }
        if !tags.is_empty() {
            metadata.insert("image.name".into(), json!(tags.join(",")));
        }
        let text = serde_json::to_string_pretty(&metadata).unwrap_or_default();
        write(path, text + "\n")?;
    }
    Ok(())
}

/// `--platform`: the host's platform (`linux/amd64`, also with its variant), or `local`.
fn parse_platform(text: &str) -> Result<String, String> {
    let arch = match std::env::consts::ARCH {
        "x86_64" => "amd64",
        "aarch64" => "arm64",
        "x86" => "386",
        other => other,
    };
    let host = format!("{}/{arch}", std::env::consts::OS);
    let wanted: Vec<&str> = text.split(',').map(str::trim).collect();
    let is_host = |p: &&str| {
        *p == "local" || *p == host || p.strip_prefix(&*host).is_some_and(|v| v.starts_with('/'))
    };
    match wanted.iter().find(|p| !is_host(p)) {
        None => Ok(host),
        Some(other) => Err(format!(
            "{other}: only the host platform ({host}) can be built; other platforms need emulation, which is not supported yet"
        )),
    }
}

/// One `-o`: what the daemon makes, and where this process puts it (`None`: the image store).
#[derive(Debug, Clone)]
struct OutputArg {
    spec: OutputSpec,
    dest: Option<Dest>,
}

fn signal(kind: SignalKind) -> Result<tokio::signal::unix::Signal, ClientError> {
    tokio::signal::unix::signal(kind).map_err(|source| {
        ClientError::Output(memobuild_client::OutputError::Io {
            path: "-".into(),
            source,
        })
    })
}

/// buildx's `-o` syntax.
fn parse_output(text: &str) -> Result<OutputArg, String> {
    if text == "-" {
        return parse_output("type=tar,dest=-");
    }
    if !text.contains('=') {
        return parse_output(&format!("type=local,dest={text}"));
    }
    let mut kind = None;
    let mut spec = OutputSpec {
        kind: OutputKind::Local,
        name: None,
        push: false,
        compression: None,
        force_compression: false,
    };
    let (mut dest, mut tar) = (None, None);
    let mut level = None;
    for field in text.split(',') {
        let (key, value) = field
            .split_once('=')
            .ok_or_else(|| format!("output field {field:?} is not key=value"))?;
        match key {
            "type" => {
                kind = Some(match value {
                    "oci" => OutputKind::Oci,
                    "docker" => OutputKind::Docker,
                    "tar" => OutputKind::Tar,
                    "local" => OutputKind::Local,
                    "image" | "registry" => OutputKind::Image,
                    other => return Err(format!("unknown output type {other:?}")),
                });
            }
            "dest" => dest = Some(value.to_owned()),
            "tar" => tar = Some(value != "false"),
            "name" => spec.name = Some(value.to_owned()),
            "push" => spec.push = value == "true",
            "compression" => {
                spec.compression = Some(match value {
                    "uncompressed" => LayerCompression::Uncompressed,
                    "gzip" => LayerCompression::Gzip,
                    "zstd" => LayerCompression::Zstd { level: None },
                    other => {
                        return Err(format!(
                            "compression={other}: this builder makes uncompressed, gzip or zstd layers"
                        ));
                    }
                });
            }
            "compression-level" => {
                level = Some(
                    value
                        .parse::<i32>()
                        .map_err(|_| format!("compression-level={value} is not a number"))?,
                );
            }
            "force-compression" => spec.force_compression = value == "true",
            other => return Err(format!("unknown output field {other:?}")),
        }
    }
    match (&mut spec.compression, level) {
        (Some(LayerCompression::Zstd { level: wanted }), Some(n)) => *wanted = Some(n),
        (_, Some(_)) => {
            return Err(
                "compression-level= applies to compression=zstd only (gzip is level 1 here)".into(),
            );
        }
        _ => {}
    }
    spec.kind = kind.ok_or("the output needs type=…")?;
    if spec.compression.is_some() && !matches!(spec.kind, OutputKind::Oci | OutputKind::Image) {
        return Err("compression= applies to type=oci and type=image outputs".into());
    }
    if tar.is_some() && !matches!(spec.kind, OutputKind::Oci | OutputKind::Docker) {
        return Err("tar= applies to type=oci and type=docker outputs".into());
    }
    let as_dir = spec.kind == OutputKind::Local || tar == Some(false);
    let dest = match (spec.kind, dest.as_deref()) {
        (OutputKind::Image, _) => None,
        (_, None) => return Err("this output type needs dest=PATH (or dest=- for stdout)".into()),
        (_, Some("-")) if as_dir => {
            return Err("this output is a directory; use type=tar (or tar=true) for stdout".into());
        }
        (_, Some("-")) => Some(Dest::Stdout),
        (_, Some(path)) if as_dir => Some(Dest::Dir(absolute(Path::new(path)))),
        (_, Some(path)) => Some(Dest::File(absolute(Path::new(path)))),
    };
    Ok(OutputArg { spec, dest })
}

fn absolute(path: &Path) -> PathBuf {
    std::path::absolute(path).unwrap_or_else(|_| path.to_owned())
}

fn parse_size(text: &str) -> Result<u64, String> {
    memobuild_protocol::units::parse_size(text).map_err(|e| e.to_string())
}

fn parse_duration(text: &str) -> Result<u64, String> {
    memobuild_protocol::units::parse_duration(text).map_err(|e| e.to_string())
}

/// The buildx `--filter`s that apply to this cache.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum PruneFilter {
    /// `until=24h`, in seconds.
    Until(u64),
    /// `type=exec.cachemount`.
    CacheMounts,
}

fn parse_prune_filter(text: &str) -> Result<PruneFilter, String> {
    match text.split_once('=') {
        Some(("until", value)) => parse_duration(value).map(PruneFilter::Until),
        Some(("type", "exec.cachemount")) => Ok(PruneFilter::CacheMounts),
        _ => Err(format!(
            "unsupported filter {text:?}; this cache takes until=DURATION and type=exec.cachemount"
        )),
    }
}

/// buildx's `--secret`: `id=ID,src=FILE` (also `source=`, `type=file`), `id=ID,env=VAR`
/// (`type=env`), or `id=ID` alone: the variable ID if set, else the file ID.
fn parse_secret(text: &str) -> Result<BuildSecret, String> {
    let (mut id, mut src, mut env, mut kind) = (None, None, None, None);
    for field in text.split(',') {
        match field.split_once('=') {
            Some(("id", v)) => id = Some(v.to_owned()),
            Some(("src" | "source", v)) => src = Some(v.to_owned()),
            Some(("env", v)) => env = Some(v.to_owned()),
            Some(("type", v @ ("file" | "env"))) => kind = Some(v.to_owned()),
            _ => {
                return Err(format!(
                    "unexpected {field:?}; expected id=, src=, env= or type="
                ));
            }
        }
    }
    let id = id
        .filter(|id| !id.is_empty())
        .ok_or("a secret needs id=ID")?;
    let from_env = |var: &str| {
        std::env::var_os(var)
            .map(|v| v.into_encoded_bytes())
            .ok_or_else(|| format!("secret {id}: {var} is not set in the environment"))
    };
    let from_file = |path: &str| {
        std::fs::read(path).map_err(|err| format!("secret {id}: reading {path}: {err}"))
    };
    let value = match (src, env, kind.as_deref()) {
        (Some(path), None, None | Some("file")) => from_file(&path)?,
        (None, Some(var), None | Some("env")) => from_env(&var)?,
        (Some(var), None, Some("env")) => from_env(&var)?,
        (None, None, Some("env")) => from_env(&id)?,
        (None, None, Some("file")) => from_file(&id)?,
        (None, None, _) if std::env::var_os(&id).is_some() => from_env(&id)?,
        (None, None, _) => from_file(&id)?,
        _ => return Err(format!("secret {id}: give src= or env=, not both")),
    };
    Ok(BuildSecret { id, value })
}

/// buildx's `--ssh`: `default` or `ID` (the agent at `$SSH_AUTH_SOCK`), or `ID=SOCKET`. Key
/// files are not loaded here: start an agent and `ssh-add` them.
fn parse_ssh(text: &str) -> Result<SshAgent, String> {
    let (id, path) = match text.split_once('=') {
        Some((id, path)) if !path.contains(',') => (id, PathBuf::from(path)),
        Some(_) => return Err("one socket per --ssh ID=SOCKET".into()),
        None => (
            text,
            std::env::var_os("SSH_AUTH_SOCK")
                .map(PathBuf::from)
                .ok_or("--ssh: SSH_AUTH_SOCK is not set; start ssh-agent or give ID=SOCKET")?,
        ),
    };
    use std::os::unix::fs::FileTypeExt as _;
    match std::fs::metadata(&path) {
        Ok(meta) if meta.file_type().is_socket() => Ok(SshAgent {
            id: id.to_owned(),
            socket: absolute(&path),
        }),
        Ok(_) => Err(format!(
            "--ssh {id}: {} is not an agent socket (key files are not loaded: ssh-add them to an agent)",
            path.display()
        )),
        Err(err) => Err(format!("--ssh {id}: {}: {err}", path.display())),
    }
}

fn parse_key_value(text: &str) -> Result<(String, String), String> {
    match text.split_once('=') {
        Some((key, value)) if !key.is_empty() => Ok((key.to_owned(), value.to_owned())),
        // `--build-arg NAME` takes the value from the client's environment, as docker does.
        None if !text.is_empty() => std::env::var(text)
            .map(|value| (text.to_owned(), value))
            .map_err(|_| format!("{text} is not set in the environment; use {text}=VALUE")),
        _ => Err(format!("expected KEY=VALUE, got {text:?}")),
    }
}

async fn version(place: &DaemonPlace, json: bool) -> Result<Exit, ClientError> {
    let daemon = match Connection::open(&place.socket).await {
        Ok(conn) => Some(conn.daemon().clone()),
        Err(ConnectError::Refused { daemon, .. }) => Some(daemon),
        Err(_) => None,
    };
    if json {
        print_json(&json!({
            "client": { "version": PACKAGE_VERSION, "protocol": PROTOCOL_VERSION },
            "daemon": daemon.as_ref().map(|d| json!({
                "version": d.daemon_version, "protocol": d.protocol_version, "pid": d.pid,
            })),
        }));
        return Ok(Exit::Success);
    }
    println!("memobuild {PACKAGE_VERSION} (protocol {PROTOCOL_VERSION})");
    match daemon {
        Some(d) => println!(
            "memobuildd {} (protocol {}), pid {}, on {}",
            d.daemon_version,
            d.protocol_version,
            d.pid,
            place.socket.display()
        ),
        None => println!("memobuildd: not running on {}", place.socket.display()),
    }
    Ok(Exit::Success)
}

async fn daemon(action: DaemonAction, place: &DaemonPlace) -> Result<Exit, ClientError> {
    match action {
        DaemonAction::Start => {
            let conn = connect_or_start(place).await?;
            println!(
                "memobuildd {} running, pid {}, on {}",
                conn.daemon().daemon_version,
                conn.daemon().pid,
                place.socket.display()
            );
            Ok(Exit::Success)
        }
        DaemonAction::Stop => {
            stop(place).await?;
            Ok(Exit::Success)
        }
        DaemonAction::Restart => {
            stop(place).await?;
            let pid = launch::start_daemon(place)?;
            println!(
                "memobuildd started, pid {pid}, on {}",
                place.socket.display()
            );
            Ok(Exit::Success)
        }
        DaemonAction::Status { json } => {
            let running = match Connection::open(&place.socket).await {
                Ok(conn) => Some(conn.daemon().clone()),
                Err(ConnectError::NotRunning { .. }) => None,
                Err(err) => return Err(err.into()),
            };
            if json {
                print_json(&json!({
                    "running": running.is_some(),
                    "socket": place.socket,
                    "pid": running.as_ref().map(|d| d.pid),
                    "version": running.as_ref().map(|d| d.daemon_version.clone()),
                }));
            } else if let Some(d) = &running {
                println!(
                    "memobuildd {} running, pid {}, on {}",
                    d.daemon_version,
                    d.pid,
                    place.socket.display()
                );
            } else {
                println!("memobuildd is not running on {}", place.socket.display());
            }
            Ok(if running.is_some() {
                Exit::Success
            } else {
                Exit::NotRunning
            })
        }
    }
}

/// Asks the daemon to stop and waits until its process is gone (its end of the connection
/// closes only after it has released the socket and the state root).
async fn stop(place: &DaemonPlace) -> Result<(), ClientError> {
    let mut conn = match Connection::open(&place.socket).await {
        Ok(conn) => conn,
        Err(ConnectError::NotRunning { .. }) => {
            println!("memobuildd is not running on {}", place.socket.display());
            return Ok(());
        }
        // A daemon of another protocol version still understands nothing but its own
        // Shutdown; a mismatched daemon is stopped by signal instead.
        Err(ConnectError::Refused { daemon, reply, .. })
            if reply.code == memobuild_protocol::ErrorCode::VersionMismatch =>
        {
            return terminate(daemon.pid, place).await;
        }
        Err(err) => return Err(err.into()),
    };
    let pid = conn.daemon().pid;
    match conn.call(&Request::Shutdown).await? {
        Response::ShuttingDown => {}
        _ => return Err(unexpected("shutdown")),
    }
    conn.wait_closed().await?;
    println!("memobuildd stopped (pid {pid})");
    Ok(())
}

/// SIGTERM for a daemon we cannot speak to, then wait for its socket to go.
async fn terminate(pid: u32, place: &DaemonPlace) -> Result<(), ClientError> {
    memobuild_client::send_sigterm(pid)?;
    let deadline = std::time::Instant::now() + launch::START_TIMEOUT;
    while place.socket.exists() && std::time::Instant::now() < deadline {
        tokio::time::sleep(std::time::Duration::from_millis(20)).await;
    }
    println!("memobuildd stopped (pid {pid}, by SIGTERM)");
    Ok(())
}

fn unexpected(request: &'static str) -> ClientError {
    ClientError::Request(RequestError::Unexpected {
        request,
        response: "reply".into(),
    })
}

/// `memobuild images | head -1` must end quietly, as Unix tools do, not panic on a closed
/// pipe: Rust ignores SIGPIPE by default, so the default action is put back.
fn restore_sigpipe() {
    // SAFETY: called first thing in main, before any thread exists; SIG_DFL is a valid action.
    #[expect(
        unsafe_code,
        reason = "no safe std API restores the default SIGPIPE action"
    )]
    unsafe {
        libc::signal(libc::SIGPIPE, libc::SIG_DFL);
    }
}

fn print_json(value: &impl serde::Serialize) {
    match serde_json::to_string_pretty(value) {
        Ok(text) => println!("{text}"),
        Err(err) => eprintln!("memobuild: cannot encode JSON: {err}"),
    }
}
