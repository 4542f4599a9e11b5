//! HTTP load from a client namespace, counted per answering engine, and held keep-alive
//! connections.
//!
//! Plain blocking `std::net` on threads that entered the client namespace: bounded by the number of
//! connections and by connect/read timeouts, no runtime needed.

use std::collections::BTreeMap;
use std::io::{Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, SocketAddrV4, TcpStream};
use std::sync::Mutex;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::lab::Ns;
use crate::netns::{enter, in_ns};

/// Error messages kept per load run (the count covers all).
const MAX_ERROR_SAMPLES: usize = 10;

/// What a load run saw.
#[derive(Clone, Debug, Default)]
pub struct LoadResult {
    /// Successful responses per body (engine name).
    pub per_engine: BTreeMap<String, usize>,
    pub errors: usize,
    /// The first few error messages.
    pub error_samples: Vec<String>,
    pub elapsed: Duration,
}

impl LoadResult {
    pub fn ok(&self) -> usize {
        self.per_engine.values().sum()
    }

    /// Share of successful responses answered by `engine`, in percent.
    pub fn percent(&self, engine: &str) -> f64 {
        let ok = self.ok();
        if ok == 0 {
            return 0.0;
        }
        #[allow(clippy::cast_precision_loss)]
        let p = 100.0 * self.per_engine.get(engine).copied().unwrap_or(0) as f64 / ok as f64;
        p
    }

    /// Checks each engine's share against `expected` (percent, by name) within `tolerance`
    /// percentage points, and that no other engine answered. The error lists every deviation.
    pub fn check_spread(&self, expected: &BTreeMap<String, f64>, tolerance: f64) -> Result<()> {
        let mut bad = Vec::new();
        for (name, want) in expected {
            let got = self.percent(name);
            if (got - want).abs() > tolerance {
                bad.push(format!(
                    "{name}: {got:.1}% (expected {want:.1}% ± {tolerance})"
                ));
            }
        }
        for name in self.per_engine.keys() {
            if !expected.contains_key(name) {
                bad.push(format!("unexpected answer {name:?}"));
            }
        }
        ensure!(bad.is_empty(), "spread off: {} ({self})", bad.join("; "));
        Ok(())
    }
}

impl std::fmt::Display for LoadResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} ok, {} errors in {:.2?}:",
            self.ok(),
            self.errors,
            self.elapsed
        )?;
        for (name, n) in &self.per_engine {
            write!(f, " {name}={n} ({:.1}%)", self.percent(name))?;
        }
        if !self.error_samples.is_empty() {
            write!(f, "; first errors: {}", self.error_samples.join(" | "))?;
        }
        Ok(())
    }
}

/// Load parameters.
#[derive(Clone, Copy, Debug)]
pub struct Load {
    pub target: SocketAddr,
    /// Connections in all (one request each, `Connection: close`).
    pub connections: usize,
    /// Connections in flight at once (threads).
    pub parallel: usize,
    /// Connect timeout, and read/write timeout of each socket operation.
    pub timeout: Duration,
}

impl Load {
    pub fn new(target: SocketAddr, connections: usize) -> Self {
        Self {
            target,
            connections,
            parallel: 4,
            timeout: Duration::from_secs(3),
        }
    }
}

/// Runs `load` from namespace `ns`: every connection sends one `GET /` and counts the body.
pub fn http_load(ns: &Ns, load: &Load) -> Result<LoadResult> {
    ensure!(load.parallel > 0, "parallel must be > 0");
    let next = AtomicUsize::new(0);
    let total = Mutex::new(LoadResult::default());
    let start = Instant::now();
    std::thread::scope(|s| -> Result<()> {
        let mut workers = Vec::new();
        for _ in 0..load.parallel.min(load.connections.max(1)) {
            workers.push(s.spawn(|| -> Result<()> {
                enter(ns.name())?;
                let mut mine = LoadResult::default();
                while next.fetch_add(1, Ordering::Relaxed) < load.connections {
                    match one_request(load.target, load.timeout) {
                        Ok(name) => *mine.per_engine.entry(name).or_default() += 1,
                        Err(e) => {
                            mine.errors += 1;
                            if mine.error_samples.len() < MAX_ERROR_SAMPLES {
                                mine.error_samples.push(format!("{e:#}"));
                            }
                        }
                    }
                }
                let mut t = total
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                for (k, v) in mine.per_engine {
                    *t.per_engine.entry(k).or_default() += v;
                }
                t.errors += mine.errors;
                let room = MAX_ERROR_SAMPLES.saturating_sub(t.error_samples.len());
                t.error_samples
                    .extend(mine.error_samples.into_iter().take(room));
                Ok(())
            }));
        }
        for w in workers {
            w.join()
                .map_err(|_| anyhow::anyhow!("load worker panicked"))??;
        }
        Ok(())
    })?;
    let mut result = total
        .into_inner()
        .unwrap_or_else(std::sync::PoisonError::into_inner);
    result.elapsed = start.elapsed();
    Ok(result)
}

