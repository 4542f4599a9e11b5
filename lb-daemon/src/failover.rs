//! Failover on this engine: the peers' view ([`crate::peers`]) and the roles ([`crate::roles`])
//! turned into the data plane's overlay, the VIP addresses and announcements
//! ([`crate::announce`]), and the owner-query task's plan ([`crate::owners`]).
//!
//! ```text
//!   peer view changes ─┐
//!   config applied ────┼─► roles.decide ─► overlay (peers down, primaries, ask-UDP) ─► maps
//!   start hold ends ───┤                 ├► VIP on the interface (primary) or lo, GARP / NA
//!   ask-UDP expires ───┘                 ├► claims in the probes, owner plan
//!   (the engines of a service scaled by BGP change: ask about unknown UDP flows for a while)
//!                                        └► a new primary elsewhere: push it our flows
//! ```

use std::{
    collections::{BTreeMap, BTreeSet},
    net::{IpAddr, SocketAddr},
    sync::{
        Arc,
        atomic::{AtomicU64, Ordering},
    },
    time::{Duration, Instant},
};

use tokio::{
    sync::{mpsc, watch},
    task::JoinHandle,
};
use tracing::{error, info, warn};

use crate::{
    announce::{self, AnnounceCounters, VipAddresses},
    config::Config,
    engine::{Engine, Overlay},
    owners::{Command, OwnerCounters, OwnerPlan, Service},
    peers::{PeerCounters, Plan, View},
    roles::{self, Change, Roles},
};

/// How long unknown UDP flows are asked about after a promotion, or after the engines of a
/// service scaled by BGP changed (the routers' next hops change with them).
pub const ASK_UDP_FOR: Duration = Duration::from_secs(10);

/// The engines of each service scaled by BGP that the routers may send its flows to: its members,
/// less those whose daemon the peer view has seen down (the BGP speaker dies or hangs with it, and
/// the routers withdraw its routes; its data plane may still answer). When this set changes (or
/// the service is new here: this engine's own announcement changes the next hops) the
/// routers' ECMP hash moves flows between engines; a moved TCP flow is asked about by its non-SYN
/// segment, a moved UDP session only while the service asks about unknown UDP flows.
pub fn bgp_next_hops(config: &Config, view: &View) -> BTreeMap<u32, BTreeSet<u32>> {
    config
        .virtual_services
        .iter()
        .filter(|vs| vs.by_bgp())
        .map(|vs| {
            let live = vs
                .engines
                .iter()
                .map(|m| m.id)
                .filter(|id| view.get(id).is_none_or(|s| s.daemon_up))
                .collect();
            (vs.id, live)
        })
        .collect()
}

/// Every failover counter, for the metrics endpoint.
#[derive(Debug, Default)]
pub struct FailoverCounters {
    pub peers: Arc<PeerCounters>,
    pub owners: Arc<OwnerCounters>,
    pub announce: Arc<AnnounceCounters>,
    pub mirror: Arc<crate::mirror::MirrorCounters>,
    pub promotions: AtomicU64,
    pub demotions: AtomicU64,
}

pub struct Failover {
    roles: Roles,
    /// Off without `[peers]`: the configuration's primaries stand.
    enabled: bool,
    view: watch::Receiver<View>,
    plan: watch::Sender<Option<Plan>>,
    owner_plan: watch::Sender<OwnerPlan>,
    commands: mpsc::Sender<Command>,
    vips: Option<VipAddresses>,
    /// The VIPs this daemon has placed: one no virtual service has any more is removed.
    placed_vips: BTreeSet<IpAddr>,
    announcing: BTreeMap<IpAddr, JoinHandle<()>>,
    /// (peer, virtual service) claims below this engine's epoch already answered with announcements.
    stale_claims: BTreeSet<(u32, u32)>,
    ask_udp: BTreeMap<u32, Instant>,
    /// [`bgp_next_hops`] at the last refresh.
    bgp_next_hops: BTreeMap<u32, BTreeSet<u32>>,
    hold_until: Option<Instant>,
    counters: Arc<FailoverCounters>,
}

/// The channels [`Failover`] drives.
pub struct Ends {
    pub view: watch::Receiver<View>,
    pub plan: watch::Sender<Option<Plan>>,
    pub owner_plan: watch::Sender<OwnerPlan>,
    pub commands: mpsc::Sender<Command>,
}

