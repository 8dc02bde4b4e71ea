//! A size limit on the messages this client takes in, enforced before their bodies
//! are buffered.
//!
//! lapin has no such limit: it collects a delivery's body frames until the body is
//! whole, however large the content header says it is, and only then hands the
//! delivery over. Prefetch counts messages, not bytes (RabbitMQ does not implement
//! `basic.qos` `prefetch_size`), and the broker's own `max_message_size` (128 MiB by
//! default on 3.10) is server configuration a client cannot set. So the limit sits
//! under lapin, in the byte stream it reads from the socket: [`Limited`] parses the
//! frames the broker sends, and when a content header announces a body larger than
//! the limit, it rewrites the announced size to 0 and drops that body's frames as
//! they arrive. lapin then sees a complete delivery with an empty body, and
//! [`Oversized`] remembers the size announced for its delivery tag, so that the
//! adapter dead-letters it with a reason naming the size rather than handing it out.
//!
//! What this bounds: for a message over the limit, the client holds at most one frame
//! of it at a time, and frames are at most [`FRAME_MAX`] bytes (the connection
//! negotiates that maximum; the broker may ask for less). Messages within the limit
//! are buffered whole as before, so a consumer holds at most `prefetch` × the limit
//! of bodies. It does not bound what the broker stores (its own `max_message_size`
//! does), and it needs the plain byte stream: with `amqps://` the frames are
//! encrypted where the stream can be wrapped, so there the limit is checked only
//! after lapin buffered the body (see `session.rs`).

use std::collections::HashMap;
use std::future::Future;
use std::io::{self, Read, Write};
use std::net::SocketAddr;
use std::os::fd::{AsFd, AsRawFd};
use std::pin::Pin;
use std::sync::{Arc, Mutex};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use async_rs::traits::Reactor;
use async_rs::util::RuntimeParts;
use async_rs::{Runtime, Tokio};
use futures::Stream;
use futures::io::{AsyncRead, AsyncWrite};

use super::lock;

/// The largest frame this client accepts, proposed to the broker at connection
/// tuning (RabbitMQ's default, 128 KiB).
pub(super) const FRAME_MAX: u32 = 131_072;

// AMQP 0-9-1 frame layout: type (1 byte), channel (2), payload size (4), payload,
// frame-end (0xCE).
const FRAME_HEADER: usize = 7;
const METHOD: u8 = 1;
const CONTENT_HEADER: u8 = 2;
const BODY: u8 = 3;
const CHANNEL: u16 = 20;
const CHANNEL_OPEN_OK: u16 = 11;
const BASIC: u16 = 60;
const BASIC_RETURN: u16 = 50;
const BASIC_DELIVER: u16 = 60;
const BASIC_GET_OK: u16 = 71;
/// Where a content header's 64-bit body size starts: after class id and weight.
const BODY_SIZE_AT: usize = 4;

/// Deliveries whose bodies were dropped, by channel and delivery tag, with the size
/// their content header announced.
#[derive(Debug, Default)]
pub(super) struct Oversized(Mutex<HashMap<(u16, u64), u64>>);

impl Oversized {
    fn record(&self, channel: u16, delivery_tag: u64, bytes: u64) {
        lock(&self.0).insert((channel, delivery_tag), bytes);
    }

    /// Forgets a channel's deliveries: its number is being reused, and delivery tags
    /// start over on the new channel.
    fn forget_channel(&self, channel: u16) {
        lock(&self.0).retain(|&(c, _), _| c != channel);
    }

    /// The announced size of a delivery whose body was dropped (once).
    pub fn take(&self, channel: u16, delivery_tag: u64) -> Option<u64> {
        lock(&self.0).remove(&(channel, delivery_tag))
    }
}

/// A byte stream from the broker with the bodies of oversized messages taken out.
/// Writes pass through untouched.
#[derive(Debug)]
pub(super) struct Limited<S> {
    inner: S,
    limit: u64,
    oversized: Arc<Oversized>,
    /// Bytes read from the socket: `buf[given..ready]` are checked and go to lapin as
    /// they are, `buf[ready..]` is the start of a frame not yet complete.
    buf: Vec<u8>,
    given: usize,
    ready: usize,
    read_chunk: Box<[u8]>,
    /// Per channel: the delivery tag of content announced by the last method frame.
    content_for: HashMap<u16, Option<u64>>,
    /// Per channel: body bytes still to drop.
    dropping: HashMap<u16, u64>,
    /// The broker answered our protocol header with its own (a version it prefers)
    /// and closes: what follows is not frames.
    raw: bool,
}

