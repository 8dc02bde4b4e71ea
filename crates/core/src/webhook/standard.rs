//! [Standard Webhooks](https://github.com/standard-webhooks/standard-webhooks/blob/main/spec/standard-webhooks.md)
//! symmetric signatures: HMAC-SHA256 over `{webhook-id}.{webhook-timestamp}.{body}`,
//! sent base64-encoded as `v1,<signature>` in `webhook-signature`.

use base64::Engine;
use base64::engine::general_purpose::STANDARD as BASE64;
use hmac::Mac;

pub use super::VerifyError;
use super::{HmacSha256, hmac};

/// How far `webhook-timestamp` may be from now, either way, before a delivery is
/// refused: the spec's replay window.
pub const TOLERANCE_SECS: i64 = 5 * 60;

const PREFIX: &str = "whsec_";
const VERSION: &str = "v1";

/// A signing key. Its `Debug` shows no key material.
#[derive(Clone, PartialEq, Eq)]
pub struct Secret(Vec<u8>);

impl Secret {
    /// A secret as Standard Webhooks writes it, `whsec_<base64>`, or the base64
    /// alone (some senders show it without the prefix).
    pub fn parse(text: &str) -> Result<Secret, VerifyError> {
        let b64 = text.strip_prefix(PREFIX).unwrap_or(text);
        match BASE64.decode(b64.trim()) {
            Ok(key) if !key.is_empty() => Ok(Secret(key)),
            _ => Err(VerifyError::BadSecret),
        }
    }

    /// A secret that is the key bytes themselves (a GitHub hook's secret string).
    pub fn from_bytes(key: impl Into<Vec<u8>>) -> Secret {
        Secret(key.into())
    }

    pub(crate) fn as_bytes(&self) -> &[u8] {
        &self.0
    }
}

impl std::fmt::Debug for Secret {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// The three headers a Standard Webhooks delivery carries, as received.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Headers {
    /// `webhook-id`: the delivery's id, the same on every retry.
    pub id: Option<String>,
    /// `webhook-timestamp`: when this attempt was sent, in Unix seconds.
    pub timestamp: Option<String>,
    /// `webhook-signature`: space-separated `<version>,<base64>` signatures.
    pub signature: Option<String>,
}

/// The `v1,<base64>` signature of one delivery, as a sender puts it in `webhook-signature`.
pub fn sign(secret: &Secret, id: &str, timestamp: i64, body: &[u8]) -> String {
    let tag = keyed(secret, id, timestamp, body).finalize().into_bytes();
    format!("{VERSION},{}", BASE64.encode(tag))
}

/// Checks a delivery: all three headers present, the timestamp within
/// [`TOLERANCE_SECS`] of `now_unix_secs`, and at least one `v1` signature made with
/// `secret` over this id, timestamp and body. Signatures of other versions (`v1a`)
/// and undecodable ones are skipped: the header lists several so that a sender can
/// rotate secrets, and one match is enough. Comparison is in constant time.
pub fn verify(
    secret: &Secret,
    headers: &Headers,
    body: &[u8],
    now_unix_secs: i64,
) -> Result<(), VerifyError> {
    let id = present(&headers.id, "webhook-id")?;
    let timestamp = present(&headers.timestamp, "webhook-timestamp")?;
    let signatures = present(&headers.signature, "webhook-signature")?;
    if secret.0.is_empty() {
        return Err(VerifyError::BadSecret);
    }
    let timestamp: i64 = timestamp.parse().map_err(|_| VerifyError::BadTimestamp)?;
    // Saturating, so that absurd timestamps are refused rather than overflow.
    if now_unix_secs.saturating_sub(timestamp) > TOLERANCE_SECS {
        return Err(VerifyError::Stale);
    }
    if timestamp.saturating_sub(now_unix_secs) > TOLERANCE_SECS {
        return Err(VerifyError::Future);
    }
    let mac = keyed(secret, id, timestamp, body);
    let matched = signatures
        .split(' ')
        .filter_map(|s| s.split_once(','))
        .filter(|(version, _)| *version == VERSION)
        .filter_map(|(_, b64)| BASE64.decode(b64).ok())
        .any(|tag| mac.clone().verify_slice(&tag).is_ok());
    if matched {
        Ok(())
    } else {
        Err(VerifyError::NoMatchingSignature)
    }
}

