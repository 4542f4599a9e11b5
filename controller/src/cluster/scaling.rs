//! Scale out, scale in and migrate, step by step.
//!
//! - **Scale out**: the engine joins the placement with weight 0 (`pending`): it opens its
//!   listeners and health-checks the pool, but the primary sends it nothing new. Once it has
//!   applied the version that placed it and its heartbeats list the service as served (listening,
//!   a usable backend), it gets its weight.
//! - **Scale in**: first the engine gets weight 0 (`leaving`), still placed and listening: the
//!   primary stops sending it new connections, and a SYN already on its way is still answered.
//!   Once the primary has applied that version and [`HANDSHAKE_GRACE`] has passed (handshakes
//!   begun before complete), the engine leaves the placement. Its proxy closes the listener
//!   (once it has accepted its accept queue) and lets open connections finish for the scale-in
//!   timeout (`vs_scalein_timeout`, the engines' `proxy.drain_timeout_s`), then resets the rest; the
//!   primary keeps sending it the packets of the flows it owns meanwhile. Its heartbeats report
//!   the drain; its end is an event (`drain`, or `drain_reset` when connections were reset).
//!   (Leaving in one step raced: an engine that closed its listener before the primary applied
//!   the new ring got SYNs it dropped, and the primary's connection table kept sending their
//!   retransmissions there.)
//! - **Migrate**: the target scales out as above; once it serves, it becomes primary at the next
//!   epoch (the engines' promotion path: it takes the VIP and announces it) while the old primary
//!   stays placed with weight 0, so it hands its flows over and answers owner queries. Once both
//!   have applied that version, the old primary leaves as in a scale-in (its weight is already
//!   0 on the new primary), after the same grace. A secondary's migration is a scale-out and,
//!   once the target serves, a scale-in.
//! - **The primary's share**: it also steers every packet of the service, so while other engines
//!   serve it gets a smaller weight than theirs (`BASE_WEIGHT`), from its spare CPU.
//!
//! This state lives in memory: a restarted controller finds a consistent placement (a pending
//! engine gets its weight, a half-done migration stays a scale-out, a leaving engine is taken for
//! a pending one and gets its weight back) and does not resume a step.

use std::{
    collections::BTreeMap,
    time::{Duration, Instant},
};

use super::{Cluster, ClusterError, EngineHealth, obj, placement};
use crate::store::VsRecord;

/// A serving secondary's weight in the ring of new connections.
pub const BASE_WEIGHT: u32 = 100;
/// The primary's weight bounds: always below a secondary's, never none.
pub const PRIMARY_WEIGHT_MAX: u32 = 80;
pub const PRIMARY_WEIGHT_MIN: u32 = 10;
/// The primary's weight changes by at least this much, and at most once per
/// [`PRIMARY_WEIGHT_HOLD`], so CPU noise does not churn the rings.
pub const PRIMARY_WEIGHT_STEP: u32 = 20;
pub const PRIMARY_WEIGHT_HOLD: Duration = Duration::from_secs(30);
/// A drain nobody reports on is forgotten this long after its timeout.
const DRAIN_REPORT_GRACE: Duration = Duration::from_secs(30);
/// How long a leaving engine keeps listening at weight 0 after its primary has applied that
/// weight: a SYN steered to it just before has this long to complete its handshake there (the
/// client's round trip, a lost SYN-ACK resent after the kernel's 1 s, a SYN resent that the
/// primary's connection table still sends there). Its listener closes when it leaves, and the
/// kernel resets what is half open or waits in the accept queue then.
pub const HANDSHAKE_GRACE: Duration = Duration::from_secs(3);

/// The primary's weight for its CPU use: its spare CPU in steps of 10 %, within the bounds.
#[must_use]
pub fn primary_weight(cpu_pct: f64) -> u32 {
    let spare = if cpu_pct.is_finite() {
        (100.0 - cpu_pct).clamp(0.0, 100.0)
    } else {
        0.0
    };
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    let stepped = (spare / 10.0).floor() as u32 * 10;
    stepped.clamp(PRIMARY_WEIGHT_MIN, PRIMARY_WEIGHT_MAX)
}

#[derive(Debug, Clone, PartialEq, Eq)]
enum Stage {
    /// The target scaled out and does not serve yet.
    TargetPending,
    /// The target is primary at `version`; the old primary stays until both have applied it.
    Promoted { version: u64 },
}

