//! Container image references, checked against the grammar docker and podman
//! accept (`[host[:port]/]path[:tag][@algorithm:hex]`, as in the distribution
//! project's `reference` package). A value that passes can never be read as a flag
//! by the container runtime: every part starts with a letter or digit.

const MAX_NAME: usize = 255;
const MAX_TAG: usize = 128;

/// `Ok` when `reference` is a valid image reference; else what is wrong with it.
pub fn check(reference: &str) -> Result<(), String> {
    let (rest, digest) = match reference.rsplit_once('@') {
        Some((r, d)) => (r, Some(d)),
        None => (reference, None),
    };
    if let Some(d) = digest {
        check_digest(d)?;
    }
    // A tag follows the last `:` after the last `/` (a `:` before it is a port).
    let last_slash = rest.rfind('/').map_or(0, |i| i + 1);
    let (name, tag) = match rest[last_slash..].rfind(':') {
        Some(i) => (&rest[..last_slash + i], Some(&rest[last_slash + i + 1..])),
        None => (rest, None),
    };
    if let Some(t) = tag {
        check_tag(t)?;
    }
    check_name(name)
}

fn check_name(name: &str) -> Result<(), String> {
    if name.is_empty() {
        return Err("the image name is empty".into());
    }
    if name.len() > MAX_NAME {
        return Err(format!(
            "the image name is longer than {MAX_NAME} characters"
        ));
    }
    let mut parts: Vec<&str> = name.split('/').collect();
    // The first part is a registry host when it looks like one and more follow.
    if parts.len() > 1
        && (parts[0].contains(['.', ':']) || parts[0] == "localhost" || parts[0].starts_with('['))
    {
        check_host(parts.remove(0))?;
    }
    parts.into_iter().try_for_each(check_path_component)
}

fn check_host(host: &str) -> Result<(), String> {
    let bad = || format!("{host:?} is not a registry host[:port]");
    let (name, port) = match host.rsplit_once(':') {
        Some((h, p)) if !h.ends_with(':') && !p.contains(']') => (h, Some(p)),
        _ => (host, None),
    };
    if let Some(p) = port
        && (p.is_empty() || !p.bytes().all(|b| b.is_ascii_digit()))
    {
        return Err(bad());
    }
    if let Some(v6) = name.strip_prefix('[').and_then(|n| n.strip_suffix(']')) {
        return if !v6.is_empty() && v6.bytes().all(|b| b.is_ascii_hexdigit() || b == b':') {
            Ok(())
        } else {
            Err(bad())
        };
    }
    let label_ok = |l: &str| {
        !l.is_empty()
            && l.bytes().all(|b| b.is_ascii_alphanumeric() || b == b'-')
            && !l.starts_with('-')
            && !l.ends_with('-')
    };
    if name.split('.').all(label_ok) {
        Ok(())
    } else {
        Err(bad())
    }
}

/// `[a-z0-9]+` runs joined by `.`, `_`, `__` or runs of `-`.
fn check_path_component(part: &str) -> Result<(), String> {
    let bad = || {
        format!(
            "{part:?}: path parts are lowercase letters and digits, joined by `.`, `_`, `__` or `-`"
        )
    };
    let bytes = part.as_bytes();
    let alnum = |b: u8| b.is_ascii_lowercase() || b.is_ascii_digit();
    if bytes.is_empty() || !alnum(bytes[0]) || !alnum(bytes[bytes.len() - 1]) {
        return Err(bad());
    }
    let mut i = 0;
    while i < bytes.len() {
        if alnum(bytes[i]) {
            i += 1;
            continue;
        }
        let start = i;
        while i < bytes.len() && !alnum(bytes[i]) {
            i += 1;
        }
        let sep = &part[start..i];
        let ok = matches!(sep, "." | "_" | "__") || sep.bytes().all(|b| b == b'-');
        if !ok {
            return Err(bad());
        }
    }
    Ok(())
}

fn check_tag(tag: &str) -> Result<(), String> {
    let word = |b: u8| b.is_ascii_alphanumeric() || b == b'_';
    let ok = !tag.is_empty()
        && tag.len() <= MAX_TAG
        && word(tag.as_bytes()[0])
        && tag.bytes().all(|b| word(b) || b == b'.' || b == b'-');
    if ok {
        Ok(())
    } else {
        Err(format!(
            "tag {tag:?}: expected up to {MAX_TAG} letters, digits, `_`, `.` or `-`, not starting with `.` or `-`"
        ))
    }
}

fn check_digest(digest: &str) -> Result<(), String> {
    let bad =
        || format!("digest {digest:?}: expected algorithm:hex, such as sha256:<64 hex digits>");
    let (algo, hex) = digest.split_once(':').ok_or_else(bad)?;
    let algo_ok = !algo.is_empty()
        && algo.as_bytes()[0].is_ascii_alphabetic()
        && algo
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || matches!(b, b'+' | b'.' | b'-' | b'_'));
    if algo_ok && hex.len() >= 32 && hex.bytes().all(|b| b.is_ascii_hexdigit()) {
        Ok(())
    } else {
        Err(bad())
    }
}

#[cfg(test)]
mod tests {
    use super::check;

    #[test]
    fn references_docker_accepts() {
        for ok in [
            "ubuntu",
            "pytorch/pytorch:2.4.0-cuda12.1-cudnn9-runtime",
            "nvcr.io/nvidia/pytorch:24.08-py3",
            "localhost:5000/team/trainer:v1",
            "localhost/trainer",
            "registry.example.com:443/a/b/c",
            "[::1]:5000/x",
            "my_org/my-image__v2",
            "python:3.11-slim@sha256:0123456789abcdef0123456789abcdef0123456789abcdef0123456789abcdef",
            "a.b-c/d",
        ] {
            assert_eq!(check(ok), Ok(()), "{ok}");
        }
    }

    #[test]
    fn anything_that_could_be_a_flag_or_worse_is_refused() {
        for bad in [
            "",
            "-v",
            "--privileged",
            "ubuntu --privileged",
            "Ubuntu",
            "ubuntu:",
            "ubuntu:-x",
            "ubuntu@sha256:short",
            "/ubuntu",
            "ubuntu/",
            "a//b",
            "a/-b",
            "bad host:1/x",
            "host:port/x",
            "x\ny",
            "ubuntu:latest;rm",
        ] {
            assert!(check(bad).is_err(), "{bad:?} accepted");
        }
    }
}
