//! Registry access: pulling base images into the CAS and pushing built images, over the OCI
//! distribution API (through `oci-client`).
//!
//! - [`Reference`] parses Docker-style image references with Docker's defaults.
//! - [`Registry`] is the client: [`Registry::resolve`] (reference → platform manifest
//!   digest), [`Registry::pull`] (manifest, config and layers into the [`Cas`], each verified
//!   against its digest while it is written, skipped if already there), [`Registry::push`]
//!   (blobs the registry lacks, streamed from the CAS, cross-repository mounts where
//!   possible, then the manifest).
//! - [`RegistryError`] sorts failures into kinds the server maps to error codes.
//!
//! Transport: registries on 127.0.0.0/8, `::1`, `localhost` and those listed in
//! [`RegistryOptions::insecure`] are spoken to over plain HTTP, as Docker does; all others
//! over HTTPS with the system's roots plus [`RegistryOptions::extra_ca`]. Requests that fail
//! for a passing reason (5xx, 429, reset connections, timeouts) are retried with bounded
//! exponential backoff.
//!
//! Credentials, first found wins: the environment variables `MEMOBUILD_REGISTRY_USER` and
//! `MEMOBUILD_REGISTRY_PASSWORD` (both set: used for the registry `MEMOBUILD_REGISTRY_SERVER`
//! names, or for every registry when it is unset); Docker's config file
//! ([`RegistryOptions::docker_config`], default `$DOCKER_CONFIG/config.json` or
//! `~/.docker/config.json`) — its `credHelpers` entry for the registry, an inline `auths`
//! entry, or the `credsStore` helper, run as `docker-credential-<name> get`; anonymous
//! otherwise. OAuth identity tokens (`identitytoken`) are not supported.
//!
//! Pulled images go on to the `snapshot` stage (unpacking layers); pushes come from the
//! exporters at the end of a build.

mod auth;
pub(crate) mod error;
mod manifest;
mod pull;
mod push;
mod reference;
mod retry;

use std::collections::HashMap;
use std::net::IpAddr;
use std::path::PathBuf;
use std::sync::{Mutex, PoisonError};
use std::time::Duration;

use oci_client::client::{Certificate, CertificateEncoding, ClientConfig, ClientProtocol};
use oci_client::secrets::RegistryAuth;

pub use auth::{PASSWORD_ENV, SERVER_ENV, USER_ENV};
pub use error::RegistryError;
pub use manifest::{DOCKER_LIST, DOCKER_MANIFEST, OCI_INDEX, OCI_MANIFEST, Platform};
pub use pull::{Pulled, PulledLayer, Resolved};
pub use push::{PushEvent, PushImage, PushReport};
pub use reference::{Reference, ReferenceError};

use retry::Backoff;

const USER_AGENT: &str = concat!("memobuild/", env!("CARGO_PKG_VERSION"));
/// A registry that does not accept a connection in this time is reported unavailable.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(10);
/// A response that stalls this long mid-body is abandoned (and retried).
const READ_TIMEOUT: Duration = Duration::from_secs(60);

/// How to reach registries.
#[derive(Debug, Clone, Default)]
pub struct RegistryOptions {
    /// `host[:port]` of registries spoken to over plain HTTP, besides 127.0.0.0/8, `::1` and
    /// `localhost`, which always are. A bare host matches every port.
    pub insecure: Vec<String>,
    /// A PEM file of extra CA certificates trusted for HTTPS, besides the system's.
    pub extra_ca: Option<PathBuf>,
    /// Docker's config file, for credentials; default `$DOCKER_CONFIG/config.json` or
    /// `~/.docker/config.json`.
    pub docker_config: Option<PathBuf>,
}

/// A registry client, shared by every pull and push of a daemon.
pub struct Registry {
    insecure: Vec<String>,
    extra_ca: Option<Vec<u8>>,
    docker_config: Option<PathBuf>,
    backoff: Backoff,
    /// One client per registry host: its protocol and credentials are the host's, and
    /// oci-client caches tokens per client.
    hosts: Mutex<HashMap<String, Host>>,
}

impl std::fmt::Debug for Registry {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Registry")
            .field("insecure", &self.insecure)
            .field("extra_ca", &self.extra_ca.is_some())
            .field("docker_config", &self.docker_config)
            .finish_non_exhaustive()
    }
}

/// A connected registry host.
#[derive(Clone)]
struct Host {
    client: oci_client::Client,
    auth: RegistryAuth,
}

impl Registry {
    pub fn new(options: RegistryOptions) -> Result<Self, RegistryError> {
        // reqwest is built without a default crypto provider (to avoid aws-lc's C build);
        // the first registry client picks ring. An error means one is installed already.
        let _ = rustls::crypto::ring::default_provider().install_default();
        let extra_ca = options
            .extra_ca
            .as_ref()
            .map(|path| {
                std::fs::read(path).map_err(|source| RegistryError::Io {
                    path: path.clone(),
                    source,
                })
            })
            .transpose()?;
        Ok(Self {
            insecure: options.insecure,
            extra_ca,
            docker_config: options.docker_config.or_else(auth::default_docker_config),
            backoff: Backoff::DEFAULT,
            hosts: Mutex::default(),
        })
    }