/// An engine leaving a service once its primary has applied `version` (its weight 0 there;
/// `u64::MAX` until that snapshot is built); `what` names the leave in events.
#[derive(Debug, Clone)]
struct Leaving {
    version: u64,
    what: String,
}

/// The steps in flight as they are persisted (`u64::MAX`: the version of the snapshot being
/// built, read back as the stored snapshot's), so that a restarted controller resumes them.
#[derive(Debug, Clone, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Steps {
    /// (service, engine, version that placed it).
    pending: Vec<(String, String, u64)>,
    /// (service, engine, version it leaves at, what).
    leaving: Vec<(String, String, u64, String)>,
    /// (service, from, to, `None` while the target is pending, else the version that promoted
    /// it).
    migrations: Vec<(String, String, String, Option<u64>)>,
}

#[derive(Debug, Clone)]
struct Migration {
    from: String,
    to: String,
    stage: Stage,
}

/// An engine's drain of a service, from its heartbeats.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct DrainReport {
    pub virtual_service: String,
    pub open: u64,
    pub finished: u64,
    pub reset: u64,
    pub remaining_ms: u64,
    pub done: bool,
}

#[derive(Debug, Clone)]
struct DrainView {
    report: Option<DrainReport>,
    since: Instant,
}

/// One engine of a service as the API shows it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct PlacementView {
    pub engine: String,
    pub role: &'static str,
    pub weight: u32,
    /// "serving", "pending", "draining".
    pub phase: &'static str,
    pub open_connections: u64,
    pub remaining_ms: u64,
}

#[derive(Debug, Default)]
pub struct Scaling {
    /// Scaled-out engines not serving yet: (service, engine) → the version that placed them.
    pending: BTreeMap<(String, String), u64>,
    /// Engines on their way out, at weight 0 until the primary has applied it: (service, engine)
    /// → the leave.
    leaving: BTreeMap<(String, String), Leaving>,
    migrations: BTreeMap<String, Migration>,
    /// (service, engine) → a drain begun or reported, until it has ended.
    drains: BTreeMap<(String, String), DrainView>,
    /// Service → its primary's weight and when it was set.
    primary_weights: BTreeMap<String, (u32, Instant)>,
    /// (service, engine) → when the engine, leaving, could have left: its handshakes' grace
    /// ([`HANDSHAKE_GRACE`]) runs from there.
    ready_to_leave: BTreeMap<(String, String), Instant>,
}

impl Scaling {
    /// What the last snapshot (`desired`, at `version`) says of the steps in flight, so that a
    /// restarted controller builds the same snapshot: each primary's weight, and secondaries of
    /// weight 0 as pending (they get their weight once they serve).
    ///
    /// With the persisted `steps`, those are resumed instead: pending engines, leaving engines
    /// and migrations where they were.
    pub fn restore(
        desired: &lb_model::Desired,
        name_of: impl Fn(u32) -> Option<String>,
        version: u64,
        now: Instant,
        steps: Option<Steps>,
    ) -> Scaling {
        let mut s = Scaling::default();
        if let Some(steps) = steps {
            let at = |v: u64| if v == u64::MAX { version } else { v };
            for (vs, e, v) in steps.pending {
                s.pending.insert((vs, e), at(v));
            }
            for (vs, e, v, what) in steps.leaving {
                s.leaving.insert(
                    (vs, e),
                    Leaving {
                        version: at(v),
                        what,
                    },
                );
            }
            for (vs, from, to, promoted) in steps.migrations {
                let stage =
                    promoted.map_or(Stage::TargetPending, |v| Stage::Promoted { version: at(v) });
                s.migrations.insert(vs, Migration { from, to, stage });
            }
            for vs in &desired.virtual_services {
                if let Some(primary) = vs.engines.first()
                    && vs.engines.len() > 1
                    && (PRIMARY_WEIGHT_MIN..=PRIMARY_WEIGHT_MAX).contains(&primary.weight)
                {
                    s.primary_weights
                        .insert(vs.name.clone(), (primary.weight, now));
                }
            }
            return s;
        }
        for vs in &desired.virtual_services {
            let Some((primary, rest)) = vs.engines.split_first() else {
                continue;
            };
            if rest.is_empty() {
                continue;
            }
            if (PRIMARY_WEIGHT_MIN..=PRIMARY_WEIGHT_MAX).contains(&primary.weight) {
                s.primary_weights
                    .insert(vs.name.clone(), (primary.weight, now));
            }
            for m in rest.iter().filter(|m| m.weight == 0) {
                if let Some(engine) = name_of(m.id) {
                    s.pending.insert((vs.name.clone(), engine), version);
                }
            }
        }
        s
    }

