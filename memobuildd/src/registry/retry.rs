//! Retrying requests that failed for a passing reason: 5xx and 429 answers, timeouts, and
//! connections reset mid-request. Everything else (4xx, refused connections, bad content)
//! fails at once: trying again would only delay the same answer.

use std::future::Future;
use std::time::Duration;

use oci_client::errors::{OciDistributionError, OciErrorCode};

use super::error::causes;

/// Exponential backoff, bounded in tries and in delay.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(super) struct Backoff {
    pub tries: u32,
    pub first: Duration,
    pub max: Duration,
}

impl Backoff {
    pub(super) const DEFAULT: Self = Self {
        tries: 4,
        first: Duration::from_millis(250),
        max: Duration::from_secs(4),
    };

    /// How long to wait after `failed` tries before the next one; `None` when the tries are
    /// spent.
    pub(super) fn delay(&self, failed: u32) -> Option<Duration> {
        if failed == 0 || failed >= self.tries {
            return None;
        }
        let factor = 1u32.checked_shl(failed - 1).unwrap_or(u32::MAX);
        Some(self.first.saturating_mul(factor).min(self.max))
    }

    /// Runs `op` until it succeeds, fails for good, or the tries are spent. `op` starts
    /// over from scratch each time (a new upload session, a reopened file).
    pub(super) async fn run<T, F, Fut>(
        &self,
        what: &str,
        mut op: F,
    ) -> Result<T, OciDistributionError>
    where
        F: FnMut() -> Fut,
        Fut: Future<Output = Result<T, OciDistributionError>>,
    {
        let mut failed = 0;
        loop {
            match op().await {
                Ok(value) => return Ok(value),
                Err(err) => {
                    failed += 1;
                    match self.delay(failed).filter(|_| transient(&err)) {
                        Some(delay) => {
                            tracing::warn!(what, error = %err, ?delay, try = failed, "retrying");
                            tokio::time::sleep(delay).await;
                        }
                        None => return Err(err),
                    }
                }
            }
        }
    }
}

/// Whether a failure may pass if the request is made again.
pub(super) fn transient(err: &OciDistributionError) -> bool {
    match err {
        OciDistributionError::ServerError { code, .. } => *code >= 500 || *code == 429,
        OciDistributionError::RegistryError { envelope, .. } => envelope
            .errors
            .iter()
            .any(|e| e.code == OciErrorCode::Toomanyrequests),
        OciDistributionError::RequestError(err) => {
            err.status()
                .is_some_and(|s| s.is_server_error() || s.as_u16() == 429)
                || err.is_timeout()
                || connection_broke(err)
        }
        OciDistributionError::IoError(err) => connection_broke(err),
        _ => false,
    }
}

/// A connection that broke after it was made. A refused connection is not in this set: the
/// registry is not there, and waiting a second will not bring it.
fn connection_broke(err: &(dyn std::error::Error + 'static)) -> bool {
    causes(err).any(|cause| {
        cause.downcast_ref::<std::io::Error>().is_some_and(|io| {
            matches!(
                io.kind(),
                std::io::ErrorKind::ConnectionReset
                    | std::io::ErrorKind::ConnectionAborted
                    | std::io::ErrorKind::BrokenPipe
                    | std::io::ErrorKind::UnexpectedEof
            )
        })
    })
}

#[cfg(test)]
mod tests {
    use std::sync::atomic::{AtomicU32, Ordering};

    use super::*;

    fn server(code: u16) -> OciDistributionError {
        OciDistributionError::ServerError {
            code,
            url: "http://r/v2/".into(),
            message: String::new(),
        }
    }

    #[test]
    fn delays_double_up_to_a_bound_and_tries_are_limited() {
        let b = Backoff::DEFAULT;
        let delays: Vec<_> = (1..=5).map(|n| b.delay(n)).collect();
        assert_eq!(
            delays,
            [
                Some(Duration::from_millis(250)),
                Some(Duration::from_millis(500)),
                Some(Duration::from_millis(1000)),
                None,
                None
            ]
        );
        let capped = Backoff {
            tries: 40,
            first: Duration::from_secs(1),
            max: Duration::from_secs(4),
        };
        assert_eq!(capped.delay(3), Some(Duration::from_secs(4)));
        assert_eq!(capped.delay(39), Some(Duration::from_secs(4)));
    }

    #[test]
    fn only_passing_failures_are_retried() {
        assert!(transient(&server(500)));
        assert!(transient(&server(503)));
        assert!(transient(&server(429)));
        assert!(!transient(&server(404)));
        assert!(!transient(&server(401)));
        let reset = std::io::Error::new(std::io::ErrorKind::ConnectionReset, "reset");
        assert!(transient(&OciDistributionError::IoError(reset)));
        let wrapped = std::io::Error::other(std::io::Error::from(std::io::ErrorKind::BrokenPipe));
        assert!(transient(&OciDistributionError::IoError(wrapped)));
        let refused = std::io::Error::from(std::io::ErrorKind::ConnectionRefused);
        assert!(!transient(&OciDistributionError::IoError(refused)));
        assert!(!transient(&OciDistributionError::PushNoDataError));
    }

    #[tokio::test]
    async fn run_retries_transient_failures_then_gives_up() {
        let quick = Backoff {
            tries: 4,
            first: Duration::from_millis(1),
            max: Duration::from_millis(2),
        };
        let calls = AtomicU32::new(0);
        let result: Result<(), _> = quick
            .run("test", || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(server(502)) }
            })
            .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 4);

        let calls = AtomicU32::new(0);
        let result = quick
            .run("test", || {
                let n = calls.fetch_add(1, Ordering::SeqCst);
                async move { if n < 2 { Err(server(503)) } else { Ok(n) } }
            })
            .await;
        assert_eq!(result.expect("third try passes"), 2);

        let calls = AtomicU32::new(0);
        let result: Result<(), _> = quick
            .run("test", || {
                calls.fetch_add(1, Ordering::SeqCst);
                async { Err(server(404)) }
            })
            .await;
        assert!(result.is_err());
        assert_eq!(calls.load(Ordering::SeqCst), 1);
    }
}
