//! Active health checks of a pool's backends.
//!
//! Each enabled backend of a pool gets its own task that checks it right away and then every
//! `interval_ms` (± 5 % random jitter, so the checks of many backends do not stay aligned), each
//! check bounded by `timeout_ms`:
//! - `tcp`: a connection is accepted;
//! - `http`: `GET http_path` answers `expected_status` on its status line.
//!
//! The port checked is `health_check.port` or the backend's own. Connections leave from the
//! engine's source address for the backend's family ([`SourceAddrs`], `proxy.source_v4/v6`), like
//! the proxy's, so a check sees the backend the way proxied traffic does.
//!
//! `fall` consecutive failures take an up backend down: [`Backend::set_healthy`]`(false)`, so it
//! gets no new connections (connections already open are left alone). `rise` consecutive
//! successes bring a down backend back. Every change is logged (a warning naming the failure when
//! going down, info when coming back) and counted (`Backend::health_changes`).
//!
//! Backends start **up**: a new backend takes traffic at once and `fall` failed checks (the first
//! one runs immediately) take it down. Starting down would keep a new pool empty for
//! `rise × interval` even when every backend is fine; starting up costs at most `fall × interval`
//! of connections to a backend that was dead from the start, which the proxy's connect failures
//! already cover. The checker starts from the backend's current state ([`Backend::is_healthy`]),
//! so a checker restarted on reload for the same backend carries on from where the old one was.
//!
//! Disabled backends (`enabled = false`) are not checked: they take no connections anyway.

use std::{
    collections::hash_map::RandomState,
    fmt,
    hash::BuildHasher,
    io,
    net::{IpAddr, SocketAddr},
    sync::Arc,
    time::Duration,
};

use thiserror::Error;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    task::JoinHandle,
    time::{Instant, sleep_until, timeout_at},
};
use tracing::{debug, info, warn};

pub use crate::backend::SourceAddrs;
use crate::{
    backend::Backend,
    config::{HealthCheckConfig, HealthCheckKind},
};

/// Most bytes of an HTTP answer read looking for its status line.
pub const MAX_RESPONSE_HEAD: usize = 8 * 1024;

/// What a check was doing when it ran out of time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Phase {
    Connect,
    Send,
    Receive,
}

impl fmt::Display for Phase {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            Phase::Connect => "connecting",
            Phase::Send => "sending the request",
            Phase::Receive => "waiting for the status line",
        })
    }
}