    /// The weight of `engine`, at `index` of `v`'s placement, in the snapshot.
    pub fn weight(&self, v: &VsRecord, index: usize, engine: &str) -> u32 {
        let name = &v.spec.name;
        let key = (name.clone(), engine.to_owned());
        if self.pending.contains_key(&key) || self.leaving.contains_key(&key) {
            return 0;
        }
        if let Some(m) = self.migrations.get(name)
            && matches!(m.stage, Stage::Promoted { .. })
            && m.from == engine
        {
            return 0;
        }
        // A primary steers every packet too (no such role in scaling mode bgp).
        if index == 0 && v.placement.len() > 1 && !v.spec.by_bgp() {
            return self
                .primary_weights
                .get(name)
                .map_or(PRIMARY_WEIGHT_MAX, |w| w.0);
        }
        BASE_WEIGHT
    }

    /// The steps in flight, to persist.
    pub fn steps(&self) -> Steps {
        Steps {
            pending: self
                .pending
                .iter()
                .map(|((vs, e), v)| (vs.clone(), e.clone(), *v))
                .collect(),
            leaving: self
                .leaving
                .iter()
                .map(|((vs, e), l)| (vs.clone(), e.clone(), l.version, l.what.clone()))
                .collect(),
            migrations: self
                .migrations
                .iter()
                .map(|(vs, m)| {
                    let promoted = match m.stage {
                        Stage::TargetPending => None,
                        Stage::Promoted { version } => Some(version),
                    };
                    (vs.clone(), m.from.clone(), m.to.clone(), promoted)
                })
                .collect(),
        }
    }

    /// What is in progress for the services `of` selects (an engine group's), if anything: the
    /// rebalance loop makes one change at a time per group.
    pub fn in_progress(&self, of: impl Fn(&str) -> bool) -> Option<String> {
        if let Some((vs, e)) = self.pending.keys().find(|(vs, _)| of(vs)) {
            return Some(format!("{e} scaling out {vs} is not serving yet"));
        }
        if let Some((vs, m)) = self.migrations.iter().find(|(vs, _)| of(vs)) {
            return Some(format!("migrating {vs} from {} to {}", m.from, m.to));
        }
        if let Some((vs, e)) = self.leaving.keys().find(|(vs, _)| of(vs)) {
            return Some(format!("{e} leaves {vs}"));
        }
        self.drains
            .keys()
            .find(|(vs, _)| of(vs))
            .map(|(vs, e)| format!("{e} drains {vs}"))
    }
}

impl Cluster {
    /// The weight of every placed engine of `v`, in placement order.
    pub(super) fn weights_of(&self, v: &VsRecord) -> Vec<u32> {
        let w: Vec<u32> = v
            .placement
            .iter()
            .enumerate()
            .map(|(i, e)| self.scaling.weight(v, i, e))
            .collect();
        // The model needs one engine with a weight: never the case here, but never refused.
        if w.iter().all(|&x| x == 0) {
            return vec![BASE_WEIGHT; w.len()];
        }
        w
    }

    /// The placement as the API shows it: placed engines, then those draining the service.
    pub fn placement_view(&self, v: &VsRecord) -> Vec<PlacementView> {
        let name = &v.spec.name;
        let weights = self.weights_of(v);
        let timeout_ms = u64::try_from(self.scalein_timeout(name).as_millis()).unwrap_or(u64::MAX);
        let mut out: Vec<PlacementView> =
            v.placement
                .iter()
                .zip(weights)
                .enumerate()
                .map(|(i, (e, weight))| {
                    let key = (name.clone(), e.clone());
                    let handing_over =
                        self.scaling.migrations.get(name).is_some_and(|m| {
                            matches!(m.stage, Stage::Promoted { .. }) && m.from == *e
                        }) || self.scaling.leaving.contains_key(&key);
                    PlacementView {
                        engine: e.clone(),
                        role: crate::api::role(&v.spec, i),
                        weight,
                        phase: if self.scaling.pending.contains_key(&key) {
                            "pending"
                        } else if handing_over {
                            "draining"
                        } else {
                            "serving"
                        },
                        open_connections: 0,
                        // Its drain has not begun: all of it is left.
                        remaining_ms: if handing_over { timeout_ms } else { 0 },
                    }
                })
                .collect();
        for ((vs, e), d) in &self.scaling.drains {
            if vs != name || v.placement.contains(e) {
                continue;
            }
            let r = d.report.clone().unwrap_or_default();
            out.push(PlacementView {
                engine: e.clone(),
                role: if v.spec.by_bgp() {
                    "member"
                } else {
                    "secondary"
                },
                weight: 0,
                phase: "draining",
                open_connections: r.open,
                remaining_ms: r.remaining_ms,
            });
        }
        out
    }

