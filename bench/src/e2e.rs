//! End to end through the namespace lab: our path (client → primary's XDP → the secondaries'
//! proxies → backends) against the one-hop L4 proxies a user would pick instead, `HAProxy`
//! (`mode tcp`) and nginx's `stream` proxy, and a direct client → backend baseline, all in the same
//! lab, with the same client, the same backends and the same offload settings, in one run.
//!
//! Each round measures every path in turn (interleaved, so drift hits them alike): `wrk`
//! keep-alive, `wrk` with `Connection: close` (one request per connection), and one `iperf3` TCP
//! stream; beside each wrk run, the CPU time the proxy's processes spent (user + system, from
//! `/proc`, per 1000 requests). The UDP paths (direct, ours: `HAProxy` has no UDP, nginx's stream
//! proxy is not set up for it here) get `iperf3 -u` at 200 Mbit/s (the loss) and a ladder of rates
//! (the highest with at most 0.1 % loss). Every figure is the median over the rounds.

use std::collections::BTreeMap;
use std::fmt::Write as _;
use std::fs;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use crate::machine::{cmd_output, cpu_model, loadavg};
use anyhow::{Context, ensure};
use lb_tests::baselines::{BaselineProxy, Frontend};
use lb_tests::client::one_request;
use lb_tests::daemon::{HealthCheck, Member};
use lb_tests::lab::{Lab, Ns};
use lb_tests::netns::in_ns;
use lb_tests::nginx::AccessLog;
use lb_tests::proxy_lab::{HTTP_PORT, IPERF_PORT, Options as LabOptions, ProxyLab, ReloadOrder};
use lb_tests::tools::{Iperf, Wrk, WrkResult};
use serde::Serialize;

#[derive(clap::Args)]
pub struct Options {
    /// Rounds; every figure is the median over them.
    #[arg(long, default_value_t = 3)]
    rounds: usize,
    /// Seconds per wrk run.
    #[arg(long, default_value_t = 5)]
    wrk_seconds: u64,
    /// Seconds per iperf3 run.
    #[arg(long, default_value_t = 4)]
    iperf_seconds: u64,
    /// wrk threads.
    #[arg(long, default_value_t = 2)]
    threads: u32,
    /// wrk connections.
    #[arg(long, default_value_t = 50)]
    connections: u32,
    /// Seconds of the UDP run at `--udp-rate`.
    #[arg(long, default_value_t = 10)]
    udp_seconds: u64,
    /// The UDP rate whose loss is reported (iperf3 `-b`).
    #[arg(long, default_value = "200M")]
    udp_rate: String,
    /// Rates tried, lowest first, for the highest at ≤ 0.1 % loss (Mbit/s).
    #[arg(long, value_delimiter = ',', default_value = "100,200,400,800,1600")]
    udp_ladder: Vec<u32>,
    /// Seconds per ladder step.
    #[arg(long, default_value_t = 4)]
    udp_ladder_seconds: u64,
    /// iperf3's socket buffers for UDP (`-w`), the same on every path: with the default, the
    /// iperf3 server's own receive buffer overflows first.
    #[arg(long, default_value = "4M")]
    udp_window: String,
    /// Only the UDP measurements (a quicker run while working on the UDP path).
    #[arg(long)]
    udp_only: bool,
    /// Records a CPU profile of our daemons (`perf record`) over each of our wrk runs into this
    /// directory (`ours-keepalive-N.data`, `ours-short-N.data`; `perf report -i FILE`).
    #[arg(long)]
    perf_dir: Option<PathBuf>,
    /// Counts the system calls of every proxy (`strace -c` on all its threads) over a separate
    /// short-connection wrk run per path and round, into this directory (`PATH-N.strace`), and
    /// prints them per request. strace slows the proxy: those runs' figures are not reported.
    #[arg(long)]
    syscalls_dir: Option<PathBuf>,
    /// The primary proxies its share too (default: it only steers, the two secondaries proxy).
    #[arg(long)]
    primary_serves: bool,
    /// XDP attach mode of the daemons.
    #[arg(long, default_value = "native", value_parser = ["native", "generic"])]
    xdp_mode: String,
    /// Where to write e2e.json and e2e.md (default `bench/results`).
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

/// The paths measured, in the order of each round.
const PATHS: [&str; 5] = ["direct", "ours", "ours_local", "haproxy", "nginx"];
/// The paths with UDP.
const UDP_PATHS: [&str; 3] = ["direct", "ours", "ours_local"];
/// Loss at most this (percent) counts as none for the ladder.
const UDP_LOSS_OK_PCT: f64 = 0.1;
/// A second VIP whose only engine is the primary itself: our proxy without the steering hop.
const LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 11);
const HAPROXY_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 31);
const NGINX_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 32);
/// Threads / worker processes of each baseline proxy (our daemon runs one TCP proxy thread per
/// CPU: 2 here).
const PROXY_THREADS: u32 = 2;

/// One wrk figure pair.
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct Http {
    requests_per_s: f64,
    p99_ms: f64,
    errors: u64,
}

impl From<&WrkResult> for Http {
    fn from(r: &WrkResult) -> Self {
        Self {
            requests_per_s: r.requests_per_s,
            p99_ms: r.p99_ms,
            errors: r.errors(),
        }
    }
}

/// One path in one round.
#[derive(Clone, Debug, Default, Serialize)]
struct Sample {
    keepalive: Http,
    short: Http,
    iperf_gbit_per_s: f64,
    /// CPU seconds of the proxy's processes per 1000 requests (none for the direct path).
    keepalive_cpu_per_1k: Option<f64>,
    short_cpu_per_1k: Option<f64>,
    /// The share of that CPU time spent in the kernel (system time).
    keepalive_kernel_share: Option<f64>,
    short_kernel_share: Option<f64>,
    udp: Option<Udp>,
}

