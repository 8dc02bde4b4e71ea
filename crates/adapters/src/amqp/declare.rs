//! Declaring queues (once, cached) and publishing to them with confirms.

use std::collections::HashMap;
use std::time::Duration;

use lapin::options::QueueDeclareOptions;
use lapin::types::{AMQPValue, FieldTable};
use respawn_core::ports::queue::{Error, dead_letter_queue};
use tokio::time::Instant;

use super::session::{Published, Session};
use super::{Inner, lock, message, unavailable};

/// A delay queue expires a minute after its last declaration plus its delay, and
/// messages may still be waiting in it: declare it again at least this often, so
/// that it outlives every message published to it.
const DELAY_QUEUE_REDECLARE: Duration = Duration::from_secs(30);

impl Inner {
    /// Declares `queue` (and, for a logical queue, its dead-letter queue) unless
    /// this adapter already did.
    pub(super) async fn ensure_queue(&self, session: &Session, queue: &str) -> Result<(), Error> {
        if lock(&self.declared).contains_key(queue) {
            return Ok(());
        }
        let mut args = FieldTable::default();
        args.insert("x-max-priority".into(), AMQPValue::LongUInt(9));
        let mut names = vec![queue.to_owned()];
        // A dead-letter queue is a logical queue too (it is received from), but its
        // own dead-letter queue is only declared if something goes there.
        if !queue.ends_with(".dead") {
            names.push(dead_letter_queue(queue));
        }
        self.declare(session, names, args, Duration::MAX).await
    }

    /// Declares the queue that holds `queue`'s messages for `ms` milliseconds.
    async fn ensure_delay_queue(
        &self,
        session: &Session,
        queue: &str,
        ms: u64,
    ) -> Result<String, Error> {
        let name = message::delay_queue(queue, ms);
        let mut args = FieldTable::default();
        args.insert("x-message-ttl".into(), AMQPValue::LongLongInt(ms as i64));
        args.insert(
            "x-dead-letter-exchange".into(),
            AMQPValue::LongString("".into()),
        );
        args.insert(
            "x-dead-letter-routing-key".into(),
            AMQPValue::LongString(queue.into()),
        );
        args.insert(
            "x-expires".into(),
            AMQPValue::LongLongInt(ms as i64 + 60_000),
        );
        self.declare(session, vec![name.clone()], args, DELAY_QUEUE_REDECLARE)
            .await?;
        Ok(name)
    }

    async fn declare(
        &self,
        session: &Session,
        names: Vec<String>,
        args: FieldTable,
        fresh_for: Duration,
    ) -> Result<(), Error> {
        let fresh = |d: &HashMap<String, Instant>| {
            names
                .iter()
                .all(|n| d.get(n).is_some_and(|at| at.elapsed() < fresh_for))
        };
        if fresh(&lock(&self.declared)) {
            return Ok(());
        }
        let _one_at_a_time = self.declaring.lock().await;
        if fresh(&lock(&self.declared)) {
            return Ok(());
        }
        // A channel per declaration: a refused declaration (the queue exists with
        // other arguments) closes its channel, and must not take the publishing
        // channel or a consumer down with it. Declarations are rare (cached).
        let channel = session.conn.create_channel().await.map_err(unavailable)?;
        for name in &names {
            let options = QueueDeclareOptions {
                durable: true,
                ..QueueDeclareOptions::default()
            };
            channel
                .queue_declare(message::short(name)?, options, args.clone())
                .await
                .map_err(|e| declare_error(name, e))?;
            tracing::debug!(queue = %name, "queue declared");
        }
        let _ = channel.close(200, "respawn: declared".into()).await;
        let now = Instant::now();
        let mut declared = lock(&self.declared);
        for name in names {
            declared.insert(name, now);
        }
        Ok(())
    }

    /// Publishes to `target` after making sure it exists; if it vanished since we
    /// declared it (the broker returns the message), declares it again once.
    pub(super) async fn publish(
        &self,
        queue: &str,
        delay: Option<u64>,
        body: &[u8],
        props: lapin::BasicProperties,
    ) -> Result<(), Error> {
        let session = self.link.session().await?;
        for _ in 0..2 {
            self.ensure_queue(&session, queue).await?;
            let target = match delay {
                Some(ms) => self.ensure_delay_queue(&session, queue, ms).await?,
                None => queue.to_owned(),
            };
            match session.publish(&target, body, props.clone()).await? {
                Published::Stored => return Ok(()),
                Published::Unroutable => {
                    tracing::warn!(queue = %target, "queue vanished; declaring it again");
                    let mut declared = lock(&self.declared);
                    declared.remove(queue);
                    declared.remove(&target);
                }
            }
        }
        Err(Error::Unavailable(
            format!("the broker keeps returning messages for {queue} as unroutable").into(),
        ))
    }
}

impl Inner {
    /// How many of `queue`'s messages are ready, as the broker counts them (not
    /// those delivered and unacknowledged, nor those in a delay queue); 0 for a
    /// queue that does not exist.
    pub(super) async fn ready(&self, queue: &str) -> Result<u32, Error> {
        let session = self.link.session().await?;
        // A channel of its own: a passive declaration of a queue that does not
        // exist closes its channel.
        let channel = session.conn.create_channel().await.map_err(unavailable)?;
        let options = QueueDeclareOptions {
            passive: true,
            ..QueueDeclareOptions::default()
        };
        let got = channel
            .queue_declare(message::short(queue)?, options, FieldTable::default())
            .await;
        match got {
            Ok(q) => {
                let _ = channel.close(200, "respawn: counted".into()).await;
                Ok(q.message_count())
            }
            Err(e) => match e.kind() {
                lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 404 => Ok(0),
                _ => Err(unavailable(e)),
            },
        }
    }
}

pub(super) fn declare_error(queue: &str, e: lapin::Error) -> Error {
    match e.kind() {
        // PRECONDITION_FAILED: the queue exists with other arguments.
        lapin::ErrorKind::ProtocolError(amqp) if amqp.get_id() == 406 => Error::Invalid(format!(
            "queue {queue} exists on the broker with other settings: {}",
            amqp.get_message()
        )),
        _ => unavailable(e),
    }
}
