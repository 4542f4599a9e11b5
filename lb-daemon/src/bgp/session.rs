//! One BGP peer: connects (active only; this speaker never listens), exchanges OPENs, keeps the
//! session up with KEEPALIVEs and the hold timer, announces and withdraws this engine's routes as
//! they change, and reconnects with exponential backoff after any failure.
//!
//! ```text
//!   Idle ─connect─► OpenSent ─their OPEN ok─► OpenConfirm ─KEEPALIVE─► Established
//!    ▲                 │ bad OPEN: NOTIFICATION        │                   │ routes → UPDATEs
//!    └──── backoff ◄───┴───────────────────────────────┴── error / EOF ◄───┘ hold timer expires
//!   stop: withdraw every route, then Cease (administrative shutdown), then close.
//! ```
//!
//! Incoming UPDATEs are counted and ignored (announce-only). A message with a bad header
//! (marker, length) ends the session with a NOTIFICATION; a well-framed UPDATE that does not parse
//! is counted and ignored (the framing is intact), any other malformed message ends the session.

use std::{
    collections::BTreeMap,
    net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use bytes::BytesMut;
use lb_model::BgpPeerConfig;
use netgauze_bgp_pkt::{
    BgpMessage,
    codec::BgpCodec,
    notification::{
        BgpNotificationMessage, FiniteStateMachineError, HoldTimerExpiredError, MessageHeaderError,
    },
};
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpSocket, TcpStream},
    sync::watch,
    time::{sleep, sleep_until, timeout},
};
use tokio_util::codec::{Decoder, Encoder};
use tracing::{info, warn};

use super::{
    bfd::{self, Bfd, BfdSession, Timers},
    messages::{self, Attributes, Negotiated, Route},
};

/// The routes to announce, keyed by VIP.
pub type Routes = BTreeMap<IpAddr, Route>;

/// Longest BGP message without the extended-message capability (RFC 4271).
const MAX_MESSAGE: usize = 4096;
const HEADER: usize = 19;
/// Waiting for the TCP connection.
const CONNECT_TIMEOUT: Duration = Duration::from_secs(5);
/// Waiting for the peer's OPEN and first KEEPALIVE when no hold time is agreed yet (RFC 4271
/// suggests 4 minutes; a router that does not answer in 30 s is retried sooner).
const OPEN_TIMEOUT: Duration = Duration::from_secs(30);
/// How long a graceful stop waits for the withdrawals and the Cease to leave.
const STOP_FLUSH: Duration = Duration::from_secs(1);

/// Where a session is (RFC 4271 states this speaker goes through).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum State {
    #[default]
    Idle,
    Connect,
    OpenSent,
    OpenConfirm,
    Established,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Idle => "idle",
            State::Connect => "connect",
            State::OpenSent => "open_sent",
            State::OpenConfirm => "open_confirm",
            State::Established => "established",
        }
    }
}

/// What the rest of the daemon sees of one peer.
#[derive(Clone, Debug, Default)]
pub struct PeerStatus {
    pub state: State,
    /// When the current session became established.
    pub established_at: Option<Instant>,
    /// Routes announced on the current session.
    pub announced: usize,
    /// Why the last session ended (or could not start).
    pub last_error: Option<String>,
    /// Sessions that reached Established.
    pub established_total: u64,
    /// UPDATEs received (ignored: announce-only).
    pub updates_received: u64,
    /// Well-framed UPDATEs that did not parse (ignored).
    pub malformed_updates: u64,
    /// Routes that could not be announced on this session (e.g. no next hop of their family).
    pub unannounceable: u64,
    /// The BFD session's state, while the BGP session has one.
    pub bfd: Option<watch::Receiver<bfd::State>>,
}

/// One peer's settings, resolved from `[bgp]`.
#[derive(Clone, Debug)]
pub struct Peer {
    pub config: BgpPeerConfig,
    pub local_asn: u32,
    pub router_id: Ipv4Addr,
    pub hold_time: u16,
    pub communities: Vec<u32>,
    pub min_backoff: Duration,
    pub max_backoff: Duration,
    /// The speaker's BFD endpoint (used when `config.bfd` is set).
    pub bfd: Option<Arc<Bfd>>,
}

