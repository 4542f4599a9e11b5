//! `lb-daemon`: runs the XDP steering data plane of one service engine.
//!
//! ```text
//!   main ── load config ── raise fd limit ── load + pin maps ── apply tables
//!        ── proxy: listeners of the virtual services placed here ── attach XDP
//!     ├── task: HTTP (/metrics read at scrape time, /connections from the proxy's table)
//!     ├── tasks: proxy accept loops, connections, UDP sessions, health checks
//!     └── signal loop: SIGHUP → reload (validate, plan, check routes and sockets, apply only the
//!                      diff, roll back on error)
//!                      SIGTERM/SIGINT → exit; the XDP program stays attached and steering
//!                      (pinned link and tables); the next start takes it over atomically
//! ```
//!
//! `lb-daemon --detach` removes the data plane for good (the pinned link and tables).

use std::{
    io::IsTerminal,
    path::{Path, PathBuf},
    process::ExitCode,
    sync::{Arc, atomic::Ordering},
};

use anyhow::{Context, bail};
use clap::Parser;
use lb_daemon::{
    config::{Config, ControllerConfig, Desired, EngineFile, ManagedFile},
    conntable::ConnTable,
    dataplane::{self, Dataplane},
    engine::{Applied as Applied_, Engine},
    failover::{Ends, Failover, FailoverCounters},
    heartbeat::{self, Sampler},
    links::SystemLinks,
    managed::{self, Applied},
    metrics::{self, Metrics},
    mirror::{self, PersistTable},
    owners::{self, ConnTables, OwnerPlan},
    peers::{self, View},
    tables::{Changes, Links, Tables},
};
use tokio::signal::unix::{SignalKind, signal};
use tracing::{error, info, warn};

/// The XDP object built by `cargo xtask build-ebpf` (empty if it was missing at build time).
static EMBEDDED_OBJECT: &[u8] = aya::include_bytes_aligned!(concat!(env!("OUT_DIR"), "/lb-xdp.o"));

#[derive(Parser)]
#[command(version, about = "XDP load balancer service engine daemon")]
struct Args {
    /// Configuration file (TOML).
    #[arg(long, short, default_value = "/etc/lb/lb.toml")]
    config: PathBuf,
    /// XDP object to load instead of the one built into this binary.
    #[arg(long)]
    bpf_object: Option<PathBuf>,
    /// Validate the configuration and exit.
    #[arg(long)]
    check: bool,
    /// With --check: also plan the maps (reads this host's interfaces) and print, in order, the
    /// writes a fresh start would make.
    #[arg(long, requires = "check")]
    show_writes: bool,
    /// Remove the data plane for good and exit: detach the XDP program and delete the pinned link
    /// and state tables under `daemon.pin_dir` (established flows are forgotten). Refused while a
    /// daemon runs on that pin directory. A plain stop (SIGTERM) leaves the program steering.
    #[arg(long, conflicts_with = "check")]
    detach: bool,
    /// Managed mode: also append every heartbeat to this file as a JSON line (the trace
    /// `controller simulate --trace` replays).
    #[arg(long, value_name = "FILE")]
    record_heartbeats: Option<PathBuf>,
}

fn main() -> ExitCode {
    tracing_subscriber::fmt()
        .with_env_filter(
            tracing_subscriber::EnvFilter::try_from_env("LB_LOG").unwrap_or_else(|_| "info".into()),
        )
        .with_writer(std::io::stderr)
        .with_ansi(std::io::stderr().is_terminal())
        .init();
    let args = Args::parse();
    let (config, managed) = match EngineFile::load(&args.config) {
        Ok(EngineFile::Standalone(c)) => (c, None),
        Ok(EngineFile::Managed(m)) => (start_config(&m), Some(m.controller)),
        Err(e) => {
            eprintln!("lb-daemon: {}: {e}", args.config.display());
            return ExitCode::from(2);
        }
    };
    if args.check {
        if args.show_writes {
            match Tables::plan(&config, &SystemLinks) {
                Ok(tables) => {
                    for step in Changes::between(None, &tables).steps() {
                        println!("{step}");
                    }
                }
                Err(e) => {
                    eprintln!("lb-daemon: {}: {e}", args.config.display());
                    return ExitCode::from(2);
                }
            }
        }
        println!("{}: ok", args.config.display());
        return ExitCode::SUCCESS;
    }
    if args.detach {
        return detach(&config.daemon.pin_dir);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(config.daemon.runtime_threads())
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lb-daemon: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args, config, managed)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("lb-daemon: {e:#}");
            ExitCode::FAILURE
        }
    }
}

