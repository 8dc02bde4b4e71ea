//! One connection to the broker at a time, replaced (with back-off) when it drops.

use std::collections::HashMap;
use std::future::Future;
use std::pin::pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::task::{Context, Poll, Waker};
use std::time::Duration;

use lapin::options::{BasicPublishOptions, ConfirmSelectOptions};
use lapin::uri::{AMQPScheme, AMQPUri};
use lapin::{BasicProperties, Channel, Confirmation, Connection, ConnectionProperties};
use respawn_core::ports::queue::Error;
use tokio::time::Instant;

use super::consumer::QueueConsumer;
use super::limit::{self, Oversized};
use super::{lock, unavailable};

/// First wait after a failed connection attempt; doubled after each failure.
const BACKOFF_MIN: Duration = Duration::from_millis(100);
const BACKOFF_MAX: Duration = Duration::from_secs(5);
/// How long one operation keeps trying to reconnect before it gives up with
/// `Unavailable` (the caller's retry policy takes over from there).
const RECONNECT_BUDGET: Duration = Duration::from_secs(10);
/// One connection attempt: a black-holed address must not hang an operation.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// A confirm that takes longer than this means the connection is stuck; the
/// heartbeat would notice too, but only after a minute.
const CONFIRM_TIMEOUT: Duration = Duration::from_secs(30);

/// A live connection with its publishing channel and the consumers opened on it.
pub(super) struct Session {
    /// Which connection this is; leases remember it, so those taken on an earlier
    /// connection can be told apart.
    pub conn_no: u64,
    pub conn: Connection,
    /// In confirm mode. Shared by all publishers: confirms pipeline on it.
    publisher: Channel,
    /// See [`Session::publish`].
    publish_order: Mutex<()>,
    consumers: Mutex<HashMap<String, Arc<QueueConsumer>>>,
    /// Single-flight for opening consumers, so concurrent receives open one each.
    opening: tokio::sync::Mutex<()>,
    /// Deliveries on this connection whose bodies were too large to take in.
    oversized: Arc<Oversized>,
}

/// What became of a publish the broker confirmed.
#[derive(Debug, PartialEq, Eq)]
pub(super) enum Published {
    Stored,
    /// Returned as unroutable: the queue does not exist (deleted behind our back).
    Unroutable,
}

impl Session {
    async fn open(link: &Link, conn_no: u64) -> Result<Session, lapin::Error> {
        let props = ConnectionProperties::default().with_connection_name(link.name.as_str().into());
        let oversized = Arc::new(Oversized::default());
        let conn = match link.uri.scheme {
            AMQPScheme::AMQP => {
                // Frames of at most `limit::FRAME_MAX`, which the size limit relies on
                // (a smaller maximum in the URL stays).
                let mut uri = link.uri.clone();
                uri.query.frame_max = Some(match uri.query.frame_max {
                    Some(n) if n > 0 => n.min(limit::FRAME_MAX),
                    _ => limit::FRAME_MAX,
                });
                let runtime = limit::runtime(link.max_message_bytes, oversized.clone());
                Connection::connect_uri_with_runtime(uri, props, runtime).await?
            }
            // TLS sits between the socket and lapin, so the frames cannot be read
            // where the stream can be wrapped: the limit applies after buffering.
            AMQPScheme::AMQPS => Connection::connect_uri(link.uri.clone(), props).await?,
        };
        let publisher = conn.create_channel().await?;
        publisher
            .confirm_select(ConfirmSelectOptions::default())
            .await?;
        Ok(Session {
            conn_no,
            conn,
            publisher,
            publish_order: Mutex::new(()),
            consumers: Mutex::new(HashMap::new()),
            opening: tokio::sync::Mutex::new(()),
            oversized,
        })
    }

    pub fn healthy(&self) -> bool {
        self.conn.status().connected() && self.publisher.status().connected()
    }