impl Peer {
    pub fn addr(&self) -> SocketAddr {
        SocketAddr::new(self.config.address, self.config.port)
    }
}

/// Why a session ended.
#[derive(Debug)]
enum Ended {
    Stopped,
    Failed { reason: String, established: bool },
}

/// Runs the peer until `stop` turns true: sessions one after the other, backing off between them.
pub async fn run(
    peer: Peer,
    routes: watch::Receiver<Routes>,
    status: Arc<Mutex<PeerStatus>>,
    mut stop: watch::Receiver<bool>,
) {
    let mut backoff = peer.min_backoff;
    loop {
        if *stop.borrow() {
            return;
        }
        let ended = session(&peer, routes.clone(), &status, stop.clone()).await;
        update(&status, |s| {
            s.state = State::Idle;
            s.established_at = None;
            s.announced = 0;
        });
        match ended {
            Ended::Stopped => return,
            Ended::Failed {
                reason,
                established,
            } => {
                warn!(peer = %peer.addr(), "BGP session: {reason}; retrying in {backoff:?}");
                update(&status, |s| s.last_error = Some(reason));
                if established {
                    backoff = peer.min_backoff;
                }
                tokio::select! {
                    () = sleep(backoff) => {}
                    () = stopped(&mut stop) => return,
                }
                backoff = (backoff * 2).min(peer.max_backoff);
            }
        }
    }
}

/// Resolves once `stop` is true (or its sender is gone).
async fn stopped(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn update(status: &Mutex<PeerStatus>, f: impl FnOnce(&mut PeerStatus)) {
    f(&mut status
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner));
}

fn failed(reason: impl Into<String>, established: bool) -> Ended {
    Ended::Failed {
        reason: reason.into(),
        established,
    }
}

/// A framed BGP connection.
struct Conn {
    stream: TcpStream,
    codec: BgpCodec,
    inbound: Inbound,
    tx: BytesMut,
}

/// One message read from the peer.
pub enum Frame {
    Message(BgpMessage),
    /// A well-framed UPDATE that did not parse.
    MalformedUpdate(String),
}

/// Why the peer's stream cannot be read on: the NOTIFICATION to send before closing, and why.
pub struct Unframed {
    pub notification: BgpNotificationMessage,
    pub reason: String,
}

/// The receiving side's framing: bytes from the peer in, whole messages out (no I/O, so the
/// fuzz targets drive exactly what a session runs).
pub struct Inbound {
    codec: BgpCodec,
    rx: BytesMut,
}

impl Default for Inbound {
    fn default() -> Self {
        Self::new()
    }
}

impl Inbound {
    pub fn new() -> Inbound {
        Inbound {
            codec: BgpCodec::new(true),
            rx: BytesMut::with_capacity(MAX_MESSAGE),
        }
    }

    /// Where received bytes go.
    pub fn buffer(&mut self) -> &mut BytesMut {
        &mut self.rx
    }

    /// The next whole message, `None` until one has arrived. After an `Err` the stream is out
    /// of step and the session ends.
    pub fn next_frame(&mut self) -> Result<Option<Frame>, Unframed> {
        if self.rx.len() < HEADER {
            return Ok(None);
        }
        if self.rx[..16].iter().any(|b| *b != 0xff) {
            return Err(Unframed {
                notification: BgpNotificationMessage::MessageHeaderError(
                    MessageHeaderError::ConnectionNotSynchronized {
                        value: Box::new([]),
                    },
                ),
                reason: "the peer's stream lost the BGP marker".into(),
            });
        }
        let len = usize::from(u16::from_be_bytes([self.rx[16], self.rx[17]]));
        if !(HEADER..=MAX_MESSAGE).contains(&len) {
            return Err(Unframed {
                notification: BgpNotificationMessage::MessageHeaderError(
                    MessageHeaderError::BadMessageLength {
                        value: u16::try_from(len).unwrap_or(0).to_be_bytes().into(),
                    },
                ),
                reason: format!("the peer sent a message of length {len}"),
            });
        }
        if self.rx.len() < len {
            return Ok(None);
        }
        let kind = self.rx[18];
        // The decoder sees exactly one message: whatever it makes of it, the next one starts
        // where the header says.
        let mut one = self.rx.split_to(len);
        match self.codec.decode(&mut one) {
            Ok(Some((msg, _ignored))) => Ok(Some(Frame::Message(msg))),
            Ok(None) => Err(Unframed {
                notification: BgpNotificationMessage::MessageHeaderError(
                    MessageHeaderError::BadMessageLength {
                        value: u16::try_from(len).unwrap_or(0).to_be_bytes().into(),
                    },
                ),
                reason: "the BGP decoder wanted more than a whole message".into(),
            }),
            Err(e) if kind == 2 => Ok(Some(Frame::MalformedUpdate(e.to_string()))),
            Err(e) => Err(Unframed {
                notification: BgpNotificationMessage::MessageHeaderError(
                    MessageHeaderError::Unspecific {
                        value: Box::new([]),
                    },
                ),
                reason: format!("the peer sent a malformed message: {e}"),
            }),
        }
    }
}