/// Why a check failed; its `Display` is what the logs show.
#[derive(Debug, Error)]
pub enum CheckFailure {
    #[error("timeout after {timeout_ms} ms {phase}")]
    Timeout { timeout_ms: u32, phase: Phase },
    #[error("connection refused")]
    Refused,
    #[error("creating the socket: {0}")]
    Socket(#[source] io::Error),
    #[error("binding to source address {0}: {1}")]
    Bind(IpAddr, #[source] io::Error),
    #[error("connect: {0}")]
    Connect(#[source] io::Error),
    #[error("sending the request: {0}")]
    Send(#[source] io::Error),
    #[error("reading the answer: {0}")]
    Receive(#[source] io::Error),
    #[error("connection closed before the status line")]
    Closed,
    #[error("malformed answer: {0}")]
    Malformed(String),
    #[error("status {got}, expected {expected}")]
    Status { got: u16, expected: u16 },
}

/// Runs single checks of one pool's configuration; [`spawn`] runs them periodically.
#[derive(Debug, Clone)]
pub struct HealthChecker {
    cfg: HealthCheckConfig,
    source: SourceAddrs,
}

impl HealthChecker {
    pub fn new(cfg: HealthCheckConfig, source: SourceAddrs) -> Self {
        HealthChecker { cfg, source }
    }

    pub fn config(&self) -> &HealthCheckConfig {
        &self.cfg
    }

    /// The address checked for a backend at `backend`: the check's port when set.
    pub fn target(&self, backend: SocketAddr) -> SocketAddr {
        SocketAddr::new(backend.ip(), self.cfg.port.unwrap_or(backend.port()))
    }

    /// The HTTP request sent to `ip`. `Host` is `http_host`, else the backend's address.
    pub fn request(&self, ip: IpAddr) -> String {
        let host = match (&self.cfg.http_host, ip) {
            (Some(h), _) => h.clone(),
            (None, IpAddr::V4(a)) => a.to_string(),
            (None, IpAddr::V6(a)) => format!("[{a}]"),
        };
        format!(
            "GET {} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nUser-Agent: lb-health\r\n\r\n",
            self.cfg.http_path
        )
    }

    /// One check of the backend at `backend`, within `timeout_ms` from start to verdict.
    pub async fn check(&self, backend: SocketAddr) -> Result<(), CheckFailure> {
        let addr = self.target(backend);
        let timeout_ms = self.cfg.timeout_ms;
        let deadline = Instant::now() + Duration::from_millis(u64::from(timeout_ms));
        let late = |phase| move |_| CheckFailure::Timeout { timeout_ms, phase };
        let mut stream = timeout_at(deadline, self.connect(addr))
            .await
            .map_err(late(Phase::Connect))??;
        match self.cfg.kind {
            HealthCheckKind::Tcp => Ok(()),
            HealthCheckKind::Http => {
                let request = self.request(addr.ip());
                timeout_at(deadline, stream.write_all(request.as_bytes()))
                    .await
                    .map_err(late(Phase::Send))?
                    .map_err(CheckFailure::Send)?;
                let got = timeout_at(deadline, read_status(&mut stream))
                    .await
                    .map_err(late(Phase::Receive))??;
                let expected = self.cfg.expected_status;
                if got == expected {
                    Ok(())
                } else {
                    Err(CheckFailure::Status { got, expected })
                }
            }
        }
    }

    async fn connect(&self, addr: SocketAddr) -> Result<TcpStream, CheckFailure> {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()
        } else {
            TcpSocket::new_v6()
        }
        .map_err(CheckFailure::Socket)?;
        if let Some(src) = self.source.for_peer(addr.ip()) {
            socket
                .bind(SocketAddr::new(src, 0))
                .map_err(|e| CheckFailure::Bind(src, e))?;
        }
        socket.connect(addr).await.map_err(|e| {
            if e.kind() == io::ErrorKind::ConnectionRefused {
                CheckFailure::Refused
            } else {
                CheckFailure::Connect(e)
            }
        })
    }
}

/// Reads until the answer's status line is complete (at most [`MAX_RESPONSE_HEAD`] bytes) and
/// returns its status code. Headers are not waited for: the status line decides.
async fn read_status(stream: &mut TcpStream) -> Result<u16, CheckFailure> {
    let mut buf = vec![0u8; MAX_RESPONSE_HEAD];
    let mut len = 0;
    loop {
        let n = stream
            .read(&mut buf[len..])
            .await
            .map_err(CheckFailure::Receive)?;
        len += n;
        if let Some(status) = parse_status(&buf[..len])? {
            return Ok(status);
        }
        if n == 0 {
            return Err(CheckFailure::Closed);
        }
        if len == buf.len() {
            return Err(CheckFailure::Malformed(format!(
                "no status line in the first {MAX_RESPONSE_HEAD} bytes"
            )));
        }
    }
}

/// The status code once `head` holds a complete status line, `None` while it may still come.
fn parse_status(head: &[u8]) -> Result<Option<u16>, CheckFailure> {
    let mut headers = [httparse::EMPTY_HEADER; 16];
    let mut response = httparse::Response::new(&mut headers);
    let parsed = response.parse(head);
    // httparse sets `reason` once the status line is complete, before it looks at the headers.
    if response.reason.is_some() {
        return Ok(response.code);
    }
    match parsed {
        Ok(httparse::Status::Complete(_)) => Ok(response.code),
        Ok(httparse::Status::Partial) => Ok(None),
        Err(e) => Err(CheckFailure::Malformed(e.to_string())),
    }
}

/// Consecutive check results of one backend and whether it is up.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct HealthState {
    pub up: bool,
    /// Consecutive successes while down.
    pub successes: u32,
    /// Consecutive failures while up.
    pub failures: u32,
}

impl HealthState {
    pub fn new(up: bool) -> Self {
        HealthState {
            up,
            successes: 0,
            failures: 0,
        }
    }

    /// Records a check result; returns the new state when it changes: `fall` consecutive
    /// failures while up → down, `rise` consecutive successes while down → up (0 counts as 1).
    pub fn record(&mut self, ok: bool, rise: u32, fall: u32) -> Option<bool> {
        match (self.up, ok) {
            (true, true) => self.failures = 0,
            (false, false) => self.successes = 0,
            (true, false) => {
                self.failures = self.failures.saturating_add(1);
                if self.failures >= fall.max(1) {
                    *self = HealthState::new(false);
                    return Some(false);
                }
            }
            (false, true) => {
                self.successes = self.successes.saturating_add(1);
                if self.successes >= rise.max(1) {
                    *self = HealthState::new(true);
                    return Some(true);
                }
            }
        }
        None
    }
}

/// The running checks of a pool; dropping it stops them (the backends keep their last state).
#[must_use = "dropping the handle stops the health checks"]
#[derive(Debug)]
pub struct HealthHandle {
    pool: String,
    tasks: Vec<JoinHandle<()>>,
}

impl HealthHandle {
    pub fn pool(&self) -> &str {
        &self.pool
    }

    /// Backends being checked.
    pub fn len(&self) -> usize {
        self.tasks.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tasks.is_empty()
    }
}

impl Drop for HealthHandle {
    fn drop(&mut self) {
        for t in &self.tasks {
            t.abort();
        }
    }
}

/// Starts checking the enabled backends of `pool`, one task each, on the current tokio runtime
/// (panics outside one).
pub fn spawn(
    pool: String,
    backends: Vec<Arc<Backend>>,
    cfg: HealthCheckConfig,
    source: SourceAddrs,
) -> HealthHandle {
    let checker = Arc::new(HealthChecker::new(cfg, source));
    let pool_name: Arc<str> = Arc::from(pool.as_str());
    let tasks = backends
        .into_iter()
        .filter(|b| b.enabled())
        .map(|b| tokio::spawn(run(pool_name.clone(), b, checker.clone())))
        .collect();
    HealthHandle { pool, tasks }
}

/// Checks one backend until aborted.
async fn run(pool: Arc<str>, backend: Arc<Backend>, checker: Arc<HealthChecker>) {
    let cfg = checker.config();
    let (rise, fall) = (cfg.rise, cfg.fall);
    let interval = u64::from(cfg.interval_ms.max(1));
    let mut jitter = Jitter::new(&backend.addr);
    let mut state = HealthState::new(backend.is_healthy());
    let addr = backend.addr;
    let target = checker.target(addr);
    debug!(%pool, backend = %addr, %target, up = state.up, "health checks start");
    loop {
        let started = Instant::now();
        let result = checker.check(addr).await;
        let ok = result.is_ok();
        if let Err(reason) = &result {
            debug!(%pool, backend = %addr, %reason, "health check failed");
        }
        match state.record(ok, rise, fall) {
            Some(false) => {
                backend.set_healthy(false);
                // Only a failure takes a backend down: `result` is the last one.
                let reason = result.err().map_or_else(String::new, |e| e.to_string());
                warn!(
                    %pool, backend = %addr, %reason,
                    "backend down after {} failed health check(s)", fall.max(1)
                );
            }
            Some(true) => {
                backend.set_healthy(true);
                info!(
                    %pool, backend = %addr,
                    "backend up after {} passed health check(s)", rise.max(1)
                );
            }
            None => {}
        }
        // interval ± 5 %, measured from the start of this check.
        let spread = interval / 10;
        let next = interval - spread / 2 + jitter.below(spread + 1);
        sleep_until(started + Duration::from_millis(next)).await;
    }
}

/// A small xorshift generator, seeded per task from the process's random hash keys.
struct Jitter(u64);

impl Jitter {
    fn new(addr: &SocketAddr) -> Self {
        Jitter(RandomState::new().hash_one(addr) | 1)
    }

    /// A value in `0..n` (`n > 0`).
    fn below(&mut self, n: u64) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x % n
    }
}

#[cfg(test)]
mod tests {
    use std::net::Ipv4Addr;
    use std::sync::{
        Mutex,
        atomic::{AtomicUsize, Ordering},
    };

    use tokio::{net::TcpListener, sync::mpsc, time::sleep};

    use super::*;

    fn cfg(kind: HealthCheckKind) -> HealthCheckConfig {
        HealthCheckConfig {
            kind,
            interval_ms: 100,
            timeout_ms: 100,
            rise: 2,
            fall: 2,
            port: None,
            http_path: "/".into(),
            http_host: None,
            expected_status: 200,
        }
    }

    fn backend(addr: SocketAddr) -> Arc<Backend> {
        Arc::new(Backend::new(0, addr, 1, true))
    }

    /// A local port nothing listens on (bound, then released).
    async fn closed_port() -> SocketAddr {
        TcpListener::bind("127.0.0.1:0")
            .await
            .unwrap()
            .local_addr()
            .unwrap()
    }

    /// Polls `f` every 10 ms until it holds; fails after `within`.
    async fn wait_for(what: &str, within: Duration, f: impl Fn() -> bool) {
        let deadline = Instant::now() + within;
        while !f() {
            assert!(Instant::now() < deadline, "timed out waiting for {what}");
            sleep(Duration::from_millis(10)).await;
        }
    }

    #[derive(Clone, Copy)]
    enum Answer {
        Status(u16),
        Garbage,
        Silence,
        /// A status line with no headers end, then silence.
        StatusLineOnly(u16),
    }

    /// What the test HTTP server saw: the request heads, and each connection's peer.
    struct Seen {
        requests: mpsc::UnboundedReceiver<String>,
        peers: Arc<Mutex<Vec<SocketAddr>>>,
        connections: Arc<AtomicUsize>,
    }

    /// A tiny HTTP server on 127.0.0.1 answering every request with `answer`.
    async fn http_server(answer: Answer) -> (SocketAddr, Seen) {
        let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let (tx, requests) = mpsc::unbounded_channel();
        let peers = Arc::new(Mutex::new(Vec::new()));
        let connections = Arc::new(AtomicUsize::new(0));
        let (p, c) = (peers.clone(), connections.clone());
        tokio::spawn(async move {
            loop {
                let (mut s, peer) = listener.accept().await.unwrap();
                c.fetch_add(1, Ordering::SeqCst);
                p.lock().unwrap().push(peer);
                let tx = tx.clone();
                tokio::spawn(async move {
                    let mut buf = Vec::new();
                    let mut chunk = [0u8; 1024];
                    while !buf.windows(4).any(|w| w == b"\r\n\r\n") {
                        match s.read(&mut chunk).await {
                            Ok(0) | Err(_) => return,
                            Ok(n) => buf.extend_from_slice(&chunk[..n]),
                        }
                    }
                    let _ = tx.send(String::from_utf8_lossy(&buf).into_owned());
                    let reply = match answer {
                        Answer::Status(code) => format!(
                            "HTTP/1.1 {code} Whatever\r\nContent-Length: 0\r\nConnection: close\r\n\r\n"
                        ),
                        Answer::Garbage => "SSH-2.0-OpenSSH_9.2\r\n".into(),
                        Answer::Silence => String::new(),
                        Answer::StatusLineOnly(code) => format!("HTTP/1.0 {code} OK\r\n"),
                    };
                    let _ = s.write_all(reply.as_bytes()).await;
                    if matches!(answer, Answer::Silence | Answer::StatusLineOnly(_)) {
                        sleep(Duration::from_secs(30)).await;
                    }
                });
            }
        });
        (
            addr,
            Seen {
                requests,
                peers,
                connections,
            },
        )
    }

    #[test]
    fn state_goes_down_after_fall_consecutive_failures() {
        let mut s = HealthState::new(true);
        assert_eq!(s.record(false, 2, 3), None);
        assert_eq!(s.record(false, 2, 3), None);
        assert_eq!(s.record(true, 2, 3), None, "a success resets the failures");
        assert_eq!(s.failures, 0);
        assert_eq!(s.record(false, 2, 3), None);
        assert_eq!(s.record(false, 2, 3), None);
        assert_eq!(s.record(false, 2, 3), Some(false));
        assert_eq!(s, HealthState::new(false));
        assert_eq!(s.record(false, 2, 3), None, "already down");
    }

    #[test]
    fn state_comes_up_after_rise_consecutive_successes() {
        let mut s = HealthState::new(false);
        assert_eq!(s.record(true, 3, 2), None);
        assert_eq!(s.record(true, 3, 2), None);
        assert_eq!(
            s.record(false, 3, 2),
            None,
            "a failure resets the successes"
        );
        assert_eq!(s.successes, 0);
        assert_eq!(s.record(true, 3, 2), None);
        assert_eq!(s.record(true, 3, 2), None);
        assert_eq!(s.record(true, 3, 2), Some(true));
        assert_eq!(s, HealthState::new(true));
        assert_eq!(s.record(true, 3, 2), None, "already up");
    }

    #[test]
    fn rise_and_fall_of_one_and_zero_flip_at_once() {
        for n in [0, 1] {
            let mut s = HealthState::new(true);
            assert_eq!(s.record(false, n, n), Some(false));
            assert_eq!(s.record(true, n, n), Some(true));
        }
    }

    #[test]
    fn status_line_parsing() {
        assert_eq!(parse_status(b"").unwrap(), None);
        assert_eq!(parse_status(b"HTTP/1.1 200").unwrap(), None);
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r").unwrap(), None);
        assert_eq!(parse_status(b"HTTP/1.1 200 OK\r\n").unwrap(), Some(200));
        assert_eq!(
            parse_status(b"HTTP/1.1 503\r\nServer: x").unwrap(),
            Some(503)
        );
        assert_eq!(
            parse_status(b"HTTP/1.1 204 No Content\r\nA: b\r\n\r\n").unwrap(),
            Some(204)
        );
        assert!(matches!(
            parse_status(b"SSH-2.0-OpenSSH\r\n"),
            Err(CheckFailure::Malformed(_))
        ));
        assert!(matches!(
            parse_status(b"HTTP/1.1 2000 OK\r\n"),
            Err(CheckFailure::Malformed(_))
        ));
    }

    #[test]
    fn request_names_path_and_host() {
        let mut c = cfg(HealthCheckKind::Http);
        c.http_path = "/healthz?full=1".into();
        let checker = HealthChecker::new(c.clone(), SourceAddrs::default());
        assert_eq!(
            checker.request("10.0.0.1".parse().unwrap()),
            "GET /healthz?full=1 HTTP/1.1\r\nHost: 10.0.0.1\r\nConnection: close\r\nUser-Agent: lb-health\r\n\r\n"
        );
        assert!(
            checker
                .request("2001:db8::1".parse().unwrap())
                .contains("\r\nHost: [2001:db8::1]\r\n")
        );
        c.http_host = Some("app.example".into());
        let checker = HealthChecker::new(c, SourceAddrs::default());
        assert!(
            checker
                .request("10.0.0.1".parse().unwrap())
                .contains("\r\nHost: app.example\r\n")
        );
    }

    #[test]
    fn source_address_by_family() {
        let s = SourceAddrs {
            v4: Some("192.0.2.1".parse().unwrap()),
            v6: None,
        };
        assert_eq!(
            s.for_peer("10.0.0.1".parse().unwrap()),
            Some("192.0.2.1".parse().unwrap())
        );
        assert_eq!(s.for_peer("2001:db8::1".parse().unwrap()), None);
    }

    /// Log lines written while the guard lives (this thread; tokio tests run on one).
    fn capture_logs() -> (Arc<Mutex<Vec<u8>>>, tracing::subscriber::DefaultGuard) {
        struct Capture(Arc<Mutex<Vec<u8>>>);
        impl io::Write for Capture {
            fn write(&mut self, b: &[u8]) -> io::Result<usize> {
                self.0.lock().unwrap().extend_from_slice(b);
                Ok(b.len())
            }
            fn flush(&mut self) -> io::Result<()> {
                Ok(())
            }
        }
        let buf = Arc::new(Mutex::new(Vec::new()));
        let b = buf.clone();
        let subscriber = tracing_subscriber::fmt()
            .with_max_level(tracing::Level::INFO)
            .with_ansi(false)
            .with_writer(move || Capture(b.clone()))
            .finish();
        (buf, tracing::subscriber::set_default(subscriber))
    }

    #[tokio::test]
    async fn tcp_check_takes_closed_port_down_and_back_up() {
        let (logs, _guard) = capture_logs();
        let logs = move || String::from_utf8_lossy(&logs.lock().unwrap()).into_owned();
        let addr = closed_port().await;
        let b = backend(addr);
        let checker = HealthChecker::new(cfg(HealthCheckKind::Tcp), SourceAddrs::default());
        assert!(matches!(
            checker.check(addr).await,
            Err(CheckFailure::Refused)
        ));
        let started = Instant::now();
        let _h = spawn(
            "p".into(),
            vec![b.clone()],
            cfg(HealthCheckKind::Tcp),
            SourceAddrs::default(),
        );
        wait_for("down", Duration::from_secs(3), || !b.is_healthy()).await;
        // fall = 2: the immediate check and one an interval later.
        assert!(started.elapsed() >= Duration::from_millis(90));
        assert_eq!(b.health_changes.load(Ordering::Relaxed), 1);
        let l = logs();
        assert!(
            l.contains(&format!(
                "WARN lb_daemon::health: backend down after 2 failed health check(s) pool=p backend={addr} reason=connection refused"
            )),
            "{l}"
        );

        let listener = TcpListener::bind(addr).await.unwrap();
        tokio::spawn(async move {
            loop {
                let _ = listener.accept().await;
            }
        });
        wait_for("up", Duration::from_secs(3), || b.is_healthy()).await;
        assert_eq!(b.health_changes.load(Ordering::Relaxed), 2);
        assert!(checker.check(addr).await.is_ok());
        let l = logs();
        assert!(
            l.contains(&format!(
                "INFO lb_daemon::health: backend up after 2 passed health check(s) pool=p backend={addr}"
            )),
            "{l}"
        );
        assert_eq!(l.lines().count(), 2, "only the changes are logged: {l}");
    }

    #[tokio::test]
    async fn http_200_stays_healthy_and_sends_path_and_host() {
        let (addr, mut seen) = http_server(Answer::Status(200)).await;
        let b = backend(addr);
        let mut c = cfg(HealthCheckKind::Http);
        c.http_path = "/healthz".into();
        c.http_host = Some("app.example".into());
        c.fall = 1;
        let _h = spawn("p".into(), vec![b.clone()], c, SourceAddrs::default());
        for _ in 0..3 {
            let req = tokio::time::timeout(Duration::from_secs(3), seen.requests.recv())
                .await
                .unwrap()
                .unwrap();
            assert_eq!(
                req,
                "GET /healthz HTTP/1.1\r\nHost: app.example\r\nConnection: close\r\nUser-Agent: lb-health\r\n\r\n"
            );
        }
        assert!(b.is_healthy());
        assert_eq!(b.health_changes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn http_default_host_is_the_backend_address() {
        let (addr, mut seen) = http_server(Answer::Status(200)).await;
        let checker = HealthChecker::new(cfg(HealthCheckKind::Http), SourceAddrs::default());
        checker.check(addr).await.unwrap();
        let req = seen.requests.recv().await.unwrap();
        assert!(
            req.starts_with("GET / HTTP/1.1\r\nHost: 127.0.0.1\r\n"),
            "{req}"
        );
    }

    /// Runs the default HTTP checker on one backend at `addr` until it goes down (3 s at most).
    async fn http_checked_goes_down(addr: SocketAddr) -> Arc<Backend> {
        let b = backend(addr);
        let _h = spawn(
            "p".into(),
            vec![b.clone()],
            cfg(HealthCheckKind::Http),
            SourceAddrs::default(),
        );
        wait_for("down", Duration::from_secs(3), || !b.is_healthy()).await;
        b
    }

    #[tokio::test]
    async fn http_503_goes_down() {
        let (addr, _seen) = http_server(Answer::Status(503)).await;
        let checker = HealthChecker::new(cfg(HealthCheckKind::Http), SourceAddrs::default());
        let err = checker.check(addr).await.unwrap_err();
        assert_eq!(err.to_string(), "status 503, expected 200");
        let b = http_checked_goes_down(addr).await;
        assert_eq!(b.health_changes.load(Ordering::Relaxed), 1);
    }

    #[tokio::test]
    async fn http_expected_status_is_honoured() {
        let (addr, _seen) = http_server(Answer::Status(204)).await;
        let mut c = cfg(HealthCheckKind::Http);
        c.expected_status = 204;
        assert!(
            HealthChecker::new(c.clone(), SourceAddrs::default())
                .check(addr)
                .await
                .is_ok()
        );
        // A 200 is a failure when 204 is expected, and the other way round.
        let (ok_addr, _seen200) = http_server(Answer::Status(200)).await;
        let err = HealthChecker::new(c.clone(), SourceAddrs::default())
            .check(ok_addr)
            .await
            .unwrap_err();
        assert_eq!(err.to_string(), "status 200, expected 204");

        let b = backend(addr);
        let _h = spawn("p".into(), vec![b.clone()], c, SourceAddrs::default());
        sleep(Duration::from_millis(350)).await;
        assert!(b.is_healthy());
        assert_eq!(b.health_changes.load(Ordering::Relaxed), 0);
    }

    #[tokio::test]
    async fn http_status_line_without_headers_is_enough() {
        let (addr, _seen) = http_server(Answer::StatusLineOnly(200)).await;
        let checker = HealthChecker::new(cfg(HealthCheckKind::Http), SourceAddrs::default());
        checker.check(addr).await.unwrap();
    }

    #[tokio::test]
    async fn http_garbage_is_unhealthy() {
        let (addr, _seen) = http_server(Answer::Garbage).await;
        let checker = HealthChecker::new(cfg(HealthCheckKind::Http), SourceAddrs::default());
        let err = checker.check(addr).await.unwrap_err();
        assert!(matches!(err, CheckFailure::Malformed(_)), "{err}");
        http_checked_goes_down(addr).await;
    }

    #[tokio::test]
    async fn http_silence_times_out() {
        let (addr, _seen) = http_server(Answer::Silence).await;
        let checker = HealthChecker::new(cfg(HealthCheckKind::Http), SourceAddrs::default());
        let started = Instant::now();
        let err = checker.check(addr).await.unwrap_err();
        assert_eq!(
            err.to_string(),
            "timeout after 100 ms waiting for the status line"
        );
        assert!(started.elapsed() < Duration::from_secs(1));
        http_checked_goes_down(addr).await;
    }

    #[tokio::test]
    async fn check_port_overrides_the_backend_port() {
        let (addr, _seen) = http_server(Answer::Status(200)).await;
        let b = backend(closed_port().await);
        let mut c = cfg(HealthCheckKind::Http);
        c.port = Some(addr.port());
        c.fall = 1;
        let checker = HealthChecker::new(c.clone(), SourceAddrs::default());
        assert_eq!(checker.target(b.addr), addr);
        checker.check(b.addr).await.unwrap();
        let _h = spawn("p".into(), vec![b.clone()], c, SourceAddrs::default());
        sleep(Duration::from_millis(250)).await;
        assert!(b.is_healthy());
    }

    #[tokio::test]
    async fn checks_leave_from_the_source_address() {
        let (addr, seen) = http_server(Answer::Status(200)).await;
        let source = SourceAddrs {
            v4: Some(Ipv4Addr::new(127, 0, 0, 2)),
            v6: None,
        };
        HealthChecker::new(cfg(HealthCheckKind::Tcp), source)
            .check(addr)
            .await
            .unwrap();
        HealthChecker::new(cfg(HealthCheckKind::Http), source)
            .check(addr)
            .await
            .unwrap();
        wait_for("two connections", Duration::from_secs(3), || {
            seen.connections.load(Ordering::SeqCst) >= 2
        })
        .await;
        for peer in seen.peers.lock().unwrap().iter() {
            assert_eq!(peer.ip(), IpAddr::V4(Ipv4Addr::new(127, 0, 0, 2)));
        }
        // An address the host does not have: the check fails, naming it.
        let foreign = SourceAddrs {
            v4: Some(Ipv4Addr::new(192, 0, 2, 1)),
            v6: None,
        };
        let err = HealthChecker::new(cfg(HealthCheckKind::Tcp), foreign)
            .check(addr)
            .await
            .unwrap_err();
        assert!(matches!(err, CheckFailure::Bind(..)), "{err}");
        assert!(
            err.to_string()
                .starts_with("binding to source address 192.0.2.1")
        );
    }

    #[tokio::test]
    async fn disabled_backends_are_not_checked() {
        let (addr, seen) = http_server(Answer::Status(200)).await;
        let b = Arc::new(Backend::new(0, addr, 1, false));
        let h = spawn(
            "p".into(),
            vec![b],
            cfg(HealthCheckKind::Tcp),
            SourceAddrs::default(),
        );
        assert!(h.is_empty());
        sleep(Duration::from_millis(150)).await;
        assert_eq!(seen.connections.load(Ordering::SeqCst), 0);
    }

    #[tokio::test]
    async fn dropping_the_handle_stops_the_checks() {
        let (addr, seen) = http_server(Answer::Status(200)).await;
        let h = spawn(
            "p".into(),
            vec![backend(addr)],
            cfg(HealthCheckKind::Http),
            SourceAddrs::default(),
        );
        assert_eq!((h.pool(), h.len()), ("p", 1));
        wait_for("two checks", Duration::from_secs(3), || {
            seen.connections.load(Ordering::SeqCst) >= 2
        })
        .await;
        drop(h);
        sleep(Duration::from_millis(50)).await;
        let after = seen.connections.load(Ordering::SeqCst);
        sleep(Duration::from_millis(400)).await;
        assert_eq!(seen.connections.load(Ordering::SeqCst), after);
    }

    #[tokio::test]
    async fn checks_run_every_interval() {
        let (addr, seen) = http_server(Answer::Status(200)).await;
        let _h = spawn(
            "p".into(),
            vec![backend(addr)],
            cfg(HealthCheckKind::Tcp),
            SourceAddrs::default(),
        );
        sleep(Duration::from_millis(520)).await;
        // Immediately, then every 95..=105 ms: 5 or 6 checks in 520 ms (one either way for a
        // busy machine).
        let n = seen.connections.load(Ordering::SeqCst);
        assert!((4..=7).contains(&n), "{n} checks");
    }
}
