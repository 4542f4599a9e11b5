//! `controller`: serves the operator and engine APIs over mutual TLS, keeps the desired state in
//! an embedded database, and runs the health ticker. See the crate documentation for the tasks.
//! `controller simulate` replays heartbeat traces through the auto-rebalance decision instead.

use std::{
    io::Write as _,
    net::SocketAddr,
    path::PathBuf,
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::Context;
use clap::{Parser, Subcommand};
use controller::{
    api::{OperatorService, lock},
    cluster::{Cluster, Settings},
    engines::EngineService,
    health::HealthSettings,
    rebalance::{Criterion, RebalanceSettings},
    simulate::{self, Trace, TraceKind},
    store::{DEFAULT_GROUP, RedbStore},
    tls,
};
use lb_api::v1::{engine_api_server::EngineApiServer, operator_server::OperatorServer};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

#[derive(Parser)]
#[command(
    version,
    about = "Load balancer controller: desired state, placement, engine health",
    args_conflicts_with_subcommands = true
)]
struct Args {
    /// gRPC listen address (operator and engine APIs, health, reflection).
    #[arg(long, default_value = "0.0.0.0:7400")]
    listen: SocketAddr,
    /// The embedded database (created if missing).
    #[arg(long, default_value = "/var/lib/lb/controller.redb")]
    db: PathBuf,
    /// Directory with ca.pem, controller.pem and controller.key (`lbctl certs init`).
    #[arg(long, default_value = "/etc/lb/pki")]
    tls_dir: PathBuf,
    /// Plain text, no client certificates, no roles: for a lab only.
    #[arg(long)]
    insecure: bool,
    /// Engines heartbeat this often; the health ticker runs at the same interval.
    #[arg(long, default_value_t = 1000)]
    heartbeat_interval_ms: u64,
    /// Heartbeats an engine may miss before it is failed.
    #[arg(long, default_value_t = 3)]
    max_missed: u32,
    /// Failures within the flapping window that make an engine flapping.
    #[arg(long, default_value_t = 3)]
    flap_failures: usize,
    #[arg(long, default_value_t = 300)]
    flap_window_s: u64,
    /// How long a flapping engine stays out of placement.
    #[arg(long, default_value_t = 300)]
    flap_hold_s: u64,
    /// How long a virtual service's primary stays failed before the controller promotes a
    /// secondary itself (when no engine promoted one and no engine sees the primary's data plane
    /// still steering).
    #[arg(long, default_value_t = 2000)]
    promotion_grace_ms: u64,
    /// Virtual service ids handed out: 0..N (the engines' `daemon.max_virtual_services`).
    #[arg(long, default_value_t = 64)]
    max_virtual_services: u32,
    /// Engines a virtual service may scale to natively (1–64); beyond, it scales by BGP/ECMP.
    #[arg(long, default_value_t = 4)]
    native_max_engines: u32,
    #[command(flatten)]
    rebalance: RebalanceArgs,
    #[command(subcommand)]
    command: Option<Command>,
}

/// The auto-rebalance knobs: `simulate`'s, and the controller's for the `default` engine group.
/// The controller keeps every group's settings in its database (`lbctl group`); a flag given here
/// overrides the default group's stored value at start (and is stored), one left out keeps it.
#[derive(clap::Args)]
struct RebalanceArgs {
    /// The auto-rebalance loop (Avi's `auto_rebalance`; off, the default: scaling is manual).
    /// `--auto-rebalance` or `--auto-rebalance=false`. `simulate`: always on.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    auto_rebalance: Option<bool>,
    /// Decisions are events only (`lbctl rebalance log`); nothing changes.
    #[arg(long, num_args = 0..=1, default_missing_value = "true", value_name = "BOOL")]
    rebalance_dry_run: Option<bool>,
    /// `auto_rebalance_interval`, seconds (default 300).
    #[arg(long)]
    rebalance_interval_s: Option<u64>,
    /// The last part of the interval whose average counts, seconds (default 30).
    #[arg(long)]
    rebalance_window_s: Option<u64>,
    /// `cpu` (default), `pps`, `mbps`, `connections` or `new_connections`.
    #[arg(long)]
    rebalance_criterion: Option<String>,
    /// Above it an engine is hot (`max_cpu_usage`, 40–90 for CPU, default 80).
    #[arg(long)]
    rebalance_max: Option<f64>,
    /// Below it an engine is cold (`min_cpu_usage`, 20–60 for CPU, default 30).
    #[arg(long)]
    rebalance_min: Option<f64>,
    /// No decision this long after a change, seconds (default 300).
    #[arg(long)]
    rebalance_cooldown_s: Option<u64>,
    /// `max_scaleout_per_vs` (1–64, default 4).
    #[arg(long)]
    max_scaleout_per_vs: Option<u32>,
    /// `buffer_se`: free engines a scale-out or migration may not take (N+M, default 1).
    #[arg(long)]
    buffer_se: Option<u32>,
    /// `vs_scalein_timeout`, seconds (1–3600, default 30): how long an engine scaled in (or
    /// migrated away) lets its open connections finish before it resets the rest.
    #[arg(long)]
    vs_scalein_timeout_s: Option<u64>,
}

