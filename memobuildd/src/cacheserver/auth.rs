//! Who may read and write: the token file, and the check of a request's credentials.
//!
//! The file (`--auth FILE`) holds one token a line: `TOKEN ACCESS [NAME]`, where ACCESS is
//! `read-only` or `read-write` and NAME (default: the token's first 8 characters) names the
//! client in logs and analytics; `#` starts a comment. A request carries its token as
//! `Authorization: Bearer TOKEN`, or for HTTP clients that only know basic auth as the
//! password of `Authorization: Basic` (the user name is ignored). Without a file, everyone
//! reads and writes. The main type is [`Tokens`]; the listener asks it about every request.

use std::collections::HashMap;
use std::path::{Path, PathBuf};

use base64::Engine as _;
use sha2::{Digest as _, Sha256};

/// What a token allows.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub enum Access {
    ReadOnly,
    ReadWrite,
}

/// A client the token file names.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Client {
    pub name: String,
    pub access: Access,
}

#[derive(Debug, thiserror::Error)]
pub enum AuthError {
    #[error("token file {}: {source}", path.display())]
    Read {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },
    #[error("token file {}, line {line}: expected `TOKEN read-only|read-write [NAME]`", path.display())]
    Syntax { path: PathBuf, line: usize },
    #[error("token file {}, line {line}: the same token appears twice", path.display())]
    Duplicate { path: PathBuf, line: usize },
    #[error("token file {} holds no token: nobody could use the cache", path.display())]
    Empty { path: PathBuf },
}

/// Why a request was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Denied {
    /// No credentials, or ones the file does not hold (401 / UNAUTHENTICATED).
    Unauthenticated,
    /// A read-only token tried to write (403 / PERMISSION_DENIED).
    ReadOnly,
}

/// The tokens, by their SHA-256 (so a look-up compares hashes, not secrets).
#[derive(Debug, Default)]
pub struct Tokens {
    by_hash: Option<HashMap<[u8; 32], Client>>,
}

impl Tokens {
    /// Everyone may read and write.
    pub fn open_to_all() -> Self {
        Self { by_hash: None }
    }

    pub fn load(path: &Path) -> Result<Self, AuthError> {
        let text = std::fs::read_to_string(path).map_err(|source| AuthError::Read {
            path: path.to_owned(),
            source,
        })?;
        Self::parse(path, &text)
    }

    fn parse(path: &Path, text: &str) -> Result<Self, AuthError> {
        let mut by_hash = HashMap::new();
        for (n, line) in text.lines().enumerate() {
            let line = line.split('#').next().unwrap_or("").trim();
            if line.is_empty() {
                continue;
            }
            let syntax = || AuthError::Syntax {
                path: path.to_owned(),
                line: n + 1,
            };
            let mut words = line.split_whitespace();
            let (Some(token), Some(access)) = (words.next(), words.next()) else {
                return Err(syntax());
            };
            let access = match access {
                "read-only" => Access::ReadOnly,
                "read-write" => Access::ReadWrite,
                _ => return Err(syntax()),
            };
            let name = words
                .next()
                .map_or_else(|| token.chars().take(8).collect(), str::to_owned);
            if words.next().is_some() {
                return Err(syntax());
            }
            let client = Client { name, access };
            if by_hash.insert(hash(token), client).is_some() {
                return Err(AuthError::Duplicate {
                    path: path.to_owned(),
                    line: n + 1,
                });
            }
        }
        if by_hash.is_empty() {
            return Err(AuthError::Empty {
                path: path.to_owned(),
            });
        }
        Ok(Self {
            by_hash: Some(by_hash),
        })
    }

    pub fn enabled(&self) -> bool {
        self.by_hash.is_some()
    }

    /// The client behind an `Authorization` header value, if it may do what `need` says.
    /// `Ok(None)`: authentication is off.
    pub fn check(
        &self,
        authorization: Option<&[u8]>,
        need: Access,
    ) -> Result<Option<&Client>, Denied> {
        let Some(by_hash) = &self.by_hash else {
            return Ok(None);
        };
        let token = authorization
            .and_then(token_of)
            .ok_or(Denied::Unauthenticated)?;
        let client = by_hash.get(&hash(&token)).ok_or(Denied::Unauthenticated)?;
        if client.access < need {
            return Err(Denied::ReadOnly);
        }
        Ok(Some(client))
    }
}

fn hash(token: &str) -> [u8; 32] {
    Sha256::digest(token.as_bytes()).into()
}

/// The token in `Bearer TOKEN` or `Basic base64(user:TOKEN)`.
fn token_of(header: &[u8]) -> Option<String> {
    let header = std::str::from_utf8(header).ok()?.trim();
    let (scheme, value) = header.split_once(' ')?;
    let value = value.trim();
    if scheme.eq_ignore_ascii_case("bearer") {
        return Some(value.to_owned());
    }
    if scheme.eq_ignore_ascii_case("basic") {
        let decoded = base64::engine::general_purpose::STANDARD
            .decode(value)
            .ok()?;
        let decoded = String::from_utf8(decoded).ok()?;
        let (_user, password) = decoded.split_once(':')?;
        return Some(password.to_owned());
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tokens() -> Tokens {
        Tokens::parse(
            Path::new("tokens"),
            "# team tokens\nrw-token read-write ci\nro-token read-only  # laptops\n",
        )
        .expect("parse")
    }

    #[test]
    fn bearer_and_basic_tokens_with_their_access() {
        let tokens = tokens();
        let ci = tokens
            .check(Some(b"Bearer rw-token"), Access::ReadWrite)
            .expect("rw writes")
            .expect("a client");
        assert_eq!(ci.name, "ci");
        let basic = format!(
            "Basic {}",
            base64::engine::general_purpose::STANDARD.encode("anyone:ro-token")
        );
        let ro = tokens
            .check(Some(basic.as_bytes()), Access::ReadOnly)
            .expect("ro reads")
            .expect("a client");
        assert_eq!(ro.name, "ro-token");
        assert_eq!(
            tokens.check(Some(basic.as_bytes()), Access::ReadWrite),
            Err(Denied::ReadOnly)
        );
        assert_eq!(
            tokens.check(None, Access::ReadOnly),
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            tokens.check(Some(b"Bearer nope"), Access::ReadOnly),
            Err(Denied::Unauthenticated)
        );
        assert_eq!(
            Tokens::open_to_all().check(None, Access::ReadWrite),
            Ok(None)
        );
    }

    #[test]
    fn bad_files_are_refused_with_their_line() {
        for (text, line) in [
            ("t read-write\nt2 admin\n", 2),
            ("lonely\n", 1),
            ("t read-only a b\n", 1),
            ("t read-only\nt read-write\n", 2),
        ] {
            let err = Tokens::parse(Path::new("f"), text).expect_err(text);
            assert!(err.to_string().contains(&format!("line {line}")), "{err}");
        }
        assert!(matches!(
            Tokens::parse(Path::new("f"), "# nothing\n"),
            Err(AuthError::Empty { .. })
        ));
    }
}
