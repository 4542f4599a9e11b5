//! The controller's one owner of state: desired (persisted: engines, pools, virtual services and
//! their placement, the snapshot version) and observed (per engine: session, heartbeat stats,
//! applied version, last NACK, health), and the anomalies between them.
//!
//! Every change follows one path: check it, compute the records it writes, commit them to the store,
//! then apply them in memory (a failed commit changes nothing), then [`Cluster::refresh`] rebuilds
//! the engines' snapshot and, if it differs, gives it a new version (persisted too) and publishes
//! it on a watch channel that every engine session follows. The reconciler is the sessions: each
//! pushes the current snapshot until its engine ACKs that version.
//!
//! Time comes from the caller ([`Instant`]), so the health manager runs on a virtual clock in tests.
//!
//! Promotions: the engines replace a gone primary on their own (the succession rule, at the next
//! epoch) and say so in their heartbeats (their claims); the controller records such a claim in
//! the desired state ([`Cluster::heartbeat`]). When the engines cannot (the primary is failed by
//! heartbeats for [`Settings::promotion_grace`], no engine of the service claims a higher epoch,
//! and no healthy engine of it reports the primary's data plane still steering), the controller
//! promotes the first healthy engine of the placement itself. Either way the record moves one
//! engine to the front of the placement at one epoch: never two primaries at one epoch.

use std::{
    collections::{BTreeMap, BTreeSet},
    sync::Arc,
    time::{Duration, Instant},
};

use lb_model::{
    BgpConfig, Config, DaemonConfig, Desired, EngineConfig, EngineState, Member, PoolConfig,
    ProxyConfig, VirtualServiceConfig,
};
use tokio::sync::watch;
use tracing::{info, warn};

pub use self::groups::GroupView;
use self::scaling::Scaling;
pub use self::scaling::{DrainReport, PlacementView, primary_weight};
use crate::{
    events::Events,
    health::{EngineHealth, HealthManager, HealthSettings, Transition},
    placement::{self, Candidate},
    rebalance::{Action, RebalanceSettings, Rebalancer, Sample, Service as RebalanceService},
    store::{
        BgpRecord, DEFAULT_GROUP, EngineRecord, GroupRecord, Persisted, PoolRecord, Store,
        StoreError, VsRecord, VsSpec, Write,
    },
};

/// Engines a virtual service in scaling mode bgp may have at most.
pub const BGP_MAX_ENGINES: u32 = 64;

/// Settings of the controller's decisions.
#[derive(Debug, Clone, Copy)]
pub struct Settings {
    /// Virtual service ids are `0..max_virtual_services` (the engines' `daemon.max_virtual_services`).
    pub max_virtual_services: u32,
    /// Engines a virtual service may scale to natively (beyond it: scaling mode bgp, up to
    /// [`BGP_MAX_ENGINES`]).
    pub native_max_engines: u32,
    /// An engine that has not `ACKed` the current version this long after it was sent is an anomaly.
    pub ack_timeout: Duration,
    /// After the controller starts, how long an engine may take to reconnect before its silence
    /// counts (engines retry with a backoff of up to 5 s): a controller restart alone fails no
    /// engine and changes no snapshot.
    pub startup_grace: Duration,
    /// How long a primary stays failed (by heartbeats) before the controller promotes a secondary
    /// itself, when no engine did and no healthy engine reports the primary's data plane steering.
    pub promotion_grace: Duration,
    pub health: HealthSettings,
    /// The default engine group's settings when the store has none (a first start).
    pub default_group: RebalanceSettings,
}

impl Default for Settings {
    fn default() -> Self {
        Settings {
            max_virtual_services: 64,
            native_max_engines: 4,
            ack_timeout: Duration::from_secs(5),
            startup_grace: Duration::from_secs(15),
            promotion_grace: Duration::from_secs(2),
            health: HealthSettings::default(),
            default_group: RebalanceSettings::default(),
        }
    }
}

/// Why a call was refused; each maps to one gRPC status.
#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum ClusterError {
    #[error("{field}: {reason}")]
    InvalidArgument { field: String, reason: String },
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    AlreadyExists(String),
    #[error("{0}")]
    FailedPrecondition(String),
    /// Optimistic concurrency: the caller's resource version is not the stored one.
    #[error("{0}")]
    Aborted(String),
    #[error("{0}")]
    Store(String),
}

impl From<StoreError> for ClusterError {
    fn from(e: StoreError) -> Self {
        ClusterError::Store(e.to_string())
    }
}

pub fn invalid(field: impl Into<String>, reason: impl Into<String>) -> ClusterError {
    ClusterError::InvalidArgument {
        field: field.into(),
        reason: reason.into(),
    }
}

/// What engines run: the desired state as JSON (`lb_model::Desired`), under a version.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Snapshot {
    pub version: u64,
    pub json: String,
}

/// Epochs a claim may be above the recorded one (each engine-made promotion adds one): a claim
/// beyond is absurd and ignored.
pub const MAX_EPOCH_STEP: u64 = 1_000_000;

/// An engine says it is primary of virtual service `vs_id` at `epoch` (from its heartbeats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord)]
pub struct Claim {
    pub vs_id: u32,
    pub epoch: u64,
}

/// What an engine's peer probes tell of one peer (from its heartbeats).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct PeerReport {
    /// Its daemon answers.
    pub daemon_up: bool,
    /// Its data plane echoes: it still steers what it steered.
    pub dataplane_up: bool,
}

impl PeerReport {
    fn describe(self) -> &'static str {
        match (self.daemon_up, self.dataplane_up) {
            (true, true) => "daemon up, data plane up",
            (true, false) => "daemon up, data plane down",
            (false, true) => "daemon down, data plane up (it still steers)",
            (false, false) => "daemon down, data plane down (gone)",
        }
    }
}

/// Observed state of one engine (not persisted).
#[derive(Debug, Clone, Default)]
pub struct Observed {
    pub connected: bool,
    pub cpu_pct: f64,
    pub memory_bytes: u64,
    pub pps: u64,
    pub connections: u64,
    pub backends_up: BTreeMap<String, u32>,
    pub backends: BTreeMap<String, u32>,
    pub last_heartbeat_unix_ms: i64,
    pub applied_version: u64,
    /// (version, error) of the last NACK.
    pub nack: Option<(u64, String)>,
    /// The version last sent to it, and when.
    pub sent: Option<(u64, Instant)>,
    /// What it claims (virtual services of known ids only).
    pub claims: Vec<Claim>,
    /// Its peer view: engine id (registered engines only) → what its probes tell.
    pub peers: BTreeMap<u32, PeerReport>,
    /// Packets per second per virtual service (name) since its last heartbeat.
    pub vs_pps: BTreeMap<String, f64>,
    /// Connections its proxy accepted per second since its last heartbeat.
    pub new_connections_per_s: f64,
    /// Megabits per second per virtual service (name) since its last heartbeat.
    pub vs_mbps: BTreeMap<String, f64>,
    /// The services its proxy serves (listening, with a usable backend).
    pub serving: BTreeSet<String>,
    /// Its drains of services, until each has ended.
    pub drains: Vec<DrainReport>,
    /// What `cpu_pct` is ("cgroup" or "host"), and the host's, the daemon's and the softirq share.
    pub cpu_source: String,
    pub host_cpu_pct: f64,
    pub daemon_cpu_pct: f64,
    pub softirq_pct: f64,
    /// Its BGP sessions.
    pub bgp: Vec<BgpSessionReport>,
}