    /// Publishes to `queue` through the default exchange and waits for the broker's
    /// confirm. `mandatory`, so a missing queue comes back as `Unroutable` instead of
    /// being confirmed and silently dropped.
    pub async fn publish(
        &self,
        queue: &str,
        body: &[u8],
        props: BasicProperties,
    ) -> Result<Published, Error> {
        let routing_key = super::message::short(queue)?;
        let options = BasicPublishOptions {
            mandatory: true,
            immediate: false,
        };
        let mut publishing =
            pin!(
                self.publisher
                    .basic_publish("".into(), routing_key, options, body, props)
            );
        // lapin numbers a publish for its confirm and queues its frames in two steps
        // under two different locks, both in the first poll of `basic_publish`. Two
        // threads publishing at once could queue their frames in the other order than
        // they took their numbers, and a confirm would then release the wrong sender
        // (whose message may not be stored yet). So that first poll runs under our
        // lock: numbering and frame order agree, and we still do not hold a lock across
        // the wait, so concurrent sends pipeline their confirms.
        let first = {
            let _order = lock(&self.publish_order);
            publishing
                .as_mut()
                .poll(&mut Context::from_waker(Waker::noop()))
        };
        let confirm = match first {
            Poll::Ready(r) => r,
            Poll::Pending => publishing.await,
        }
        .map_err(unavailable)?;
        let confirmation = tokio::time::timeout(CONFIRM_TIMEOUT, confirm)
            .await
            .map_err(|_| Error::Unavailable("no publisher confirm within 30 s".into()))?
            .map_err(unavailable)?;
        match confirmation {
            Confirmation::Ack(None) => Ok(Published::Stored),
            Confirmation::Ack(Some(_)) => Ok(Published::Unroutable),
            Confirmation::Nack(_) => Err(Error::Unavailable(
                format!("the broker did not store the message for {queue} (nack)").into(),
            )),
            Confirmation::NotRequested => Err(Error::Unavailable(
                "publisher confirms are off on the publishing channel".into(),
            )),
        }
    }

    /// The consumer of `queue` on this connection, opened on first use (and again if
    /// its channel died or the broker cancelled it).
    pub async fn consumer(
        &self,
        queue: &str,
        prefetch: u16,
    ) -> Result<Arc<QueueConsumer>, lapin::Error> {
        if let Some(c) = self.live_consumer(queue) {
            return Ok(c);
        }
        let _opening = self.opening.lock().await;
        if let Some(c) = self.live_consumer(queue) {
            return Ok(c);
        }
        let c = Arc::new(
            QueueConsumer::open(&self.conn, queue, prefetch, self.oversized.clone()).await?,
        );
        tracing::debug!(queue, conn_no = self.conn_no, "consumer opened");
        lock(&self.consumers).insert(queue.to_owned(), c.clone());
        Ok(c)
    }

    fn live_consumer(&self, queue: &str) -> Option<Arc<QueueConsumer>> {
        lock(&self.consumers)
            .get(queue)
            .filter(|c| c.alive())
            .cloned()
    }

    /// Forgets every consumer, returning them (to be stopped).
    pub fn take_consumers(&self) -> Vec<Arc<QueueConsumer>> {
        lock(&self.consumers).drain().map(|(_, c)| c).collect()
    }

    /// Forgets the consumer of `queue`, returning it (to be cancelled).
    pub fn remove_consumer(&self, queue: &str) -> Option<Arc<QueueConsumer>> {
        lock(&self.consumers).remove(queue)
    }
}

/// The current session and how to replace it.
pub(super) struct Link {
    uri: AMQPUri,
    name: String,
    /// Bodies larger than this are not taken in (see `limit.rs`).
    max_message_bytes: u64,
    current: Mutex<Option<Arc<Session>>>,
    /// Held while reconnecting, so one task reconnects and the others wait for it;
    /// keeps the back-off across operations, so that many callers do not hammer a
    /// broker that is down.
    reconnect: tokio::sync::Mutex<Backoff>,
    conn_nos: AtomicU64,
}

struct Backoff {
    delay: Duration,
    not_before: Option<Instant>,
}