/// A header's value, trimmed; absent and empty are the same.
fn present<'a>(header: &'a Option<String>, name: &'static str) -> Result<&'a str, VerifyError> {
    header
        .as_deref()
        .map(str::trim)
        .filter(|v| !v.is_empty())
        .ok_or(VerifyError::Missing(name))
}

/// The MAC over `{id}.{timestamp}.{body}`, before finalizing. The timestamp is
/// written back from its parsed value, as the reference libraries do.
fn keyed(secret: &Secret, id: &str, timestamp: i64, body: &[u8]) -> HmacSha256 {
    let mut mac = hmac(&secret.0);
    mac.update(id.as_bytes());
    mac.update(b".");
    mac.update(timestamp.to_string().as_bytes());
    mac.update(b".");
    mac.update(body);
    mac
}

#[cfg(test)]
mod tests {
    #![allow(clippy::unwrap_used)] // a failed unwrap is a failed test

    use super::*;

    // The reference libraries' known-answer vectors (standard-webhooks repo):
    // libraries/python/tests/test_webhooks.py, test_sign_function ...
    const PY_SECRET: &str = "whsec_MfKQ9r8GKYqrTwjUPD8ILPZIo2LaLaSw";
    const PY_ID: &str = "msg_p5jXN8AQM9LWM0D4loKWxJek";
    const PY_TS: i64 = 1614265330;
    const PY_BODY: &[u8] = br#"{"test": 2432232314}"#;
    const PY_SIG: &str = "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OE=";
    // ... and libraries/rust/src/lib.rs, test_sign.
    const RS_SECRET: &str = "whsec_C2FVsBQIhrscChlQIMV+b5sSYspob7oD";
    const RS_ID: &str = "msg_27UH4WbU6Z5A5EzD8u03UvzRbpk";
    const RS_TS: i64 = 1649367553;
    const RS_BODY: &[u8] = br#"{"email":"test@example.com","username":"test_user"}"#;
    const RS_SIG: &str = "v1,tZ1I4/hDygAJgO5TYxiSd6Sd0kDW6hPenDe+bTa3Kkw=";

    fn headers(id: &str, ts: i64, sig: &str) -> Headers {
        Headers {
            id: Some(id.into()),
            timestamp: Some(ts.to_string()),
            signature: Some(sig.into()),
        }
    }

    #[test]
    fn the_published_examples_sign_and_verify() {
        for (secret, id, ts, body, sig) in [
            (PY_SECRET, PY_ID, PY_TS, PY_BODY, PY_SIG),
            (RS_SECRET, RS_ID, RS_TS, RS_BODY, RS_SIG),
        ] {
            let secret = Secret::parse(secret).unwrap();
            assert_eq!(sign(&secret, id, ts, body), sig);
            verify(&secret, &headers(id, ts, sig), body, ts).unwrap();
        }
        // The same key without its prefix.
        let bare = Secret::parse(PY_SECRET.trim_start_matches("whsec_")).unwrap();
        verify(&bare, &headers(PY_ID, PY_TS, PY_SIG), PY_BODY, PY_TS + 10).unwrap();
    }