impl Failover {
    pub async fn new(engine: &Engine, ends: Ends, counters: Arc<FailoverCounters>) -> Failover {
        let config = engine.config();
        let d = &config.daemon;
        let adopted = engine.dataplane().adopted();
        let roles = Roles::new(
            d.engine_id,
            Some(roles::file_of(&d.state_dir, d.engine_id)),
            adopted,
        );
        let hold_until = (!adopted).then(|| {
            let (interval, down_after) = config
                .peers
                .as_ref()
                .map_or((50, 3), |p| (p.interval_ms, p.down_after));
            Instant::now() + Duration::from_millis(u64::from(interval) * u64::from(down_after + 2))
        });
        let vips = if d.manage_vip_addresses {
            match VipAddresses::new(&d.interface).await {
                Ok(v) => Some(v),
                Err(e) => {
                    error!(
                        "managing the VIP addresses: {e}; this engine will not take or give up VIPs"
                    );
                    None
                }
            }
        } else {
            None
        };
        Failover {
            roles,
            enabled: config.peers.is_some(),
            view: ends.view,
            plan: ends.plan,
            owner_plan: ends.owner_plan,
            commands: ends.commands,
            vips,
            placed_vips: BTreeSet::new(),
            announcing: BTreeMap::new(),
            stale_claims: BTreeSet::new(),
            ask_udp: BTreeMap::new(),
            bgp_next_hops: BTreeMap::new(),
            hold_until,
            counters,
        }
    }

    /// When the next timer is due (the start hold, an ask-UDP window).
    pub fn next_deadline(&self) -> Option<Instant> {
        self.hold_until
            .into_iter()
            .chain(self.ask_udp.values().copied())
            .min()
    }

    pub fn view_changed(&mut self) -> &mut watch::Receiver<View> {
        &mut self.view
    }

