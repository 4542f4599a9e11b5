//! The auto-rebalance loop. `simulator`: how fast `controller simulate` replays a trace, in
//! engine-hours of trace per second of wall time (parse, fit and replay through the decision code,
//! as the command does, without the file read and the printing).
//!
//! The trace is the generated daily ramp (4 engines, 24 h) with a heartbeat every `--heartbeat-ms`
//! (1000 by default, the controller's heartbeat interval: a real recording's density), held in
//! memory. The median of `--runs` repeats is reported, with the replay alone beside it. The result
//! is merged into `rebalance.json` under `"simulator"`, keeping the file's other keys.
//!
//! `end_to_end`: in the controller lab (four managed release daemons, each in a cgroup with a
//! fifth of a CPU, the loop at interval 10 s and window 3 s), wrk (one request per connection)
//! through the one engine of a service; from the first heartbeat that reports the engine above the
//! maximum (80 %) to the loop's scale-out, and to the first connection the new engine's proxy
//! accepts. The interval's phase is not aligned with the load, so the time to the decision ranges
//! over window … interval + window; the median of `--e2e-runs` is reported (0: skipped).

use crate::machine::median;
use std::{
    fs,
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, ensure};
use controller::{
    rebalance::RebalanceSettings,
    simulate::{self, Trace, TraceKind},
};
use serde::Serialize;

use crate::machine;

