//! The stack's own keys, made on first start and kept in the data folder (0600).

use std::path::Path;

use respawn_adapters::local::durable;
use respawn_core::attempt_auth::AttemptKey;

/// The key agents' attempt credentials are signed with, `<data>/agent-key`.
pub fn attempt_key(data: &Path) -> std::io::Result<AttemptKey> {
    let path = data.join("agent-key");
    match std::fs::read(&path) {
        Ok(bytes) => AttemptKey::from_bytes(&bytes).ok_or_else(|| {
            std::io::Error::other(format!(
                "{} is not a key; delete it to make a new one",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {
            let key = AttemptKey::generate().map_err(std::io::Error::other)?;
            durable::write(&path, key.as_bytes(), 0o600)?;
            Ok(key)
        }
        Err(e) => Err(e),
    }
}
