//! Failover: how long the system takes to steer around a dead engine, and what it costs the
//! connections, against keepalived (VRRP) measured in the same run on the same lab.
//!
//! Each run builds the controller lab (a controller, four managed release daemons, the lab's
//! backends) with one virtual service on three engines, and measures:
//! - **secondary**: a secondary's daemon is killed (`kill -9`); the time until the primary marks
//!   it down (polling the primary's `lb_peer_transitions_total`), i.e. until new flows avoid it;
//! - **primary**: with `--held` keep-alive connections open, the primary's link goes down; the
//!   time until a new connection from the client is answered again (the promoted engine's
//!   gratuitous ARP moved the client's neighbour entry), and how many of the held connections
//!   owned by surviving engines were lost (`survivor_resets`; the goal is 0) and how many in all.
//!
//! The baseline is what an operator would otherwise run: two nodes with keepalived sharing the VIP
//! by VRRP, each with nginx on it (the proxy), the master's link taken down the same way. It is
//! measured at `advert_int` 1 s (keepalived's default) and at the probe interval of our engines
//! (`--vrrp-advert-ms`, VRRP version 3); every connection held on the master is lost, as no state moves.

use std::{
    fs,
    net::{IpAddr, Ipv4Addr, SocketAddr},
    path::PathBuf,
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail};
use lb_tests::{
    client::{Keeper, one_request},
    controller_lab::{ControllerLab, placement},
    daemon::metric_sum,
    lab::{Lab, Output},
    netns::enter,
    nginx::Nginx,
};
use serde::Serialize;

use crate::machine;

