//! Route health injection: this engine's BGP speaker (announce-only).
//!
//! ```text
//!   Engine::apply ─► Announcing (the BGP services this engine serves)
//!        └── health watch (every HEALTH_TICK): a VIP is wanted while every BGP service of it
//!            here is serving (not draining) with a usable backend
//!              └── Speaker: one session task per [[bgp.peers]] (session.rs), each announcing
//!                  the wanted routes and withdrawing the rest
//!   SIGTERM ─► Speaker::stop: every session withdraws its routes, sends Cease, closes.
//!   [bgp] changed (SIGHUP, a controller snapshot) ─► Speakers::follow: the old speaker stops as
//!            on SIGTERM, one with the new settings starts (per-peer counters carry over)
//! ```
//!
//! A crash closes the TCP sessions with the process, and the routers withdraw by themselves.

pub mod bfd;
pub mod md5;
pub mod messages;
pub mod session;

use std::{
    net::SocketAddr,
    sync::{Arc, Mutex, RwLock},
    time::{Duration, Instant},
};

use lb_model::{BgpConfig, VirtualServiceConfig, parse_community};
use tokio::{sync::watch, task::JoinHandle};

use crate::{
    metrics::Inventory,
    proxy::{Drain, Service},
};
pub use messages::Route;
pub use session::{PeerStatus, Routes, State};

/// How often the health watch looks at the services' backends and drain state.
pub const HEALTH_TICK: Duration = Duration::from_millis(100);
/// How long a stop waits for the sessions to withdraw and close.
const STOP_WAIT: Duration = Duration::from_secs(2);

/// One BGP service this engine serves, and the route it would announce for it.
#[derive(Clone)]
pub struct Announcing {
    pub service: Arc<Service>,
    pub route: Route,
}

/// The BGP services among those the proxy serves, in `config`'s order, where engine `self_id`
/// takes new connections (a weight above 0: an engine scaled out but not serving yet, or on its
/// way out, draws no traffic from the routers).
pub fn announcing(
    self_id: u32,
    virtual_services: &[VirtualServiceConfig],
    services: &[Arc<Service>],
) -> Vec<Announcing> {
    virtual_services
        .iter()
        .filter(|vs| vs.engines.iter().any(|m| m.id == self_id && m.weight > 0))
        .filter_map(|vs| {
            let bgp = vs.bgp.as_ref()?;
            let service = services
                .iter()
                .find(|s| s.id == vs.id && s.drain_state() == Drain::Serving)
                .or_else(|| services.iter().find(|s| s.id == vs.id))?;
            Some(Announcing {
                service: service.clone(),
                route: Route {
                    vip: vs.vip,
                    med: bgp.med,
                    local_pref: bgp.local_pref,
                },
            })
        })
        .collect()
}

/// Whether a service should draw traffic to this engine.
fn healthy(s: &Service) -> bool {
    s.drain_state() == Drain::Serving && s.pool().usable().next().is_some()
}

/// The routes wanted now: a VIP whose BGP services here are all healthy (one unhealthy service
/// of a VIP withdraws it, so its traffic goes to engines where that service works), with the
/// attributes of its first service.
pub fn wanted(announcing: &[Announcing]) -> Routes {
    let mut routes = Routes::new();
    let mut sick = std::collections::BTreeSet::new();
    for a in announcing {
        if healthy(&a.service) {
            routes.entry(a.route.vip).or_insert_with(|| a.route.clone());
        } else {
            sick.insert(a.route.vip);
        }
    }
    routes.retain(|vip, _| !sick.contains(vip));
    routes
}

/// How long after its start a daemon with `[peers]` announces nothing. The other engines of a
/// service scaled by BGP see a (re)started daemon up only after `up_after` probes, and only then
/// ask about unknown UDP flows; announcing earlier lets the routers rehash sessions onto engines
/// that would place them locally. Two intervals to spare.
fn peer_hold(config: &lb_model::Config) -> Duration {
    config.peers.as_ref().map_or(Duration::ZERO, |p| {
        Duration::from_millis(u64::from(p.interval_ms) * u64::from(p.up_after.saturating_add(2)))
    })
}

/// Every peer's state, as the metrics read it.
pub type PeerList = Arc<RwLock<Vec<(SocketAddr, Arc<Mutex<PeerStatus>>)>>>;

/// The speaker of the `[bgp]` applied now: none, or one with its health watch. It follows the
/// configuration: a changed `[bgp]` stops the old speaker (its routes withdrawn, Cease) and starts
/// one with the new settings.
pub struct Speakers {
    running: Option<(BgpConfig, Arc<Speaker>, JoinHandle<()>)>,
    peers: PeerList,
    inventory: Arc<RwLock<Inventory>>,
    /// When this daemon started: see [`Speakers::follow`].
    started: Instant,
}

impl Speakers {
    pub fn new(inventory: Arc<RwLock<Inventory>>) -> Self {
        Speakers {
            running: None,
            peers: PeerList::default(),
            inventory,
            started: Instant::now(),
        }
    }

