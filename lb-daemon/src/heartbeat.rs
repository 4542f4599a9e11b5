//! What an engine reports in its heartbeats: host CPU (from `/proc/stat`, since the last beat), the
//! daemon's resident memory, packets per second its data plane steered (the BPF per-VS counters),
//! proxied connections open now, per pool how many backends are up, and for failover what this
//! engine claims (the virtual services it is primary of, at their epochs: the controller records
//! an engine-made promotion from them) and what its peer probes tell of every peer.

use std::{
    collections::HashMap,
    sync::{Arc, Mutex, RwLock},
    time::Instant,
};

use lb_api::v1 as pb;
use tokio::sync::watch;

use crate::{
    conntable::ConnTable,
    dataplane::Counters,
    metrics::Inventory,
    peers::{Plan, View},
};

#[derive(Default)]
struct Last {
    cpu: Option<(u64, u64)>,
    packets: Option<(u64, Instant)>,
    /// Per virtual service id: its packets at the last beat.
    vs_packets: HashMap<u32, u64>,
    /// Connections the proxy had accepted in all at the last beat.
    accepted: Option<u64>,
}

pub struct Sampler {
    counters: Arc<Counters>,
    inventory: Arc<RwLock<Inventory>>,
    conns: Arc<ConnTable>,
    /// The failover module's plan (its `claims` are this engine's) and the peer task's view.
    peers: Option<(watch::Receiver<Option<Plan>>, watch::Receiver<View>)>,
    last: Mutex<Last>,
}

/// (busy, total) jiffies of all CPUs.
fn cpu_jiffies() -> Option<(u64, u64)> {
    let stat = std::fs::read_to_string("/proc/stat").ok()?;
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, total))
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

impl Sampler {
    pub fn new(
        counters: Arc<Counters>,
        inventory: Arc<RwLock<Inventory>>,
        conns: Arc<ConnTable>,
    ) -> Self {
        Sampler {
            counters,
            inventory,
            conns,
            peers: None,
            last: Mutex::new(Last::default()),
        }
    }

    /// Heartbeats also carry this engine's claims (from the failover plan) and its peer view.
    #[must_use]
    pub fn with_peers(
        mut self,
        plan: watch::Receiver<Option<Plan>>,
        view: watch::Receiver<View>,
    ) -> Self {
        self.peers = Some((plan, view));
        self
    }

    /// (claims, peer view) as the heartbeat carries them.
    fn failover(&self) -> (Vec<pb::Claim>, Vec<pb::PeerView>) {
        let Some((plan, view)) = &self.peers else {
            return (Vec::new(), Vec::new());
        };
        let claims = plan.borrow().as_ref().map_or_else(Vec::new, |p| {
            p.claims
                .iter()
                .map(|c| pb::Claim {
                    vs_id: c.vs_id,
                    epoch: c.epoch,
                })
                .collect()
        });
        let peers = view
            .borrow()
            .iter()
            .map(|(id, s)| pb::PeerView {
                engine_id: *id,
                daemon_up: s.daemon_up,
                dataplane_up: s.dataplane_up,
            })
            .collect();
        (claims, peers)
    }

    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    pub fn sample(&self) -> pb::Heartbeat {
        let now = Instant::now();
        let inv = self
            .inventory
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let per_vs: Vec<(u32, String, u64)> = inv
            .virtual_services
            .iter()
            .filter_map(|(id, name)| Some((*id, name.clone(), self.counters.vs(*id).ok()?.packets)))
            .collect();
        let packets: u64 = per_vs.iter().map(|(_, _, p)| p).sum();
        let accepted: u64 = inv
            .services
            .iter()
            .map(|s| s.stats.total.load(std::sync::atomic::Ordering::Relaxed))
            .sum();
        let mut backends_up = HashMap::new();
        let mut backends = HashMap::new();
        for p in &inv.pools {
            let up = p
                .backends
                .iter()
                .filter(|b| b.enabled() && b.is_healthy())
                .count();
            backends_up.insert(p.name.clone(), u32::try_from(up).unwrap_or(u32::MAX));
            backends.insert(
                p.name.clone(),
                u32::try_from(p.backends.len()).unwrap_or(u32::MAX),
            );
        }
        drop(inv);
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let cpu = cpu_jiffies();
        let cpu_pct = match (last.cpu, cpu) {
            (Some((b0, t0)), Some((b1, t1))) if t1 > t0 => {
                100.0 * (b1.saturating_sub(b0)) as f64 / (t1 - t0) as f64
            }
            _ => 0.0,
        };
        let secs = last
            .packets
            .map_or(0.0, |(_, t0)| now.duration_since(t0).as_secs_f64());
        let rate = |now: u64, before: Option<u64>| match before {
            Some(b) if secs > 0.0 => now.saturating_sub(b) as f64 / secs,
            _ => 0.0,
        };
        let pps = rate(packets, last.packets.map(|(p, _)| p)) as u64;
        let vs_pps = per_vs
            .iter()
            .map(|(id, name, p)| (name.clone(), rate(*p, last.vs_packets.get(id).copied())))
            .collect();
        last.vs_packets = per_vs.iter().map(|(id, _, p)| (*id, *p)).collect();
        let new_connections_per_s = rate(accepted, last.accepted);
        last.accepted = Some(accepted);
        last.cpu = cpu;
        last.packets = Some((packets, now));
        drop(last);
        let (claims, peers) = self.failover();
        pb::Heartbeat {
            cpu_pct,
            memory_bytes: rss_bytes(),
            pps,
            connections: self.conns.len() as u64,
            backends_up,
            backends,
            claims,
            peers,
            vs_pps,
            new_connections_per_s,
        }
    }
}
