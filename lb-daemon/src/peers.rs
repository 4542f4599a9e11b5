//! Peer liveness between the engines of a virtual service, independent of the controller.
//!
//! Every engine with `[peers]` listens on UDP `peers.port` and, every `interval_ms`, probes each
//! engine it shares a virtual service with (at its `engines[].address_v4`) twice:
//!
//! - a **request** its daemon answers with a **reply**. Both carry the sender's *claims*: the
//!   virtual services it is primary of, with their epochs (see [`crate::roles`]).
//! - an **echo** that the peer's XDP program turns around itself (`lb-ebpf/src/echo.rs`). A peer
//!   that echoes but does not reply has a data plane that still steers and a daemon that is down
//!   (crashed, restarting); a peer that does neither is gone (its host, its link).
//!
//! Each signal goes down after `down_after` silent intervals and up again after `up_after`
//! answers in a row. The engine acts on the [`View`]: a peer whose daemon is down gets no new flows
//! where this engine steers (its proxy cannot take them), and the roles follow ([`crate::roles`]).
//!
//! Every message: `LBP2`, kind, 3 zero bytes, the sender's engine id, its daemon epoch (when its
//! daemon started, ns since the Unix epoch, so a restarted peer is told apart), a sequence number,
//! a body, and the first 16 bytes of an HMAC-SHA256 over all that with `peers.key`. An echo reply
//! is checked as the echo its sender made (the data plane changes only the kind). Anything else is
//! refused and counted by reason. The owner queries ([`crate::owners`]) travel the same way.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use lb_common::{PEER_ECHO_LEN, PEER_KIND_ECHO, PEER_KIND_ECHO_REPLY, PEER_MAGIC};
use ring::hmac;
use tokio::{
    net::UdpSocket,
    sync::{mpsc, watch},
};
use tracing::{info, warn};

use crate::config::{Config, EngineState, PeersConfig};

pub const HEADER_LEN: usize = 28;
const MAC_LEN: usize = 16;
/// The largest message: fits an Ethernet frame with IPv4 and UDP headers.
pub const MAX_MESSAGE: usize = 1400;
/// Bytes of a message's body at most.
pub const MAX_BODY: usize = MAX_MESSAGE - HEADER_LEN - MAC_LEN;
const _: () = assert!(PEER_ECHO_LEN == HEADER_LEN + MAC_LEN);

/// What a message is.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
#[repr(u8)]
pub enum Kind {
    Request = 0,
    Reply = 1,
    Echo = PEER_KIND_ECHO,
    EchoReply = PEER_KIND_ECHO_REPLY,
    /// "Which of these flows of virtual service N are yours?" ([`crate::owners`]).
    Query = 4,
    /// "These are mine": the answer to a query, or the flows pushed to a new primary.
    Owned = 5,
    /// Source-IP persistence entries from a primary ([`crate::mirror`]).
    Persist = 6,
    /// The virtual services the sender cannot serve now (no backend up), sent with every probe.
    Health = 7,
}

impl Kind {
    pub fn of(b: u8) -> Option<Kind> {
        Some(match b {
            0 => Kind::Request,
            1 => Kind::Reply,
            PEER_KIND_ECHO => Kind::Echo,
            PEER_KIND_ECHO_REPLY => Kind::EchoReply,
            4 => Kind::Query,
            5 => Kind::Owned,
            6 => Kind::Persist,
            7 => Kind::Health,
            _ => return None,
        })
    }
}

/// An authenticated message.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Message {
    pub kind: Kind,
    pub from: u32,
    pub epoch: u64,
    pub seq: u64,
    pub body: Vec<u8>,
}

/// Why a datagram on the peer port was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Length,
    Magic,
    Kind,
    Mac,
    /// Authentic, but its body does not parse for its kind.
    Body,
    /// Authentic, from an engine this one shares no virtual service with.
    Stranger,
    /// Authentic, but the task it is for (owner queries, the persistence mirror) is behind: its
    /// queue is full.
    Busy,
}