    /// Adds a secondary (`engine`, or placement's choice); it gets new connections once it serves.
    pub fn scale_out(
        &mut self,
        name: &str,
        engine: Option<&str>,
    ) -> Result<VsRecord, ClusterError> {
        let mut rec = self.vs(name)?;
        if rec.placement.len() >= rec.spec.max_engines as usize {
            let native = if rec.spec.max_engines >= self.settings.native_max_engines {
                format!(
                    "; native scaling stops at {} engines per virtual service (the controller's \
                     --native-max-engines, up to 64): beyond it a virtual service scales by \
                     BGP/ECMP",
                    self.settings.native_max_engines
                )
            } else {
                String::new()
            };
            return Err(ClusterError::FailedPrecondition(format!(
                "virtual service {name:?} is at its max_engines ({}){native}",
                rec.spec.max_engines
            )));
        }
        let group_max = self
            .group_settings(&rec.spec.engine_group)
            .max_scaleout_per_vs;
        if rec.placement.len() >= group_max as usize {
            return Err(ClusterError::FailedPrecondition(format!(
                "virtual service {name:?} is at its engine group {:?}'s max_scaleout_per_vs ({group_max})",
                rec.spec.engine_group
            )));
        }
        let chosen = self.target_for(&rec, engine)?;
        rec.placement.push(chosen.clone());
        rec.resource_version += 1;
        self.events.emit(
            "scaling",
            &[obj("vs", name), obj("engine", &chosen)],
            "scale out: added as a secondary; it gets new connections once it serves",
        );
        let key = (name.to_owned(), chosen);
        // Pending before the snapshot is built: its first snapshot already gives it weight 0.
        self.scaling.pending.insert(key.clone(), u64::MAX);
        match self.put_vs(rec, "scaled out") {
            Ok(rec) => {
                self.scaling.pending.insert(key, self.p.version);
                Ok(rec)
            }
            Err(e) => {
                self.scaling.pending.remove(&key);
                Err(e)
            }
        }
    }

    /// An eligible engine for `rec`: `engine` if it is one, else placement's choice.
    fn target_for(&self, rec: &VsRecord, engine: Option<&str>) -> Result<String, ClusterError> {
        let name = &rec.spec.name;
        let group = &rec.spec.engine_group;
        let c = self.candidates(group);
        match engine {
            Some(e) => {
                if placement::ranked(&c, &rec.spec.tags, &rec.placement)
                    .iter()
                    .any(|c| c.name == e)
                {
                    return Ok(e.to_owned());
                }
                let why = match self.p.engines.get(e) {
                    None => "no such engine".to_owned(),
                    Some(r) if r.group != *group => {
                        format!(
                            "it is in engine group {:?}, the service in {group:?}",
                            r.group
                        )
                    }
                    Some(_) if rec.placement.iter().any(|p| p == e) => "already placed".to_owned(),
                    Some(_) if !self.health.state(e).is_some_and(EngineHealth::is_healthy) => {
                        "not healthy".to_owned()
                    }
                    Some(_) => "without the service's tags".to_owned(),
                };
                Err(ClusterError::FailedPrecondition(format!(
                    "engine {e:?} is not eligible for {name:?}: {why}"
                )))
            }
            None => Ok(placement::choose(&c, &rec.spec.tags, 1, &rec.placement)
                .map_err(|e| {
                    ClusterError::FailedPrecondition(format!(
                        "no eligible engine for {name:?} in engine group {group:?}: {e}"
                    ))
                })?
                .remove(0)),
        }
    }

