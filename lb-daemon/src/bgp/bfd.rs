//! BFD (RFC 5880, single hop RFC 5881, asynchronous mode, no authentication) towards a BGP peer,
//! so a router notices a hung engine within a few hundred milliseconds instead of a hold time.
//!
//! ```text
//!   Bfd (one per speaker): a receive socket per family on port 3784, packets handed to the
//!   session of their source address
//!   BfdSession (one per established BGP session): sends control packets from (local address,
//!   49152–65535) with TTL 255, runs the state machine, reports Down
//! ```
//!
//! Received packets must arrive with TTL / hop limit 255 (RFC 5881 section 5), pass the checks of
//! RFC 5880 section 6.8.6, and name a session; anything else is counted and dropped. While the
//! session is not Up it sends once a second (6.8.3), then at the configured rate after a Poll
//! sequence. A stop sends `AdminDown`, which a router does not treat as a failure.

use std::{
    collections::HashMap,
    io,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    os::fd::AsRawFd,
    sync::{
        Arc, Mutex,
        atomic::{AtomicU64, Ordering},
    },
    time::Duration,
};

use nix::sys::socket::{
    ControlMessageOwned, MsgFlags, SockaddrStorage, recvmsg, setsockopt, sockopt,
};
use tokio::{
    io::Interest,
    net::UdpSocket,
    sync::{mpsc, watch},
    task::JoinHandle,
    time::{Instant, sleep_until},
};
use tracing::{debug, info, warn};

/// UDP port of single-hop BFD control packets.
pub const CONTROL_PORT: u16 = 3784;
/// Length of a control packet without authentication.
pub const PACKET_LEN: usize = 24;
/// Transmit interval while the session is not Up (RFC 5880 6.8.3: at least one second).
const IDLE_TX: Duration = Duration::from_secs(1);

/// Session state (RFC 5880 4.1).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum State {
    AdminDown = 0,
    #[default]
    Down = 1,
    Init = 2,
    Up = 3,
}

impl State {
    fn from_bits(b: u8) -> State {
        match b & 3 {
            0 => State::AdminDown,
            1 => State::Down,
            2 => State::Init,
            _ => State::Up,
        }
    }

    pub fn as_str(self) -> &'static str {
        match self {
            State::AdminDown => "admin_down",
            State::Down => "down",
            State::Init => "init",
            State::Up => "up",
        }
    }
}

/// Diagnostic codes this side sends (RFC 5880 4.1).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum Diag {
    None = 0,
    DetectionExpired = 1,
    NeighborDown = 3,
    AdminDown = 7,
}

/// One control packet.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Packet {
    pub diag: u8,
    pub state: State,
    pub poll: bool,
    pub final_: bool,
    pub detect_mult: u8,
    pub my_disc: u32,
    pub your_disc: u32,
    /// Microseconds.
    pub desired_min_tx: u32,
    pub required_min_rx: u32,
}

/// Why a received packet was dropped.
#[derive(Clone, Copy, Debug, PartialEq, Eq, thiserror::Error)]
pub enum Invalid {
    #[error("shorter than a control packet or than its length field")]
    Length,
    #[error("BFD version other than 1")]
    Version,
    #[error("detect multiplier 0")]
    DetectMult,
    #[error("multipoint bit set")]
    Multipoint,
    #[error("my discriminator 0")]
    MyDiscriminator,
    #[error("your discriminator 0 in a state other than Down or AdminDown")]
    YourDiscriminator,
    #[error("authentication (not configured here)")]
    Authentication,
}

impl Packet {
    pub fn encode(&self) -> [u8; PACKET_LEN] {
        let mut b = [0u8; PACKET_LEN];
        b[0] = (1 << 5) | (self.diag & 0x1f);
        b[1] =
            ((self.state as u8) << 6) | (u8::from(self.poll) << 5) | (u8::from(self.final_) << 4);
        b[2] = self.detect_mult;
        b[3] = 24;
        b[4..8].copy_from_slice(&self.my_disc.to_be_bytes());
        b[8..12].copy_from_slice(&self.your_disc.to_be_bytes());
        b[12..16].copy_from_slice(&self.desired_min_tx.to_be_bytes());
        b[16..20].copy_from_slice(&self.required_min_rx.to_be_bytes());
        b
    }