#[derive(clap::Args)]
pub struct Options {
    /// Runs of each case (medians are reported).
    #[arg(long, default_value_t = 3)]
    runs: usize,
    /// Keep-alive connections held through a primary failover.
    #[arg(long, default_value_t = 300)]
    held: usize,
    /// keepalived's fast `advert_int`, in ms (VRRP version 3), to compare like for like with our probes.
    #[arg(long, default_value_t = 50)]
    vrrp_advert_ms: u32,
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

#[derive(Serialize, Default)]
struct Case {
    /// ms per run.
    ms: Vec<f64>,
    ms_p50: f64,
    ms_max: f64,
    /// Held connections per run, lost per run (all, and of surviving engines).
    held: Vec<usize>,
    lost: Vec<usize>,
    survivor_resets: Vec<usize>,
}

impl Case {
    fn finish(&mut self) {
        let mut v = self.ms.clone();
        v.sort_by(f64::total_cmp);
        self.ms_p50 = v.get(v.len() / 2).copied().unwrap_or(0.0);
        self.ms_max = v.last().copied().unwrap_or(0.0);
    }
}

#[derive(Serialize)]
struct Report {
    date: String,
    machine: String,
    runs: usize,
    held: usize,
    secondary: Case,
    primary: Case,
    keepalived_default: Case,
    keepalived_fast: Case,
    vrrp_advert_ms: u32,
    /// `primary.ms_p50 / keepalived_fast.ms_p50`, and over `keepalived_default.ms_p50`.
    primary_vs_keepalived_fast: f64,
    primary_vs_keepalived_default: f64,
}

fn ms(d: Duration) -> f64 {
    d.as_secs_f64() * 1000.0
}

/// Polls `GET /` from `client` until it is answered; the time since `since`.
fn served_again(client: &lb_tests::Ns, target: SocketAddr, since: Instant) -> Result<Duration> {
    // Attempts of 20 ms (the lab's round trip is ~0.1 ms): the answer is timed to within that.
    lb_tests::client::served_again(
        client,
        target,
        since,
        Duration::from_millis(20),
        Duration::from_secs(15),
    )
    .context("not served again within 15 s")
}

/// One run of ours: (secondary marked down after, primary served again after, held, lost,
/// survivors' lost).
fn ours(held: usize) -> Result<(Duration, Duration, usize, usize, usize)> {
    let mut l = ControllerLab::build("lbfo")?;
    l.create_web_pool()?;
    let vs = l.create_web_service(3)?;
    let names = placement(&vs);
    let id_of = |name: &str| l.id_of(name).context("placed engine");
    let (primary, third) = (id_of(&names[0])?, id_of(&names[2])?);
    l.wait_all_hear(&names)?;

    // A secondary's daemon dies.
    let downs = |l: &ControllerLab| -> Option<f64> {
        let m = l.daemon(primary)?.metrics().ok()?;
        Some(metric_sum(
            &m,
            "lb_peer_transitions_total",
            &[("signal", "daemon"), ("to", "down")],
        ))
    };
    let before = downs(&l).context("the primary's metrics")?;
    let killed = Instant::now();
    l.kill_daemon(third)?;
    let secondary = loop {
        if downs(&l).is_some_and(|n| n > before) {
            break killed.elapsed();
        }
        if killed.elapsed() > Duration::from_secs(5) {
            bail!("the primary never marked its secondary down");
        }
        std::thread::sleep(Duration::from_millis(2));
    };
    l.start_daemon(third)?;
    l.wait_all_hear(&names)?;

    // The primary's host goes away under held connections.
    let client = l.lab.client(0).clone();
    let target = l.lab.vip_http();
    let keeper = Keeper::start(&client, target, held, Duration::from_secs(1))?;
    std::thread::sleep(Duration::from_millis(1500));
    let owner_of = l.connection_owners()?;
    let old_ns = l.engine_ns(primary)?;
    let gone = Instant::now();
    l.lab.lab.ip(&old_ns, &["link", "set", "eth0", "down"])?;
    let served = served_again(&client, target, gone)?;
    std::thread::sleep(Duration::from_secs(4));
    let report = keeper.finish()?;
    let survivors_lost = report
        .failed
        .iter()
        .filter(|(i, _)| owner_of.get(&report.clients[*i]) != Some(&primary))
        .count();
    Ok((
        secondary,
        served,
        report.connections,
        report.failed.len(),
        survivors_lost,
    ))
}

/// keepalived's configuration for one node.
fn keepalived_conf(priority: u8, advert_ms: u32, vip: Ipv4Addr) -> String {
    let (version, advert) = if advert_ms >= 1000 && advert_ms.is_multiple_of(1000) {
        (2, format!("{}", advert_ms / 1000))
    } else {
        (3, format!("{:.2}", f64::from(advert_ms) / 1000.0))
    };
    format!(
        r"global_defs {{
    vrrp_version {version}
    vrrp_garp_master_delay 0
    vrrp_garp_master_repeat 5
    enable_script_security
}}
vrrp_instance lb {{
    state BACKUP
    interface eth0
    virtual_router_id 51
    priority {priority}
    advert_int {advert}
    nopreempt
    virtual_ipaddress {{
        {vip}/24 dev eth0
    }}
}}
"
    )
}

/// One keepalived run: (served again after, held, lost).
fn keepalived(advert_ms: u32, held: usize) -> Result<(Duration, usize, usize)> {
    let lab = Lab::new(if advert_ms >= 1000 { "lbkd" } else { "lbkf" })?;
    lab.switch()?;
    let client = lab.add_ns("client")?;
    lab.attach(&client, "eth0", "10.77.0.2/24")?;
    let vip = Ipv4Addr::new(10, 77, 0, 100);
    let dir = tempfile::Builder::new()
        .prefix("lb-keepalived-")
        .tempdir()?;
    let mut nodes = Vec::new();
    let mut procs = Vec::new();
    let mut nginxes = Vec::new();
    for (i, priority) in [(1u8, 200u8), (2, 100)] {
        let ns = lab.add_ns(&format!("kv{i}"))?;
        lab.attach(&ns, "eth0", &format!("10.77.0.{}/24", 10 + i))?;
        nginxes.push(Nginx::start(
            &lab,
            &ns,
            &format!("kv{i}"),
            &[SocketAddr::from(([0, 0, 0, 0], 80))],
        )?);
        let conf = dir.path().join(format!("kv{i}.conf"));
        fs::write(&conf, keepalived_conf(priority, advert_ms, vip))?;
        let p = |what: &str| {
            dir.path()
                .join(format!("kv{i}.{what}"))
                .display()
                .to_string()
        };
        let log = dir.path().join(format!("kv{i}.log"));
        procs.push(lab.spawn(
            &ns,
            &[
                "keepalived",
                "--dont-fork",
                "--log-console",
                "--vrrp",
                "--use-file",
                &conf.display().to_string(),
                "--pid",
                &p("pid"),
                "--vrrp_pid",
                &p("vrrp.pid"),
            ],
            &Output::File(log),
        )?);
        nodes.push(ns);
    }
    let target = SocketAddr::new(IpAddr::V4(vip), 80);
    // The master takes the VIP after its first master-down interval.
    let up = Instant::now();
    served_again(&client, target, up).context("keepalived never served the VIP")?;
    let holder = one_request_in(&client, target)?;
    let master = if holder == "kv1" {
        &nodes[0]
    } else {
        &nodes[1]
    };
    std::thread::sleep(Duration::from_secs(2));
    let keeper = Keeper::start(&client, target, held, Duration::from_secs(1))?;
    std::thread::sleep(Duration::from_millis(1500));
    let gone = Instant::now();
    lab.ip(master, &["link", "set", "eth0", "down"])?;
    let served = served_again(&client, target, gone)?;
    std::thread::sleep(Duration::from_secs(4));
    let report = keeper.finish()?;
    drop(procs);
    drop(nginxes);
    Ok((served, report.connections, report.failed.len()))
}