impl<S> Limited<S> {
    pub fn new(inner: S, limit: u64, oversized: Arc<Oversized>) -> Limited<S> {
        Limited {
            inner,
            limit,
            oversized,
            buf: Vec::new(),
            given: 0,
            ready: 0,
            read_chunk: vec![0; 64 * 1024].into_boxed_slice(),
            content_for: HashMap::new(),
            dropping: HashMap::new(),
            raw: false,
        }
    }

    /// Checks the complete frames after `ready`. Returns whether it got anywhere.
    fn scan(&mut self) -> io::Result<bool> {
        let start = self.ready;
        loop {
            let rest = &self.buf[self.ready..];
            if self.raw || rest.starts_with(b"AMQP") {
                self.raw = true;
                self.ready = self.buf.len();
                return Ok(self.ready > start);
            }
            if rest.len() < FRAME_HEADER {
                return Ok(self.ready > start);
            }
            let kind = rest[0];
            let channel = u16::from_be_bytes([rest[1], rest[2]]);
            let size = u32::from_be_bytes([rest[3], rest[4], rest[5], rest[6]]);
            if size > FRAME_MAX {
                return Err(io::Error::new(
                    io::ErrorKind::InvalidData,
                    format!(
                        "the broker sent a frame of {size} bytes; at most {FRAME_MAX} were negotiated"
                    ),
                ));
            }
            let end = FRAME_HEADER + size as usize + 1;
            if rest.len() < end {
                return Ok(self.ready > start);
            }
            let at = self.ready;
            if self.frame(kind, channel, at, end) {
                self.ready = at + end;
            } else {
                self.buf.drain(at..at + end);
            }
        }
    }

    /// Looks at one complete frame at `buf[at..at + len]`, rewriting it in place if
    /// need be. Returns false if the frame is to be dropped.
    fn frame(&mut self, kind: u8, channel: u16, at: usize, len: usize) -> bool {
        let payload = at + FRAME_HEADER..at + len - 1;
        match kind {
            METHOD => {
                // Content follows a method on its channel before anything else there,
                // so a method ends whatever content that channel was sending.
                self.dropping.remove(&channel);
                let p = &self.buf[payload];
                match (be16(p, 0), be16(p, 2)) {
                    (Some(BASIC), Some(BASIC_DELIVER)) => {
                        // consumer-tag (short string), then the delivery tag.
                        let tag = p.get(4).and_then(|&n| be64(p, 5 + usize::from(n)));
                        self.content_for.insert(channel, tag);
                    }
                    (Some(BASIC), Some(BASIC_GET_OK)) => {
                        self.content_for.insert(channel, be64(p, 4));
                    }
                    (Some(BASIC), Some(BASIC_RETURN)) => {
                        self.content_for.insert(channel, None);
                    }
                    (Some(CHANNEL), Some(CHANNEL_OPEN_OK)) => {
                        // A delivery of the channel's last life that was never looked
                        // up must not be taken for one of this life.
                        self.content_for.remove(&channel);
                        self.oversized.forget_channel(channel);
                    }
                    _ => {}
                }
                true
            }
            CONTENT_HEADER => {
                let tag = self.content_for.remove(&channel).flatten();
                let body_at = payload.start + BODY_SIZE_AT;
                let Some(size) = be64(&self.buf[payload], BODY_SIZE_AT) else {
                    return true; // malformed: lapin will say so
                };
                if size > self.limit {
                    self.buf[body_at..body_at + 8].copy_from_slice(&0u64.to_be_bytes());
                    self.dropping.insert(channel, size);
                    if let Some(tag) = tag {
                        self.oversized.record(channel, tag, size);
                    }
                }
                true
            }
            BODY => match self.dropping.get_mut(&channel) {
                Some(left) => {
                    *left = left.saturating_sub((len - FRAME_HEADER - 1) as u64);
                    if *left == 0 {
                        self.dropping.remove(&channel);
                    }
                    false
                }
                None => true,
            },
            _ => true,
        }
    }
}

fn be16(p: &[u8], at: usize) -> Option<u16> {
    Some(u16::from_be_bytes(p.get(at..at + 2)?.try_into().ok()?))
}

fn be64(p: &[u8], at: usize) -> Option<u64> {
    Some(u64::from_be_bytes(p.get(at..at + 8)?.try_into().ok()?))
}

