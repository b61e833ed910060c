//! Bazel's HTTP cache protocol ([`HttpCache`]): `GET`/`PUT`/`HEAD` on `{base}/ac/{sha256}`
//! (a serialized REAPI ActionResult) and `{base}/cas/{sha256}` (blob bytes); 404 is a miss.
//! Served by nginx with WebDAV, bazel-remote's HTTP port, S3 gateways. Bodies stream both
//! ways; the protocol has no capabilities, so the health probe is a `HEAD` of the empty blob.

use std::path::Path;
use std::sync::{Arc, Mutex, PoisonError};
use std::time::Duration;

use async_trait::async_trait;
use futures_util::StreamExt as _;
use prost::Message as _;
use reqwest::header::{AUTHORIZATION, CONTENT_LENGTH, HeaderValue};
use reqwest::{Method, StatusCode};

use super::settings::{Auth, Endpoint};
use super::{Capabilities, Chunks, RemoteCache, RemoteError, Sink, reapi};
use crate::store::{Blob, Digest};

/// HEAD requests in flight at once for one find_missing.
const PARALLEL_HEADS: usize = 8;
/// An action entry names a result blob and a few dozen layers: a few KiB.
const MAX_ENTRY: u64 = 1 << 20;

#[derive(Debug)]
pub struct HttpCache {
    endpoint: String,
    /// `scheme://host:port[/prefix]`, no trailing slash.
    base: String,
    auth: Option<HeaderValue>,
    client: reqwest::Client,
}

impl HttpCache {
    pub fn new(
        endpoint: &Endpoint,
        auth: Option<&Auth>,
        ca_file: Option<&Path>,
        connect_timeout: Duration,
    ) -> Result<Self, RemoteError> {
        // reqwest is built without a default crypto provider; an error means one is installed.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let mut builder = reqwest::Client::builder()
            .connect_timeout(connect_timeout)
            .pool_idle_timeout(Duration::from_secs(60));
        if let Some(path) = ca_file {
            let pem = std::fs::read(path).map_err(|source| RemoteError::CaFile {
                path: path.to_owned(),
                source,
            })?;
            let certificate = reqwest::Certificate::from_pem(&pem)
                .map_err(|err| RemoteError::Setup(Box::new(err)))?;
            builder = builder.add_root_certificate(certificate);
        }
        let auth = auth
            .map(|auth| {
                let mut value = HeaderValue::from_bytes(&auth.header_value())
                    .map_err(|err| RemoteError::Setup(Box::new(err)))?;
                value.set_sensitive(true);
                Ok::<_, RemoteError>(value)
            })
            .transpose()?;
        let display = endpoint.display();
        Ok(Self {
            base: display.clone(),
            endpoint: display,
            auth,
            client: builder
                .build()
                .map_err(|err| RemoteError::Setup(Box::new(err)))?,
        })
    }

    fn url(&self, kind: &str, digest: &Digest) -> String {
        format!("{}/{kind}/{}", self.base, digest.hex())
    }

    async fn send(
        &self,
        method: Method,
        url: &str,
        body: Option<(reqwest::Body, u64)>,
    ) -> Result<reqwest::Response, RemoteError> {
        let mut request = self.client.request(method.clone(), url);
        if let Some(auth) = &self.auth {
            request = request.header(AUTHORIZATION, auth.clone());
        }
        if let Some((body, length)) = body {
            request = request.header(CONTENT_LENGTH, length).body(body);
        }
        request.send().await.map_err(|source| RemoteError::Http {
            method: method_name(&method),
            url: url.to_owned(),
            source,
        })
    }

    /// Sends a request whose answer is "there" (2xx), "not there" (404) or an error.
    async fn found(
        &self,
        method: Method,
        url: &str,
    ) -> Result<Option<reqwest::Response>, RemoteError> {
        let response = self.send(method.clone(), url, None).await?;
        match response.status() {
            status if status.is_success() => Ok(Some(response)),
            StatusCode::NOT_FOUND => Ok(None),
            status => Err(RemoteError::HttpStatus {
                method: method_name(&method),
                url: url.to_owned(),
                status,
            }),
        }
    }

