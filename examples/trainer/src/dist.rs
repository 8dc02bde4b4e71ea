//! Data-parallel training over TCP, for multi-node jobs.
//!
//! Every rank computes the gradient of its share of each step's batch (examples
//! `j` with `j % ranks == rank`); rank 0 sums the shares in rank order and sends
//! the sum back, so every rank applies the same update, and the model is the same
//! bit for bit however often the run was stopped and resumed with the same number
//! of ranks. With each share goes whether that rank got SIGTERM: when any did,
//! every rank stops before the same step, and rank 0 (the only one that writes
//! checkpoints and outputs) checkpoints.
//!
//! At the start each rank tells rank 0 the step and parameters it resumed from
//! (respawn restores the same checkpoint on every node); a rank that differs stops
//! the run with a clear error rather than train a different model.
//!
//! The environment is respawn's multi-node contract, with torchrun's names as
//! fallbacks: `RESPAWN_NUM_NODES` (`WORLD_SIZE`), `RESPAWN_NODE_RANK`
//! (`NODE_RANK`, `RANK`), `MASTER_ADDR`, `MASTER_PORT`.

use std::io::{self, BufReader, BufWriter, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpListener, TcpStream, ToSocketAddrs};
use std::sync::atomic::{AtomicBool, Ordering};
use std::thread;
use std::time::{Duration, Instant};

use crate::error::{EXIT_INPUT, EXIT_IO, Error};

const MAGIC: &[u8; 8] = b"rtdp0001";
/// How long ranks wait for each other at the start (nodes boot at different times).
const MEET: Duration = Duration::from_secs(300);
/// A peer silent this long in a step is gone (its VM lost without closing the
/// connection).
const SILENCE: Duration = Duration::from_secs(300);
/// How long a new connection has to say which rank it is.
const HELLO: Duration = Duration::from_secs(10);

/// This process's place among the ranks.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct World {
    pub ranks: usize,
    pub rank: usize,
    master: String,
    port: u16,
}

fn var(names: &[&str]) -> Option<(String, String)> {
    names.iter().find_map(|n| {
        std::env::var(n)
            .ok()
            .filter(|v| !v.is_empty())
            .map(|v| ((*n).to_owned(), v))
    })
}

fn number<T: std::str::FromStr>(name: &str, value: &str) -> Result<T, Error> {
    value
        .trim()
        .parse()
        .map_err(|_| Error::input(format!("{name}={value:?} is not a number")))
}

impl World {
    /// The world the environment describes; `None` for a single node.
    pub fn from_env() -> Result<Option<World>, Error> {
        let Some((name, value)) = var(&["RESPAWN_NUM_NODES", "WORLD_SIZE"]) else {
            return Ok(None);
        };
        let ranks: usize = number(&name, &value)?;
        if ranks <= 1 {
            return Ok(None);
        }
        let (name, value) = var(&["RESPAWN_NODE_RANK", "NODE_RANK", "RANK"]).ok_or_else(|| {
            Error::input(format!(
                "{ranks} nodes but no RESPAWN_NODE_RANK (or NODE_RANK, RANK)"
            ))
        })?;
        let rank: usize = number(&name, &value)?;
        if rank >= ranks {
            return Err(Error::input(format!(
                "{name}={rank} is not below the number of nodes, {ranks}"
            )));
        }
        let (_, master) = var(&["MASTER_ADDR"])
            .ok_or_else(|| Error::input("a multi-node run needs MASTER_ADDR (rank 0's address)"))?;
        let (name, port) = var(&["MASTER_PORT"])
            .ok_or_else(|| Error::input("a multi-node run needs MASTER_PORT"))?;
        let port = number(&name, &port)?;
        Ok(Some(World {
            ranks,
            rank,
            master,
            port,
        }))
    }
}

/// What a rank resumed from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Start {
    pub step: u64,
    /// FNV-1a of the parameters' bits.
    pub digest: u64,
    pub params: u64,
}

impl Start {
    pub fn of(step: u64, params: &[f64]) -> Start {
        let mut h: u64 = 0xcbf2_9ce4_8422_2325;
        for p in params {
            for b in p.to_bits().to_le_bytes() {
                h ^= u64::from(b);
                h = h.wrapping_mul(0x0100_0000_01b3);
            }
        }
        Start {
            step,
            digest: h,
            params: params.len() as u64,
        }
    }
}

