//! Shared work, as BuildKit's flightcontrol shares it: builds that need the same step at once
//! run it once.
//!
//! The work runs on a task of its own that no build owns. Every build that needs it — the one
//! that started it included — is a *waiter*: the work is cancelled only when the last waiter
//! has gone (its build cancelled, its client gone), and a waiter whose companions went away
//! goes on waiting while the work goes on for it, instead of inheriting their cancellation.
//! The work's log lines reach every waiter, under each one's own step number.

use std::collections::HashMap;
use std::future::Future;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::Duration;

use tokio::sync::watch;

use super::{BuildError, Progress, Reporter};
use crate::context::Hash;
use crate::exec::LogStream;
use crate::store::ActionResult;

/// How often a waiter looks at its own build's cancel flag.
const CANCEL_POLL: Duration = Duration::from_millis(50);

type Outcome = Option<Result<ActionResult, Arc<BuildError>>>;

/// The work in flight, by key.
#[derive(Debug, Default, Clone)]
pub(super) struct Flights {
    inflight: Arc<Mutex<HashMap<Hash, Arc<Flight>>>>,
}

#[derive(Debug)]
struct Flight {
    outcome: watch::Receiver<Outcome>,
    work: Arc<Work>,
}

/// What running work reports to and is stopped by.
pub(super) struct Work {
    cancel: AtomicBool,
    /// A user's build (not only prebuilds) waits for it: it queues as theirs.
    foreground: AtomicBool,
    waiters: Mutex<Vec<Waiter>>,
    next_waiter: AtomicU64,
}

impl std::fmt::Debug for Work {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Work")
            .field("cancelled", &self.cancel.load(Ordering::Relaxed))
            .finish_non_exhaustive()
    }
}

struct Waiter {
    id: u64,
    reporter: Arc<dyn Reporter>,
    node: u32,
}

impl Work {
    fn new() -> Self {
        Self {
            cancel: AtomicBool::new(false),
            foreground: AtomicBool::new(false),
            waiters: Mutex::new(Vec::new()),
            next_waiter: AtomicU64::new(0),
        }
    }

    /// Set once nobody waits for the work any more: containers are killed, the step stops.
    pub(super) fn cancel_flag(&self) -> &AtomicBool {
        &self.cancel
    }

    /// Whether a user's build waits for the work (`priority`).
    pub(super) fn is_foreground(&self) -> bool {
        self.foreground.load(Ordering::Relaxed)
    }

    /// A line of the step's output, to every build waiting for it.
    pub(super) fn log(&self, stream: LogStream, line: &[u8]) {
        for waiter in self.waiters().iter() {
            waiter.reporter.report(Progress::Log {
                node: waiter.node,
                stream,
                line: line.to_vec(),
            });
        }
    }

    fn waiters(&self) -> MutexGuard<'_, Vec<Waiter>> {
        self.waiters.lock().unwrap_or_else(PoisonError::into_inner)
    }
}

/// A build's interest in a flight; dropping it (the build finished waiting, was cancelled, or
/// its future was dropped) leaves, and the last one to leave cancels the work.
struct Interest<'a> {
    flights: &'a Flights,
    key: Hash,
    flight: Arc<Flight>,
    id: u64,
}

impl Drop for Interest<'_> {
    fn drop(&mut self) {
        let mut inflight = self.flights.lock();
        let mut waiters = self.flight.work.waiters();
        waiters.retain(|w| w.id != self.id);
        if waiters.is_empty() {
            self.flight.work.cancel.store(true, Ordering::Relaxed);
            // A build that needs the step from now on starts it afresh rather than joining
            // work that is stopping.
            if inflight
                .get(&self.key)
                .is_some_and(|f| Arc::ptr_eq(f, &self.flight))
            {
                inflight.remove(&self.key);
            }
        }
    }
}

/// How a build's wait for shared work ended.
#[derive(Debug)]
pub(super) struct Joined {
    pub(super) outcome: Result<ActionResult, Arc<BuildError>>,
    /// This build started the work (rather than finding it running).
    pub(super) started_here: bool,
}

