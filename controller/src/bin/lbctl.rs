//! `lbctl`: the operator CLI over the controller's operator API. Human tables by default, `--json`
//! for scripts. Exit codes: 0 success; 2 bad usage; 3 the controller could not be reached; a call
//! the controller refused exits with 10 + its gRPC status code (13 invalid argument, 15 not found,
//! 16 already exists, 17 permission denied, 19 failed precondition, 20 aborted: a conflicting
//! update, read again and retry, 24 unavailable, 26 unauthenticated).

// The doc comments below are clap's help text (`ADDRESS:PORT[:WEIGHT]`, `operator-<name>.pem`),
// written for the terminal, not for rustdoc.
#![allow(rustdoc::broken_intra_doc_links, rustdoc::invalid_html_tags)]

use std::{path::PathBuf, process::ExitCode, time::Duration};

use clap::{Args as ClapArgs, Parser, Subcommand};
use lb_api::v1::{self as pb, operator_client::OperatorClient};
use tonic::transport::{Channel, Endpoint};

#[derive(Parser)]
#[command(version, about = "Operate the load balancer through its controller")]
struct Cli {
    /// The controller's address.
    #[arg(
        long,
        env = "LBCTL_CONTROLLER",
        default_value = "https://127.0.0.1:7400"
    )]
    controller: String,
    /// PKI directory (`lbctl certs init`): ca.pem and operator-<name>.pem/.key.
    #[arg(long, env = "LBCTL_TLS_DIR", default_value = "/etc/lb/pki")]
    tls_dir: PathBuf,
    /// Which operator certificate of the PKI directory to use.
    #[arg(long, env = "LBCTL_OPERATOR", default_value = "admin")]
    operator: String,
    /// Plain text, no certificates (a controller started with --insecure).
    #[arg(long)]
    insecure: bool,
    /// Print JSON instead of tables.
    #[arg(long, global = true)]
    json: bool,
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// List engines (the cluster view).
    Engines,
    /// One engine.
    Engine { name: String },
    /// Pools: list, get, create, update, delete.
    #[command(subcommand)]
    Pool(PoolCmd),
    /// Virtual services: list, get, create, update, delete.
    #[command(subcommand)]
    Vs(VsCmd),
    /// Engine groups (placement, the auto-rebalance loop, the scale-in timeout): list, get,
    /// create, update, delete.
    #[command(subcommand)]
    Group(GroupCmd),
    /// Add a secondary engine to a virtual service.
    ScaleOut {
        vs: String,
        #[arg(long)]
        engine: Option<String>,
    },
    /// Remove a secondary engine from a virtual service (it drains).
    ScaleIn {
        vs: String,
        #[arg(long)]
        engine: Option<String>,
    },
    /// Move a virtual service's primary to another engine.
    Migrate {
        vs: String,
        #[arg(long)]
        from: Option<String>,
        #[arg(long)]
        to: Option<String>,
    },
    /// Lasting differences between desired and observed state.
    Anomalies,
    /// Recent events; with --follow, new ones as they happen.
    Events {
        #[arg(long)]
        follow: bool,
        /// Only events whose kind starts with this (e.g. `promotion`, `rebalance`).
        #[arg(long)]
        kind: Option<String>,
    },
    /// The auto-rebalance loop.
    #[command(subcommand)]
    Rebalance(RebalanceCmd),
    /// The engines' BGP speaker (services in scaling mode bgp): get, set, off.
    #[command(subcommand)]
    Bgp(BgpCmd),
    /// Development PKI.
    #[command(subcommand)]
    Certs(CertsCmd),
}

/// An engine group's settings; what is left out keeps its value (create: the default).
#[derive(ClapArgs, Clone)]
struct GroupFields {
    /// `auto_rebalance`: true or false (default false: manual scaling).
    #[arg(long)]
    auto_rebalance: Option<bool>,
    /// Decisions are events only: true or false.
    #[arg(long)]
    dry_run: Option<bool>,
    /// `auto_rebalance_interval`, seconds (default 300).
    #[arg(long)]
    interval_s: Option<u32>,
    /// The last part of the interval whose average counts, seconds (default 30).
    #[arg(long)]
    window_s: Option<u32>,
    /// `cpu` (default), `pps`, `mbps`, `connections`, `new_connections`.
    #[arg(long)]
    criterion: Option<String>,
    /// Above it an engine is hot (`max_cpu_usage` for cpu: 40–90, default 80).
    #[arg(long)]
    max_usage: Option<f64>,
    /// Below it an engine is cold (`min_cpu_usage` for cpu: 20–60, default 30).
    #[arg(long)]
    min_usage: Option<f64>,
    /// A hot engine's service above this share of its packets (percent) scales out (default 70).
    #[arg(long)]
    hot_share_pct: Option<f64>,
    /// `max_scaleout_per_vs` (default 4).
    #[arg(long)]
    max_scaleout_per_vs: Option<u32>,
    /// `min_scaleout_per_vs` (default 1).
    #[arg(long)]
    min_scaleout_per_vs: Option<u32>,
    /// `vs_scalein_timeout`, seconds (1–3600, default 30).
    #[arg(long)]
    vs_scalein_timeout_s: Option<u32>,
    /// `buffer_se` (N+M, default 1).
    #[arg(long)]
    buffer_se: Option<u32>,
    /// No decision this long after a change, seconds (default 300).
    #[arg(long)]
    cooldown_s: Option<u32>,
}