impl<S: AsyncRead + Unpin> AsyncRead for Limited<S> {
    fn poll_read(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        out: &mut [u8],
    ) -> Poll<io::Result<usize>> {
        let this = self.get_mut();
        loop {
            if this.ready > this.given {
                let n = (this.ready - this.given).min(out.len());
                out[..n].copy_from_slice(&this.buf[this.given..this.given + n]);
                this.given += n;
                return Poll::Ready(Ok(n));
            }
            if this.given > 0 {
                // Everything checked was given: drop it, once, rather than shifting
                // the buffer on every read.
                this.buf.drain(..this.given);
                this.ready -= this.given;
                this.given = 0;
            }
            if this.scan()? {
                continue;
            }
            match Pin::new(&mut this.inner).poll_read(cx, &mut this.read_chunk) {
                Poll::Ready(Ok(0)) => {
                    // The end of the stream: hand over a torn last frame as it is
                    // (lapin reports it), then the end.
                    if this.buf.is_empty() {
                        return Poll::Ready(Ok(0));
                    }
                    this.raw = true;
                }
                Poll::Ready(Ok(n)) => this.buf.extend_from_slice(&this.read_chunk[..n]),
                Poll::Ready(Err(e)) => return Poll::Ready(Err(e)),
                Poll::Pending => return Poll::Pending,
            }
        }
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Limited<S> {
    fn poll_write(
        self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        data: &[u8],
    ) -> Poll<io::Result<usize>> {
        Pin::new(&mut self.get_mut().inner).poll_write(cx, data)
    }

    fn poll_flush(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_flush(cx)
    }

    fn poll_close(self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<io::Result<()>> {
        Pin::new(&mut self.get_mut().inner).poll_close(cx)
    }
}

/// Tokio's reactor, with its TCP streams wrapped in [`Limited`]: lapin opens its
/// socket through the runtime it is given, so this is where the wrapper goes in.
#[derive(Debug, Clone)]
pub(super) struct LimitingReactor {
    tokio: Tokio,
    limit: u64,
    oversized: Arc<Oversized>,
}

/// The runtime for one connection: Tokio's executor, and its reactor with
/// connections limited to `limit`-byte bodies, dropped ones recorded in `oversized`.
pub(super) fn runtime(
    limit: u64,
    oversized: Arc<Oversized>,
) -> Runtime<RuntimeParts<Tokio, LimitingReactor>> {
    let reactor = LimitingReactor {
        tokio: Tokio::current(),
        limit,
        oversized,
    };
    Runtime::new(RuntimeParts::new(Tokio::current(), reactor))
}

impl Reactor for LimitingReactor {
    type TcpStream = Limited<<Tokio as Reactor>::TcpStream>;
    type Sleep = <Tokio as Reactor>::Sleep;

    fn register<H: Read + Write + AsFd + AsRawFd + Send + 'static>(
        &self,
        socket: H,
    ) -> io::Result<impl AsyncRead + AsyncWrite + Send + Unpin + 'static> {
        self.tokio.register(socket)
    }

    fn sleep(&self, dur: Duration) -> Self::Sleep {
        self.tokio.sleep(dur)
    }

    fn interval(&self, dur: Duration) -> impl Stream<Item = Instant> + Send + 'static {
        self.tokio.interval(dur)
    }

    fn tcp_connect_addr(
        &self,
        addr: SocketAddr,
    ) -> impl Future<Output = io::Result<Self::TcpStream>> + Send + 'static {
        let connecting = self.tokio.tcp_connect_addr(addr);
        let (limit, oversized) = (self.limit, self.oversized.clone());
        async move { Ok(Limited::new(connecting.await?, limit, oversized)) }
    }
}

#[cfg(test)]
mod tests {
    use futures::AsyncReadExt;

    use super::*;

    fn frame(kind: u8, channel: u16, payload: &[u8]) -> Vec<u8> {
        let mut f = vec![kind];
        f.extend_from_slice(&channel.to_be_bytes());
        f.extend_from_slice(&(payload.len() as u32).to_be_bytes());
        f.extend_from_slice(payload);
        f.push(0xCE);
        f
    }

