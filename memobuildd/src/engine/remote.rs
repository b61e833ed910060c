//! The engine's side of L3: which tiers a build looks keys up in (its remote mode narrowed
//! from the daemon's), and the remote tier's events turned into warnings in the build's
//! progress stream.

use std::sync::Arc;

use tokio::sync::{broadcast, oneshot};

use super::{Engine, Progress, Reporter};
use crate::cache::remote::{L3, RemoteEvent, RemoteMode, RemoteTier};
use crate::cache::{L2, Tier, Tiered};
use crate::store::{ActionResult, Lease};

impl Engine {
    /// L1 → L2 → L3 for one build (L3 only when the daemon has one and the build does not
    /// turn it off), and the remote tier alone, which uploads what the build executes.
    pub(super) fn tiers(
        &self,
        build: Option<RemoteMode>,
        lease: &Lease,
    ) -> (Tiered<ActionResult>, Option<RemoteTier>) {
        let remote = self.remote.as_ref().and_then(|l3| {
            let mode = narrowed(l3.mode(), build);
            (mode != RemoteMode::Off).then(|| RemoteTier::new(l3.clone(), lease.clone(), mode))
        });
        let mut tiers: Vec<Arc<dyn Tier<ActionResult>>> =
            vec![Arc::new(self.l1.clone()), Arc::new(L2::new(lease.clone()))];
        if let Some(remote) = &remote {
            tiers.push(Arc::new(remote.clone()));
        }
        (Tiered::new(tiers), remote)
    }
}

/// The daemon's mode, narrowed by the build's: a build may read less or write less, never
/// more than the daemon was configured for.
fn narrowed(daemon: RemoteMode, build: Option<RemoteMode>) -> RemoteMode {
    let rank = |mode| match mode {
        RemoteMode::Off => 0,
        RemoteMode::ReadOnly => 1,
        RemoteMode::ReadWrite => 2,
    };
    match build {
        Some(build) if rank(build) < rank(daemon) => build,
        _ => daemon,
    }
}

/// Forwards the remote tier's events into one build's progress while it runs.
pub(super) struct Warnings {
    stop: Option<oneshot::Sender<()>>,
    task: tokio::task::JoinHandle<()>,
}

impl Warnings {
    /// Starts forwarding; a remote already known to be down is said at once, since the
    /// event that said so went to an earlier build.
    pub(super) fn start(l3: &L3, reporter: Arc<dyn Reporter>) -> Self {
        let status = l3.status();
        if !status.healthy {
            reporter.report(Progress::Warning {
                message: unavailable(
                    &status.endpoint,
                    status.last_error.as_deref().unwrap_or("failing"),
                ),
            });
        }
        let mut events = l3.events();
        let (stop, mut stopped) = oneshot::channel();
        let task = tokio::spawn(async move {
            loop {
                tokio::select! {
                    biased;
                    event = events.recv() => match event {
                        Ok(event) => reporter.report(Progress::Warning { message: message(&event) }),
                        Err(broadcast::error::RecvError::Lagged(_)) => {}
                        Err(broadcast::error::RecvError::Closed) => break,
                    },
                    _ = &mut stopped => {
                        while let Ok(event) = events.try_recv() {
                            reporter.report(Progress::Warning { message: message(&event) });
                        }
                        break;
                    }
                }
            }
        });
        Self {
            stop: Some(stop),
            task,
        }
    }

    /// Stops forwarding once what was sent so far is reported.
    pub(super) async fn finish(mut self) {
        if let Some(stop) = self.stop.take() {
            let _ = stop.send(());
        }
        let _ = (&mut self.task).await;
    }
}

impl Drop for Warnings {
    fn drop(&mut self) {
        self.task.abort();
    }
}

fn unavailable(endpoint: &str, error: &str) -> String {
    format!(
        "remote cache {endpoint} unavailable ({error}): building with local caches only until it recovers"
    )
}

fn message(event: &RemoteEvent) -> String {
    match event {
        RemoteEvent::Unavailable { endpoint, error } => unavailable(endpoint, error),
        RemoteEvent::Recovered { endpoint } => format!("remote cache {endpoint} reachable again"),
        RemoteEvent::BadSignature { action } => {
            format!("remote cache entry {action} ignored: not signed with this daemon's secret")
        }
        RemoteEvent::CorruptBlob { blob, actual } => {
            format!("remote cache blob {blob} arrived as {actual}: not used, the step runs here")
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_build_narrows_the_daemons_mode_and_never_widens_it() {
        use RemoteMode::{Off, ReadOnly, ReadWrite};
        for (daemon, build, effective) in [
            (ReadWrite, None, ReadWrite),
            (ReadWrite, Some(ReadOnly), ReadOnly),
            (ReadWrite, Some(Off), Off),
            (ReadOnly, Some(ReadWrite), ReadOnly),
            (ReadOnly, Some(Off), Off),
            (ReadOnly, None, ReadOnly),
        ] {
            assert_eq!(narrowed(daemon, build), effective, "{daemon:?} {build:?}");
        }
    }
}
