//! A small Kafka-protocol proxy in front of each mock broker, so that the
//! embedded broker refuses a record batch larger than it keeps, as a real
//! broker does (`message.max.bytes`): librdkafka's mock cluster accepts any
//! size and keeps about 5 MB per partition, so one 17 MB record would push
//! every older record, acknowledged or not, out of its partition.
//!
//! Every request and response is passed through unchanged, except a
//! ProduceRequest (versions 3 to 8; the mock is told to offer no newer
//! ones) with a partition's records larger than the limit: that request is
//! answered here with `MESSAGE_TOO_LARGE` (error 10, which producers report
//! as "Broker: Message size too large"), and the mock never sees it. Other
//! partitions of the same request (Java clients batch several) get
//! `REQUEST_TIMED_OUT` (7), which producers retry. Responses keep the order
//! of their requests on each connection, as Kafka clients expect.

use std::collections::VecDeque;
use std::io::{self, BufReader, Read, Write};
use std::net::{Shutdown, SocketAddr, TcpListener, TcpStream};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

/// Largest frame passed through (librdkafka's `receive.message.max.bytes`
/// default); a bigger one closes the connection.
const MAX_FRAME: usize = 100 << 20;
/// The Produce API's key, and the versions this proxy reads.
pub const PRODUCE: i16 = 0;
pub const PRODUCE_MIN_VERSION: i16 = 3;
pub const PRODUCE_MAX_VERSION: i16 = 8;
const MESSAGE_TOO_LARGE: i16 = 10;
const REQUEST_TIMED_OUT: i16 = 7;

/// One proxy: listens on a loopback port, forwards to `upstream`.
pub struct Proxy {
    pub address: SocketAddr,
    stop: Arc<AtomicBool>,
}

impl Drop for Proxy {
    fn drop(&mut self) {
        self.stop.store(true, Ordering::Relaxed);
    }
}

impl Proxy {
    /// Starts a proxy on a free loopback port for the broker at `upstream`,
    /// refusing record batches over `max_batch_bytes`.
    pub fn start(upstream: SocketAddr, max_batch_bytes: usize) -> io::Result<Proxy> {
        let listener = TcpListener::bind("127.0.0.1:0")?;
        listener.set_nonblocking(true)?;
        let address = listener.local_addr()?;
        let stop = Arc::new(AtomicBool::new(false));
        let s = stop.clone();
        std::thread::Builder::new()
            .name(format!("broker-proxy-{}", address.port()))
            .spawn(move || {
                while !s.load(Ordering::Relaxed) {
                    match listener.accept() {
                        Ok((client, _)) => {
                            if let Err(e) = connect(client, upstream, max_batch_bytes) {
                                tracing::debug!(error = %e, "embedded broker proxy: connection refused upstream");
                            }
                        }
                        Err(e) if e.kind() == io::ErrorKind::WouldBlock => {
                            std::thread::sleep(Duration::from_millis(5));
                        }
                        Err(_) => std::thread::sleep(Duration::from_millis(50)),
                    }
                }
            })?;
        Ok(Proxy { address, stop })
    }
}

/// What a connection's client waits for, in request order.
enum Pending {
    /// The broker's response to a forwarded request.
    Forwarded,
    /// A response made here, sent once everything before it has been.
    Made(Vec<u8>),
}

/// The client side of a connection: its socket and the responses it waits for.
struct ClientSide {
    stream: TcpStream,
    pending: VecDeque<Pending>,
}

fn connect(client: TcpStream, upstream: SocketAddr, max: usize) -> io::Result<()> {
    client.set_nonblocking(false)?;
    let broker = TcpStream::connect_timeout(&upstream, Duration::from_secs(5))?;
    for s in [&client, &broker] {
        s.set_nodelay(true)?;
    }
    let side = Arc::new(Mutex::new(ClientSide {
        stream: client.try_clone()?,
        pending: VecDeque::new(),
    }));
    let (c_read, b_write) = (client.try_clone()?, broker.try_clone()?);
    let requests = side.clone();
    std::thread::Builder::new()
        .name("broker-proxy-req".into())
        .spawn(move || {
            let _ = pump_requests(c_read, b_write, &requests, max);
            let _ = client.shutdown(Shutdown::Both);
        })?;
    std::thread::Builder::new()
        .name("broker-proxy-resp".into())
        .spawn(move || {
            let _ = pump_responses(broker.try_clone().expect("clone"), &side);
            let _ = broker.shutdown(Shutdown::Both);
            let s = side.lock().unwrap_or_else(|p| p.into_inner());
            let _ = s.stream.shutdown(Shutdown::Both);
        })?;
    Ok(())
}

