//! The textual forms of a job spec's strings, each written twice: as the JSON Schema
//! pattern that `schemas/job-spec.schema.json` publishes, and as the check the
//! validator runs. `spec/tests.rs` holds the two to the same verdict, so the schema
//! promises no more and no less than the validator keeps.
//!
//! Patterns use only what ECMA 262, Python's `re` and Rust's `regex` read alike:
//! ASCII classes, no `\s`, `\d` or `\w`, no look-around.

/// A job's name.
pub const NAME: &str = r"^[A-Za-z0-9._-]{1,128}$";
pub const MAX_NAME: usize = 128;
/// A container image reference (`registry:5000/org/name:tag@sha256:…`).
pub const IMAGE: &str = r"^[A-Za-z0-9][A-Za-z0-9._/:@-]*$";
/// The program, `command[0]`: not empty, not starting with a space or a control character.
pub const PROGRAM: &str = r"^[^\u0000-\u0020]";
/// An environment variable's name.
pub const ENV_NAME: &str = r"^[A-Za-z_][A-Za-z0-9_]*$";
/// Names respawn sets itself.
pub const RESERVED_ENV: &str = r"^RESPAWN_";
/// A label's name.
pub const LABEL_KEY: &str = r"^[A-Za-z0-9._/-]{1,63}$";
pub const MAX_LABEL_VALUE: usize = 256;
/// An object-store URI: a known scheme and a key without control characters;
/// `file://` takes an absolute path (`file:///data/x`): a relative one would be read
/// from wherever the agent happens to run. Azure Blob storage is also named as
/// Data Lake Storage does (`abfss://CONTAINER@ACCOUNT.dfs.core.windows.net/KEY`)
/// and by a blob's URL (`https://ACCOUNT.blob.core.windows.net/CONTAINER/KEY`),
/// neither with a query or fragment.
pub const URI: &str = r"^(?:(?:s3|az|azure|gs|bucket)://[^\u0000-\u001f\u007f]+|file:///[^\u0000-\u001f\u007f]*|https://[A-Za-z0-9-]+\.blob\.[A-Za-z0-9.-]+/[^/?#\u0000-\u001f\u007f]+(?:/[^?#\u0000-\u001f\u007f]*)?|abfss?://[^/@?#\u0000-\u001f\u007f]+@[A-Za-z0-9-]+\.dfs\.[A-Za-z0-9.-]+(?:/[^?#\u0000-\u001f\u007f]*)?)$";
/// A `..` segment, refused in URIs and relative paths.
pub const DOTDOT: &str = r"(?:^|/)\.\.(?:/|$)";
/// A path relative to `RESPAWN_INPUT_DIR`.
pub const RELATIVE: &str = r"^[^/]";
/// A notification URL: http(s), a host name or bracketed IPv6 address, an optional
/// port, then visible ASCII.
pub const URL: &str =
    r"^https?://(?:[A-Za-z0-9.-]+|\[[0-9A-Fa-f:.]+\])(?::[0-9]{1,5})?(?:[/?#][!-~]*)?$";
pub const MAX_IDEMPOTENCY_KEY: usize = 255;

pub const URI_SCHEMES: [&str; 6] = ["s3", "az", "azure", "gs", "file", "bucket"];

/// `ACCOUNT.<kind>.SUFFIX`, as a storage account's host names are written.
fn account_host(host: &str, kind: &str) -> bool {
    host.split_once(&format!(".{kind}."))
        .is_some_and(|(account, suffix)| {
            !account.is_empty()
                && !suffix.is_empty()
                && account
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-')
                && suffix
                    .bytes()
                    .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'.')
        })
}

pub fn is_name(s: &str) -> bool {
    (1..=MAX_NAME).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._-".contains(c))
}

pub fn is_image(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphanumeric())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/:@-".contains(c))
}

pub fn is_program(s: &str) -> bool {
    s.chars().next().is_some_and(|c| u32::from(c) > 0x20)
}

pub fn is_env_name(s: &str) -> bool {
    s.starts_with(|c: char| c.is_ascii_alphabetic() || c == '_')
        && s.chars().all(|c| c.is_ascii_alphanumeric() || c == '_')
}

pub fn is_label_key(s: &str) -> bool {
    (1..=63).contains(&s.len())
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || "._/-".contains(c))
}

fn is_control(c: char) -> bool {
    u32::from(c) < 0x20 || c == '\u{7f}'
}