impl RebalanceArgs {
    /// `base` with the flags given, checked.
    fn apply(&self, base: RebalanceSettings) -> anyhow::Result<RebalanceSettings> {
        let secs = |v: Option<u64>, d: Duration| v.map_or(d, Duration::from_secs);
        let settings = RebalanceSettings {
            enabled: self.auto_rebalance.unwrap_or(base.enabled),
            dry_run: self.rebalance_dry_run.unwrap_or(base.dry_run),
            interval: secs(self.rebalance_interval_s, base.interval),
            window: secs(self.rebalance_window_s, base.window),
            criterion: match &self.rebalance_criterion {
                Some(c) => Criterion::parse(c)
                    .map_err(|e| anyhow::anyhow!("--rebalance-criterion: {e}"))?,
                None => base.criterion,
            },
            max: self.rebalance_max.unwrap_or(base.max),
            min: self.rebalance_min.unwrap_or(base.min),
            cooldown: secs(self.rebalance_cooldown_s, base.cooldown),
            max_scaleout_per_vs: self.max_scaleout_per_vs.unwrap_or(base.max_scaleout_per_vs),
            buffer_se: self.buffer_se.unwrap_or(base.buffer_se),
            scalein_timeout: secs(self.vs_scalein_timeout_s, base.scalein_timeout),
            ..base
        };
        settings
            .validate()
            .map_err(|e| anyhow::anyhow!("rebalance settings: {e}"))?;
        Ok(settings)
    }
}

#[derive(Subcommand)]
enum Command {
    /// What the auto-rebalance loop would have done with recorded heartbeats.
    ///
    /// Replays traces through the controller's decision code on a virtual clock and a modelled
    /// load (see the printed header): every decision with its reason, the placement after each
    /// change, and a summary.
    Simulate(SimulateArgs),
}

#[derive(clap::Args)]
struct SimulateArgs {
    /// A JSON-lines trace (service and heartbeat lines); several are merged by time.
    #[arg(
        long,
        required_unless_present = "generate",
        conflicts_with = "generate"
    )]
    trace: Vec<PathBuf>,
    /// JSON lines (a header, one object per decision, a summary) instead of text.
    #[arg(long)]
    json: bool,
    /// Writes an example trace instead: `daily-ramp` or `flash-crowd`.
    #[arg(long, value_name = "KIND")]
    generate: Option<TraceKind>,
    /// Where `--generate` writes (default: standard output).
    #[arg(long, requires = "generate")]
    out: Option<PathBuf>,
    #[command(flatten)]
    rebalance: RebalanceArgs,
}

/// `controller simulate`: synchronous, to standard output.
fn simulate(args: &SimulateArgs) -> anyhow::Result<()> {
    let text = if let Some(kind) = args.generate {
        let text = simulate::generate(kind);
        if let Some(out) = &args.out {
            std::fs::write(out, text).with_context(|| format!("writing {}", out.display()))?;
            return Ok(());
        }
        text
    } else {
        let settings = args.rebalance.apply(RebalanceSettings {
            enabled: true,
            ..RebalanceSettings::default()
        })?;
        let trace = Trace::load(&args.trace)?;
        let sim = simulate::replay(&trace, settings);
        if args.json {
            simulate::render_json(&trace, &sim)
        } else {
            simulate::render_human(&trace, &sim)
        }
    };
    let mut stdout = std::io::stdout().lock();
    match stdout
        .write_all(text.as_bytes())
        .and_then(|()| stdout.flush())
    {
        // `| head`: the reader has what it wanted.
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        r => r.context("writing standard output"),
    }
}

fn main() -> std::process::ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LB_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .init();
    let mut args = Args::parse();
    if let Some(Command::Simulate(sim)) = args.command.take() {
        return match simulate(&sim) {
            Ok(()) => std::process::ExitCode::SUCCESS,
            Err(e) => {
                eprintln!("controller simulate: {e:#}");
                std::process::ExitCode::FAILURE
            }
        };
    }
    let runtime = match tokio::runtime::Runtime::new() {
        Ok(r) => r,
        Err(e) => {
            eprintln!("controller: starting the runtime: {e}");
            return std::process::ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(args)) {
        Ok(()) => std::process::ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("controller: {e:#}");
            std::process::ExitCode::FAILURE
        }
    }
}