/// What an engine reports of one of its BGP sessions.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct BgpSessionReport {
    /// `address:port`.
    pub peer: String,
    /// `idle`, `connect`, `open_sent`, `open_confirm`, `established`.
    pub state: String,
    pub uptime_s: u64,
    pub routes_announced: u32,
    pub last_error: String,
    /// `up`, `down`, `init`, `admin_down`; empty: no BFD.
    pub bfd: String,
}

impl BgpSessionReport {
    fn established(&self) -> bool {
        self.state == "established"
    }
}

/// A lasting difference between desired and observed state.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord)]
pub struct Anomaly {
    pub kind: &'static str,
    pub object: String,
    pub reason: String,
}

pub struct Cluster {
    settings: Settings,
    store: Arc<dyn Store>,
    p: Persisted,
    health: HealthManager,
    observed: BTreeMap<String, Observed>,
    anomalies: BTreeMap<(&'static str, String), (Anomaly, i64)>,
    /// Since when each unhealthy engine is failed (the promotion grace counts from it).
    failed_since: BTreeMap<String, Instant>,
    /// Per engine, what of its last heartbeat was ignored (logged once, when it first appears).
    ignored: BTreeMap<String, BTreeSet<String>>,
    /// Per engine group, its auto-rebalance loop.
    rebalancers: BTreeMap<String, Rebalancer>,
    scaling: Scaling,
    /// The time of the latest heartbeat or tick: the clock of the operators' calls.
    clock: Instant,
    pub events: Events,
    snapshot: watch::Sender<Snapshot>,
}

/// `engine/<name>`, `vs/<name>`, `pool/<name>`: how events and anomalies name objects.
pub fn obj(kind: &str, name: &str) -> String {
    format!("{kind}/{name}")
}

impl Cluster {
    /// Loads the persisted state; every known engine is tracked as healthy as if last heard from
    /// `startup_grace` after `now`, so a controller restart by itself fails no engine and changes no
    /// snapshot.
    pub fn load(
        settings: Settings,
        store: Arc<dyn Store>,
        now: Instant,
    ) -> Result<Cluster, ClusterError> {
        let p = store.load()?;
        let mut health = HealthManager::new(settings.health);
        let mut failed_since = BTreeMap::new();
        let last = serde_json::from_str::<Desired>(&p.snapshot).ok();
        // Engines that were down in the last snapshot stay down until they heartbeat.
        let down: BTreeSet<u32> = last
            .iter()
            .flat_map(|d| &d.engines)
            .filter(|e| e.state == EngineState::Down)
            .map(|e| e.id)
            .collect();
        let scaling = last.as_ref().map_or_else(Scaling::default, |d| {
            let name_of = |id: u32| {
                p.engines
                    .values()
                    .find(|e| e.id == id)
                    .map(|e| e.name.clone())
            };
            // Unreadable steps (never written so) fall back to what the snapshot tells.
            let steps = serde_json::from_str(&p.steps).ok();
            Scaling::restore(d, name_of, p.version, now, steps)
        });
        for (name, e) in &p.engines {
            if down.contains(&e.id) {
                health.track_failed(name, now);
                // Its peers get the startup grace to reconnect and report it before the
                // controller could promote around it.
                failed_since.insert(name.clone(), now + settings.startup_grace);
            } else {
                health.track(name, now + settings.startup_grace);
            }
        }
        let snapshot = watch::Sender::new(Snapshot {
            version: p.version,
            json: p.snapshot.clone(),
        });
        let mut c = Cluster {
            rebalancers: p
                .groups
                .values()
                .map(|g| (g.name.clone(), Rebalancer::new(g.settings)))
                .collect(),
            scaling,
            clock: now,
            settings,
            store,
            p,
            health,
            observed: BTreeMap::new(),
            anomalies: BTreeMap::new(),
            failed_since,
            ignored: BTreeMap::new(),
            events: Events::default(),
            snapshot,
        };
        if c.p.peer_key.is_empty() {
            let mut key = [0u8; 32];
            ring::rand::SecureRandom::fill(&ring::rand::SystemRandom::new(), &mut key)
                .map_err(|_| ClusterError::Store("no randomness for the peer key".into()))?;
            let hex = key.iter().fold(String::new(), |mut s, b| {
                use std::fmt::Write as _;
                let _ = write!(s, "{b:02x}");
                s
            });
            c.commit(vec![Write::PeerKey(hex)])?;
        }
        if !c.p.groups.contains_key(DEFAULT_GROUP) {
            let g = GroupRecord {
                name: DEFAULT_GROUP.to_owned(),
                settings: c.settings.default_group,
                resource_version: 1,
            };
            c.commit(vec![Write::Group(g)])?;
            c.rebalancers.insert(
                DEFAULT_GROUP.to_owned(),
                Rebalancer::new(c.settings.default_group),
            );
        }
        c.refresh()?;
        Ok(c)
    }

    pub fn settings(&self) -> Settings {
        self.settings
    }

    pub fn persisted(&self) -> &Persisted {
        &self.p
    }

    pub fn subscribe(&self) -> watch::Receiver<Snapshot> {
        self.snapshot.subscribe()
    }

    pub fn snapshot(&self) -> Snapshot {
        self.snapshot.borrow().clone()
    }

    /// The current snapshot's version, without copying the snapshot.
    pub fn snapshot_version(&self) -> u64 {
        self.snapshot.borrow().version
    }

    pub fn health(&self, engine: &str) -> Option<EngineHealth> {
        self.health.state(engine)
    }

    pub fn observed(&self, engine: &str) -> Option<&Observed> {
        self.observed.get(engine)
    }

    pub fn anomalies(&self) -> Vec<(Anomaly, i64)> {
        self.anomalies.values().cloned().collect()
    }

    fn commit(&mut self, writes: Vec<Write>) -> Result<(), ClusterError> {
        if writes.is_empty() {
            return Ok(());
        }
        self.store.commit(&writes)?;
        for w in writes {
            match w {
                Write::Engine(e) => {
                    self.p.engines.insert(e.name.clone(), e);
                }
                Write::Group(g) => {
                    self.p.groups.insert(g.name.clone(), g);
                }
                Write::DeleteGroup(n) => {
                    self.p.groups.remove(&n);
                }
                Write::Pool(p) => {
                    self.p.pools.insert(p.config.name.clone(), p);
                }
                Write::DeletePool(n) => {
                    self.p.pools.remove(&n);
                }
                Write::Service(s) => {
                    self.p.services.insert(s.spec.name.clone(), s);
                }
                Write::DeleteService(n) => {
                    self.p.services.remove(&n);
                }
                Write::Snapshot { version, json } => {
                    self.p.version = version;
                    self.p.snapshot = json;
                }
                Write::PeerKey(k) => self.p.peer_key = k,
                Write::Steps(j) => self.p.steps = j,
                Write::Bgp(b) => self.p.bgp = b,
            }
        }
        Ok(())
    }

    /// The desired state every engine gets.
    pub fn desired(&self) -> Desired {
        desired_of(
            &self.p,
            |name| {
                self.health
                    .state(name)
                    .is_some_and(EngineHealth::is_healthy)
            },
            |v| self.weights_of(v),
        )
    }

    /// Rebuilds the snapshot; a different one gets the next version (persisted, with the scaling
    /// steps in flight) and is published.
    pub fn refresh(&mut self) -> Result<(), ClusterError> {
        let json = serde_json::to_string(&self.desired()).expect("the model serialises");
        let mut writes = self.steps_write();
        if json == self.p.snapshot && self.p.version > 0 {
            return self.commit(writes);
        }
        let version = self.p.version + 1;
        writes.push(Write::Snapshot {
            version,
            json: json.clone(),
        });
        self.commit(writes)?;
        self.snapshot.send_replace(Snapshot { version, json });
        Ok(())
    }