    /// Parses and checks a received packet (RFC 5880 6.8.6, the checks before the state machine).
    pub fn decode(b: &[u8]) -> Result<Packet, Invalid> {
        if b.len() < PACKET_LEN {
            return Err(Invalid::Length);
        }
        if b[0] >> 5 != 1 {
            return Err(Invalid::Version);
        }
        let len = usize::from(b[3]);
        if len < PACKET_LEN || len > b.len() {
            return Err(Invalid::Length);
        }
        let flags = b[1];
        if flags & 0x04 != 0 {
            return Err(Invalid::Authentication);
        }
        if flags & 0x01 != 0 {
            return Err(Invalid::Multipoint);
        }
        let word = |i: usize| u32::from_be_bytes([b[i], b[i + 1], b[i + 2], b[i + 3]]);
        let p = Packet {
            diag: b[0] & 0x1f,
            state: State::from_bits(flags >> 6),
            poll: flags & 0x20 != 0,
            final_: flags & 0x10 != 0,
            detect_mult: b[2],
            my_disc: word(4),
            your_disc: word(8),
            desired_min_tx: word(12),
            required_min_rx: word(16),
        };
        if p.detect_mult == 0 {
            return Err(Invalid::DetectMult);
        }
        if p.my_disc == 0 {
            return Err(Invalid::MyDiscriminator);
        }
        if p.your_disc == 0 && !matches!(p.state, State::Down | State::AdminDown) {
            return Err(Invalid::YourDiscriminator);
        }
        Ok(p)
    }
}

/// Timers of a session (from `bgp.peers[].bfd`).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Timers {
    pub min_tx: Duration,
    pub min_rx: Duration,
    pub multiplier: u8,
}

fn micros(d: Duration) -> u32 {
    u32::try_from(d.as_micros()).unwrap_or(u32::MAX)
}

/// The state machine and timers of one session, without I/O (driven by `run_session`, and by
/// the unit tests on a virtual clock).
#[derive(Debug)]
pub struct Machine {
    pub state: State,
    diag: Diag,
    my_disc: u32,
    remote_disc: u32,
    remote_state: State,
    remote_min_rx: Duration,
    remote_desired_tx: Duration,
    remote_mult: u8,
    timers: Timers,
    /// Our desired transmit interval as last announced (1 s until Up).
    desired_tx: Duration,
    /// A Poll sequence is running (a parameter change not yet acknowledged by a Final).
    polling: bool,
    /// Answer the peer's Poll with a Final in the next packet.
    send_final: bool,
    /// When a packet from the peer last arrived (detection).
    last_rx: Option<Instant>,
}

impl Machine {
    pub fn new(my_disc: u32, timers: Timers) -> Machine {
        Machine {
            state: State::Down,
            diag: Diag::None,
            my_disc,
            remote_disc: 0,
            remote_state: State::Down,
            remote_min_rx: Duration::from_micros(1),
            remote_desired_tx: IDLE_TX,
            remote_mult: 1,
            timers,
            desired_tx: IDLE_TX,
            polling: false,
            send_final: false,
            last_rx: None,
        }
    }

    /// The packet to send now.
    pub fn packet(&mut self) -> Packet {
        let final_ = std::mem::take(&mut self.send_final);
        Packet {
            diag: self.diag as u8,
            state: self.state,
            poll: self.polling && !final_,
            final_,
            detect_mult: self.timers.multiplier,
            my_disc: self.my_disc,
            your_disc: self.remote_disc,
            desired_min_tx: micros(self.desired_tx),
            required_min_rx: micros(self.timers.min_rx),
        }
    }

    /// How long until the next periodic packet (before jitter).
    pub fn tx_interval(&self) -> Duration {
        self.desired_tx.max(self.remote_min_rx)
    }

    /// Detection time: the peer's multiplier times the agreed interval it sends at.
    pub fn detection_time(&self) -> Duration {
        self.timers.min_rx.max(self.remote_desired_tx) * u32::from(self.remote_mult)
    }

    /// When the session fails unless a packet arrives (Init and Up only).
    pub fn detection_deadline(&self) -> Option<Instant> {
        match self.state {
            State::Init | State::Up => self.last_rx.map(|t| t + self.detection_time()),
            _ => None,
        }
    }

    /// The detection time passed without a packet.
    pub fn expire(&mut self) {
        if matches!(self.state, State::Init | State::Up) {
            self.state = State::Down;
            self.diag = Diag::DetectionExpired;
            self.remote_disc = 0;
            self.slow_down_to_idle();
        }
    }