    /// Takes a secondary (`engine`, or the last one placed) out: it gets no new connections from
    /// the next snapshot on; once the primary has applied that, it leaves and drains for the
    /// scale-in timeout (`Cluster::advance_scaling`).
    pub fn scale_in(&mut self, name: &str, engine: Option<&str>) -> Result<VsRecord, ClusterError> {
        let rec = self.vs(name)?;
        let is_leaving = |e: &str| {
            self.scaling
                .leaving
                .contains_key(&(name.to_owned(), e.to_owned()))
        };
        let staying: Vec<&String> = rec.placement.iter().filter(|e| !is_leaving(e)).collect();
        let at_min = staying.len() <= rec.spec.min_engines as usize;
        let victim = match engine {
            Some(e)
                if !rec.spec.by_bgp() && rec.placement.first().map(String::as_str) == Some(e) =>
            {
                return Err(ClusterError::FailedPrecondition(format!(
                    "{e:?} is the primary of {name:?}: migrate it instead"
                )));
            }
            Some(e) if !rec.placement.iter().any(|p| p == e) => {
                return Err(ClusterError::NotFound(format!(
                    "engine {e:?} is not placed for {name:?}"
                )));
            }
            Some(e) if is_leaving(e) => {
                return Err(ClusterError::FailedPrecondition(format!(
                    "{e:?} is already leaving {name:?}"
                )));
            }
            _ if at_min => {
                return Err(ClusterError::FailedPrecondition(format!(
                    "virtual service {name:?} is at its min_engines ({})",
                    rec.spec.min_engines
                )));
            }
            Some(e) => e.to_owned(),
            None => (*staying.last().expect("more than min_engines")).clone(),
        };
        if let Some(m) = self.scaling.migrations.get(name)
            && (m.to == victim || m.from == victim)
        {
            return Err(ClusterError::FailedPrecondition(format!(
                "{victim:?} is migrating {name:?} ({} → {}): wait for it to end",
                m.from, m.to
            )));
        }
        self.last_in_placement(&rec, &victim)?;
        self.begin_leaving(name, &victim, "scaled in")?;
        self.events.emit(
            "scaling",
            &[obj("vs", name), obj("engine", &victim)],
            format!(
                "scale in: {victim} gets no new connections; once the {} has applied that, \
                 it leaves and its connections drain for {} s, then the rest are reset",
                if rec.spec.by_bgp() {
                    "first engine"
                } else {
                    "primary"
                },
                self.scalein_timeout(name).as_secs()
            ),
        );
        self.vs(name)
    }

    /// In scaling mode bgp the placement's order means nothing to the engines: an engine about to
    /// leave goes last, so the leaving steps (which wait for the first engine) never wait for it.
    fn last_in_placement(&mut self, rec: &VsRecord, engine: &str) -> Result<(), ClusterError> {
        if !rec.spec.by_bgp() || rec.placement.first().map(String::as_str) != Some(engine) {
            return Ok(());
        }
        let mut placement = rec.placement.clone();
        placement.retain(|e| e != engine);
        placement.push(engine.to_owned());
        self.commit(vec![crate::store::Write::Service(VsRecord {
            placement,
            ..rec.clone()
        })])
    }

    /// `engine` gets weight 0 in a new snapshot, whose version it leaves at.
    fn begin_leaving(&mut self, vs: &str, engine: &str, what: &str) -> Result<(), ClusterError> {
        let key = (vs.to_owned(), engine.to_owned());
        self.scaling.pending.remove(&key);
        self.scaling.leaving.insert(
            key.clone(),
            Leaving {
                version: u64::MAX,
                what: what.to_owned(),
            },
        );
        if let Err(e) = self.refresh() {
            self.scaling.leaving.remove(&key);
            return Err(e);
        }
        let version = self.p.version;
        self.scaling.leaving.insert(
            key,
            Leaving {
                version,
                what: what.to_owned(),
            },
        );
        Ok(())
    }

    fn began_draining(&mut self, vs: &str, engine: &str, now: Instant) {
        let key = (vs.to_owned(), engine.to_owned());
        self.scaling.pending.remove(&key);
        self.scaling.leaving.remove(&key);
        self.scaling.ready_to_leave.remove(&key);
        self.scaling.drains.insert(
            key,
            DrainView {
                report: None,
                since: now,
            },
        );
    }

