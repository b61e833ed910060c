//! [`RegistryError`], and the one place where oci-client's and reqwest's errors are sorted
//! into it.

use std::path::PathBuf;

use oci_client::errors::{OciDistributionError, OciErrorCode};

use super::auth::{PASSWORD_ENV, USER_ENV};
use super::manifest::Platform;
use super::reference::ReferenceError;
use crate::store::{CasError, Digest};

/// What went wrong talking to a registry, sorted so the server can map each kind to an
/// error code and a user can act on the message.
#[derive(Debug, thiserror::Error)]
pub enum RegistryError {
    #[error(transparent)]
    Reference(#[from] ReferenceError),
    #[error(
        "{registry} refused {reference}: authentication required or the credentials were rejected; \
         run `docker login {registry}` (or add it to the Docker config's auths/credHelpers), \
         or set {USER_ENV} and {PASSWORD_ENV}"
    )]
    Unauthorized { registry: String, reference: String },
    #[error("{registry} denied access to {reference} for these credentials")]
    Forbidden { registry: String, reference: String },
    #[error("{reference}: not found")]
    NotFound { reference: String },
    #[error(
        "{reference} has no image for platform {wanted}; it offers: {}",
        list(available)
    )]
    NoMatchingPlatform {
        reference: String,
        wanted: Platform,
        available: Vec<Platform>,
    },
    #[error("registry {registry} is unavailable: {reason}")]
    Unavailable { registry: String, reason: String },
    #[error(
        "the TLS certificate of {registry} is not trusted ({reason}); give its CA as extra_ca \
         or add it to the system's trust store"
    )]
    Untrusted { registry: String, reason: String },
    /// `repository` is `registry/repository`, where the content came from.
    #[error("blob {digest} from {repository} is corrupt: its content does not match its digest")]
    Corrupt { digest: Digest, repository: String },
    #[error("credentials for {registry}: {reason}")]
    Credentials { registry: String, reason: String },
    #[error("{registry}: {reason}")]
    Protocol { registry: String, reason: String },
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("local blob store: {0}")]
    Store(#[source] CasError),
}

fn list(platforms: &[Platform]) -> String {
    if platforms.is_empty() {
        return "no platforms".to_owned();
    }
    platforms
        .iter()
        .map(ToString::to_string)
        .collect::<Vec<_>>()
        .join(", ")
}

/// What a failed request was about, so that its error can name it.
#[derive(Debug, Clone, Copy)]
pub(super) struct Subject<'a> {
    pub registry: &'a str,
    /// The reference, or `repository@digest` for a blob.
    pub reference: &'a str,
    /// The digest the content must have, when checking it is part of the request.
    pub digest: Option<&'a Digest>,
}