    fn slow_down_to_idle(&mut self) {
        if self.desired_tx != IDLE_TX {
            self.desired_tx = IDLE_TX;
            self.polling = true;
        }
    }

    /// A valid packet arrived at `now` (RFC 5880 6.8.6). Returns whether to answer at once (a Poll
    /// to acknowledge, or a state change the peer should hear of without waiting).
    pub fn receive(&mut self, p: &Packet, now: Instant) -> bool {
        if p.your_disc != 0 && p.your_disc != self.my_disc {
            return false;
        }
        self.remote_disc = p.my_disc;
        self.remote_state = p.state;
        self.remote_mult = p.detect_mult;
        self.remote_min_rx = Duration::from_micros(u64::from(p.required_min_rx));
        self.remote_desired_tx = Duration::from_micros(u64::from(p.desired_min_tx));
        self.last_rx = Some(now);
        if p.final_ {
            self.polling = false;
        }
        let before = self.state;
        if p.state == State::AdminDown {
            if self.state != State::Down {
                self.state = State::Down;
                self.diag = Diag::NeighborDown;
            }
        } else {
            match (self.state, p.state) {
                (State::Down, State::Down) => self.state = State::Init,
                (State::Down | State::Init, State::Init | State::Up) => self.state = State::Up,
                (State::Up, State::Down) => {
                    self.state = State::Down;
                    self.diag = Diag::NeighborDown;
                }
                _ => {}
            }
        }
        if self.state == State::Up && before != State::Up {
            self.diag = Diag::None;
            if self.desired_tx != self.timers.min_tx {
                self.desired_tx = self.timers.min_tx;
                self.polling = true;
            }
        }
        if self.state == State::Down && before != State::Down {
            self.slow_down_to_idle();
        }
        if p.poll {
            self.send_final = true;
        }
        p.poll || self.state != before
    }

    /// Goes `AdminDown` (a stop): the peer takes it as administrative, not as a failure.
    pub fn admin_down(&mut self) {
        self.state = State::AdminDown;
        self.diag = Diag::AdminDown;
    }
}

/// Counters of the BFD endpoint (all sessions).
#[derive(Debug, Default)]
pub struct BfdCounters {
    pub received: AtomicU64,
    /// Dropped: not TTL 255, invalid (RFC 5880 6.8.6), or from no session's peer.
    pub dropped: AtomicU64,
    pub sent: AtomicU64,
}

/// Where received packets go: the session of each peer address.
type Sessions = Arc<Mutex<HashMap<IpAddr, mpsc::Sender<Packet>>>>;

/// The speaker's BFD endpoint.
#[derive(Debug, Default)]
pub struct Bfd {
    sessions: Sessions,
    receivers: Mutex<HashMap<bool, JoinHandle<()>>>,
    pub counters: Arc<BfdCounters>,
}

impl Drop for Bfd {
    fn drop(&mut self) {
        for (_, h) in self.lock_receivers().drain() {
            h.abort();
        }
    }
}

impl Bfd {
    fn lock_receivers(&self) -> std::sync::MutexGuard<'_, HashMap<bool, JoinHandle<()>>> {
        self.receivers
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
    }

    /// Starts the receive socket of `v6`'s family if it is not running.
    fn ensure_receiver(&self, v6: bool) -> io::Result<()> {
        let mut receivers = self.lock_receivers();
        if receivers.contains_key(&v6) {
            return Ok(());
        }
        let addr: SocketAddr = if v6 {
            (Ipv6Addr::UNSPECIFIED, CONTROL_PORT).into()
        } else {
            (Ipv4Addr::UNSPECIFIED, CONTROL_PORT).into()
        };
        let socket = socket2::Socket::new(
            socket2::Domain::for_address(addr),
            socket2::Type::DGRAM,
            Some(socket2::Protocol::UDP),
        )?;
        if v6 {
            socket.set_only_v6(true)?;
            setsockopt(&socket, sockopt::Ipv6RecvHopLimit, &true)?;
        } else {
            setsockopt(&socket, sockopt::Ipv4RecvTtl, &true)?;
        }
        socket.set_reuse_address(true)?;
        socket.set_nonblocking(true)?;
        socket.bind(&addr.into())?;
        let socket = UdpSocket::from_std(socket.into())?;
        let sessions = self.sessions.clone();
        let counters = self.counters.clone();
        receivers.insert(v6, tokio::spawn(receive(socket, sessions, counters)));
        Ok(())
    }

    /// Starts a session from `local` to `peer` (the BGP session's addresses).
    pub fn session(&self, local: IpAddr, peer: IpAddr, timers: Timers) -> io::Result<BfdSession> {
        self.ensure_receiver(peer.is_ipv6())?;
        let socket = send_socket(local, peer)?;
        let (tx, rx) = mpsc::channel(64);
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(peer, tx);
        let (state_tx, state_rx) = watch::channel(State::Down);
        let (stop_tx, stop_rx) = watch::channel(false);
        let my_disc = loop {
            let d: u32 = rand_u32();
            if d != 0 {
                break d;
            }
        };
        let task = tokio::spawn(run_session(
            socket,
            SocketAddr::new(peer, CONTROL_PORT),
            Machine::new(my_disc, timers),
            rx,
            state_tx,
            stop_rx,
            self.counters.clone(),
        ));
        Ok(BfdSession {
            peer,
            sessions: self.sessions.clone(),
            state: state_rx,
            stop: stop_tx,
            task: Some(task),
        })
    }
}