struct Peer {
    rank: usize,
    reader: BufReader<TcpStream>,
    writer: BufWriter<TcpStream>,
}

impl Peer {
    fn new(stream: TcpStream, rank: usize) -> io::Result<Peer> {
        stream.set_nodelay(true)?;
        stream.set_read_timeout(Some(SILENCE))?;
        Ok(Peer {
            rank,
            reader: BufReader::new(stream.try_clone()?),
            writer: BufWriter::new(stream),
        })
    }
}

/// The connections of one rank: rank 0 holds one to every other rank, the others
/// one to rank 0.
pub struct Link {
    rank: usize,
    peers: Vec<Peer>,
}

fn lost(what: &str, e: &io::Error) -> Error {
    Error {
        code: EXIT_IO,
        message: format!("{what}: {e}"),
    }
}

fn read_u64(r: &mut impl Read) -> io::Result<u64> {
    let mut b = [0u8; 8];
    r.read_exact(&mut b)?;
    Ok(u64::from_le_bytes(b))
}

fn read_floats(r: &mut impl Read, into: &mut [f64]) -> io::Result<()> {
    let mut b = [0u8; 8];
    for v in into {
        r.read_exact(&mut b)?;
        *v = f64::from_le_bytes(b);
    }
    Ok(())
}

fn write_floats(w: &mut impl Write, values: &[f64]) -> io::Result<()> {
    for v in values {
        w.write_all(&v.to_le_bytes())?;
    }
    Ok(())
}

/// Runs `f` until it succeeds, SIGTERM comes (`Ok(None)`) or `MEET` passes.
fn patiently<T>(
    term: &AtomicBool,
    what: &str,
    mut f: impl FnMut() -> io::Result<Option<T>>,
) -> Result<Option<T>, Error> {
    let until = Instant::now() + MEET;
    loop {
        if term.load(Ordering::SeqCst) {
            return Ok(None);
        }
        match f() {
            Ok(Some(t)) => return Ok(Some(t)),
            Ok(None) => {}
            Err(e) if Instant::now() >= until => return Err(lost(what, &e)),
            Err(_) => {}
        }
        if Instant::now() >= until {
            return Err(Error {
                code: EXIT_IO,
                message: format!("{what}: not within {}s", MEET.as_secs()),
            });
        }
        thread::sleep(Duration::from_millis(100));
    }
}

impl Link {
    /// Meets the other ranks; `None` when SIGTERM came first.
    pub fn meet(world: &World, start: Start, term: &AtomicBool) -> Result<Option<Link>, Error> {
        if world.rank == 0 {
            Self::lead(world, start, term)
        } else {
            Self::follow(world, start, term)
        }
    }