    /// Moves the primary role (or a secondary's place) to `to` (or placement's choice): the target
    /// scales out first; the rest follows as it serves (`Cluster::advance_scaling`).
    pub fn migrate(
        &mut self,
        name: &str,
        from: Option<&str>,
        to: Option<&str>,
    ) -> Result<VsRecord, ClusterError> {
        let rec = self.vs(name)?;
        if let Some(m) = self.scaling.migrations.get(name) {
            return Err(ClusterError::FailedPrecondition(format!(
                "{name:?} is already migrating ({} → {})",
                m.from, m.to
            )));
        }
        // Scaling mode bgp has no primary: the engine to move from is named.
        let primary = if rec.spec.by_bgp() {
            String::new()
        } else {
            rec.placement.first().cloned().unwrap_or_default()
        };
        let from = match from {
            Some(f) => f.to_owned(),
            None if rec.spec.by_bgp() => {
                return Err(ClusterError::FailedPrecondition(format!(
                    "{name:?} is scaled by BGP (no primary): name the engine to migrate from"
                )));
            }
            None => primary.clone(),
        };
        if !rec.placement.contains(&from) {
            return Err(ClusterError::FailedPrecondition(format!(
                "{from:?} is not placed for {name:?}"
            )));
        }
        let to = match to {
            Some(t) if t == from => {
                return Err(ClusterError::FailedPrecondition(format!(
                    "{t:?} is already where {name:?} would migrate"
                )));
            }
            Some(t) if rec.placement.iter().any(|p| p == t) => {
                if from != primary {
                    return Err(ClusterError::FailedPrecondition(format!(
                        "{t:?} already serves {name:?}: scale {from} in instead"
                    )));
                }
                t.to_owned()
            }
            t => self.target_for(&rec, t)?,
        };
        if !rec.placement.contains(&to) {
            if rec.placement.len() >= rec.spec.max_engines as usize {
                return Err(ClusterError::FailedPrecondition(format!(
                    "virtual service {name:?} is at its max_engines ({}): a migration adds the \
                     target before the old engine leaves",
                    rec.spec.max_engines
                )));
            }
            self.scale_out(name, Some(&to))?;
        }
        let rec = self.vs(name)?;
        self.last_in_placement(&rec, &from)?;
        self.events.emit(
            "scaling",
            &[obj("vs", name), obj("engine", &from), obj("engine", &to)],
            format!("migrate {from} → {to}: once {to} serves"),
        );
        self.scaling.migrations.insert(
            name.to_owned(),
            Migration {
                from,
                to,
                stage: Stage::TargetPending,
            },
        );
        self.advance_scaling(self.clock)?;
        self.vs(name)
    }

    /// A heartbeat's drain reports: recorded; a drain that has ended is an event.
    pub(super) fn drain_reports(&mut self, engine: &str, reports: Vec<DrainReport>, now: Instant) {
        for r in reports {
            let key = (r.virtual_service.clone(), engine.to_owned());
            if !r.done {
                self.scaling.drains.insert(
                    key,
                    DrainView {
                        report: Some(r),
                        since: now,
                    },
                );
                continue;
            }
            self.scaling.drains.remove(&key);
            let (kind, reason) = if r.reset > 0 {
                (
                    "drain_reset",
                    format!(
                        "{engine} drained {}: {} connections finished, {} reset at the scale-in \
                         timeout",
                        r.virtual_service, r.finished, r.reset
                    ),
                )
            } else {
                (
                    "drain",
                    format!(
                        "{engine} drained {}: {} connections finished, none reset",
                        r.virtual_service, r.finished
                    ),
                )
            };
            self.events.emit(
                kind,
                &[obj("vs", &r.virtual_service), obj("engine", engine)],
                reason,
            );
        }
    }

