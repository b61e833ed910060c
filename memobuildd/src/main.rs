//! `memobuildd`: parse flags, set up logging, run the daemon in the foreground — or, with
//! `serve-cache`, the team's remote cache server.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand};
use memobuildd::config::{Config, Overrides, ServeCacheConfig, ServeCacheOverrides};

/// The MemoBuild daemon. Runs in the foreground, as systemd and launchd expect;
/// `memobuild` starts it on demand. Settings: flag > environment > config file > default.
#[derive(Debug, Parser)]
#[command(name = "memobuildd", version)]
struct Args {
    /// State directory (cache, index, logs) [env: MEMOBUILD_ROOT]
    #[arg(long, value_name = "DIR")]
    root: Option<PathBuf>,
    /// Unix socket to listen on [env: MEMOBUILD_SOCKET]
    #[arg(long, value_name = "PATH")]
    socket: Option<PathBuf>,
    /// Group whose members may use the socket (mode 0660) [env: MEMOBUILD_SOCKET_GROUP]
    #[arg(long, value_name = "GROUP")]
    socket_group: Option<String>,
    /// Log filter, e.g. `info` or `memobuildd=debug` [env: MEMOBUILD_LOG, RUST_LOG]
    #[arg(long, value_name = "FILTER", global = true)]
    log: Option<String>,
    /// TOML config file [env: MEMOBUILD_CONFIG]
    #[arg(long, value_name = "FILE", global = true)]
    config: Option<PathBuf>,
    /// A registry (HOST[:PORT]) to speak plain HTTP to; loopback ones always are (repeatable)
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure_registries: Vec<String>,
    #[command(subcommand)]
    command: Option<Command>,
}

#[derive(Debug, Subcommand)]
enum Command {
    /// Serve a remote cache for a team: REAPI v2 gRPC and Bazel's HTTP cache on one port
    ServeCache(ServeCacheArgs),
}

/// Settings: flag > environment > the config file's `[serve_cache]` table > default.
#[derive(Debug, clap::Args)]
struct ServeCacheArgs {
    /// Address to listen on, HOST:PORT [env: MEMOBUILD_CACHE_LISTEN] [default: 127.0.0.1:9092]
    #[arg(long, value_name = "ADDR")]
    listen: Option<String>,
    /// Store directory [env: MEMOBUILD_CACHE_DIR]
    #[arg(long, value_name = "DIR")]
    dir: Option<PathBuf>,
    /// Byte budget, e.g. 500M, 10G, 1TiB; least recently used entries go beyond it
    /// [env: MEMOBUILD_CACHE_MAX_SIZE] [default: 10G]
    #[arg(long, value_name = "SIZE")]
    max_size: Option<String>,
    /// Token file (`TOKEN read-only|read-write [NAME]` a line); turns authentication on
    /// [env: MEMOBUILD_CACHE_AUTH]
    #[arg(long, value_name = "FILE")]
    auth: Option<PathBuf>,
    /// TLS certificate chain (PEM)
    #[arg(long, value_name = "FILE", requires = "tls_key")]
    tls_cert: Option<PathBuf>,
    /// TLS private key (PEM)
    #[arg(long, value_name = "FILE", requires = "tls_cert")]
    tls_key: Option<PathBuf>,
    /// URL that receives a signed JSON summary of every reported build (repeatable)
    #[arg(long = "webhook", value_name = "URL")]
    webhooks: Vec<String>,
}

fn main() -> ExitCode {
    let args = Args::parse();
    match run(args) {
        Ok(()) => ExitCode::SUCCESS,
        Err(err) => {
            eprintln!("memobuildd: {err:#}");
            ExitCode::FAILURE
        }
    }
}

fn run(args: Args) -> anyhow::Result<()> {
    if let Some(Command::ServeCache(cache)) = args.command {
        let config = ServeCacheConfig::from_process(ServeCacheOverrides {
            listen: cache.listen,
            dir: cache.dir,
            max_size: cache.max_size,
            auth_file: cache.auth,
            tls_cert: cache.tls_cert,
            tls_key: cache.tls_key,
            webhooks: cache.webhooks,
            log: args.log,
            config: args.config,
        })?;
        let log = config.log.clone();
        return block_on(&log, memobuildd::cacheserver::run(config));
    }
    let config = Config::from_process(Overrides {
        root: args.root,
        socket: args.socket,
        socket_group: args.socket_group,
        log: args.log,
        config: args.config,
        insecure_registries: args.insecure_registries,
    })?;
    let log = config.log.clone();
    block_on(&log, memobuildd::run(config))
}

/// Sets up logging to stderr and runs `main` on a multi-threaded runtime.
fn block_on<E>(log: &str, main: impl Future<Output = Result<(), E>>) -> anyhow::Result<()>
where
    E: std::error::Error + Send + Sync + 'static,
{
    let filter = tracing_subscriber::EnvFilter::try_new(log)
        .with_context(|| format!("invalid log filter {log:?}"))?;
    tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .thread_name("memobuildd")
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(main)?;
    Ok(())
}