    fn lead(world: &World, start: Start, term: &AtomicBool) -> Result<Option<Link>, Error> {
        // On loopback only when the ranks meet there (one machine); else on every
        // address, as rank 0's peers reach it by MASTER_ADDR.
        let local = (world.master.as_str(), world.port)
            .to_socket_addrs()
            .ok()
            .and_then(|mut a| a.next())
            .is_some_and(|a| a.ip().is_loopback());
        let ip = if local {
            IpAddr::V4(Ipv4Addr::LOCALHOST)
        } else {
            IpAddr::V4(Ipv4Addr::UNSPECIFIED)
        };
        let listener = TcpListener::bind(SocketAddr::new(ip, world.port))
            .map_err(|e| lost(&format!("cannot listen on port {}", world.port), &e))?;
        listener
            .set_nonblocking(true)
            .map_err(|e| lost("cannot listen", &e))?;
        let mut peers: Vec<Option<Peer>> = (1..world.ranks).map(|_| None).collect();
        let mut mismatch: Option<String> = None;
        while peers.iter().any(Option::is_none) {
            let accepted = patiently(term, "waiting for the other ranks", || {
                match listener.accept() {
                    Ok((s, _)) => Ok(Some(s)),
                    Err(e) if e.kind() == io::ErrorKind::WouldBlock => Ok(None),
                    Err(e) => Err(e),
                }
            })?;
            let Some(stream) = accepted else {
                return Ok(None);
            };
            stream
                .set_nonblocking(false)
                .map_err(|e| lost("a rank's connection", &e))?;
            let mut peer = Peer::new(stream, 0).map_err(|e| lost("a rank's connection", &e))?;
            // A connection that says nothing (not a rank) holds the others up briefly.
            let _ = peer.reader.get_ref().set_read_timeout(Some(HELLO));
            let hello = Self::hello(&mut peer.reader).map_err(|e| lost("a rank's hello", &e));
            let _ = peer.reader.get_ref().set_read_timeout(Some(SILENCE));
            let (rank, theirs) = match hello {
                Ok(h) => h,
                // Not one of ours (a port scan, a stale rank): not counted.
                Err(e) => {
                    eprintln!("respawn-trainer: ignoring a connection: {}", e.message);
                    continue;
                }
            };
            let refused = if rank == 0 || rank >= world.ranks {
                Some(format!("rank {rank} is not one of 1..{}", world.ranks))
            } else if peers[rank - 1].is_some() {
                Some(format!("rank {rank} connected twice"))
            } else {
                None
            };
            if let Some(why) = refused {
                // Not counted: the rank that should be there may still come.
                let _ = Self::answer(&mut peer, &why);
                eprintln!("respawn-trainer: refused a connection: {why}");
                continue;
            }
            if theirs != start && mismatch.is_none() {
                mismatch = Some(format!(
                    "rank {rank} resumed from step {} (parameters {:016x}), rank 0 from step {} ({:016x}): every rank must restore the same checkpoint",
                    theirs.step, theirs.digest, start.step, start.digest
                ));
            }
            peer.rank = rank;
            peers[rank - 1] = Some(peer);
        }
        // Every rank hears the verdict, so that none waits for a run that will not be.
        let verdict = mismatch.clone().unwrap_or_default();
        let mut peers: Vec<Peer> = peers.into_iter().flatten().collect();
        for peer in &mut peers {
            Self::answer(peer, &verdict).map_err(|e| lost("answering a rank", &e))?;
        }
        if let Some(why) = mismatch {
            return Err(Error {
                code: EXIT_INPUT,
                message: why,
            });
        }
        Ok(Some(Link { rank: 0, peers }))
    }

    /// Tells a rank whether the run goes ahead: empty, or why not.
    fn answer(peer: &mut Peer, why: &str) -> io::Result<()> {
        peer.writer.write_all(&(why.len() as u64).to_le_bytes())?;
        peer.writer.write_all(why.as_bytes())?;
        peer.writer.flush()
    }

    fn hello(r: &mut impl Read) -> io::Result<(usize, Start)> {
        let mut magic = [0u8; 8];
        r.read_exact(&mut magic)?;
        if &magic != MAGIC {
            return Err(io::Error::new(
                io::ErrorKind::InvalidData,
                "not a trainer rank",
            ));
        }
        let rank = read_u64(r)? as usize;
        let start = Start {
            step: read_u64(r)?,
            digest: read_u64(r)?,
            params: read_u64(r)?,
        };
        Ok((rank, start))
    }

    fn follow(world: &World, start: Start, term: &AtomicBool) -> Result<Option<Link>, Error> {
        let what = format!("connecting to rank 0 at {}:{}", world.master, world.port);
        let connected = patiently(term, &what, || {
            let addr = (world.master.as_str(), world.port)
                .to_socket_addrs()?
                .next()
                .ok_or_else(|| io::Error::new(io::ErrorKind::NotFound, "no address"))?;
            match TcpStream::connect_timeout(&addr, Duration::from_secs(5)) {
                Ok(s) => Ok(Some(s)),
                Err(e) if e.kind() == io::ErrorKind::ConnectionRefused => Ok(None),
                Err(e) => Err(e),
            }
        })?;
        let Some(stream) = connected else {
            return Ok(None);
        };
        let mut peer = Peer::new(stream, 0).map_err(|e| lost(&what, &e))?;
        let sent = peer.writer.write_all(MAGIC).and_then(|()| {
            for v in [world.rank as u64, start.step, start.digest, start.params] {
                peer.writer.write_all(&v.to_le_bytes())?;
            }
            peer.writer.flush()
        });
        sent.map_err(|e| lost(&what, &e))?;
        let len = read_u64(&mut peer.reader).map_err(|e| lost(&what, &e))?;
        if len > 0 {
            let mut why = vec![0u8; len.min(4096) as usize];
            peer.reader
                .read_exact(&mut why)
                .map_err(|e| lost(&what, &e))?;
            return Err(Error {
                code: EXIT_INPUT,
                message: format!(
                    "rank 0 refused this rank: {}",
                    String::from_utf8_lossy(&why)
                ),
            });
        }
        Ok(Some(Link {
            rank: world.rank,
            peers: vec![peer],
        }))
    }

