//! `controller simulate`: what the auto-rebalance loop would have done with recorded heartbeats.
//!
//! Owns the trace format and its parsing ([`Trace`]), the load model ([`Fit`]), the replay
//! ([`replay`]) with its two renderings ([`render_human`], [`render_json`]), and the example traces
//! ([`generate`]). The decision itself is the controller's ([`Rebalancer`]: the same `record` and
//! `tick` the cluster calls), run on a virtual clock: a fixed base [`Instant`] plus each
//! heartbeat's offset from the trace's first line. Nothing sleeps or reads the wall clock, so the
//! same traces and settings always print the same lines.
//!
//! # Trace: JSON lines, one object each, by `"type"`
//! - `{"type":"service","name":"web","placement":["se1","se2"],"min_engines":1,"max_engines":4}`:
//!   optional, the primary first. Without `placement` (or with an empty one) the engines are
//!   inferred as below; `min_engines` defaults to 1, `max_engines` to 4.
//! - `{"type":"heartbeat","t_ms":…,"engine":"se1","cpu_pct":55.0,"pps":12000.0,"mbps":80.0,
//!   "connections":300,"new_connections_per_s":40.0,"vs_pps":{"web":11000.0},"vs_mbps":{"web":75.0}}`:
//!   `t_ms` (any monotone milliseconds, unix ms from the daemon) and `engine` are required; missing
//!   numbers are 0, missing maps empty; unknown fields are ignored.
//!
//! Several files (one per engine, say) are merged by time. A service without a line is inferred:
//! its engines are those reporting it in `vs_pps`, its primary the one reporting the most for it
//! over the trace (a primary's data plane counts all of a service's packets, a secondary only its
//! own share), then the others by name; `min_engines` 1, `max_engines` 4. A bad line is an error
//! naming `file:line` and why.
//!
//! # Model
//! A trace fixes what each engine saw under the placement of the time. After a simulated change
//! the engines would have seen something else, so the decision is fed modelled samples:
//! - **Demand** `D(t)` of a service: the most packets/s any engine reports for it in its latest
//!   heartbeat at `t` (its primary's, which counts them all); its Mbit/s likewise from `vs_mbps`.
//! - **Split**: under the simulated placement `D` is split evenly across the service's engines.
//! - **CPU** of an engine = `idle + cost × packets/s it handles` (the sum of its services' shares),
//!   clamped to 0–100. `idle` and `cost` are fitted per engine by least squares of its recorded
//!   `cpu_pct` on the packets this same model gives it under the recorded placement; samples at
//!   99 % or more are left out (saturated). Where its packet rate varies too little for a slope
//!   (coefficient of variation under 10 %), or the fit has a negative idle, the line goes through
//!   the origin (idle 0). An engine that handled nothing keeps its mean CPU as idle and the median
//!   cost of the others.
//! - **Reported as the daemon does**: a primary's `vs_pps`/`vs_mbps` count all of its service's
//!   packets, a secondary's its share; `pps` and `mbps` are their sums; connections and new
//!   connections are per packet handled, at the group's ratio at that time.
//! - A modelled sample is recorded for each heartbeat at its time, then `tick` runs once per time;
//!   a change that is not a dry run is carried out on the simulated placement at once: a scale-out
//!   appends the engine, a scale-in removes it, a primary's migration puts the target first and
//!   removes the old one, a secondary's puts the target in its place at the end (as the controller
//!   does: scale out, then scale in). The controller's refusals (`max_engines`, `min_engines`, the
//!   primary) are kept and printed.
//!
//! # Limits
//! The recorded placement (lines or inferred) is taken as fixed for the whole trace; the primary's
//! smaller weight, the pending stage of a scale-out, drains and "one change at a time" are not
//! modelled (a change takes effect at once); every engine seen is healthy throughout; CPU is linear
//! in packets. The output is what this model and the real decision code make of the trace, not a
//! forecast.

use std::{
    collections::{BTreeMap, BTreeSet},
    fmt::{self, Write as _},
    path::Path,
    str::FromStr,
    time::{Duration, Instant},
};

use serde::{Deserialize, Serialize};
use serde_json::{Value, json};
use thiserror::Error;

use crate::rebalance::{Action, Criterion, RebalanceSettings, Rebalancer, Sample, Service};

/// An inferred service's (and a service line's default) engine bounds.
pub const DEFAULT_MIN_ENGINES: u32 = 1;
pub const DEFAULT_MAX_ENGINES: u32 = 4;
/// Recorded samples at or above this CPU are saturated: left out of the fit.
const SATURATED_PCT: f64 = 99.0;
/// Below this coefficient of variation of an engine's packets the fit goes through the origin.
const MIN_SPREAD: f64 = 0.10;

/// Reading a trace went wrong: where, and why.
#[derive(Debug, Error)]
pub enum TraceError {
    #[error("{path}: {cause}")]
    Read { path: String, cause: std::io::Error },
    #[error("{path}:{line}:{column}: {why}")]
    Json {
        path: String,
        line: usize,
        column: usize,
        why: String,
    },
    #[error("{path}:{line}: {why}")]
    Invalid {
        path: String,
        line: usize,
        why: String,
    },
    #[error("{at}: service {name:?} differs from its line at {first}")]
    Conflict {
        name: String,
        at: String,
        first: String,
    },
    #[error("{0}: no heartbeat lines")]
    NoHeartbeats(String),
}

/// One engine's heartbeat, as the daemon writes it.
#[derive(Debug, Clone, PartialEq, Deserialize)]
pub struct Heartbeat {
    pub t_ms: u64,
    pub engine: String,
    #[serde(default)]
    pub cpu_pct: f64,
    #[serde(default)]
    pub pps: f64,
    #[serde(default)]
    pub mbps: f64,
    #[serde(default)]
    pub connections: f64,
    #[serde(default)]
    pub new_connections_per_s: f64,
    #[serde(default)]
    pub vs_pps: BTreeMap<String, f64>,
    #[serde(default)]
    pub vs_mbps: BTreeMap<String, f64>,
}

#[derive(Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
enum Line {
    Service(ServiceLine),
    Heartbeat(Heartbeat),
}