/// A managed engine starts from the last snapshot it applied (its data plane may still be steering
/// with it), or with nothing to serve.
fn start_config(m: &ManagedFile) -> Config {
    match Applied::load(&m.controller.state_file) {
        Some(a) => match Config::from_parts(m.daemon.clone(), a.desired) {
            Ok(c) => {
                info!(
                    version = a.version,
                    "starting from the last applied snapshot"
                );
                c
            }
            Err(e) => {
                warn!("the saved snapshot no longer validates ({e}); starting empty");
                m.initial()
            }
        },
        None => m.initial(),
    }
}

fn detach(pin_dir: &Path) -> ExitCode {
    match lb_daemon::dataplane::detach_for_good(pin_dir) {
        Ok(removed) => {
            for link in &removed.links {
                println!("removed XDP link {}", link.display());
            }
            for map in &removed.maps {
                println!("removed pinned map {}", pin_dir.join(map).display());
            }
            if removed.links.is_empty() && removed.maps.is_empty() {
                println!("nothing pinned under {}", pin_dir.display());
            }
            ExitCode::SUCCESS
        }
        Err(e) => {
            eprintln!("lb-daemon: --detach: {e}");
            ExitCode::FAILURE
        }
    }
}

fn object(path: Option<&Path>) -> anyhow::Result<Vec<u8>> {
    match path {
        Some(p) => std::fs::read(p).with_context(|| format!("reading XDP object {}", p.display())),
        None if EMBEDDED_OBJECT.is_empty() => {
            bail!(
                "this build embeds no XDP object (it was built before `cargo xtask build-ebpf`): rebuild, or pass --bpf-object"
            )
        }
        None => Ok(EMBEDDED_OBJECT.to_vec()),
    }
}

/// Raises the open-files soft limit towards `want` (capped by the hard limit): every proxied
/// connection holds two descriptors.
fn raise_fd_limit(want: u64) -> anyhow::Result<()> {
    use nix::sys::resource::{Resource, getrlimit, setrlimit};
    let (soft, hard) = getrlimit(Resource::RLIMIT_NOFILE).context("getrlimit")?;
    let target = want.min(hard);
    if target > soft {
        setrlimit(Resource::RLIMIT_NOFILE, target, hard).context("setrlimit")?;
    }
    if target < want {
        warn!(want, hard, "open-files limit capped by the hard limit");
    }
    info!(limit = target.max(soft), "open-files limit");
    Ok(())
}

