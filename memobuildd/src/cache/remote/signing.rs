//! Trust in a shared cache: with a secret, every entry this daemon uploads carries an
//! HMAC-SHA256 over the action digest and the result ([`Signer`]); an entry read back is
//! used only if its tag verifies (constant-time). Anyone who can write to the cache but does
//! not hold the secret cannot make another machine use a result of theirs. Blobs need no
//! signature: they are checked against their digest, and the signed result names them.
//!
//! The tagged message is `DOMAIN ∥ action hash (32 bytes) ∥ action size (u64 LE) ∥ body`,
//! where the body is the result's serialization (`mapping`): a tag made for one action never
//! verifies for another, and no other use of the same secret can produce one.

use hmac::{KeyInit, Mac};
use sha2::Sha256;

use super::settings::Secret;
use crate::store::Blob;

type HmacSha256 = hmac::Hmac<Sha256>;

/// Length of a tag.
pub const TAG_LEN: usize = 32;
const DOMAIN: &[u8] = b"memobuild/l3/result-signature/v1\0";

/// Signs and verifies results with one shared secret.
#[derive(Clone)]
pub struct Signer {
    mac: HmacSha256,
}

impl std::fmt::Debug for Signer {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Signer(<secret>)")
    }
}

impl Signer {
    pub fn new(secret: &Secret) -> Self {
        Self {
            // HMAC takes a key of any length.
            mac: HmacSha256::new_from_slice(secret.expose()).expect("HMAC accepts any key length"),
        }
    }

    fn message(&self, action: &Blob, body: &[u8]) -> HmacSha256 {
        let mut mac = self.mac.clone();
        mac.update(DOMAIN);
        mac.update(&hex::decode(action.digest.hex()).expect("a parsed digest is hex"));
        mac.update(&action.size.to_le_bytes());
        mac.update(body);
        mac
    }

    pub fn sign(&self, action: &Blob, body: &[u8]) -> [u8; TAG_LEN] {
        self.message(action, body).finalize().into_bytes().into()
    }

    /// Whether `tag` is this secret's tag for `action` and `body`, compared in constant time.
    pub fn verify(&self, action: &Blob, body: &[u8], tag: &[u8]) -> bool {
        self.message(action, body).verify_slice(tag).is_ok()
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::store::Digest;

    fn action(text: &[u8]) -> Blob {
        Blob {
            digest: Digest::of(text),
            size: text.len() as u64,
        }
    }

    #[test]
    fn a_tag_verifies_only_for_its_secret_action_and_body() {
        let signer = Signer::new(&Secret::new("team secret"));
        let tag = signer.sign(&action(b"a"), b"body");
        assert!(signer.verify(&action(b"a"), b"body", &tag));
        assert!(!signer.verify(&action(b"b"), b"body", &tag), "other action");
        assert!(!signer.verify(&action(b"a"), b"bodz", &tag), "other body");
        assert!(
            !signer.verify(&action(b"a"), b"body", &tag[..31]),
            "short tag"
        );
        let other = Signer::new(&Secret::new("another secret"));
        assert!(!other.verify(&action(b"a"), b"body", &tag), "other secret");
    }

    #[test]
    fn tags_are_hmac_sha256_of_the_documented_message() {
        // RFC 4231 test case 2 checks the primitive; this pins our framing around it.
        let key = Secret::new("Jefe");
        let plain = HmacSha256::new_from_slice(b"Jefe")
            .expect("key")
            .chain_update(b"what do ya want for nothing?")
            .finalize()
            .into_bytes();
        assert_eq!(
            hex::encode(plain),
            "5bdcc146bf60754e6a042426089575c75a003f089d2739839dec58b964ec3843"
        );
        let blob = action(b"x");
        let mut framed = DOMAIN.to_vec();
        framed.extend(hex::decode(blob.digest.hex()).expect("hex"));
        framed.extend(1u64.to_le_bytes());
        framed.extend(b"body");
        let expected = HmacSha256::new_from_slice(b"Jefe")
            .expect("key")
            .chain_update(&framed)
            .finalize()
            .into_bytes();
        assert_eq!(Signer::new(&key).sign(&blob, b"body")[..], expected[..]);
    }
}