#[derive(Deserialize)]
struct ServiceLine {
    name: String,
    #[serde(default)]
    placement: Vec<String>,
    #[serde(default = "default_min")]
    min_engines: u32,
    #[serde(default = "default_max")]
    max_engines: u32,
    /// Scaling mode bgp.
    #[serde(default)]
    bgp: bool,
}

fn default_min() -> u32 {
    DEFAULT_MIN_ENGINES
}

fn default_max() -> u32 {
    DEFAULT_MAX_ENGINES
}

/// One or more trace files, merged: the recorded placement and the heartbeats in time order.
#[derive(Debug, Clone, PartialEq)]
pub struct Trace {
    /// The files' names, in the order given.
    pub sources: Vec<String>,
    /// The recorded placement (service lines, else inferred), by name.
    pub services: Vec<Service>,
    /// The services whose placement was inferred.
    pub inferred: BTreeSet<String>,
    /// By `t_ms`; at equal times in file, then line order.
    pub heartbeats: Vec<Heartbeat>,
    /// Every engine seen (heartbeats and placements): the healthy set of the replay.
    pub engines: BTreeSet<String>,
}

impl Trace {
    /// Reads and merges trace files.
    pub fn load(paths: &[impl AsRef<Path>]) -> Result<Trace, TraceError> {
        let mut texts = Vec::new();
        for p in paths {
            let path = p.as_ref().display().to_string();
            let text = std::fs::read_to_string(p.as_ref()).map_err(|cause| TraceError::Read {
                path: path.clone(),
                cause,
            })?;
            texts.push((path, text));
        }
        let refs: Vec<(&str, &str)> = texts
            .iter()
            .map(|(p, t)| (p.as_str(), t.as_str()))
            .collect();
        Trace::parse(&refs)
    }

    /// Parses and merges `(name, text)` traces.
    pub fn parse(sources: &[(&str, &str)]) -> Result<Trace, TraceError> {
        let mut lines: BTreeMap<String, (String, Service)> = BTreeMap::new();
        let mut heartbeats = Vec::new();
        for (path, text) in sources {
            parse_one(path, text, &mut lines, &mut heartbeats)?;
        }
        if heartbeats.is_empty() {
            return Err(TraceError::NoHeartbeats(
                sources
                    .iter()
                    .map(|(p, _)| *p)
                    .collect::<Vec<_>>()
                    .join(", "),
            ));
        }
        heartbeats.sort_by_key(|h| h.t_ms);
        let (services, inferred) = placements(lines, &heartbeats);
        let engines = heartbeats
            .iter()
            .map(|h| h.engine.clone())
            .chain(services.iter().flat_map(|v| v.placement.iter().cloned()))
            .collect();
        Ok(Trace {
            sources: sources.iter().map(|(p, _)| (*p).to_owned()).collect(),
            services,
            inferred,
            heartbeats,
            engines,
        })
    }

    /// The first line's time, ms.
    pub fn start_ms(&self) -> u64 {
        self.heartbeats.first().map_or(0, |h| h.t_ms)
    }

    /// From the first line to the last.
    pub fn span(&self) -> Duration {
        Duration::from_millis(self.heartbeats.last().map_or(0, |h| h.t_ms) - self.start_ms())
    }
}

fn parse_one(
    path: &str,
    text: &str,
    lines: &mut BTreeMap<String, (String, Service)>,
    heartbeats: &mut Vec<Heartbeat>,
) -> Result<(), TraceError> {
    for (i, raw) in text.lines().enumerate() {
        let line = i + 1;
        let raw = raw.trim();
        if raw.is_empty() {
            continue;
        }
        let invalid = |why: String| TraceError::Invalid {
            path: path.to_owned(),
            line,
            why,
        };
        let parsed: Line = serde_json::from_str(raw).map_err(|e| {
            let msg = e.to_string();
            // serde_json says "… at line 1 column N": the line is ours, the column its.
            let why = msg
                .rsplit_once(" at line ")
                .map_or(msg.as_str(), |(m, _)| m)
                .to_owned();
            TraceError::Json {
                path: path.to_owned(),
                line,
                column: e.column(),
                why,
            }
        })?;
        match parsed {
            Line::Heartbeat(h) => {
                check_heartbeat(&h).map_err(invalid)?;
                heartbeats.push(h);
            }
            Line::Service(s) => {
                let service = check_service(s).map_err(invalid)?;
                let at = format!("{path}:{line}");
                match lines.get(&service.name) {
                    Some((first, known)) if *known != service => {
                        return Err(TraceError::Conflict {
                            name: service.name,
                            at,
                            first: first.clone(),
                        });
                    }
                    Some(_) => {}
                    None => {
                        lines.insert(service.name.clone(), (at, service));
                    }
                }
            }
        }
    }
    Ok(())
}

fn check_heartbeat(h: &Heartbeat) -> Result<(), String> {
    if h.engine.is_empty() {
        return Err("engine is empty".into());
    }
    for (field, v) in [
        ("cpu_pct", h.cpu_pct),
        ("pps", h.pps),
        ("mbps", h.mbps),
        ("connections", h.connections),
        ("new_connections_per_s", h.new_connections_per_s),
    ] {
        if v < 0.0 {
            return Err(format!("{field} {v} is negative"));
        }
    }
    for (field, map) in [("vs_pps", &h.vs_pps), ("vs_mbps", &h.vs_mbps)] {
        if let Some((vs, v)) = map.iter().find(|(_, v)| **v < 0.0) {
            return Err(format!("{field}.{vs} {v} is negative"));
        }
    }
    Ok(())
}

fn check_service(s: ServiceLine) -> Result<Service, String> {
    if s.name.is_empty() {
        return Err("service name is empty".into());
    }
    if s.min_engines == 0 || s.min_engines > s.max_engines {
        return Err(format!(
            "service {:?}: min_engines {} must be 1 … max_engines ({})",
            s.name, s.min_engines, s.max_engines
        ));
    }
    let mut seen = BTreeSet::new();
    if let Some(dup) = s.placement.iter().find(|e| !seen.insert(*e)) {
        return Err(format!(
            "service {:?}: engine {dup:?} is placed twice",
            s.name
        ));
    }
    if s.placement.iter().any(String::is_empty) {
        return Err(format!("service {:?}: an engine name is empty", s.name));
    }
    Ok(Service {
        name: s.name,
        placement: s.placement,
        min_engines: s.min_engines,
        max_engines: s.max_engines,
        by_bgp: s.bgp,
    })
}