/// One path's UDP in one round.
#[derive(Clone, Debug, Default, Serialize)]
struct Udp {
    /// At `--udp-rate`.
    loss_pct: f64,
    /// The highest rate of the ladder with at most 0.1 % loss (0: none).
    max_mbit_at_0_1pct: u32,
    /// Each ladder step: (Mbit/s asked, loss %).
    ladder: Vec<(u32, f64)>,
}

/// Medians of one path over the rounds, and the spread.
#[derive(Clone, Debug, Serialize)]
struct PathResult {
    target: String,
    keepalive_rps: f64,
    keepalive_p99_ms: f64,
    short_rps: f64,
    short_p99_ms: f64,
    iperf_gbit_per_s: f64,
    /// CPU seconds of the proxy's processes per 1000 requests.
    cpu_per_1k_requests: ByLoad,
    /// The share of it that is system time: the kernel's work on the proxy's behalf (system
    /// calls, and the network stack's work charged to them), a floor for any proxy that makes the
    /// same connections.
    cpu_kernel_share: ByLoad,
    /// UDP loss at `--udp-rate` (percent), and the highest ladder rate at ≤ 0.1 % loss.
    udp_loss_pct: Option<f64>,
    udp_max_mbit_at_0_1pct: Option<u32>,
    /// wrk socket errors + non-2xx responses, all runs.
    errors: u64,
    runs: Vec<Sample>,
}

/// One figure for each wrk load.
#[derive(Clone, Debug, Default, Serialize)]
struct ByLoad {
    keepalive: Option<f64>,
    short: Option<f64>,
}

#[derive(Serialize)]
struct Report {
    date: String,
    machine: String,
    kernel: String,
    cpus: usize,
    rounds: usize,
    wrk: String,
    iperf: String,
    udp: UdpReport,
    offloads: BTreeMap<String, String>,
    placement: String,
    topology: String,
    daemon_bin: String,
    /// `/proc/loadavg` before and after the run (other load on the two cores skews the figures).
    loadavg_before: String,
    loadavg_after: String,
    paths: BTreeMap<&'static str, PathResult>,
    /// ours ÷ baseline, per figure (> 1: ours is higher; for p99 and CPU lower is better).
    ratios: BTreeMap<String, BTreeMap<&'static str, f64>>,
}

#[derive(Serialize)]
struct UdpReport {
    load: String,
    /// Median loss per path at the rate (percent).
    loss_pct: BTreeMap<&'static str, f64>,
    /// Median of the highest ladder rate at ≤ 0.1 % loss per path (Mbit/s).
    max_mbit_at_0_1pct: BTreeMap<&'static str, u32>,
    /// ours ÷ direct of that rate.
    ours_over_direct: f64,
}

struct Target {
    ns: Ns,
    http: SocketAddr,
    iperf: SocketAddr,
    /// The processes whose CPU time is the proxy's (with their descendants).
    cpu_roots: Vec<u32>,
    /// iperf3's UDP service (the control connection goes to `iperf`).
    udp: Option<SocketAddr>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    ensure!(opts.rounds >= 1, "--rounds must be at least 1");
    let started = Instant::now();
    let root = lb_tests::workspace_root();
    let out_dir = opts
        .out_dir
        .clone()
        .unwrap_or_else(|| root.join("bench/results"));
    let daemon_bin = lb_tests::daemon_bin();
    ensure!(
        daemon_bin.exists(),
        "{} not found: build it (cargo build --release -p lb-daemon) and set LB_DAEMON_BIN",
        daemon_bin.display()
    );

    let loadavg_before = loadavg();
    let bed = build(opts)?;
    let (lab, targets, hap_ns) = (&bed.lab, &bed.targets, &bed.hap_ns);

    // Every path answers before anything is measured.
    let client = lab.client(0).clone();
    for (name, t) in targets {
        let body = in_ns(client.name(), || {
            one_request(t.http, Duration::from_secs(3))
        })
        .with_context(|| format!("{name}: a request to {} failed", t.http))?;
        ensure!(body.starts_with("be"), "{name}: unexpected answer {body:?}");
    }

    let offloads = offload_settings(
        &lab.lab,
        &[
            ("client", &client),
            ("engine se2", &lab.engines[1].ns),
            ("backend be1", &lab.backends[0].ns),
            ("haproxy host", hap_ns),
        ],
    );

    let mut samples: BTreeMap<&str, Vec<Sample>> = BTreeMap::new();
    for round in 1..=opts.rounds {
        for name in PATHS {
            let t = &targets[name];
            let s = measure(opts, &client, name, round, t)
                .with_context(|| format!("round {round}, path {name} ({})", t.ns))?;
            print_sample(opts, round, name, &s);
            samples.entry(name).or_default().push(s);
        }
    }