/// One connection, one `GET /` with `Connection: close`; returns the trimmed body of a 200.
/// Must run on a thread inside the client namespace.
pub fn one_request(target: SocketAddr, timeout: Duration) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&target, timeout).context("connect")?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    s.write_all(
        format!("GET / HTTP/1.1\r\nHost: {target}\r\nConnection: close\r\n\r\n").as_bytes(),
    )
    .context("send")?;
    let mut buf = Vec::with_capacity(512);
    s.read_to_end(&mut buf).context("read")?;
    let (status, body) = split_response(&buf)?;
    ensure!(status == 200, "HTTP status {status}");
    Ok(String::from_utf8_lossy(body).trim().to_owned())
}

/// Sends `count` TCP segments without SYN (ACK only) from `ns` to `target` through a raw socket,
/// each of a flow nobody has: the sources are `first_source` and the addresses after it (40 000
/// ports each, from 20 000), which must be unused addresses of `ns`'s subnet, so that the resets
/// sent back go nowhere. How many the kernel took.
pub fn unknown_segments(
    ns: &Ns,
    target: SocketAddrV4,
    count: u32,
    first_source: Ipv4Addr,
) -> Result<u32> {
    use etherparse::PacketBuilder;
    in_ns(ns.name(), || {
        let sock = socket2::Socket::new(
            socket2::Domain::IPV4,
            socket2::Type::RAW,
            Some(socket2::Protocol::from(nix::libc::IPPROTO_RAW)),
        )?;
        let to: socket2::SockAddr = SocketAddr::V4(target).into();
        let mut frame = Vec::with_capacity(40);
        let mut sent = 0u32;
        for i in 0..count {
            let port = 20_000 + u16::try_from(i % 40_000)?;
            let src = Ipv4Addr::from(u32::from(first_source) + i / 40_000);
            let b = PacketBuilder::ipv4(src.octets(), target.ip().octets(), 64)
                .tcp(port, target.port(), i, 64_000)
                .ack(7);
            frame.clear();
            b.write(&mut frame, &[])?;
            if sock.send_to(&frame, &to).is_ok() {
                sent += 1;
            }
        }
        Ok(sent)
    })
}

/// Polls `GET /` from a thread in `ns`, each attempt given `attempt` (which bounds how finely the
/// answer is timed), until it is answered: the time since `since`, or `None` once `limit` has
/// passed since then.
pub fn served_again(
    ns: &Ns,
    target: SocketAddr,
    since: Instant,
    attempt: Duration,
    limit: Duration,
) -> Option<Duration> {
    let ns = ns.clone();
    std::thread::spawn(move || {
        enter(ns.name()).ok()?;
        loop {
            if one_request(target, attempt).is_ok() {
                return Some(since.elapsed());
            }
            if since.elapsed() > limit {
                return None;
            }
        }
    })
    .join()
    .ok()
    .flatten()
}

/// One connection, one `POST /` with a body of `size` bytes (`Connection: close`); returns the
/// trimmed body of a 200. Must run on a thread inside the client namespace.
pub fn post(target: SocketAddr, size: usize, timeout: Duration) -> Result<String> {
    let mut s = TcpStream::connect_timeout(&target, timeout).context("connect")?;
    s.set_read_timeout(Some(timeout))?;
    s.set_write_timeout(Some(timeout))?;
    let mut req = format!(
        "POST / HTTP/1.1\r\nHost: {target}\r\nContent-Length: {size}\r\nConnection: close\r\n\r\n"
    )
    .into_bytes();
    req.resize(req.len() + size, b'x');
    s.write_all(&req).context("send")?;
    let mut buf = Vec::with_capacity(512);
    s.read_to_end(&mut buf).context("read")?;
    let (status, body) = split_response(&buf)?;
    ensure!(status == 200, "HTTP status {status}");
    Ok(String::from_utf8_lossy(body).trim().to_owned())
}

/// Parses `HTTP/1.x NNN ...\r\n...\r\n\r\nbody` into (status, body).
fn split_response(buf: &[u8]) -> Result<(u16, &[u8])> {
    let end = find(buf, b"\r\n\r\n").context("no complete HTTP header")?;
    let head = std::str::from_utf8(&buf[..end]).context("header not UTF-8")?;
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .with_context(|| format!("bad status line in {head:?}"))?;
    Ok((status, &buf[end + 4..]))
}