impl Refused {
    pub const ALL: [Refused; 7] = [
        Refused::Length,
        Refused::Magic,
        Refused::Kind,
        Refused::Mac,
        Refused::Body,
        Refused::Stranger,
        Refused::Busy,
    ];

    pub fn label(self) -> &'static str {
        match self {
            Refused::Length => "length",
            Refused::Magic => "magic",
            Refused::Kind => "kind",
            Refused::Mac => "mac",
            Refused::Body => "body",
            Refused::Stranger => "stranger",
            Refused::Busy => "busy",
        }
    }
}

fn tag(key: &hmac::Key, signed: &[u8]) -> [u8; MAC_LEN] {
    let t = hmac::sign(key, signed);
    t.as_ref()[..MAC_LEN].try_into().expect("16 bytes")
}

/// The datagram of `m` (whose body is at most [`MAX_BODY`] bytes).
pub fn seal(key: &hmac::Key, m: &Message) -> Vec<u8> {
    debug_assert!(m.body.len() <= MAX_BODY);
    let mut b = Vec::with_capacity(HEADER_LEN + m.body.len() + MAC_LEN);
    b.extend_from_slice(&PEER_MAGIC);
    b.extend_from_slice(&[m.kind as u8, 0, 0, 0]);
    b.extend_from_slice(&m.from.to_be_bytes());
    b.extend_from_slice(&m.epoch.to_be_bytes());
    b.extend_from_slice(&m.seq.to_be_bytes());
    b.extend_from_slice(&m.body);
    let t = tag(key, &b);
    b.extend_from_slice(&t);
    b
}

/// Parses and authenticates a datagram.
pub fn open(key: &hmac::Key, b: &[u8]) -> Result<Message, Refused> {
    if b.len() < HEADER_LEN + MAC_LEN || b.len() > MAX_MESSAGE {
        return Err(Refused::Length);
    }
    if b[..4] != PEER_MAGIC {
        return Err(Refused::Magic);
    }
    let kind = Kind::of(b[4]).ok_or(Refused::Kind)?;
    if b[5..8] != [0, 0, 0] {
        return Err(Refused::Kind);
    }
    let (signed, mac) = b.split_at(b.len() - MAC_LEN);
    let want = if kind == Kind::EchoReply {
        // Signed by its sender as the echo it was before the data plane turned it around.
        let mut echo = signed.to_vec();
        echo[4] = Kind::Echo as u8;
        tag(key, &echo)
    } else {
        tag(key, signed)
    };
    // Constant time: ring's verify needs the full tag, ours is truncated.
    if want.iter().zip(mac).fold(0u8, |d, (x, y)| d | (x ^ y)) != 0 {
        return Err(Refused::Mac);
    }
    if matches!(kind, Kind::Echo | Kind::EchoReply) && b.len() != PEER_ECHO_LEN {
        return Err(Refused::Length);
    }
    let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    Ok(Message {
        kind,
        from: u32::from_be_bytes(b[8..12].try_into().expect("4 bytes")),
        epoch: u64_at(12),
        seq: u64_at(20),
        body: signed[HEADER_LEN..].to_vec(),
    })
}

/// A virtual service an engine says it is primary of, at an epoch.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Claim {
    pub vs_id: u32,
    pub epoch: u64,
}

const CLAIM_LEN: usize = 12;
/// Claims one message carries at most.
pub const MAX_CLAIMS: usize = MAX_BODY / CLAIM_LEN;

pub fn encode_claims(claims: &[Claim]) -> Vec<u8> {
    claims
        .iter()
        .take(MAX_CLAIMS)
        .flat_map(|c| {
            let mut b = [0u8; CLAIM_LEN];
            b[..4].copy_from_slice(&c.vs_id.to_be_bytes());
            b[4..].copy_from_slice(&c.epoch.to_be_bytes());
            b
        })
        .collect()
}