    let (paths, ratios) = summarize(samples, targets);
    let udp = udp_report(opts, &paths);
    let proxies = if opts.primary_serves {
        "se1 (primary, XDP), se2 and se3 proxy"
    } else {
        "se1 (primary) only steers with XDP, se2 and se3 proxy"
    };
    let report = Report {
        date: cmd_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine: cpu_model(),
        kernel: cmd_output("uname", &["-r"]),
        cpus: std::thread::available_parallelism().map_or(0, std::num::NonZero::get),
        rounds: opts.rounds,
        wrk: format!(
            "wrk -t{} -c{} -d{}s --latency (keep-alive; short: -H 'Connection: close')",
            opts.threads, opts.connections, opts.wrk_seconds
        ),
        iperf: format!(
            "iperf3 -c TARGET -p {IPERF_PORT} -t {} (one TCP stream)",
            opts.iperf_seconds
        ),
        udp,
        offloads,
        placement: "No CPU pinning: every process (wrk's 2 threads, 3 backend nginx processes, \
            the proxies) is scheduled by the kernel on both cores; veth traffic is processed in \
            softirq on the sending CPU. lb-daemon runs, per engine, 2 TCP proxy threads (one per CPU, each \
            its own event loop and listener) beside its 2 runtime threads, HAProxy nbthread 2, nginx 2 worker processes; each backend nginx is one process."
            .to_owned(),
        topology: format!(
            "One bridge; client 10.77.0.2; engines se1-se3 10.77.0.11-13 ({proxies}), lb-daemon {} XDP; \
             backends be1-be3 10.77.0.21-23 (nginx, 1 process, access log off, `return 200`), \
             iperf3 -s on be1 (the iperf pool/server of every path); HAProxy 2.6 (mode tcp, \
             roundrobin, check inter 2s) on 10.77.0.31; nginx 1.22 stream (round robin) on 10.77.0.32. \
             Ours: pool round_robin, TCP health checks every 2 s. direct: client → be1.",
            opts.xdp_mode
        ),
        daemon_bin: daemon_bin.display().to_string(),
        loadavg_before,
        loadavg_after: loadavg(),
        paths,
        ratios,
    };
    write_results(&out_dir, &report)?;
    eprintln!("e2e: done in {:.0} s", started.elapsed().as_secs_f64());
    Ok(())
}

fn udp_report(opts: &Options, paths: &BTreeMap<&'static str, PathResult>) -> UdpReport {
    UdpReport {
        load: format!(
            "iperf3 -u -w {} -b {} -t {} (the loss); iperf3 -u -w {} -b R -t {} for R in {:?} Mbit/s (the highest at ≤ {UDP_LOSS_OK_PCT} % loss)",
            opts.udp_window,
            opts.udp_rate,
            opts.udp_seconds,
            opts.udp_window,
            opts.udp_ladder_seconds,
            opts.udp_ladder
        ),
        loss_pct: UDP_PATHS
            .iter()
            .filter_map(|&p| Some((p, paths[p].udp_loss_pct?)))
            .collect(),
        max_mbit_at_0_1pct: UDP_PATHS
            .iter()
            .filter_map(|&p| Some((p, paths[p].udp_max_mbit_at_0_1pct?)))
            .collect(),
        ours_over_direct: f64::from(paths["ours"].udp_max_mbit_at_0_1pct.unwrap_or(0))
            / f64::from(paths["direct"].udp_max_mbit_at_0_1pct.unwrap_or(0).max(1)),
    }
}

fn print_sample(opts: &Options, round: usize, name: &str, s: &Sample) {
    eprintln!(
        "e2e: round {round} {name:8} keep-alive {:>8.0} req/s p99 {:>6.2} ms cpu/1k {} | close {:>8.0} req/s p99 {:>6.2} ms cpu/1k {} | iperf3 {:>5.2} Gbit/s | udp {} | errors {}",
        s.keepalive.requests_per_s,
        s.keepalive.p99_ms,
        cpu_text(s.keepalive_cpu_per_1k),
        s.short.requests_per_s,
        s.short.p99_ms,
        cpu_text(s.short_cpu_per_1k),
        s.iperf_gbit_per_s,
        s.udp.as_ref().map_or_else(
            || "-".to_owned(),
            |u| format!(
                "{:.3} % lost at {}, ≤0.1 % up to {} Mbit/s",
                u.loss_pct, opts.udp_rate, u.max_mbit_at_0_1pct
            )
        ),
        s.keepalive.errors + s.short.errors
    );
}

fn write_results(out_dir: &std::path::Path, report: &Report) -> anyhow::Result<()> {
    fs::create_dir_all(out_dir)?;
    let json = out_dir.join("e2e.json");
    fs::write(&json, serde_json::to_string_pretty(report)? + "\n")?;
    let md = out_dir.join("e2e.md");
    fs::write(&md, markdown(report))?;
    print!("{}", markdown(report));
    eprintln!("e2e: wrote {} and {}", json.display(), md.display());
    Ok(())
}

/// The lab with every path ready: ours (daemons), `HAProxy` and nginx in their own namespaces.
struct Bed {
    // Drop order: the proxies, then the lab.
    _proxies: (BaselineProxy, BaselineProxy),
    hap_ns: Ns,
    targets: BTreeMap<&'static str, Target>,
    lab: ProxyLab,
}