fn rand_u32() -> u32 {
    let mut b = [0u8; 4];
    ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut b)
        .map_or(0x5eed_0001, |()| u32::from_ne_bytes(b))
}

/// A socket from `local` (a port in 49152–65535, RFC 5881 section 4) to the peer, TTL 255.
fn send_socket(local: IpAddr, peer: IpAddr) -> io::Result<UdpSocket> {
    let domain = socket2::Domain::for_address(SocketAddr::new(peer, 0));
    let socket = socket2::Socket::new(domain, socket2::Type::DGRAM, Some(socket2::Protocol::UDP))?;
    if peer.is_ipv6() {
        socket.set_unicast_hops_v6(255)?;
    } else {
        socket.set_ttl_v4(255)?;
    }
    socket.set_nonblocking(true)?;
    let start = u16::try_from(49152 + rand_u32() % 16384).unwrap_or(49152);
    let mut last = None;
    for i in 0..64u16 {
        let port = 49152 + (start - 49152 + i * 257) % 16384;
        match socket.bind(&SocketAddr::new(local, port).into()) {
            Ok(()) => return UdpSocket::from_std(socket.into()),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| io::Error::other("no source port")))
}

async fn receive(socket: UdpSocket, sessions: Sessions, counters: Arc<BfdCounters>) {
    let mut buf = [0u8; 128];
    loop {
        if socket.readable().await.is_err() {
            return;
        }
        let got = socket.try_io(Interest::READABLE, || {
            let mut iov = [io::IoSliceMut::new(&mut buf)];
            let mut cmsg = nix::cmsg_space!(libc::c_int);
            let msg = recvmsg::<SockaddrStorage>(
                socket.as_raw_fd(),
                &mut iov,
                Some(&mut cmsg),
                MsgFlags::MSG_DONTWAIT,
            )
            .map_err(io::Error::from)?;
            let ttl = msg.cmsgs().ok().and_then(|mut c| {
                c.find_map(|m| match m {
                    ControlMessageOwned::Ipv4Ttl(t) | ControlMessageOwned::Ipv6HopLimit(t) => {
                        Some(t)
                    }
                    _ => None,
                })
            });
            let from = msg.address.and_then(|a| {
                a.as_sockaddr_in()
                    .map(|s| IpAddr::V4(s.ip()))
                    .or_else(|| a.as_sockaddr_in6().map(|s| IpAddr::V6(s.ip())))
            });
            Ok((msg.bytes, ttl, from))
        });
        let (n, ttl, from) = match got {
            Ok(g) => g,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => continue,
            Err(e) => {
                warn!("BFD receive: {e}");
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        counters.received.fetch_add(1, Ordering::Relaxed);
        let drop_it = |why: &str| {
            counters.dropped.fetch_add(1, Ordering::Relaxed);
            debug!(?from, "BFD packet dropped: {why}");
        };
        if ttl != Some(255) {
            drop_it("not sent with TTL 255 (single hop)");
            continue;
        }
        let packet = match Packet::decode(&buf[..n]) {
            Ok(p) => p,
            Err(e) => {
                drop_it(&e.to_string());
                continue;
            }
        };
        let Some(from) = from else {
            drop_it("no source address");
            continue;
        };
        let to = sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .get(&from)
            .cloned();
        match to {
            // A full queue means the session is far behind; it hears the next one.
            Some(tx) => {
                if tx.try_send(packet).is_err() {
                    drop_it("session busy");
                }
            }
            None => drop_it("no session with this address"),
        }
    }
}

/// Up to 25 % less than `d` (RFC 5880 6.8.7), from a cheap per-packet source.
fn jittered(d: Duration, seed: &mut u32) -> Duration {
    *seed ^= *seed << 13;
    *seed ^= *seed >> 17;
    *seed ^= *seed << 5;
    let cut = u64::from(*seed % 25) + 1;
    d * u32::try_from(100 - cut).unwrap_or(75) / 100
}

async fn run_session(
    socket: UdpSocket,
    to: SocketAddr,
    mut m: Machine,
    mut rx: mpsc::Receiver<Packet>,
    state: watch::Sender<State>,
    mut stop: watch::Receiver<bool>,
    counters: Arc<BfdCounters>,
) {
    let mut seed = m.my_disc | 1;
    let mut next_tx = Instant::now();
    loop {
        let detect = m.detection_deadline();
        tokio::select! {
            () = sleep_until(next_tx) => {
                send(&socket, to, &mut m, &counters).await;
                next_tx = Instant::now() + jittered(m.tx_interval(), &mut seed);
            }
            () = async { sleep_until(detect.unwrap_or_else(Instant::now)).await }, if detect.is_some() => {
                m.expire();
                warn!(peer = %to.ip(), "BFD session down: nothing from the peer for {:?}", m.detection_time());
                send(&socket, to, &mut m, &counters).await;
            }
            p = rx.recv() => {
                let Some(p) = p else { return };
                let before = m.state;
                if m.receive(&p, Instant::now()) {
                    send(&socket, to, &mut m, &counters).await;
                }
                // A faster rate (going Up) starts now: the peer times us by the interval we
                // announce, not by the slower one the next packet was scheduled with.
                next_tx = next_tx.min(Instant::now() + jittered(m.tx_interval(), &mut seed));
                if m.state != before {
                    info!(peer = %to.ip(), from = before.as_str(), to = m.state.as_str(), "BFD session state");
                }
            }
            _ = stop.changed() => {
                m.admin_down();
                for _ in 0..3 {
                    send(&socket, to, &mut m, &counters).await;
                }
                state.send_replace(State::AdminDown);
                return;
            }
        }
        state.send_if_modified(|s| {
            let changed = *s != m.state;
            *s = m.state;
            changed
        });
    }
}

async fn send(socket: &UdpSocket, to: SocketAddr, m: &mut Machine, counters: &BfdCounters) {
    let bytes = m.packet().encode();
    match socket.send_to(&bytes, to).await {
        Ok(_) => {
            counters.sent.fetch_add(1, Ordering::Relaxed);
        }
        Err(e) => debug!(peer = %to.ip(), "BFD send: {e}"),
    }
}

/// One running session; dropping it stops the session without a word (a crash looks the same
/// to the peer), [`BfdSession::stop`] sends `AdminDown` first.
#[derive(Debug)]
pub struct BfdSession {
    peer: IpAddr,
    sessions: Sessions,
    state: watch::Receiver<State>,
    stop: watch::Sender<bool>,
    task: Option<JoinHandle<()>>,
}

impl BfdSession {
    pub fn state(&self) -> State {
        *self.state.borrow()
    }

    /// A receiver of the state, for status readers.
    pub fn watch(&self) -> watch::Receiver<State> {
        self.state.clone()
    }

    /// Resolves when the session, having been Up, goes Down.
    pub async fn failed(&mut self) {
        let _ = self.state.wait_for(|s| *s == State::Up).await;
        let _ = self.state.wait_for(|s| *s == State::Down).await;
    }

    /// Sends `AdminDown` and ends the session.
    pub async fn stop(mut self) {
        let _ = self.stop.send(true);
        if let Some(t) = self.task.take() {
            let _ = tokio::time::timeout(Duration::from_millis(500), t).await;
        }
    }
}

impl Drop for BfdSession {
    fn drop(&mut self) {
        if let Some(t) = self.task.take() {
            t.abort();
        }
        self.sessions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .remove(&self.peer);
    }
}

#[cfg(test)]
mod tests;