impl Link {
    pub fn new(uri: AMQPUri, name: &str, max_message_bytes: u64) -> Link {
        Link {
            uri,
            name: name.to_owned(),
            max_message_bytes,
            current: Mutex::new(None),
            reconnect: tokio::sync::Mutex::new(Backoff {
                delay: BACKOFF_MIN,
                not_before: None,
            }),
            conn_nos: AtomicU64::new(1),
        }
    }

    fn slot(&self) -> MutexGuard<'_, Option<Arc<Session>>> {
        lock(&self.current)
    }

    /// The session, if there is one and it is healthy (no reconnecting).
    pub fn healthy(&self) -> Option<Arc<Session>> {
        self.slot().as_ref().filter(|s| s.healthy()).cloned()
    }

    /// The generation of the current session, healthy or not.
    pub fn current_conn_no(&self) -> Option<u64> {
        self.slot().as_ref().map(|s| s.conn_no)
    }

    /// One connection attempt, for `AmqpQueue::connect`: fail fast there.
    pub async fn connect_once(&self) -> Result<(), Error> {
        let conn_no = self.conn_nos.fetch_add(1, Ordering::Relaxed);
        let session = attempt(self, conn_no).await?;
        tracing::info!(connection_name = %self.name, conn_no, "connected to the broker");
        *self.slot() = Some(Arc::new(session));
        Ok(())
    }

    /// A healthy session, reconnecting first if the connection or its publishing
    /// channel dropped.
    pub async fn session(&self) -> Result<Arc<Session>, Error> {
        if let Some(s) = self.healthy() {
            return Ok(s);
        }
        // The budget counts from here: an operation queued behind others that are
        // failing to reconnect must not wait for all of their budgets in turn.
        let started = Instant::now();
        let Ok(mut backoff) =
            tokio::time::timeout_at(started + RECONNECT_BUDGET, self.reconnect.lock()).await
        else {
            return Err(Error::Unavailable(
                "broker unreachable; still reconnecting".into(),
            ));
        };
        if let Some(s) = self.healthy() {
            return Ok(s);
        }
        let old = self.slot().take();
        if let Some(old) = old {
            tracing::warn!(
                connection_name = %self.name,
                conn_no = old.conn_no,
                connected = old.conn.status().connected(),
                "connection to the broker lost; reconnecting"
            );
            // Close it for good if it is half alive (a dead publishing channel), so the
            // broker requeues what was delivered on it: those leases are lost now.
            let _ = tokio::time::timeout(
                Duration::from_secs(1),
                old.conn.close(200, "respawn: replacing connection".into()),
            )
            .await;
        }
        loop {
            if let Some(at) = backoff.not_before {
                if at > started + RECONNECT_BUDGET {
                    return Err(Error::Unavailable(
                        "broker unreachable; waiting before the next connection attempt".into(),
                    ));
                }
                tokio::time::sleep_until(at).await;
            }
            let conn_no = self.conn_nos.fetch_add(1, Ordering::Relaxed);
            match attempt(self, conn_no).await {
                Ok(session) => {
                    tracing::info!(connection_name = %self.name, conn_no, "reconnected to the broker");
                    backoff.delay = BACKOFF_MIN;
                    backoff.not_before = None;
                    let session = Arc::new(session);
                    *self.slot() = Some(session.clone());
                    return Ok(session);
                }
                Err(e) => {
                    tracing::warn!(
                        connection_name = %self.name,
                        error = %e,
                        retry_in = ?backoff.delay,
                        "connection attempt failed"
                    );
                    backoff.not_before = Some(Instant::now() + backoff.delay);
                    backoff.delay = (backoff.delay * 2).min(BACKOFF_MAX);
                    if started.elapsed() >= RECONNECT_BUDGET {
                        return Err(e);
                    }
                }
            }
        }
    }
}

async fn attempt(link: &Link, conn_no: u64) -> Result<Session, Error> {
    match tokio::time::timeout(CONNECT_TIMEOUT, Session::open(link, conn_no)).await {
        Ok(Ok(s)) => Ok(s),
        Ok(Err(e)) => Err(unavailable(e)),
        Err(_) => Err(Error::Unavailable(
            format!("connecting took longer than {CONNECT_TIMEOUT:?}").into(),
        )),
    }
}