/// The recorded placement: the lines', and the rest (and empty ones) inferred from `vs_pps`.
fn placements(
    lines: BTreeMap<String, (String, Service)>,
    heartbeats: &[Heartbeat],
) -> (Vec<Service>, BTreeSet<String>) {
    // Per service, per engine: all it reported for it.
    let mut reported: BTreeMap<&str, BTreeMap<&str, f64>> = BTreeMap::new();
    for h in heartbeats {
        for (vs, pps) in &h.vs_pps {
            *reported
                .entry(vs.as_str())
                .or_default()
                .entry(h.engine.as_str())
                .or_default() += pps;
        }
    }
    let infer = |name: &str| -> Vec<String> {
        let Some(by_engine) = reported.get(name) else {
            return Vec::new();
        };
        // The most first (ties by name: the map is sorted), then the others by name.
        let primary = by_engine
            .iter()
            .fold(None::<(&str, f64)>, |best, (e, p)| match best {
                Some((_, b)) if b >= *p => best,
                _ => Some((e, *p)),
            })
            .map(|(e, _)| e);
        primary
            .into_iter()
            .chain(by_engine.keys().copied().filter(|e| Some(*e) != primary))
            .map(str::to_owned)
            .collect()
    };
    let mut inferred = BTreeSet::new();
    let mut services: BTreeMap<String, Service> = BTreeMap::new();
    for (name, (_, mut s)) in lines {
        if s.placement.is_empty() {
            s.placement = infer(&name);
            inferred.insert(name.clone());
        }
        services.insert(name, s);
    }
    for name in reported.keys() {
        if !services.contains_key(*name) {
            inferred.insert((*name).to_owned());
            services.insert(
                (*name).to_owned(),
                Service {
                    name: (*name).to_owned(),
                    placement: infer(name),
                    min_engines: DEFAULT_MIN_ENGINES,
                    max_engines: DEFAULT_MAX_ENGINES,
                    by_bgp: false,
                },
            );
        }
    }
    (services.into_values().collect(), inferred)
}

/// The load of one time: each service's demand, from every engine's latest heartbeat.
struct Demand<'t> {
    pps: BTreeMap<&'t str, f64>,
    mbps: BTreeMap<&'t str, f64>,
    connections_per_packet: f64,
    new_per_packet: f64,
}

impl<'t> Demand<'t> {
    fn of(latest: &BTreeMap<&'t str, &'t Heartbeat>) -> Demand<'t> {
        let most = |pick: fn(&'t Heartbeat) -> &'t BTreeMap<String, f64>| {
            let mut m: BTreeMap<&'t str, f64> = BTreeMap::new();
            for h in latest.values() {
                for (vs, v) in pick(h) {
                    let e = m.entry(vs.as_str()).or_default();
                    *e = e.max(*v);
                }
            }
            m
        };
        let pps = most(|h| &h.vs_pps);
        let mbps = most(|h| &h.vs_mbps);
        let packets: f64 = pps.values().sum();
        let per_packet = |total: f64| if packets > 0.0 { total / packets } else { 0.0 };
        Demand {
            connections_per_packet: per_packet(latest.values().map(|h| h.connections).sum()),
            new_per_packet: per_packet(latest.values().map(|h| h.new_connections_per_s).sum()),
            pps,
            mbps,
        }
    }

    /// Packets/s `engine` handles under `placement`: its share of each of its services.
    fn handled(&self, engine: &str, placement: &[Service]) -> f64 {
        placement
            .iter()
            .filter(|v| v.placement.iter().any(|e| e == engine))
            .map(|v| self.pps.get(v.name.as_str()).copied().unwrap_or(0.0) / count(&v.placement))
            .sum()
    }
}

#[allow(clippy::cast_precision_loss)]
fn count<T>(v: &[T]) -> f64 {
    v.len() as f64
}

/// Each time of the trace in order: its heartbeats, with the demand of that time.
fn walk<'t>(trace: &'t Trace, mut f: impl FnMut(u64, &'t [Heartbeat], &Demand<'t>)) {
    let mut latest: BTreeMap<&str, &Heartbeat> = BTreeMap::new();
    for group in trace.heartbeats.chunk_by(|a, b| a.t_ms == b.t_ms) {
        for h in group {
            latest.insert(&h.engine, h);
        }
        f(group[0].t_ms, group, &Demand::of(&latest));
    }
}

/// How an engine's [`Fit`] was found.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FitMethod {
    LeastSquares,
    /// Too little spread for a slope, or a negative idle: idle 0.
    ThroughOrigin,
    /// It handled nothing: its mean CPU, the others' median cost.
    Others,
}

impl FitMethod {
    fn name(self) -> &'static str {
        match self {
            FitMethod::LeastSquares => "least squares",
            FitMethod::ThroughOrigin => "through the origin",
            FitMethod::Others => "the others' median cost",
        }
    }
}

/// An engine's CPU as the model has it: `idle + cost × packets/s handled`.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Fit {
    /// % CPU.
    pub idle: f64,
    /// % CPU per packet/s.
    pub cost: f64,
    pub method: FitMethod,
    /// Samples fitted.
    pub samples: usize,
    /// Of a least-squares fit.
    pub r2: Option<f64>,
}

impl Fit {
    pub fn cpu(&self, handled: f64) -> f64 {
        (self.idle + self.cost * handled).clamp(0.0, 100.0)
    }

