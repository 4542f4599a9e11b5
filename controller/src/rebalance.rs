//! The auto-rebalance decision: per engine group, once per interval, from the engines' load over
//! the last part of it, at most one change — scale a virtual service out, scale one in, or migrate
//! one — or, with the reason, none. The semantics are the Avi service-engine group's:
//!
//! - Only an engine whose load averaged over the last `window` of the interval is above `max` or
//!   below `min` may cause a change.
//! - **Hot** (above `max`), and one virtual service makes more than `hot_share` (70 %) of the
//!   engine's packets over the interval: scale that service out. Hot and no service that dominant:
//!   migrate the heaviest of its services to another engine.
//! - **Cold** (below `min`): scale in a service it is a secondary of, or else consolidate: migrate
//!   one of its services onto an engine that stays below `max`.
//! - One change per interval; none during the cool-down after a change.
//!
//! Pure: the caller passes the time (one clock, so tests run on a virtual one), the samples and the
//! group's placement, and carries out (or, dry-run, only logs) what comes back. Ties go to the
//! name that sorts first, so the same inputs give the same decision.

use std::{
    collections::{BTreeMap, BTreeSet, VecDeque},
    fmt,
    time::{Duration, Instant},
};

/// What load is measured by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Criterion {
    /// Host CPU, percent.
    Cpu,
    /// Packets per second the engine's data plane handled.
    Pps,
    /// Megabits per second.
    Mbps,
    /// Open connections.
    Connections,
    /// New connections per second.
    NewConnections,
}

impl Criterion {
    pub fn parse(s: &str) -> Result<Criterion, String> {
        Ok(match s {
            "cpu" => Criterion::Cpu,
            "pps" => Criterion::Pps,
            "mbps" => Criterion::Mbps,
            "connections" => Criterion::Connections,
            "new_connections" => Criterion::NewConnections,
            _ => {
                return Err(format!(
                    "criterion {s:?}: one of cpu, pps, mbps, connections, new_connections"
                ));
            }
        })
    }

    pub fn name(self) -> &'static str {
        match self {
            Criterion::Cpu => "cpu",
            Criterion::Pps => "pps",
            Criterion::Mbps => "mbps",
            Criterion::Connections => "connections",
            Criterion::NewConnections => "new_connections",
        }
    }

    fn unit(self) -> &'static str {
        match self {
            Criterion::Cpu => "% CPU",
            Criterion::Pps => "pps",
            Criterion::Mbps => "Mbit/s",
            Criterion::Connections => "connections",
            Criterion::NewConnections => "new connections/s",
        }
    }
}

/// The group's knobs, with the Avi service-engine group's names, meanings and ranges.
#[derive(Debug, Clone, Copy, PartialEq, serde::Serialize, serde::Deserialize)]
#[serde(default)]
pub struct RebalanceSettings {
    /// `auto_rebalance`: off (manual) by default.
    pub enabled: bool,
    /// Decisions are events only; nothing changes.
    pub dry_run: bool,
    /// `auto_rebalance_interval`.
    pub interval: Duration,
    /// The last part of the interval whose average counts.
    pub window: Duration,
    pub criterion: Criterion,
    /// `max_cpu_usage` (CPU: 40–90 %), or the criterion's upper threshold.
    pub max: f64,
    /// `min_cpu_usage` (CPU: 20–60 %), or the criterion's lower threshold.
    pub min: f64,
    /// A service making more than this share of a hot engine's packets is scaled out.
    pub hot_share: f64,
    /// `max_scaleout_per_vs` (1–64; native scaling stops at the controller's native limit).
    pub max_scaleout_per_vs: u32,
    /// `min_scaleout_per_vs`.
    pub min_scaleout_per_vs: u32,
    /// `vs_scalein_timeout`: how long a scaled-in engine's connections may finish.
    pub scalein_timeout: Duration,
    /// `buffer_se`: healthy engines kept free of a service for failover (N+M); a scale-out or a
    /// migration may not take the last of them.
    pub buffer_se: u32,
    /// No decision this long after a change.
    pub cooldown: Duration,
}