    /// One step's all-reduce: `grad`, this rank's share, becomes the sum of every
    /// rank's (added in rank order). `false` when a rank asked to stop (`stop` here),
    /// and then `grad` is unchanged.
    pub fn all_reduce(&mut self, grad: &mut [f64], stop: bool) -> Result<bool, Error> {
        let rank = self.rank;
        let io = |e: io::Error| {
            lost(
                &format!("rank {rank}: the all-reduce with the other ranks"),
                &e,
            )
        };
        if self.rank == 0 {
            let mut any_stop = stop;
            let mut share = vec![0.0; grad.len()];
            for peer in &mut self.peers {
                let mut flag = [0u8; 1];
                peer.reader.read_exact(&mut flag).map_err(io)?;
                read_floats(&mut peer.reader, &mut share).map_err(io)?;
                any_stop |= flag[0] != 0;
                if !any_stop {
                    for (g, s) in grad.iter_mut().zip(&share) {
                        *g += s;
                    }
                }
            }
            for peer in &mut self.peers {
                peer.writer.write_all(&[u8::from(any_stop)]).map_err(io)?;
                if !any_stop {
                    write_floats(&mut peer.writer, grad).map_err(io)?;
                }
                peer.writer.flush().map_err(io)?;
            }
            return Ok(!any_stop);
        }
        let leader = &mut self.peers[0];
        leader.writer.write_all(&[u8::from(stop)]).map_err(io)?;
        write_floats(&mut leader.writer, grad).map_err(io)?;
        leader.writer.flush().map_err(io)?;
        let mut flag = [0u8; 1];
        leader.reader.read_exact(&mut flag).map_err(io)?;
        if flag[0] != 0 {
            return Ok(false);
        }
        read_floats(&mut leader.reader, grad).map_err(io)?;
        Ok(true)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn world(rank: usize, port: u16) -> World {
        World {
            ranks: 3,
            rank,
            master: "127.0.0.1".into(),
            port,
        }
    }

    fn free_port() -> u16 {
        TcpListener::bind("127.0.0.1:0")
            .and_then(|l| l.local_addr())
            .map(|a| a.port())
            .unwrap_or(0)
    }

    #[test]
    fn three_ranks_sum_their_shares_in_rank_order_and_stop_together() {
        let port = free_port();
        let start = Start::of(5, &[1.0, 2.0]);
        let handles: Vec<_> = (0..3)
            .map(|rank| {
                thread::spawn(move || {
                    let term = AtomicBool::new(false);
                    let mut link = Link::meet(&world(rank, port), start, &term)
                        .ok()
                        .flatten()
                        .ok_or("no link")?;
                    let mut grad = vec![rank as f64, 0.5];
                    let first = link.all_reduce(&mut grad, false).map_err(|_| "reduce")?;
                    // Rank 2 asks to stop at the next step: all stop.
                    let mut next = vec![0.0, 0.0];
                    let second = link
                        .all_reduce(&mut next, rank == 2)
                        .map_err(|_| "reduce")?;
                    Ok::<_, &str>((first, grad, second))
                })
            })
            .collect();
        for h in handles {
            let (first, grad, second) = h.join().ok().and_then(Result::ok).unwrap_or_default();
            assert!(first);
            assert_eq!(grad, vec![3.0, 1.5]);
            assert!(!second, "every rank stops when one asks");
        }
    }

    #[test]
    fn a_rank_that_resumed_elsewhere_is_refused() {
        let port = free_port();
        let ours = Start::of(5, &[1.0]);
        let other = Start::of(4, &[1.0]);
        let lead = thread::spawn(move || {
            let term = AtomicBool::new(false);
            let w = World {
                ranks: 2,
                ..world(0, port)
            };
            Link::meet(&w, ours, &term).err().map(|e| e.message)
        });
        let term = AtomicBool::new(false);
        let w = World {
            ranks: 2,
            ..world(1, port)
        };
        let refused = Link::meet(&w, other, &term).err().map(|e| e.message);
        assert!(
            refused.as_deref().is_some_and(|m| m.contains("step 4")),
            "{refused:?}"
        );
        let led = lead.join().ok().flatten();
        assert!(
            led.as_deref()
                .is_some_and(|m| m.contains("same checkpoint")),
            "{led:?}"
        );
    }
}