/// Reads one length-prefixed frame, prefix included.
fn read_frame(r: &mut impl Read, buf: &mut Vec<u8>) -> io::Result<()> {
    let mut len = [0u8; 4];
    r.read_exact(&mut len)?;
    let n = i32::from_be_bytes(len);
    if n < 0 || n as usize > MAX_FRAME {
        return Err(io::Error::new(
            io::ErrorKind::InvalidData,
            format!("frame of {n} bytes"),
        ));
    }
    buf.clear();
    buf.extend_from_slice(&len);
    buf.resize(4 + n as usize, 0);
    r.read_exact(&mut buf[4..])
}

fn pump_requests(
    client: TcpStream,
    mut broker: TcpStream,
    side: &Mutex<ClientSide>,
    max: usize,
) -> io::Result<()> {
    let mut r = BufReader::with_capacity(1 << 16, client);
    let mut frame = Vec::new();
    loop {
        read_frame(&mut r, &mut frame)?;
        match inspect(&frame[4..], max) {
            Verdict::Forward { answered } => {
                if answered {
                    lock(side).pending.push_back(Pending::Forwarded);
                }
                broker.write_all(&frame)?;
            }
            Verdict::Refuse(None) => {} // acks=0: nobody waits for an answer
            Verdict::Close(why) => {
                tracing::warn!(
                    reason = why,
                    "embedded broker: malformed produce request; connection closed"
                );
                return Err(io::Error::new(io::ErrorKind::InvalidData, why));
            }
            Verdict::Refuse(Some(response)) => {
                let mut s = lock(side);
                if s.pending.is_empty() {
                    s.stream.write_all(&response)?;
                } else {
                    s.pending.push_back(Pending::Made(response));
                }
            }
        }
    }
}

fn pump_responses(broker: TcpStream, side: &Mutex<ClientSide>) -> io::Result<()> {
    let mut r = BufReader::with_capacity(1 << 16, broker);
    let mut frame = Vec::new();
    loop {
        read_frame(&mut r, &mut frame)?;
        let mut s = lock(side);
        // the broker's answers come in order; a made one waits its turn
        s.pending.pop_front();
        s.stream.write_all(&frame)?;
        while let Some(Pending::Made(_)) = s.pending.front() {
            if let Some(Pending::Made(m)) = s.pending.pop_front() {
                s.stream.write_all(&m)?;
            }
        }
    }
}

fn lock(side: &Mutex<ClientSide>) -> std::sync::MutexGuard<'_, ClientSide> {
    side.lock().unwrap_or_else(|p| p.into_inner())
}

/// What to do with a request.
#[derive(Debug, PartialEq)]
enum Verdict {
    /// Pass it on (`answered`: the broker will respond).
    Forward { answered: bool },
    /// Answer it here (`None`: acks=0, no answer).
    Refuse(Option<Vec<u8>>),
    /// A Produce request this proxy cannot read: the connection is closed
    /// (failing closed: what cannot be checked is not passed on).
    Close(&'static str),
}

/// A cursor over a request body.
struct Cursor<'a> {
    b: &'a [u8],
    at: usize,
}

impl<'a> Cursor<'a> {
    fn take(&mut self, n: usize) -> Option<&'a [u8]> {
        let s = self.b.get(self.at..self.at.checked_add(n)?)?;
        self.at += n;
        Some(s)
    }
    fn i16(&mut self) -> Option<i16> {
        Some(i16::from_be_bytes(self.take(2)?.try_into().ok()?))
    }
    fn i32(&mut self) -> Option<i32> {
        Some(i32::from_be_bytes(self.take(4)?.try_into().ok()?))
    }
    /// A nullable string (int16 length); `None` when malformed.
    fn string(&mut self) -> Option<Option<&'a [u8]>> {
        match self.i16()? {
            -1 => Some(None),
            n if n >= 0 => Some(Some(self.take(n as usize)?)),
            _ => None,
        }
    }
}