#[allow(clippy::too_many_lines)]
async fn run(args: &Args, config: Config, managed: Option<ControllerConfig>) -> anyhow::Result<()> {
    raise_fd_limit(config.proxy.max_open_files)?;
    let object = object(args.bpf_object.as_deref())?;
    let dp = Dataplane::load(&object, &config.daemon)?;
    let conns = Arc::new(ConnTable::default());
    let mut engine = Engine::start(dp, config, conns.clone())?;
    let mut speakers = lb_daemon::bgp::Speakers::new(engine.inventory());
    speakers.follow(engine.config()).await;

    let failover_counters = Arc::new(FailoverCounters::default());
    let mut metrics = Metrics::new(
        engine.dataplane().counters.clone(),
        engine.inventory(),
        failover_counters.clone(),
    );
    metrics.register_bgp(speakers.peers());
    let metrics = Arc::new(metrics);
    let (plan_tx, plan_rx) = tokio::sync::watch::channel(None);
    let (view_tx, mut view_rx) = tokio::sync::watch::channel(View::new());
    let (sender_tx, sender_rx) = tokio::sync::watch::channel(None);
    let (incoming_tx, incoming_rx) = tokio::sync::mpsc::channel(1024);
    let (mirror_tx, mirror_rx) = tokio::sync::mpsc::channel(1024);
    let (commands_tx, commands_rx) = tokio::sync::mpsc::channel(64);
    let (owner_plan_tx, owner_plan_rx) = tokio::sync::watch::channel(OwnerPlan::default());
    let inventory = engine.inventory();
    let unserving = Arc::new(move || {
        let inv = inventory
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        inv.services
            .iter()
            .filter(|s| s.pool().usable().next().is_none())
            .map(|s| s.id)
            .collect()
    });
    tokio::spawn(peers::run(
        peers::Channels {
            plan: plan_rx.clone(),
            view: view_tx,
            owners: incoming_tx,
            mirror: mirror_tx,
            sender: sender_tx,
            unserving,
        },
        failover_counters.peers.clone(),
    ));
    let pin_dir = engine.config().daemon.pin_dir.clone();
    match PersistTable::open(&pin_dir) {
        Ok(table) => {
            tokio::spawn(mirror::run(
                mirror::Channels {
                    plan: owner_plan_rx.clone(),
                    sender: sender_rx.clone(),
                    incoming: mirror_rx,
                },
                table,
                failover_counters.mirror.clone(),
            ));
        }
        Err(e) => warn!("persistence mirror off: opening the pinned PERSIST table: {e:#}"),
    }
    if let Some(logs) = engine.dataplane_mut().logs.take() {
        tokio::spawn(dataplane::forward_logs(logs));
    }
    match (
        engine.dataplane_mut().owner_queries.take(),
        ConnTables::open(&pin_dir),
    ) {
        (Some(queries), Ok(tables)) => {
            tokio::spawn(owners::run(
                owners::Channels {
                    plan: owner_plan_rx,
                    sender: sender_rx,
                    incoming: incoming_rx,
                    commands: commands_rx,
                },
                queries,
                tables,
                conns.clone(),
                engine.rings(),
                failover_counters.owners.clone(),
            ));
        }
        (_, Err(e)) => {
            warn!("owner queries off: opening the pinned connection tables: {e:#}");
        }
        (None, _) => warn!("owner queries off: the data plane has no query ring"),
    }
    let mut failover = Failover::new(
        &engine,
        Ends {
            view: view_rx.clone(),
            plan: plan_tx,
            owner_plan: owner_plan_tx,
            commands: commands_tx,
        },
        failover_counters.clone(),
    )
    .await;
    failover.refresh(&mut engine).await;
    let listen = engine.config().daemon.metrics_listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("metrics_listen {listen}"))?;
    let mut server = tokio::spawn(metrics::serve(listener, metrics.clone(), conns.clone()));
    info!(
        interface = %engine.config().daemon.interface,
        engine_id = engine.config().daemon.engine_id,
        virtual_services = engine.config().virtual_services.len(),
        managed = managed.is_some(),
        %listen,
        "ready"
    );

    let (apply_tx, mut apply_rx) = tokio::sync::mpsc::channel::<managed::Apply>(1);
    let status = Arc::new(managed::Status::default());
    if let Some(cfg) = managed.clone() {
        if let Some(a) = Applied::load(&cfg.state_file) {
            status.applied.store(a.version, Ordering::Relaxed);
        }
        let identity = identity(engine.config())?;
        let sampler = Arc::new(
            Sampler::new(
                engine.dataplane().counters.clone(),
                engine.inventory(),
                conns.clone(),
            )
            .with_peers(plan_rx.clone(), view_rx.clone())
            .with_bgp(speakers.peers()),
        );
        let recorder = match &args.record_heartbeats {
            Some(path) => Some(
                heartbeat::Recorder::create(path, &cfg.name)
                    .map_err(|e| anyhow::anyhow!("--record-heartbeats {}: {e}", path.display()))?,
            ),
            None => None,
        };
        let beat: Arc<dyn Fn() -> lb_api::v1::Heartbeat + Send + Sync> = Arc::new(move || {
            let h = sampler.sample();
            if let Some(r) = &recorder {
                r.record(&h);
            }
            h
        });
        tokio::spawn(managed::run(cfg, identity, status.clone(), apply_tx, beat));
    } else {
        drop(apply_tx);
    }

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    loop {
        let deadline = failover.next_deadline();
        tokio::select! {
            changed = view_rx.changed() => {
                if changed.is_ok() {
                    failover.refresh(&mut engine).await;
                }
            }
            () = sleep_until(deadline), if deadline.is_some() => {
                failover.refresh(&mut engine).await;
            }
            Some(a) = apply_rx.recv() => {
                let result = apply_snapshot(&mut engine, &a, managed.as_ref());
                if let Ok(applied) = &result {
                    metrics.applied(applied);
                }
                match &result {
                    Ok(Applied_::Unchanged) => metrics.snapshot("unchanged"),
                    Ok(Applied_::Changed { .. }) => metrics.snapshot("applied"),
                    Err(e) => {
                        error!(version = a.version, "snapshot refused, still running the previous state: {e}");
                        metrics.snapshot("refused");
                    }
                }
                if result.is_ok() {
                    status.applied.store(a.version, Ordering::Relaxed);
                    failover.refresh(&mut engine).await;
                    speakers.follow(engine.config()).await;
                }
                let _ = a.reply.send(result.map(|_| ()));
            }
            _ = hup.recv() => {
                let applied = reload_file(&args.config, &engine)
                    .and_then(|c| engine.apply(c).map_err(anyhow::Error::from));
                match applied {
                    Ok(applied) => {
                        metrics.applied(&applied);
                        failover.refresh(&mut engine).await;
                        speakers.follow(engine.config()).await;
                        info!(?applied, "configuration reloaded");
                        metrics.reload(true);
                    }
                    Err(e) => {
                        error!("reload refused, still running the previous configuration: {e:#}");
                        metrics.reload(false);
                    }
                }
            }
            _ = term.recv() => break,
            _ = int.recv() => break,
            ended = &mut server => {
                bail!("metrics server stopped: {}", match ended {
                    Ok(Ok(())) => "without error".to_string(),
                    Ok(Err(e)) => e.to_string(),
                    Err(e) => e.to_string(),
                });
            }
        }
    }
    speakers.stop().await;
    server.abort();
    info!(
        pin_dir = %engine.config().daemon.pin_dir.display(),
        "stopped; the XDP program stays attached and steering with its pinned tables (`lb-daemon --detach` removes it)"
    );
    Ok(())
}