    /// Re-decides everything and brings the data plane, the addresses and the tasks in line.
    #[allow(clippy::too_many_lines)]
    pub async fn refresh(&mut self, engine: &mut Engine) {
        let now = Instant::now();
        if self.hold_until.is_some_and(|t| t <= now) {
            self.hold_until = None;
            self.roles.end_hold();
            info!("start hold over: taking the roles this engine has");
        }
        self.ask_udp.retain(|_, t| *t > now);
        let config = engine.config().clone();
        let view = self.view.borrow_and_update().clone();
        let self_id = config.daemon.engine_id;
        // A managed engine learns its `[peers]` from the controller's first snapshot.
        self.enabled = config.peers.is_some();
        let changes = if self.enabled {
            self.roles.decide(&config, &view)
        } else {
            Vec::new()
        };
        for c in &changes {
            match *c {
                Change::Promoted { vs_id, epoch } => {
                    self.counters.promotions.fetch_add(1, Ordering::Relaxed);
                    let desired = config.virtual_services.iter().find(|v| v.id == vs_id);
                    let took_over =
                        desired.is_some_and(|v| v.primary != self_id || v.epoch != epoch);
                    if took_over {
                        warn!(
                            vs_id,
                            epoch,
                            "PROMOTED: this engine is now the primary (the previous one is gone)"
                        );
                        self.ask_udp.insert(vs_id, now + ASK_UDP_FOR);
                    } else {
                        info!(vs_id, epoch, "primary");
                    }
                }
                Change::Demoted { vs_id, to, epoch } => {
                    self.counters.demotions.fetch_add(1, Ordering::Relaxed);
                    warn!(
                        vs_id,
                        primary = to,
                        epoch,
                        "DEMOTED: another engine holds a higher epoch; rejoining as a secondary; \
                         pushing it the flows held here"
                    );
                    self.ask_udp.remove(&vs_id);
                    // A planned migration demotes the engine that terminated most flows: the new
                    // primary learns them at once instead of asking about each.
                    let _ = self
                        .commands
                        .try_send(Command::PushFlows { vs_id, primary: to });
                }
                Change::Followed {
                    vs_id,
                    primary,
                    epoch,
                } => {
                    info!(
                        vs_id,
                        primary, epoch, "following a new primary; pushing it the flows held here"
                    );
                    let _ = self
                        .commands
                        .try_send(Command::PushFlows { vs_id, primary });
                }
            }
        }
        let next_hops = bgp_next_hops(&config, &view);
        for (vs_id, hops) in &next_hops {
            // New here (this engine's own announcement changes the routers' next hops) or changed.
            if self.enabled && self.bgp_next_hops.get(vs_id) != Some(hops) {
                info!(
                    vs_id,
                    engines = ?hops,
                    "the engines of a service scaled by BGP changed: asking the others about unknown UDP flows for {} s",
                    ASK_UDP_FOR.as_secs()
                );
                self.ask_udp.insert(*vs_id, now + ASK_UDP_FOR);
            }
        }
        self.bgp_next_hops = next_hops;
        let primaries = if self.enabled {
            self.roles.primaries(&config)
        } else {
            BTreeMap::new()
        };
        let overlay = Overlay {
            down: view
                .iter()
                .filter(|(_, s)| !s.daemon_up)
                .map(|(id, _)| *id)
                .collect(),
            primaries: primaries.clone(),
            ask_udp: self.ask_udp.keys().copied().collect(),
            unserving: view
                .iter()
                .filter(|(_, s)| s.daemon_up)
                .flat_map(|(id, s)| s.unserving.iter().map(|vs| (*vs, *id)))
                .collect(),
        };
        match engine.set_overlay(overlay) {
            Ok(applied) => {
                if matches!(applied, crate::engine::Applied::Changed { .. }) {
                    info!(?applied, "peer view in the data plane");
                }
            }
            Err(e) => error!("applying the peer view to the data plane: {e}"),
        }
        self.plan.send_if_modified(|p| {
            let new = Plan::of(&config, self.roles.claims());
            if *p == new {
                return false;
            }
            *p = new;
            true
        });
        let targets = Plan::of(&config, Vec::new())
            .map(|p| p.targets)
            .unwrap_or_default();
        let services = config
            .virtual_services
            .iter()
            .map(|vs| {
                // Scaled by BGP, every engine of the service steers (and asks about) its own share.
                let primary_id = if vs.by_bgp() && vs.steers_here(self_id) {
                    self_id
                } else {
                    primaries.get(&vs.id).copied().unwrap_or(vs.primary)
                };
                let peers = vs
                    .succession()
                    .into_iter()
                    // A daemon that missed its probes but whose data plane answers is alive,
                    // perhaps only slow (an overloaded engine is the one a migration leaves):
                    // it is asked too, rather than its flows given up unasked.
                    .filter(|id| *id != self_id && view.get(id).is_some_and(|s| !s.gone()))
                    .filter_map(|id| targets.get(&id).map(|a| (id, *a)))
                    .collect::<Vec<(u32, SocketAddr)>>();
                (
                    vs.id,
                    Service {
                        vip: SocketAddr::new(vs.vip, vs.port),
                        protocol: vs.protocol,
                        peers,
                        primary: primary_id == self_id,
                        primary_id,
                        persistence_timeout_s: vs.persistence_timeout_s,
                    },
                )
            })
            .collect();
        self.owner_plan.send_if_modified(|p| {
            let new = OwnerPlan { self_id, services };
            if *p == new {
                return false;
            }
            *p = new;
            true
        });
        self.place_vips(&config, &primaries, &view, &changes).await;
    }