    /// The next step of every operation in progress, and the primaries' weights.
    pub(super) fn advance_scaling(&mut self, now: Instant) -> Result<(), ClusterError> {
        let mut changed = false;
        // Scaled-out engines that serve now get their weight.
        for ((vs, e), version) in self.scaling.pending.clone() {
            let placed = self
                .p
                .services
                .get(&vs)
                .is_some_and(|v| v.placement.contains(&e));
            let serves = self
                .observed
                .get(&e)
                .is_some_and(|o| o.applied_version >= version && o.serving.contains(&vs));
            if !placed {
                self.scaling.pending.remove(&(vs, e));
            } else if serves {
                self.scaling.pending.remove(&(vs.clone(), e.clone()));
                self.events.emit(
                    "scaling",
                    &[obj("vs", &vs), obj("engine", &e)],
                    format!("{e} serves {vs}: it gets new connections now"),
                );
                changed = true;
            }
        }
        changed |= self.advance_migrations(now)?;
        changed |= self.advance_leaving(now)?;
        let Scaling {
            leaving,
            migrations,
            ready_to_leave,
            ..
        } = &mut self.scaling;
        ready_to_leave.retain(|(vs, e), _| {
            leaving.contains_key(&(vs.clone(), e.clone()))
                || migrations.get(vs).is_some_and(|m| m.from == *e)
        });
        changed |= self.adjust_primary_weights(now);
        let timeouts: BTreeMap<String, Duration> = self
            .scaling
            .drains
            .keys()
            .map(|(vs, _)| (vs.clone(), self.scalein_timeout(vs)))
            .collect();
        self.scaling.drains.retain(|(vs, _), d| {
            let timeout = timeouts.get(vs).copied().unwrap_or_default();
            now.duration_since(d.since) < timeout + DRAIN_REPORT_GRACE
        });
        if changed {
            self.refresh()?;
        }
        Ok(())
    }

    fn advance_migrations(&mut self, now: Instant) -> Result<bool, ClusterError> {
        let mut changed = false;
        let migrations: Vec<(String, Migration)> = self
            .scaling
            .migrations
            .iter()
            .map(|(k, m)| (k.clone(), m.clone()))
            .collect();
        for (vs, m) in migrations {
            let Some(mut rec) = self.p.services.get(&vs).cloned() else {
                self.scaling.migrations.remove(&vs);
                continue;
            };
            if !rec.placement.contains(&m.to) || !rec.placement.contains(&m.from) {
                self.scaling.migrations.remove(&vs);
                self.events.emit(
                    "scaling",
                    &[obj("vs", &vs)],
                    format!(
                        "migrate {} → {}: abandoned, the placement changed under it",
                        m.from, m.to
                    ),
                );
                continue;
            }
            match m.stage {
                Stage::TargetPending
                    if !self
                        .scaling
                        .pending
                        .contains_key(&(vs.clone(), m.to.clone())) =>
                {
                    if rec.placement.first() == Some(&m.from) {
                        rec.placement.retain(|p| *p != m.to && *p != m.from);
                        rec.placement.insert(0, m.to.clone());
                        rec.placement.push(m.from.clone());
                        rec.epoch += 1;
                        rec.resource_version += 1;
                        let epoch = rec.epoch;
                        self.events.emit(
                            "scaling",
                            &[obj("vs", &vs), obj("engine", &m.from), obj("engine", &m.to)],
                            format!(
                                "migrate: {} is primary at epoch {epoch}; {} gets no new \
                                 connections and hands its flows over",
                                m.to, m.from
                            ),
                        );
                        // Promoted before the snapshot is built: the old primary's weight is 0.
                        self.scaling.migrations.insert(
                            vs.clone(),
                            Migration {
                                stage: Stage::Promoted { version: u64::MAX },
                                ..m.clone()
                            },
                        );
                        self.put_vs(rec, "migrated")?;
                        let version = self.p.version;
                        self.scaling.migrations.insert(
                            vs.clone(),
                            Migration {
                                stage: Stage::Promoted { version },
                                ..m
                            },
                        );
                    } else {
                        self.scaling.migrations.remove(&vs);
                        self.begin_leaving(&vs, &m.from, "migrated away")?;
                    }
                    changed = true;
                }
                Stage::Promoted { version } => {
                    if self.has_applied(&m.to, version)
                        && (self.has_applied(&m.from, version) || self.is_gone(&m.from))
                        && self.handshakes_settled(&vs, &m.from, now)
                    {
                        self.scaling.migrations.remove(&vs);
                        self.leave(rec, &m.from, "migrated away (the old primary)", now)?;
                        changed = true;
                    }
                }
                Stage::TargetPending => {}
            }
        }
        Ok(changed)
    }

    /// `engine` runs `version` or a later one.
    fn has_applied(&self, engine: &str, version: u64) -> bool {
        self.observed
            .get(engine)
            .is_some_and(|o| o.applied_version >= version)
    }

