//! End to end through the namespace lab: our path (client → primary's XDP → the secondaries'
//! proxies → backends) against the one-hop L4 proxies a user would pick instead, `HAProxy`
//! (`mode tcp`) and nginx's `stream` proxy, and a direct client → backend baseline, all in the same
//! lab, with the same client, the same backends and the same offload settings, in one run.
//!
//! Each round measures every path in turn (interleaved, so drift hits them alike): `wrk`
//! keep-alive, `wrk` with `Connection: close` (one request per connection), and one `iperf3` TCP
//! stream. Every figure is the median over the rounds.

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
/// A second VIP whose only engine is the primary itself: our proxy without the steering hop.
const LOCAL_VIP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 11);
const HAPROXY_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 31);
const NGINX_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 32);
/// Threads / worker processes of each baseline proxy (our daemon runs 2 runtime threads).
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
#[derive(Clone, Copy, Debug, Default, Serialize)]
struct Sample {
    keepalive: Http,
    short: Http,
    iperf_gbit_per_s: f64,
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
    /// wrk socket errors + non-2xx responses, all runs.
    errors: u64,
    runs: Vec<Sample>,
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
    offloads: BTreeMap<String, String>,
    placement: String,
    topology: String,
    daemon_bin: String,
    /// `/proc/loadavg` before and after the run (other load on the two cores skews the figures).
    loadavg_before: String,
    loadavg_after: String,
    paths: BTreeMap<&'static str, PathResult>,
    /// ours ÷ baseline, per figure (> 1: ours is higher; for p99 lower is better).
    ratios: BTreeMap<String, BTreeMap<&'static str, f64>>,
}

struct Target {
    ns: Ns,
    http: SocketAddr,
    iperf: SocketAddr,
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
            let s = measure(opts, &client, t)
                .with_context(|| format!("round {round}, path {name} ({})", t.ns))?;
            eprintln!(
                "e2e: round {round} {name:8} keep-alive {:>8.0} req/s p99 {:>6.2} ms | close {:>8.0} req/s p99 {:>6.2} ms | iperf3 {:>5.2} Gbit/s | errors {}",
                s.keepalive.requests_per_s,
                s.keepalive.p99_ms,
                s.short.requests_per_s,
                s.short.p99_ms,
                s.iperf_gbit_per_s,
                s.keepalive.errors + s.short.errors
            );
            samples.entry(name).or_default().push(s);
        }
    }

    let (paths, ratios) = summarize(samples, targets);
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
        offloads,
        placement: "No CPU pinning: every process (wrk's 2 threads, 3 backend nginx processes, \
            the proxies) is scheduled by the kernel on both cores; veth traffic is processed in \
            softirq on the sending CPU. lb-daemon runs 2 runtime threads per engine, HAProxy \
            nbthread 2, nginx 2 worker processes; each backend nginx is one process."
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

    let target = |ns: &Ns, ip: Ipv4Addr| Target {
        ns: ns.clone(),
        http: SocketAddr::from((ip, HTTP_PORT)),
        iperf: SocketAddr::from((ip, IPERF_PORT)),
    };
    let targets: BTreeMap<&'static str, Target> = [
        (
            "direct",
            Target {
                iperf: iperf_server,
                ..target(&lab.backends[0].ns, lab.backends[0].addr)
            },
        ),
        ("ours", target(&lab.primary().ns, lab.vip())),
        ("ours_local", target(&lab.primary().ns, LOCAL_VIP)),
        ("haproxy", target(&hap_ns, HAPROXY_ADDR)),
        ("nginx", target(&ngx_ns, NGINX_ADDR)),
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
            let med = |f: fn(&Sample) -> f64| median(runs.iter().map(f).collect());
            (
                name,
                PathResult {
                    target: targets[name].http.to_string(),
                    keepalive_rps: med(|s| s.keepalive.requests_per_s),
                    keepalive_p99_ms: med(|s| s.keepalive.p99_ms),
                    short_rps: med(|s| s.short.requests_per_s),
                    short_p99_ms: med(|s| s.short.p99_ms),
                    iperf_gbit_per_s: med(|s| s.iperf_gbit_per_s),
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
    for (id, name, port, pool) in [
        (3, "web-local", HTTP_PORT, "web"),
        (4, "iperf-local", IPERF_PORT, "iperf"),
    ] {
        let mut vs = template.clone();
        vs.id = id;
        name.clone_into(&mut vs.name);
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

fn measure(opts: &Options, client: &Ns, t: &Target) -> anyhow::Result<Sample> {
    let url = format!("http://{}/", t.http);
    let wrk = Wrk {
        threads: opts.threads,
        connections: opts.connections,
        duration: Duration::from_secs(opts.wrk_seconds),
        ..Wrk::new(&url)
    };
    let keepalive = wrk.run(client)?;
    // Let the short-connection run start without the keep-alive run's sockets closing.
    std::thread::sleep(Duration::from_millis(500));
    let short = Wrk {
        close: true,
        ..wrk.clone()
    }
    .run(client)?;
    std::thread::sleep(Duration::from_millis(500));
    let iperf = Iperf {
        duration: Duration::from_secs(opts.iperf_seconds),
        ..Iperf::tcp(&t.iperf.ip().to_string(), t.iperf.port())
    }
    .run(client)?;
    std::thread::sleep(Duration::from_millis(500));
    Ok(Sample {
        keepalive: Http::from(&keepalive),
        short: Http::from(&short),
        iperf_gbit_per_s: iperf.received_gbit_per_s(),
    })
}

fn median(mut v: Vec<f64>) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn spread(runs: &[Sample], f: fn(&Sample) -> f64) -> String {
    let v: Vec<f64> = runs.iter().map(f).collect();
    let lo = v.iter().copied().fold(f64::INFINITY, f64::min);
    let hi = v.iter().copied().fold(f64::NEG_INFINITY, f64::max);
    format!("{lo:.0}–{hi:.0}")
}

fn markdown(r: &Report) -> String {
    let mut s = format!(
        "End to end through the namespace lab, median of {} rounds ({}, {}, kernel {})\n\n",
        r.rounds, r.date, r.machine, r.kernel
    );
    s.push_str("| path | keep-alive req/s | keep-alive p99 | short conns req/s | short p99 | iperf3 Gbit/s | wrk errors |\n");
    s.push_str("|---|---|---|---|---|---|---|\n");
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
            "| {} | {:.1}k | {:.2} ms | {:.1}k | {:.2} ms | {:.2} | {} |",
            label(name),
            p.keepalive_rps / 1000.0,
            p.keepalive_p99_ms,
            p.short_rps / 1000.0,
            p.short_p99_ms,
            p.iperf_gbit_per_s,
            p.errors
        );
    }
    s.push_str("\n| ratio | keep-alive req/s | keep-alive p99 | short req/s | short p99 | iperf3 |\n|---|---|---|---|---|---|\n");
    for (name, m) in &r.ratios {
        let _ = writeln!(
            s,
            "| {} | {:.2}× | {:.2}× | {:.2}× | {:.2}× | {:.2}× |",
            name.replace('_', " "),
            m["keepalive_rps"],
            m["keepalive_p99"],
            m["short_rps"],
            m["short_p99"],
            m["iperf"]
        );
    }
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
