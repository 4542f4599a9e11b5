//! The source-IP persistence table, mirrored from a virtual service's primary to its other
//! engines, so that a promoted primary sends each persistent client to the engine it went to
//! before.
//!
//! - **The primary** scans its data plane's `PERSIST` table every [`MIRROR_INTERVAL`] and sends
//!   the other engines of each persistent service whose daemons answer what changed since the
//!   last scan: entries new or refreshed (a new flow used them), and entries gone (expired, or
//!   evicted by the LRU). Every [`FULL_EVERY`] scans, and whenever an engine joins the service's
//!   peers, it sends every live entry again, so a lost datagram or a restarted peer is repaired
//!   within that time.
//! - **The others** write what the primary they follow sends into their own `PERSIST` table,
//!   which their data plane consults only once it steers (after a promotion). Messages from an
//!   engine that is not the service's primary, or for a service this engine steers itself, are
//!   refused and counted.
//!
//! An entry travels with its **age** (milliseconds since a new flow last used it), not the
//! sender's `bpf_ktime_get_ns()`: hosts' monotonic clocks differ. The receiver writes
//! `now − age` in its own clock.
//!
//! Cost: one map walk per second on the primary (two syscalls per entry), and per changed entry
//! 24 bytes on the wire to each peer; the scan's duration is the `lb_persist_mirror_scan_seconds`
//! histogram.

use std::{
    collections::{BTreeMap, HashMap},
    path::Path,
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use aya::maps::{HashMap as BpfHashMap, Map, MapData};
use lb_common::{PersistEntry, PersistKey};
use prometheus_client::metrics::histogram::Histogram;
use tokio::sync::{mpsc, watch};
use tracing::{debug, info, warn};

use crate::{
    owners::OwnerPlan,
    peers::{Incoming, Kind, MAX_BODY, Sender},
};

/// How often the primary scans its table.
pub const MIRROR_INTERVAL: Duration = Duration::from_secs(1);
/// Every this many scans, everything is sent again.
pub const FULL_EVERY: u32 = 10;
const ENTRY_LEN: usize = 24;
/// Entries per message.
pub const ENTRIES_PER_MESSAGE: usize = (MAX_BODY - 4) / ENTRY_LEN;
const _: () = assert!(4 + ENTRIES_PER_MESSAGE * ENTRY_LEN <= MAX_BODY);
/// The age that says "gone".
const GONE: u32 = u32::MAX;

/// One mirrored entry of a virtual service.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Entry {
    /// The client's address as the data plane keys it.
    pub client_be: [u32; 4],
    pub engine_id: u32,
    /// Milliseconds since a new flow last used it; `None`: the entry is gone.
    pub age_ms: Option<u32>,
}

pub fn encode(vs_id: u32, entries: &[Entry]) -> Vec<u8> {
    let mut b = Vec::with_capacity(4 + entries.len() * ENTRY_LEN);
    b.extend_from_slice(&vs_id.to_be_bytes());
    for e in entries {
        for w in e.client_be {
            // The words hold network-order bytes already.
            b.extend_from_slice(&w.to_ne_bytes());
        }
        b.extend_from_slice(&e.engine_id.to_be_bytes());
        b.extend_from_slice(&e.age_ms.unwrap_or(GONE).to_be_bytes());
    }
    b
}

pub fn decode(body: &[u8]) -> Option<(u32, Vec<Entry>)> {
    if body.len() < 4 || !(body.len() - 4).is_multiple_of(ENTRY_LEN) {
        return None;
    }
    let u32_at = |b: &[u8], i: usize| u32::from_be_bytes(b[i..i + 4].try_into().expect("4 bytes"));
    let vs_id = u32_at(body, 0);
    let entries = body[4..]
        .chunks_exact(ENTRY_LEN)
        .map(|c| {
            let client_be = std::array::from_fn(|i| {
                u32::from_ne_bytes(c[i * 4..i * 4 + 4].try_into().expect("4 bytes"))
            });
            let age = u32_at(c, 20);
            Entry {
                client_be,
                engine_id: u32_at(c, 16),
                age_ms: (age != GONE).then_some(age),
            }
        })
        .collect();
    Some((vs_id, entries))
}

/// A persistent service this engine mirrors (it is its primary).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Mirrored {
    pub timeout_s: u32,
    /// The engines it goes to.
    pub peers: Vec<u32>,
}

/// What the primary sent last: the entries the peers hold, by their last use in this host's clock.
#[derive(Debug, Default)]
pub struct Outbox {
    sent: HashMap<PersistKey, (u32, u64)>,
    peers: BTreeMap<u32, Vec<u32>>,
    scans: u32,
}