    /// The client for `reference`'s registry, made (and its credentials looked up) on
    /// first use.
    async fn host(&self, reference: &Reference) -> Result<Host, RegistryError> {
        let registry = reference.registry();
        if let Some(host) = self.hosts().get(registry) {
            return Ok(host.clone());
        }
        // Made without the lock held (a credential helper may take a while); if two
        // requests race, the first one stored wins and the other client is dropped.
        let auth = auth::credentials(self.docker_config.as_deref(), registry).await?;
        let protocol = if plain_http(registry, &self.insecure) {
            ClientProtocol::Http
        } else {
            ClientProtocol::Https
        };
        let config = ClientConfig {
            protocol,
            // One PUT per blob, its body streamed from the CAS.
            use_monolithic_push: true,
            extra_root_certificates: self
                .extra_ca
                .iter()
                .map(|pem| Certificate {
                    encoding: CertificateEncoding::Pem,
                    data: pem.clone(),
                })
                .collect(),
            // Index entries are chosen by `manifest::select`, for the caller's platform.
            platform_resolver: None,
            connect_timeout: Some(CONNECT_TIMEOUT),
            read_timeout: Some(READ_TIMEOUT),
            user_agent: USER_AGENT,
            ..ClientConfig::default()
        };
        let client =
            oci_client::Client::try_from(config).map_err(|err| RegistryError::Protocol {
                registry: registry.to_owned(),
                reason: format!("cannot set up a client: {}", error::chain(&err)),
            })?;
        // Blob requests take credentials from the client's store, not from an argument.
        client
            .store_auth_if_needed(reference.to_oci().resolve_registry(), &auth)
            .await;
        let host = Host { client, auth };
        Ok(self
            .hosts()
            .entry(registry.to_owned())
            .or_insert(host)
            .clone())
    }

    fn hosts(&self) -> std::sync::MutexGuard<'_, HashMap<String, Host>> {
        // The map is only read and inserted into: a panic elsewhere cannot leave it torn.
        self.hosts.lock().unwrap_or_else(PoisonError::into_inner)
    }

    /// Passes `result` on. Refused credentials are dropped with their client, so the next
    /// request looks them up afresh: a `docker login` takes effect without a restart.
    fn forget_refused<T>(
        &self,
        registry: &str,
        result: Result<T, RegistryError>,
    ) -> Result<T, RegistryError> {
        if let Err(RegistryError::Unauthorized { .. } | RegistryError::Forbidden { .. }) = &result {
            self.hosts().remove(registry);
        }
        result
    }
}

/// Whether `registry` (`host[:port]`) is spoken to over plain HTTP.
fn plain_http(registry: &str, insecure: &[String]) -> bool {
    let host = match registry.strip_prefix('[') {
        Some(bracketed) => bracketed.split(']').next().unwrap_or(bracketed),
        None => registry.split(':').next().unwrap_or(registry),
    };
    host == "localhost"
        || host.parse::<IpAddr>().is_ok_and(|ip| ip.is_loopback())
        || insecure
            .iter()
            .any(|entry| entry == registry || entry == host)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::layout::Layout;
    use crate::store::{Store, StoreOptions};

    #[test]
    fn operations_can_be_spawned_on_a_multithreaded_runtime() {
        fn send<T: Send>(_: &T) {}
        let registry = Registry::new(RegistryOptions::default()).expect("registry");
        let dir = tempfile::tempdir().expect("tempdir");
        let cas = Store::open(&Layout::new(dir.path()), StoreOptions::default())
            .expect("store")
            .cas();
        let reference = Reference::parse("localhost/x").expect("reference");
        let platform = Platform::host();
        let image = PushImage {
            manifest_bytes: Vec::new(),
            manifest_media_type: OCI_MANIFEST.to_owned(),
            config: cas.put(b"{}").expect("put"),
            layers: Vec::new(),
            mount_from: Vec::new(),
        };
        send(&registry.resolve(&reference, &platform));
        send(&registry.pull(&cas, &reference, &platform));
        send(&registry.push(&cas, &image, &reference, &|_| {}));
    }

    #[test]
    fn loopback_and_listed_registries_use_plain_http() {
        let insecure = ["build.lan:5000".to_owned(), "mirror.lan".to_owned()];
        for plain in [
            "localhost",
            "localhost:5000",
            "127.0.0.1:5000",
            "127.8.9.10",
            "[::1]:5000",
            "build.lan:5000",
            "mirror.lan:443",
        ] {
            assert!(plain_http(plain, &insecure), "{plain}");
        }
        for tls in [
            "docker.io",
            "ghcr.io",
            "build.lan:5001",
            "10.0.0.1:5000",
            "[::2]:5000",
        ] {
            assert!(!plain_http(tls, &insecure), "{tls}");
        }
    }
}
