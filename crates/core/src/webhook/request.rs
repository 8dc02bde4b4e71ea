//! A delivery as the HTTP layer hands it over, and checking its signature.

use bytes::Bytes;

use super::hooks::{Hook, HookKind};
use super::{VerifyError, github, standard};

/// The parts of an inbound request a hook reads: the headers of both schemes
/// (absent ones `None`) and the raw body, exactly as received, since signatures
/// cover its bytes.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct HookRequest {
    /// `webhook-id`.
    pub webhook_id: Option<String>,
    /// `webhook-timestamp`.
    pub webhook_timestamp: Option<String>,
    /// `webhook-signature`.
    pub webhook_signature: Option<String>,
    /// `X-Hub-Signature-256`.
    pub hub_signature_256: Option<String>,
    /// `X-GitHub-Event`.
    pub github_event: Option<String>,
    /// `X-GitHub-Delivery`.
    pub github_delivery: Option<String>,
    pub body: Bytes,
}

impl HookRequest {
    /// Picks the headers a hook reads out of `(name, value)` pairs, names in any
    /// case; for a header sent twice the first value counts.
    pub fn from_headers<'a>(
        headers: impl IntoIterator<Item = (&'a str, &'a str)>,
        body: impl Into<Bytes>,
    ) -> HookRequest {
        let mut req = HookRequest {
            body: body.into(),
            ..HookRequest::default()
        };
        for (name, value) in headers {
            let slot = match name.to_ascii_lowercase().as_str() {
                "webhook-id" => &mut req.webhook_id,
                "webhook-timestamp" => &mut req.webhook_timestamp,
                "webhook-signature" => &mut req.webhook_signature,
                "x-hub-signature-256" => &mut req.hub_signature_256,
                "x-github-event" => &mut req.github_event,
                "x-github-delivery" => &mut req.github_delivery,
                _ => continue,
            };
            slot.get_or_insert_with(|| value.to_owned());
        }
        req
    }
}

impl Hook {
    /// Checks the request's signature with this hook's scheme and secret;
    /// `now_unix_secs` bounds a Standard Webhooks timestamp.
    pub fn verify(&self, request: &HookRequest, now_unix_secs: i64) -> Result<(), VerifyError> {
        match self.kind {
            HookKind::Github => github::verify(
                self.secret.as_bytes(),
                request.hub_signature_256.as_deref(),
                &request.body,
            ),
            HookKind::Standard => {
                let headers = standard::Headers {
                    id: request.webhook_id.clone(),
                    timestamp: request.webhook_timestamp.clone(),
                    signature: request.webhook_signature.clone(),
                };
                standard::verify(&self.secret, &headers, &request.body, now_unix_secs)
            }
        }
    }
}