fn build(opts: &Options) -> anyhow::Result<Bed> {
    let members = if opts.primary_serves {
        vec![
            Member { id: 1, weight: 1 },
            Member { id: 2, weight: 1 },
            Member { id: 3, weight: 1 },
        ]
    } else {
        vec![Member { id: 2, weight: 1 }, Member { id: 3, weight: 1 }]
    };
    eprintln!("e2e: building the lab (client, 3 engines, 3 backends, HAProxy, nginx)");
    let mut lab = ProxyLab::build(&LabOptions {
        lab_prefix: "lbbe".to_owned(),
        members,
        iperf: true,
        access_log: AccessLog::Off,
        health_check: Some(HealthCheck {
            kind: "tcp".to_owned(),
            interval_ms: 2000,
            timeout_ms: 1000,
            rise: 2,
            fall: 3,
            http_path: None,
            expected_status: None,
        }),
        xdp_mode: opts.xdp_mode.clone(),
        conn_table_size: 262_144,
        ..LabOptions::default()
    })?;
    add_local_vip(&mut lab)?;
    let web: Vec<SocketAddr> = lab
        .backends
        .iter()
        .map(lb_tests::proxy_lab::BackendHost::http)
        .collect();
    let iperf_server = SocketAddr::from((lab.backends[0].addr, IPERF_PORT));
    let frontends = |addr: Ipv4Addr| {
        vec![
            Frontend {
                listen: SocketAddr::from((addr, HTTP_PORT)),
                servers: web.clone(),
                check: true,
            },
            Frontend {
                listen: SocketAddr::from((addr, IPERF_PORT)),
                servers: vec![iperf_server],
                check: false,
            },
        ]
    };
    let hap_ns = proxy_host(&lab.lab, "hap", HAPROXY_ADDR)?;
    let haproxy =
        BaselineProxy::haproxy(&lab.lab, &hap_ns, &frontends(HAPROXY_ADDR), PROXY_THREADS)?;
    let ngx_ns = proxy_host(&lab.lab, "ngxs", NGINX_ADDR)?;
    let nginx =
        BaselineProxy::nginx_stream(&lab.lab, &ngx_ns, &frontends(NGINX_ADDR), PROXY_THREADS)?;

    let target = |ns: &Ns, ip: Ipv4Addr, cpu_roots: Vec<u32>| Target {
        ns: ns.clone(),
        http: SocketAddr::from((ip, HTTP_PORT)),
        iperf: SocketAddr::from((ip, IPERF_PORT)),
        cpu_roots,
        udp: None,
    };
    let daemons: Vec<u32> = lab
        .engines
        .iter()
        .filter_map(|e| lab.daemon(e.id).map(|d| d.proc().pid()))
        .collect();
    let ours = |ip: Ipv4Addr| Target {
        udp: Some(SocketAddr::from((ip, IPERF_PORT))),
        ..target(&lab.primary().ns, ip, daemons.clone())
    };
    let targets: BTreeMap<&'static str, Target> = [
        (
            "direct",
            Target {
                iperf: iperf_server,
                udp: Some(iperf_server),
                ..target(&lab.backends[0].ns, lab.backends[0].addr, Vec::new())
            },
        ),
        ("ours", ours(lab.vip())),
        ("ours_local", ours(LOCAL_VIP)),
        (
            "haproxy",
            target(&hap_ns, HAPROXY_ADDR, vec![haproxy.pid()]),
        ),
        ("nginx", target(&ngx_ns, NGINX_ADDR, vec![nginx.pid()])),
    ]
    .into_iter()
    .collect();
    Ok(Bed {
        _proxies: (haproxy, nginx),
        hap_ns,
        targets,
        lab,
    })
}

type Ratios = BTreeMap<String, BTreeMap<&'static str, f64>>;

/// Medians per path, and ours ÷ each baseline.
fn summarize(
    mut samples: BTreeMap<&str, Vec<Sample>>,
    targets: &BTreeMap<&'static str, Target>,
) -> (BTreeMap<&'static str, PathResult>, Ratios) {
    let paths: BTreeMap<&'static str, PathResult> = PATHS
        .iter()
        .map(|&name| {
            let runs = samples.remove(name).unwrap_or_default();
            let med = |f: fn(&Sample) -> f64| {
                crate::machine::median(&runs.iter().map(f).collect::<Vec<_>>())
            };
            let med_opt = |f: fn(&Sample) -> Option<f64>| {
                let v: Vec<f64> = runs.iter().filter_map(f).collect();
                (!v.is_empty()).then(|| crate::machine::median(&v))
            };
            let udp_max = {
                let mut v: Vec<u32> = runs
                    .iter()
                    .filter_map(|s| s.udp.as_ref().map(|u| u.max_mbit_at_0_1pct))
                    .collect();
                v.sort_unstable();
                v.get(v.len() / 2).copied()
            };
            (
                name,
                PathResult {
                    target: targets[name].http.to_string(),
                    keepalive_rps: med(|s| s.keepalive.requests_per_s),
                    keepalive_p99_ms: med(|s| s.keepalive.p99_ms),
                    short_rps: med(|s| s.short.requests_per_s),
                    short_p99_ms: med(|s| s.short.p99_ms),
                    iperf_gbit_per_s: med(|s| s.iperf_gbit_per_s),
                    cpu_per_1k_requests: ByLoad {
                        keepalive: med_opt(|s| s.keepalive_cpu_per_1k),
                        short: med_opt(|s| s.short_cpu_per_1k),
                    },
                    cpu_kernel_share: ByLoad {
                        keepalive: med_opt(|s| s.keepalive_kernel_share),
                        short: med_opt(|s| s.short_kernel_share),
                    },
                    udp_loss_pct: med_opt(|s| s.udp.as_ref().map(|u| u.loss_pct)),
                    udp_max_mbit_at_0_1pct: udp_max,
                    errors: runs
                        .iter()
                        .map(|s| s.keepalive.errors + s.short.errors)
                        .sum(),
                    runs,
                },
            )
        })
        .collect();
    let ours = &paths["ours"];
    let ratios = ["haproxy", "nginx"]
        .iter()
        .map(|&b| {
            let o = &paths[b];
            (
                format!("ours_over_{b}"),
                [
                    ("keepalive_rps", ours.keepalive_rps / o.keepalive_rps),
                    ("keepalive_p99", ours.keepalive_p99_ms / o.keepalive_p99_ms),
                    ("short_rps", ours.short_rps / o.short_rps),
                    ("short_p99", ours.short_p99_ms / o.short_p99_ms),
                    ("iperf", ours.iperf_gbit_per_s / o.iperf_gbit_per_s),
                    (
                        "cpu_per_1k_keepalive",
                        ours.cpu_per_1k_requests.keepalive.unwrap_or(f64::NAN)
                            / o.cpu_per_1k_requests.keepalive.unwrap_or(f64::NAN),
                    ),
                    (
                        "cpu_per_1k_short",
                        ours.cpu_per_1k_requests.short.unwrap_or(f64::NAN)
                            / o.cpu_per_1k_requests.short.unwrap_or(f64::NAN),
                    ),
                ]
                .into_iter()
                .collect(),
            )
        })
        .collect();
    (paths, ratios)
}

