//! Image references as Docker spells them, normalized the way Docker does: `busybox` is
//! `docker.io/library/busybox:latest`.

use std::fmt;
use std::str::FromStr;

use crate::store::Digest;

/// Docker Hub's name for itself in references; its API lives at `index.docker.io`.
pub(super) const DOCKER_HUB: &str = "docker.io";
const DOCKER_HUB_LEGACY: &str = "index.docker.io";
const OFFICIAL_NAMESPACE: &str = "library";
const DEFAULT_TAG: &str = "latest";
/// Docker's limit on the length of the name part (registry and repository).
const MAX_NAME_LEN: usize = 255;
const MAX_TAG_LEN: usize = 128;

/// A parsed image reference: registry, repository and a tag, a digest or both.
///
/// Without a tag or digest the tag is `latest`; a reference with both keeps both, and the
/// digest is what is pulled.
#[derive(Debug, Clone, PartialEq, Eq, Hash)]
pub struct Reference {
    registry: String,
    repository: String,
    tag: Option<String>,
    digest: Option<Digest>,
}

/// Why a string is not an image reference; the message names the string.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
#[error("invalid image reference {reference:?}: {reason}")]
pub struct ReferenceError {
    pub reference: String,
    pub reason: String,
}

impl Reference {
    pub fn parse(text: &str) -> Result<Self, ReferenceError> {
        let fail = |reason: &str| ReferenceError {
            reference: text.to_owned(),
            reason: reason.to_owned(),
        };
        let (rest, digest) = match text.split_once('@') {
            Some((rest, digest)) => {
                let digest = Digest::parse(digest)
                    .map_err(|_| fail("the digest is not sha256:<64 lowercase hex>"))?;
                (rest, Some(digest))
            }
            None => (text, None),
        };
        // A colon after the last slash starts the tag; one before it is a registry port.
        let (name, tag) = match rest.rfind(':') {
            Some(colon) if !rest[colon..].contains('/') => {
                (&rest[..colon], Some(rest[colon + 1..].to_owned()))
            }
            _ => (rest, None),
        };
        if name.is_empty() {
            return Err(fail("the repository name is empty"));
        }
        if name.len() > MAX_NAME_LEN {
            return Err(fail("the name is longer than 255 characters"));
        }
        if let Some(tag) = &tag
            && !valid_tag(tag)
        {
            return Err(fail(
                "a tag is 1 to 128 of [A-Za-z0-9_.-], not starting with '.' or '-'",
            ));
        }

        let (registry, repository) = split_registry(name);
        if !valid_registry(registry) {
            return Err(fail("the registry is not a valid host[:port]"));
        }
        let registry = if registry == DOCKER_HUB_LEGACY {
            DOCKER_HUB
        } else {
            registry
        };
        if !repository.split('/').all(valid_path_component) {
            return Err(fail(
                "repository path components are lowercase letters and digits, joined by '.', '_', '__' or dashes",
            ));
        }
        let repository = if registry == DOCKER_HUB && !repository.contains('/') {
            format!("{OFFICIAL_NAMESPACE}/{repository}")
        } else {
            repository.to_owned()
        };
        let tag = match (tag, &digest) {
            (None, None) => Some(DEFAULT_TAG.to_owned()),
            (tag, _) => tag,
        };
        Ok(Self {
            registry: registry.to_owned(),
            repository,
            tag,
            digest,
        })
    }

    /// The registry host and optional port, `docker.io` for Docker Hub.
    pub fn registry(&self) -> &str {
        &self.registry
    }

    pub fn repository(&self) -> &str {
        &self.repository
    }

    pub fn tag(&self) -> Option<&str> {
        self.tag.as_deref()
    }

    pub fn digest(&self) -> Option<&Digest> {
        self.digest.as_ref()
    }

    /// The same repository, pinned to `digest` (tag dropped).
    pub fn with_digest(&self, digest: Digest) -> Self {
        Self {
            registry: self.registry.clone(),
            repository: self.repository.clone(),
            tag: None,
            digest: Some(digest),
        }
    }

    /// Where oci-client sends requests for this reference.
    pub(super) fn to_oci(&self) -> oci_client::Reference {
        let (registry, repository) = (self.registry.clone(), self.repository.clone());
        match (&self.tag, &self.digest) {
            (Some(tag), Some(digest)) => oci_client::Reference::with_tag_and_digest(
                registry,
                repository,
                tag.clone(),
                digest.to_string(),
            ),
            (None, Some(digest)) => {
                oci_client::Reference::with_digest(registry, repository, digest.to_string())
            }
            (tag, None) => oci_client::Reference::with_tag(
                registry,
                repository,
                tag.clone().unwrap_or_else(|| DEFAULT_TAG.to_owned()),
            ),
        }
    }
}

impl FromStr for Reference {
    type Err = ReferenceError;

    fn from_str(text: &str) -> Result<Self, Self::Err> {
        Self::parse(text)
    }
}

impl fmt::Display for Reference {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "{}/{}", self.registry, self.repository)?;
        if let Some(tag) = &self.tag {
            write!(f, ":{tag}")?;
        }
        if let Some(digest) = &self.digest {
            write!(f, "@{digest}")?;
        }
        Ok(())
    }
}

/// Docker's rule: the first component names a registry only if it looks like a host (has a
/// dot or a port, is `localhost`, or has uppercase letters, which repositories cannot).
fn split_registry(name: &str) -> (&str, &str) {
    match name.split_once('/') {
        Some((first, rest))
            if first.contains(['.', ':'])
                || first == "localhost"
                || first.bytes().any(|b| b.is_ascii_uppercase()) =>
        {
            (first, rest)
        }
        _ => (DOCKER_HUB, name),
    }
}