    fn deliver(channel: u16, tag: u64) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&BASIC.to_be_bytes());
        p.extend_from_slice(&BASIC_DELIVER.to_be_bytes());
        p.push(3);
        p.extend_from_slice(b"ctg");
        p.extend_from_slice(&tag.to_be_bytes());
        p.extend_from_slice(&[0, 0, 1, b'q']); // redelivered, exchange "", routing key "q"
        frame(METHOD, channel, &p)
    }

    fn header(channel: u16, body_size: u64) -> Vec<u8> {
        let mut p = Vec::new();
        p.extend_from_slice(&BASIC.to_be_bytes());
        p.extend_from_slice(&[0, 0]);
        p.extend_from_slice(&body_size.to_be_bytes());
        p.extend_from_slice(&[0, 0]); // no properties
        frame(CONTENT_HEADER, channel, &p)
    }

    fn message(channel: u16, tag: u64, body: &[u8], frame_size: usize) -> Vec<u8> {
        let mut out = deliver(channel, tag);
        out.extend(header(channel, body.len() as u64));
        for chunk in body.chunks(frame_size) {
            out.extend(frame(BODY, channel, chunk));
        }
        out
    }

    /// Hands out its bytes a few at a time, as a socket may.
    struct Trickle(Vec<u8>, usize);

    impl AsyncRead for Trickle {
        fn poll_read(
            self: Pin<&mut Self>,
            _: &mut Context<'_>,
            out: &mut [u8],
        ) -> Poll<io::Result<usize>> {
            let this = self.get_mut();
            let n = this.1.min(out.len()).min(this.0.len());
            out[..n].copy_from_slice(&this.0[..n]);
            this.0.drain(..n);
            Poll::Ready(Ok(n))
        }
    }

    fn through(input: Vec<u8>, step: usize, limit: u64) -> (Vec<u8>, Arc<Oversized>) {
        let oversized = Arc::new(Oversized::default());
        let mut limited = Limited::new(Trickle(input, step), limit, oversized.clone());
        let mut out = Vec::new();
        futures::executor::block_on(limited.read_to_end(&mut out)).expect("read");
        (out, oversized)
    }

    #[test]
    fn bodies_over_the_limit_are_dropped_and_recorded() {
        let small = message(1, 7, b"small", 4);
        let big = message(2, 8, &[b'x'; 100], 30);
        let after = message(1, 9, b"after", 100);
        let input = [small.clone(), big, after.clone()].concat();
        for step in [1, 5, 1000] {
            let (out, oversized) = through(input.clone(), step, 10);
            let expected = [small.clone(), deliver(2, 8), header(2, 0), after.clone()].concat();
            assert_eq!(out, expected, "read {step} bytes at a time");
            assert_eq!(oversized.take(2, 8), Some(100));
            assert_eq!(oversized.take(2, 8), None, "taken once");
            assert_eq!(oversized.take(1, 7), None);
        }
    }

    #[test]
    fn interleaved_channels_keep_their_own_bodies() {
        // Channel 1's big body and channel 2's small one, frame by frame.
        let mut input = deliver(1, 1);
        input.extend(header(1, 20));
        input.extend(deliver(2, 1));
        input.extend(header(2, 3));
        input.extend(frame(BODY, 1, &[b'x'; 10]));
        input.extend(frame(BODY, 2, b"abc"));
        input.extend(frame(BODY, 1, &[b'x'; 10]));
        let (out, oversized) = through(input, 3, 5);
        let expected = [
            deliver(1, 1),
            header(1, 0),
            deliver(2, 1),
            header(2, 3),
            frame(BODY, 2, b"abc"),
        ]
        .concat();
        assert_eq!(out, expected);
        assert_eq!(oversized.take(1, 1), Some(20));
    }

    #[test]
    fn a_reopened_channel_starts_with_a_clean_record() {
        let mut open_ok = Vec::new();
        open_ok.extend_from_slice(&CHANNEL.to_be_bytes());
        open_ok.extend_from_slice(&CHANNEL_OPEN_OK.to_be_bytes());
        open_ok.extend_from_slice(&[0, 0, 0, 0]); // channel-id (long string, empty)
        let input = [
            message(3, 1, &[b'x'; 50], 50),
            message(4, 1, &[b'x'; 50], 50),
            frame(METHOD, 3, &open_ok),
        ]
        .concat();
        let (_, oversized) = through(input, 7, 10);
        assert_eq!(oversized.take(3, 1), None, "channel 3 was opened again");
        assert_eq!(oversized.take(4, 1), Some(50));
    }

    #[test]
    fn frames_larger_than_negotiated_are_refused() {
        let mut input = vec![BODY, 0, 1];
        input.extend_from_slice(&(FRAME_MAX + 1).to_be_bytes());
        let oversized = Arc::new(Oversized::default());
        let mut limited = Limited::new(Trickle(input, 100), 10, oversized);
        let mut out = Vec::new();
        let err = futures::executor::block_on(limited.read_to_end(&mut out))
            .expect_err("a frame over the maximum ends the stream");
        assert_eq!(err.kind(), io::ErrorKind::InvalidData);
    }

    #[test]
    fn a_protocol_header_passes_as_it_is() {
        let input = b"AMQP\x00\x00\x09\x01".to_vec();
        let (out, _) = through(input.clone(), 3, 10);
        assert_eq!(out, input);
    }
}
