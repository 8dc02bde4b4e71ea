//! The stack's own keys, made on first start and kept in the data folder (0600).

use std::path::Path;

use respawn_adapters::local::durable;
use respawn_core::attempt_auth::AttemptKey;
use respawn_core::webhook::standard::Secret;

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

/// The stack's signing secret, `<data>/notify-secret` (`whsec_…`), made on first use.
pub fn notify_secret(data: &Path) -> std::io::Result<(Secret, String)> {
    let path = data.join("notify-secret");
    if let Ok(text) = std::fs::read_to_string(&path) {
        let text = text.trim().to_owned();
        if let Ok(s) = Secret::parse(&text) {
            return Ok((s, text));
        }
    }
    let mut key = [0u8; 32];
    getrandom::fill(&mut key).map_err(std::io::Error::other)?;
    use base64::Engine;
    let text = format!(
        "whsec_{}",
        base64::engine::general_purpose::STANDARD.encode(key)
    );
    durable::write(&path, text.as_bytes(), 0o600)?;
    Ok((Secret::from_bytes(key.to_vec()), text))
}