    fn of(points: &[(f64, f64)]) -> Option<Fit> {
        if points.is_empty() {
            return None;
        }
        let n = count(points);
        let mx = points.iter().map(|p| p.0).sum::<f64>() / n;
        let my = points.iter().map(|p| p.1).sum::<f64>() / n;
        let sxx: f64 = points.iter().map(|p| (p.0 - mx) * (p.0 - mx)).sum();
        let sxy: f64 = points.iter().map(|p| (p.0 - mx) * (p.1 - my)).sum();
        let syy: f64 = points.iter().map(|p| (p.1 - my) * (p.1 - my)).sum();
        if mx > 0.0 && (sxx / n).sqrt() / mx >= MIN_SPREAD {
            let cost = sxy / sxx;
            let idle = my - cost * mx;
            if cost >= 0.0 && idle >= 0.0 {
                let res: f64 = points
                    .iter()
                    .map(|p| (p.1 - idle - cost * p.0) * (p.1 - idle - cost * p.0))
                    .sum();
                return Some(Fit {
                    idle,
                    cost,
                    method: FitMethod::LeastSquares,
                    samples: points.len(),
                    r2: (syy > 0.0).then(|| 1.0 - res / syy),
                });
            }
        }
        let xx: f64 = points.iter().map(|p| p.0 * p.0).sum();
        (xx > 0.0).then(|| Fit {
            idle: 0.0,
            cost: points.iter().map(|p| p.0 * p.1).sum::<f64>() / xx,
            method: FitMethod::ThroughOrigin,
            samples: points.len(),
            r2: None,
        })
    }
}

/// Every heartbeating engine's fit, on the trace under its recorded placement.
pub fn fit_engines(trace: &Trace) -> BTreeMap<String, Fit> {
    let mut points: BTreeMap<&str, Vec<(f64, f64)>> = BTreeMap::new();
    let mut cpu: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    walk(trace, |_, group, d| {
        for h in group {
            cpu.entry(h.engine.as_str()).or_default().push(h.cpu_pct);
            let p = points.entry(h.engine.as_str()).or_default();
            if h.cpu_pct < SATURATED_PCT {
                p.push((d.handled(&h.engine, &trace.services), h.cpu_pct));
            }
        }
    });
    let mut fits: BTreeMap<String, Fit> = points
        .iter()
        .filter_map(|(e, p)| Some(((*e).to_owned(), Fit::of(p)?)))
        .collect();
    // Through-origin costs carry their idle: the least-squares ones are better where there are.
    let least = fits.values().any(|f| f.method == FitMethod::LeastSquares);
    let mut costs: Vec<f64> = fits
        .values()
        .filter(|f| !least || f.method == FitMethod::LeastSquares)
        .map(|f| f.cost)
        .collect();
    costs.sort_by(f64::total_cmp);
    let median = costs.get(costs.len() / 2).copied().unwrap_or(0.0);
    for (e, c) in cpu {
        fits.entry(e.to_owned()).or_insert_with(|| Fit {
            idle: c.iter().sum::<f64>() / count(&c),
            cost: median,
            method: FitMethod::Others,
            samples: c.len(),
            r2: None,
        });
    }
    fits
}

/// The modelled sample of `engine` under `placement`.
fn modelled(engine: &str, placement: &[Service], d: &Demand<'_>, fit: Fit, at: Instant) -> Sample {
    let mut vs_pps = BTreeMap::new();
    let mut mbps = 0.0;
    for v in placement {
        let Some(i) = v.placement.iter().position(|e| e == engine) else {
            continue;
        };
        // The primary's data plane counts all of the service's packets.
        let share = if i == 0 {
            1.0
        } else {
            1.0 / count(&v.placement)
        };
        let demand = |m: &BTreeMap<&str, f64>| m.get(v.name.as_str()).copied().unwrap_or(0.0);
        vs_pps.insert(v.name.clone(), demand(&d.pps) * share);
        mbps += demand(&d.mbps) * share;
    }
    let handled = d.handled(engine, placement);
    Sample {
        at,
        cpu_pct: fit.cpu(handled),
        pps: vs_pps.values().sum::<f64>() + 0.0,
        mbps,
        connections: d.connections_per_packet * handled,
        new_connections_per_s: d.new_per_packet * handled,
        vs_pps,
    }
}

/// One decision of the replay.
#[derive(Debug, Clone, PartialEq)]
pub struct Event {
    /// Since the trace's first line.
    pub offset: Duration,
    pub action: Option<Action>,
    pub reason: String,
    pub loads: BTreeMap<String, f64>,
    pub dry_run: bool,
    /// Why the change could not be carried out (the controller's refusal).
    pub refused: Option<String>,
    /// The placement after a change that was carried out.
    pub placement: Option<Vec<Service>>,
}

/// An engine's modelled CPU over the replay: its peak and the time above the hot threshold.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct Track {
    pub peak: f64,
    pub above: Duration,
    last: Option<(u64, bool)>,
}

impl Track {
    fn observe(&mut self, t_ms: u64, cpu: f64, threshold: f64) {
        if let Some((since, true)) = self.last {
            self.above += Duration::from_millis(t_ms - since);
        }
        self.peak = self.peak.max(cpu);
        self.last = Some((t_ms, cpu > threshold));
    }
}

/// An engine's CPU: recorded, modelled under the recorded placement, modelled with the loop.
#[derive(Debug, Clone, Copy, Default, PartialEq)]
pub struct EngineCpu {
    pub recorded: Track,
    pub before: Track,
    pub after: Track,
}

/// What the replay did.
#[derive(Debug, Clone, PartialEq)]
pub struct Simulation {
    /// As run (`enabled` on).
    pub settings: RebalanceSettings,
    pub fits: BTreeMap<String, Fit>,
    pub events: Vec<Event>,
    /// The simulated placement at the end.
    pub placement: Vec<Service>,
    pub cpu: BTreeMap<String, EngineCpu>,
    /// The CPU the summary counts time above: `max` for the CPU criterion, else the default's.
    pub hot_cpu: f64,
}