impl Conn {
    async fn send(&mut self, msg: BgpMessage) -> Result<(), String> {
        self.tx.clear();
        self.codec
            .encode(msg, &mut self.tx)
            .map_err(|e| format!("encoding a message: {e:?}"))?;
        self.stream
            .write_all(&self.tx)
            .await
            .map_err(|e| format!("sending: {e}"))
    }

    /// Sends a NOTIFICATION (best effort: the session ends anyway).
    async fn notify(&mut self, n: BgpNotificationMessage) {
        let _ = timeout(STOP_FLUSH, self.send(BgpMessage::Notification(n))).await;
    }

    /// Reads the next message. A framing error has already been answered with a NOTIFICATION
    /// when this returns `Err`.
    async fn read(&mut self) -> Result<Frame, String> {
        loop {
            match self.inbound.next_frame() {
                Ok(Some(frame)) => return Ok(frame),
                Ok(None) => {}
                Err(bad) => {
                    self.notify(bad.notification).await;
                    return Err(bad.reason);
                }
            }
            let n = self
                .stream
                .read_buf(self.inbound.buffer())
                .await
                .map_err(|e| format!("receiving: {e}"))?;
            if n == 0 {
                return Err("the peer closed the connection".into());
            }
        }
    }
}

/// The address families both sides may use on a session (RFC 4760: a speaker sends only what
/// the peer's multiprotocol capabilities list; none listed means IPv4 unicast alone).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Families {
    pub ipv4: bool,
    pub ipv6: bool,
}

impl Families {
    pub fn of(open: &netgauze_bgp_pkt::open::BgpOpenMessage) -> Families {
        use netgauze_bgp_pkt::capabilities::BgpCapability;
        use netgauze_iana::address_family::AddressType;
        let mp: Vec<AddressType> = open
            .capabilities()
            .iter()
            .filter_map(|c| match c {
                BgpCapability::MultiProtocolExtensions(m) => Some(m.address_type()),
                _ => None,
            })
            .collect();
        if mp.is_empty() {
            return Families {
                ipv4: true,
                ipv6: false,
            };
        }
        Families {
            ipv4: mp.contains(&AddressType::Ipv4Unicast),
            ipv6: mp.contains(&AddressType::Ipv6Unicast),
        }
    }

    fn has(self, vip: IpAddr) -> bool {
        if vip.is_ipv4() { self.ipv4 } else { self.ipv6 }
    }
}

/// The next hops of this session: configured, or the session's own local address.
fn attributes(peer: &Peer, local: IpAddr) -> Attributes {
    let (v4, v6): (Option<Ipv4Addr>, Option<Ipv6Addr>) = match local {
        IpAddr::V4(a) => (Some(a), None),
        IpAddr::V6(a) => (a.to_ipv4_mapped(), Some(a)),
    };
    Attributes {
        local_asn: peer.local_asn,
        peer_asn: peer.config.asn,
        communities: peer.communities.clone(),
        next_hop_v4: peer.config.next_hop_v4.or(v4),
        next_hop_v6: peer.config.next_hop_v6.or(v6),
    }
}

fn describe(n: &BgpNotificationMessage) -> String {
    format!("the peer sent a NOTIFICATION: {n:?}")
}