fn find(hay: &[u8], needle: &[u8]) -> Option<usize> {
    hay.windows(needle.len()).position(|w| w == needle)
}

fn content_length(head: &str) -> Option<usize> {
    head.lines().find_map(|l| {
        let (k, v) = l.split_once(':')?;
        k.trim()
            .eq_ignore_ascii_case("content-length")
            .then(|| v.trim().parse().ok())?
    })
}

/// A keep-alive connection opened from a client namespace; each [`HeldConnection::get`] sends
/// another request on the same TCP connection (same flow) and returns the answering engine.
#[derive(Debug)]
pub struct HeldConnection {
    stream: TcpStream,
    target: SocketAddr,
    buf: Vec<u8>,
}

impl HeldConnection {
    /// Connects from `ns` (the socket stays in `ns`; it can be used from any thread).
    pub fn open(ns: &Ns, target: SocketAddr, timeout: Duration) -> Result<Self> {
        Self::open_from(ns, None, target, timeout)
    }

    /// [`HeldConnection::open`] from the client address `source` (one of `ns`'s addresses).
    pub fn open_from(
        ns: &Ns,
        source: Option<IpAddr>,
        target: SocketAddr,
        timeout: Duration,
    ) -> Result<Self> {
        let stream = in_ns(ns.name(), || -> Result<TcpStream> {
            let sock = socket2::Socket::new(
                socket2::Domain::for_address(target),
                socket2::Type::STREAM,
                Some(socket2::Protocol::TCP),
            )?;
            if let Some(source) = source {
                sock.bind(&SocketAddr::new(source, 0).into())
                    .with_context(|| format!("bind {source}"))?;
            }
            sock.connect_timeout(&target.into(), timeout)
                .context("connect")?;
            Ok(sock.into())
        })?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        Ok(Self {
            stream,
            target,
            buf: Vec::new(),
        })
    }

    /// Client side address (the flow's source).
    pub fn local_addr(&self) -> Result<SocketAddr> {
        Ok(self.stream.local_addr()?)
    }

    /// `GET /` (keep-alive) on this connection; returns the trimmed body of a 200.
    pub fn get(&mut self) -> Result<String> {
        self.stream
            .write_all(format!("GET / HTTP/1.1\r\nHost: {}\r\n\r\n", self.target).as_bytes())
            .context("send")?;
        let mut chunk = [0u8; 4096];
        loop {
            if let Some(end) = find(&self.buf, b"\r\n\r\n") {
                let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
                let len = content_length(&head)
                    .with_context(|| format!("no Content-Length in {head:?}"))?;
                if self.buf.len() >= end + 4 + len {
                    let (status, _) = split_response(&self.buf[..end + 4])?;
                    let body = String::from_utf8_lossy(&self.buf[end + 4..end + 4 + len])
                        .trim()
                        .to_owned();
                    self.buf.drain(..end + 4 + len);
                    ensure!(status == 200, "HTTP status {status}");
                    return Ok(body);
                }
            }
            let n = self.stream.read(&mut chunk).context("read")?;
            if n == 0 {
                bail!("connection closed by peer");
            }
            self.buf.extend_from_slice(&chunk[..n]);
        }
    }
}

/// Held connections that each send a request every `period` on a thread of their own until
/// [`Keeper::finish`], recording every failure and every answer from another engine than the first.
pub struct Keeper {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<KeeperReport>,
}

/// What the held connections saw.
#[derive(Debug, Default)]
pub struct KeeperReport {
    pub connections: usize,
    /// Rounds completed (every connection sent one request per round).
    pub rounds: usize,
    pub requests: usize,
    /// (connection index, error) of each connection that failed (it is not used again).
    pub failed: Vec<(usize, String)>,
    /// (connection index, first engine, later engine).
    pub moved: Vec<(usize, String, String)>,
    /// Each connection's client address (its flow's source), by index.
    pub clients: Vec<SocketAddr>,
    /// The engine that answered each connection's first request, by index.
    pub engines: Vec<String>,
}

impl KeeperReport {
    /// Connections per engine, from the first answers.
    pub fn per_engine(&self) -> BTreeMap<String, usize> {
        let mut n = BTreeMap::new();
        for e in &self.engines {
            *n.entry(e.clone()).or_default() += 1;
        }
        n
    }
}