    #[test]
    fn tampering_and_wrong_secrets_are_refused() {
        let secret = Secret::parse(PY_SECRET).unwrap();
        let h = headers(PY_ID, PY_TS, PY_SIG);
        let no_match = Err(VerifyError::NoMatchingSignature);
        assert_eq!(
            verify(&secret, &h, br#"{"test": 2432232315}"#, PY_TS),
            no_match
        );
        let other = Secret::parse(RS_SECRET).unwrap();
        assert_eq!(verify(&other, &h, PY_BODY, PY_TS), no_match);
        // The id and timestamp are signed too.
        let moved = headers("msg_other", PY_TS, PY_SIG);
        assert_eq!(verify(&secret, &moved, PY_BODY, PY_TS), no_match);
        let later = headers(PY_ID, PY_TS + 1, PY_SIG);
        assert_eq!(verify(&secret, &later, PY_BODY, PY_TS), no_match);
        // The Python suite's altered signature (last character changed).
        let altered = headers(
            PY_ID,
            PY_TS,
            "v1,g0hM9SsE+OTPJTGt/tmIKtSyZlE3uFJELVlNIOLJ1OA=",
        );
        assert_eq!(verify(&secret, &altered, PY_BODY, PY_TS), no_match);
        // A right signature under another version tag is not a v1 signature.
        let v1a = headers(PY_ID, PY_TS, &PY_SIG.replace("v1,", "v1a,"));
        assert_eq!(verify(&secret, &v1a, PY_BODY, PY_TS), no_match);
    }

    #[test]
    fn timestamps_outside_five_minutes_are_refused() {
        let secret = Secret::parse(PY_SECRET).unwrap();
        let h = headers(PY_ID, PY_TS, PY_SIG);
        verify(&secret, &h, PY_BODY, PY_TS + TOLERANCE_SECS).unwrap();
        verify(&secret, &h, PY_BODY, PY_TS - TOLERANCE_SECS).unwrap();
        let stale = verify(&secret, &h, PY_BODY, PY_TS + TOLERANCE_SECS + 1);
        assert_eq!(stale, Err(VerifyError::Stale));
        let future = verify(&secret, &h, PY_BODY, PY_TS - TOLERANCE_SECS - 1);
        assert_eq!(future, Err(VerifyError::Future));
        for bad in ["soon", "1.5", "", "99999999999999999999"] {
            let mut h = h.clone();
            h.timestamp = Some(bad.into());
            let e = verify(&secret, &h, PY_BODY, PY_TS).unwrap_err();
            assert!(
                matches!(e, VerifyError::BadTimestamp | VerifyError::Missing(_)),
                "{bad}: {e}"
            );
        }
        for extreme in [i64::MIN, i64::MAX] {
            let h = headers(PY_ID, extreme, PY_SIG);
            assert!(verify(&secret, &h, PY_BODY, PY_TS).is_err());
        }
    }

    #[test]
    fn missing_headers_are_named() {
        let secret = Secret::parse(PY_SECRET).unwrap();
        let full = headers(PY_ID, PY_TS, PY_SIG);
        let cases = [
            (
                Headers {
                    id: None,
                    ..full.clone()
                },
                "webhook-id",
            ),
            (
                Headers {
                    timestamp: None,
                    ..full.clone()
                },
                "webhook-timestamp",
            ),
            (
                Headers {
                    signature: None,
                    ..full.clone()
                },
                "webhook-signature",
            ),
            (
                Headers {
                    id: Some("  ".into()),
                    ..full.clone()
                },
                "webhook-id",
            ),
        ];
        for (h, name) in cases {
            let e = verify(&secret, &h, PY_BODY, PY_TS).unwrap_err();
            assert_eq!(e, VerifyError::Missing(name));
            assert_eq!(e.to_string(), format!("missing {name} header"));
        }
    }

    #[test]
    fn one_matching_signature_among_several_is_enough() {
        let secret = Secret::parse(PY_SECRET).unwrap();
        // From the Python suite's multi-signature case: wrong v1, another version,
        // the right one, then garbage.
        let list = format!(
            "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v2,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= {PY_SIG} v1,not-base64!"
        );
        verify(&secret, &headers(PY_ID, PY_TS, &list), PY_BODY, PY_TS).unwrap();
        let without = "v1,Ceo5qEr07ixe2NLpvHk3FH9bwy/WavXrAFQ/9tdO6mc= v1a,abc v1";
        let e = verify(&secret, &headers(PY_ID, PY_TS, without), PY_BODY, PY_TS);
        assert_eq!(e, Err(VerifyError::NoMatchingSignature));
    }

    #[test]
    fn bad_secrets_are_refused_without_showing_them() {
        for text in ["whsec_", "", "whsec_not base64!", "%%%"] {
            assert_eq!(Secret::parse(text), Err(VerifyError::BadSecret), "{text}");
        }
        let secret = Secret::parse(PY_SECRET).unwrap();
        assert_eq!(format!("{secret:?}"), "Secret(<redacted>)");
        let empty = Secret::from_bytes(Vec::new());
        let e = verify(&empty, &headers(PY_ID, PY_TS, PY_SIG), PY_BODY, PY_TS);
        assert_eq!(e, Err(VerifyError::BadSecret));
        assert!(!VerifyError::BadSecret.to_string().contains("MfKQ"));
    }
}