/// Reads a request; refuses a Produce whose records are too large. Other
/// APIs pass; a Produce request of a version this proxy reads but whose
/// body it cannot read closes the connection.
fn inspect(req: &[u8], max: usize) -> Verdict {
    let forward = Verdict::Forward { answered: true };
    let mut c = Cursor { b: req, at: 0 };
    let (Some(key), Some(version), Some(correlation)) = (c.i16(), c.i16(), c.i32()) else {
        return forward;
    };
    if key != PRODUCE || !(PRODUCE_MIN_VERSION..=PRODUCE_MAX_VERSION).contains(&version) {
        return forward;
    }
    let Some(parsed) = produce(&mut c) else {
        return Verdict::Close("a produce request that does not parse");
    };
    if c.at != req.len() {
        return Verdict::Close("a produce request with trailing bytes");
    }
    if parsed.acks == 0 && parsed.topics.iter().all(|t| t.1.iter().all(|p| p.1 <= max)) {
        return Verdict::Forward { answered: false };
    }
    if parsed.topics.iter().all(|t| t.1.iter().all(|p| p.1 <= max)) {
        return forward;
    }
    if parsed.acks == 0 {
        return Verdict::Refuse(None);
    }
    Verdict::Refuse(Some(produce_response(correlation, version, &parsed, max)))
}

/// A topic of a Produce request: its name and `(partition, record bytes)`.
type ProduceTopic<'a> = (&'a [u8], Vec<(i32, usize)>);

/// A Produce request: acks, and per topic its partitions' record sizes.
struct Produce<'a> {
    acks: i16,
    topics: Vec<ProduceTopic<'a>>,
}

fn produce<'a>(c: &mut Cursor<'a>) -> Option<Produce<'a>> {
    c.string()?; // client id (request header v1)
    c.string()?; // transactional id
    let acks = c.i16()?;
    c.i32()?; // timeout
              // counts beyond these are not a producer's: the request is refused
    let n_topics = c.i32().filter(|n| (0..=10_000).contains(n))?;
    let mut topics = Vec::new();
    for _ in 0..n_topics {
        let name = c.string()??;
        let n_parts = c.i32().filter(|n| (0..=100_000).contains(n))?;
        let mut parts = Vec::new();
        for _ in 0..n_parts {
            let index = c.i32()?;
            let size = c.i32()?;
            let size = if size < 0 { 0 } else { size as usize };
            c.take(size)?;
            parts.push((index, size));
        }
        topics.push((name, parts));
    }
    Some(Produce { acks, topics })
}