/// Sleeps until `t` (forever without one).
async fn sleep_until(t: Option<std::time::Instant>) {
    match t {
        Some(t) => tokio::time::sleep_until(t.into()).await,
        None => std::future::pending().await,
    }
}

/// A SIGHUP: the file again. In managed mode only its host settings change; the desired state stays
/// what the controller sent.
fn reload_file(path: &Path, engine: &Engine) -> anyhow::Result<Config> {
    Ok(match EngineFile::load(path)? {
        EngineFile::Standalone(c) => c,
        EngineFile::Managed(m) => Config::from_parts(m.daemon, engine.config().desired())?,
    })
}

/// Applies a controller snapshot through the one apply path, and saves it as the state to start
/// from next time.
fn apply_snapshot(
    engine: &mut Engine,
    a: &managed::Apply,
    cfg: Option<&ControllerConfig>,
) -> Result<Applied_, String> {
    let desired: Desired =
        serde_json::from_str(&a.desired_json).map_err(|e| format!("the snapshot: {e}"))?;
    let config = Config::from_parts(engine.config().daemon.clone(), desired.clone())
        .map_err(|e| e.to_string())?;
    let applied = engine.apply(config).map_err(|e| format!("{e:#}"))?;
    if let Some(cfg) = cfg {
        let saved = Applied {
            version: a.version,
            desired,
        };
        if let Err(e) = saved.save(&cfg.state_file) {
            warn!(path = %cfg.state_file.display(), "saving the applied snapshot: {e}");
        }
    }
    Ok(applied)
}

/// What this engine registers with: its id, and the addresses and MAC of its data interface.
fn identity(config: &Config) -> anyhow::Result<managed::Identity> {
    let iface = &config.daemon.interface;
    let link = SystemLinks.link(iface)?;
    let addresses = nix::ifaddrs::getifaddrs()?
        .filter(|a| a.interface_name == *iface)
        .filter_map(|a| {
            let addr = a.address?;
            if let Some(v4) = addr.as_sockaddr_in() {
                Some(std::net::IpAddr::V4(v4.ip()))
            } else {
                addr.as_sockaddr_in6()
                    .map(|v6| std::net::IpAddr::V6(v6.ip()))
            }
        })
        .collect();
    Ok(managed::Identity {
        engine_id: config.daemon.engine_id,
        addresses,
        mac: lb_daemon::config::MacAddr(link.mac).to_string(),
    })
}
