//! API tokens: bearer secrets, stored only as SHA-256 hashes, each with a project
//! and scopes.
//!
//! # Contract
//!
//! - [`Tokens::create`] stores a token record; a second record with the same id or
//!   hash is [`Error::AlreadyExists`].
//! - [`Tokens::find_by_hash`] returns the record whose hash matches, revoked or not
//!   (callers check `revoked`).
//! - [`Tokens::revoke`] marks a token revoked; revoking twice is `Ok`; an unknown id
//!   is [`Error::NotFound`].
//! - [`Tokens::list`] returns every token of a project (all projects with `None`),
//!   oldest first.

use std::fmt;
use std::str::FromStr;

use async_trait::async_trait;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};

use crate::time::Timestamp;

/// What a token may do.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Scope {
    Submit,
    Read,
    Cancel,
    /// Everything in its project, and managing its project's tokens.
    Admin,
}

impl Scope {
    pub const ALL: [Scope; 4] = [Scope::Submit, Scope::Read, Scope::Cancel, Scope::Admin];

    pub fn as_str(self) -> &'static str {
        match self {
            Scope::Submit => "submit",
            Scope::Read => "read",
            Scope::Cancel => "cancel",
            Scope::Admin => "admin",
        }
    }
}

impl fmt::Display for Scope {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(self.as_str())
    }
}

impl FromStr for Scope {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        Scope::ALL
            .into_iter()
            .find(|sc| sc.as_str() == s)
            .ok_or_else(|| format!("unknown scope {s:?}; expected submit, read, cancel or admin"))
    }
}

/// A token as stored: never the secret itself.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct TokenRecord {
    pub id: String,
    pub name: String,
    pub project: String,
    pub scopes: Vec<Scope>,
    /// Hex SHA-256 of the whole secret.
    pub hash: String,
    pub created_at: Timestamp,
    #[serde(default)]
    pub revoked: bool,
}

impl TokenRecord {
    /// Whether the token grants `scope` (admin grants every scope of its project).
    pub fn allows(&self, scope: Scope) -> bool {
        !self.revoked && (self.scopes.contains(&scope) || self.scopes.contains(&Scope::Admin))
    }
}

/// The hash under which a presented secret is looked up.
pub fn hash_secret(secret: &str) -> String {
    hex::encode(Sha256::digest(secret.as_bytes()))
}

/// A new token: its record and the secret to show once. Secrets carry 256 random
/// bits, so a plain hash (no salt, no stretching) is safe to store.
pub fn mint(
    name: &str,
    project: &str,
    scopes: Vec<Scope>,
    now: Timestamp,
) -> (TokenRecord, String) {
    let id = format!("tok_{}", ulid::Ulid::generate().to_string().to_lowercase());
    let random: [u8; 32] = rand_bytes();
    let secret = format!("rsp_{}", hex::encode(random));
    let record = TokenRecord {
        id,
        name: name.to_owned(),
        project: project.to_owned(),
        scopes,
        hash: hash_secret(&secret),
        created_at: now,
        revoked: false,
    };
    (record, secret)
}

fn rand_bytes() -> [u8; 32] {
    // Two v4-grade ULID randoms are not a CSPRNG; use the OS generator.
    let mut out = [0u8; 32];
    getrandom::fill(&mut out).unwrap_or_else(|_| {
        // No OS randomness: fall back to hashing time and address entropy, which is
        // still unguessable across machines but logged as a weakness.
        tracing::error!("no OS randomness for token secrets; using a weaker source");
        let seed = format!("{:?}{:p}", std::time::SystemTime::now(), &out);
        out.copy_from_slice(&Sha256::digest(seed.as_bytes()));
    });
    out
}

#[derive(Debug, thiserror::Error)]
pub enum Error {
    #[error("token {0} not found")]
    NotFound(String),
    #[error("token {0} already exists")]
    AlreadyExists(String),
    #[error("token store unavailable: {0}")]
    Unavailable(#[source] Box<dyn std::error::Error + Send + Sync>),
}

#[async_trait]
pub trait Tokens: Send + Sync + fmt::Debug {
    async fn create(&self, token: &TokenRecord) -> Result<(), Error>;
    async fn find_by_hash(&self, hash: &str) -> Result<Option<TokenRecord>, Error>;
    async fn revoke(&self, id: &str) -> Result<(), Error>;
    async fn list(&self, project: Option<&str>) -> Result<Vec<TokenRecord>, Error>;
}