/// A TCP connection to `peer`, signed with its password if it has one.
async fn connect(peer: &Peer) -> std::io::Result<TcpStream> {
    let addr = peer.addr();
    let Some(lb_model::Password(key)) = &peer.config.password else {
        return TcpStream::connect(addr).await;
    };
    let socket = if addr.is_ipv4() {
        TcpSocket::new_v4()?
    } else {
        TcpSocket::new_v6()?
    };
    super::md5::set_key(&socket, addr, key.as_bytes())
        .map_err(|e| std::io::Error::new(e.kind(), format!("TCP MD5 key: {e}")))?;
    socket.connect(addr).await
}

async fn session(
    peer: &Peer,
    mut routes: watch::Receiver<Routes>,
    status: &Mutex<PeerStatus>,
    mut stop: watch::Receiver<bool>,
) -> Ended {
    update(status, |s| s.state = State::Connect);
    let stream = tokio::select! {
        c = timeout(CONNECT_TIMEOUT, connect(peer)) => match c {
            Ok(Ok(s)) => s,
            Ok(Err(e)) => return failed(format!("connect: {e}"), false),
            Err(_) => return failed(format!("connect: no answer within {CONNECT_TIMEOUT:?}"), false),
        },
        () = stopped(&mut stop) => return Ended::Stopped,
    };
    let _ = stream.set_nodelay(true);
    let local = match stream.local_addr() {
        Ok(a) => a.ip(),
        Err(e) => return failed(format!("local address: {e}"), false),
    };
    let mut conn = Conn {
        stream,
        codec: BgpCodec::new(true),
        inbound: Inbound::new(),
        tx: BytesMut::with_capacity(MAX_MESSAGE),
    };
    let (negotiated, families) = tokio::select! {
        n = open_exchange(peer, &mut conn, status) => match n {
            Ok(n) => n,
            Err(reason) => return failed(reason, false),
        },
        () = stopped(&mut stop) => {
            let _ = timeout(STOP_FLUSH, conn.send(messages::cease("shutting down"))).await;
            return Ended::Stopped;
        }
    };
    let attrs = attributes(peer, local);
    info!(peer = %peer.addr(), peer_id = %negotiated.peer_id, hold_time = negotiated.hold_time, ?families, "BGP session established");
    update(status, |s| {
        s.state = State::Established;
        s.established_at = Some(Instant::now());
        s.established_total += 1;
        s.last_error = None;
    });
    let session = Session {
        negotiated,
        families,
        attrs,
    };
    let mut bfd = start_bfd(peer, local);
    update(status, |s| s.bfd = bfd.as_ref().map(BfdSession::watch));
    let ended = established(
        peer,
        &mut conn,
        &session,
        &mut routes,
        status,
        &mut stop,
        bfd.as_mut(),
    )
    .await;
    update(status, |s| s.bfd = None);
    match ended {
        Ok(()) => {
            if let Some(b) = bfd {
                b.stop().await;
            }
            Ended::Stopped
        }
        Err(reason) => failed(reason, true),
    }
}

/// The BFD session of an established BGP session, if the peer has `bfd` set. A BFD socket that
/// cannot open leaves the BGP session without BFD (it still has the hold timer), loudly.
fn start_bfd(peer: &Peer, local: IpAddr) -> Option<BfdSession> {
    let (endpoint, cfg) = (peer.bfd.as_ref()?, peer.config.bfd?);
    let timers = Timers {
        min_tx: Duration::from_millis(u64::from(cfg.min_tx_ms)),
        min_rx: Duration::from_millis(u64::from(cfg.min_rx_ms)),
        multiplier: cfg.multiplier,
    };
    match endpoint.session(local, peer.config.address, timers) {
        Ok(s) => Some(s),
        Err(e) => {
            warn!(peer = %peer.addr(), "BFD: cannot open its sockets ({e}); the session runs without BFD");
            None
        }
    }
}

/// Resolves when BFD takes the session down (never without BFD).
async fn bfd_failed(bfd: Option<&mut BfdSession>) {
    match bfd {
        Some(b) => b.failed().await,
        None => std::future::pending().await,
    }
}