fn valid_registry(registry: &str) -> bool {
    let (host, port) = if let Some(bracketed) = registry.strip_prefix('[') {
        // [ipv6]:port
        let Some((addr, rest)) = bracketed.split_once(']') else {
            return false;
        };
        if addr.parse::<std::net::Ipv6Addr>().is_err() {
            return false;
        }
        match rest {
            "" => return true,
            rest => ("ipv6", rest.strip_prefix(':')),
        }
    } else {
        match registry.split_once(':') {
            Some((host, port)) => (host, Some(port)),
            None => (registry, None),
        }
    };
    let host_ok = !host.is_empty()
        && host.split('.').all(|label| {
            !label.is_empty()
                && !label.starts_with('-')
                && !label.ends_with('-')
                && label
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
        });
    let port_ok = port.is_none_or(|p| p.parse::<u16>().is_ok());
    host_ok && port_ok
}

/// `[a-z0-9]+((\.|_|__|-+)[a-z0-9]+)*`
fn valid_path_component(component: &str) -> bool {
    let bytes = component.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    let (Some(&first), Some(&last)) = (bytes.first(), bytes.last()) else {
        return false;
    };
    if !alnum(first) || !alnum(last) {
        return false;
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let separator = &component[start..i];
        let ok = separator == "."
            || separator == "_"
            || separator == "__"
            || separator.bytes().all(|b| b == b'-');
        if !ok {
            return false;
        }
    }
    true
}

fn valid_tag(tag: &str) -> bool {
    let bytes = tag.as_bytes();
    !bytes.is_empty()
        && bytes.len() <= MAX_TAG_LEN
        && (bytes[0].is_ascii_alphanumeric() || bytes[0] == b'_')
        && bytes
            .iter()
            .all(|&b| b.is_ascii_alphanumeric() || matches!(b, b'_' | b'.' | b'-'))
}

#[cfg(test)]
mod tests {
    use super::*;

    const HEX: &str = "0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef";

    #[test]
    fn docker_defaults_and_full_display() {
        let d = format!("sha256:{HEX}");
        // input, registry, repository, tag, full form (the digest, if any, is `d`)
        let cases = [
            (
                "busybox",
                "docker.io",
                "library/busybox",
                Some("latest"),
                "docker.io/library/busybox:latest".to_owned(),
            ),
            (
                "busybox:1.36",
                "docker.io",
                "library/busybox",
                Some("1.36"),
                "docker.io/library/busybox:1.36".to_owned(),
            ),
            (
                "library/busybox",
                "docker.io",
                "library/busybox",
                Some("latest"),
                "docker.io/library/busybox:latest".to_owned(),
            ),
            (
                "index.docker.io/busybox",
                "docker.io",
                "library/busybox",
                Some("latest"),
                "docker.io/library/busybox:latest".to_owned(),
            ),
            (
                "user/app",
                "docker.io",
                "user/app",
                Some("latest"),
                "docker.io/user/app:latest".to_owned(),
            ),
            (
                "host:5000/a/b:tag",
                "host:5000",
                "a/b",
                Some("tag"),
                "host:5000/a/b:tag".to_owned(),
            ),
            (
                "localhost/x",
                "localhost",
                "x",
                Some("latest"),
                "localhost/x:latest".to_owned(),
            ),
            (
                "127.0.0.1:5000/x",
                "127.0.0.1:5000",
                "x",
                Some("latest"),
                "127.0.0.1:5000/x:latest".to_owned(),
            ),
            (
                "[::1]:5000/x:v1",
                "[::1]:5000",
                "x",
                Some("v1"),
                "[::1]:5000/x:v1".to_owned(),
            ),
            (
                "ghcr.io/o/r/deep-name__x.y",
                "ghcr.io",
                "o/r/deep-name__x.y",
                Some("latest"),
                "ghcr.io/o/r/deep-name__x.y:latest".to_owned(),
            ),
            (
                &*format!("busybox@{d}"),
                "docker.io",
                "library/busybox",
                None,
                format!("docker.io/library/busybox@{d}"),
            ),
            (
                &*format!("host:5000/a:t@{d}"),
                "host:5000",
                "a",
                Some("t"),
                format!("host:5000/a:t@{d}"),
            ),
        ];
        for (text, registry, repository, tag, display) in cases {
            let r = Reference::parse(text).unwrap_or_else(|e| panic!("{text}: {e}"));
            assert_eq!(r.registry(), registry, "{text}");
            assert_eq!(r.repository(), repository, "{text}");
            assert_eq!(r.tag(), tag, "{text}");
            assert_eq!(r.digest().is_some(), text.contains('@'), "{text}");
            assert_eq!(r.to_string(), display, "{text}");
            assert_eq!(
                Reference::parse(&display).as_ref(),
                Ok(&r),
                "round trip {text}"
            );
        }
    }

    #[test]
    fn bad_references_are_named_in_the_error() {
        for bad in [
            "",
            "Busybox",
            "busybox:",
            "busybox:-x",
            "a//b",
            "host:port/x",
            "x@sha256:abc",
            "x@md5:0123",
            "-lead/x",
            "a/b_-c",
            "host:5000/",
            &format!("x:{}", "t".repeat(129)),
        ] {
            let err = Reference::parse(bad).expect_err(bad);
            assert!(err.to_string().contains(&format!("{bad:?}")), "{err}");
        }
    }

    #[test]
    fn with_digest_pins_the_reference() {
        let digest = Digest::parse(&format!("sha256:{HEX}")).expect("digest");
        let r = Reference::parse("host:5000/a:tag")
            .expect("parse")
            .with_digest(digest.clone());
        assert_eq!(r.tag(), None);
        assert_eq!(r.digest(), Some(&digest));
        assert_eq!(r.to_oci().digest(), Some(digest.as_str()));
    }
}
