//! Peer liveness between the engines of a virtual service, independent of the controller.
//!
//! Every engine with `[peers]` answers probes on UDP `peers.port`. An engine that is the primary of a
//! virtual service probes that service's secondaries (at their `engines[].address_v4`) every
//! `interval_ms`; a secondary silent for `down_after` intervals is reported down — the engine then
//! marks it down in its data plane, so new flows re-hash to the remaining engines and nothing else
//! moves — and up again after `up_after` answers in a row. A secondary whose daemon is gone answers
//! nothing: its proxy cannot serve, so it gets no new flows within `down_after × interval` (plus one
//! interval).
//!
//! A probe is 44 bytes: `LBP1`, kind (request/reply), 3 zero bytes, the sender's engine id, its
//! epoch (when its daemon started, ns since the Unix epoch, so a restarted peer is told apart), a
//! sequence number, and the first 16 bytes of an HMAC-SHA256 over all that with `peers.key`.
//! Anything else is refused and counted by reason.

use std::{
    collections::BTreeMap,
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use ring::hmac;
use tokio::{
    net::UdpSocket,
    sync::{mpsc, watch},
};
use tracing::{info, warn};

use crate::config::{Config, EngineState, PeersConfig};

pub const PROBE_LEN: usize = 44;
const MAGIC: &[u8; 4] = b"LBP1";
const MAC_LEN: usize = 16;
const REQUEST: u8 = 0;
const REPLY: u8 = 1;

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Probe {
    pub reply: bool,
    pub from: u32,
    pub epoch: u64,
    pub seq: u64,
}

/// Why a datagram on the probe port was refused.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Refused {
    Length,
    Magic,
    Kind,
    Mac,
}

impl Refused {
    pub const ALL: [Refused; 4] = [Refused::Length, Refused::Magic, Refused::Kind, Refused::Mac];

    pub fn label(self) -> &'static str {
        match self {
            Refused::Length => "length",
            Refused::Magic => "magic",
            Refused::Kind => "kind",
            Refused::Mac => "mac",
        }
    }
}

pub fn encode(key: &hmac::Key, p: &Probe) -> [u8; PROBE_LEN] {
    let mut b = [0u8; PROBE_LEN];
    b[..4].copy_from_slice(MAGIC);
    b[4] = if p.reply { REPLY } else { REQUEST };
    b[8..12].copy_from_slice(&p.from.to_be_bytes());
    b[12..20].copy_from_slice(&p.epoch.to_be_bytes());
    b[20..28].copy_from_slice(&p.seq.to_be_bytes());
    let tag = hmac::sign(key, &b[..28]);
    b[28..].copy_from_slice(&tag.as_ref()[..MAC_LEN]);
    b
}

pub fn decode(key: &hmac::Key, b: &[u8]) -> Result<Probe, Refused> {
    if b.len() != PROBE_LEN {
        return Err(Refused::Length);
    }
    if &b[..4] != MAGIC {
        return Err(Refused::Magic);
    }
    if b[4] > REPLY || b[5..8] != [0, 0, 0] {
        return Err(Refused::Kind);
    }
    let tag = hmac::sign(key, &b[..28]);
    // Constant time: ring's verify needs the full tag, ours is truncated.
    let diff = tag.as_ref()[..MAC_LEN]
        .iter()
        .zip(&b[28..])
        .fold(0u8, |d, (x, y)| d | (x ^ y));
    if diff != 0 {
        return Err(Refused::Mac);
    }
    let u64_at = |i: usize| u64::from_be_bytes(b[i..i + 8].try_into().expect("8 bytes"));
    Ok(Probe {
        reply: b[4] == REPLY,
        from: u32::from_be_bytes(b[8..12].try_into().expect("4 bytes")),
        epoch: u64_at(12),
        seq: u64_at(20),
    })
}

/// What the prober works from: refreshed by every apply.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Plan {
    pub peers: PeersConfig,
    pub self_id: u32,
    /// Engines to probe: the active secondaries of the virtual services this engine is primary of.
    pub targets: BTreeMap<u32, SocketAddr>,
}

impl Plan {
    pub fn of(config: &Config) -> Option<Plan> {
        let peers = config.peers.clone()?;
        let self_id = config.daemon.engine_id;
        let mut targets = BTreeMap::new();
        for vs in config
            .virtual_services
            .iter()
            .filter(|v| v.primary == self_id)
        {
            for m in vs.engines.iter().filter(|m| m.id != self_id) {
                let Some(e) = config.engine(m.id) else {
                    continue;
                };
                if let (Some(a), EngineState::Active) = (e.address_v4, e.state) {
                    targets.insert(m.id, SocketAddr::new(IpAddr::V4(a), peers.port));
                }
            }
        }
        Some(Plan {
            peers,
            self_id,
            targets,
        })
    }
}

/// A peer changed state (the engine marks it in its data plane).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PeerEvent {
    Down(u32),
    Up(u32),
}

#[derive(Debug, Default)]
pub struct PeerCounters {
    pub sent: AtomicU64,
    pub answered: AtomicU64,
    pub replies: AtomicU64,
    pub refused: [AtomicU64; 4],
    pub downs: AtomicU64,
    pub ups: AtomicU64,
}

struct Peer {
    addr: SocketAddr,
    up: bool,
    last_reply: Instant,
    /// Replies in a row while down.
    streak: u32,
    epoch: Option<u64>,
}

