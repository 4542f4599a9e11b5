//! `lb-lab` (`cargo xtask lab`): the whole system in network namespaces, driven the way an operator
//! drives it. A controller and four managed engines (`lb-daemon` following the controller), four
//! nginx backends and a client on one bridge. `lbctl` creates a pool and a virtual service on three
//! engines; the lab sends HTTP connections to the VIP, prints `lbctl` views (the engines; the
//! service with its placement and health score), how the connections spread over backends and
//! engines, and the primary's data-plane counters, then removes everything.
//!
//! ```text
//! lb-lab [--connections N] [--tolerance PTS]
//! ```
//! Exit status: 0 when every connection succeeded and every placed engine's share is within the
//! tolerance (default 5 points) of an even split; 1 otherwise; 2 without root.
//! `LB_DAEMON_BIN`, `LB_CONTROLLER_BIN`, `LB_LBCTL_BIN` and `LB_XDP_OBJECT` override the paths.

use std::process::ExitCode;

use anyhow::{Context, Result};
use lb_tests::controller_lab::{ControllerLab, placement};
use lb_tests::daemon::metric_lines;

#[derive(clap::Parser)]
struct Args {
    /// HTTP connections in all.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Allowed distance of an engine's share from an even split, in percentage points.
    #[arg(long, default_value_t = 5.0)]
    tolerance: f64,
}

fn main() -> ExitCode {
    let args = <Args as clap::Parser>::parse();
    if !lb_tests::is_root() {
        eprintln!("lb-lab: needs root (network namespaces, XDP)");
        return ExitCode::from(2);
    }
    match run(&args) {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::FAILURE,
        Err(e) => {
            eprintln!("lb-lab: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn lbctl(l: &ControllerLab, args: &[&str]) -> Result<String> {
    println!("$ lbctl {}", args.join(" "));
    let out = l.lbctl_text(args)?;
    print!("{out}");
    Ok(out)
}

#[allow(clippy::cast_precision_loss, clippy::too_many_lines)]
fn run(args: &Args) -> Result<bool> {
    println!(
        "lb-lab: building the lab: a controller, 4 managed engines, 4 nginx backends, a client"
    );
    let l = ControllerLab::build("lblab").context("building the lab")?;
    println!(
        "lab {}: controller 10.77.0.250:7400 (mutual TLS, PKI made by `lbctl certs init`), VIP {}",
        l.lab.lab.base(),
        l.lab.vip()
    );
    let mut pool = vec!["pool", "create", "web", "--check", "http"];
    let backends = l.backend_args();
    pool.extend(backends.iter().map(String::as_str));
    lbctl(&l, &pool)?;
    println!(
        "$ lbctl vs create web --vip {} --port 80 --pool web --min-engines 3",
        l.lab.vip()
    );
    let placement = placement(&l.create_web_service(3)?);
    println!();
    lbctl(&l, &["engines"])?;
    println!();
    let r = l.lab.load(args.connections)?;
    println!("{} HTTP connections to the VIP: {r}", args.connections);
    let per_engine = l.metric_per_engine("lb_proxy_connections_total", &[("vs", "web")])?;
    let total: f64 = per_engine.values().sum();
    let mut ok = r.errors == 0;
    println!(
        "\n{:<8} {:>8} {:>8} {:>7}",
        "engine", "proxied", "share", "expect"
    );
    let even = 100.0 / placement.len() as f64;
    for e in &l.lab.engines {
        let n = per_engine.get(&e.id).copied().unwrap_or(0.0);
        let share = if total > 0.0 {
            (100.0 * n / total).abs()
        } else {
            0.0
        };
        let want = if placement.contains(&e.name) {
            even
        } else {
            0.0
        };
        let mark = if (share - want).abs() <= args.tolerance {
            ""
        } else {
            ok = false;
            "  <-- off"
        };
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let n = n.max(0.0) as u64;
        println!("{:<8} {n:>8} {share:>7.1}% {want:>6.1}%{mark}", e.name);
    }
    println!();
    lbctl(&l, &["vs", "get", "web"])?;
    let primary = l
        .lab
        .engines
        .iter()
        .find(|e| e.name == placement[0])
        .map(|e| e.id)
        .context("the primary")?;
    println!("\nprimary ({}) data plane counters:", placement[0]);
    if let Some(d) = l.daemon(primary) {
        for line in metric_lines(&d.metrics()?, "lb_xdp_packets_total") {
            println!("  {line}");
        }
    }
    println!("\n{}", if ok { "PASS" } else { "FAIL" });
    Ok(ok)
}