impl GroupFields {
    fn apply(self, g: &mut pb::EngineGroup) {
        let set = |to: &mut Option<u32>, v: Option<u32>| {
            if v.is_some() {
                *to = v;
            }
        };
        if self.auto_rebalance.is_some() {
            g.auto_rebalance = self.auto_rebalance;
        }
        if self.dry_run.is_some() {
            g.dry_run = self.dry_run;
        }
        set(&mut g.auto_rebalance_interval_s, self.interval_s);
        set(&mut g.window_s, self.window_s);
        if self.criterion.is_some() {
            g.criterion = self.criterion;
        }
        if self.max_usage.is_some() {
            g.max_usage = self.max_usage;
        }
        if self.min_usage.is_some() {
            g.min_usage = self.min_usage;
        }
        if self.hot_share_pct.is_some() {
            g.hot_share_pct = self.hot_share_pct;
        }
        set(&mut g.max_scaleout_per_vs, self.max_scaleout_per_vs);
        set(&mut g.min_scaleout_per_vs, self.min_scaleout_per_vs);
        set(&mut g.vs_scalein_timeout_s, self.vs_scalein_timeout_s);
        set(&mut g.buffer_se, self.buffer_se);
        set(&mut g.cooldown_s, self.cooldown_s);
    }
}

#[derive(Subcommand)]
enum GroupCmd {
    List,
    Get {
        name: String,
    },
    Create {
        name: String,
        #[command(flatten)]
        fields: GroupFields,
    },
    /// Change the given settings.
    Update {
        name: String,
        #[command(flatten)]
        fields: GroupFields,
    },
    Delete {
        name: String,
    },
}

#[derive(Subcommand)]
enum BgpCmd {
    /// The BGP settings, and every engine's sessions.
    Get,
    /// Replace the BGP settings (every engine restarts its sessions with them).
    Set {
        /// The engines' AS number.
        #[arg(long)]
        asn: u32,
        /// ADDRESS:ASN[:PORT] of a router to announce to; repeat.
        #[arg(long = "peer", required = true)]
        peers: Vec<String>,
        /// TCP MD5 key (1–80 bytes) on every session.
        #[arg(long)]
        password: Option<String>,
        /// BFD on every session (100 ms × 3 unless given).
        #[arg(long)]
        bfd: bool,
        #[arg(long, default_value_t = 100)]
        bfd_interval_ms: u32,
        #[arg(long, default_value_t = 3)]
        bfd_multiplier: u32,
        /// Hold time offered, seconds (default 90).
        #[arg(long)]
        hold_time_s: Option<u32>,
        /// ASN:VALUE community on every route; repeat.
        #[arg(long = "community")]
        communities: Vec<String>,
        /// First reconnect wait, ms (default 500).
        #[arg(long)]
        min_backoff_ms: Option<u32>,
        /// Longest reconnect wait, s (default 30).
        #[arg(long)]
        max_backoff_s: Option<u32>,
    },
    /// Remove the BGP settings (refused while a service is in scaling mode bgp).
    Off,
}

#[derive(Subcommand)]
enum RebalanceCmd {
    /// Every decision of the loop, and every decision not taken, with its reason and the loads
    /// (the `rebalance` and `rebalance_failed` events).
    Log {
        #[arg(long)]
        follow: bool,
        /// Only this engine group's decisions.
        #[arg(long)]
        group: Option<String>,
    },
}

#[derive(Subcommand)]
enum CertsCmd {
    /// Write a CA, a controller certificate, and engine and operator client certificates.
    Init {
        #[arg(long)]
        dir: PathBuf,
        /// DNS names or addresses the controller is reached at.
        #[arg(long = "controller-name", required = true)]
        controller_names: Vec<String>,
        #[arg(long = "engine")]
        engines: Vec<String>,
        #[arg(long = "operator", default_value = "admin")]
        operators: Vec<String>,
    },
}

#[derive(ClapArgs, Clone)]
struct PoolFields {
    /// ADDRESS:PORT[:WEIGHT] (IPv6 in brackets); repeat for each backend.
    #[arg(long = "backend")]
    backends: Vec<String>,
    #[arg(long)]
    algorithm: Option<String>,
    /// Health check kind: tcp or http.
    #[arg(long)]
    check: Option<String>,
    #[arg(long)]
    check_interval_ms: Option<u32>,
    #[arg(long)]
    check_timeout_ms: Option<u32>,
    #[arg(long)]
    check_path: Option<String>,
    /// ADDRESS:PORT of a backend to take out of service (no new connections); repeat.
    #[arg(long = "disable")]
    disable: Vec<String>,
    /// ADDRESS:PORT of a backend to put back in service; repeat.
    #[arg(long = "enable")]
    enable: Vec<String>,
}

#[derive(Subcommand)]
enum PoolCmd {
    List,
    Get {
        name: String,
    },
    Create {
        name: String,
        #[command(flatten)]
        fields: PoolFields,
    },
    /// Change the given fields (backends are replaced when any --backend is given).
    Update {
        name: String,
        #[command(flatten)]
        fields: PoolFields,
    },
    Delete {
        name: String,
    },
}