impl Outbox {
    /// The entries to send after a scan of the table (`table`: every entry, `now_ns` in the data
    /// plane's clock), per virtual service of `services`.
    pub fn diff(
        &mut self,
        table: &[(PersistKey, PersistEntry)],
        now_ns: u64,
        services: &BTreeMap<u32, Mirrored>,
    ) -> BTreeMap<u32, Vec<Entry>> {
        let periodic = self.scans.is_multiple_of(FULL_EVERY);
        self.scans = self.scans.wrapping_add(1);
        let full: BTreeMap<u32, bool> = services
            .iter()
            .map(|(id, m)| {
                let joined = self
                    .peers
                    .get(id)
                    .is_none_or(|was| m.peers.iter().any(|p| !was.contains(p)));
                (*id, periodic || joined)
            })
            .collect();
        self.peers = services
            .iter()
            .map(|(id, m)| (*id, m.peers.clone()))
            .collect();
        let mut out: BTreeMap<u32, Vec<Entry>> = BTreeMap::new();
        let mut live: HashMap<PersistKey, (u32, u64)> = HashMap::new();
        for (k, v) in table {
            let Some(m) = services.get(&k.vs_id) else {
                continue;
            };
            let age_ns = now_ns.saturating_sub(v.last_used_ns);
            if age_ns >= u64::from(m.timeout_s) * 1_000_000_000 {
                continue;
            }
            let now_value = (v.engine_id, v.last_used_ns);
            if full[&k.vs_id] || self.sent.get(k) != Some(&now_value) {
                out.entry(k.vs_id).or_default().push(Entry {
                    client_be: k.client_be,
                    engine_id: v.engine_id,
                    age_ms: Some(u32::try_from(age_ns / 1_000_000).unwrap_or(GONE - 1)),
                });
            }
            live.insert(*k, now_value);
        }
        for (k, (engine_id, _)) in &self.sent {
            if services.contains_key(&k.vs_id) && !live.contains_key(k) {
                out.entry(k.vs_id).or_default().push(Entry {
                    client_be: k.client_be,
                    engine_id: *engine_id,
                    age_ms: None,
                });
            }
        }
        self.sent = live;
        out
    }
}

/// The mirror's counters.
#[derive(Debug)]
pub struct MirrorCounters {
    /// Entries sent (new, refreshed or repeated by a full resend).
    pub sent: AtomicU64,
    /// "Gone" entries sent.
    pub gone_sent: AtomicU64,
    /// Entries written into this engine's table from its primary's messages.
    pub written: AtomicU64,
    /// Entries removed from this engine's table on its primary's word.
    pub removed: AtomicU64,
    /// Messages refused: from an engine that is not the service's primary, for a service this
    /// engine steers or does not know, or with a malformed body.
    pub refused: AtomicU64,
    pub scan_seconds: Histogram,
}

impl Default for MirrorCounters {
    fn default() -> Self {
        MirrorCounters {
            sent: AtomicU64::new(0),
            gone_sent: AtomicU64::new(0),
            written: AtomicU64::new(0),
            removed: AtomicU64::new(0),
            refused: AtomicU64::new(0),
            scan_seconds: Histogram::new([0.0001, 0.001, 0.01, 0.05, 0.1, 0.25, 0.5, 1.0]),
        }
    }
}

/// The data plane's clock (`bpf_ktime_get_ns` is `CLOCK_MONOTONIC`).
fn ktime_ns() -> u64 {
    nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    })
}

/// A second handle on the pinned persistence table.
pub struct PersistTable(BpfHashMap<MapData, PersistKey, PersistEntry>);

impl PersistTable {
    pub fn open(pin_dir: &Path) -> anyhow::Result<PersistTable> {
        let map = Map::LruHashMap(MapData::from_pin(pin_dir.join("PERSIST"))?);
        Ok(PersistTable(BpfHashMap::try_from(map)?))
    }

    fn scan(&self, services: &BTreeMap<u32, Mirrored>) -> Vec<(PersistKey, PersistEntry)> {
        self.0
            .iter()
            .filter_map(Result::ok)
            .filter(|(k, _)| services.contains_key(&k.vs_id))
            .collect()
    }

    /// Writes `entries` of `vs_id` (aged in the sender's clock) in this host's clock:
    /// (written, removed).
    fn apply(&mut self, vs_id: u32, entries: &[Entry], now_ns: u64) -> (u64, u64) {
        let (mut written, mut removed) = (0, 0);
        for e in entries {
            let key = PersistKey {
                client_be: e.client_be,
                vs_id,
            };
            match e.age_ms {
                Some(age) => {
                    let value = PersistEntry {
                        engine_id: e.engine_id,
                        _pad: 0,
                        last_used_ns: now_ns.saturating_sub(u64::from(age) * 1_000_000),
                    };
                    if self.0.insert(key, value, 0).is_ok() {
                        written += 1;
                    }
                }
                None => {
                    if self.0.remove(&key).is_ok() {
                        removed += 1;
                    }
                }
            }
        }
        (written, removed)
    }
}