/// Replays `trace` through the decision with `settings` (auto-rebalance on).
pub fn replay(trace: &Trace, settings: RebalanceSettings) -> Simulation {
    let settings = RebalanceSettings {
        enabled: true,
        ..settings
    };
    let hot_cpu = if settings.criterion == Criterion::Cpu {
        settings.max
    } else {
        RebalanceSettings::default().max
    };
    let fits = fit_engines(trace);
    // Far enough from the clock's origin that the window before the first line exists.
    let base = Instant::now() + settings.interval + settings.window;
    let start = trace.start_ms();
    let mut rebalancer = Rebalancer::new(settings);
    let mut placement = trace.services.clone();
    let mut events = Vec::new();
    let mut cpu: BTreeMap<String, EngineCpu> = BTreeMap::new();
    walk(trace, |t_ms, group, d| {
        let offset = Duration::from_millis(t_ms - start);
        let at = base + offset;
        for h in group {
            let fit = fits[h.engine.as_str()];
            let sample = modelled(&h.engine, &placement, d, fit, at);
            let c = cpu.entry(h.engine.clone()).or_default();
            c.recorded.observe(t_ms, h.cpu_pct, hot_cpu);
            c.before.observe(
                t_ms,
                fit.cpu(d.handled(&h.engine, &trace.services)),
                hot_cpu,
            );
            c.after.observe(t_ms, sample.cpu_pct, hot_cpu);
            rebalancer.record(&h.engine, sample);
        }
        let Some(decision) = rebalancer.tick(at, &trace.engines, &placement) else {
            return;
        };
        let mut refused = None;
        let mut changed = false;
        if let Some(a) = decision.action.as_ref().filter(|_| !decision.dry_run) {
            match carry_out(&mut placement, a) {
                Ok(()) => changed = true,
                Err(why) => refused = Some(why),
            }
        }
        events.push(Event {
            offset,
            action: decision.action,
            reason: decision.reason,
            loads: decision.loads,
            dry_run: decision.dry_run,
            refused,
            placement: changed.then(|| placement.clone()),
        });
    });
    Simulation {
        settings,
        fits,
        events,
        placement,
        cpu,
        hot_cpu,
    }
}

/// Carries `action` out on `placement` as the controller would, or says why it would refuse.
pub fn carry_out(placement: &mut [Service], action: &Action) -> Result<(), String> {
    let (Action::ScaleOut { vs, .. } | Action::ScaleIn { vs, .. } | Action::Migrate { vs, .. }) =
        action;
    let v = placement
        .iter_mut()
        .find(|v| v.name == *vs)
        .ok_or_else(|| format!("no virtual service {vs:?}"))?;
    let placed = |e: &str| v.placement.iter().any(|p| p == e);
    let full = v.placement.len() >= v.max_engines as usize;
    match action {
        Action::ScaleOut { to, .. } => {
            if full {
                return Err(format!("{vs} is at its max_engines ({})", v.max_engines));
            }
            if placed(to) {
                return Err(format!("{to} already serves {vs}"));
            }
            v.placement.push(to.clone());
        }
        Action::ScaleIn { engine, .. } => {
            if v.placement.len() <= v.min_engines as usize {
                return Err(format!("{vs} is at its min_engines ({})", v.min_engines));
            }
            if v.placement.first() == Some(engine) {
                return Err(format!(
                    "{engine} is the primary of {vs}: migrate it instead"
                ));
            }
            if !placed(engine) {
                return Err(format!("{engine} is not placed for {vs}"));
            }
            v.placement.retain(|e| e != engine);
        }
        Action::Migrate { from, to, .. } => {
            if !placed(from) {
                return Err(format!("{from} is not placed for {vs}"));
            }
            if placed(to) {
                return Err(format!("{to} already serves {vs}"));
            }
            if full {
                return Err(format!(
                    "{vs} is at its max_engines ({}): a migration adds the target before the old engine leaves",
                    v.max_engines
                ));
            }
            let primary = v.placement.first() == Some(from);
            v.placement.retain(|e| e != from);
            if primary {
                v.placement.insert(0, to.clone());
            } else {
                v.placement.push(to.clone());
            }
        }
    }
    Ok(())
}

fn criterion_name(c: Criterion) -> &'static str {
    match c {
        Criterion::Cpu => "cpu",
        Criterion::Pps => "pps",
        Criterion::Mbps => "mbps",
        Criterion::Connections => "connections",
        Criterion::NewConnections => "new_connections",
    }
}

/// `HH:MM:SS` (whole seconds).
fn hms(d: Duration) -> String {
    let s = d.as_secs();
    format!("{:02}:{:02}:{:02}", s / 3600, s / 60 % 60, s % 60)
}

fn placement_line(placement: &[Service], inferred: &BTreeSet<String>) -> String {
    placement
        .iter()
        .map(|v| {
            format!(
                "{} [{}]{}",
                v.name,
                v.placement.join(" "),
                if inferred.contains(&v.name) {
                    " (inferred)"
                } else {
                    ""
                }
            )
        })
        .collect::<Vec<_>>()
        .join(" · ")
}

fn loads_line(loads: &BTreeMap<String, f64>) -> String {
    loads
        .iter()
        .map(|(e, l)| format!("{e} {l:.0}"))
        .collect::<Vec<_>>()
        .join(", ")
}

/// Changes carried out per kind: (scale out, scale in, migrate); and refused, dry-run, none.
fn counts(sim: &Simulation) -> ([usize; 3], usize, usize, usize) {
    let mut kinds = [0; 3];
    let (mut refused, mut dry, mut none) = (0, 0, 0);
    for e in &sim.events {
        match (&e.action, e.placement.is_some()) {
            (None, _) => none += 1,
            (Some(_), _) if e.dry_run => dry += 1,
            (Some(_), false) => refused += 1,
            (Some(Action::ScaleOut { .. }), true) => kinds[0] += 1,
            (Some(Action::ScaleIn { .. }), true) => kinds[1] += 1,
            (Some(Action::Migrate { .. }), true) => kinds[2] += 1,
        }
    }
    (kinds, refused, dry, none)
}

/// The report for a terminal: header, one line per decision, summary.
pub fn render_human(trace: &Trace, sim: &Simulation) -> String {
    let mut out = String::new();
    human(&mut out, trace, sim).expect("a String takes any text");
    out
}

