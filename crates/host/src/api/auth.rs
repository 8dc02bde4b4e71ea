//! Bearer tokens: who is calling, for which project, with which scopes.

use axum::extract::FromRequestParts;
use axum::http::request::Parts;
use respawn_core::ports::tokens::{self, Scope, TokenRecord};

use super::{Api, ApiError};

/// The authenticated caller.
#[derive(Debug, Clone)]
pub struct Caller {
    pub token: TokenRecord,
}

impl Caller {
    pub fn project(&self) -> &str {
        &self.token.project
    }

    /// An admin token: everything in its project.
    pub fn is_admin(&self) -> bool {
        self.token.allows(Scope::Admin)
    }

    /// The stack owner's token: an admin of the `default` project, who may manage
    /// every project's tokens.
    pub fn is_owner(&self) -> bool {
        self.is_admin() && self.project() == respawn_core::project::DEFAULT
    }

    pub fn require(&self, scope: Scope) -> Result<(), ApiError> {
        if self.token.allows(scope) {
            Ok(())
        } else {
            Err(ApiError::Forbidden(format!(
                "this token lacks the {scope} scope"
            )))
        }
    }
}

/// The credential of an `Authorization: Bearer …` header; `what` names it in errors.
pub(super) fn bearer<'a>(parts: &'a Parts, what: &str) -> Result<&'a str, ApiError> {
    let header = parts
        .headers
        .get(axum::http::header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .ok_or_else(|| {
            ApiError::Unauthorized(format!("missing {what} (Authorization: Bearer …)"))
        })?;
    header
        .strip_prefix("Bearer ")
        .ok_or_else(|| ApiError::Unauthorized(format!("expected Authorization: Bearer <{what}>")))
}

impl FromRequestParts<Api> for Caller {
    type Rejection = ApiError;

    async fn from_request_parts(parts: &mut Parts, stack: &Api) -> Result<Self, Self::Rejection> {
        let secret = bearer(parts, "token")?;
        let found = stack
            .tokens
            .find_by_hash(&tokens::hash_secret(secret.trim()))
            .await
            .map_err(|e| ApiError::Internal(e.to_string()))?;
        match found {
            Some(token) if !token.revoked => Ok(Caller { token }),
            // One answer for unknown and revoked tokens: nothing to learn by probing.
            _ => Err(ApiError::Unauthorized("invalid or revoked token".into())),
        }
    }
}

/// On a host without tokens, mints an admin token for the default project and
/// returns its secret, for the host to hand to its operator; `None` when tokens
/// exist already.
pub async fn mint_first_admin(api: &Api) -> Result<Option<String>, String> {
    if !api
        .tokens
        .list(None)
        .await
        .map_err(|e| e.to_string())?
        .is_empty()
    {
        return Ok(None);
    }
    let now = api.ports.clock.now();
    let (record, secret) = tokens::mint(
        "admin",
        respawn_core::project::DEFAULT,
        vec![Scope::Admin],
        now,
    );
    api.tokens
        .create(&record)
        .await
        .map_err(|e| e.to_string())?;
    tracing::info!(token_id = %record.id, "admin token created");
    Ok(Some(secret))
}