/// Adds [`LOCAL_VIP`] (web on port 80, iperf on 5201) served by the primary alone: its XDP program
/// passes the packets to its own stack and its proxy connects to the same pools.
fn add_local_vip(lab: &mut ProxyLab) -> anyhow::Result<()> {
    let primary = lab.primary().clone();
    lab.lab.ip(
        &primary.ns,
        &[
            "addr",
            "add",
            &format!("{LOCAL_VIP}/32"),
            "dev",
            &primary.iface.name,
        ],
    )?;
    let template = lab.services[0].clone();
    for (id, name, port, pool, protocol) in [
        (3, "web-local", HTTP_PORT, "web", "tcp"),
        (4, "iperf-local", IPERF_PORT, "iperf", "tcp"),
        (5, "iperf-udp-local", IPERF_PORT, "iperf", "udp"),
    ] {
        let mut vs = template.clone();
        vs.id = id;
        name.clone_into(&mut vs.name);
        protocol.clone_into(&mut vs.protocol);
        vs.vip = LOCAL_VIP.to_string();
        vs.port = port;
        vs.engines = vec![Member {
            id: primary.id,
            weight: 1,
        }];
        vs.pool = Some(pool.to_owned());
        lab.services.push(vs);
    }
    lab.reload_all(ReloadOrder::PrimaryLast)
}

/// A namespace on the segment at `addr` for a baseline proxy, with the client-side port settings
/// short connections need.
fn proxy_host(lab: &Lab, role: &str, addr: Ipv4Addr) -> anyhow::Result<Ns> {
    let ns = lab.add_ns(role)?;
    lab.attach(&ns, "eth0", &format!("{addr}/24"))?;
    lab.sysctl(&ns, "net.ipv4.tcp_tw_reuse", "1")?;
    lab.sysctl(&ns, "net.ipv4.ip_local_port_range", "1024 65000")?;
    Ok(ns)
}

/// What the proxy's processes spent over one wrk run.
#[derive(Clone, Copy, Debug, Default)]
struct CpuSpent {
    /// CPU seconds per 1000 requests.
    per_1k: Option<f64>,
    /// System time over user + system time.
    kernel_share: Option<f64>,
}

/// `f`'s result, and the CPU time `roots` (and their descendants) spent meanwhile (`None`s
/// without roots).
fn with_cpu(
    roots: &[u32],
    f: impl FnOnce() -> anyhow::Result<WrkResult>,
) -> anyhow::Result<(WrkResult, CpuSpent)> {
    let before = tree_cpu_seconds(roots);
    let r = f()?;
    let after = tree_cpu_seconds(roots);
    let (user, system) = (after.0 - before.0, after.1 - before.1);
    let spent = user + system;
    #[allow(clippy::cast_precision_loss)]
    let per_1k =
        (!roots.is_empty() && r.requests > 0).then(|| spent / (r.requests as f64 / 1000.0));
    let kernel_share = (!roots.is_empty() && spent > 0.0).then(|| system / spent);
    Ok((
        r,
        CpuSpent {
            per_1k,
            kernel_share,
        },
    ))
}

/// Every process under `/proc`: (pid, parent, (user ticks, system ticks)).
fn processes() -> Vec<(u32, u32, (u64, u64))> {
    let mut procs = Vec::new();
    for entry in fs::read_dir("/proc").into_iter().flatten().flatten() {
        let Ok(pid) = entry.file_name().to_string_lossy().parse::<u32>() else {
            continue;
        };
        let Ok(stat) = fs::read_to_string(entry.path().join("stat")) else {
            continue;
        };
        // After the command's closing parenthesis: state, ppid, … utime (14th field), stime.
        let Some((_, rest)) = stat.rsplit_once(')') else {
            continue;
        };
        let f: Vec<&str> = rest.split_whitespace().collect();
        let num = |i: usize| f.get(i).and_then(|x| x.parse::<u64>().ok()).unwrap_or(0);
        let parent = u32::try_from(num(1)).unwrap_or(0);
        procs.push((pid, parent, (num(11), num(12))));
    }
    procs
}

/// `roots` and every descendant among `procs`.
fn tree(procs: &[(u32, u32, (u64, u64))], roots: &[u32]) -> std::collections::BTreeSet<u32> {
    let mut inside: std::collections::BTreeSet<u32> = roots.iter().copied().collect();
    loop {
        let before = inside.len();
        for (pid, parent, _) in procs {
            if inside.contains(parent) {
                inside.insert(*pid);
            }
        }
        if inside.len() == before {
            return inside;
        }
    }
}