/// What was replayed, with which settings and model.
fn human_header(out: &mut String, trace: &Trace, sim: &Simulation) -> fmt::Result {
    let st = &sim.settings;
    writeln!(
        out,
        "controller simulate: what the auto-rebalance loop would have done (the controller's decision code on a modelled load)"
    )?;
    writeln!(
        out,
        "trace: {} — {} heartbeats of {} engines ({}) over {}",
        trace.sources.join(", "),
        trace.heartbeats.len(),
        trace.engines.len(),
        trace.engines.iter().cloned().collect::<Vec<_>>().join(", "),
        hms(trace.span())
    )?;
    writeln!(
        out,
        "services (recorded placement, primary first): {}",
        placement_line(&trace.services, &trace.inferred)
    )?;
    writeln!(
        out,
        "settings: criterion {}, max {}, min {}, interval {} s, window {} s, cool-down {} s, hot_share {:.0} %, max_scaleout_per_vs {}, min_scaleout_per_vs {}, buffer_se {}{}",
        criterion_name(st.criterion),
        st.max,
        st.min,
        st.interval.as_secs_f64(),
        st.window.as_secs_f64(),
        st.cooldown.as_secs_f64(),
        st.hot_share * 100.0,
        st.max_scaleout_per_vs,
        st.min_scaleout_per_vs,
        st.buffer_se,
        if st.dry_run {
            ", dry run (nothing carried out)"
        } else {
            ""
        }
    )?;
    writeln!(
        out,
        "model: a service's demand D(t) = the most packets/s an engine reports for it (its primary counts them all), split evenly across its simulated engines;"
    )?;
    writeln!(
        out,
        "       reported as the daemon does (a primary's vs_pps counts all of its service's packets); a change takes effect at once (no pending stage, drain or primary weight); every engine seen is healthy; the recorded placement is fixed"
    )?;
    writeln!(
        out,
        "       an engine's CPU = idle + cost × packets/s it handles, fitted on the trace under the recorded placement (samples ≥ {SATURATED_PCT:.0} % left out):"
    )?;
    for (e, f) in &sim.fits {
        write!(
            out,
            "  {e}  idle {:.1} %, {:.3} % per 1000 pps ({}, {} samples",
            f.idle,
            f.cost * 1000.0,
            f.method.name(),
            f.samples
        )?;
        match f.r2 {
            Some(r2) => writeln!(out, ", r² {r2:.3})")?,
            None => writeln!(out, ")")?,
        }
    }
    Ok(())
}

fn human(out: &mut String, trace: &Trace, sim: &Simulation) -> fmt::Result {
    human_header(out, trace, sim)?;
    writeln!(
        out,
        "decisions (time since the trace's first line; loads in the criterion's unit over the window):"
    )?;
    let indent = " ".repeat(11);
    for e in &sim.events {
        let what = match (&e.action, &e.refused) {
            (None, _) => "no change".to_owned(),
            (Some(a), _) if e.dry_run => format!("{a} (dry run: not carried out)"),
            (Some(a), Some(why)) => format!("{a} (refused: {why})"),
            (Some(a), None) => a.to_string(),
        };
        writeln!(
            out,
            "+{}  {what} — {}; loads: {}",
            hms(e.offset),
            e.reason,
            loads_line(&e.loads)
        )?;
        if let Some(p) = &e.placement {
            writeln!(
                out,
                "{indent}placement: {}",
                placement_line(p, &BTreeSet::new())
            )?;
        }
    }
    human_summary(out, sim)
}

/// The changes per kind, the final placement, each engine's CPU with and without the loop.
fn human_summary(out: &mut String, sim: &Simulation) -> fmt::Result {
    let ([out_n, in_n, mig], refused, dry, none) = counts(sim);
    writeln!(
        out,
        "summary: {} changes ({out_n} scale out, {in_n} scale in, {mig} migrate), {refused} refused, {dry} dry run, {none} intervals without a change",
        out_n + in_n + mig
    )?;
    writeln!(
        out,
        "final placement: {}",
        placement_line(&sim.placement, &BTreeSet::new())
    )?;
    writeln!(
        out,
        "CPU per engine: peak, and time above {:.0} % (modelled as recorded: the recorded placement throughout)",
        sim.hot_cpu
    )?;
    let width = sim.cpu.keys().map(String::len).max().unwrap_or(0).max(6);
    writeln!(
        out,
        "  {:<width$}  {:<16}  {:<20}  modelled with the loop",
        "engine", "recorded", "modelled as recorded"
    )?;
    let cell = |t: &Track| format!("{:>3.0} %  {}", t.peak, hms(t.above));
    for (e, c) in &sim.cpu {
        writeln!(
            out,
            "  {e:<width$}  {:<16}  {:<20}  {}",
            cell(&c.recorded),
            cell(&c.before),
            cell(&c.after)
        )?;
    }
    Ok(())
}

fn action_json(a: &Action) -> Value {
    match a {
        Action::ScaleOut { vs, to } => json!({"kind": "scale_out", "vs": vs, "to": to}),
        Action::ScaleIn { vs, engine } => json!({"kind": "scale_in", "vs": vs, "engine": engine}),
        Action::Migrate { vs, from, to } => {
            json!({"kind": "migrate", "vs": vs, "from": from, "to": to})
        }
    }
}

fn placement_json(placement: &[Service]) -> Value {
    placement
        .iter()
        .map(|v| (v.name.clone(), json!(v.placement)))
        .collect::<serde_json::Map<_, _>>()
        .into()
}

fn track_json(t: &Track) -> Value {
    json!({"peak_pct": t.peak, "above_s": t.above.as_secs_f64()})
}

