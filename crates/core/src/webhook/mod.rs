//! Inbound webhooks: a signed HTTP delivery (a GitHub push or release, or any
//! sender speaking [Standard Webhooks](https://www.standardwebhooks.com/)) becomes a
//! job made from the hook's template.
//!
//! ```yaml
//! hooks:
//!   - name: train-on-release          # letters, digits, `.`, `_`, `-`; at most 64; unique
//!     kind: github                    # github | standard
//!     secret_env: GITHUB_HOOK_SECRET  # the secret comes from this environment variable
//!     project: default                # optional
//!     on: { events: [push, release], branches: [main] }   # github only; optional
//!     template:                       # a job spec whose strings may hold ${var}
//!       name: train-${repo_name}-${short_sha}
//!       command: [python, train.py, --commit, "${sha}"]
//! ```
//!
//! `secret:` may hold the secret itself instead of `secret_env:`, which keeps it
//! out of the file and is preferred. A `standard` hook's secret is `whsec_<base64>`
//! (or the bare base64); a `github` hook's is the string set in GitHub.
//!
//! Variables (see [`HookVars`]); `$${` is a literal `${`, and values substituted
//! into `name` are sanitized as in trigger rules:
//! - `github`: `${event}`, `${ref}`, `${branch}`, `${tag}`, `${sha}`, `${short_sha}`
//!   (7 characters), `${repo}` (owner/name), `${repo_name}`, `${hook}`, `${delivery}`.
//!   A variable the event does not give is empty (a tag push has no `${branch}`).
//! - `standard`: `${hook}`, `${webhook_id}`, and `${body.<field>}` for every
//!   top-level string or number field of the JSON body.
//!
//! A `github` hook makes jobs from pushes and from releases with action
//! `published`; `on.events` narrows that, and `on.branches` (globs, as in trigger
//! rules: `main`, `release/*`) keeps only pushes to matching branches. `ping` is
//! answered without a job. A `standard` hook makes a job from every delivery.
//!
//! Hooks are checked when loaded ([`parse_hooks`], [`load_hooks`]): the template is
//! rendered with placeholder values and validated as a job spec, and errors name
//! their field (`hooks[1].template.resources.gpus`). The template may not set
//! `idempotency_key`: the hook sets it to `hook:<name>:<delivery id>`, which is also
//! how a replayed delivery is recognised (see [`crate::handlers::webhook`]).

pub mod github;
mod hooks;
mod render;
mod request;
pub mod standard;
mod vars;

pub use hooks::{GithubFilter, Hook, HookKind, load_hooks, parse_hooks};
pub use request::HookRequest;
pub use standard::Secret;
pub use vars::{GITHUB_VARIABLES, HookVars};

/// The label every job made by a hook carries, naming the hook.
pub const LABEL: &str = "respawn.hook";

/// Why a delivery's signature was not accepted. The messages say what was wrong
/// with the request and never include secret material, so a host may return them
/// to the caller.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum VerifyError {
    /// A header the scheme needs is absent or empty (the header's name).
    #[error("missing {0} header")]
    Missing(&'static str),
    /// A header is there but not in the scheme's form (what the form is).
    #[error("malformed signature header: {0}")]
    Malformed(&'static str),
    #[error("webhook-timestamp is not a whole number of seconds since the Unix epoch")]
    BadTimestamp,
    #[error("webhook-timestamp is more than 5 minutes in the past")]
    Stale,
    #[error("webhook-timestamp is more than 5 minutes in the future")]
    Future,
    #[error("no signature matches the body")]
    NoMatchingSignature,
    /// The configured secret cannot sign anything (empty, or not `whsec_<base64>`).
    #[error("the hook's secret is not usable")]
    BadSecret,
}

type HmacSha256 = hmac::Hmac<sha2::Sha256>;

/// HMAC-SHA256 keyed with `key`.
fn hmac(key: &[u8]) -> HmacSha256 {
    // HMAC hashes keys longer than a block and pads shorter ones, so every
    // length is valid and this cannot fail.
    <HmacSha256 as hmac::KeyInit>::new_from_slice(key).expect("HMAC takes keys of any length")
}

#[cfg(test)]
mod tests_hooks;