/// Whether some `/`-separated segment of `s` is `..`.
pub fn has_dotdot(s: &str) -> bool {
    s.split('/').any(|seg| seg == "..")
}

/// Why `uri` is not an object-store URI, if it is not. `..` is checked apart.
pub fn uri_problem(uri: &str) -> Option<String> {
    let control = || {
        uri.contains(is_control)
            .then(|| format!("expected a URI without control characters, got {uri:?}"))
    };
    match uri.split_once("://") {
        Some(("https" | "abfss" | "abfs", rest)) if rest.contains(['?', '#']) => Some(format!(
            "expected a blob's name without a query or fragment (?…, #…): a SAS token is a secret, and the broker's identity reads the blob; got {uri:?}"
        )),
        Some(("https", rest)) => {
            let (host, path) = rest.split_once('/').unwrap_or((rest, ""));
            let container = path.split('/').next().unwrap_or("");
            if !account_host(host, "blob") || container.is_empty() {
                Some(format!(
                    "https:// URIs name Azure Blob storage: expected https://ACCOUNT.blob.core.windows.net/CONTAINER/KEY, got {uri:?}"
                ))
            } else {
                control()
            }
        }
        Some((scheme @ ("abfss" | "abfs"), rest)) => {
            let first = rest.split('/').next().unwrap_or("");
            match first.split_once('@') {
                Some((container, host)) if !container.is_empty() && account_host(host, "dfs") => {
                    control()
                }
                _ => Some(format!(
                    "expected {scheme}://CONTAINER@ACCOUNT.dfs.core.windows.net/KEY, got {uri:?}"
                )),
            }
        }
        Some(("file", rest)) if !rest.starts_with('/') => Some(format!(
            "file:// takes an absolute path (file:///data/x), got {uri:?}"
        )),
        Some((scheme, rest)) if URI_SCHEMES.contains(&scheme) && !rest.is_empty() => rest
            .contains(is_control)
            .then(|| format!("expected a URI without control characters, got {uri:?}")),
        Some((scheme, _)) if !URI_SCHEMES.contains(&scheme) => Some(format!(
            "unsupported scheme {scheme:?}; expected one of s3, az, abfss, https (Azure Blob storage), gs, file, bucket"
        )),
        _ => Some(format!(
            "expected a URI such as s3://bucket/key, got {uri:?}"
        )),
    }
}

pub fn is_relative(s: &str) -> bool {
    !s.is_empty() && !s.starts_with('/') && !has_dotdot(s)
}

pub fn is_url(s: &str) -> bool {
    let Some(rest) = s
        .strip_prefix("https://")
        .or_else(|| s.strip_prefix("http://"))
    else {
        return false;
    };
    let end = rest.find(['/', '?', '#']).unwrap_or(rest.len());
    let (authority, tail) = rest.split_at(end);
    let visible = |c: char| ('!'..='~').contains(&c);
    if !tail.chars().all(visible) {
        return false;
    }
    let (host, port) = match authority.strip_prefix('[') {
        Some(v6) => match v6.split_once(']') {
            Some((addr, port)) => {
                let ok = !addr.is_empty()
                    && addr
                        .chars()
                        .all(|c| c.is_ascii_hexdigit() || ":.".contains(c));
                (ok, port)
            }
            None => return false,
        },
        None => {
            let (host, port) = match authority.find(':') {
                Some(i) => authority.split_at(i),
                None => (authority, ""),
            };
            let ok = !host.is_empty()
                && host
                    .chars()
                    .all(|c| c.is_ascii_alphanumeric() || ".-".contains(c));
            (ok, port)
        }
    };
    let port_ok = port.is_empty()
        || port
            .strip_prefix(':')
            .is_some_and(|p| (1..=5).contains(&p.len()) && p.chars().all(|c| c.is_ascii_digit()));
    host && port_ok
}

#[cfg(test)]
mod tests {
    use super::is_image;

    /// An image can never be read as a container runtime's option, or split.
    #[test]
    fn no_image_reads_as_a_flag() {
        for ok in [
            "ubuntu",
            "pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime",
            "localhost:5000/team/trainer:v1",
            "python:3.11-slim@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
        ] {
            assert!(is_image(ok), "{ok}");
        }
        for bad in [
            "",
            "-v",
            "--privileged",
            "ubuntu --privileged",
            "x\ny",
            "ubuntu;rm",
            "/ubuntu",
        ] {
            assert!(!is_image(bad), "{bad:?} accepted");
        }
    }
}