pub fn decode_claims(body: &[u8]) -> Result<Vec<Claim>, Refused> {
    if !body.len().is_multiple_of(CLAIM_LEN) {
        return Err(Refused::Body);
    }
    Ok(body
        .chunks_exact(CLAIM_LEN)
        .map(|c| Claim {
            vs_id: u32::from_be_bytes(c[..4].try_into().expect("4 bytes")),
            epoch: u64::from_be_bytes(c[4..].try_into().expect("8 bytes")),
        })
        .collect())
}

/// Virtual service ids, 4 bytes each (a [`Kind::Health`] body).
pub fn encode_ids(ids: &[u32]) -> Vec<u8> {
    ids.iter()
        .take(MAX_BODY / 4)
        .flat_map(|id| id.to_be_bytes())
        .collect()
}

pub fn decode_ids(body: &[u8]) -> Result<Vec<u32>, Refused> {
    if !body.len().is_multiple_of(4) {
        return Err(Refused::Body);
    }
    Ok(body
        .chunks_exact(4)
        .map(|c| u32::from_be_bytes(c.try_into().expect("4 bytes")))
        .collect())
}

/// What the prober works from: refreshed by every apply and every change of role.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub peers: PeersConfig,
    pub self_id: u32,
    /// Engines to probe: the active engines this one shares a virtual service with.
    pub targets: BTreeMap<u32, SocketAddr>,
    /// The virtual services this engine is primary of now.
    pub claims: Vec<Claim>,
}

impl Plan {
    pub fn of(config: &Config, claims: Vec<Claim>) -> Option<Plan> {
        let peers = config.peers.clone()?;
        let self_id = config.daemon.engine_id;
        let mut targets = BTreeMap::new();
        for vs in config
            .virtual_services
            .iter()
            .filter(|v| v.primary == self_id || v.engines.iter().any(|m| m.id == self_id))
        {
            for id in vs.succession().into_iter().filter(|id| *id != self_id) {
                let Some(e) = config.engine(id) else {
                    continue;
                };
                if let (Some(a), EngineState::Active) = (e.address_v4, e.state) {
                    targets.insert(id, SocketAddr::new(IpAddr::V4(a), peers.port));
                }
            }
        }
        Some(Plan {
            peers,
            self_id,
            targets,
            claims,
        })
    }
}

/// What this engine knows of one peer.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PeerStatus {
    /// Its daemon answers (its proxy can take flows).
    pub daemon_up: bool,
    /// Its data plane echoes (it still steers what it steered).
    pub dataplane_up: bool,
    /// What it last said it is primary of.
    pub claims: Vec<Claim>,
    /// The virtual services it last said it cannot serve (no backend up): alive, but unhealthy
    /// there.
    pub unserving: Vec<u32>,
}

impl PeerStatus {
    /// Neither its daemon nor its data plane answers: the host or its link is gone.
    pub fn gone(&self) -> bool {
        !self.daemon_up && !self.dataplane_up
    }
}

/// Every probed peer's status, published on each change.
pub type View = BTreeMap<u32, PeerStatus>;

/// Counters of the peer protocol (the failover metrics list them).
#[derive(Debug, Default)]
pub struct PeerCounters {
    pub sent: AtomicU64,
    pub echoes_sent: AtomicU64,
    pub answered: AtomicU64,
    pub replies: AtomicU64,
    pub echo_replies: AtomicU64,
    pub refused: [AtomicU64; Refused::ALL.len()],
    pub downs: AtomicU64,
    pub ups: AtomicU64,
    pub dataplane_downs: AtomicU64,
    pub dataplane_ups: AtomicU64,
}

impl PeerCounters {
    pub fn refuse(&self, why: Refused) {
        self.refused[why as usize].fetch_add(1, Ordering::Relaxed);
    }
}

/// Sends messages to peers on the peer socket (for [`crate::owners`]).
#[derive(Clone)]
pub struct Sender {
    sock: Arc<UdpSocket>,
    key: hmac::Key,
    self_id: u32,
    epoch: u64,
}