    /// Runs the speaker the (validated) configuration's `[bgp]` asks for: nothing to do if it
    /// runs already. It announces nothing until `peer_hold` after this daemon's start.
    pub async fn follow(&mut self, config: &lb_model::Config) {
        let (cfg, hold) = (config.bgp.as_ref(), peer_hold(config));
        if self.running.as_ref().map(|r| &r.0) == cfg {
            return;
        }
        let previous = self.stop().await;
        let Some(cfg) = cfg else {
            tracing::info!("BGP speaker off");
            return;
        };
        let speaker = Arc::new(Speaker::start(cfg, &previous));
        let health = tokio::spawn(watch_health(
            speaker.clone(),
            self.inventory.clone(),
            self.started + hold,
        ));
        *self
            .peers
            .write()
            .unwrap_or_else(std::sync::PoisonError::into_inner) = speaker.peers();
        tracing::info!(
            asn = cfg.asn,
            router_id = %cfg.router_id,
            peers = cfg.peers.len(),
            "BGP speaker started"
        );
        self.running = Some((cfg.clone(), speaker, health));
    }

    /// Stops the running speaker, if any (its routes withdrawn, Cease); returns its peers' state.
    pub async fn stop(&mut self) -> Vec<(SocketAddr, Arc<Mutex<PeerStatus>>)> {
        let Some((_, speaker, health)) = self.running.take() else {
            return Vec::new();
        };
        health.abort();
        speaker.stop().await;
        std::mem::take(
            &mut *self
                .peers
                .write()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        )
    }

    /// The peers' state, kept current across restarts of the speaker (for the metrics).
    pub fn peers(&self) -> PeerList {
        self.peers.clone()
    }
}

/// The running speaker: one session task per peer.
pub struct Speaker {
    routes: watch::Sender<Routes>,
    stop: watch::Sender<bool>,
    peers: Vec<(SocketAddr, Arc<Mutex<PeerStatus>>)>,
    tasks: Mutex<Vec<JoinHandle<()>>>,
}

impl Speaker {
    /// Starts a session task per peer of `cfg` (validated), announcing nothing yet. A peer in
    /// `previous` (a stopped speaker's) keeps its state record, so its counters carry on.
    pub fn start(cfg: &BgpConfig, previous: &[(SocketAddr, Arc<Mutex<PeerStatus>>)]) -> Speaker {
        let (routes, routes_rx) = watch::channel(Routes::new());
        let (stop, stop_rx) = watch::channel(false);
        let communities: Vec<u32> = cfg
            .communities
            .iter()
            .filter_map(|c| parse_community(c))
            .collect();
        let mut peers = Vec::new();
        let mut tasks = Vec::new();
        let bfd = cfg
            .peers
            .iter()
            .any(|p| p.bfd.is_some())
            .then(|| Arc::new(bfd::Bfd::default()));
        for p in &cfg.peers {
            let peer = session::Peer {
                config: p.clone(),
                local_asn: cfg.asn,
                router_id: cfg.router_id,
                hold_time: p.hold_time_s.unwrap_or(cfg.hold_time_s),
                communities: communities.clone(),
                min_backoff: Duration::from_millis(u64::from(cfg.min_backoff_ms)),
                max_backoff: Duration::from_secs(u64::from(cfg.max_backoff_s)),
                bfd: bfd.clone(),
            };
            let status = previous
                .iter()
                .find(|(a, _)| *a == peer.addr())
                .map_or_else(Arc::default, |(_, s)| s.clone());
            peers.push((peer.addr(), status.clone()));
            tasks.push(tokio::spawn(session::run(
                peer,
                routes_rx.clone(),
                status,
                stop_rx.clone(),
            )));
        }
        Speaker {
            routes,
            stop,
            peers,
            tasks: Mutex::new(tasks),
        }
    }

    /// Announces `routes` (and withdraws what is not in it) on every session.
    pub fn set_routes(&self, routes: Routes) {
        self.routes.send_if_modified(|r| {
            if *r == routes {
                false
            } else {
                *r = routes;
                true
            }
        });
    }

    /// The routes wanted now.
    pub fn routes(&self) -> Routes {
        self.routes.borrow().clone()
    }

    /// Every peer's state.
    pub fn status(&self) -> Vec<(SocketAddr, PeerStatus)> {
        self.peers
            .iter()
            .map(|(a, s)| {
                (
                    *a,
                    s.lock()
                        .unwrap_or_else(std::sync::PoisonError::into_inner)
                        .clone(),
                )
            })
            .collect()
    }

    /// A handle for readers of the peers' state (metrics).
    pub fn peers(&self) -> Vec<(SocketAddr, Arc<Mutex<PeerStatus>>)> {
        self.peers.clone()
    }

    /// Withdraws every route and closes every session with a Cease, waiting a bounded time.
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let tasks = std::mem::take(
            &mut *self
                .tasks
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner),
        );
        let all = futures_util::future::join_all(tasks);
        let _ = tokio::time::timeout(STOP_WAIT, all).await;
    }
}

/// Keeps the speaker's routes in step with the services' health (the inventory is refreshed by
/// every apply), forever.
pub async fn watch_health(
    speaker: Arc<Speaker>,
    inventory: Arc<RwLock<Inventory>>,
    announce_from: Instant,
) {
    tokio::time::sleep_until(announce_from.into()).await;
    let mut tick = tokio::time::interval(HEALTH_TICK);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let routes = wanted(
            &inventory
                .read()
                .unwrap_or_else(std::sync::PoisonError::into_inner)
                .bgp,
        );
        speaker.set_routes(routes);
    }
}