    /// The scaling steps in flight, if they differ from the stored ones.
    fn steps_write(&self) -> Vec<Write> {
        let steps = serde_json::to_string(&self.scaling.steps()).expect("steps serialise");
        if steps == self.p.steps {
            Vec::new()
        } else {
            vec![Write::Steps(steps)]
        }
    }

    // ----- engines -----

    /// An engine registers (again): its record is created or updated.
    pub fn register(&mut self, rec: EngineRecord, now: Instant) -> Result<(), ClusterError> {
        check_name("name", &rec.name)?;
        if rec.id >= 256 {
            return Err(invalid(
                "engine_id",
                format!("{} is out of range 0..=255", rec.id),
            ));
        }
        if let Some(other) = self
            .p
            .engines
            .values()
            .find(|e| e.id == rec.id && e.name != rec.name)
        {
            return Err(ClusterError::AlreadyExists(format!(
                "engine id {} is already registered by {}",
                rec.id, other.name
            )));
        }
        check_name("group", &rec.group)?;
        if !self.p.groups.contains_key(&rec.group) {
            return Err(ClusterError::FailedPrecondition(format!(
                "engine group {:?} does not exist: create it first (lbctl group create {})",
                rec.group, rec.group
            )));
        }
        if let Some(old) = self.p.engines.get(&rec.name)
            && old.group != rec.group
        {
            let placed: Vec<&str> = self
                .p
                .services
                .values()
                .filter(|v| v.placement.contains(&rec.name))
                .map(|v| v.spec.name.as_str())
                .collect();
            if !placed.is_empty() {
                return Err(ClusterError::FailedPrecondition(format!(
                    "engine {:?} is in group {:?} and hosts {}: scale it in or migrate them before it moves to group {:?}",
                    rec.name,
                    old.group,
                    placed.join(", "),
                    rec.group
                )));
            }
            if let Some(r) = self.rebalancers.get_mut(&old.group) {
                r.forget(&rec.name);
            }
        }
        let name = rec.name.clone();
        let known = self.p.engines.get(&rec.name) == Some(&rec);
        if !known {
            let first = !self.p.engines.contains_key(&rec.name);
            self.commit(vec![Write::Engine(rec)])?;
            self.events.emit(
                "placement",
                &[obj("engine", &name)],
                if first {
                    "registered"
                } else {
                    "registration updated"
                },
            );
        }
        self.health.track(&name, now);
        self.refresh()
    }

    /// A session of `engine` opened; it runs `applied_version`.
    pub fn connected(&mut self, engine: &str, applied_version: u64, now: Instant) {
        let o = self.observed.entry(engine.to_owned()).or_default();
        o.connected = true;
        o.applied_version = applied_version;
        self.heartbeat_at(engine, now);
    }

    pub fn disconnected(&mut self, engine: &str) {
        if let Some(o) = self.observed.get_mut(engine) {
            o.connected = false;
            o.sent = None;
        }
    }

    /// The session sent `version` to `engine`.
    pub fn sent(&mut self, engine: &str, version: u64, now: Instant) {
        self.observed.entry(engine.to_owned()).or_default().sent = Some((version, now));
    }

    fn heartbeat_at(&mut self, engine: &str, now: Instant) {
        if let Some(t) = self.health.heartbeat(engine, now) {
            self.on_health(&t, now);
        }
    }

    /// A heartbeat of `engine`: its stats, its peer view (transitions are events) and its claims
    /// (one above the recorded epoch is a promotion the engines made: recorded at once).
    pub fn heartbeat(&mut self, engine: &str, o: Observed, now: Instant) {
        let mut ignored = BTreeSet::new();
        let claims = self.known_claims(&o.claims, &mut ignored);
        let peers = self.known_peers(&o.peers, &mut ignored);
        let entry = self.observed.entry(engine.to_owned()).or_default();
        entry.cpu_pct = o.cpu_pct;
        entry.memory_bytes = o.memory_bytes;
        entry.pps = o.pps;
        entry.connections = o.connections;
        entry.backends_up = o.backends_up;
        entry.backends = o.backends;
        entry.last_heartbeat_unix_ms = o.last_heartbeat_unix_ms;
        entry.claims = claims;
        let group = self
            .p
            .engines
            .get(engine)
            .map_or(DEFAULT_GROUP, |e| e.group.as_str());
        #[allow(clippy::cast_precision_loss)]
        if let Some(r) = self.rebalancers.get_mut(group) {
            r.record(
                engine,
                Sample {
                    at: now,
                    cpu_pct: o.cpu_pct,
                    pps: o.pps as f64,
                    mbps: o
                        .vs_mbps
                        .values()
                        .filter(|m| m.is_finite() && **m >= 0.0)
                        .sum(),
                    connections: o.connections as f64,
                    new_connections_per_s: if o.new_connections_per_s.is_finite() {
                        o.new_connections_per_s.max(0.0)
                    } else {
                        0.0
                    },
                    vs_pps: o
                        .vs_pps
                        .iter()
                        .filter(|(_, p)| p.is_finite() && **p >= 0.0)
                        .map(|(k, v)| (k.clone(), *v))
                        .collect(),
                },
            );
        }
        entry.vs_pps = o.vs_pps;
        entry.new_connections_per_s = o.new_connections_per_s;
        entry.vs_mbps = o.vs_mbps;
        entry.serving = o.serving;
        entry.cpu_source = o.cpu_source;
        entry.host_cpu_pct = o.host_cpu_pct;
        entry.daemon_cpu_pct = o.daemon_cpu_pct;
        entry.softirq_pct = o.softirq_pct;
        let bgp_before = std::mem::replace(&mut entry.bgp, o.bgp);
        self.bgp_events(engine, &bgp_before);
        self.clock = self.clock.max(now);
        self.drain_reports(engine, o.drains, now);
        let entry = self.observed.entry(engine.to_owned()).or_default();
        let before = std::mem::replace(&mut entry.peers, peers.clone());
        self.heartbeat_at(engine, now);
        self.peer_events(engine, &before, &peers);
        self.check_claims(engine, &mut ignored);
        self.log_ignored(engine, ignored);
        // Only a recorded promotion rebuilds the snapshot (megabytes with thousands of services).
        let recorded = self
            .record_claims(now)
            .and_then(|changed| if changed { self.refresh() } else { Ok(()) });
        if let Err(e) = recorded {
            warn!(
                engine,
                "recording a promotion: {e} (retried at the next heartbeat)"
            );
        }
    }

    /// An event for each BGP session of `engine` that came up or went down since its last report.
    fn bgp_events(&mut self, engine: &str, before: &[BgpSessionReport]) {
        let Some(now) = self.observed.get(engine).map(|o| &o.bgp) else {
            return;
        };
        let mut reasons = Vec::new();
        for s in now {
            let was = before
                .iter()
                .find(|b| b.peer == s.peer)
                .is_some_and(BgpSessionReport::established);
            if was == s.established() {
                continue;
            }
            reasons.push(if s.established() {
                format!(
                    "{engine}: BGP session with {} established, {} routes announced",
                    s.peer, s.routes_announced
                )
            } else if s.last_error.is_empty() {
                format!("{engine}: BGP session with {} is {}", s.peer, s.state)
            } else {
                format!(
                    "{engine}: BGP session with {} is {}: {}",
                    s.peer, s.state, s.last_error
                )
            });
        }
        for b in before.iter().filter(|b| b.established()) {
            if !now.iter().any(|s| s.peer == b.peer) {
                reasons.push(format!("{engine}: BGP session with {} removed", b.peer));
            }
        }
        for reason in reasons {
            self.events
                .emit("bgp_session", &[obj("engine", engine)], reason);
        }
    }