impl Flights {
    fn lock(&self) -> MutexGuard<'_, HashMap<Hash, Arc<Flight>>> {
        self.inflight.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Waits for the work of `key`, starting it with `start` unless it is running already.
    /// `reporter` and `node` receive its log lines; `cancel` is the waiting build's own flag;
    /// `foreground`: the waiting build is a user's, not a prebuild.
    pub(super) async fn join<F, Fut>(
        &self,
        key: Hash,
        reporter: Arc<dyn Reporter>,
        node: u32,
        cancel: &AtomicBool,
        foreground: bool,
        start: F,
    ) -> Joined
    where
        F: FnOnce(Arc<Work>) -> Fut,
        Fut: Future<Output = Result<ActionResult, BuildError>> + Send + 'static,
    {
        let (interest, started_here) = {
            let mut inflight = self.lock();
            let (flight, started_here) = match inflight.get(&key) {
                Some(flight) => (Arc::clone(flight), false),
                None => {
                    let (sender, outcome) = watch::channel(None);
                    let work = Arc::new(Work::new());
                    let flight = Arc::new(Flight {
                        outcome,
                        work: Arc::clone(&work),
                    });
                    inflight.insert(key, Arc::clone(&flight));
                    let running = start(Arc::clone(&work));
                    let flights = self.clone();
                    let mine = Arc::clone(&flight);
                    tokio::spawn(async move {
                        let outcome = running.await.map_err(Arc::new);
                        let _ = sender.send(Some(outcome));
                        let mut inflight = flights.lock();
                        if inflight.get(&key).is_some_and(|f| Arc::ptr_eq(f, &mine)) {
                            inflight.remove(&key);
                        }
                    });
                    (flight, true)
                }
            };
            if foreground {
                flight.work.foreground.store(true, Ordering::Relaxed);
            }
            let id = flight.work.next_waiter.fetch_add(1, Ordering::Relaxed);
            flight.work.waiters().push(Waiter { id, reporter, node });
            let interest = Interest {
                flights: self,
                key,
                flight,
                id,
            };
            (interest, started_here)
        };
        let mut outcome = interest.flight.outcome.clone();
        loop {
            tokio::select! {
                done = outcome.wait_for(Option::is_some) => {
                    let outcome = match done {
                        Ok(done) => done.clone().unwrap_or_else(|| Err(Arc::new(BuildError::Cancelled))),
                        Err(_) => Err(Arc::new(BuildError::Cancelled)),
                    };
                    return Joined { outcome, started_here };
                }
                () = tokio::time::sleep(CANCEL_POLL) => {
                    if cancel.load(Ordering::Relaxed) {
                        return Joined {
                            outcome: Err(Arc::new(BuildError::Cancelled)),
                            started_here,
                        };
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::ActionResult;

    #[derive(Default)]
    struct Lines(Mutex<Vec<(u32, Vec<u8>)>>);

    impl Reporter for Lines {
        fn report(&self, event: Progress) {
            if let Progress::Log { node, line, .. } = event {
                self.0.lock().expect("lines").push((node, line));
            }
        }
    }

    type Running = std::pin::Pin<Box<dyn Future<Output = Result<ActionResult, BuildError>> + Send>>;

    /// Work that logs a line, then waits to be told to finish (or to be cancelled).
    fn slow(release: Arc<tokio::sync::Notify>) -> impl FnOnce(Arc<Work>) -> Running {
        move |work| {
            Box::pin(async move {
                work.log(LogStream::Stdout, b"working");
                loop {
                    tokio::select! {
                        () = release.notified() => return Ok(ActionResult { layers: vec![] }),
                        () = tokio::time::sleep(Duration::from_millis(10)) => {
                            if work.cancel_flag().load(Ordering::Relaxed) {
                                return Err(BuildError::Cancelled);
                            }
                        }
                    }
                }
            })
        }
    }

    #[tokio::test]
    async fn a_waiter_takes_over_when_the_build_that_started_the_work_goes() {
        let flights = Flights::default();
        let release = Arc::new(tokio::sync::Notify::new());
        let (a_lines, b_lines) = (Arc::new(Lines::default()), Arc::new(Lines::default()));
        let a_cancel = Arc::new(AtomicBool::new(false));
        let a = tokio::spawn({
            let (flights, lines, cancel, release) = (
                flights.clone(),
                Arc::clone(&a_lines),
                Arc::clone(&a_cancel),
                Arc::clone(&release),
            );
            async move {
                flights
                    .join([1; 32], lines, 3, &cancel, true, slow(release))
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        let b = tokio::spawn({
            let (flights, lines) = (flights.clone(), Arc::clone(&b_lines));
            async move {
                let never = AtomicBool::new(false);
                flights
                    .join([1; 32], lines, 7, &never, true, |_| async {
                        panic!("the running work is joined, not started again")
                    })
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        a_cancel.store(true, Ordering::Relaxed);
        let a = a.await.expect("a");
        assert!(a.started_here);
        assert!(matches!(
            a.outcome.as_ref().map_err(|e| &**e),
            Err(BuildError::Cancelled)
        ));
        tokio::time::sleep(Duration::from_millis(50)).await;
        release.notify_one();
        let b = b.await.expect("b");
        assert!(!b.started_here);
        assert!(b.outcome.is_ok(), "{:?}", b.outcome);
        assert_eq!(*a_lines.0.lock().expect("a"), [(3, b"working".to_vec())]);
        assert!(
            b_lines.0.lock().expect("b").is_empty(),
            "joined after the line"
        );
    }

    #[tokio::test]
    async fn the_work_stops_when_its_last_waiter_goes() {
        let flights = Flights::default();
        let cancel = Arc::new(AtomicBool::new(false));
        let seen: Arc<Mutex<Option<Arc<Work>>>> = Arc::default();
        let joined = tokio::spawn({
            let (flights, cancel, seen) = (flights.clone(), Arc::clone(&cancel), Arc::clone(&seen));
            async move {
                flights
                    .join(
                        [2; 32],
                        Arc::new(Lines::default()),
                        1,
                        &cancel,
                        true,
                        move |work| {
                            *seen.lock().expect("seen") = Some(Arc::clone(&work));
                            slow(Arc::new(tokio::sync::Notify::new()))(work)
                        },
                    )
                    .await
            }
        });
        tokio::time::sleep(Duration::from_millis(50)).await;
        cancel.store(true, Ordering::Relaxed);
        joined.await.expect("joined");
        let work = seen.lock().expect("seen").clone().expect("started");
        assert!(work.cancel_flag().load(Ordering::Relaxed));
        // The next build of the same step starts it afresh.
        let again = flights
            .join(
                [2; 32],
                Arc::new(Lines::default()),
                1,
                &AtomicBool::new(false),
                true,
                |_| async { Ok(ActionResult { layers: vec![] }) },
            )
            .await;
        assert!(again.started_here && again.outcome.is_ok());
    }
}