/// OPEN both ways, then the first KEEPALIVE.
async fn open_exchange(
    peer: &Peer,
    conn: &mut Conn,
    status: &Mutex<PeerStatus>,
) -> Result<(Negotiated, Families), String> {
    conn.send(messages::open(
        peer.local_asn,
        peer.hold_time,
        peer.router_id,
    ))
    .await?;
    update(status, |s| s.state = State::OpenSent);
    let negotiated = match timeout(OPEN_TIMEOUT, conn.read()).await {
        Err(_) => return Err(format!("no OPEN within {OPEN_TIMEOUT:?}")),
        Ok(Err(e)) => return Err(e),
        Ok(Ok(Frame::Message(BgpMessage::Open(open)))) => {
            match messages::check_open(&open, peer.config.asn, peer.router_id, peer.hold_time) {
                Ok(n) => (n, Families::of(&open)),
                Err(refused) => {
                    conn.notify(refused.notification).await;
                    return Err(format!("refused the peer's OPEN: {}", refused.reason));
                }
            }
        }
        Ok(Ok(Frame::Message(BgpMessage::Notification(n)))) => return Err(describe(&n)),
        Ok(Ok(other)) => {
            conn.notify(BgpNotificationMessage::FiniteStateMachineError(
                FiniteStateMachineError::ReceiveUnexpectedMessageInOpenSentState {
                    value: Box::new([]),
                },
            ))
            .await;
            return Err(format!("expected OPEN, got {}", kind(&other)));
        }
    };
    conn.send(BgpMessage::KeepAlive).await?;
    update(status, |s| s.state = State::OpenConfirm);
    let wait = if negotiated.0.hold_time == 0 {
        OPEN_TIMEOUT
    } else {
        Duration::from_secs(u64::from(negotiated.0.hold_time))
    };
    match timeout(wait, conn.read()).await {
        Err(_) => Err(format!("no KEEPALIVE within {wait:?} after the OPENs")),
        Ok(Err(e)) => Err(e),
        Ok(Ok(Frame::Message(BgpMessage::KeepAlive))) => Ok(negotiated),
        Ok(Ok(Frame::Message(BgpMessage::Notification(n)))) => Err(describe(&n)),
        Ok(Ok(other)) => {
            conn.notify(BgpNotificationMessage::FiniteStateMachineError(
                FiniteStateMachineError::ReceiveUnexpectedMessageInOpenConfirmState {
                    value: Box::new([]),
                },
            ))
            .await;
            Err(format!("expected KEEPALIVE, got {}", kind(&other)))
        }
    }
}

fn kind(r: &Frame) -> &'static str {
    match r {
        Frame::Message(BgpMessage::Open(_)) => "OPEN",
        Frame::Message(BgpMessage::Update(_)) | Frame::MalformedUpdate(_) => "UPDATE",
        Frame::Message(BgpMessage::Notification(_)) => "NOTIFICATION",
        Frame::Message(BgpMessage::KeepAlive) => "KEEPALIVE",
        Frame::Message(BgpMessage::RouteRefresh(_)) => "ROUTE-REFRESH",
    }
}

/// Sends what changes between `announced` and `wanted`: withdrawals first, then announcements.
async fn sync(
    conn: &mut Conn,
    session: &Session,
    announced: &mut Routes,
    wanted: &Routes,
    status: &Mutex<PeerStatus>,
) -> Result<(), String> {
    let gone: Vec<IpAddr> = announced
        .keys()
        .filter(|vip| !wanted.contains_key(vip))
        .copied()
        .collect();
    for vip in gone {
        if let Some(msg) = messages::withdraw(vip) {
            conn.send(msg).await?;
        }
        announced.remove(&vip);
    }
    for (vip, route) in wanted {
        if announced.get(vip) == Some(route) {
            continue;
        }
        if !session.families.has(*vip) {
            warn!("BGP: not announcing {vip}: the peer did not offer its address family");
            update(status, |s| s.unannounceable += 1);
            continue;
        }
        match messages::announce(route, &session.attrs) {
            Ok(msg) => {
                conn.send(msg).await?;
                announced.insert(*vip, route.clone());
            }
            Err(e) => {
                // Counted once per change of the route set, not per retry.
                warn!("BGP: not announcing {e}");
                update(status, |s| s.unannounceable += 1);
            }
        }
    }
    let n = announced.len();
    update(status, |s| s.announced = n);
    Ok(())
}