/// The ProduceResponse (v3 to v8) refusing the request's partitions.
fn produce_response(correlation: i32, version: i16, p: &Produce<'_>, max: usize) -> Vec<u8> {
    let mut b = Vec::with_capacity(128);
    b.extend_from_slice(&[0; 4]); // length, below
    b.extend_from_slice(&correlation.to_be_bytes());
    b.extend_from_slice(&(p.topics.len() as i32).to_be_bytes());
    for (name, parts) in &p.topics {
        b.extend_from_slice(&(name.len() as i16).to_be_bytes());
        b.extend_from_slice(name);
        b.extend_from_slice(&(parts.len() as i32).to_be_bytes());
        for (index, size) in parts {
            let error = if *size > max {
                MESSAGE_TOO_LARGE
            } else {
                REQUEST_TIMED_OUT
            };
            b.extend_from_slice(&index.to_be_bytes());
            b.extend_from_slice(&error.to_be_bytes());
            b.extend_from_slice(&(-1i64).to_be_bytes()); // base offset
            b.extend_from_slice(&(-1i64).to_be_bytes()); // log append time (v2+)
            if version >= 5 {
                b.extend_from_slice(&(-1i64).to_be_bytes()); // log start offset
            }
            if version >= 8 {
                b.extend_from_slice(&0i32.to_be_bytes()); // record errors
                let why = format!(
                    "record batch of {size} bytes is larger than the embedded broker's limit of {max} bytes"
                );
                if error == MESSAGE_TOO_LARGE {
                    b.extend_from_slice(&(why.len() as i16).to_be_bytes());
                    b.extend_from_slice(why.as_bytes());
                } else {
                    b.extend_from_slice(&(-1i16).to_be_bytes());
                }
            }
        }
    }
    b.extend_from_slice(&0i32.to_be_bytes()); // throttle time (v1+)
    let len = (b.len() - 4) as i32;
    b[..4].copy_from_slice(&len.to_be_bytes());
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A Produce v8 request body with one topic and partitions of these sizes.
    fn request(acks: i16, sizes: &[usize]) -> Vec<u8> {
        let mut b = Vec::new();
        b.extend_from_slice(&PRODUCE.to_be_bytes());
        b.extend_from_slice(&8i16.to_be_bytes());
        b.extend_from_slice(&77i32.to_be_bytes());
        b.extend_from_slice(&3i16.to_be_bytes());
        b.extend_from_slice(b"cli");
        b.extend_from_slice(&(-1i16).to_be_bytes());
        b.extend_from_slice(&acks.to_be_bytes());
        b.extend_from_slice(&1000i32.to_be_bytes());
        b.extend_from_slice(&1i32.to_be_bytes());
        b.extend_from_slice(&1i16.to_be_bytes());
        b.extend_from_slice(b"t");
        b.extend_from_slice(&(sizes.len() as i32).to_be_bytes());
        for (i, s) in sizes.iter().enumerate() {
            b.extend_from_slice(&(i as i32).to_be_bytes());
            b.extend_from_slice(&(*s as i32).to_be_bytes());
            b.extend(std::iter::repeat_n(0u8, *s));
        }
        b
    }

    #[test]
    fn oversized_batches_are_answered_here_and_the_rest_passes() {
        assert_eq!(
            inspect(&request(-1, &[10, 20]), 100),
            Verdict::Forward { answered: true }
        );
        assert_eq!(
            inspect(&request(0, &[10]), 100),
            Verdict::Forward { answered: false }
        );
        assert_eq!(inspect(&request(0, &[200]), 100), Verdict::Refuse(None));
        let Verdict::Refuse(Some(r)) = inspect(&request(-1, &[200, 10]), 100) else {
            panic!("refused with an answer")
        };
        let len = i32::from_be_bytes(r[..4].try_into().unwrap()) as usize;
        assert_eq!(len, r.len() - 4);
        assert_eq!(i32::from_be_bytes(r[4..8].try_into().unwrap()), 77);
        // partition 0: MESSAGE_TOO_LARGE with a message; partition 1: retriable
        let p0 = 8 + 4 + 2 + 1 + 4;
        assert_eq!(
            i16::from_be_bytes(r[p0 + 4..p0 + 6].try_into().unwrap()),
            10
        );
        assert!(String::from_utf8_lossy(&r)
            .contains("larger than the embedded broker's limit of 100 bytes"));
        assert!(r.windows(2).any(|w| w == 7i16.to_be_bytes()));
        // other APIs and unreadable requests pass
        let mut fetch = request(-1, &[200]);
        fetch[1] = 1;
        assert_eq!(inspect(&fetch, 100), Verdict::Forward { answered: true });
        assert_eq!(
            inspect(&[0, 0, 0], 100),
            Verdict::Forward { answered: true }
        );
        // a Produce request that does not read: the connection is closed
        let truncated = request(-1, &[200]);
        assert!(matches!(inspect(&truncated[..40], 100), Verdict::Close(_)));
        let mut padded = request(-1, &[10]);
        padded.extend_from_slice(&[0; 8]);
        assert!(matches!(inspect(&padded, 100), Verdict::Close(_)));
        let mut many = request(-1, &[10]);
        many[21..25].copy_from_slice(&20_000i32.to_be_bytes()); // topic count
        assert!(matches!(inspect(&many, 100), Verdict::Close(_)));
    }
}