    /// `claims` of virtual services that exist, the highest per service.
    fn known_claims(&self, claims: &[Claim], ignored: &mut BTreeSet<String>) -> Vec<Claim> {
        let mut best: BTreeMap<u32, u64> = BTreeMap::new();
        for c in claims {
            if self.p.services.values().any(|v| v.id == c.vs_id) {
                let e = best.entry(c.vs_id).or_insert(c.epoch);
                *e = (*e).max(c.epoch);
            } else {
                ignored.insert(format!(
                    "claim of virtual service id {} at epoch {}: no virtual service has that id",
                    c.vs_id, c.epoch
                ));
            }
        }
        best.into_iter()
            .map(|(vs_id, epoch)| Claim { vs_id, epoch })
            .collect()
    }

    /// `peers` that are registered engines.
    fn known_peers(
        &self,
        peers: &BTreeMap<u32, PeerReport>,
        ignored: &mut BTreeSet<String>,
    ) -> BTreeMap<u32, PeerReport> {
        peers
            .iter()
            .filter(|(id, _)| {
                let known = self.name_of(**id).is_some();
                if !known {
                    ignored.insert(format!(
                        "peer report of engine id {id}: no engine has that id"
                    ));
                }
                known
            })
            .map(|(id, r)| (*id, *r))
            .collect()
    }

    fn name_of(&self, id: u32) -> Option<&str> {
        self.p
            .engines
            .values()
            .find(|e| e.id == id)
            .map(|e| e.name.as_str())
    }

    /// An event for each peer whose reported state changed (a peer first reported fully up is
    /// not news).
    fn peer_events(
        &mut self,
        engine: &str,
        before: &BTreeMap<u32, PeerReport>,
        after: &BTreeMap<u32, PeerReport>,
    ) {
        for (id, now) in after {
            let was = before.get(id).copied().unwrap_or(PeerReport {
                daemon_up: true,
                dataplane_up: true,
            });
            if was == *now {
                continue;
            }
            let Some(peer) = self.name_of(*id).map(str::to_owned) else {
                continue;
            };
            self.events.emit(
                "peer_report",
                &[obj("engine", engine), obj("engine", &peer)],
                format!("{engine} reports {peer}: {}", now.describe()),
            );
        }
    }

    /// Notes why claims of `engine` that are not recorded are ignored (the normal case, a claim of
    /// the recorded primary at the recorded epoch, is not noted).
    fn check_claims(&self, engine: &str, ignored: &mut BTreeSet<String>) {
        let Some(o) = self.observed.get(engine) else {
            return;
        };
        for c in &o.claims {
            let Some(vs) = self.p.services.values().find(|v| v.id == c.vs_id) else {
                continue;
            };
            let name = &vs.spec.name;
            let primary = vs.placement.first().map_or("-", String::as_str);
            let why = if c.epoch < vs.epoch {
                format!(
                    "claim of {name} at epoch {}: stale, {primary} is primary at epoch {}",
                    c.epoch, vs.epoch
                )
            } else if c.epoch == vs.epoch {
                if primary == engine {
                    continue;
                }
                format!(
                    "claim of {name} at epoch {}: {primary} is recorded primary at that epoch",
                    c.epoch
                )
            } else if !vs.placement.iter().any(|p| p == engine) {
                format!(
                    "claim of {name} at epoch {}: {engine} is not placed for it",
                    c.epoch
                )
            } else if c.epoch - vs.epoch > MAX_EPOCH_STEP {
                format!(
                    "claim of {name} at epoch {}: absurd, more than {MAX_EPOCH_STEP} above the recorded {}",
                    c.epoch, vs.epoch
                )
            } else {
                continue;
            };
            ignored.insert(why);
        }
    }

    fn log_ignored(&mut self, engine: &str, now: BTreeSet<String>) {
        let before = self.ignored.get(engine);
        for why in now
            .iter()
            .filter(|w| before.is_none_or(|b| !b.contains(*w)))
        {
            // A stale claim is the normal lag of an engine that has not applied a newer record.
            if why.contains(": stale, ") {
                info!(engine, "heartbeat: ignored {why}");
            } else {
                warn!(engine, "heartbeat: ignored {why}");
            }
        }
        if now.is_empty() {
            self.ignored.remove(engine);
        } else {
            self.ignored.insert(engine.to_owned(), now);
        }
    }

    /// Whether `c` (of an engine placed for `vs`) is a promotion to record.
    fn recordable(vs: &VsRecord, c: u64) -> bool {
        c > vs.epoch && c - vs.epoch <= MAX_EPOCH_STEP
    }

    /// Records the engines' promotions: per virtual service, the highest claim above its epoch by
    /// an engine of its placement heard from within the health allowance (equal claims: the engine
    /// earlier in the placement, the engines' own tie rule) becomes the primary at that epoch.
    fn record_claims(&mut self, now: Instant) -> Result<bool, ClusterError> {
        let h = self.settings.health;
        let allowance = h.interval * h.max_missed;
        let mut promotions = Vec::new();
        for vs in self.p.services.values().filter(|v| !v.spec.by_bgp()) {
            let mut best: Option<(u64, &String)> = None;
            for e in &vs.placement {
                let heard = self
                    .health
                    .last_seen(e)
                    .is_some_and(|t| now.saturating_duration_since(t) <= allowance);
                if !heard {
                    continue;
                }
                let Some(o) = self.observed.get(e) else {
                    continue;
                };
                for c in o.claims.iter().filter(|c| c.vs_id == vs.id) {
                    if Self::recordable(vs, c.epoch) && best.is_none_or(|(b, _)| c.epoch > b) {
                        best = Some((c.epoch, e));
                    }
                }
            }
            if let Some((epoch, engine)) = best {
                promotions.push((
                    vs.spec.name.clone(),
                    engine.clone(),
                    epoch,
                    "claimed by the engines".to_owned(),
                ));
            }
        }
        self.promote(promotions)
    }

    /// Each (virtual service, engine, epoch, why): `engine` moves to the front of the placement
    /// and the epoch is set; one commit, one event each. Whether anything was written.
    fn promote(
        &mut self,
        promotions: Vec<(String, String, u64, String)>,
    ) -> Result<bool, ClusterError> {
        if promotions.is_empty() {
            return Ok(false);
        }
        let mut writes = Vec::new();
        let mut notes = Vec::new();
        for (name, engine, epoch, why) in promotions {
            let Some(vs) = self.p.services.get(&name) else {
                continue;
            };
            let previous = vs.placement.first().cloned().unwrap_or_default();
            let mut placement = vs.placement.clone();
            placement.retain(|p| *p != engine);
            placement.insert(0, engine.clone());
            notes.push((name, engine, epoch, previous, why));
            writes.push(Write::Service(VsRecord {
                placement,
                epoch,
                ..vs.clone()
            }));
        }
        self.commit(writes)?;
        for (vs, engine, epoch, previous, why) in notes {
            info!(vs, engine, epoch, previous, "promotion recorded ({why})");
            self.events.emit(
                "promotion",
                &[
                    obj("vs", &vs),
                    obj("engine", &engine),
                    obj("engine", &previous),
                ],
                format!(
                    "{engine} is primary at epoch {epoch} (previous primary {previous}): {why}"
                ),
            );
        }
        Ok(true)
    }

    /// The healthy engines of `vs` that report its primary's data plane up (it still steers).
    fn steering_reports(&self, vs: &VsRecord) -> Vec<String> {
        let Some(id) = vs
            .placement
            .first()
            .and_then(|p| self.p.engines.get(p))
            .map(|e| e.id)
        else {
            return Vec::new();
        };
        vs.placement
            .iter()
            .skip(1)
            .filter(|e| self.health.state(e).is_some_and(EngineHealth::is_healthy))
            .filter(|e| {
                self.observed
                    .get(*e)
                    .and_then(|o| o.peers.get(&id))
                    .is_some_and(|r| r.dataplane_up)
            })
            .cloned()
            .collect()
    }