/// What an established session announces with.
struct Session {
    negotiated: Negotiated,
    families: Families,
    attrs: Attributes,
}

async fn established(
    peer: &Peer,
    conn: &mut Conn,
    session: &Session,
    routes: &mut watch::Receiver<Routes>,
    status: &Mutex<PeerStatus>,
    stop: &mut watch::Receiver<bool>,
    mut bfd: Option<&mut BfdSession>,
) -> Result<(), String> {
    let mut announced = Routes::new();
    let wanted = routes.borrow_and_update().clone();
    sync(conn, session, &mut announced, &wanted, status).await?;
    let [eor_v4, eor_v6] = messages::end_of_rib();
    for (eor, family) in [
        (eor_v4, session.families.ipv4),
        (eor_v6, session.families.ipv6),
    ] {
        if family {
            conn.send(eor).await?;
        }
    }
    let hold = Duration::from_secs(u64::from(session.negotiated.hold_time));
    let keepalive = hold / 3;
    // Hold time 0: no keepalives, no hold timer (RFC 4271 4.4).
    let timers = !hold.is_zero();
    let mut heard = Instant::now();
    let mut next_keepalive = Instant::now() + keepalive;
    loop {
        let hold_deadline = heard + hold;
        tokio::select! {
            biased;
            () = stopped(stop) => {
                let _ = timeout(STOP_FLUSH, async {
                    sync(conn, session, &mut announced, &Routes::new(), status).await?;
                    conn.send(messages::cease("lb-daemon shutting down")).await
                }).await;
                let _ = conn.stream.shutdown().await;
                info!(peer = %peer.addr(), "BGP session closed: routes withdrawn, Cease sent");
                return Ok(());
            }
            () = bfd_failed(bfd.as_deref_mut()) => {
                conn.notify(BgpNotificationMessage::CeaseError(
                    netgauze_bgp_pkt::notification::CeaseError::OtherConfigurationChange { value: Box::new([]) },
                )).await;
                return Err("BFD took the session down (the peer went silent or down)".into());
            }
            changed = routes.changed() => {
                if changed.is_err() {
                    return Err("the route source ended".into());
                }
                let wanted = routes.borrow_and_update().clone();
                sync(conn, session, &mut announced, &wanted, status).await?;
            }
            () = sleep_until(next_keepalive.into()), if timers => {
                conn.send(BgpMessage::KeepAlive).await?;
                next_keepalive = Instant::now() + keepalive;
            }
            () = sleep_until(hold_deadline.into()), if timers => {
                conn.notify(BgpNotificationMessage::HoldTimerExpiredError(
                    HoldTimerExpiredError::Unspecific { sub_code: 0, value: Box::new([]) },
                )).await;
                return Err(format!("hold timer expired: nothing from the peer for {hold:?}"));
            }
            read = conn.read() => {
                match read? {
                    Frame::Message(BgpMessage::KeepAlive) => heard = Instant::now(),
                    Frame::Message(BgpMessage::Update(_)) => {
                        heard = Instant::now();
                        update(status, |s| s.updates_received += 1);
                    }
                    Frame::MalformedUpdate(e) => {
                        heard = Instant::now();
                        tracing::debug!(peer = %peer.addr(), "ignored a malformed UPDATE: {e}");
                        update(status, |s| s.malformed_updates += 1);
                    }
                    Frame::Message(BgpMessage::RouteRefresh(_)) => {
                        heard = Instant::now();
                        let wanted = std::mem::take(&mut announced);
                        sync(conn, session, &mut announced, &wanted, status).await?;
                    }
                    Frame::Message(BgpMessage::Notification(n)) => return Err(describe(&n)),
                    Frame::Message(BgpMessage::Open(_)) => {
                        conn.notify(BgpNotificationMessage::FiniteStateMachineError(
                            FiniteStateMachineError::ReceiveUnexpectedMessageInEstablishedState {
                                value: Box::new([]),
                            },
                        )).await;
                        return Err("the peer sent an OPEN on an established session".into());
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests;