#[derive(ClapArgs, Clone)]
struct VsFields {
    #[arg(long)]
    vip: Option<String>,
    #[arg(long)]
    port: Option<u32>,
    #[arg(long)]
    protocol: Option<String>,
    #[arg(long)]
    pool: Option<String>,
    #[arg(long)]
    min_engines: Option<u32>,
    #[arg(long)]
    max_engines: Option<u32>,
    /// KEY=VALUE placement tag; repeat.
    #[arg(long = "tag")]
    tags: Vec<String>,
    #[arg(long)]
    persistence_timeout_s: Option<u32>,
    #[arg(long)]
    max_connections: Option<u32>,
    /// The engine group to place it in (create only; default: `default`).
    #[arg(long)]
    engine_group: Option<String>,
    /// Scaling mode: `native` (default: the primary steers, up to the native limit) or `bgp`
    /// (every engine announces the VIP to the routers, up to 64 engines).
    #[arg(long)]
    mode: Option<String>,
    /// Mode bgp: the route's `MULTI_EXIT_DISC`.
    #[arg(long)]
    med: Option<u32>,
    /// Mode bgp: the route's `LOCAL_PREF`.
    #[arg(long)]
    local_pref: Option<u32>,
}

#[derive(Subcommand)]
enum VsCmd {
    List,
    Get {
        name: String,
    },
    Create {
        name: String,
        #[command(flatten)]
        fields: VsFields,
    },
    Update {
        name: String,
        #[command(flatten)]
        fields: VsFields,
    },
    Delete {
        name: String,
    },
}

/// A failure and its exit code.
struct Failure {
    code: u8,
    message: String,
}

impl From<tonic::Status> for Failure {
    fn from(s: tonic::Status) -> Self {
        Failure {
            code: 10 + u8::try_from(s.code() as i32).unwrap_or(0),
            message: format!("{:?}: {}", s.code(), s.message()),
        }
    }
}