impl Keeper {
    /// Opens `n` keep-alive connections from `ns` to `target`, one request each, then keeps them
    /// busy: a request on each every `period`.
    pub fn start(ns: &Ns, target: SocketAddr, n: usize, period: Duration) -> Result<Keeper> {
        let mut conns = Vec::with_capacity(n);
        let mut report = KeeperReport {
            connections: n,
            ..KeeperReport::default()
        };
        for i in 0..n {
            let mut c = HeldConnection::open(ns, target, Duration::from_secs(3))
                .with_context(|| format!("open held connection {i}"))?;
            let name = c.get().with_context(|| format!("held connection {i}"))?;
            report.clients.push(c.local_addr()?);
            report.engines.push(name.clone());
            conns.push(Some((c, name)));
        }
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            while !flag.load(Ordering::Relaxed) {
                let round = Instant::now();
                for (i, slot) in conns.iter_mut().enumerate() {
                    let Some((c, first)) = slot else { continue };
                    report.requests += 1;
                    match c.get() {
                        Ok(name) if name == *first => {}
                        Ok(name) => {
                            report.moved.push((i, first.clone(), name));
                            *slot = None;
                        }
                        Err(e) => {
                            report.failed.push((i, format!("{e:#}")));
                            *slot = None;
                        }
                    }
                }
                report.rounds += 1;
                if let Some(rest) = period.checked_sub(round.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            report
        });
        Ok(Keeper { stop, thread })
    }

    /// Stops after the round in progress and returns the report.
    pub fn finish(self) -> Result<KeeperReport> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("keeper thread panicked"))
    }
}

/// UDP sessions held from `ns`: each its own socket (source port), a datagram on each every
/// period, answered with the name of the backend that got it (a [`crate::bgp_lab::UdpResponder`]).
pub struct UdpSessions {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<UdpReport>,
}

/// What the UDP sessions saw.
#[derive(Debug, Default)]
pub struct UdpReport {
    pub sessions: usize,
    pub rounds: usize,
    pub sent: usize,
    /// Datagrams not answered within the round.
    pub unanswered: usize,
    /// (session index, first backend, later backend): answered by another backend (a new
    /// session on another engine).
    pub moved: Vec<(usize, String, String)>,
    /// The backend that answered each session's first datagram.
    pub backends: Vec<String>,
}

impl UdpReport {
    /// Sessions per backend, from the first answers.
    pub fn per_backend(&self) -> BTreeMap<String, usize> {
        let mut n = BTreeMap::new();
        for b in &self.backends {
            *n.entry(b.clone()).or_default() += 1;
        }
        n
    }
}

/// How long a round waits for its answers.
const UDP_ROUND_WAIT: Duration = Duration::from_millis(400);

/// One datagram on each of `sockets`; the answers that came within [`UDP_ROUND_WAIT`].
fn udp_round(sockets: &[std::net::UdpSocket], target: SocketAddr) -> Vec<Option<String>> {
    for s in sockets {
        let _ = s.send_to(b"ping", target);
    }
    let mut answers = vec![None; sockets.len()];
    let deadline = Instant::now() + UDP_ROUND_WAIT;
    let mut buf = [0u8; 256];
    while Instant::now() < deadline && answers.iter().any(Option::is_none) {
        for (i, s) in sockets.iter().enumerate() {
            if answers[i].is_none()
                && let Ok(n) = s.recv(&mut buf)
            {
                answers[i] = Some(String::from_utf8_lossy(&buf[..n]).into_owned());
            }
        }
        std::thread::sleep(Duration::from_millis(5));
    }
    answers
}

impl UdpSessions {
    /// `n` sessions from `ns` to `target`, each answered once, then a datagram on each every
    /// `period`.
    pub fn start(ns: &Ns, target: SocketAddr, n: usize, period: Duration) -> Result<UdpSessions> {
        let sockets = in_ns(ns.name(), || {
            (0..n)
                .map(|_| {
                    let s = std::net::UdpSocket::bind("0.0.0.0:0")?;
                    s.set_nonblocking(true)?;
                    Ok(s)
                })
                .collect::<Result<Vec<_>>>()
        })?;
        let mut report = UdpReport {
            sessions: n,
            ..UdpReport::default()
        };
        // Every session answered before the test goes on (a few tries: the first datagrams of a
        // new session may wait for the engine's proxy).
        let mut first: Vec<Option<String>> = vec![None; n];
        for _ in 0..5 {
            for (i, a) in udp_round(&sockets, target).into_iter().enumerate() {
                if first[i].is_none() {
                    first[i] = a;
                }
            }
            if first.iter().all(Option::is_some) {
                break;
            }
        }
        let unanswered = first.iter().filter(|a| a.is_none()).count();
        ensure!(
            unanswered == 0,
            "{unanswered} of {n} UDP sessions got no answer"
        );
        report.backends = first.into_iter().flatten().collect();
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let thread = std::thread::spawn(move || {
            let start = Instant::now();
            let mut live = vec![true; n];
            // Bounded: a test that forgets to finish stops after ten minutes.
            while !flag.load(Ordering::Relaxed) && start.elapsed() < Duration::from_mins(10) {
                let round = Instant::now();
                for (i, a) in udp_round(&sockets, target).into_iter().enumerate() {
                    if !live[i] {
                        continue;
                    }
                    report.sent += 1;
                    match a {
                        None => report.unanswered += 1,
                        Some(b) if b == report.backends[i] => {}
                        Some(b) => {
                            report.moved.push((i, report.backends[i].clone(), b));
                            live[i] = false;
                        }
                    }
                }
                report.rounds += 1;
                if let Some(rest) = period.checked_sub(round.elapsed()) {
                    std::thread::sleep(rest);
                }
            }
            report
        });
        Ok(UdpSessions { stop, thread })
    }