    /// The controller promotes where the engines cannot: the primary is failed and silent for the
    /// promotion grace, no engine of the service claims above the recorded epoch, and no healthy
    /// engine of it reports the primary's data plane up (a crashed daemon whose data plane still
    /// steers is not replaced). The first healthy engine of the placement takes over at epoch + 1.
    fn promote_failed_primaries(&mut self, now: Instant) -> Result<bool, ClusterError> {
        let h = self.settings.health;
        let allowance = h.interval * h.max_missed;
        let healthy = |e: &str| self.health.state(e).is_some_and(EngineHealth::is_healthy);
        let mut promotions = Vec::new();
        // A service scaled by BGP has no primary: its failed engines just leave.
        for vs in self.p.services.values().filter(|v| !v.spec.by_bgp()) {
            let Some(primary) = vs.placement.first() else {
                continue;
            };
            if healthy(primary) {
                continue;
            }
            let failed_for = self
                .failed_since
                .get(primary)
                .map_or(Duration::ZERO, |t| now.saturating_duration_since(*t));
            let silent = self
                .health
                .last_seen(primary)
                .is_some_and(|t| now.saturating_duration_since(t) > allowance);
            if !silent || failed_for < self.settings.promotion_grace {
                continue;
            }
            let claimed = vs.placement.iter().any(|e| {
                self.observed.get(e).is_some_and(|o| {
                    o.claims
                        .iter()
                        .any(|c| c.vs_id == vs.id && c.epoch > vs.epoch)
                })
            });
            if claimed || !self.steering_reports(vs).is_empty() {
                continue;
            }
            let Some(next) = vs.placement.iter().skip(1).find(|e| healthy(e)) else {
                continue;
            };
            let Some(epoch) = vs.epoch.checked_add(1) else {
                warn!(vs = %vs.spec.name, "epoch at its maximum: no promotion");
                continue;
            };
            promotions.push((
                vs.spec.name.clone(),
                next.clone(),
                epoch,
                format!(
                    "promoted by the controller: {primary} failed {:.1} s ago, no engine promoted and no peer sees its data plane",
                    failed_for.as_secs_f64()
                ),
            ));
        }
        self.promote(promotions)
    }

    pub fn ack(&mut self, engine: &str, version: u64, now: Instant) {
        let o = self.observed.entry(engine.to_owned()).or_default();
        let first = o.applied_version != version;
        o.applied_version = version;
        o.nack = None;
        if first {
            self.events.emit(
                "config_applied",
                &[obj("engine", engine)],
                format!("version {version} applied"),
            );
        }
        self.heartbeat_at(engine, now);
    }

    pub fn nack(&mut self, engine: &str, version: u64, error: &str, now: Instant) {
        let o = self.observed.entry(engine.to_owned()).or_default();
        let repeat = o.nack.as_ref().is_some_and(|(v, _)| *v == version);
        o.nack = Some((version, error.to_owned()));
        if !repeat {
            self.events.emit(
                "config_refused",
                &[obj("engine", engine)],
                format!("version {version} refused: {error}"),
            );
        }
        self.heartbeat_at(engine, now);
    }

    /// Once per health interval: engine health, re-placement around failed engines, anomalies.
    pub fn tick(&mut self, now: Instant) -> Result<(), ClusterError> {
        for t in self.health.tick(now) {
            self.on_health(&t, now);
        }
        self.clock = self.clock.max(now);
        self.promote_failed_primaries(now)?;
        self.replace_failed()?;
        self.advance_scaling(now)?;
        self.rebalance(now);
        // Also persists steps changed without a new snapshot (a version noted after it was built).
        self.refresh()?;
        self.update_anomalies(now);
        Ok(())
    }

    /// Once per rebalance interval of each engine group: the decision as an event (`rebalance`,
    /// with the loads), and the change carried out unless it is a dry run (`rebalance_failed` if
    /// it cannot be). Groups decide independently: at most one change in flight per group.
    fn rebalance(&mut self, now: Instant) {
        let groups: Vec<String> = self.rebalancers.keys().cloned().collect();
        for group in groups {
            self.rebalance_group(&group, now);
        }
    }

    fn rebalance_group(&mut self, group: &str, now: Instant) {
        let healthy: BTreeSet<String> = self
            .p
            .engines
            .values()
            .filter(|e| e.group == group)
            .filter(|e| {
                self.health
                    .state(&e.name)
                    .is_some_and(EngineHealth::is_healthy)
            })
            .map(|e| e.name.clone())
            .collect();
        let services: Vec<RebalanceService> = self
            .p
            .services
            .values()
            .filter(|v| v.spec.engine_group == group)
            .map(|v| RebalanceService {
                name: v.spec.name.clone(),
                placement: v.placement.clone(),
                min_engines: v.spec.min_engines,
                max_engines: v.spec.max_engines,
                by_bgp: v.spec.by_bgp(),
            })
            .collect();
        let Some(d) = self
            .rebalancers
            .get_mut(group)
            .and_then(|r| r.tick(now, &healthy, &services))
        else {
            return;
        };
        let loads = d
            .loads
            .iter()
            .map(|(e, l)| format!("{e} {l:.0}"))
            .collect::<Vec<_>>()
            .join(", ");
        let mut objects = vec![obj("group", group)];
        if let Some(a) = &d.action {
            let (Action::ScaleOut { vs, .. }
            | Action::ScaleIn { vs, .. }
            | Action::Migrate { vs, .. }) = a;
            objects.push(obj("vs", vs));
        }
        let dry = if d.dry_run {
            " (dry run: not carried out)"
        } else {
            ""
        };
        self.events.emit(
            "rebalance",
            &objects,
            format!("{}{dry}; loads: {loads}", d.reason),
        );
        let Some(action) = d.action.filter(|_| !d.dry_run) else {
            return;
        };
        let members: BTreeSet<&str> = services.iter().map(|v| v.name.as_str()).collect();
        if let Some(busy) = self.scaling.in_progress(|vs| members.contains(vs)) {
            self.events.emit(
                "rebalance_failed",
                &objects,
                format!("{action}: deferred, one change at a time per group ({busy})"),
            );
            return;
        }
        let done = match &action {
            Action::ScaleOut { vs, to } => self.scale_out(vs, Some(to)).map(|_| ()),
            Action::ScaleIn { vs, engine } => self.scale_in(vs, Some(engine)).map(|_| ()),
            // A primary's migration promotes the target once it serves; a secondary's scales
            // the old one in once the new one serves.
            Action::Migrate { vs, from, to } => self.migrate(vs, Some(from), Some(to)).map(|_| ()),
        };
        if let Err(e) = done {
            warn!("rebalance: group {group}: {action}: {e}");
            self.events
                .emit("rebalance_failed", &objects, format!("{action}: {e}"));
        }
    }

    fn on_health(&mut self, t: &Transition, now: Instant) {
        match t {
            Transition::Failed { engine, .. } => {
                self.failed_since.entry(engine.clone()).or_insert(now);
            }
            Transition::Recovered { engine } | Transition::FlapEnded { engine } => {
                self.failed_since.remove(engine);
            }
            Transition::Flapping { .. } => {}
        }
        let (engine, reason) = match t {
            Transition::Failed { engine, silent } => (
                engine,
                format!("failed: no heartbeat for {:.1} s", silent.as_secs_f64()),
            ),
            Transition::Recovered { engine } => (engine, "recovered: heartbeats again".into()),
            Transition::Flapping { engine, failures } => (
                engine,
                format!(
                    "flapping: {failures} failures within {} s, kept out of placement for {} s",
                    self.settings.health.flap_window.as_secs(),
                    self.settings.health.flap_hold.as_secs()
                ),
            ),
            Transition::FlapEnded { engine } => (engine, "no longer flapping".into()),
        };
        self.events.emit("health", &[obj("engine", engine)], reason);
    }