impl Default for RebalanceSettings {
    fn default() -> Self {
        RebalanceSettings {
            enabled: false,
            dry_run: false,
            interval: Duration::from_mins(5),
            window: Duration::from_secs(30),
            criterion: Criterion::Cpu,
            max: 80.0,
            min: 30.0,
            hot_share: 0.70,
            max_scaleout_per_vs: 4,
            min_scaleout_per_vs: 1,
            scalein_timeout: Duration::from_secs(30),
            buffer_se: 1,
            cooldown: Duration::from_mins(5),
        }
    }
}

impl RebalanceSettings {
    /// Refuses what cannot work, naming the setting.
    pub fn validate(&self) -> Result<(), String> {
        let err = |field: &str, why: String| Err(format!("{field}: {why}"));
        if self.interval.is_zero() {
            return err("auto_rebalance_interval", "must be more than 0".into());
        }
        if self.window.is_zero() || self.window > self.interval {
            return err(
                "window",
                format!(
                    "{:?} must be more than 0 and at most the interval ({:?})",
                    self.window, self.interval
                ),
            );
        }
        if !self.max.is_finite() || !self.min.is_finite() || self.min < 0.0 {
            return err(
                "min/max",
                format!(
                    "{} / {} must be finite and not negative",
                    self.min, self.max
                ),
            );
        }
        if self.criterion == Criterion::Cpu {
            if !(40.0..=90.0).contains(&self.max) {
                return err("max_cpu_usage", format!("{} is outside 40–90 %", self.max));
            }
            if !(20.0..=60.0).contains(&self.min) {
                return err("min_cpu_usage", format!("{} is outside 20–60 %", self.min));
            }
        }
        if self.max <= self.min {
            return err(
                "max",
                format!("{} must be above min ({})", self.max, self.min),
            );
        }
        if !(self.hot_share > 0.0 && self.hot_share < 1.0) {
            return err("hot_share", format!("{} must be in (0, 1)", self.hot_share));
        }
        if !(1..=3600).contains(&self.scalein_timeout.as_secs()) {
            return err(
                "vs_scalein_timeout",
                format!("{:?} is outside 1–3600 s", self.scalein_timeout),
            );
        }
        if !(1..=64).contains(&self.max_scaleout_per_vs) {
            return err(
                "max_scaleout_per_vs",
                format!("{} is outside 1–64", self.max_scaleout_per_vs),
            );
        }
        if self.min_scaleout_per_vs == 0 || self.min_scaleout_per_vs > self.max_scaleout_per_vs {
            return err(
                "min_scaleout_per_vs",
                format!(
                    "{} must be 1 … max_scaleout_per_vs ({})",
                    self.min_scaleout_per_vs, self.max_scaleout_per_vs
                ),
            );
        }
        Ok(())
    }
}

/// One report of an engine's load (from a heartbeat).
#[derive(Debug, Clone, PartialEq)]
pub struct Sample {
    pub at: Instant,
    pub cpu_pct: f64,
    pub pps: f64,
    pub mbps: f64,
    pub connections: f64,
    pub new_connections_per_s: f64,
    /// Packets per second per virtual service (name).
    pub vs_pps: BTreeMap<String, f64>,
}

impl Sample {
    fn value(&self, c: Criterion) -> f64 {
        match c {
            Criterion::Cpu => self.cpu_pct,
            Criterion::Pps => self.pps,
            Criterion::Mbps => self.mbps,
            Criterion::Connections => self.connections,
            Criterion::NewConnections => self.new_connections_per_s,
        }
    }
}

/// A virtual service of the group as the decision sees it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Service {
    pub name: String,
    /// Its engines, the primary first.
    pub placement: Vec<String>,
    pub min_engines: u32,
    pub max_engines: u32,
    /// Scaling mode bgp (no primary; up to 64 engines); else native.
    pub by_bgp: bool,
}