/// User and system CPU seconds of `roots` and every descendant, from `/proc/*/stat`.
fn tree_cpu_seconds(roots: &[u32]) -> (f64, f64) {
    let procs = processes();
    let inside = tree(&procs, roots);
    let (user, system) = procs
        .iter()
        .filter(|(pid, _, _)| inside.contains(pid))
        .fold((0, 0), |(u, s), (_, _, (pu, ps))| (u + pu, s + ps));
    let hz = clock_ticks();
    #[allow(clippy::cast_precision_loss)]
    let secs = (user as f64 / hz, system as f64 / hz);
    secs
}

/// `sysconf(_SC_CLK_TCK)`.
fn clock_ticks() -> f64 {
    cmd_output("getconf", &["CLK_TCK"]).parse().unwrap_or(100.0)
}

fn cpu_text(v: Option<f64>) -> String {
    v.map_or_else(|| "-".to_owned(), |c| format!("{c:.3} s"))
}

/// iperf3 UDP to `udp` (control over TCP to `control`) at `mbit` for `seconds`: the loss, percent.
fn udp_loss(
    client: &Ns,
    control: SocketAddr,
    rate: &str,
    seconds: u64,
    window: &str,
) -> anyhow::Result<f64> {
    let r = Iperf {
        duration: Duration::from_secs(seconds),
        window: Some(window.to_owned()),
        ..Iperf::udp(&control.ip().to_string(), control.port(), rate)
    }
    .run(client)?;
    let (sent, lost) = (
        r.udp_packets.context("iperf3 UDP: no packet count")?,
        r.udp_lost.context("iperf3 UDP: no loss count")?,
    );
    ensure!(sent > 0, "iperf3 UDP: nothing sent");
    #[allow(clippy::cast_precision_loss)]
    let pct = lost as f64 * 100.0 / sent as f64;
    Ok(pct)
}

fn measure_udp(opts: &Options, client: &Ns, t: &Target) -> anyhow::Result<Option<Udp>> {
    let Some(udp) = t.udp else { return Ok(None) };
    // iperf3 runs its control connection over TCP to the same address and port.
    let control = SocketAddr::new(udp.ip(), udp.port());
    let loss_pct = udp_loss(
        client,
        control,
        &opts.udp_rate,
        opts.udp_seconds,
        &opts.udp_window,
    )?;
    std::thread::sleep(Duration::from_millis(500));
    let mut ladder = Vec::new();
    let mut max = 0;
    for &mbit in &opts.udp_ladder {
        let loss = udp_loss(
            client,
            control,
            &format!("{mbit}M"),
            opts.udp_ladder_seconds,
            &opts.udp_window,
        )?;
        ladder.push((mbit, loss));
        std::thread::sleep(Duration::from_millis(300));
        if loss > UDP_LOSS_OK_PCT {
            break;
        }
        max = mbit;
    }
    Ok(Some(Udp {
        loss_pct,
        max_mbit_at_0_1pct: max,
        ladder,
    }))
}

/// `perf record` of `pids` for `seconds` into `file`, in the background.
fn perf_record(pids: &[u32], seconds: u64, file: &std::path::Path) -> Option<std::process::Child> {
    let pids: Vec<String> = pids.iter().map(ToString::to_string).collect();
    std::process::Command::new("perf")
        .args(["record", "-F", "999", "-g", "-p", &pids.join(","), "-o"])
        .arg(file)
        .args(["--", "sleep", &seconds.to_string()])
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .map_err(|e| eprintln!("e2e: perf record: {e}"))
        .ok()
}

/// Every thread of `roots` and their descendant processes.
fn tree_threads(roots: &[u32]) -> Vec<u32> {
    tree(&processes(), roots)
        .iter()
        .flat_map(|pid| {
            fs::read_dir(format!("/proc/{pid}/task"))
                .into_iter()
                .flatten()
                .flatten()
                .filter_map(|t| t.file_name().to_string_lossy().parse().ok())
        })
        .collect()
}

/// `strace -c` on every thread of the target's proxy while `f` runs; prints the calls per request.
fn count_syscalls(
    dir: &std::path::Path,
    name: &str,
    round: usize,
    t: &Target,
    f: impl FnOnce() -> anyhow::Result<WrkResult>,
) -> anyhow::Result<()> {
    fs::create_dir_all(dir)?;
    let file = dir.join(format!("{name}-{round}.strace"));
    let mut cmd = std::process::Command::new("strace");
    cmd.args(["-c", "-q", "-o"]).arg(&file);
    for tid in tree_threads(&t.cpu_roots) {
        cmd.args(["-p", &tid.to_string()]);
    }
    let mut strace = cmd
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::null())
        .spawn()
        .context("strace")?;
    std::thread::sleep(Duration::from_millis(500));
    let r = f();
    let _ = nix::sys::signal::kill(
        nix::unistd::Pid::from_raw(i32::try_from(strace.id()).unwrap_or(0)),
        nix::sys::signal::Signal::SIGINT,
    );
    let _ = strace.wait();
    let r = r?;
    let text = fs::read_to_string(&file).unwrap_or_default();
    #[allow(clippy::cast_precision_loss)]
    let per = |calls: u64| calls as f64 / r.requests.max(1) as f64;
    let mut rows: Vec<(u64, String)> = text
        .lines()
        .filter_map(|l| {
            let f: Vec<&str> = l.split_whitespace().collect();
            // % time, seconds, usecs/call, calls, [errors], syscall
            let calls = f.get(3)?.parse::<u64>().ok()?;
            Some((calls, (*f.last()?).to_owned()))
        })
        .collect();
    rows.sort_by_key(|r| std::cmp::Reverse(r.0));
    let total = rows
        .iter()
        .find(|(_, n)| n == "total")
        .map_or(0, |(c, _)| *c);
    let top: Vec<String> = rows
        .iter()
        .filter(|(_, n)| n != "total")
        .take(12)
        .map(|(c, n)| format!("{n} {:.2}", per(*c)))
        .collect();
    eprintln!(
        "e2e: round {round} {name:8} system calls per short-connection request: {:.1} ({}); {}",
        per(total),
        top.join(", "),
        file.display()
    );
    Ok(())
}