    /// The VIP of each virtual service on the interface where this engine steers it, on `lo`
    /// elsewhere; announcements on every promotion, and again when a peer still claims a VIP this
    /// engine took at a higher epoch (it may have answered ARP meanwhile).
    async fn place_vips(
        &mut self,
        config: &Config,
        primaries: &BTreeMap<u32, u32>,
        view: &View,
        changes: &[Change],
    ) {
        let Some(vips) = &self.vips else { return };
        let self_id = config.daemon.engine_id;
        let mut steering: BTreeMap<IpAddr, bool> = BTreeMap::new();
        for vs in &config.virtual_services {
            // A VIP scaled by BGP is routed to its engines, never resolved by ARP / NDP: on `lo`.
            let primary =
                !vs.by_bgp() && primaries.get(&vs.id).copied().unwrap_or(vs.primary) == self_id;
            *steering.entry(vs.vip).or_default() |= primary;
        }
        for (vip, on_interface) in &steering {
            // Another engine steers it now: the rest of this engine's announcements would pull
            // the clients back (a migration soon after a promotion).
            if !on_interface && let Some(old) = self.announcing.remove(vip) {
                old.abort();
                info!(%vip, "stopped announcing: another engine steers this VIP");
            }
            match vips.place(*vip, *on_interface).await {
                Ok(_) => {
                    self.placed_vips.insert(*vip);
                }
                Err(e) => error!(%vip, on_interface, "placing the VIP address: {e}"),
            }
        }
        let gone: Vec<IpAddr> = self
            .placed_vips
            .iter()
            .filter(|v| !steering.contains_key(v))
            .copied()
            .collect();
        for vip in gone {
            if let Some(old) = self.announcing.remove(&vip) {
                old.abort();
            }
            match vips.remove(vip).await {
                Ok(_) => {
                    info!(%vip, "no virtual service has this VIP any more: removed");
                    self.placed_vips.remove(&vip);
                }
                Err(e) => error!(%vip, "removing the VIP address: {e}"),
            }
        }
        let mut announce_for: BTreeSet<IpAddr> = BTreeSet::new();
        for c in changes {
            if let Change::Promoted { vs_id, .. } = c
                && let Some(vs) = config.virtual_services.iter().find(|v| v.id == *vs_id)
            {
                announce_for.insert(vs.vip);
            }
        }
        let mut stale_now = BTreeSet::new();
        for vs in &config.virtual_services {
            let Some(mine) = self.roles.role(vs.id).filter(|r| r.primary == self_id) else {
                continue;
            };
            for (peer, status) in view {
                if status
                    .claims
                    .iter()
                    .any(|c| c.vs_id == vs.id && c.epoch < mine.epoch)
                {
                    stale_now.insert((*peer, vs.id));
                    if !self.stale_claims.contains(&(*peer, vs.id)) {
                        warn!(
                            engine = peer,
                            vs_id = vs.id,
                            "a peer still claims this VIP at a lower epoch: announcing again"
                        );
                        announce_for.insert(vs.vip);
                    }
                }
            }
        }
        self.stale_claims = stale_now;
        for vip in announce_for {
            if steering.get(&vip) != Some(&true) {
                continue;
            }
            if let Some(old) = self.announcing.remove(&vip) {
                old.abort();
            }
            let h = announce::announce(
                vips.ifindex(),
                vips.mac(),
                vip,
                self.counters.announce.clone(),
            );
            self.announcing.insert(vip, h);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::peers::PeerStatus;

    const TEXT: &str = r#"
[daemon]
interface = "eth0"
engine_id = 1

[peers]
key = "00112233445566778899aabbccddeeff"

[bgp]
asn = 65001
router_id = "10.0.0.1"
[[bgp.peers]]
address = "10.0.0.254"
asn = 65000

[[engines]]
id = 1
address_v4 = "10.0.0.1"

[[engines]]
id = 2
mac = "02:00:00:00:00:02"
address_v4 = "10.0.0.2"

[[engines]]
id = 3
mac = "02:00:00:00:00:03"
address_v4 = "10.0.0.3"

[[virtual_services]]
id = 0
name = "web"
vip = "10.100.0.10"
port = 80
protocol = "udp"
primary = 1
engines = [ { id = 1 }, { id = 2 }, { id = 3 } ]
bgp = { med = 10 }

[[virtual_services]]
id = 1
name = "native"
vip = "10.100.0.11"
port = 80
protocol = "udp"
primary = 1
engines = [ { id = 1 }, { id = 2 } ]
"#;

    fn status(daemon_up: bool, dataplane_up: bool) -> PeerStatus {
        PeerStatus {
            daemon_up,
            dataplane_up,
            claims: Vec::new(),
            unserving: Vec::new(),
        }
    }

    #[test]
    fn the_next_hops_of_a_service_scaled_by_bgp_follow_the_peers_daemons() {
        let cfg = Config::parse(TEXT).unwrap();
        let hops = |view: &[(u32, PeerStatus)]| {
            bgp_next_hops(&cfg, &view.iter().cloned().collect::<View>())
        };
        let all = BTreeMap::from([(0, BTreeSet::from([1, 2, 3]))]);
        assert_eq!(hops(&[]), all, "not probed yet: every member");
        assert_eq!(hops(&[(2, status(true, true))]), all);
        // A dead daemon whose data plane still steers: its BGP session is gone with it.
        assert_eq!(
            hops(&[(2, status(false, true)), (3, status(true, true))]),
            BTreeMap::from([(0, BTreeSet::from([1, 3]))])
        );
        assert_eq!(
            hops(&[(2, status(true, true)), (3, status(false, false))]),
            BTreeMap::from([(0, BTreeSet::from([1, 2]))]),
            "the native service has no next hops to follow"
        );
    }
}