/// A change.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Action {
    ScaleOut {
        vs: String,
        to: String,
    },
    ScaleIn {
        vs: String,
        engine: String,
    },
    Migrate {
        vs: String,
        from: String,
        to: String,
    },
}

impl fmt::Display for Action {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Action::ScaleOut { vs, to } => write!(f, "scale out {vs} to {to}"),
            Action::ScaleIn { vs, engine } => write!(f, "scale in {vs} from {engine}"),
            Action::Migrate { vs, from, to } => write!(f, "migrate {vs} from {from} to {to}"),
        }
    }
}

/// What one interval decided: the change (if any) and why, with its inputs.
#[derive(Debug, Clone, PartialEq)]
pub struct Decision {
    pub at: Instant,
    pub action: Option<Action>,
    pub reason: String,
    /// Each engine's load over the window (the criterion's unit).
    pub loads: BTreeMap<String, f64>,
    /// Dry run: the change is only logged.
    pub dry_run: bool,
}

/// The loop's state: samples of the last interval per engine, when it last decided and changed.
#[derive(Debug)]
pub struct Rebalancer {
    pub settings: RebalanceSettings,
    samples: BTreeMap<String, VecDeque<Sample>>,
    next: Option<Instant>,
    last_change: Option<Instant>,
}

impl Rebalancer {
    pub fn new(settings: RebalanceSettings) -> Rebalancer {
        Rebalancer {
            settings,
            samples: BTreeMap::new(),
            next: None,
            last_change: None,
        }
    }

    /// New settings for the group; the samples stay. A changed interval, or the loop turned on,
    /// starts a new interval at the next tick.
    pub fn set_settings(&mut self, settings: RebalanceSettings) {
        if settings.interval != self.settings.interval || settings.enabled != self.settings.enabled
        {
            self.next = None;
        }
        self.settings = settings;
    }

    /// Records a sample of `engine`; samples older than one interval are dropped.
    pub fn record(&mut self, engine: &str, sample: Sample) {
        let interval = self.settings.interval;
        let q = self.samples.entry(engine.to_owned()).or_default();
        q.push_back(sample);
        let newest = q.back().map(|s| s.at);
        while let (Some(front), Some(newest)) = (q.front(), newest) {
            if newest.saturating_duration_since(front.at) > interval {
                q.pop_front();
            } else {
                break;
            }
        }
    }

    /// An engine left the group: its samples go.
    pub fn forget(&mut self, engine: &str) {
        self.samples.remove(engine);
    }

    /// Decides if an interval has ended at `now` (the first call starts the first interval).
    /// `healthy`: the group's engines that may take services; `services`: the group's services.
    pub fn tick(
        &mut self,
        now: Instant,
        healthy: &BTreeSet<String>,
        services: &[Service],
    ) -> Option<Decision> {
        if !self.settings.enabled {
            return None;
        }
        let due = *self.next.get_or_insert(now + self.settings.interval);
        if now < due {
            return None;
        }
        self.next = Some(now + self.settings.interval);
        let d = self.decide(now, healthy, services);
        if d.action.is_some() && !d.dry_run {
            self.last_change = Some(now);
        }
        Some(d)
    }

    /// The load of `engine` averaged over the window ending at `now`.
    fn load(&self, engine: &str, now: Instant) -> Option<f64> {
        let from = now.checked_sub(self.settings.window)?;
        let v: Vec<f64> = self
            .samples
            .get(engine)?
            .iter()
            .filter(|s| s.at >= from && s.at <= now)
            .map(|s| s.value(self.settings.criterion))
            .collect();
        #[allow(clippy::cast_precision_loss)]
        (!v.is_empty()).then(|| v.iter().sum::<f64>() / v.len() as f64)
    }