fn usage(message: impl Into<String>) -> Failure {
    Failure {
        code: 2,
        message: message.into(),
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    let runtime = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("a current-thread runtime");
    match runtime.block_on(run(cli)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(f) => {
            eprintln!("lbctl: {}", f.message);
            ExitCode::from(f.code)
        }
    }
}

async fn connect(cli: &Cli) -> Result<OperatorClient<Channel>, Failure> {
    let unreachable = |e: &dyn std::fmt::Display| Failure {
        code: 3,
        message: format!("controller {}: {e}", cli.controller),
    };
    let mut ep = Endpoint::from_shared(cli.controller.clone())
        .map_err(|e| usage(format!("--controller {}: {e}", cli.controller)))?
        .connect_timeout(Duration::from_secs(5))
        .timeout(Duration::from_secs(30));
    if !cli.insecure {
        let tls =
            controller::tls::client_config(&cli.tls_dir, &format!("operator-{}", cli.operator))
                .map_err(usage)?;
        ep = ep.tls_config(tls).map_err(|e| unreachable(&e))?;
    }
    let channel = ep.connect().await.map_err(|e| unreachable(&e))?;
    Ok(OperatorClient::new(channel).max_decoding_message_size(16 << 20))
}

fn backend(s: &str) -> Result<pb::Backend, Failure> {
    let bad = || usage(format!("--backend {s}: expected ADDRESS:PORT[:WEIGHT]"));
    let (addr, rest) = if let Some(r) = s.strip_prefix('[') {
        let (a, rest) = r.split_once(']').ok_or_else(bad)?;
        (a, rest.strip_prefix(':').ok_or_else(bad)?)
    } else {
        s.split_once(':').ok_or_else(bad)?
    };
    let mut parts = rest.split(':');
    let port = parts.next().and_then(|p| p.parse().ok()).ok_or_else(bad)?;
    let weight = parts
        .next()
        .map(str::parse)
        .transpose()
        .map_err(|_| bad())?;
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(pb::Backend {
        address: addr.to_owned(),
        port,
        weight,
        enabled: None,
    })
}

fn apply_pool(p: &mut pb::Pool, f: PoolFields) -> Result<(), Failure> {
    if !f.backends.is_empty() {
        p.backends = f
            .backends
            .iter()
            .map(|b| backend(b))
            .collect::<Result<_, _>>()?;
    }
    if let Some(a) = f.algorithm {
        p.algorithm = a;
    }
    for (list, enabled) in [(&f.disable, false), (&f.enable, true)] {
        for target in list {
            let t = backend(target)?;
            let b = p
                .backends
                .iter_mut()
                .find(|b| b.address == t.address && b.port == t.port)
                .ok_or_else(|| usage(format!("{target}: no such backend in the pool")))?;
            b.enabled = Some(enabled);
        }
    }
    if let Some(kind) = f.check {
        p.health_check = Some(pb::HealthCheck {
            kind,
            ..Default::default()
        });
    }
    if let Some(h) = p.health_check.as_mut() {
        if f.check_interval_ms.is_some() {
            h.interval_ms = f.check_interval_ms;
        }
        if f.check_timeout_ms.is_some() {
            h.timeout_ms = f.check_timeout_ms;
        }
        if f.check_path.is_some() {
            h.http_path = f.check_path;
        }
    }
    Ok(())
}

fn apply_vs(v: &mut pb::VirtualService, f: VsFields) -> Result<(), Failure> {
    if let Some(x) = f.vip {
        v.vip = x;
    }
    if let Some(x) = f.port {
        v.port = x;
    }
    if let Some(x) = f.protocol {
        v.protocol = x;
    }
    if let Some(x) = f.pool {
        v.pool = x;
    }
    if let Some(x) = f.persistence_timeout_s {
        v.persistence_timeout_s = x;
    }
    if f.max_connections.is_some() {
        v.max_connections = f.max_connections;
    }
    if let Some(x) = f.engine_group {
        v.engine_group = x;
    }
    let scaling = v.scaling.get_or_insert_with(Default::default);
    if let Some(m) = f.mode {
        if m != "bgp" {
            v.route = None;
        }
        scaling.mode = m;
    }
    if f.med.is_some() || f.local_pref.is_some() {
        let route = v.route.get_or_insert_with(Default::default);
        if f.med.is_some() {
            route.med = f.med;
        }
        if f.local_pref.is_some() {
            route.local_pref = f.local_pref;
        }
    }
    if let Some(x) = f.min_engines {
        scaling.min_engines = x;
    }
    if let Some(x) = f.max_engines {
        scaling.max_engines = x;
    }
    for t in f.tags {
        let (k, val) = t
            .split_once('=')
            .ok_or_else(|| usage(format!("--tag {t}: expected KEY=VALUE")))?;
        scaling.tags.insert(k.to_owned(), val.to_owned());
    }
    Ok(())
}

/// `ADDRESS:ASN[:PORT]` (IPv6 in brackets).
fn bgp_peer(
    s: &str,
    bfd: Option<pb::BfdTimers>,
    password: Option<&String>,
) -> Result<pb::BgpPeer, Failure> {
    let bad = || usage(format!("--peer {s}: expected ADDRESS:ASN[:PORT]"));
    let (address, rest) = if let Some(r) = s.strip_prefix('[') {
        let (a, rest) = r.split_once(']').ok_or_else(bad)?;
        (a, rest.strip_prefix(':').ok_or_else(bad)?)
    } else {
        s.split_once(':').ok_or_else(bad)?
    };
    let mut parts = rest.split(':');
    let asn = parts.next().and_then(|a| a.parse().ok()).ok_or_else(bad)?;
    let port = parts
        .next()
        .map(str::parse)
        .transpose()
        .map_err(|_| bad())?
        .unwrap_or(0);
    if parts.next().is_some() {
        return Err(bad());
    }
    Ok(pb::BgpPeer {
        address: address.to_owned(),
        asn,
        port,
        hold_time_s: None,
        bfd,
        password: password.cloned().unwrap_or_default(),
        has_password: false,
    })
}

fn print_bgp(cli: &Cli, b: &pb::BgpSettings, engines: &[pb::EngineStatus]) {
    if cli.json {
        return json(&views::bgp(b, engines));
    }
    println!(
        "AS {}, hold time {} s, backoff {} ms–{} s, communities [{}], rv {}",
        b.asn,
        b.hold_time_s,
        b.min_backoff_ms,
        b.max_backoff_s,
        b.communities.join(", "),
        b.resource_version
    );
    table(
        &["PEER", "ASN", "PORT", "BFD", "MD5"],
        b.peers
            .iter()
            .map(|p| {
                vec![
                    p.address.clone(),
                    p.asn.to_string(),
                    p.port.to_string(),
                    p.bfd.map_or("-".to_owned(), |t| {
                        format!("{}/{} ms × {}", t.min_tx_ms, t.min_rx_ms, t.multiplier)
                    }),
                    if p.has_password { "yes" } else { "-" }.to_owned(),
                ]
            })
            .collect(),
    );
    println!();
    table(
        &[
            "ENGINE",
            "PEER",
            "STATE",
            "UPTIME",
            "ROUTES",
            "BFD",
            "LAST ERROR",
        ],
        engines
            .iter()
            .flat_map(|e| {
                e.bgp_peers.iter().map(|p| {
                    vec![
                        e.name.clone(),
                        p.peer.clone(),
                        p.state.clone(),
                        format!("{}s", p.uptime_s),
                        p.routes_announced.to_string(),
                        if p.bfd.is_empty() {
                            "-".to_owned()
                        } else {
                            p.bfd.clone()
                        },
                        p.last_error.clone(),
                    ]
                })
            })
            .collect(),
    );
}

fn table(header: &[&str], rows: Vec<Vec<String>>) {
    let mut width: Vec<usize> = header.iter().map(|h| h.len()).collect();
    for r in &rows {
        for (w, c) in width.iter_mut().zip(r) {
            *w = (*w).max(c.len());
        }
    }
    let line = |cells: Vec<String>| {
        let s: Vec<String> = cells
            .iter()
            .zip(&width)
            .map(|(c, w)| format!("{c:<w$}"))
            .collect();
        println!("{}", s.join("  ").trim_end());
    };
    line(header.iter().map(|h| (*h).to_owned()).collect());
    for r in rows {
        line(r);
    }
}

fn json<T: serde::Serialize>(v: &T) {
    println!("{}", serde_json::to_string_pretty(v).expect("serialisable"));
}

/// JSON views of the API's messages (prost types are not serde).
mod views {
    use lb_api::v1 as pb;
    use serde_json::{Value, json};

    pub fn engine(e: &pb::EngineStatus) -> Value {
        json!({"name": e.name, "id": e.id, "addresses": e.addresses, "mac": e.mac, "tags": e.tags,
            "group": e.group, "state": e.state, "connected": e.connected, "virtual_services": e.virtual_services,
            "roles": e.roles, "cpu_pct": e.cpu_pct, "cpu_source": e.cpu_source,
            "host_cpu_pct": e.host_cpu_pct, "daemon_cpu_pct": e.daemon_cpu_pct,
            "softirq_pct": e.softirq_pct, "memory_bytes": e.memory_bytes, "pps": e.pps,
            "connections": e.connections, "last_heartbeat_unix_ms": e.last_heartbeat_unix_ms,
            "applied_version": e.applied_version, "desired_version": e.desired_version,
            "last_error": e.last_error,
            "peers": e.peers.iter().map(|p| json!({"engine": p.engine, "id": p.id,
                "daemon_up": p.daemon_up, "dataplane_up": p.dataplane_up})).collect::<Vec<_>>(),
            "claims": e.claims.iter().map(|c| json!({"virtual_service": c.virtual_service,
                "vs_id": c.vs_id, "epoch": c.epoch})).collect::<Vec<_>>(),
            "bgp_peers": e.bgp_peers.iter().map(bgp_session).collect::<Vec<_>>()})
    }

    pub fn bgp_session(p: &pb::BgpPeerStatus) -> Value {
        json!({"peer": p.peer, "state": p.state, "uptime_s": p.uptime_s,
            "routes_announced": p.routes_announced, "last_error": p.last_error, "bfd": p.bfd})
    }

    pub fn bgp(b: &pb::BgpSettings, engines: &[pb::EngineStatus]) -> Value {
        json!({"asn": b.asn, "hold_time_s": b.hold_time_s, "communities": b.communities,
            "min_backoff_ms": b.min_backoff_ms, "max_backoff_s": b.max_backoff_s,
            "resource_version": b.resource_version,
            "peers": b.peers.iter().map(|p| json!({"address": p.address, "asn": p.asn,
                "port": p.port, "hold_time_s": p.hold_time_s, "md5": p.has_password,
                "bfd": p.bfd.map(|t| json!({"min_tx_ms": t.min_tx_ms, "min_rx_ms": t.min_rx_ms,
                    "multiplier": t.multiplier}))})).collect::<Vec<_>>(),
            "sessions": engines.iter().map(|e| json!({"engine": e.name,
                "peers": e.bgp_peers.iter().map(bgp_session).collect::<Vec<_>>()}))
                .collect::<Vec<_>>()})
    }

    pub fn pool(p: &pb::Pool) -> Value {
        json!({"name": p.name, "algorithm": p.algorithm, "resource_version": p.resource_version,
            "backends": p.backends.iter().map(|b| json!({"address": b.address, "port": b.port,
                "weight": b.weight, "enabled": b.enabled})).collect::<Vec<_>>(),
            "health_check": p.health_check.as_ref().map(|h| json!({"kind": h.kind,
                "interval_ms": h.interval_ms, "timeout_ms": h.timeout_ms, "http_path": h.http_path}))})
    }

    pub fn vs(v: &pb::VirtualService) -> Value {
        let s = v.scaling.clone().unwrap_or_default();
        let h = v.health.unwrap_or_default();
        json!({"name": v.name, "id": v.id, "vip": v.vip, "port": v.port, "protocol": v.protocol,
            "pool": v.pool, "engine_group": v.engine_group, "resource_version": v.resource_version,
            "epoch": v.epoch,
            "scaling": {"min_engines": s.min_engines, "max_engines": s.max_engines, "tags": s.tags,
                "mode": s.mode},
            "route": v.route.map(|r| json!({"med": r.med, "local_pref": r.local_pref})),
            "placement": v.placement.iter().map(|p| json!({"engine": p.engine, "role": p.role,
                "weight": p.weight, "state": p.state, "phase": p.phase,
                "open_connections": p.open_connections, "remaining_ms": p.remaining_ms}))
                .collect::<Vec<_>>(),
            "health": {"engines_serving": h.engines_serving, "engines_requested": h.engines_requested,
                "backends_up": h.backends_up, "backends": h.backends, "score": h.score}})
    }

    pub fn group(g: &pb::EngineGroup) -> Value {
        json!({"name": g.name, "auto_rebalance": g.auto_rebalance, "dry_run": g.dry_run,
            "auto_rebalance_interval_s": g.auto_rebalance_interval_s, "window_s": g.window_s,
            "criterion": g.criterion, "max_usage": g.max_usage, "min_usage": g.min_usage,
            "hot_share_pct": g.hot_share_pct, "max_scaleout_per_vs": g.max_scaleout_per_vs,
            "min_scaleout_per_vs": g.min_scaleout_per_vs,
            "vs_scalein_timeout_s": g.vs_scalein_timeout_s, "buffer_se": g.buffer_se,
            "cooldown_s": g.cooldown_s, "resource_version": g.resource_version,
            "engines": g.engines, "virtual_services": g.virtual_services})
    }

    pub fn event(e: &pb::Event) -> Value {
        json!({"time_unix_ms": e.time_unix_ms, "kind": e.kind, "objects": e.objects, "reason": e.reason})
    }
}

/// The version an engine runs: `7` when it is the controller's current one, `6 → 7` while it is
/// behind (or has refused 7: see ERROR).
fn version(e: &pb::EngineStatus) -> String {
    if e.applied_version == e.desired_version {
        e.applied_version.to_string()
    } else {
        format!("{} → {}", e.applied_version, e.desired_version)
    }
}

/// An engine's peer view, compact: `se2:up se3:steering se4:down` (steering: its daemon is down,
/// its data plane still steers; daemon-only: its data plane does not echo).
fn peers(e: &pb::EngineStatus) -> String {
    if e.peers.is_empty() {
        return "-".into();
    }
    e.peers
        .iter()
        .map(|p| {
            let name = if p.engine.is_empty() {
                format!("#{}", p.id)
            } else {
                p.engine.clone()
            };
            let state = match (p.daemon_up, p.dataplane_up) {
                (true, true) => "up",
                (false, true) => "steering",
                (true, false) => "daemon-only",
                (false, false) => "down",
            };
            format!("{name}:{state}")
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn time(ms: i64) -> String {
    if ms == 0 {
        return "-".into();
    }
    let s = ms / 1000;
    format!(
        "{:02}:{:02}:{:02}.{:03}",
        (s / 3600) % 24,
        (s / 60) % 60,
        s % 60,
        ms % 1000
    )
}

fn print_vs(cli: &Cli, v: &pb::VirtualService) {
    if cli.json {
        return json(&views::vs(v));
    }
    let h = v.health.unwrap_or_default();
    println!(
        "{} (id {}): {}:{}/{} → pool {}  health {:.2} ({}/{} engines, {}/{} backends)  epoch {}  rv {}",
        v.name,
        v.id,
        v.vip,
        v.port,
        v.protocol,
        v.pool,
        h.score,
        h.engines_serving,
        h.engines_requested,
        h.backends_up,
        h.backends,
        v.epoch,
        v.resource_version
    );
    let s = v.scaling.clone().unwrap_or_default();
    println!(
        "scaling: mode {}, {}–{} engines{}",
        if s.mode.is_empty() { "native" } else { &s.mode },
        s.min_engines,
        s.max_engines,
        v.route.map_or(String::new(), |r| format!(
            ", route med {} local_pref {}",
            r.med.map_or("-".to_owned(), |m| m.to_string()),
            r.local_pref.map_or("-".to_owned(), |m| m.to_string())
        ))
    );
    table(
        &["ENGINE", "ROLE", "WEIGHT", "STATE", "PHASE", "DRAINING"],
        v.placement
            .iter()
            .map(|p| {
                vec![
                    p.engine.clone(),
                    p.role.clone(),
                    p.weight.to_string(),
                    p.state.clone(),
                    p.phase.clone(),
                    if p.phase == "draining" && p.remaining_ms > 0 {
                        format!(
                            "{} open, {:.0} s left",
                            p.open_connections,
                            Duration::from_millis(p.remaining_ms).as_secs_f64()
                        )
                    } else {
                        String::new()
                    },
                ]
            })
            .collect(),
    );
}

fn group_row(g: &pb::EngineGroup) -> Vec<String> {
    let on = match (g.auto_rebalance, g.dry_run) {
        (Some(true), Some(true)) => "dry-run",
        (Some(true), _) => "on",
        _ => "off",
    };
    vec![
        g.name.clone(),
        on.to_owned(),
        g.criterion.clone().unwrap_or_default(),
        format!(
            "{}-{}",
            g.min_usage.unwrap_or_default(),
            g.max_usage.unwrap_or_default()
        ),
        format!(
            "{}s/{}s",
            g.auto_rebalance_interval_s.unwrap_or_default(),
            g.window_s.unwrap_or_default()
        ),
        format!("{}s", g.vs_scalein_timeout_s.unwrap_or_default()),
        g.engines.join(","),
        g.virtual_services.join(","),
    ]
}

fn print_group(cli: &Cli, g: &pb::EngineGroup) {
    if cli.json {
        json(&views::group(g));
        return;
    }
    table(
        &[
            "NAME",
            "AUTO-REBALANCE",
            "CRITERION",
            "MIN-MAX",
            "INTERVAL",
            "SCALE-IN TIMEOUT",
            "ENGINES",
            "VS",
        ],
        vec![group_row(g)],
    );
    println!(
        "hot share {}%, scale-out per vs {}–{}, buffer_se {}, cool-down {}s, resource_version {}",
        g.hot_share_pct.unwrap_or_default(),
        g.min_scaleout_per_vs.unwrap_or_default(),
        g.max_scaleout_per_vs.unwrap_or_default(),
        g.buffer_se.unwrap_or_default(),
        g.cooldown_s.unwrap_or_default(),
        g.resource_version
    );
}

fn print_pool(cli: &Cli, p: &pb::Pool) {
    if cli.json {
        return json(&views::pool(p));
    }
    println!(
        "{} ({}), rv {}",
        p.name,
        if p.algorithm.is_empty() {
            "round_robin"
        } else {
            &p.algorithm
        },
        p.resource_version
    );
    table(
        &["BACKEND", "WEIGHT", "ENABLED"],
        p.backends
            .iter()
            .map(|b| {
                vec![
                    format!("{}:{}", b.address, b.port),
                    b.weight.unwrap_or(1).to_string(),
                    b.enabled.unwrap_or(true).to_string(),
                ]
            })
            .collect(),
    );
}

#[allow(clippy::too_many_lines)]
async fn run(cli: Cli) -> Result<(), Failure> {
    if let Command::Certs(CertsCmd::Init {
        dir,
        controller_names,
        engines,
        operators,
    }) = &cli.command
    {
        let files =
            controller::tls::init_pki(dir, controller_names, engines, operators).map_err(|e| {
                Failure {
                    code: 1,
                    message: e.to_string(),
                }
            })?;
        for f in files {
            println!("{}", f.display());
        }
        return Ok(());
    }
    let mut c = connect(&cli).await?;
    match &cli.command {
        Command::Certs(_) => unreachable!("handled above"),
        Command::Engines => {
            let list = c.list_engines(pb::Empty {}).await?.into_inner().engines;
            if cli.json {
                json(&list.iter().map(views::engine).collect::<Vec<_>>());
            } else {
                table(
                    &[
                        "NAME",
                        "ID",
                        "GROUP",
                        "STATE",
                        "CONNECTED",
                        "VS",
                        "CPU%",
                        "PPS",
                        "CONNS",
                        "VERSION",
                        "LAST HEARTBEAT",
                        "PEERS",
                        "ERROR",
                    ],
                    list.iter()
                        .map(|e| {
                            vec![
                                e.name.clone(),
                                e.id.to_string(),
                                e.group.clone(),
                                e.state.clone(),
                                e.connected.to_string(),
                                e.virtual_services.to_string(),
                                format!("{:.1}", e.cpu_pct),
                                e.pps.to_string(),
                                e.connections.to_string(),
                                version(e),
                                time(e.last_heartbeat_unix_ms),
                                peers(e),
                                e.last_error.clone(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        Command::Engine { name } => {
            let e = c
                .get_engine(pb::Name { name: name.clone() })
                .await?
                .into_inner();
            json(&views::engine(&e));
        }
        Command::Pool(cmd) => match cmd {
            PoolCmd::List => {
                let pools = c.list_pools(pb::Empty {}).await?.into_inner().pools;
                if cli.json {
                    json(&pools.iter().map(views::pool).collect::<Vec<_>>());
                } else {
                    table(
                        &["NAME", "ALGORITHM", "BACKENDS", "RV"],
                        pools
                            .iter()
                            .map(|p| {
                                vec![
                                    p.name.clone(),
                                    p.algorithm.clone(),
                                    p.backends.len().to_string(),
                                    p.resource_version.to_string(),
                                ]
                            })
                            .collect(),
                    );
                }
            }
            PoolCmd::Get { name } => {
                let p = c
                    .get_pool(pb::Name { name: name.clone() })
                    .await?
                    .into_inner();
                print_pool(&cli, &p);
            }
            PoolCmd::Create { name, fields } => {
                let mut p = pb::Pool {
                    name: name.clone(),
                    ..Default::default()
                };
                apply_pool(&mut p, fields.clone())?;
                let p = c.create_pool(p).await?.into_inner();
                print_pool(&cli, &p);
            }
            PoolCmd::Update { name, fields } => {
                let mut p = c
                    .get_pool(pb::Name { name: name.clone() })
                    .await?
                    .into_inner();
                apply_pool(&mut p, fields.clone())?;
                let p = c.update_pool(p).await?.into_inner();
                print_pool(&cli, &p);
            }
            PoolCmd::Delete { name } => {
                c.delete_pool(pb::Name { name: name.clone() }).await?;
            }
        },
        Command::Group(cmd) => match cmd {
            GroupCmd::List => {
                let list = c
                    .list_engine_groups(pb::Empty {})
                    .await?
                    .into_inner()
                    .groups;
                if cli.json {
                    json(&list.iter().map(views::group).collect::<Vec<_>>());
                } else {
                    table(
                        &[
                            "NAME",
                            "AUTO-REBALANCE",
                            "CRITERION",
                            "MIN-MAX",
                            "INTERVAL",
                            "SCALE-IN TIMEOUT",
                            "ENGINES",
                            "VS",
                        ],
                        list.iter().map(group_row).collect(),
                    );
                }
            }
            GroupCmd::Get { name } => {
                let g = c
                    .get_engine_group(pb::Name { name: name.clone() })
                    .await?
                    .into_inner();
                print_group(&cli, &g);
            }
            GroupCmd::Create { name, fields } => {
                let mut g = pb::EngineGroup {
                    name: name.clone(),
                    ..Default::default()
                };
                fields.clone().apply(&mut g);
                let g = c.create_engine_group(g).await?.into_inner();
                print_group(&cli, &g);
            }
            GroupCmd::Update { name, fields } => {
                let mut g = c
                    .get_engine_group(pb::Name { name: name.clone() })
                    .await?
                    .into_inner();
                fields.clone().apply(&mut g);
                let g = c.update_engine_group(g).await?.into_inner();
                print_group(&cli, &g);
            }
            GroupCmd::Delete { name } => {
                c.delete_engine_group(pb::Name { name: name.clone() })
                    .await?;
            }
        },
        Command::Vs(cmd) => match cmd {
            VsCmd::List => {
                let list = c
                    .list_virtual_services(pb::Empty {})
                    .await?
                    .into_inner()
                    .virtual_services;
                if cli.json {
                    json(&list.iter().map(views::vs).collect::<Vec<_>>());
                } else {
                    table(
                        &[
                            "NAME", "ID", "VIP", "POOL", "PRIMARY", "EPOCH", "ENGINES", "HEALTH",
                        ],
                        list.iter()
                            .map(|v| {
                                vec![
                                    v.name.clone(),
                                    v.id.to_string(),
                                    format!("{}:{}/{}", v.vip, v.port, v.protocol),
                                    v.pool.clone(),
                                    v.placement
                                        .first()
                                        .map(|p| p.engine.clone())
                                        .unwrap_or_default(),
                                    v.epoch.to_string(),
                                    v.placement
                                        .iter()
                                        .map(|p| match p.phase.as_str() {
                                            "pending" => format!("{}(pending)", p.engine),
                                            "draining" => format!("{}(draining)", p.engine),
                                            _ => format!("{}({})", p.engine, p.weight),
                                        })
                                        .collect::<Vec<_>>()
                                        .join(","),
                                    format!("{:.2}", v.health.unwrap_or_default().score),
                                ]
                            })
                            .collect(),
                    );
                }
            }
            VsCmd::Get { name } => {
                let v = c
                    .get_virtual_service(pb::Name { name: name.clone() })
                    .await?
                    .into_inner();
                print_vs(&cli, &v);
            }
            VsCmd::Create { name, fields } => {
                let mut v = pb::VirtualService {
                    name: name.clone(),
                    ..Default::default()
                };
                apply_vs(&mut v, fields.clone())?;
                let v = c.create_virtual_service(v).await?.into_inner();
                print_vs(&cli, &v);
            }
            VsCmd::Update { name, fields } => {
                let mut v = c
                    .get_virtual_service(pb::Name { name: name.clone() })
                    .await?
                    .into_inner();
                apply_vs(&mut v, fields.clone())?;
                let v = c.update_virtual_service(v).await?.into_inner();
                print_vs(&cli, &v);
            }
            VsCmd::Delete { name } => {
                c.delete_virtual_service(pb::Name { name: name.clone() })
                    .await?;
            }
        },
        Command::ScaleOut { vs, engine } => {
            let v = c
                .scale_out(pb::ScaleRequest {
                    virtual_service: vs.clone(),
                    engine: engine.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_vs(&cli, &v);
        }
        Command::ScaleIn { vs, engine } => {
            let v = c
                .scale_in(pb::ScaleRequest {
                    virtual_service: vs.clone(),
                    engine: engine.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_vs(&cli, &v);
        }
        Command::Migrate { vs, from, to } => {
            let v = c
                .migrate(pb::MigrateRequest {
                    virtual_service: vs.clone(),
                    from_engine: from.clone().unwrap_or_default(),
                    to_engine: to.clone().unwrap_or_default(),
                })
                .await?
                .into_inner();
            print_vs(&cli, &v);
        }
        Command::Bgp(BgpCmd::Get) => {
            let b = c.get_bgp(pb::Empty {}).await?.into_inner();
            let engines = c.list_engines(pb::Empty {}).await?.into_inner().engines;
            print_bgp(&cli, &b, &engines);
        }
        Command::Bgp(BgpCmd::Set {
            asn,
            peers,
            password,
            bfd,
            bfd_interval_ms,
            bfd_multiplier,
            hold_time_s,
            communities,
            min_backoff_ms,
            max_backoff_s,
        }) => {
            let timers = bfd.then_some(pb::BfdTimers {
                min_tx_ms: *bfd_interval_ms,
                min_rx_ms: *bfd_interval_ms,
                multiplier: *bfd_multiplier,
            });
            let resource_version = match c.get_bgp(pb::Empty {}).await {
                Ok(b) => b.into_inner().resource_version,
                Err(s) if s.code() == tonic::Code::NotFound => 0,
                Err(s) => return Err(s.into()),
            };
            let b = c
                .set_bgp(pb::BgpSettings {
                    asn: *asn,
                    hold_time_s: hold_time_s.unwrap_or(0),
                    communities: communities.clone(),
                    peers: peers
                        .iter()
                        .map(|p| bgp_peer(p, timers, password.as_ref()))
                        .collect::<Result<_, _>>()?,
                    min_backoff_ms: min_backoff_ms.unwrap_or(0),
                    max_backoff_s: max_backoff_s.unwrap_or(0),
                    resource_version,
                })
                .await?
                .into_inner();
            print_bgp(&cli, &b, &[]);
        }
        Command::Bgp(BgpCmd::Off) => {
            let resource_version = c.get_bgp(pb::Empty {}).await?.into_inner().resource_version;
            c.set_bgp(pb::BgpSettings {
                resource_version,
                ..Default::default()
            })
            .await?;
        }
        Command::Anomalies => {
            let list = c.list_anomalies(pb::Empty {}).await?.into_inner().anomalies;
            if cli.json {
                json(
                    &list
                        .iter()
                        .map(|a| serde_json::json!({"kind": a.kind, "object": a.object, "reason": a.reason, "since_unix_ms": a.since_unix_ms}))
                        .collect::<Vec<_>>(),
                );
            } else {
                table(
                    &["KIND", "OBJECT", "SINCE", "REASON"],
                    list.iter()
                        .map(|a| {
                            vec![
                                a.kind.clone(),
                                a.object.clone(),
                                time(a.since_unix_ms),
                                a.reason.clone(),
                            ]
                        })
                        .collect(),
                );
            }
        }
        Command::Events { .. } | Command::Rebalance(RebalanceCmd::Log { .. }) => {
            let (follow, kind, group) = match &cli.command {
                Command::Events { follow, kind } => (*follow, kind.clone(), None),
                Command::Rebalance(RebalanceCmd::Log { follow, group }) => (
                    *follow,
                    Some("rebalance".to_owned()),
                    group.as_ref().map(|g| format!("group/{g}")),
                ),
                _ => (false, None, None),
            };
            let wanted = |e: &pb::Event| {
                kind.as_ref().is_none_or(|k| e.kind.starts_with(k.as_str()))
                    && group.as_ref().is_none_or(|g| e.objects.contains(g))
            };
            let print = |e: &pb::Event| {
                if !wanted(e) {
                    return;
                }
                if cli.json {
                    println!("{}", views::event(e));
                } else {
                    println!(
                        "{}  {:<15} {:<24} {}",
                        time(e.time_unix_ms),
                        e.kind,
                        e.objects.join(","),
                        e.reason
                    );
                }
            };
            if follow {
                let mut s = c.watch_events(pb::Empty {}).await?.into_inner();
                while let Some(e) = s.message().await? {
                    print(&e);
                }
            } else {
                for e in c.list_events(pb::Empty {}).await?.into_inner().events {
                    print(&e);
                }
            }
        }
    }
    Ok(())
}