/// `f` with our daemons profiled meanwhile when `--perf-dir` is given and `name` is ours.
fn profiled<T>(
    opts: &Options,
    name: &str,
    what: &str,
    round: usize,
    t: &Target,
    f: impl FnOnce() -> anyhow::Result<T>,
) -> anyhow::Result<T> {
    let perf = opts
        .perf_dir
        .as_ref()
        .filter(|_| name == "ours")
        .and_then(|dir| {
            fs::create_dir_all(dir).ok()?;
            perf_record(
                &t.cpu_roots,
                opts.wrk_seconds,
                &dir.join(format!("ours-{what}-{round}.data")),
            )
        });
    let r = f();
    if let Some(mut p) = perf {
        let _ = p.wait();
    }
    r
}

fn measure(
    opts: &Options,
    client: &Ns,
    name: &str,
    round: usize,
    t: &Target,
) -> anyhow::Result<Sample> {
    if opts.udp_only {
        return Ok(Sample {
            udp: measure_udp(opts, client, t)?,
            ..Sample::default()
        });
    }
    let url = format!("http://{}/", t.http);
    let wrk = Wrk {
        threads: opts.threads,
        connections: opts.connections,
        duration: Duration::from_secs(opts.wrk_seconds),
        ..Wrk::new(&url)
    };
    let (keepalive, keepalive_cpu) = profiled(opts, name, "keepalive", round, t, || {
        with_cpu(&t.cpu_roots, || wrk.run(client))
    })?;
    // Let the short-connection run start without the keep-alive run's sockets closing.
    std::thread::sleep(Duration::from_millis(500));
    let (short, short_cpu) = profiled(opts, name, "short", round, t, || {
        with_cpu(&t.cpu_roots, || {
            Wrk {
                close: true,
                ..wrk.clone()
            }
            .run(client)
        })
    })?;
    std::thread::sleep(Duration::from_millis(500));
    let iperf = Iperf {
        duration: Duration::from_secs(opts.iperf_seconds),
        ..Iperf::tcp(&t.iperf.ip().to_string(), t.iperf.port())
    }
    .run(client)?;
    std::thread::sleep(Duration::from_millis(500));
    if let Some(dir) = &opts.syscalls_dir
        && !t.cpu_roots.is_empty()
    {
        count_syscalls(dir, name, round, t, || {
            Wrk {
                close: true,
                ..wrk.clone()
            }
            .run(client)
        })?;
        std::thread::sleep(Duration::from_millis(500));
    }
    let udp = measure_udp(opts, client, t)?;
    Ok(Sample {
        keepalive: Http::from(&keepalive),
        short: Http::from(&short),
        iperf_gbit_per_s: iperf.received_gbit_per_s(),
        keepalive_cpu_per_1k: keepalive_cpu.per_1k,
        short_cpu_per_1k: short_cpu.per_1k,
        keepalive_kernel_share: keepalive_cpu.kernel_share,
        short_kernel_share: short_cpu.kernel_share,
        udp,
    })
}

fn spread(runs: &[Sample], f: fn(&Sample) -> f64) -> String {
    let v: Vec<f64> = runs.iter().map(f).collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.0}–{hi:.0}")
}

/// The kernel's share of each proxy's CPU, one line.
fn kernel_shares_markdown(r: &Report, s: &mut String) {
    let shares: Vec<String> = PATHS
        .iter()
        .filter_map(|&name| {
            let k = &r.paths[name].cpu_kernel_share;
            Some(format!(
                "{name} {:.0} % / {:.0} %",
                k.keepalive? * 100.0,
                k.short? * 100.0
            ))
        })
        .collect();
    let _ = writeln!(
        s,
        "- Kernel share of that CPU (system time; keep-alive / short): {}.",
        shares.join(", ")
    );
}

