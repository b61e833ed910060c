//! `memobuildd`: parse flags, set up logging, run the daemon in the foreground.

use std::io::IsTerminal;
use std::path::PathBuf;
use std::process::ExitCode;

use anyhow::Context;
use clap::Parser;
use memobuildd::config::{Config, Overrides};

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
    #[arg(long, value_name = "FILTER")]
    log: Option<String>,
    /// TOML config file [env: MEMOBUILD_CONFIG]
    #[arg(long, value_name = "FILE")]
    config: Option<PathBuf>,
    /// A registry (HOST[:PORT]) to speak plain HTTP to; loopback ones always are (repeatable)
    #[arg(long = "insecure-registry", value_name = "HOST")]
    insecure_registries: Vec<String>,
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
    let config = Config::from_process(Overrides {
        root: args.root,
        socket: args.socket,
        socket_group: args.socket_group,
        log: args.log,
        config: args.config,
        insecure_registries: args.insecure_registries,
    })?;
    let filter = tracing_subscriber::EnvFilter::try_new(&config.log)
        .with_context(|| format!("invalid log filter {:?}", config.log))?;
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
    runtime.block_on(memobuildd::run(config))?;
    Ok(())
}