/// Probes and answers until the plan channel closes.
#[allow(clippy::too_many_lines)]
pub async fn run(
    mut plan: watch::Receiver<Option<Plan>>,
    events: mpsc::Sender<PeerEvent>,
    counters: Arc<PeerCounters>,
) {
    let epoch = u64::try_from(
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map_or(0, |d| d.as_nanos()),
    )
    .unwrap_or(0);
    let mut socket: Option<(u16, UdpSocket)> = None;
    let mut peers: BTreeMap<u32, Peer> = BTreeMap::new();
    let mut seq = 0u64;
    let mut buf = [0u8; 512];
    loop {
        let Some(p) = plan.borrow_and_update().clone() else {
            if plan.changed().await.is_err() {
                return;
            }
            continue;
        };
        let Some(raw) = p.peers.key_bytes() else {
            return;
        };
        let key = hmac::Key::new(hmac::HMAC_SHA256, &raw);
        if socket
            .as_ref()
            .is_none_or(|(port, _)| *port != p.peers.port)
        {
            match UdpSocket::bind(SocketAddr::from(([0, 0, 0, 0], p.peers.port))).await {
                Ok(s) => socket = Some((p.peers.port, s)),
                Err(e) => {
                    warn!(port = p.peers.port, "peer probes: cannot bind: {e}");
                    tokio::time::sleep(Duration::from_secs(1)).await;
                    continue;
                }
            }
        }
        let (_, sock) = socket.as_ref().expect("bound above");
        let now = Instant::now();
        peers.retain(|id, _| p.targets.contains_key(id));
        for (id, addr) in &p.targets {
            peers.entry(*id).or_insert(Peer {
                addr: *addr,
                up: true,
                last_reply: now,
                streak: 0,
                epoch: None,
            });
        }
        let interval = Duration::from_millis(u64::from(p.peers.interval_ms));
        let allowance = interval * p.peers.down_after;
        let mut tick = tokio::time::interval(interval);
        tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        loop {
            tokio::select! {
                changed = plan.changed() => {
                    if changed.is_err() { return; }
                    break;
                }
                _ = tick.tick() => {
                    let now = Instant::now();
                    for (id, peer) in &mut peers {
                        seq += 1;
                        let probe = encode(&key, &Probe { reply: false, from: p.self_id, epoch, seq });
                        if sock.send_to(&probe, peer.addr).await.is_ok() {
                            counters.sent.fetch_add(1, Ordering::Relaxed);
                        }
                        let silent = now.saturating_duration_since(peer.last_reply);
                        if peer.up && silent > allowance {
                            peer.up = false;
                            peer.streak = 0;
                            counters.downs.fetch_add(1, Ordering::Relaxed);
                            warn!(engine = id, silent_ms = u64::try_from(silent.as_millis()).unwrap_or(u64::MAX), "peer down: no probe answered");
                            let _ = events.send(PeerEvent::Down(*id)).await;
                        } else if !peer.up && silent > interval * 2 {
                            peer.streak = 0;
                        }
                    }
                }
                r = sock.recv_from(&mut buf) => {
                    let Ok((n, from)) = r else { continue };
                    match decode(&key, &buf[..n]) {
                        Err(why) => {
                            counters.refused[why as usize].fetch_add(1, Ordering::Relaxed);
                        }
                        Ok(probe) if !probe.reply => {
                            let answer = encode(&key, &Probe { reply: true, from: p.self_id, epoch, seq: probe.seq });
                            if sock.send_to(&answer, from).await.is_ok() {
                                counters.answered.fetch_add(1, Ordering::Relaxed);
                            }
                        }
                        Ok(probe) => {
                            counters.replies.fetch_add(1, Ordering::Relaxed);
                            let Some(peer) = peers.get_mut(&probe.from) else { continue };
                            if peer.epoch.is_some_and(|e| e != probe.epoch) {
                                info!(engine = probe.from, "peer restarted (new epoch)");
                            }
                            peer.epoch = Some(probe.epoch);
                            peer.last_reply = Instant::now();
                            if !peer.up {
                                peer.streak += 1;
                                if peer.streak >= p.peers.up_after {
                                    peer.up = true;
                                    counters.ups.fetch_add(1, Ordering::Relaxed);
                                    info!(engine = probe.from, "peer up: answers probes again");
                                    let _ = events.send(PeerEvent::Up(probe.from)).await;
                                }
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

    #[test]
    fn probes_round_trip_and_forgeries_are_refused() {
        let p = Probe {
            reply: true,
            from: 7,
            epoch: 1_700_000_000_000_000_000,
            seq: 42,
        };
        let b = encode(&key(1), &p);
        assert_eq!(decode(&key(1), &b), Ok(p));
        assert_eq!(decode(&key(2), &b), Err(Refused::Mac), "another key");
        let mut tampered = b;
        tampered[11] ^= 1;
        assert_eq!(
            decode(&key(1), &tampered),
            Err(Refused::Mac),
            "the sender changed"
        );
        assert_eq!(decode(&key(1), &b[..43]), Err(Refused::Length));
        let mut magic = b;
        magic[0] = b'X';
        assert_eq!(decode(&key(1), &magic), Err(Refused::Magic));
        let mut kind = b;
        kind[4] = 9;
        assert_eq!(decode(&key(1), &kind), Err(Refused::Kind));
        assert_eq!(decode(&key(1), &[0u8; 44]), Err(Refused::Magic));
    }

    #[test]
    fn the_plan_probes_the_active_secondaries_of_services_this_engine_steers() {
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
"#;
        let c = Config::parse(text).unwrap();
        let plan = Plan::of(&c).unwrap();
        assert_eq!(
            plan.targets.into_iter().collect::<Vec<_>>(),
            [(2, "10.0.0.2:7401".parse().unwrap())],
            "only 2: 3 is down, 4 is the primary of the other service"
        );
        let bad = text.replace("00112233445566778899aabbccddeeff", "0011");
        assert_eq!(Config::parse(&bad).unwrap_err().field(), Some("peers.key"));
    }
}