    /// A failed secondary leaves every placement it is in, and an eligible engine replaces it where
    /// the virtual service now has fewer than it asks for (N+M). A failed primary stays until a
    /// promotion is recorded (the engines', or the controller's after the grace): then it is an
    /// ordinary secondary and leaves like one. Meanwhile it is an anomaly. A service scaled by BGP
    /// has no primary: any failed engine of it leaves at once (the routers have withdrawn it).
    fn replace_failed(&mut self) -> Result<(), ClusterError> {
        let failed: BTreeSet<String> = self
            .p
            .engines
            .keys()
            .filter(|n| !self.health.state(n).is_some_and(EngineHealth::is_healthy))
            .cloned()
            .collect();
        let mut writes = Vec::new();
        let mut notes = Vec::new();
        for vs in self.p.services.values() {
            let mut placement = vs.placement.clone();
            let before = placement.clone();
            let primary = placement.first().cloned().filter(|_| !vs.spec.by_bgp());
            placement.retain(|e| Some(e) == primary.as_ref() || !failed.contains(e));
            let healthy = placement.iter().filter(|e| !failed.contains(*e)).count();
            let want = vs.spec.min_engines as usize;
            if healthy < want {
                let candidates = self.candidates(&vs.spec.engine_group);
                for name in placement::ranked(&candidates, &vs.spec.tags, &placement)
                    .into_iter()
                    .take(want - healthy)
                {
                    placement.push(name.name.clone());
                }
            }
            if placement != before {
                notes.push((vs.spec.name.clone(), before, placement.clone()));
                writes.push(Write::Service(VsRecord {
                    placement,
                    ..vs.clone()
                }));
            }
        }
        if writes.is_empty() {
            return Ok(());
        }
        self.commit(writes)?;
        for (vs, before, after) in notes {
            self.events.emit(
                "placement",
                &[obj("vs", &vs)],
                format!(
                    "re-placed around failed engines: [{}] → [{}]",
                    before.join(", "),
                    after.join(", ")
                ),
            );
        }
        Ok(())
    }