/// The task's ends.
pub struct Channels {
    pub plan: watch::Receiver<OwnerPlan>,
    pub sender: watch::Receiver<Option<Sender>>,
    pub incoming: mpsc::Receiver<Incoming>,
}

/// The persistent services this engine steers, with the engines they are mirrored to.
fn mirrored(plan: &OwnerPlan) -> BTreeMap<u32, Mirrored> {
    plan.services
        .iter()
        .filter(|(_, s)| s.primary && s.persistence_timeout_s > 0 && !s.peers.is_empty())
        .map(|(id, s)| {
            (
                *id,
                Mirrored {
                    timeout_s: s.persistence_timeout_s,
                    peers: s.peers.iter().map(|(p, _)| *p).collect(),
                },
            )
        })
        .collect()
}

/// Runs until the plan channel closes.
pub async fn run(mut ch: Channels, mut table: PersistTable, counters: Arc<MirrorCounters>) {
    let mut outbox = Outbox::default();
    let mut tick = tokio::time::interval(MIRROR_INTERVAL);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    let mut seq = 0u64;
    loop {
        tokio::select! {
            changed = ch.plan.changed() => {
                if changed.is_err() { return; }
            }
            _ = tick.tick() => {
                let plan = ch.plan.borrow().clone();
                let services = mirrored(&plan);
                if services.is_empty() {
                    outbox = Outbox::default();
                    continue;
                }
                let Some(sender) = ch.sender.borrow().clone() else { continue };
                let started = Instant::now();
                let scan = table.scan(&services);
                let diff = outbox.diff(&scan, ktime_ns(), &services);
                counters.scan_seconds.observe(started.elapsed().as_secs_f64());
                for (vs_id, entries) in diff {
                    let Some(s) = plan.services.get(&vs_id) else { continue };
                    let gone = entries.iter().filter(|e| e.age_ms.is_none()).count() as u64;
                    for chunk in entries.chunks(ENTRIES_PER_MESSAGE) {
                        seq += 1;
                        let body = encode(vs_id, chunk);
                        for (_, addr) in &s.peers {
                            sender.send(*addr, Kind::Persist, seq, body.clone()).await;
                        }
                    }
                    counters.sent.fetch_add(entries.len() as u64 - gone, Ordering::Relaxed);
                    counters.gone_sent.fetch_add(gone, Ordering::Relaxed);
                    debug!(vs_id, entries = entries.len(), gone, "persistence mirrored");
                }
            }
            Some(inc) = ch.incoming.recv() => {
                let m = inc.message;
                let Some((vs_id, entries)) = decode(&m.body) else {
                    counters.refused.fetch_add(1, Ordering::Relaxed);
                    debug!(engine = m.from, "persistence message with a malformed body");
                    continue;
                };
                let plan = ch.plan.borrow().clone();
                let accepted = plan
                    .services
                    .get(&vs_id)
                    .is_some_and(|s| !s.primary && s.primary_id == m.from && s.persistence_timeout_s > 0);
                if !accepted {
                    if counters.refused.fetch_add(1, Ordering::Relaxed) == 0 {
                        warn!(engine = m.from, vs_id, "persistence entries from an engine that is not this service's primary: refused");
                    }
                    continue;
                }
                let (written, removed) = table.apply(vs_id, &entries, ktime_ns());
                counters.written.fetch_add(written, Ordering::Relaxed);
                counters.removed.fetch_add(removed, Ordering::Relaxed);
                if written + removed > ENTRIES_PER_MESSAGE as u64 / 2 {
                    info!(engine = m.from, vs_id, written, removed, "persistence entries mirrored from the primary");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn key(last_octet: u8, vs_id: u32) -> PersistKey {
        PersistKey {
            client_be: [u32::from_ne_bytes([10, 0, 0, last_octet]), 0, 0, 0],
            vs_id,
        }
    }

    fn value(engine_id: u32, last_used_ns: u64) -> PersistEntry {
        PersistEntry {
            engine_id,
            _pad: 0,
            last_used_ns,
        }
    }

    fn services(peers: &[u32]) -> BTreeMap<u32, Mirrored> {
        BTreeMap::from([(
            7,
            Mirrored {
                timeout_s: 300,
                peers: peers.to_vec(),
            },
        )])
    }

    const S: u64 = 1_000_000_000;

    #[test]
    fn entries_round_trip_and_bad_bodies_are_refused() {
        let entries = [
            Entry {
                client_be: key(5, 7).client_be,
                engine_id: 3,
                age_ms: Some(1500),
            },
            Entry {
                client_be: [1, 2, 3, 4],
                engine_id: 2,
                age_ms: None,
            },
        ];
        let b = encode(7, &entries);
        assert_eq!(b.len(), 4 + 2 * ENTRY_LEN);
        assert_eq!(&b[4..8], &[10, 0, 0, 5], "network order on the wire");
        assert_eq!(decode(&b), Some((7, entries.to_vec())));
        assert_eq!(decode(&b[..b.len() - 1]), None);
        assert_eq!(decode(&[0, 0]), None);
        assert_eq!(decode(&7u32.to_be_bytes()), Some((7, Vec::new())));
        const { assert!(ENTRIES_PER_MESSAGE >= 50) };
    }

    #[test]
    fn the_primary_sends_what_changed_gone_entries_and_everything_now_and_then() {
        let mut o = Outbox::default();
        let s = services(&[2, 3]);
        let t0 = 1000 * S;
        let mut table = vec![(key(1, 7), value(2, t0)), (key(2, 7), value(3, t0))];
        // Another service's entries (not mirrored by this engine) stay out.
        table.push((key(9, 8), value(2, t0)));
        let first = o.diff(&table, t0 + S, &s);
        assert_eq!(first.keys().copied().collect::<Vec<_>>(), [7]);
        assert_eq!(first[&7].len(), 2, "the first scan sends everything");
        assert!(first[&7].iter().all(|e| e.age_ms == Some(1000)));

        // Nothing changed: nothing sent.
        assert!(o.diff(&table, t0 + 2 * S, &s).is_empty());

        // Client 1 made a new flow (refreshed), client 2 was evicted, client 3 is new.
        table[0].1.last_used_ns = t0 + 2 * S;
        table.remove(1);
        table.push((key(3, 7), value(2, t0 + 2 * S)));
        let d = &o.diff(&table, t0 + 3 * S, &s)[&7];
        assert_eq!(d.len(), 3);
        assert!(d.contains(&Entry {
            client_be: key(1, 7).client_be,
            engine_id: 2,
            age_ms: Some(1000)
        }));
        assert!(d.contains(&Entry {
            client_be: key(2, 7).client_be,
            engine_id: 3,
            age_ms: None
        }));
        assert!(d.contains(&Entry {
            client_be: key(3, 7).client_be,
            engine_id: 2,
            age_ms: Some(1000)
        }));

        // An entry past the timeout is gone, even while the LRU still holds it.
        let late = t0 + 2 * S + 300 * S;
        let d = &o.diff(&table[..2], late, &s)[&7];
        assert_eq!(d.len(), 2);
        assert!(d.iter().all(|e| e.age_ms.is_none()), "{d:?}");
        assert!(o.diff(&table[..2], late + S, &s).is_empty(), "said once");
    }

    #[test]
    fn a_peer_joining_and_every_tenth_scan_get_everything() {
        let mut o = Outbox::default();
        let t0 = 1000 * S;
        let table = vec![(key(1, 7), value(2, t0)), (key(2, 7), value(3, t0))];
        assert_eq!(o.diff(&table, t0, &services(&[2]))[&7].len(), 2);
        assert!(o.diff(&table, t0, &services(&[2])).is_empty());
        // Engine 3's daemon answers again: everything, to everyone.
        assert_eq!(o.diff(&table, t0, &services(&[2, 3]))[&7].len(), 2);
        // A peer leaving changes nothing.
        assert!(o.diff(&table, t0, &services(&[3])).is_empty());
        let mut resent = 0;
        for _ in 0..FULL_EVERY {
            resent += o
                .diff(&table, t0, &services(&[3]))
                .get(&7)
                .map_or(0, Vec::len);
        }
        assert_eq!(resent, 2, "one full resend in every {FULL_EVERY} scans");
    }

    #[test]
    fn a_service_this_engine_stops_steering_is_forgotten() {
        let mut o = Outbox::default();
        let t0 = 1000 * S;
        let table = vec![(key(1, 7), value(2, t0))];
        assert_eq!(o.diff(&table, t0, &services(&[2]))[&7].len(), 1);
        // Demoted: the service is no longer mirrored from here; its entries are not said gone.
        assert!(o.diff(&table, t0, &BTreeMap::new()).is_empty());
        // Promoted again: sent again in full.
        assert_eq!(o.diff(&table, t0, &services(&[2]))[&7].len(), 1);
    }
}