#[derive(clap::Args)]
pub struct Options {
    /// Repeats (the median is reported; at least 5).
    #[arg(long, default_value_t = 7)]
    runs: usize,
    /// The generated trace's heartbeat interval, ms.
    #[arg(long, default_value_t = 1000)]
    heartbeat_ms: u64,
    /// Runs of the end-to-end measurement (0: skip it).
    #[arg(long, default_value_t = 3)]
    e2e_runs: usize,
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

#[derive(Serialize)]
struct EndToEnd {
    date: String,
    machine: String,
    settings: &'static str,
    runs: usize,
    /// Per run, seconds: the threshold crossed (first heartbeat above 80 %) → the scale-out.
    to_decision_s: Vec<f64>,
    /// The scale-out → the new engine's first accepted connection.
    decision_to_traffic_s: Vec<f64>,
    /// The threshold crossed → the new engine's first accepted connection.
    to_traffic_s: Vec<f64>,
    to_decision_s_p50: f64,
    decision_to_traffic_s_p50: f64,
    to_traffic_s_p50: f64,
}

/// One end-to-end run: (threshold → decision, decision → traffic), seconds.
fn end_to_end_run(run: usize) -> Result<(f64, f64)> {
    use lb_tests::controller_lab::{ControllerLab, placement};
    let l = ControllerLab::build_with(
        &format!("lbbr{}", char::from(b'a' + u8::try_from(run % 26)?)),
        &[
            "--auto-rebalance",
            "--rebalance-interval-s",
            "10",
            "--rebalance-window-s",
            "3",
            "--rebalance-cooldown-s",
            "60",
        ],
        Some(0.2),
    )?;
    l.create_web_pool()?;
    let primary = placement(&l.create_web_service(1)?)
        .first()
        .cloned()
        .context("placed")?;
    l.wait_cgroup_cpu()?;
    let wrk = lb_tests::tools::Wrk {
        connections: 8,
        duration: Duration::from_secs(3),
        close: true,
        ..lb_tests::tools::Wrk::new(&format!("http://{}/", l.lab.vip_http()))
    };
    let load = lb_tests::tools::WrkLoop::start(l.lab.client(0), wrk, 20);
    let started = Instant::now();
    let (mut crossed, mut decided, mut traffic) = (None, None, None);
    let mut new_engine = None;
    while traffic.is_none() && started.elapsed() < Duration::from_secs(50) {
        let now = Instant::now();
        if crossed.is_none() {
            let engines = l.lbctl(&["engines"])?.json()?;
            let hot = engines.as_array().is_some_and(|a| {
                a.iter().any(|e| {
                    e["name"] == primary.as_str() && e["cpu_pct"].as_f64().unwrap_or(0.0) > 80.0
                })
            });
            if hot {
                crossed = Some(now);
            }
        }
        if decided.is_none() {
            let v = l.lbctl(&["vs", "get", "web"])?.json()?;
            if let Some(e) = placement(&v).get(1) {
                decided = Some(now);
                new_engine = l.id_of(e);
            }
        }
        if let Some(id) = new_engine {
            let accepted = l
                .metric_per_engine("lb_proxy_connections_total", &[("vs", "web")])?
                .get(&id)
                .copied()
                .unwrap_or(0.0);
            if accepted > 0.0 {
                traffic = Some(now);
            }
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    load.finish()?;
    let (Some(c), Some(d), Some(t)) = (crossed, decided, traffic) else {
        anyhow::bail!("run {run}: crossed {crossed:?}, decided {decided:?}, traffic {traffic:?}");
    };
    let to_decision = d.saturating_duration_since(c).as_secs_f64();
    let to_traffic = t.saturating_duration_since(d).as_secs_f64();
    println!(
        "end to end, run {run}: threshold → scale-out {to_decision:.2} s, → traffic {to_traffic:.2} s later"
    );
    Ok((to_decision, to_traffic))
}

fn end_to_end(runs: usize) -> Result<EndToEnd> {
    let mut to_decision_s = Vec::new();
    let mut decision_to_traffic_s = Vec::new();
    for run in 0..runs {
        let (d, t) = end_to_end_run(run)?;
        to_decision_s.push(d);
        decision_to_traffic_s.push(t);
    }
    let to_traffic_s: Vec<f64> = to_decision_s
        .iter()
        .zip(&decision_to_traffic_s)
        .map(|(a, b)| a + b)
        .collect();
    Ok(EndToEnd {
        date: machine::cmd_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine: machine::cpu_model(),
        settings: "interval 10 s, window 3 s, max 80 % CPU of a 0.2-CPU cgroup quota per daemon",
        runs,
        to_decision_s_p50: median(&to_decision_s),
        decision_to_traffic_s_p50: median(&decision_to_traffic_s),
        to_traffic_s_p50: median(&to_traffic_s),
        to_decision_s,
        decision_to_traffic_s,
        to_traffic_s,
    })
}

#[derive(Serialize)]
struct Simulator {
    date: String,
    machine: String,
    loadavg_before: String,
    loadavg_after: String,
    trace: String,
    engines: usize,
    trace_hours: f64,
    heartbeats: usize,
    heartbeat_ms: u64,
    /// Default (Avi) settings.
    settings: &'static str,
    decisions: usize,
    changes: usize,
    runs: usize,
    /// Parse, fit and replay, per run.
    total_s: Vec<f64>,
    /// `engines × trace hours / total_s`, per run; the median.
    engine_hours_per_s: Vec<f64>,
    engine_hours_per_s_p50: f64,
    /// The same for the fit and replay of an already parsed trace.
    replay_only_engine_hours_per_s_p50: f64,
    heartbeats_per_s_p50: f64,
}

pub fn run(opts: &Options) -> Result<()> {
    ensure!(opts.runs >= 5, "--runs must be at least 5");
    ensure!(opts.heartbeat_ms > 0, "--heartbeat-ms must be above 0");
    let kind = TraceKind::DailyRamp;
    let text = simulate::generate_every(kind, Duration::from_millis(opts.heartbeat_ms));
    let settings = RebalanceSettings::default();
    let loadavg_before = machine::loadavg();
    let mut total_s = Vec::new();
    let mut replay_s = Vec::new();
    let mut shape = None;
    for run in 0..opts.runs {
        let started = Instant::now();
        let trace = Trace::parse(&[(kind.name(), &text)])?;
        let parsed = Instant::now();
        let sim = simulate::replay(&trace, settings);
        let done = Instant::now();
        total_s.push((done - started).as_secs_f64());
        replay_s.push((done - parsed).as_secs_f64());
        let changes = sim.events.iter().filter(|e| e.placement.is_some()).count();
        println!(
            "run {run}: {} heartbeats parsed in {:.3} s, replayed in {:.3} s ({} decisions, {changes} changes)",
            trace.heartbeats.len(),
            (parsed - started).as_secs_f64(),
            (done - parsed).as_secs_f64(),
            sim.events.len()
        );
        shape = Some((trace, sim.events.len(), changes));
    }
    let (trace, decisions, changes) = shape.context("no run")?;
    let engines = trace.engines.len();
    // The span covers the first to the last heartbeat; each stands for one heartbeat interval.
    let hours = (trace.span() + Duration::from_millis(opts.heartbeat_ms)).as_secs_f64() / 3600.0;
    #[allow(clippy::cast_precision_loss)]
    let engine_hours = engines as f64 * hours;
    let rate = |s: &[f64]| s.iter().map(|s| engine_hours / s).collect::<Vec<_>>();
    let engine_hours_per_s = rate(&total_s);
    #[allow(clippy::cast_precision_loss)]
    let heartbeats = trace.heartbeats.len() as f64;
    let report = Simulator {
        date: machine::cmd_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine: machine::cpu_model(),
        loadavg_before,
        loadavg_after: machine::loadavg(),
        trace: format!("{} (generated)", kind.name()),
        engines,
        trace_hours: hours,
        heartbeats: trace.heartbeats.len(),
        heartbeat_ms: opts.heartbeat_ms,
        settings: "defaults: cpu, max 80, min 30, interval 300 s, window 30 s, cool-down 300 s, buffer_se 1",
        decisions,
        changes,
        runs: opts.runs,
        engine_hours_per_s_p50: median(&engine_hours_per_s),
        replay_only_engine_hours_per_s_p50: median(&rate(&replay_s)),
        heartbeats_per_s_p50: heartbeats / median(&total_s),
        total_s,
        engine_hours_per_s,
    };
    let dir = crate::machine::results_dir(opts.out_dir.as_deref())?;
    let path = dir.join("rebalance.json");
    // Other parts of this benchmark keep their keys.
    let mut all = match fs::read_to_string(&path) {
        Ok(text) => serde_json::from_str::<serde_json::Value>(&text)
            .with_context(|| format!("{} is not JSON", path.display()))?,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => serde_json::json!({}),
        Err(e) => return Err(e).with_context(|| format!("reading {}", path.display())),
    };
    let obj = all
        .as_object_mut()
        .with_context(|| format!("{} is not a JSON object", path.display()))?;
    obj.insert("simulator".into(), serde_json::to_value(&report)?);
    if opts.e2e_runs > 0 {
        let e2e = end_to_end(opts.e2e_runs)?;
        println!(
            "end to end: threshold → scale-out {:.2} s, → the new engine's first connection {:.2} s (medians of {})",
            e2e.to_decision_s_p50, e2e.to_traffic_s_p50, e2e.runs
        );
        obj.insert("end_to_end".into(), serde_json::to_value(&e2e)?);
    }
    fs::write(&path, serde_json::to_string_pretty(&all)? + "\n")?;
    println!(
        "simulator: {:.0} engine-hours of trace per second (median of {}; replay alone {:.0}; {:.0} heartbeats/s) → {}",
        report.engine_hours_per_s_p50,
        report.runs,
        report.replay_only_engine_hours_per_s_p50,
        report.heartbeats_per_s_p50,
        path.display()
    );
    Ok(())
}