    async fn put(&self, url: &str, body: reqwest::Body, length: u64) -> Result<(), RemoteError> {
        let response = self.send(Method::PUT, url, Some((body, length))).await?;
        if response.status().is_success() {
            Ok(())
        } else {
            Err(RemoteError::HttpStatus {
                method: "PUT",
                url: url.to_owned(),
                status: response.status(),
            })
        }
    }

    async fn chunks_into(
        &self,
        mut response: reqwest::Response,
        url: &str,
        sink: &mut Sink,
    ) -> Result<(), RemoteError> {
        loop {
            match response.chunk().await {
                Ok(Some(chunk)) => sink.push(chunk).await?,
                Ok(None) => return Ok(()),
                Err(source) => {
                    return Err(RemoteError::Http {
                        method: "GET",
                        url: url.to_owned(),
                        source,
                    });
                }
            }
        }
    }
}

fn method_name(method: &Method) -> &'static str {
    match *method {
        Method::GET => "GET",
        Method::PUT => "PUT",
        Method::HEAD => "HEAD",
        _ => "request",
    }
}

#[async_trait]
impl RemoteCache for HttpCache {
    fn endpoint(&self) -> String {
        self.endpoint.clone()
    }

    async fn capabilities(&self) -> Result<Capabilities, RemoteError> {
        self.found(Method::HEAD, &self.url("cas", &Digest::of(b"")))
            .await?;
        Ok(Capabilities {
            max_batch_bytes: 0,
            action_updates: true,
        })
    }

    async fn get_action(&self, action: &Blob) -> Result<Option<reapi::ActionResult>, RemoteError> {
        let url = self.url("ac", &action.digest);
        let Some(response) = self.found(Method::GET, &url).await? else {
            return Ok(None);
        };
        let mut sink = Sink::memory(MAX_ENTRY);
        self.chunks_into(response, &url, &mut sink).await?;
        Ok(Some(reapi::ActionResult::decode(
            sink.into_bytes().as_slice(),
        )?))
    }

    async fn update_action(
        &self,
        action: &Blob,
        entry: &reapi::ActionResult,
    ) -> Result<(), RemoteError> {
        let bytes = entry.encode_to_vec();
        let length = bytes.len() as u64;
        self.put(&self.url("ac", &action.digest), bytes.into(), length)
            .await
    }

    async fn find_missing(&self, blobs: &[Blob]) -> Result<Vec<Blob>, RemoteError> {
        let answers: Vec<Result<Option<Blob>, RemoteError>> =
            futures_util::stream::iter(blobs.iter().cloned())
                .map(|blob| async move {
                    let there = self
                        .found(Method::HEAD, &self.url("cas", &blob.digest))
                        .await?;
                    Ok(there.is_none().then_some(blob))
                })
                .buffered(PARALLEL_HEADS)
                .collect()
                .await;
        answers.into_iter().filter_map(Result::transpose).collect()
    }

    async fn upload(&self, blob: &Blob, data: Chunks) -> Result<(), RemoteError> {
        let local_error = Arc::new(Mutex::new(None));
        let noted = Arc::clone(&local_error);
        // A local read error ends the body short of its Content-Length: the server drops it.
        let body = data.into_stream().map(move |chunk| {
            chunk.inspect_err(|err| {
                *noted.lock().unwrap_or_else(PoisonError::into_inner) =
                    Some(std::io::Error::new(err.kind(), err.to_string()));
            })
        });
        let sent = self
            .put(
                &self.url("cas", &blob.digest),
                reqwest::Body::wrap_stream(body),
                blob.size,
            )
            .await;
        if let Some(err) = local_error
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .take()
        {
            return Err(RemoteError::Local(err));
        }
        sent
    }

    async fn download(&self, blob: &Blob, sink: &mut Sink) -> Result<bool, RemoteError> {
        let url = self.url("cas", &blob.digest);
        let Some(response) = self.found(Method::GET, &url).await? else {
            return Ok(false);
        };
        self.chunks_into(response, &url, sink).await?;
        Ok(true)
    }
}
