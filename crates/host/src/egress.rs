//! Where the broker may send requests that a job's spec chose (`notify` URLs).
//!
//! A notify URL is written by whoever submits the job, so without a rule it would
//! let any submit token make the broker call the machine's own services (its API,
//! RabbitMQ's management port, a cloud metadata endpoint at 169.254.169.254) and
//! read the answers from the delivery log. So: public addresses only, checked on
//! the address actually connected to (a name that resolves to a private address is
//! refused too, whatever it resolved to when the job was submitted); no redirects;
//! and URLs, which often carry tokens, are shown in logs without path or query.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::sync::Arc;
use std::time::Duration;

/// Whether `ip` is a public unicast address.
pub fn is_public(ip: IpAddr) -> bool {
    match ip {
        IpAddr::V4(v4) => is_public_v4(v4),
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => is_public_v4(v4),
            None => is_public_v6(v6),
        },
    }
}

fn is_public_v4(ip: Ipv4Addr) -> bool {
    let [a, b, ..] = ip.octets();
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_private()
        || ip.is_link_local()
        || ip.is_broadcast()
        || ip.is_multicast()
        || ip.is_documentation()
        || a == 0
        // Carrier-grade NAT, 100.64.0.0/10.
        || (a == 100 && (64..128).contains(&b))
        // Benchmarking and reserved ranges.
        || (a == 198 && (b == 18 || b == 19))
        || a >= 240)
}

fn is_public_v6(ip: Ipv6Addr) -> bool {
    let first = ip.segments()[0];
    !(ip.is_unspecified()
        || ip.is_loopback()
        || ip.is_multicast()
        // Unique local fc00::/7 and link-local fe80::/10.
        || (first & 0xfe00) == 0xfc00
        || (first & 0xffc0) == 0xfe80
        // Documentation 2001:db8::/32.
        || (first == 0x2001 && ip.segments()[1] == 0x0db8))
}

/// Why `url` may not be called, before any connection: not http(s), or an address
/// written in the URL that is not public.
pub fn check_url(url: &str, allow_private: bool) -> Result<(), String> {
    let parsed = reqwest::Url::parse(url).map_err(|e| format!("not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") {
        return Err(format!("{}:// URLs are not called", parsed.scheme()));
    }
    let ip = match parsed.host() {
        Some(url::Host::Ipv4(ip)) => Some(IpAddr::V4(ip)),
        Some(url::Host::Ipv6(ip)) => Some(IpAddr::V6(ip)),
        Some(url::Host::Domain(_)) => None,
        None => return Err("the URL has no host".into()),
    };
    match ip {
        Some(ip) if !allow_private && !is_public(ip) => Err(private(ip)),
        _ => Ok(()),
    }
}

fn private(ip: IpAddr) -> String {
    format!(
        "{ip} is a loopback, private or link-local address; notifications go to public \
         addresses only (respawn up --allow-private-notify allows others, for local development)"
    )
}

/// Resolves names, keeping only the addresses the policy allows.
#[derive(Debug)]
struct Resolver {
    allow_private: bool,
}

impl reqwest::dns::Resolve for Resolver {
    fn resolve(&self, name: reqwest::dns::Name) -> reqwest::dns::Resolving {
        let allow_private = self.allow_private;
        let host = name.as_str().to_owned();
        Box::pin(async move {
            let found: Vec<SocketAddr> =
                tokio::net::lookup_host((host.as_str(), 0)).await?.collect();
            let allowed: Vec<SocketAddr> = found
                .iter()
                .copied()
                .filter(|a| allow_private || is_public(a.ip()))
                .collect();
            match (allowed.is_empty(), found.first()) {
                (true, Some(a)) => Err(private(a.ip()).into()),
                _ => Ok(Box::new(allowed.into_iter()) as reqwest::dns::Addrs),
            }
        })
    }
}

/// The HTTP client for job-chosen URLs: no redirects, the address policy on every
/// name it resolves, a short timeout.
pub fn client(allow_private: bool, timeout: Duration) -> reqwest::Result<reqwest::Client> {
    reqwest::Client::builder()
        .timeout(timeout)
        .redirect(reqwest::redirect::Policy::none())
        .dns_resolver(Arc::new(Resolver { allow_private }))
        .build()
}

/// `url` for logs: scheme, host and port only (paths, queries and user info often
/// hold tokens).
pub fn redact(url: &str) -> String {
    match reqwest::Url::parse(url) {
        Ok(u) => {
            let host = u.host_str().unwrap_or("?");
            match u.port() {
                Some(p) => format!("{}://{host}:{p}/…", u.scheme()),
                None => format!("{}://{host}/…", u.scheme()),
            }
        }
        Err(_) => "<not a URL>".into(),
    }
}

#[cfg(test)]
#[allow(clippy::unwrap_used)]
mod tests {
    use super::*;

    /// Notify URLs are https nearly always: the client speaks TLS (a client built
    /// without it refuses the scheme before connecting).
    #[tokio::test]
    async fn https_urls_are_spoken_to() {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let port = listener.local_addr().unwrap().port();
        tokio::spawn(async move {
            // Accept and hang up: the handshake fails, after a connection.
            while let Ok((socket, _)) = listener.accept().await {
                drop(socket);
            }
        });
        let err = client(true, Duration::from_secs(2))
            .unwrap()
            .get(format!("https://127.0.0.1:{port}/"))
            .send()
            .await
            .unwrap_err();
        assert!(!err.is_builder(), "https refused: {err:?}");
        assert!(err.is_connect() || err.is_request(), "{err:?}");
    }

    #[test]
    fn only_public_addresses_pass() {
        for private in [
            "127.0.0.1",
            "10.1.2.3",
            "172.16.0.1",
            "192.168.1.1",
            "169.254.169.254",
            "100.64.0.1",
            "0.0.0.0",
            "::1",
            "fe80::1",
            "fd00::1",
            "::ffff:127.0.0.1",
            "224.0.0.1",
        ] {
            assert!(
                !is_public(private.parse().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))),
                "{private}"
            );
        }
        for public in ["8.8.8.8", "1.1.1.1", "2606:4700:4700::1111"] {
            assert!(
                is_public(public.parse().unwrap_or(IpAddr::V4(Ipv4Addr::LOCALHOST))),
                "{public}"
            );
        }
    }

    #[test]
    fn literal_private_urls_are_refused_unless_allowed() {
        assert!(check_url("http://127.0.0.1:7878/v1/jobs", false).is_err());
        assert!(check_url("http://[::1]/x", false).is_err());
        assert!(check_url("http://169.254.169.254/latest/meta-data/", false).is_err());
        assert!(check_url("file:///etc/passwd", true).is_err());
        assert!(check_url("http://127.0.0.1:7878/x", true).is_ok());
        assert!(check_url("https://ci.example.com/hook", false).is_ok());
    }

    #[tokio::test]
    async fn names_that_resolve_to_private_addresses_are_refused() {
        let http = client(false, Duration::from_secs(2)).unwrap_or_default();
        let err = http
            .get("http://localhost:9/")
            .send()
            .await
            .err()
            .map(|e| format!("{e:?}"))
            .unwrap_or_default();
        assert!(err.contains("private"), "{err}");
    }

    #[test]
    fn logs_see_no_path_query_or_password() {
        assert_eq!(
            redact("https://user:pw@hooks.example.com:8443/t/SECRET?token=abc"),
            "https://hooks.example.com:8443/…"
        );
    }
}