    #[allow(clippy::too_many_lines)]
    fn update_anomalies(&mut self, now: Instant) {
        let mut found: Vec<Anomaly> = Vec::new();
        let version = self.p.version;
        for name in self.p.engines.keys() {
            let health = self.health.state(name).unwrap_or(EngineHealth::Healthy);
            if !health.is_healthy() {
                found.push(Anomaly {
                    kind: "engine_failed",
                    object: obj("engine", name),
                    reason: format!("engine is {}", health.name()),
                });
                continue;
            }
            let Some(o) = self.observed.get(name) else {
                continue;
            };
            if let Some((v, e)) = &o.nack {
                found.push(Anomaly {
                    kind: "nack",
                    object: obj("engine", name),
                    reason: format!("refused version {v}: {e}"),
                });
            } else if o.connected
                && o.applied_version != version
                // Unacked for the timeout since this version went out: a version made just
                // now is not late because the one before went out long ago.
                && o.sent.is_some_and(|(v, t)| {
                    v == version && now.saturating_duration_since(t) > self.settings.ack_timeout
                })
            {
                found.push(Anomaly {
                    kind: "not_acked",
                    object: obj("engine", name),
                    reason: format!(
                        "runs version {}, version {version} sent more than {} s ago",
                        o.applied_version,
                        self.settings.ack_timeout.as_secs()
                    ),
                });
            }
        }
        for vs in self.p.services.values() {
            let healthy = vs
                .placement
                .iter()
                .filter(|e| self.health.state(e).is_some_and(EngineHealth::is_healthy))
                .count();
            if let Some(primary) = vs.placement.first().filter(|_| !vs.spec.by_bgp())
                && !self
                    .health
                    .state(primary)
                    .is_some_and(EngineHealth::is_healthy)
            {
                let steering = self.steering_reports(vs);
                found.push(Anomaly {
                    kind: "primary_failed",
                    object: obj("vs", &vs.spec.name),
                    reason: if steering.is_empty() {
                        format!("its primary {primary} is failed")
                    } else {
                        format!(
                            "its primary {primary} is failed, but {} report(s) its data plane still steering: not replaced while it steers",
                            steering.join(", ")
                        )
                    },
                });
            }
            if healthy < vs.spec.min_engines as usize {
                found.push(Anomaly {
                    kind: "vs_degraded",
                    object: obj("vs", &vs.spec.name),
                    reason: format!(
                        "{healthy} healthy engine(s), {} asked for",
                        vs.spec.min_engines
                    ),
                });
            }
        }
        for pool in self.p.pools.keys() {
            let reports: Vec<u32> = self
                .observed
                .iter()
                .filter(|(e, _)| self.health.state(e).is_some_and(EngineHealth::is_healthy))
                .filter_map(|(_, o)| o.backends_up.get(pool).copied())
                .collect();
            if !reports.is_empty() && reports.iter().all(|up| *up == 0) {
                found.push(Anomaly {
                    kind: "pool_down",
                    object: obj("pool", pool),
                    reason: "no engine sees a healthy backend".into(),
                });
            }
        }
        let now_ms = crate::events::unix_ms(std::time::SystemTime::now());
        let found: BTreeMap<(&'static str, String), Anomaly> = found
            .into_iter()
            .map(|a| ((a.kind, a.object.clone()), a))
            .collect();
        let cleared: Vec<_> = self
            .anomalies
            .keys()
            .filter(|k| !found.contains_key(*k))
            .cloned()
            .collect();
        for k in cleared {
            if let Some((a, _)) = self.anomalies.remove(&k) {
                self.events.emit(
                    "anomaly_cleared",
                    std::slice::from_ref(&a.object),
                    format!("{}: resolved", a.kind),
                );
            }
        }
        for (k, a) in found {
            if let Some((old, _)) = self.anomalies.get_mut(&k) {
                *old = a;
            } else {
                self.events.emit(
                    "anomaly_raised",
                    std::slice::from_ref(&a.object),
                    format!("{}: {}", a.kind, a.reason),
                );
                self.anomalies.insert(k, (a, now_ms));
            }
        }
    }

    /// The engines of `group` as placement sees them.
    fn candidates(&self, group: &str) -> Vec<Candidate> {
        self.p
            .engines
            .values()
            .filter(|e| e.group == group)
            .map(|e| Candidate {
                name: e.name.clone(),
                tags: e.tags.clone(),
                unavailable: match self.health.state(&e.name) {
                    Some(EngineHealth::Healthy) | None => None,
                    Some(EngineHealth::Failed) => Some("failed"),
                    Some(EngineHealth::Flapping { .. }) => Some("flapping"),
                },
                cpu_pct: self.observed.get(&e.name).map_or(0.0, |o| o.cpu_pct),
                virtual_services: self
                    .p
                    .services
                    .values()
                    .filter(|v| v.placement.contains(&e.name))
                    .count(),
            })
            .collect()
    }

    // ----- pools -----

    pub fn create_pool(&mut self, config: PoolConfig) -> Result<PoolRecord, ClusterError> {
        if self.p.pools.contains_key(&config.name) {
            return Err(ClusterError::AlreadyExists(format!(
                "pool {:?} exists",
                config.name
            )));
        }
        self.put_pool(config, 1)
    }

    pub fn update_pool(
        &mut self,
        config: PoolConfig,
        resource_version: u64,
    ) -> Result<PoolRecord, ClusterError> {
        let old = self
            .p
            .pools
            .get(&config.name)
            .ok_or_else(|| ClusterError::NotFound(format!("pool {:?}", config.name)))?;
        check_version("pool", &config.name, old.resource_version, resource_version)?;
        let next = old.resource_version + 1;
        self.put_pool(config, next)
    }

    fn put_pool(&mut self, config: PoolConfig, rv: u64) -> Result<PoolRecord, ClusterError> {
        check_name("name", &config.name)?;
        let mut p = self.p.clone();
        let rec = PoolRecord {
            config,
            resource_version: rv,
        };
        p.pools.insert(rec.config.name.clone(), rec.clone());
        self.check_desired(&p)?;
        self.commit(vec![Write::Pool(rec.clone())])?;
        self.events.emit(
            "placement",
            &[obj("pool", &rec.config.name)],
            if rv == 1 { "created" } else { "updated" },
        );
        self.refresh()?;
        Ok(rec)
    }

    pub fn delete_pool(&mut self, name: &str) -> Result<(), ClusterError> {
        if !self.p.pools.contains_key(name) {
            return Err(ClusterError::NotFound(format!("pool {name:?}")));
        }
        if let Some(vs) = self.p.services.values().find(|v| v.spec.pool == name) {
            return Err(ClusterError::FailedPrecondition(format!(
                "pool {name:?} is used by virtual service {:?}",
                vs.spec.name
            )));
        }
        self.commit(vec![Write::DeletePool(name.to_owned())])?;
        self.events
            .emit("placement", &[obj("pool", name)], "deleted");
        self.refresh()
    }

    // ----- BGP -----

    /// Replaces the engines' BGP settings (`config.router_id` unset: each engine uses its own
    /// address), or removes them (`None`), against `resource_version` (0 when there are none).
    pub fn set_bgp(
        &mut self,
        config: Option<BgpConfig>,
        resource_version: u64,
    ) -> Result<Option<BgpRecord>, ClusterError> {
        let stored = self.p.bgp.as_ref().map_or(0, |b| b.resource_version);
        check_version("BGP settings", "bgp", stored, resource_version)?;
        if config.is_none()
            && let Some(vs) = self.p.services.values().find(|v| v.spec.by_bgp())
        {
            return Err(ClusterError::FailedPrecondition(format!(
                "virtual service {:?} is in scaling mode bgp: change or delete it before turning BGP off",
                vs.spec.name
            )));
        }
        let rec = config.map(|config| BgpRecord {
            config,
            resource_version: stored + 1,
        });
        let mut p = self.p.clone();
        p.bgp.clone_from(&rec);
        self.check_desired(&p)?;
        self.commit(vec![Write::Bgp(rec.clone())])?;
        let reason = match &rec {
            Some(r) => format!(
                "BGP settings: AS {}, peers [{}]",
                r.config.asn,
                r.config
                    .peers
                    .iter()
                    .map(|p| format!(
                        "{} AS {}{}",
                        p.address,
                        p.asn,
                        if p.bfd.is_some() { " bfd" } else { "" }
                    ))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
            None => "BGP settings removed: BGP off".to_owned(),
        };
        self.events.emit("bgp", &[], reason);
        self.refresh()?;
        Ok(rec)
    }

    // ----- virtual services -----

    pub fn create_vs(&mut self, spec: VsSpec) -> Result<VsRecord, ClusterError> {
        if self.p.services.contains_key(&spec.name) {
            return Err(ClusterError::AlreadyExists(format!(
                "virtual service {:?} exists",
                spec.name
            )));
        }
        self.check_spec(&spec)?;
        let id = (0..self.settings.max_virtual_services)
            .find(|id| self.p.services.values().all(|v| v.id != *id))
            .ok_or_else(|| {
                ClusterError::FailedPrecondition(format!(
                    "all {} virtual service ids are in use (max_virtual_services)",
                    self.settings.max_virtual_services
                ))
            })?;
        let placement = placement::choose(
            &self.candidates(&spec.engine_group),
            &spec.tags,
            spec.min_engines as usize,
            &[],
        )
        .map_err(|e| {
            ClusterError::FailedPrecondition(format!("engine group {:?}: {e}", spec.engine_group))
        })?;
        let rec = VsRecord {
            spec,
            id,
            placement,
            epoch: 0,
            resource_version: 1,
        };
        self.put_vs(rec, "created")
    }

    pub fn update_vs(
        &mut self,
        spec: VsSpec,
        resource_version: u64,
    ) -> Result<VsRecord, ClusterError> {
        let old = self
            .p
            .services
            .get(&spec.name)
            .ok_or_else(|| ClusterError::NotFound(format!("virtual service {:?}", spec.name)))?
            .clone();
        check_version(
            "virtual service",
            &spec.name,
            old.resource_version,
            resource_version,
        )?;
        if spec.engine_group != old.spec.engine_group {
            return Err(invalid(
                "engine_group",
                format!(
                    "{:?} → {:?}: a virtual service stays in the group it was created in; create it anew in the other group",
                    old.spec.engine_group, spec.engine_group
                ),
            ));
        }
        self.check_spec(&spec)?;
        let mut placement = old.placement.clone();
        let want_min = spec.min_engines as usize;
        if placement.len() < want_min {
            let extra = placement::choose(
                &self.candidates(&spec.engine_group),
                &spec.tags,
                want_min - placement.len(),
                &placement,
            )
            .map_err(|e| {
                ClusterError::FailedPrecondition(format!(
                    "engine group {:?}: {e}",
                    spec.engine_group
                ))
            })?;
            placement.extend(extra);
        }
        placement.truncate(spec.max_engines as usize);
        let rec = VsRecord {
            spec,
            placement,
            resource_version: old.resource_version + 1,
            ..old
        };
        self.put_vs(rec, "updated")
    }

    fn put_vs(&mut self, rec: VsRecord, what: &str) -> Result<VsRecord, ClusterError> {
        let mut p = self.p.clone();
        p.services.insert(rec.spec.name.clone(), rec.clone());
        self.check_desired(&p)?;
        self.commit(vec![Write::Service(rec.clone())])?;
        self.events.emit(
            "placement",
            &[obj("vs", &rec.spec.name)],
            if rec.spec.by_bgp() {
                format!(
                    "{what}: id {}, scaled by BGP, engines [{}]",
                    rec.id,
                    rec.placement.join(", ")
                )
            } else {
                format!(
                    "{what}: id {}, primary {}, engines [{}]",
                    rec.id,
                    rec.placement.first().map_or("-", String::as_str),
                    rec.placement.join(", ")
                )
            },
        );
        self.refresh()?;
        Ok(rec)
    }

    pub fn delete_vs(&mut self, name: &str) -> Result<(), ClusterError> {
        if !self.p.services.contains_key(name) {
            return Err(ClusterError::NotFound(format!("virtual service {name:?}")));
        }
        self.commit(vec![Write::DeleteService(name.to_owned())])?;
        self.events.emit("placement", &[obj("vs", name)], "deleted");
        self.refresh()
    }

    fn vs(&self, name: &str) -> Result<VsRecord, ClusterError> {
        self.p
            .services
            .get(name)
            .cloned()
            .ok_or_else(|| ClusterError::NotFound(format!("virtual service {name:?}")))
    }

    fn check_spec(&self, spec: &VsSpec) -> Result<(), ClusterError> {
        check_name("name", &spec.name)?;
        if !self.p.pools.contains_key(&spec.pool) {
            return Err(ClusterError::NotFound(format!("pool {:?}", spec.pool)));
        }
        if !self.p.groups.contains_key(&spec.engine_group) {
            return Err(ClusterError::NotFound(format!(
                "engine group {:?}",
                spec.engine_group
            )));
        }
        if spec.min_engines == 0 {
            return Err(invalid("scaling.min_engines", "must be at least 1"));
        }
        if spec.min_engines > spec.max_engines {
            return Err(invalid(
                "scaling.min_engines",
                format!(
                    "{} is above max_engines ({})",
                    spec.min_engines, spec.max_engines
                ),
            ));
        }
        if spec.by_bgp() {
            if self.p.bgp.is_none() {
                return Err(ClusterError::FailedPrecondition(
                    "scaling mode bgp needs the engines' BGP settings: set them first (SetBgp, lbctl bgp set)".to_owned(),
                ));
            }
            if spec.max_engines > BGP_MAX_ENGINES {
                return Err(invalid(
                    "scaling.max_engines",
                    format!(
                        "{} is above {BGP_MAX_ENGINES}, the most engines of a virtual service in scaling mode bgp",
                        spec.max_engines
                    ),
                ));
            }
        } else if spec.max_engines > self.settings.native_max_engines {
            return Err(invalid(
                "scaling.max_engines",
                format!(
                    "{} is above the native scaling limit of {} engines per virtual service; beyond it a virtual service scales by BGP/ECMP: create or update it with scaling mode bgp (lbctl vs … --mode bgp), up to {BGP_MAX_ENGINES} engines",
                    spec.max_engines, self.settings.native_max_engines
                ),
            ));
        }
        if let Some(other) = self.p.services.values().find(|v| {
            v.spec.name != spec.name
                && v.spec.vip == spec.vip
                && v.spec.port == spec.port
                && v.spec.protocol == spec.protocol
        }) {
            return Err(ClusterError::AlreadyExists(format!(
                "{} port {} {} is already served by virtual service {:?}",
                spec.vip, spec.port, spec.protocol, other.spec.name
            )));
        }
        Ok(())
    }

    /// The model's own validation, over what the engines would get, with the first registered
    /// engine as the host (every engine runs the same checks when it applies the snapshot).
    fn check_desired(&self, p: &Persisted) -> Result<(), ClusterError> {
        let mut desired = desired_of(p, |_| true, |v| self.weights_of(v));
        if let Some(b) = desired.bgp.as_mut() {
            // Each engine uses its own address; an engine without one refuses the snapshot.
            b.router_id = std::net::Ipv4Addr::new(192, 0, 2, 1);
        }
        let host = desired.engines.first().map_or(0, |e| e.id);
        let mut daemon = DaemonConfig::new("eth0", host);
        daemon.max_virtual_services = self.settings.max_virtual_services;
        if desired.engines.is_empty() {
            // No engine registered yet: check pools and services against a stand-in host.
            desired.engines.push(EngineConfig::l2(0, None));
        }
        Config::from_parts(daemon, desired).map_err(|e| match e {
            // The model names fields by their place in the snapshot (`pools[2].backends[0].port`);
            // the caller sent one object: name the field within it.
            lb_model::ConfigError::Invalid { field, reason } => {
                let field = match field.split_once("].") {
                    Some((head, rest))
                        if head.starts_with("pools[") || head.starts_with("virtual_services[") =>
                    {
                        rest.to_owned()
                    }
                    _ => field,
                };
                ClusterError::InvalidArgument { field, reason }
            }
            other => invalid("configuration", other.to_string()),
        })?;
        Ok(())
    }
}

/// The snapshot of `p`: every registered engine (down unless `healthy`, or the primary of a virtual
/// service), every pool, every virtual service with its placement as members (weight 1 each; the
/// primary first).
///
/// A failed primary stays active until a promotion is recorded: engines probe only active engines,
/// so its peers keep probing it and what they report of its data plane (still steering, or gone)
/// stays current, for them (they replace it once it is gone) and for the controller (it does not
/// replace a primary whose data plane steers). Its peers' own view keeps new flows off its proxy.
fn desired_of(
    p: &Persisted,
    healthy: impl Fn(&str) -> bool,
    weights: impl Fn(&VsRecord) -> Vec<u32>,
) -> Desired {
    let timeout_s = |group: &str| {
        p.groups
            .get(group)
            .map(|g| u32::try_from(g.settings.scalein_timeout.as_secs()).unwrap_or(u32::MAX))
    };
    let primaries: BTreeSet<&str> = p
        .services
        .values()
        .filter(|v| !v.spec.by_bgp())
        .filter_map(|v| v.placement.first().map(String::as_str))
        .collect();
    let engines = p
        .engines
        .values()
        .map(|e| EngineConfig {
            state: if healthy(&e.name) || primaries.contains(e.name.as_str()) {
                EngineState::Active
            } else {
                EngineState::Down
            },
            // Its address on the segment: where its peers probe it.
            address_v4: e.addresses.iter().find_map(|a| match a {
                std::net::IpAddr::V4(v4) => Some(*v4),
                std::net::IpAddr::V6(_) => None,
            }),
            ..EngineConfig::l2(e.id, Some(e.mac))
        })
        .collect();
    let id_of = |name: &str| p.engines.get(name).map(|e| e.id);
    let virtual_services = p
        .services
        .values()
        .filter_map(|v| {
            let members: Vec<Member> = v
                .placement
                .iter()
                .zip(weights(v))
                .filter_map(|(n, weight)| {
                    Some(Member {
                        id: id_of(n)?,
                        weight,
                    })
                })
                .collect();
            let primary = members.first()?.id;
            Some(VirtualServiceConfig {
                id: v.id,
                name: v.spec.name.clone(),
                vip: v.spec.vip,
                port: v.spec.port,
                protocol: v.spec.protocol,
                primary,
                epoch: v.epoch,
                persistence_timeout_s: v.spec.persistence_timeout_s,
                engines: members,
                pool: Some(v.spec.pool.clone()),
                max_connections: v.spec.max_connections,
                draining: false,
                drain_timeout_s: timeout_s(&v.spec.engine_group),
                bgp: v.spec.bgp.clone(),
            })
        })
        .collect();
    Desired {
        proxy: ProxyConfig {
            drain_timeout_s: timeout_s(DEFAULT_GROUP)
                .unwrap_or(ProxyConfig::default().drain_timeout_s),
            ..ProxyConfig::default()
        },
        engines,
        virtual_services,
        pools: p.pools.values().map(|r| r.config.clone()).collect(),
        peers: (!p.peer_key.is_empty())
            .then(|| lb_model::PeersConfig::with_key(p.peer_key.clone())),
        bgp: p.bgp.as_ref().map(|b| b.config.clone()),
    }
}

fn check_version(kind: &str, name: &str, stored: u64, given: u64) -> Result<(), ClusterError> {
    if given != stored {
        return Err(ClusterError::Aborted(format!(
            "{kind} {name:?} is at resource_version {stored}, the update was made against {given}: read it again and retry"
        )));
    }
    Ok(())
}

/// Names of engines, pools and virtual services: 1–63 of `[A-Za-z0-9._-]`, starting with an
/// alphanumeric.
pub fn check_name(field: &str, name: &str) -> Result<(), ClusterError> {
    let ok = !name.is_empty()
        && name.len() <= 63
        && name.starts_with(|c: char| c.is_ascii_alphanumeric())
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '.' | '_' | '-'));
    if ok {
        Ok(())
    } else {
        Err(invalid(
            field,
            format!(
                "{name:?} is not a valid name (1-63 letters, digits, '.', '_', '-', starting with a letter or digit)"
            ),
        ))
    }
}

mod groups;
mod scaling;
#[cfg(test)]
mod tests;
