//! Webhooks: every build report (`analytics`) is sent, as a JSON summary, to each configured
//! URL, off the request path. The main type is [`Webhooks`]: reports queue (bounded; a full
//! queue drops and counts), a delivery task POSTs them, retrying failures with exponential
//! backoff, and a slow or dead receiver never delays a request.
//!
//! The request carries `Content-Type: application/json`, `X-MemoBuild-Event:
//! build.completed`, `X-MemoBuild-Delivery: ID` and, with a secret configured,
//! `X-MemoBuild-Signature: sha256=HEX`, the HMAC-SHA256 of the body under the secret (the
//! receiver recomputes it over the raw body and compares in constant time). Body:
//! `{"event": "build.completed", "id": N, "client": "…", "received_unix_ms": T, "build":
//! {the report}}`. A 2xx answer is delivered; anything else is retried up to
//! [`ATTEMPTS`] times.

use std::sync::Arc;
use std::time::Duration;

use hmac::{Hmac, KeyInit, Mac};
use serde::Serialize;
use sha2::Sha256;
use tokio::sync::{Semaphore, mpsc};

use super::analytics::BuildReport;
use super::metrics::{Delivery, Metrics};

pub const SIGNATURE_HEADER: &str = "x-memobuild-signature";
pub const EVENT_HEADER: &str = "x-memobuild-event";
pub const DELIVERY_HEADER: &str = "x-memobuild-delivery";
/// Tries per delivery: the first and four retries, 0.5 s, 1 s, 2 s and 4 s apart.
pub const ATTEMPTS: u32 = 5;
const FIRST_BACKOFF: Duration = Duration::from_millis(500);
const ATTEMPT_TIMEOUT: Duration = Duration::from_secs(10);
const QUEUE: usize = 1024;
const CONCURRENT_DELIVERIES: usize = 8;

/// The summary a webhook receives.
#[derive(Debug, Clone, Serialize)]
pub struct Summary {
    pub event: &'static str,
    pub id: i64,
    pub client: String,
    pub received_unix_ms: i64,
    pub build: BuildReport,
}

/// The queue to the delivery task; `None` inside when no URL is configured.
#[derive(Debug)]
pub struct Webhooks {
    queue: Option<mpsc::Sender<Summary>>,
    metrics: Arc<Metrics>,
}

impl Webhooks {
    /// Starts the delivery task (on the current runtime) when there are URLs.
    pub fn start(urls: Vec<String>, secret: Option<Vec<u8>>, metrics: Arc<Metrics>) -> Self {
        if urls.is_empty() {
            return Self {
                queue: None,
                metrics,
            };
        }
        let (tx, rx) = mpsc::channel(QUEUE);
        let client = reqwest::Client::builder()
            .timeout(ATTEMPT_TIMEOUT)
            .build()
            .unwrap_or_default();
        tokio::spawn(deliver_all(
            rx,
            Arc::new(Deliverer {
                urls,
                secret,
                client,
                metrics: Arc::clone(&metrics),
            }),
        ));
        Self {
            queue: Some(tx),
            metrics,
        }
    }

    /// Queues a summary for every URL; never waits.
    pub fn send(&self, summary: Summary) {
        if let Some(queue) = &self.queue
            && queue.try_send(summary).is_err()
        {
            tracing::warn!("webhook queue full: a build summary was dropped");
            self.metrics.webhook(Delivery::Dropped);
        }
    }
}

#[derive(Debug)]
struct Deliverer {
    urls: Vec<String>,
    secret: Option<Vec<u8>>,
    client: reqwest::Client,
    metrics: Arc<Metrics>,
}

/// The HMAC-SHA256 of `body` under `secret`, as `sha256=HEX`.
pub fn signature(secret: &[u8], body: &[u8]) -> String {
    let mut mac =
        <Hmac<Sha256> as KeyInit>::new_from_slice(secret).expect("HMAC takes keys of any length");
    mac.update(body);
    format!("sha256={}", hex::encode(mac.finalize().into_bytes()))
}

async fn deliver_all(mut rx: mpsc::Receiver<Summary>, deliverer: Arc<Deliverer>) {
    let slots = Arc::new(Semaphore::new(CONCURRENT_DELIVERIES));
    while let Some(summary) = rx.recv().await {
        let body = match serde_json::to_vec(&summary) {
            Ok(body) => bytes::Bytes::from(body),
            Err(err) => {
                tracing::warn!(error = %err, "cannot encode a webhook summary");
                continue;
            }
        };
        for url in 0..deliverer.urls.len() {
            let Ok(slot) = Arc::clone(&slots).acquire_owned().await else {
                return;
            };
            let deliverer = Arc::clone(&deliverer);
            let body = body.clone();
            let id = summary.id;
            tokio::spawn(async move {
                let delivery = deliverer.deliver(url, id, body).await;
                deliverer.metrics.webhook(delivery);
                drop(slot);
            });
        }
    }
}

impl Deliverer {
    async fn deliver(&self, url: usize, id: i64, body: bytes::Bytes) -> Delivery {
        let url = &self.urls[url];
        let signature = self.secret.as_deref().map(|s| signature(s, &body));
        let mut backoff = FIRST_BACKOFF;
        for attempt in 1..=ATTEMPTS {
            let mut request = self
                .client
                .post(url)
                .header(http::header::CONTENT_TYPE, "application/json")
                .header(EVENT_HEADER, "build.completed")
                .header(DELIVERY_HEADER, id.to_string())
                .body(body.clone());
            if let Some(signature) = &signature {
                request = request.header(SIGNATURE_HEADER, signature);
            }
            match request.send().await {
                Ok(response) if response.status().is_success() => {
                    tracing::debug!(url, id, attempt, "webhook delivered");
                    return Delivery::Delivered;
                }
                Ok(response) => {
                    tracing::debug!(url, id, attempt, status = %response.status(), "webhook refused");
                }
                Err(err) => tracing::debug!(url, id, attempt, error = %err, "webhook failed"),
            }
            if attempt < ATTEMPTS {
                tokio::time::sleep(backoff).await;
                backoff *= 2;
            }
        }
        tracing::warn!(url, id, "webhook not delivered after {ATTEMPTS} attempts");
        Delivery::Failed
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn signature_matches_rfc_4231_case_2() {
        assert_eq!(
            signature(b"Jefe", b"what do ya want for nothing?"),
            "sha256=5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
    }
}