fn markdown(r: &Report) -> String {
    let mut s = format!(
        "End to end through the namespace lab, median of {} rounds ({}, {}, kernel {})\n\n",
        r.rounds, r.date, r.machine, r.kernel
    );
    s.push_str("| path | keep-alive req/s | keep-alive p99 | keep-alive CPU s/1k req | short conns req/s | short p99 | short CPU s/1k req | iperf3 Gbit/s | wrk errors |\n");
    s.push_str("|---|---|---|---|---|---|---|---|---|\n");
    let label = |p: &str| match p {
        "direct" => "client → backend nginx directly",
        "ours" => "**ours**: client → XDP primary → engine proxies → backends",
        "ours_local" => "ours, one hop: client → primary (XDP pass) → its own proxy → backends",
        "haproxy" => "HAProxy 2.6 (mode tcp, 3 backends)",
        "nginx" => "nginx 1.22 stream proxy (3 backends)",
        _ => "?",
    };
    for name in PATHS {
        let p = &r.paths[name];
        let _ = writeln!(
            s,
            "| {} | {:.1}k | {:.2} ms | {} | {:.1}k | {:.2} ms | {} | {:.2} | {} |",
            label(name),
            p.keepalive_rps / 1000.0,
            p.keepalive_p99_ms,
            p.cpu_per_1k_requests
                .keepalive
                .map_or_else(|| "-".to_owned(), |c| format!("{c:.3}")),
            p.short_rps / 1000.0,
            p.short_p99_ms,
            p.cpu_per_1k_requests
                .short
                .map_or_else(|| "-".to_owned(), |c| format!("{c:.3}")),
            p.iperf_gbit_per_s,
            p.errors
        );
    }
    s.push_str("\n| ratio | keep-alive req/s | keep-alive p99 | keep-alive CPU/req | short req/s | short p99 | short CPU/req | iperf3 |\n|---|---|---|---|---|---|---|---|\n");
    for (name, m) in &r.ratios {
        let _ = writeln!(
            s,
            "| {} | {:.2}× | {:.2}× | {:.2}× | {:.2}× | {:.2}× | {:.2}× | {:.2}× |",
            name.replace('_', " "),
            m["keepalive_rps"],
            m["keepalive_p99"],
            m["cpu_per_1k_keepalive"],
            m["short_rps"],
            m["short_p99"],
            m["cpu_per_1k_short"],
            m["iperf"]
        );
    }
    udp_markdown(r, &mut s, label);
    s.push_str("\nSpread over the rounds (min–max): ");
    let spreads: Vec<String> = PATHS
        .iter()
        .map(|&name| {
            let runs = &r.paths[name].runs;
            format!(
                "{name}: keep-alive {} req/s, short {} req/s, iperf3 {:.2}–{:.2} Gbit/s",
                spread(runs, |x| x.keepalive.requests_per_s),
                spread(runs, |x| x.short.requests_per_s),
                runs.iter()
                    .map(|x| x.iperf_gbit_per_s)
                    .fold(f64::INFINITY, f64::min),
                runs.iter()
                    .map(|x| x.iperf_gbit_per_s)
                    .fold(f64::NEG_INFINITY, f64::max),
            )
        })
        .collect();
    s.push_str(&spreads.join("; "));
    s.push_str(".\n\n");
    let _ = writeln!(s, "- Load: `{}`; `{}`.", r.wrk, r.iperf);
    let _ = writeln!(s, "- Topology: {}", r.topology);
    let _ = writeln!(s, "- Placement: {}", r.placement);
    s.push_str("- CPU per request: user + system time of the proxy's processes and their children (`/proc/PID/stat`) over each wrk run, per 1000 requests; for ours every engine's lb-daemon. Softirq work (XDP, the stack) is accounted to no process and counts for no path.\n");
    kernel_shares_markdown(r, &mut s);
    s.push_str("- Offloads (same for every path; tx checksum offload is off on every lab veth because packets that cross XDP need it — netns-lab trap 2 — which also turns TSO off; GSO then segments in software):\n");
    for (host, o) in &r.offloads {
        let _ = writeln!(s, "  - {host}: {o}");
    }
    s.push_str("- Sysctls: `tcp_tw_reuse=1`, `ip_local_port_range=1024 65000` in the client, engine and proxy namespaces.\n");
    let _ = writeln!(s, "- Daemon: `{}`.", r.daemon_bin);
    let _ = writeln!(
        s,
        "- `/proc/loadavg` before: `{}`, after: `{}` (the run's own load included).",
        r.loadavg_before, r.loadavg_after
    );
    s
}

fn udp_markdown(r: &Report, s: &mut String, label: impl Fn(&str) -> &'static str) {
    s.push_str("\n| UDP path | loss at the rate | highest rate at ≤ 0.1 % loss | ladder (Mbit/s: loss %, each round) |\n|---|---|---|---|\n");
    for name in UDP_PATHS {
        let p = &r.paths[name];
        let ladders: Vec<String> = p
            .runs
            .iter()
            .filter_map(|x| x.udp.as_ref())
            .map(|u| {
                u.ladder
                    .iter()
                    .map(|(m, l)| format!("{m}: {l:.2}"))
                    .collect::<Vec<_>>()
                    .join(", ")
            })
            .collect();
        let _ = writeln!(
            s,
            "| {} | {} | {} Mbit/s | {} |",
            label(name),
            p.udp_loss_pct
                .map_or_else(|| "-".to_owned(), |l| format!("{l:.3} %")),
            p.udp_max_mbit_at_0_1pct.unwrap_or(0),
            ladders.join(" / ")
        );
    }
    let _ = writeln!(
        s,
        "\nUDP, ours over direct (highest rate at ≤ 0.1 % loss): {:.2}×. Load: `{}`.",
        r.udp.ours_over_direct, r.udp.load
    );
}

/// `ethtool -k eth0` in each namespace, reduced to the settings that matter here.
fn offload_settings(lab: &Lab, hosts: &[(&str, &Ns)]) -> BTreeMap<String, String> {
    const KEYS: [&str; 5] = [
        "tx-checksumming",
        "tcp-segmentation-offload",
        "generic-segmentation-offload",
        "generic-receive-offload",
        "rx-checksumming",
    ];
    hosts
        .iter()
        .map(|(name, ns)| {
            let text = lab.exec(ns, &["ethtool", "-k", "eth0"]).unwrap_or_default();
            let mut parts = Vec::new();
            for line in text.lines() {
                if let Some((k, v)) = line.split_once(':')
                    && KEYS.contains(&k.trim())
                {
                    let v = v.split_whitespace().next().unwrap_or("?");
                    parts.push(format!("{} {v}", k.trim()));
                }
            }
            ((*name).to_owned(), parts.join(", "))
        })
        .collect()
}
