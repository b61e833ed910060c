//! The circuit breaker in front of a remote cache: after `threshold` failures in a row the
//! remote is left alone (every operation is a local miss at once, no timeout paid), then one
//! probe is let through after a back-off that doubles while probes keep failing. Only the
//! first opening is announced ([`Change::Opened`]), so a dead remote costs a build one
//! warning, not one per step.

use std::sync::{Mutex, PoisonError};
use std::time::{Duration, Instant};

/// A transition worth telling the user about.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Change {
    /// The remote failed often enough to be skipped.
    Opened,
    /// A request succeeded after the remote had been skipped.
    Recovered,
}

#[derive(Debug)]
enum State {
    Closed { failures: u32 },
    Open { until: Instant, backoff: Duration },
    Probing { since: Instant, backoff: Duration },
}

#[derive(Debug)]
pub struct Breaker {
    state: Mutex<State>,
    threshold: u32,
    first_backoff: Duration,
    max_backoff: Duration,
    /// A probe that never reported back (its caller was cancelled) stops blocking new
    /// probes after this long.
    probe_grace: Duration,
}

impl Breaker {
    pub fn new(
        threshold: u32,
        first_backoff: Duration,
        max_backoff: Duration,
        probe_grace: Duration,
    ) -> Self {
        Self {
            state: Mutex::new(State::Closed { failures: 0 }),
            threshold: threshold.max(1),
            first_backoff,
            max_backoff: max_backoff.max(first_backoff),
            probe_grace,
        }
    }

    fn state(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Whether an operation may go to the remote now.
    pub fn admit(&self) -> bool {
        let mut state = self.state();
        let now = Instant::now();
        match *state {
            State::Closed { .. } => true,
            State::Open { until, backoff } if now >= until => {
                *state = State::Probing {
                    since: now,
                    backoff,
                };
                true
            }
            State::Probing { since, backoff } if now.duration_since(since) >= self.probe_grace => {
                *state = State::Probing {
                    since: now,
                    backoff,
                };
                true
            }
            State::Open { .. } | State::Probing { .. } => false,
        }
    }

    pub fn success(&self) -> Option<Change> {
        let mut state = self.state();
        let was_closed = matches!(*state, State::Closed { .. });
        *state = State::Closed { failures: 0 };
        (!was_closed).then_some(Change::Recovered)
    }

    pub fn failure(&self) -> Option<Change> {
        let mut state = self.state();
        let now = Instant::now();
        match *state {
            State::Closed { failures } if failures + 1 >= self.threshold => {
                *state = State::Open {
                    until: now + self.first_backoff,
                    backoff: self.first_backoff,
                };
                Some(Change::Opened)
            }
            State::Closed { failures } => {
                *state = State::Closed {
                    failures: failures + 1,
                };
                None
            }
            State::Probing { backoff, .. } => {
                let backoff = (backoff * 2).min(self.max_backoff);
                *state = State::Open {
                    until: now + backoff,
                    backoff,
                };
                None
            }
            State::Open { .. } => None,
        }
    }

    /// Whether requests flow normally.
    pub fn is_closed(&self) -> bool {
        matches!(*self.state(), State::Closed { .. })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn opens_after_the_threshold_probes_after_the_backoff_and_recovers() {
        let backoff = Duration::from_millis(40);
        let breaker = Breaker::new(3, backoff, backoff * 4, Duration::from_secs(60));
        assert_eq!(breaker.failure(), None);
        assert_eq!(breaker.success(), None, "a success resets the count");
        assert_eq!(breaker.failure(), None);
        assert_eq!(breaker.failure(), None);
        assert_eq!(breaker.failure(), Some(Change::Opened));
        assert!(!breaker.admit(), "open: skipped");
        std::thread::sleep(backoff + Duration::from_millis(10));
        assert!(breaker.admit(), "one probe");
        assert!(!breaker.admit(), "only one");
        assert_eq!(
            breaker.failure(),
            None,
            "a failed probe is not announced again"
        );
        std::thread::sleep(backoff + Duration::from_millis(10));
        assert!(!breaker.admit(), "the back-off doubled");
        std::thread::sleep(backoff);
        assert!(breaker.admit());
        assert_eq!(breaker.success(), Some(Change::Recovered));
        assert!(breaker.is_closed() && breaker.admit());
    }

    #[test]
    fn a_probe_that_never_reports_back_is_replaced() {
        let breaker = Breaker::new(1, Duration::ZERO, Duration::ZERO, Duration::from_millis(30));
        assert_eq!(breaker.failure(), Some(Change::Opened));
        assert!(breaker.admit());
        assert!(!breaker.admit());
        std::thread::sleep(Duration::from_millis(40));
        assert!(breaker.admit(), "the lost probe no longer blocks");
    }
}