impl Sender {
    pub fn self_id(&self) -> u32 {
        self.self_id
    }

    pub async fn send(&self, to: SocketAddr, kind: Kind, seq: u64, body: Vec<u8>) {
        let m = Message {
            kind,
            from: self.self_id,
            epoch: self.epoch,
            seq,
            body,
        };
        let _ = self.sock.send_to(&seal(&self.key, &m), to).await;
    }
}

/// A message for [`crate::owners`], with where it came from.
#[derive(Debug)]
pub struct Incoming {
    pub from_addr: SocketAddr,
    pub message: Message,
}

/// One signal of a peer (its daemon's replies, or its data plane's echoes).
#[derive(Debug)]
struct Signal {
    up: bool,
    last: Instant,
    /// Answers in a row while down.
    streak: u32,
}

impl Signal {
    fn new(now: Instant) -> Signal {
        Signal {
            up: true,
            last: now,
            streak: 0,
        }
    }

    /// An answer: true if this brings the signal up.
    fn heard(&mut self, now: Instant, up_after: u32) -> bool {
        self.last = now;
        if self.up {
            return false;
        }
        self.streak += 1;
        if self.streak >= up_after {
            self.up = true;
            return true;
        }
        false
    }

    /// A tick: true if the signal just went down.
    fn tick(&mut self, now: Instant, interval: Duration, allowance: Duration) -> bool {
        let silent = now.saturating_duration_since(self.last);
        if self.up && silent > allowance {
            self.up = false;
            self.streak = 0;
            return true;
        }
        if !self.up && silent > interval * 2 {
            self.streak = 0;
        }
        false
    }
}

struct Peer {
    addr: SocketAddr,
    daemon: Signal,
    dataplane: Signal,
    claims: Vec<Claim>,
    unserving: Vec<u32>,
    epoch: Option<u64>,
}

impl Peer {
    fn status(&self) -> PeerStatus {
        PeerStatus {
            daemon_up: self.daemon.up,
            dataplane_up: self.dataplane.up,
            claims: self.claims.clone(),
            unserving: self.unserving.clone(),
        }
    }
}

/// The ends of the peer task.
pub struct Channels {
    pub plan: watch::Receiver<Option<Plan>>,
    pub view: watch::Sender<View>,
    /// Queries and owned-flow lists go here.
    pub owners: mpsc::Sender<Incoming>,
    /// Persistence entries go here.
    pub mirror: mpsc::Sender<Incoming>,
    /// The sender, once the socket is bound.
    pub sender: watch::Sender<Option<Sender>>,
    /// The virtual services this engine cannot serve now, asked on every probe round.
    pub unserving: Arc<dyn Fn() -> Vec<u32> + Send + Sync>,
}

/// This daemon's epoch: when it started.
pub fn daemon_epoch() -> u64 {
    u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    )
    .unwrap_or(0)
}

