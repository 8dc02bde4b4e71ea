//! What the RabbitMQ tests share: the broker's URL, connections named for
//! rabbitmqctl, clean-ups, and ways to cut a connection.

use std::future::Future;
use std::net::{TcpStream, ToSocketAddrs};
use std::panic::AssertUnwindSafe;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use futures::FutureExt;
use respawn_adapters::amqp::{AmqpOptions, AmqpQueue};
use respawn_core::ports::queue::Receive;

pub fn url() -> String {
    std::env::var("RESPAWN_AMQP_URL")
        .unwrap_or_else(|_| "amqp://guest:guest@127.0.0.1:5672/%2f".into())
}

/// The URL's `host:port`.
pub fn host_port(url: &str) -> String {
    let rest = url.split_once("://").map_or(url, |(_, r)| r);
    let authority = rest.split('/').next().unwrap_or(rest);
    let host_port = authority.rsplit_once('@').map_or(authority, |(_, h)| h);
    if host_port.contains(':') {
        host_port.to_owned()
    } else {
        format!("{host_port}:5672")
    }
}

/// Whether anything listens at the URL's host and port.
fn reachable(url: &str) -> bool {
    host_port(url)
        .to_socket_addrs()
        .ok()
        .into_iter()
        .flatten()
        .any(|a| TcpStream::connect_timeout(&a, Duration::from_secs(2)).is_ok())
}

/// Fails the test, saying what is missing, unless a broker listens at the URL.
pub fn require_broker(url: &str) {
    assert!(
        reachable(url),
        "these tests need RabbitMQ at {} (guest/guest; RESPAWN_AMQP_URL names another): \
         start it with `rabbitmq-server -detached`",
        host_port(url)
    );
}

/// A queue on a connection of its own, named so that rabbitmqctl can find it.
pub async fn connect(test: &str, max_deliveries: u32) -> (AmqpQueue, String) {
    let options = AmqpOptions {
        max_deliveries,
        ..AmqpOptions::default()
    };
    connect_with(test, options).await
}

/// `connect` with other settings (the connection name is the test's).
pub async fn connect_with(test: &str, options: AmqpOptions) -> (AmqpQueue, String) {
    let url = url();
    require_broker(&url);
    let name = format!(
        "respawn-test-{test}-{}",
        ulid::Ulid::generate().to_string().to_lowercase()
    );
    let options = AmqpOptions {
        connection_name: name.clone(),
        ..options
    };
    let q = AmqpQueue::connect(&url, options)
        .await
        .expect("the broker is reachable, so connecting must work");
    (q, name)
}

/// Runs `body`, then deletes every queue `q` declared, even if `body` panicked.
pub async fn with_cleanup(q: &AmqpQueue, body: impl Future<Output = ()>) {
    let result = AssertUnwindSafe(body).catch_unwind().await;
    for name in q.declared_queues() {
        if let Err(e) = q.delete_queue(&name).await {
            eprintln!("could not delete test queue {name}: {e}");
        }
    }
    if let Err(panic) = result {
        std::panic::resume_unwind(panic);
    }
}

pub fn lease(wait_ms: u64) -> Receive {
    Receive {
        max: 16,
        lease: Duration::from_secs(60),
        wait: Duration::from_millis(wait_ms),
    }
}

/// Force-closes the broker side of the connection named `name`.
pub fn close_connection(name: &str) {
    let out = std::process::Command::new("rabbitmqctl")
        .args(["-q", "list_connections", "pid", "client_properties"])
        .output()
        .expect("rabbitmqctl runs (the test needs it to kill a connection)");
    assert!(out.status.success(), "rabbitmqctl list_connections failed");
    let listing = String::from_utf8_lossy(&out.stdout);
    let pid = listing
        .lines()
        .find(|l| l.contains(name))
        .and_then(|l| l.split_whitespace().next())
        .unwrap_or_else(|| panic!("no connection named {name} in:\n{listing}"))
        .to_owned();
    let status = std::process::Command::new("rabbitmqctl")
        .args([
            "-q",
            "close_connection",
            &pid,
            "respawn test: connection lost",
        ])
        .status()
        .expect("rabbitmqctl close_connection");
    assert!(
        status.success(),
        "rabbitmqctl close_connection {pid} failed"
    );
}

/// A channel of the test's own, to act behind the adapter's back.
pub async fn raw_channel() -> lapin::Channel {
    let conn = lapin::Connection::connect(&url(), lapin::ConnectionProperties::default())
        .await
        .unwrap();
    conn.create_channel().await.unwrap()
}

/// A TCP proxy to the broker that can be cut: a broker that goes away and comes back.
pub struct Proxy {
    addr: std::net::SocketAddr,
    up: Arc<AtomicBool>,
    links: Arc<Mutex<Vec<tokio::task::JoinHandle<()>>>>,
    accept: tokio::task::JoinHandle<()>,
}

impl Proxy {
    pub async fn start(target: String) -> Proxy {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let up = Arc::new(AtomicBool::new(true));
        let links = Arc::new(Mutex::new(Vec::new()));
        let accept = tokio::spawn({
            let (up, links) = (up.clone(), links.clone());
            async move {
                while let Ok((mut inbound, _)) = listener.accept().await {
                    if !up.load(Ordering::SeqCst) {
                        continue; // dropped: connection refused, as it were
                    }
                    let target = target.clone();
                    links.lock().unwrap().push(tokio::spawn(async move {
                        if let Ok(mut outbound) = tokio::net::TcpStream::connect(&target).await {
                            let _ =
                                tokio::io::copy_bidirectional(&mut inbound, &mut outbound).await;
                        }
                    }));
                }
            }
        });
        Proxy {
            addr,
            up,
            links,
            accept,
        }
    }

    /// The broker's URL, through the proxy.
    pub fn url(&self, url: &str) -> String {
        url.replacen(&host_port(url), &self.addr.to_string(), 1)
    }

    /// Cuts every connection and refuses new ones.
    pub fn down(&self) {
        self.up.store(false, Ordering::SeqCst);
        for link in self.links.lock().unwrap().drain(..) {
            link.abort();
        }
    }

    pub fn up(&self) {
        self.up.store(true, Ordering::SeqCst);
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.down();
        self.accept.abort();
    }
}
