//! GitHub webhooks: `X-Hub-Signature-256: sha256=<hex>`, the HMAC-SHA256 of the raw
//! body keyed with the hook's secret, and the events that can start a job.
//!
//! GitHub signs the body only: `X-GitHub-Delivery` and `X-GitHub-Event` are not
//! covered, and there is no timestamp to bound replays.

mod event;

use hmac::Mac;

pub use super::VerifyError;
use super::hmac;
pub use event::{EventError, GithubEvent, Push, Release};

const HEADER: &str = "X-Hub-Signature-256";
const PREFIX: &str = "sha256=";

/// The `X-Hub-Signature-256` value GitHub would send for `body`.
pub fn sign(secret: &[u8], body: &[u8]) -> String {
    let mut mac = hmac(secret);
    mac.update(body);
    format!("{PREFIX}{}", hex::encode(mac.finalize().into_bytes()))
}

/// Checks `X-Hub-Signature-256` (`header`, as received) against `body`, in constant
/// time. An empty secret is refused: it would let anyone sign.
pub fn verify(secret: &[u8], header: Option<&str>, body: &[u8]) -> Result<(), VerifyError> {
    if secret.is_empty() {
        return Err(VerifyError::BadSecret);
    }
    let header = header
        .map(str::trim)
        .filter(|h| !h.is_empty())
        .ok_or(VerifyError::Missing(HEADER))?;
    let tag = header
        .strip_prefix(PREFIX)
        .and_then(|h| hex::decode(h).ok())
        .ok_or(VerifyError::Malformed(
            "X-Hub-Signature-256 is not sha256= followed by hex digits",
        ))?;
    let mut mac = hmac(secret);
    mac.update(body);
    mac.verify_slice(&tag)
        .map_err(|_| VerifyError::NoMatchingSignature)
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

    use super::*;

    // docs.github.com, "Validating webhook deliveries" → "Testing the webhook
    // payload validation".
    const SECRET: &[u8] = b"It's a Secret to Everybody";
    const BODY: &[u8] = b"Hello, World!";
    const SIGNATURE: &str =
        "sha256=757107ea0eb2509fc211221cce984b8a37570b6d7586c22c46f4379c8b043e17";

    #[test]
    fn githubs_documented_example_signs_and_verifies() {
        assert_eq!(sign(SECRET, BODY), SIGNATURE);
        verify(SECRET, Some(SIGNATURE), BODY).unwrap();
    }

    #[test]
    fn wrong_signatures_are_refused() {
        let no_match = Err(VerifyError::NoMatchingSignature);
        assert_eq!(verify(SECRET, Some(SIGNATURE), b"Hello, World?"), no_match);
        assert_eq!(verify(b"another secret", Some(SIGNATURE), BODY), no_match);
        let zeros = format!("sha256={}", "0".repeat(64));
        assert_eq!(verify(SECRET, Some(&zeros), BODY), no_match);
        // A prefix of the right signature is not the signature.
        assert_eq!(verify(SECRET, Some(&SIGNATURE[..41]), BODY), no_match);
        for malformed in ["sha1=757107ea", "757107ea0eb2", "sha256=xyz", "SHA256=00"] {
            let e = verify(SECRET, Some(malformed), BODY).unwrap_err();
            assert!(matches!(e, VerifyError::Malformed(_)), "{malformed}: {e}");
        }
        for missing in [None, Some(""), Some("  ")] {
            let e = verify(SECRET, missing, BODY).unwrap_err();
            assert_eq!(e.to_string(), "missing X-Hub-Signature-256 header");
        }
        assert_eq!(
            verify(b"", Some(SIGNATURE), BODY),
            Err(VerifyError::BadSecret)
        );
    }
}