/// The report as JSON lines: a `header`, one `decision` per interval, a `summary`.
pub fn render_json(trace: &Trace, sim: &Simulation) -> String {
    let st = &sim.settings;
    let mut lines = vec![json!({
        "type": "header",
        "traces": trace.sources,
        "heartbeats": trace.heartbeats.len(),
        "engines": trace.engines,
        "span_s": trace.span().as_secs_f64(),
        "services": trace.services.iter().map(|v| json!({
            "name": v.name,
            "placement": v.placement,
            "min_engines": v.min_engines,
            "max_engines": v.max_engines,
            "inferred": trace.inferred.contains(&v.name),
        })).collect::<Vec<_>>(),
        "settings": {
            "criterion": criterion_name(st.criterion),
            "max": st.max,
            "min": st.min,
            "interval_s": st.interval.as_secs_f64(),
            "window_s": st.window.as_secs_f64(),
            "cooldown_s": st.cooldown.as_secs_f64(),
            "hot_share": st.hot_share,
            "max_scaleout_per_vs": st.max_scaleout_per_vs,
            "min_scaleout_per_vs": st.min_scaleout_per_vs,
            "buffer_se": st.buffer_se,
            "dry_run": st.dry_run,
        },
        "model": sim.fits.iter().map(|(e, f)| (e.clone(), json!({
            "idle_pct": f.idle,
            "cost_pct_per_kpps": f.cost * 1000.0,
            "method": f.method.name(),
            "samples": f.samples,
            "r2": f.r2,
        }))).collect::<serde_json::Map<_, _>>(),
    })];
    for e in &sim.events {
        lines.push(json!({
            "type": "decision",
            "t_s": e.offset.as_secs_f64(),
            "offset": format!("+{}", hms(e.offset)),
            "action": e.action.as_ref().map(action_json),
            "reason": e.reason,
            "dry_run": e.dry_run,
            "carried_out": e.placement.is_some(),
            "refused": e.refused,
            "loads": e.loads,
            "placement": e.placement.as_deref().map(placement_json),
        }));
    }
    let ([out_n, in_n, mig], refused, dry, none) = counts(sim);
    lines.push(json!({
        "type": "summary",
        "changes": {"scale_out": out_n, "scale_in": in_n, "migrate": mig},
        "refused": refused,
        "dry_run": dry,
        "no_change": none,
        "placement": placement_json(&sim.placement),
        "hot_cpu_pct": sim.hot_cpu,
        "cpu": sim.cpu.iter().map(|(e, c)| (e.clone(), json!({
            "recorded": track_json(&c.recorded),
            "modelled_recorded_placement": track_json(&c.before),
            "modelled_with_loop": track_json(&c.after),
        }))).collect::<serde_json::Map<_, _>>(),
    }));
    let mut out = String::new();
    for l in lines {
        out.push_str(&l.to_string());
        out.push('\n');
    }
    out
}

/// The example traces the simulator ships with (`controller/traces/NAME.jsonl`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TraceKind {
    /// 24 h, 4 engines, 3 services with service lines; web ramps from a night low to a midday
    /// peak six times higher and back; a heartbeat every 5 min.
    DailyRamp,
    /// 2 h, 4 engines, 3 services without service lines (inferred); web jumps to 5x for 20 min
    /// ([`FLASH_SPIKE`]); a heartbeat every 20 s.
    FlashCrowd,
}

/// The flash crowd's spike: from, until (since the first line); it ramps over 2 min each way.
pub const FLASH_SPIKE: (Duration, Duration) = (Duration::from_mins(40), Duration::from_hours(1));

impl TraceKind {
    pub const ALL: [TraceKind; 2] = [TraceKind::DailyRamp, TraceKind::FlashCrowd];

    pub fn name(self) -> &'static str {
        match self {
            TraceKind::DailyRamp => "daily-ramp",
            TraceKind::FlashCrowd => "flash-crowd",
        }
    }

    /// The committed file's heartbeat interval.
    pub fn step(self) -> Duration {
        match self {
            TraceKind::DailyRamp => Duration::from_mins(5),
            TraceKind::FlashCrowd => Duration::from_secs(20),
        }
    }

    fn spec(self) -> &'static KindSpec {
        match self {
            TraceKind::DailyRamp => &DAILY_RAMP,
            TraceKind::FlashCrowd => &FLASH_CROWD,
        }
    }
}

impl FromStr for TraceKind {
    type Err = String;

    fn from_str(s: &str) -> Result<TraceKind, String> {
        TraceKind::ALL
            .into_iter()
            .find(|k| k.name() == s)
            .ok_or_else(|| format!("{s:?}: one of daily-ramp, flash-crowd"))
    }
}

/// A generated engine: `cpu = idle + cost × packets/s handled` (the model's own shape).
struct EngineSpec {
    name: &'static str,
    idle: f64,
    cost: f64,
}

const ENGINES: [EngineSpec; 4] = [
    EngineSpec {
        name: "se1",
        idle: 10.0,
        cost: 0.000_40,
    },
    EngineSpec {
        name: "se2",
        idle: 5.0,
        cost: 0.000_42,
    },
    EngineSpec {
        name: "se3",
        idle: 4.0,
        cost: 0.000_38,
    },
    EngineSpec {
        name: "se4",
        idle: 3.0,
        cost: 0.000_40,
    },
];

struct VsSpec {
    name: &'static str,
    placement: &'static [&'static str],
    /// Packets/s at a time (seconds since the first line).
    demand: fn(f64) -> f64,
    bytes_per_packet: f64,
    connections_per_pps: f64,
    new_per_pps: f64,
}

struct KindSpec {
    span: Duration,
    service_lines: bool,
    seed: u64,
    services: [VsSpec; 3],
}

/// 2025-12-03 00:00 UTC.
const BASE_MS: u64 = 1_764_720_000_000;

fn smoothstep(x: f64) -> f64 {
    let x = x.clamp(0.0, 1.0);
    x * x * (3.0 - 2.0 * x)
}

/// 0 at night, rising from 05:00 to 1 at 13:00, back to 0 by 23:00.
fn day(t_s: f64) -> f64 {
    let h = t_s / 3600.0;
    if h < 13.0 {
        smoothstep((h - 5.0) / 8.0)
    } else {
        smoothstep((23.0 - h) / 10.0)
    }
}

/// 1, then (ramping over 2 min) 5 from 40 to 60 min, then 1.
fn spike(t_s: f64) -> f64 {
    let (from, until) = (FLASH_SPIKE.0.as_secs_f64(), FLASH_SPIKE.1.as_secs_f64());
    let ramp = 120.0;
    let up = ((t_s - from) / ramp).clamp(0.0, 1.0);
    let down = ((until - t_s) / ramp + 1.0).clamp(0.0, 1.0);
    1.0 + 4.0 * up.min(down)
}