#[allow(clippy::too_many_lines)]
async fn run(args: Args) -> anyhow::Result<()> {
    anyhow::ensure!(
        args.heartbeat_interval_ms > 0,
        "--heartbeat-interval-ms must be above 0"
    );
    anyhow::ensure!(args.max_missed > 0, "--max-missed must be above 0");
    anyhow::ensure!(
        (1..=64).contains(&args.native_max_engines),
        "--native-max-engines must be 1–64"
    );
    if let Some(dir) = args.db.parent() {
        std::fs::create_dir_all(dir).with_context(|| format!("creating {}", dir.display()))?;
    }
    let store = Arc::new(
        RedbStore::open(&args.db).with_context(|| format!("opening {}", args.db.display()))?,
    );
    let interval = Duration::from_millis(args.heartbeat_interval_ms);
    let settings = Settings {
        default_group: args.rebalance.apply(RebalanceSettings::default())?,
        native_max_engines: args.native_max_engines,
        max_virtual_services: args.max_virtual_services,
        promotion_grace: Duration::from_millis(args.promotion_grace_ms),
        health: HealthSettings {
            interval,
            max_missed: args.max_missed,
            flap_failures: args.flap_failures,
            flap_window: Duration::from_secs(args.flap_window_s),
            flap_hold: Duration::from_secs(args.flap_hold_s),
        },
        ..Settings::default()
    };
    let mut cluster = Cluster::load(settings, store, Instant::now())?;
    let stored = cluster.group(DEFAULT_GROUP)?.record;
    let wanted = args.rebalance.apply(stored.settings)?;
    if wanted != stored.settings {
        info!("the default engine group's settings from the command line replace the stored ones");
        cluster.update_group(DEFAULT_GROUP, wanted, stored.resource_version)?;
    }
    info!(
        version = cluster.snapshot().version,
        engines = cluster.persisted().engines.len(),
        virtual_services = cluster.persisted().services.len(),
        "state loaded"
    );
    let cluster = Arc::new(Mutex::new(cluster));

    let ticker = {
        let cluster = cluster.clone();
        tokio::spawn(async move {
            let mut t = tokio::time::interval(interval);
            t.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
            loop {
                t.tick().await;
                if let Err(e) = lock(&cluster).tick(Instant::now()) {
                    warn!("health tick: {e}");
                }
            }
        })
    };

    let (health_reporter, health_service) = tonic_health::server::health_reporter();
    health_reporter
        .set_serving::<OperatorServer<OperatorService>>()
        .await;
    health_reporter
        .set_serving::<EngineApiServer<EngineService>>()
        .await;
    let reflection = tonic_reflection::server::Builder::configure()
        .register_encoded_file_descriptor_set(lb_api::FILE_DESCRIPTOR_SET)
        .build_v1()?;
    let mut server = tonic::transport::Server::builder();
    if args.insecure {
        warn!(
            "PLAIN-TEXT MODE (--insecure): no TLS, no client certificates, anyone reaching {} can change the load balancer",
            args.listen
        );
    } else {
        let (cert, key) = tls::cert_path(&args.tls_dir, "controller");
        server = server.tls_config(tls::server_config(
            &args.tls_dir.join("ca.pem"),
            &cert,
            &key,
        )?)?;
    }
    let (stop_tx, stop_rx) = tokio::sync::watch::channel(false);
    let operator = OperatorService {
        cluster: cluster.clone(),
        insecure: args.insecure,
        shutdown: stop_rx.clone(),
    };
    let engines = EngineService {
        cluster: cluster.clone(),
        insecure: args.insecure,
        shutdown: stop_rx,
    };
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    info!(listen = %args.listen, "serving");
    let serve = server
        // Bounded requests: nothing the API takes is near this.
        .add_service(OperatorServer::new(operator).max_decoding_message_size(4 << 20))
        .add_service(EngineApiServer::new(engines).max_decoding_message_size(4 << 20))
        .add_service(health_service)
        .add_service(reflection)
        .serve_with_shutdown(args.listen, async move {
            tokio::select! {
                _ = term.recv() => {}
                _ = int.recv() => {}
            }
            info!("stopping: ending engine sessions and event streams");
            let _ = stop_tx.send(true);
        });
    serve.await?;
    ticker.abort();
    info!("stopped");
    Ok(())
}