    /// Each service's share of `engine`'s packets over the interval.
    fn shares(&self, engine: &str) -> BTreeMap<String, f64> {
        let mut per_vs: BTreeMap<String, f64> = BTreeMap::new();
        for s in self.samples.get(engine).into_iter().flatten() {
            for (vs, pps) in &s.vs_pps {
                *per_vs.entry(vs.clone()).or_default() += pps.max(0.0);
            }
        }
        let total: f64 = per_vs.values().sum();
        if total <= 0.0 {
            return BTreeMap::new();
        }
        per_vs.into_iter().map(|(vs, p)| (vs, p / total)).collect()
    }

    #[allow(clippy::too_many_lines)]
    fn decide(&self, now: Instant, healthy: &BTreeSet<String>, services: &[Service]) -> Decision {
        let st = &self.settings;
        let unit = st.criterion.unit();
        let loads: BTreeMap<String, f64> = healthy
            .iter()
            .filter_map(|e| Some((e.clone(), self.load(e, now)?)))
            .collect();
        let decision = |action: Option<Action>, reason: String| Decision {
            at: now,
            action,
            reason,
            loads: loads.clone(),
            dry_run: st.dry_run,
        };
        if let Some(t) = self.last_change
            && now.saturating_duration_since(t) < st.cooldown
        {
            return decision(
                None,
                format!(
                    "cooling down: the last change was {:.0} s ago (cool-down {:.0} s)",
                    now.saturating_duration_since(t).as_secs_f64(),
                    st.cooldown.as_secs_f64()
                ),
            );
        }
        // Hottest first, then coldest first; ties by name (the maps are sorted by name).
        let mut hot: Vec<(&String, f64)> = loads
            .iter()
            .filter(|(_, l)| **l > st.max)
            .map(|(e, l)| (e, *l))
            .collect();
        hot.sort_by(|a, b| b.1.total_cmp(&a.1).then(a.0.cmp(b.0)));
        let mut cold: Vec<(&String, f64)> = loads
            .iter()
            .filter(|(_, l)| **l < st.min)
            .map(|(e, l)| (e, *l))
            .collect();
        cold.sort_by(|a, b| a.1.total_cmp(&b.1).then(a.0.cmp(b.0)));
        let load_of = |e: &str| loads.get(e).copied().unwrap_or(f64::INFINITY);
        // Engines a service may move to: healthy, not already its, not hot, least loaded first;
        // none that would take the group's last `buffer_se` free engines.
        let targets = |vs: &Service| -> Vec<String> {
            let free: Vec<&String> = healthy
                .iter()
                .filter(|e| !vs.placement.contains(e))
                .collect();
            if free.len() <= st.buffer_se as usize {
                return Vec::new();
            }
            let mut t: Vec<&String> = free
                .into_iter()
                .filter(|e| loads.get(*e).is_some_and(|l| *l < st.max))
                .collect();
            t.sort_by(|a, b| load_of(a).total_cmp(&load_of(b)).then(a.cmp(b)));
            t.into_iter().cloned().collect()
        };
        let migrate = |v: &Service, from: &str, to: String| Action::Migrate {
            vs: v.name.clone(),
            from: from.to_owned(),
            to,
        };
        let mut not_taken: Vec<String> = Vec::new();
        for (engine, load) in &hot {
            let mine: Vec<&Service> = services
                .iter()
                .filter(|v| v.placement.contains(engine))
                .collect();
            if mine.is_empty() {
                not_taken.push(format!("{engine} at {load:.0} {unit} hosts no service"));
                continue;
            }
            let shares = self.shares(engine);
            let share = |v: &Service| shares.get(&v.name).copied().unwrap_or(0.0);
            let mut by_share = mine.clone();
            by_share.sort_by(|a, b| share(b).total_cmp(&share(a)).then(a.name.cmp(&b.name)));
            let heaviest = by_share[0];
            let s = share(heaviest);
            if s > st.hot_share {
                let limit = st.max_scaleout_per_vs.min(heaviest.max_engines) as usize;
                if heaviest.placement.len() >= limit {
                    let switch = if heaviest.by_bgp {
                        ""
                    } else {
                        " (natively; in scaling mode bgp it could scale past the native limit, up to 64 engines)"
                    };
                    not_taken.push(format!(
                        "{engine} at {load:.0} {unit}: {} makes {:.0} % of its packets, but is at its maximum of {limit} engines{switch}",
                        heaviest.name,
                        s * 100.0
                    ));
                    continue;
                }
                let Some(to) = targets(heaviest).into_iter().next() else {
                    not_taken.push(format!(
                        "{engine} at {load:.0} {unit}: {} makes {:.0} % of its packets, but no eligible engine is free (buffer_se {})",
                        heaviest.name,
                        s * 100.0,
                        st.buffer_se
                    ));
                    continue;
                };
                let reason = format!(
                    "{engine} at {load:.0} {unit}: {} makes {:.0} % of its packets → scale out {} to {to}",
                    heaviest.name,
                    s * 100.0,
                    heaviest.name
                );
                return decision(
                    Some(Action::ScaleOut {
                        vs: heaviest.name.clone(),
                        to,
                    }),
                    reason,
                );
            }
            // No dominant service: move the heaviest that can go.
            for v in &by_share {
                if let Some(to) = targets(v).into_iter().next() {
                    let reason = format!(
                        "{engine} at {load:.0} {unit}, no service above {:.0} % of its packets ({} the heaviest at {:.0} %) → migrate {} from {engine} to {to}",
                        st.hot_share * 100.0,
                        v.name,
                        share(v) * 100.0,
                        v.name
                    );
                    return decision(Some(migrate(v, engine, to)), reason);
                }
            }
            not_taken.push(format!(
                "{engine} at {load:.0} {unit}: no engine to migrate any of its services to"
            ));
        }
        for (engine, load) in &cold {
            let mine: Vec<&Service> = services
                .iter()
                .filter(|v| v.placement.contains(engine))
                .collect();
            if mine.is_empty() {
                continue;
            }
            let floor = |v: &Service| st.min_scaleout_per_vs.max(v.min_engines) as usize;
            // Scale in where it is a secondary and the service has engines to spare.
            if let Some(v) = mine
                .iter()
                .find(|v| v.placement.first() != Some(*engine) && v.placement.len() > floor(v))
            {
                let reason = format!(
                    "{engine} at {load:.0} {unit} (below {:.0}) → scale in {} from {engine}",
                    st.min, v.name
                );
                return decision(
                    Some(Action::ScaleIn {
                        vs: v.name.clone(),
                        engine: (*engine).clone(),
                    }),
                    reason,
                );
            }
            // Consolidate: move a service to an engine that stays below the maximum with it.
            for v in &mine {
                let own = load / f64::from(u32::try_from(mine.len()).unwrap_or(u32::MAX));
                let to = targets(v)
                    .into_iter()
                    .filter(|t| *t != **engine)
                    .find(|t| load_of(t) >= st.min && load_of(t) + own < st.max);
                if let Some(to) = to {
                    let reason = format!(
                        "{engine} at {load:.0} {unit} (below {:.0}), {} at its minimum → consolidate: migrate {} from {engine} to {to}",
                        st.min, v.name, v.name
                    );
                    return decision(Some(migrate(v, engine, to)), reason);
                }
            }
            not_taken.push(format!(
                "{engine} at {load:.0} {unit} is below {:.0}, but {} at min_engines and no engine can take them",
                st.min,
                mine.iter().map(|v| v.name.as_str()).collect::<Vec<_>>().join(", ")
            ));
        }
        let reason = if not_taken.is_empty() {
            format!(
                "every engine with services within {:.0}–{:.0} {unit} (or without samples)",
                st.min, st.max
            )
        } else {
            not_taken.join("; ")
        };
        decision(None, reason)
    }
}

#[cfg(test)]
mod tests;