static DAILY_RAMP: KindSpec = KindSpec {
    span: Duration::from_hours(24),
    service_lines: true,
    seed: 0x5EED_DA11,
    services: [
        VsSpec {
            name: "web",
            placement: &["se1", "se4"],
            demand: |t| 75_000.0 + 345_000.0 * day(t),
            bytes_per_packet: 700.0,
            connections_per_pps: 0.4,
            new_per_pps: 0.02,
        },
        VsSpec {
            name: "api",
            placement: &["se2"],
            demand: |t| 30_000.0 + 40_000.0 * day(t),
            bytes_per_packet: 400.0,
            connections_per_pps: 0.2,
            new_per_pps: 0.01,
        },
        VsSpec {
            name: "db",
            placement: &["se2"],
            demand: |t| 40_000.0 + 20_000.0 * day(t),
            bytes_per_packet: 200.0,
            connections_per_pps: 0.05,
            new_per_pps: 0.001,
        },
    ],
};

static FLASH_CROWD: KindSpec = KindSpec {
    span: Duration::from_hours(2),
    service_lines: false,
    seed: 0xF1A5_C0DE,
    services: [
        VsSpec {
            name: "web",
            placement: &["se1"],
            demand: |t| 65_000.0 * spike(t),
            bytes_per_packet: 700.0,
            connections_per_pps: 0.4,
            new_per_pps: 0.02,
        },
        VsSpec {
            name: "api",
            placement: &["se2"],
            demand: |_| 90_000.0,
            bytes_per_packet: 400.0,
            connections_per_pps: 0.2,
            new_per_pps: 0.01,
        },
        VsSpec {
            name: "db",
            placement: &["se3"],
            demand: |_| 110_000.0,
            bytes_per_packet: 200.0,
            connections_per_pps: 0.05,
            new_per_pps: 0.001,
        },
    ],
};

/// A small deterministic generator (xorshift64*): the same trace on every machine.
struct Rng(u64);

impl Rng {
    /// Uniform in −`amp` … `amp`.
    fn noise(&mut self, amp: f64) -> f64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        let r = self.0.wrapping_mul(0x2545_F491_4F6C_DD1D) >> 11;
        #[allow(clippy::cast_precision_loss)]
        let unit = r as f64 / (1u64 << 53) as f64;
        (2.0 * unit - 1.0) * amp
    }
}

#[derive(Serialize)]
struct ServiceOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    name: &'a str,
    placement: &'a [&'a str],
    min_engines: u32,
    max_engines: u32,
}

#[derive(Serialize)]
struct HeartbeatOut<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    t_ms: u64,
    engine: &'a str,
    cpu_pct: f64,
    pps: u64,
    mbps: f64,
    connections: u64,
    new_connections_per_s: u64,
    vs_pps: BTreeMap<&'a str, u64>,
    vs_mbps: BTreeMap<&'a str, f64>,
}

#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn whole(x: f64) -> u64 {
    x.max(0.0).round() as u64
}

/// To 0.1, and never `-0.0` (an empty float sum's).
fn tenth(x: f64) -> f64 {
    (x * 10.0).round() / 10.0 + 0.0
}

/// An example trace with its committed heartbeat interval.
pub fn generate(kind: TraceKind) -> String {
    generate_every(kind, kind.step())
}

/// An example trace with a heartbeat from every engine every `step` (at least 1 ms). The
/// recorded placement is fixed; each engine's CPU is `idle + cost × its even share` (±1 %), each
/// service's demand varies ±3 % between heartbeats.
pub fn generate_every(kind: TraceKind, step: Duration) -> String {
    let spec = kind.spec();
    let step_ms = u64::try_from(step.as_millis()).unwrap_or(u64::MAX).max(1);
    let span_ms = u64::try_from(spec.span.as_millis()).unwrap_or(u64::MAX);
    let mut rng = Rng(spec.seed);
    let mut out = String::new();
    let mut push = |line: String| {
        out.push_str(&line);
        out.push('\n');
    };
    if spec.service_lines {
        for v in &spec.services {
            push(
                serde_json::to_string(&ServiceOut {
                    kind: "service",
                    name: v.name,
                    placement: v.placement,
                    min_engines: DEFAULT_MIN_ENGINES,
                    max_engines: DEFAULT_MAX_ENGINES,
                })
                .expect("a service line serialises"),
            );
        }
    }
    for t in (0..span_ms).step_by(usize::try_from(step_ms).unwrap_or(usize::MAX)) {
        #[allow(clippy::cast_precision_loss)]
        let t_s = t as f64 / 1000.0;
        let demand: Vec<f64> = spec
            .services
            .iter()
            .map(|v| (v.demand)(t_s) * (1.0 + rng.noise(0.03)))
            .collect();
        for engine in &ENGINES {
            let mut hb = HeartbeatOut {
                kind: "heartbeat",
                t_ms: BASE_MS + t,
                engine: engine.name,
                cpu_pct: 0.0,
                pps: 0,
                mbps: 0.0,
                connections: 0,
                new_connections_per_s: 0,
                vs_pps: BTreeMap::new(),
                vs_mbps: BTreeMap::new(),
            };
            let (mut handled, mut connections, mut new) = (0.0, 0.0, 0.0);
            for (v, d) in spec.services.iter().zip(&demand) {
                let Some(i) = v.placement.iter().position(|e| *e == engine.name) else {
                    continue;
                };
                let share = d / count(v.placement);
                let seen = if i == 0 { *d } else { share };
                handled += share;
                connections += share * v.connections_per_pps;
                new += share * v.new_per_pps;
                hb.vs_pps.insert(v.name, whole(seen));
                hb.vs_mbps
                    .insert(v.name, tenth(seen * v.bytes_per_packet * 8.0 / 1e6));
            }
            hb.cpu_pct =
                tenth((engine.idle + engine.cost * handled + rng.noise(1.0)).clamp(0.0, 100.0));
            hb.pps = hb.vs_pps.values().sum();
            hb.mbps = tenth(hb.vs_mbps.values().sum());
            hb.connections = whole(connections);
            hb.new_connections_per_s = whole(new);
            push(serde_json::to_string(&hb).expect("a heartbeat serialises"));
        }
    }
    out
}

#[cfg(test)]
mod tests;