    /// Stops after the round in progress and returns the report.
    pub fn finish(self) -> Result<UdpReport> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("UDP sessions thread panicked"))
    }
}

/// New connections in a loop from a thread in `ns` (one request each, a pause between them) until
/// [`NewConnections::finish`]: every failure counts.
pub struct NewConnections {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<LoadResult>>,
}

impl NewConnections {
    pub fn start(ns: &Ns, target: SocketAddr, pause: Duration) -> NewConnections {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let ns = ns.clone();
        let thread = std::thread::spawn(move || -> Result<LoadResult> {
            enter(ns.name())?;
            let mut r = LoadResult::default();
            let start = Instant::now();
            // Bounded: a test that forgets to finish stops after ten minutes.
            while !flag.load(Ordering::Relaxed) && start.elapsed() < Duration::from_mins(10) {
                let began = Instant::now();
                match one_request(target, Duration::from_secs(5)) {
                    Ok(name) => *r.per_engine.entry(name).or_default() += 1,
                    Err(e) => {
                        r.errors += 1;
                        if r.error_samples.len() < MAX_ERROR_SAMPLES {
                            // When it began, after the start: to line up with what moved.
                            let at = began.duration_since(start).as_secs_f64();
                            r.error_samples.push(format!("at {at:.2} s: {e:#}"));
                        }
                    }
                }
                std::thread::sleep(pause);
            }
            r.elapsed = start.elapsed();
            Ok(r)
        });
        NewConnections { stop, thread }
    }

    pub fn finish(self) -> Result<LoadResult> {
        self.stop.store(true, Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("new-connections thread panicked"))?
    }
}

/// `GET path` with HTTP/1.0 from inside `ns` (for the daemon's metrics endpoint);
/// returns (status, body).
pub fn http_get(
    ns: &Ns,
    target: SocketAddr,
    path: &str,
    timeout: Duration,
) -> Result<(u16, String)> {
    in_ns(ns.name(), || {
        let mut s = TcpStream::connect_timeout(&target, timeout)
            .with_context(|| format!("connect {target}"))?;
        s.set_read_timeout(Some(timeout))?;
        s.set_write_timeout(Some(timeout))?;
        s.write_all(format!("GET {path} HTTP/1.0\r\nHost: {target}\r\n\r\n").as_bytes())?;
        let mut buf = Vec::new();
        s.read_to_end(&mut buf)?;
        let (status, body) = split_response(&buf)?;
        Ok((status, String::from_utf8_lossy(body).into_owned()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_responses() {
        let r = b"HTTP/1.1 200 OK\r\nServer: nginx\r\nContent-Length: 4\r\n\r\nse1\n";
        let (status, body) = split_response(r).unwrap();
        assert_eq!(status, 200);
        assert_eq!(body, b"se1\n");
        assert_eq!(
            content_length("HTTP/1.1 200 OK\r\ncontent-length: 12"),
            Some(12)
        );
        assert!(split_response(b"HTTP/1.1 200 OK\r\n").is_err());
    }

    #[test]
    fn spread_check() {
        let mut r = LoadResult::default();
        r.per_engine.insert("a".into(), 250);
        r.per_engine.insert("b".into(), 750);
        let mut want = BTreeMap::new();
        want.insert("a".to_owned(), 25.0);
        want.insert("b".to_owned(), 75.0);
        r.check_spread(&want, 3.0).unwrap();
        want.insert("a".to_owned(), 30.0);
        assert!(r.check_spread(&want, 3.0).is_err());
    }
}