fn one_request_in(client: &lb_tests::Ns, target: SocketAddr) -> Result<String> {
    let client = client.clone();
    std::thread::spawn(move || -> Result<String> {
        enter(client.name())?;
        one_request(target, Duration::from_secs(1))
    })
    .join()
    .map_err(|_| anyhow::anyhow!("the request thread panicked"))?
}

pub fn run(opts: &Options) -> Result<()> {
    let mut secondary = Case::default();
    let mut primary = Case::default();
    let mut k_default = Case::default();
    let mut k_fast = Case::default();
    for run in 0..opts.runs {
        let (s, p, held, lost, survivors) = ours(opts.held)?;
        println!(
            "run {run}: secondary marked down after {:.1} ms; primary: served again after {:.1} ms, lost {lost} of {held} held ({survivors} of surviving engines)",
            ms(s),
            ms(p)
        );
        secondary.ms.push(ms(s));
        primary.ms.push(ms(p));
        primary.held.push(held);
        primary.lost.push(lost);
        primary.survivor_resets.push(survivors);
        for (case, advert) in [(&mut k_fast, opts.vrrp_advert_ms), (&mut k_default, 1000)] {
            let (served, held, lost) = keepalived(advert, opts.held)?;
            println!(
                "run {run}: keepalived advert_int {advert} ms: served again after {:.1} ms, lost {lost} of {held} held",
                ms(served)
            );
            case.ms.push(ms(served));
            case.held.push(held);
            case.lost.push(lost);
        }
    }
    for c in [&mut secondary, &mut primary, &mut k_default, &mut k_fast] {
        c.finish();
    }
    let report = Report {
        date: machine::cmd_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine: machine::cpu_model(),
        runs: opts.runs,
        held: opts.held,
        primary_vs_keepalived_fast: primary.ms_p50 / k_fast.ms_p50,
        primary_vs_keepalived_default: primary.ms_p50 / k_default.ms_p50,
        secondary,
        primary,
        keepalived_default: k_default,
        keepalived_fast: k_fast,
        vrrp_advert_ms: opts.vrrp_advert_ms,
    };
    let dir = crate::machine::results_dir(opts.out_dir.as_deref())?;
    let path = dir.join("failover.json");
    fs::write(&path, serde_json::to_string_pretty(&report)?)?;
    println!(
        "secondary p50 {:.1} ms (max {:.1}); primary p50 {:.1} ms (max {:.1}); keepalived p50 {:.1} ms at {} ms adverts, {:.1} ms at 1 s; ratios {:.2} / {:.2}; → {}",
        report.secondary.ms_p50,
        report.secondary.ms_max,
        report.primary.ms_p50,
        report.primary.ms_max,
        report.keepalived_fast.ms_p50,
        report.vrrp_advert_ms,
        report.keepalived_default.ms_p50,
        report.primary_vs_keepalived_fast,
        report.primary_vs_keepalived_default,
        path.display()
    );
    Ok(())
}
