//! Who runs next when steps queue for the engine's parallelism limit: people first.
//!
//! A user's build takes a permit in arrival order. A prebuild's step (background) takes one
//! only while no user's step waits for one, so a user's build goes ahead of every queued
//! prebuild step; once a user's build waits on the step itself (it joined it), the step is
//! the user's and queues as theirs.

use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::Duration;

use tokio::sync::{Notify, Semaphore, SemaphorePermit};

/// How long a background step sleeps when a permit's release was not seen (a fallback: a
/// release normally wakes it at once).
const RECHECK: Duration = Duration::from_millis(25);

#[derive(Debug)]
pub(super) struct StepPermits {
    permits: Semaphore,
    /// User steps waiting for a permit now.
    foreground_waiting: AtomicUsize,
    released: Notify,
}

/// One executing step's share of the limit; releasing it wakes waiting background steps.
pub(super) struct StepPermit<'a> {
    _permit: SemaphorePermit<'a>,
    released: &'a Notify,
}

impl Drop for StepPermit<'_> {
    fn drop(&mut self) {
        self.released.notify_waiters();
    }
}

/// Counts a user step as waiting while it does (its future may be dropped: a cancel).
struct Waiting<'a>(&'a AtomicUsize);

impl Drop for Waiting<'_> {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::Relaxed);
    }
}

impl StepPermits {
    pub(super) fn new(parallel: usize) -> Self {
        Self {
            permits: Semaphore::new(parallel.max(1)),
            foreground_waiting: AtomicUsize::new(0),
            released: Notify::new(),
        }
    }

    /// Waits for a permit; `foreground()` says, each time it is asked, whether a user waits
    /// for this step. `None` when the limit was closed.
    pub(super) async fn acquire(&self, foreground: impl Fn() -> bool) -> Option<StepPermit<'_>> {
        if foreground() {
            return self.acquire_foreground().await;
        }
        loop {
            let released = self.released.notified();
            tokio::pin!(released);
            // Registered before the checks: a release between them still wakes this.
            released.as_mut().enable();
            if foreground() {
                return self.acquire_foreground().await;
            }
            if self.foreground_waiting.load(Ordering::Relaxed) == 0
                && let Ok(permit) = self.permits.try_acquire()
            {
                return Some(self.wrap(permit));
            }
            let _ = tokio::time::timeout(RECHECK, released).await;
        }
    }

    async fn acquire_foreground(&self) -> Option<StepPermit<'_>> {
        self.foreground_waiting.fetch_add(1, Ordering::Relaxed);
        let _waiting = Waiting(&self.foreground_waiting);
        let permit = self.permits.acquire().await.ok()?;
        Some(self.wrap(permit))
    }

    fn wrap<'a>(&'a self, permit: SemaphorePermit<'a>) -> StepPermit<'a> {
        StepPermit {
            _permit: permit,
            released: &self.released,
        }
    }
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::AtomicBool;
    use std::sync::{Arc, Mutex};

    use super::*;

    #[tokio::test]
    async fn a_user_step_goes_ahead_of_a_background_step_that_queued_first() {
        let permits = Arc::new(StepPermits::new(1));
        let order = Arc::new(Mutex::new(Vec::new()));
        let held = permits.acquire(|| true).await.expect("permit");
        let background = tokio::spawn({
            let (permits, order) = (Arc::clone(&permits), Arc::clone(&order));
            async move {
                let _permit = permits.acquire(|| false).await.expect("permit");
                order.lock().expect("order").push("background");
            }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        let user = tokio::spawn({
            let (permits, order) = (Arc::clone(&permits), Arc::clone(&order));
            async move {
                let _permit = permits.acquire(|| true).await.expect("permit");
                order.lock().expect("order").push("user");
                tokio::time::sleep(Duration::from_millis(30)).await;
            }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        drop(held);
        user.await.expect("user");
        background.await.expect("background");
        assert_eq!(*order.lock().expect("order"), ["user", "background"]);
    }

    #[tokio::test]
    async fn a_background_step_a_user_joins_queues_as_theirs() {
        let permits = Arc::new(StepPermits::new(1));
        let held = permits.acquire(|| true).await.expect("permit");
        let joined = Arc::new(AtomicBool::new(false));
        let step = tokio::spawn({
            let (permits, joined) = (Arc::clone(&permits), Arc::clone(&joined));
            async move {
                permits
                    .acquire(|| joined.load(Ordering::Relaxed))
                    .await
                    .map(drop)
            }
        });
        tokio::time::sleep(Duration::from_millis(30)).await;
        joined.store(true, Ordering::Relaxed);
        // Now counted with the users: it takes the permit as soon as it is free.
        tokio::time::sleep(Duration::from_millis(60)).await;
        assert_eq!(permits.foreground_waiting.load(Ordering::Relaxed), 1);
        drop(held);
        step.await.expect("step").expect("permit");
        assert_eq!(permits.foreground_waiting.load(Ordering::Relaxed), 0);
    }
}
