//! `lb-bench bgp`: how fast a router stops sending to a dead engine, and starts sending to a new
//! one, with the engines' BGP speaker against real routers (BIRD 2, FRR) in the BGP lab
//! (`lb_tests::bgp_lab`: two engines announcing one VIP, the router's kernel table read every
//! 20 ms).
//!
//! Per router and run: `kill -9` of an engine → its next hop leaves the router's table (the TCP
//! session closes with the process); a new daemon started on that engine → its next hop is back
//! (daemon start, XDP attach, BGP session, first UPDATE); SIGSTOP (hung: sessions stay open, nothing
//! answers) → next hop gone, with BFD at 100 ms × 3, and, for comparison, in a lab without BFD
//! where only the hold timer notices.

use std::{fmt::Write as _, fs, path::PathBuf, time::Duration};

use anyhow::Result;
use lb_tests::bgp_lab::{BgpLab, Kind};
use nix::sys::signal::Signal;
use serde::Serialize;

use crate::machine;

#[derive(clap::Args)]
pub struct Options {
    /// Runs of each case (medians are reported).
    #[arg(long, default_value_t = 10)]
    runs: usize,
    /// The hold time of the comparison without BFD, in seconds (3–9; the routers offer 9).
    #[arg(long, default_value_t = 3)]
    hold_time_s: u16,
    /// Routers to measure against.
    #[arg(long, value_delimiter = ',', default_value = "bird,frr")]
    routers: Vec<String>,
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

#[derive(Serialize, Default)]
struct Case {
    ms: Vec<f64>,
    ms_p50: f64,
    ms_max: f64,
}

impl Case {
    fn push(&mut self, d: Duration) {
        self.ms.push(d.as_secs_f64() * 1e3);
    }

    fn finish(&mut self) {
        self.ms_p50 = crate::machine::median(&self.ms);
        self.ms_max = self.ms.iter().copied().fold(f64::NAN, f64::max);
    }
}

#[derive(Serialize, Default)]
struct RouterReport {
    router: String,
    /// `kill -9` → next hop gone.
    kill9_withdrawn: Case,
    /// New daemon started → next hop present.
    start_announced: Case,
    /// SIGSTOP → next hop gone, BFD 100 ms × 3.
    hung_withdrawn_bfd: Case,
    /// SIGSTOP → next hop gone, hold timer only.
    hung_withdrawn_hold: Case,
}

#[derive(Serialize)]
struct Report {
    date: String,
    machine: String,
    runs: usize,
    hold_time_s: u16,
    routers: Vec<RouterReport>,
}

const LONG: Duration = Duration::from_secs(30);

fn with_bfd(kind: Kind, runs: usize, r: &mut RouterReport) -> Result<()> {
    let mut lab = BgpLab::build_full(kind, &[1, 2], false, true)?;
    lab.wait_hops(&[1, 2], LONG)?;
    lab.wait_bfd_up(&[1, 2], LONG)?;
    for run in 0..runs {
        lab.daemon(2).proc().kill();
        let killed = lab.wait_hops(&[1], LONG)?;
        let started = std::time::Instant::now();
        lab.start_engine(2, false)?;
        lab.wait_hops(&[1, 2], LONG)?;
        let announced = started.elapsed();
        lab.wait_bfd_up(&[1, 2], LONG)?;
        lab.daemon(2).proc().signal(Signal::SIGSTOP)?;
        let hung = lab.wait_hops(&[1], LONG);
        lab.daemon(2).proc().signal(Signal::SIGCONT)?;
        let hung = hung?;
        lab.wait_hops(&[1, 2], LONG)?;
        lab.wait_bfd_up(&[1, 2], LONG)?;
        println!(
            "{kind:?} run {run}: kill -9 → withdrawn {:.1} ms; start → announced {:.0} ms; SIGSTOP (BFD) → withdrawn {:.1} ms",
            killed.as_secs_f64() * 1e3,
            announced.as_secs_f64() * 1e3,
            hung.as_secs_f64() * 1e3
        );
        r.kill9_withdrawn.push(killed);
        r.start_announced.push(announced);
        r.hung_withdrawn_bfd.push(hung);
    }
    Ok(())
}

fn hold_only(kind: Kind, runs: usize, hold: u16, r: &mut RouterReport) -> Result<()> {
    let lab = BgpLab::build_timed(kind, &[1, 2], false, false, hold)?;
    lab.wait_hops(&[1, 2], LONG)?;
    for run in 0..runs {
        lab.daemon(2).proc().signal(Signal::SIGSTOP)?;
        let hung = lab.wait_hops(&[1], LONG);
        lab.daemon(2).proc().signal(Signal::SIGCONT)?;
        let hung = hung?;
        lab.wait_hops(&[1, 2], LONG)?;
        println!(
            "{kind:?} run {run}: SIGSTOP (hold timer {hold} s) → withdrawn {:.0} ms",
            hung.as_secs_f64() * 1e3
        );
        r.hung_withdrawn_hold.push(hung);
    }
    Ok(())
}

pub fn run(opts: &Options) -> Result<()> {
    anyhow::ensure!(
        (3..=9).contains(&opts.hold_time_s),
        "--hold-time-s must be 3-9 (the routers offer 9)"
    );
    let mut routers = Vec::new();
    for name in &opts.routers {
        let kind = match name.as_str() {
            "bird" => Kind::Bird,
            "frr" => Kind::Frr,
            other => anyhow::bail!("unknown router {other:?} (bird, frr)"),
        };
        let mut r = RouterReport {
            router: name.clone(),
            ..RouterReport::default()
        };
        with_bfd(kind, opts.runs, &mut r)?;
        hold_only(kind, opts.runs, opts.hold_time_s, &mut r)?;
        for c in [
            &mut r.kill9_withdrawn,
            &mut r.start_announced,
            &mut r.hung_withdrawn_bfd,
            &mut r.hung_withdrawn_hold,
        ] {
            c.finish();
        }
        routers.push(r);
    }
    let report = Report {
        date: machine::cmd_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine: machine::cpu_model(),
        runs: opts.runs,
        hold_time_s: opts.hold_time_s,
        routers,
    };
    let dir = crate::machine::results_dir(opts.out_dir.as_deref())?;
    fs::write(dir.join("bgp.json"), serde_json::to_string_pretty(&report)?)?;
    let md = markdown(&report);
    fs::write(dir.join("bgp.md"), &md)?;
    println!("{md}");
    Ok(())
}

fn markdown(r: &Report) -> String {
    let mut s = format!(
        "BGP: time until the router's next hop changes, medians (max) of {} runs, {}, {}\n\n\
         | router | kill -9 → withdrawn | start → announced | SIGSTOP → withdrawn, BFD 100 ms × 3 | SIGSTOP → withdrawn, hold timer {} s |\n|---|---|---|---|---|\n",
        r.runs, r.date, r.machine, r.hold_time_s
    );
    for x in &r.routers {
        let _ = writeln!(
            s,
            "| {} | {:.1} ms ({:.1}) | {:.0} ms ({:.0}) | {:.0} ms ({:.0}) | {:.0} ms ({:.0}) |",
            x.router,
            x.kill9_withdrawn.ms_p50,
            x.kill9_withdrawn.ms_max,
            x.start_announced.ms_p50,
            x.start_announced.ms_max,
            x.hung_withdrawn_bfd.ms_p50,
            x.hung_withdrawn_bfd.ms_max,
            x.hung_withdrawn_hold.ms_p50,
            x.hung_withdrawn_hold.ms_max,
        );
    }
    s
}
