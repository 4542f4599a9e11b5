//! `lb-lab` (`cargo xtask lab`): builds the steering lab in network namespaces (clients + 3
//! engines on one bridge, `lb-daemon` on every engine), sends HTTP connections to the VIP, prints
//! how the flows spread over the engines and the primary's data plane counters, then cleans up.
//!
//! ```text
//! lb-lab [--connections N] [--parallel P] [--clients C] [--tolerance PTS] [--xdp-mode native|generic] [--no-daemon]
//! ```
//! Exit status: 0 when every connection succeeded and every engine's share is within the
//! tolerance (default 5 points) of its weight; 1 otherwise; 2 on bad arguments or without root.
//! `LB_DAEMON_BIN` / `LB_XDP_OBJECT` override the binaries' default paths.

use std::process::ExitCode;

use anyhow::{Context, Result, bail};
use lb_tests::client::{Load, LoadResult, http_load};
use lb_tests::daemon::metric_lines;
use lb_tests::steering::{Options, Steering};

/// Steering lab: clients and three engines on one bridge, traffic, and how it spread.
#[derive(clap::Parser)]
struct Args {
    /// HTTP connections in all (split over the clients).
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Connections in flight per client.
    #[arg(long, default_value_t = 4, value_parser = clap::value_parser!(u16).range(1..))]
    parallel: u16,
    /// Client namespaces.
    #[arg(long, default_value_t = 2, value_parser = clap::value_parser!(u8).range(1..=8))]
    clients: u8,
    /// Allowed distance of an engine's share from its weight, in percentage points.
    #[arg(long, default_value_t = 5.0)]
    tolerance: f64,
    /// XDP attach mode of the daemons.
    #[arg(long, default_value = "native", value_parser = ["native", "generic"])]
    xdp_mode: String,
    /// Run without daemons (no steering: every flow lands on the primary).
    #[arg(long)]
    no_daemon: bool,
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

fn run(args: &Args) -> Result<bool> {
    let opts = Options {
        lab_prefix: "lblab".to_owned(),
        clients: usize::from(args.clients),
        xdp_mode: args.xdp_mode.clone(),
        daemons: !args.no_daemon,
        ..Options::default()
    };
    println!(
        "lb-lab: daemon {}, object {}",
        opts.daemon_bin.display(),
        opts.xdp_object.display()
    );
    let lab = Steering::build(&opts).context("building the lab")?;
    println!(
        "lab {}: VIP {}, primary {} ({}), engines {}",
        lab.lab.base(),
        lab.vip(),
        lab.primary().name,
        lab.primary().iface.addr,
        lab.engines
            .iter()
            .map(|e| format!("{}={}/{}", e.name, e.iface.addr, e.iface.mac_string()))
            .collect::<Vec<_>>()
            .join(" ")
    );

    // Split the connections over the clients, run them at the same time.
    let per_client = args.connections.div_ceil(usize::from(args.clients));
    let results: Vec<Result<LoadResult>> = std::thread::scope(|s| {
        let handles: Vec<_> = lab
            .clients
            .iter()
            .map(|c| {
                let load = Load {
                    parallel: usize::from(args.parallel),
                    ..Load::new(lab.vip(), per_client)
                };
                let ns = c.ns.clone();
                s.spawn(move || http_load(&ns, &load))
            })
            .collect();
        handles
            .into_iter()
            .map(|h| h.join().unwrap_or_else(|_| bail!("client thread panicked")))
            .collect()
    });
    let mut total = LoadResult::default();
    for r in results {
        let r = r?;
        for (k, v) in r.per_engine {
            *total.per_engine.entry(k).or_default() += v;
        }
        total.errors += r.errors;
        total.error_samples.extend(r.error_samples);
        total.elapsed = total.elapsed.max(r.elapsed);
    }

    let mut ok = print_spread(&lab, &total, args);

    if !args.no_daemon {
        println!();
        println!("primary ({}) data plane counters:", lab.primary().name);
        match lab.primary_metrics() {
            Ok(text) => {
                for line in metric_lines(&text, "lb_") {
                    println!("  {line}");
                }
            }
            Err(e) => {
                ok = false;
                println!("  cannot read /metrics: {e:#}");
            }
        }
    }
    println!();
    println!("{}", if ok { "PASS" } else { "FAIL" });
    Ok(ok)
}

/// Prints the per-engine table; false when there were errors or (with daemons) a share is off.
fn print_spread(lab: &Steering, total: &LoadResult, args: &Args) -> bool {
    let expected = lab.expected_percent();
    println!();
    println!(
        "{:<8} {:>6} {:>8} {:>8} {:>7}",
        "engine", "weight", "flows", "share", "expect"
    );
    let mut ok = total.errors == 0;
    for e in &lab.engines {
        let weight = lab
            .members()
            .iter()
            .find(|m| m.id == e.id)
            .map_or(0, |m| m.weight);
        let want = expected.get(&e.name).copied().unwrap_or(0.0);
        let got = total.percent(&e.name);
        let n = total.per_engine.get(&e.name).copied().unwrap_or(0);
        // Without daemons nothing steers: report the spread, judge only the errors.
        let mark = if args.no_daemon || (got - want).abs() <= args.tolerance {
            ""
        } else {
            ok = false;
            "  <-- off"
        };
        println!(
            "{:<8} {:>6} {:>8} {:>7.1}% {:>6.1}%{mark}",
            e.name, weight, n, got, want
        );
    }
    for (name, n) in &total.per_engine {
        if lab.engines.iter().all(|e| &e.name != name) {
            ok = false;

            println!("{name:<8} {:>6} {n:>8}  <-- unexpected answer", "-");
        }
    }
    println!(
        "total {} ok, {} errors in {:.2?} ({} clients x {} parallel)",
        total.ok(),
        total.errors,
        total.elapsed,
        args.clients,
        args.parallel
    );
    for e in total.error_samples.iter().take(5) {
        println!("  error: {e}");
    }
    ok
}