    /// `engine` is not healthy: nothing it would apply is worth waiting for.
    fn is_gone(&self, engine: &str) -> bool {
        !self
            .health
            .state(engine)
            .is_some_and(EngineHealth::is_healthy)
    }

    /// Leaving engines leave once their primary has applied their weight 0 (or is gone).
    fn advance_leaving(&mut self, now: Instant) -> Result<bool, ClusterError> {
        let mut changed = false;
        for ((vs, e), Leaving { version, what }) in self.scaling.leaving.clone() {
            let key = (vs.clone(), e.clone());
            let Some(rec) = self
                .p
                .services
                .get(&vs)
                .filter(|r| r.placement.contains(&e))
                .cloned()
            else {
                self.scaling.leaving.remove(&key);
                continue;
            };
            let primary = rec.placement[0].clone();
            if primary == e {
                // Promoted by a failover meanwhile: it stays, with its weight.
                self.scaling.leaving.remove(&key);
                self.events.emit(
                    "scaling",
                    &[obj("vs", &vs), obj("engine", &e)],
                    format!("{e} does not leave {vs}: it became its primary"),
                );
                changed = true;
                continue;
            }
            if (self.has_applied(&primary, version) || self.is_gone(&primary))
                && self.handshakes_settled(&vs, &e, now)
            {
                self.leave(rec, &e, &what, now)?;
                changed = true;
            }
        }
        Ok(changed)
    }

    /// Whether [`HANDSHAKE_GRACE`] has passed since `engine` could first leave `vs` (the first
    /// call that asks).
    fn handshakes_settled(&mut self, vs: &str, engine: &str, now: Instant) -> bool {
        let since = *self
            .scaling
            .ready_to_leave
            .entry((vs.to_owned(), engine.to_owned()))
            .or_insert(now);
        now.saturating_duration_since(since) >= HANDSHAKE_GRACE
    }

    /// `engine` leaves `rec`'s placement and drains.
    fn leave(
        &mut self,
        mut rec: VsRecord,
        engine: &str,
        what: &str,
        now: Instant,
    ) -> Result<(), ClusterError> {
        let vs = rec.spec.name.clone();
        rec.placement.retain(|p| p != engine);
        rec.resource_version += 1;
        self.events.emit(
            "scaling",
            &[obj("vs", &vs), obj("engine", engine)],
            format!(
                "{engine} leaves {vs}: its connections drain for {} s",
                self.scalein_timeout(&vs).as_secs()
            ),
        );
        self.put_vs(rec, what)?;
        self.began_draining(&vs, engine, now);
        Ok(())
    }

    /// Each primary's weight follows its spare CPU, in steps, at most every hold time.
    fn adjust_primary_weights(&mut self, now: Instant) -> bool {
        let mut changed = false;
        let services: Vec<(String, String)> = self
            .p
            .services
            .values()
            .filter(|v| v.placement.len() > 1 && !v.spec.by_bgp())
            .filter_map(|v| Some((v.spec.name.clone(), v.placement.first()?.clone())))
            .collect();
        for (vs, primary) in services {
            let Some(cpu) = self
                .observed
                .get(&primary)
                .filter(|o| o.last_heartbeat_unix_ms > 0)
                .map(|o| o.cpu_pct)
            else {
                continue;
            };
            let target = primary_weight(cpu);
            let (current, since) = self.scaling.primary_weights.get(&vs).copied().unwrap_or((
                PRIMARY_WEIGHT_MAX,
                now.checked_sub(PRIMARY_WEIGHT_HOLD).unwrap_or(now),
            ));
            if target.abs_diff(current) < PRIMARY_WEIGHT_STEP
                || now.duration_since(since) < PRIMARY_WEIGHT_HOLD
            {
                continue;
            }
            self.scaling
                .primary_weights
                .insert(vs.clone(), (target, now));
            self.events.emit(
                "weights",
                &[obj("vs", &vs), obj("engine", &primary)],
                format!(
                    "primary {primary} at {cpu:.0} % CPU: its weight {current} → {target} \
                     (secondaries {BASE_WEIGHT})"
                ),
            );
            changed = true;
        }
        self.scaling
            .primary_weights
            .retain(|vs, _| self.p.services.contains_key(vs));
        changed
    }
}