impl Subject<'_> {
    pub(super) fn protocol(&self, reason: impl std::fmt::Display) -> RegistryError {
        RegistryError::Protocol {
            registry: self.registry.to_owned(),
            reason: format!("{}: {reason}", self.reference),
        }
    }

    fn unauthorized(&self) -> RegistryError {
        RegistryError::Unauthorized {
            registry: self.registry.to_owned(),
            reference: self.reference.to_owned(),
        }
    }

    fn forbidden(&self) -> RegistryError {
        RegistryError::Forbidden {
            registry: self.registry.to_owned(),
            reference: self.reference.to_owned(),
        }
    }

    fn not_found(&self) -> RegistryError {
        RegistryError::NotFound {
            reference: self.reference.to_owned(),
        }
    }

    pub(super) fn corrupt(&self, digest: &Digest) -> RegistryError {
        let repository = self.reference.split('@').next().unwrap_or(self.reference);
        RegistryError::Corrupt {
            digest: digest.clone(),
            repository: repository.to_owned(),
        }
    }

    fn unavailable(&self, reason: String) -> RegistryError {
        RegistryError::Unavailable {
            registry: self.registry.to_owned(),
            reason,
        }
    }

    fn status(&self, code: u16, message: &str) -> RegistryError {
        match code {
            401 => self.unauthorized(),
            403 => self.forbidden(),
            404 => self.not_found(),
            code => self.protocol(format_args!("HTTP {code}: {}", message.trim())),
        }
    }

    /// Sorts an oci-client error.
    pub(super) fn classify(&self, err: OciDistributionError) -> RegistryError {
        match err {
            OciDistributionError::UnauthorizedError { .. }
            | OciDistributionError::AuthenticationFailure(_) => self.unauthorized(),
            OciDistributionError::ImageManifestNotFoundError(_) => self.not_found(),
            OciDistributionError::RegistryError { envelope, .. } => {
                let code = envelope.errors.first().map(|e| &e.code);
                match code {
                    Some(OciErrorCode::Unauthorized) => self.unauthorized(),
                    Some(OciErrorCode::Denied) => self.forbidden(),
                    Some(
                        OciErrorCode::ManifestUnknown
                        | OciErrorCode::BlobUnknown
                        | OciErrorCode::NameUnknown
                        | OciErrorCode::NotFound,
                    ) => self.not_found(),
                    _ => self.protocol(envelope),
                }
            }
            OciDistributionError::ServerError { code, message, .. } => self.status(code, &message),
            OciDistributionError::RequestError(err) => self.transport(&err),
            OciDistributionError::DigestError(
                oci_client::errors::DigestError::VerificationError { .. },
            ) => match self.digest {
                Some(digest) => self.corrupt(digest),
                None => self.protocol("the content does not match its digest"),
            },
            OciDistributionError::IoError(err) => self.stream(err),
            other => self.protocol(other),
        }
    }

    /// Sorts a reqwest error: a status, or trouble reaching or hearing from the registry.
    fn transport(&self, err: &reqwest::Error) -> RegistryError {
        if let Some(status) = err.status() {
            return self.status(status.as_u16(), &err.to_string());
        }
        if err.is_decode() || err.is_builder() || err.is_redirect() {
            return self.protocol(chain(err));
        }
        if let Some(tls) = causes(err).find_map(|e| e.downcast_ref::<rustls::Error>()) {
            return RegistryError::Untrusted {
                registry: self.registry.to_owned(),
                reason: tls.to_string(),
            };
        }
        self.unavailable(chain(err))
    }

    /// Sorts an error met while reading a response body: oci-client's digest check, or the
    /// connection failing.
    pub(super) fn stream(&self, err: std::io::Error) -> RegistryError {
        let is_digest = err
            .get_ref()
            .is_some_and(|inner| inner.is::<oci_client::errors::DigestError>());
        match (is_digest, self.digest) {
            (true, Some(digest)) => self.corrupt(digest),
            _ => self.unavailable(chain(&err)),
        }
    }
}

/// An error and its causes, looking inside `io::Error`s too: their `source()` skips the
/// error they wrap, which is where reqwest and rustls put what went wrong.
pub(crate) fn causes<'a>(
    err: &'a (dyn std::error::Error + 'static),
) -> impl Iterator<Item = &'a (dyn std::error::Error + 'static)> {
    std::iter::successors(Some(err), |err| {
        match err
            .downcast_ref::<std::io::Error>()
            .and_then(|io| io.get_ref())
        {
            Some(inner) => Some(inner as &(dyn std::error::Error + 'static)),
            None => err.source(),
        }
    })
}

/// An error with its causes, `a: b: c`: reqwest's own message alone ("error sending
/// request") does not say that the connection was refused.
pub(crate) fn chain(err: &(dyn std::error::Error + 'static)) -> String {
    let mut text = String::new();
    for cause in causes(err) {
        let cause_text = cause.to_string();
        if !text.contains(&cause_text) {
            if !text.is_empty() {
                text.push_str(": ");
            }
            text.push_str(&cause_text);
        }
    }
    text
}