/// Probes and answers until the plan channel closes. The socket is bound on the first plan's port;
/// a later change of `peers.port` takes a restart.
#[allow(clippy::too_many_lines)]
pub async fn run(mut ch: Channels, counters: Arc<PeerCounters>) {
    let epoch = daemon_epoch();
    let mut bound: Option<(u16, Arc<UdpSocket>)> = None;
    let mut peers: BTreeMap<u32, Peer> = BTreeMap::new();
    let mut seq = 0u64;
    let mut buf = vec![0u8; 2048];
    loop {
        let Some(p) = ch.plan.borrow_and_update().clone() else {
            if ch.plan.changed().await.is_err() {
                return;
            }
            continue;
        };
        let Some(raw) = p.peers.key_bytes() else {
            return;
        };
        let key = hmac::Key::new(hmac::HMAC_SHA256, &raw);
        match &bound {
            Some((port, _)) if *port != p.peers.port => {
                warn!(
                    bound = port,
                    wanted = p.peers.port,
                    "peers.port changed: the new port takes effect at a restart"
                );
            }
            Some(_) => {}
            None => match UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], p.peers.port))).await {
                Ok(s) => {
                    let s = Arc::new(s);
                    bound = Some((p.peers.port, s.clone()));
                }
                Err(e) => {
                    warn!(port = p.peers.port, "peer probes: cannot bind: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            },
        }
        let sock = bound.as_ref().expect("bound above").1.clone();
        ch.sender.send_replace(Some(Sender {
            sock: sock.clone(),
            key: key.clone(),
            self_id: p.self_id,
            epoch,
        }));
        let now = Instant::now();
        peers.retain(|id, _| p.targets.contains_key(id));
        for (id, addr) in &p.targets {
            let peer = peers.entry(*id).or_insert(Peer {
                addr: *addr,
                daemon: Signal::new(now),
                dataplane: Signal::new(now),
                claims: Vec::new(),
                unserving: Vec::new(),
                epoch: None,
            });
            peer.addr = *addr;
        }
        let publish = |peers: &BTreeMap<u32, Peer>, view: &watch::Sender<View>| {
            let v: View = peers.iter().map(|(id, p)| (*id, p.status())).collect();
            view.send_if_modified(|old| {
                if *old == v {
                    return false;
                }
                *old = v;
                true
            });
        };
        publish(&peers, &ch.view);
        let claims = encode_claims(&p.claims);
        let interval = Duration::from_millis(u64::from(p.peers.interval_ms));
        let allowance = interval * p.peers.down_after;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = ch.plan.changed() => {
                    if changed.is_err() { return; }
                    break;
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    let mut changed = false;
                    let health = encode_ids(&(ch.unserving)());
                    for (id, peer) in &mut peers {
                        seq += 1;
                        let request = seal(&key, &Message { kind: Kind::Request, from: p.self_id, epoch, seq, body: claims.clone() });
                        if sock.send_to(&request, peer.addr).await.is_ok() {
                            counters.sent.fetch_add(1, Ordering::Relaxed);
                        }
                        let echo = seal(&key, &Message { kind: Kind::Echo, from: p.self_id, epoch, seq, body: Vec::new() });
                        if sock.send_to(&echo, peer.addr).await.is_ok() {
                            counters.echoes_sent.fetch_add(1, Ordering::Relaxed);
                        }
                        let status = seal(&key, &Message { kind: Kind::Health, from: p.self_id, epoch, seq, body: health.clone() });
                        let _ = sock.send_to(&status, peer.addr).await;
                        if peer.daemon.tick(now, interval, allowance) {
                            counters.downs.fetch_add(1, Ordering::Relaxed);
                            warn!(engine = id, dataplane_up = peer.dataplane.up, "peer daemon down: no probe answered");
                            changed = true;
                        }
                        if peer.dataplane.tick(now, interval, allowance) {
                            counters.dataplane_downs.fetch_add(1, Ordering::Relaxed);
                            warn!(engine = id, "peer data plane down: no echo came back");
                            changed = true;
                        }
                    }
                    if changed {
                        publish(&peers, &ch.view);
                    }
                }
                r = sock.recv_from(&mut buf) => {
                    let Ok((n, from)) = r else { continue };
                    let m = match open(&key, &buf[..n]) {
                        Ok(m) => m,
                        Err(why) => {
                            counters.refuse(why);
                            continue;
                        }
                    };
                    let now = Instant::now();
                    match m.kind {
                        // A stray echo reached the daemon: this host's data plane is not attached.
                        // Answering it would pass the daemon off as the data plane.
                        Kind::Echo => {}
                        Kind::Query | Kind::Owned => {
                            if !peers.contains_key(&m.from) {
                                counters.refuse(Refused::Stranger);
                                continue;
                            }
                            if ch.owners.try_send(Incoming { from_addr: from, message: m }).is_err() {
                                counters.refuse(Refused::Busy);
                            }
                        }
                        Kind::Persist => {
                            if !peers.contains_key(&m.from) {
                                counters.refuse(Refused::Stranger);
                                continue;
                            }
                            if ch.mirror.try_send(Incoming { from_addr: from, message: m }).is_err() {
                                counters.refuse(Refused::Busy);
                            }
                        }
                        Kind::Health => {
                            let Ok(ids) = decode_ids(&m.body) else {
                                counters.refuse(Refused::Body);
                                continue;
                            };
                            let Some(peer) = peers.get_mut(&m.from) else {
                                counters.refuse(Refused::Stranger);
                                continue;
                            };
                            if peer.unserving != ids {
                                info!(engine = m.from, cannot_serve = ?ids, "peer's health changed");
                                peer.unserving = ids;
                                publish(&peers, &ch.view);
                            }
                        }
                        Kind::EchoReply => {
                            // Our own echo, turned around by the peer's data plane: the peer is
                            // who it came back from.
                            let peer = peers.iter_mut().find(|(_, p)| p.addr == from);
                            let (Some((&id, peer)), true) = (peer, m.from == p.self_id) else {
                                counters.refuse(Refused::Stranger);
                                continue;
                            };
                            counters.echo_replies.fetch_add(1, Ordering::Relaxed);
                            if peer.dataplane.heard(now, p.peers.up_after) {
                                counters.dataplane_ups.fetch_add(1, Ordering::Relaxed);
                                info!(engine = id, "peer data plane up: echoes again");
                                publish(&peers, &ch.view);
                            }
                        }
                        Kind::Request | Kind::Reply => {
                            let Ok(their_claims) = decode_claims(&m.body) else {
                                counters.refuse(Refused::Body);
                                continue;
                            };
                            let Some(peer) = peers.get_mut(&m.from) else {
                                counters.refuse(Refused::Stranger);
                                continue;
                            };
                            if m.kind == Kind::Request {
                                let answer = seal(&key, &Message { kind: Kind::Reply, from: p.self_id, epoch, seq: m.seq, body: claims.clone() });
                                if sock.send_to(&answer, from).await.is_ok() {
                                    counters.answered.fetch_add(1, Ordering::Relaxed);
                                }
                            } else {
                                counters.replies.fetch_add(1, Ordering::Relaxed);
                            }
                            if peer.epoch.is_some_and(|e| e != m.epoch) {
                                info!(engine = m.from, "peer restarted (new epoch)");
                            }
                            peer.epoch = Some(m.epoch);
                            let mut changed = peer.claims != their_claims;
                            peer.claims = their_claims;
                            if peer.daemon.heard(now, p.peers.up_after) {
                                counters.ups.fetch_add(1, Ordering::Relaxed);
                                info!(engine = m.from, "peer daemon up: answers probes again");
                                changed = true;
                            }
                            if changed {
                                publish(&peers, &ch.view);
                            }
                        }
                    }
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(b: u8) -> hmac::Key {
        hmac::Key::new(hmac::HMAC_SHA256, &[b; 32])
    }

    fn msg(kind: Kind, body: Vec<u8>) -> Message {
        Message {
            kind,
            from: 7,
            epoch: 1_700_000_000_000_000_000,
            seq: 42,
            body,
        }
    }

    #[test]
    fn messages_round_trip_and_forgeries_are_refused() {
        let claims = [Claim { vs_id: 3, epoch: 9 }, Claim { vs_id: 4, epoch: 0 }];
        let m = msg(Kind::Reply, encode_claims(&claims));
        let b = seal(&key(1), &m);
        assert_eq!(b.len(), HEADER_LEN + 24 + MAC_LEN);
        let opened = open(&key(1), &b).unwrap();
        assert_eq!(opened, m);
        assert_eq!(decode_claims(&opened.body).unwrap(), claims);
        assert_eq!(open(&key(2), &b), Err(Refused::Mac), "another key");
        let mut tampered = b.clone();
        tampered[11] ^= 1;
        assert_eq!(
            open(&key(1), &tampered),
            Err(Refused::Mac),
            "the sender changed"
        );
        let mut claim_changed = b.clone();
        claim_changed[HEADER_LEN + 11] ^= 1;
        assert_eq!(
            open(&key(1), &claim_changed),
            Err(Refused::Mac),
            "an epoch changed"
        );
        assert_eq!(open(&key(1), &b[..43]), Err(Refused::Length));
        assert_eq!(open(&key(1), &vec![0u8; 1401]), Err(Refused::Length));
        let mut magic = b.clone();
        magic[0] = b'X';
        assert_eq!(open(&key(1), &magic), Err(Refused::Magic));
        let mut kind = b.clone();
        kind[4] = 9;
        assert_eq!(open(&key(1), &kind), Err(Refused::Kind));
        let mut pad = b.clone();
        pad[6] = 1;
        assert_eq!(open(&key(1), &pad), Err(Refused::Kind));
        assert_eq!(decode_claims(&[0u8; 13]), Err(Refused::Body));
        assert_eq!(
            decode_ids(&encode_ids(&[0, 7, u32::MAX])),
            Ok(vec![0, 7, u32::MAX])
        );
        assert_eq!(decode_ids(&[0u8; 6]), Err(Refused::Body));
    }

    #[test]
    fn an_echo_turned_around_by_the_data_plane_authenticates_as_a_reply() {
        let b = seal(&key(1), &msg(Kind::Echo, Vec::new()));
        assert_eq!(b.len(), PEER_ECHO_LEN, "the size the data plane answers");
        let mut turned = b.clone();
        turned[4] = PEER_KIND_ECHO_REPLY;
        let m = open(&key(1), &turned).unwrap();
        assert_eq!((m.kind, m.seq), (Kind::EchoReply, 42));
        // An echo reply made up by someone without the key.
        let mut forged = turned.clone();
        forged[20..28].copy_from_slice(&43u64.to_be_bytes());
        assert_eq!(open(&key(1), &forged), Err(Refused::Mac));
        // An echo with a body is not one the data plane answers, nor one we make.
        let long = seal(&key(1), &msg(Kind::Echo, vec![0; 12]));
        assert_eq!(open(&key(1), &long), Err(Refused::Length));
    }

    #[test]
    fn the_plan_probes_every_engine_sharing_a_service() {
        let text = r#"
[daemon]
interface = "eth0"
engine_id = 1

[peers]
key = "00112233445566778899aabbccddeeff"

[[engines]]
id = 1

[[engines]]
id = 2
mac = "02:00:00:00:00:02"
address_v4 = "10.0.0.2"

[[engines]]
id = 3
mac = "02:00:00:00:00:03"
address_v4 = "10.0.0.3"
state = "down"

[[engines]]
id = 4
mac = "02:00:00:00:00:04"
address_v4 = "10.0.0.4"

[[engines]]
id = 5
mac = "02:00:00:00:00:05"
address_v4 = "10.0.0.5"

[[virtual_services]]
id = 0
name = "web"
vip = "10.100.0.10"
port = 80
protocol = "tcp"
primary = 1
engines = [ { id = 1 }, { id = 2 }, { id = 3 } ]

[[virtual_services]]
id = 1
name = "other"
vip = "10.100.0.11"
port = 80
protocol = "tcp"
primary = 4
engines = [ { id = 4 }, { id = 1 } ]

[[virtual_services]]
id = 2
name = "elsewhere"
vip = "10.100.0.12"
port = 80
protocol = "tcp"
primary = 5
engines = [ { id = 5 } ]
"#;
        let c = Config::parse(text).unwrap();
        let plan = Plan::of(&c, Vec::new()).unwrap();
        assert_eq!(
            plan.targets.into_keys().collect::<Vec<_>>(),
            [2, 4],
            "2 and 4 (the primary of a service 1 is a secondary of); 3 is down; 5 shares nothing"
        );
        let bad = text.replace("00112233445566778899aabbccddeeff", "0011");
        assert_eq!(Config::parse(&bad).unwrap_err().field(), Some("peers.key"));
    }
}
