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
    sync::{Arc, RwLock},
};

use anyhow::{Context, bail};
use clap::Parser;
use lb_daemon::{
    config::Config,
    conntable::ConnTable,
    dataplane::Dataplane,
    links::SystemLinks,
    metrics::{self, Inventory, Metrics},
    proxy::Proxy,
    tables::{Changes, Tables},
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
    /// Remove the data plane for good and exit: detach the XDP program and delete the pinned link
    /// and state tables under `daemon.pin_dir` (established flows are forgotten). Refused while a
    /// daemon runs on that pin directory. A plain stop (SIGTERM) leaves the program steering.
    #[arg(long, conflicts_with = "check")]
    detach: bool,
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
    let config = match Config::load(&args.config) {
        Ok(c) => c,
        Err(e) => {
            eprintln!("lb-daemon: {}: {e}", args.config.display());
            return ExitCode::from(2);
        }
    };
    if args.check {
        println!("{}: ok", args.config.display());
        return ExitCode::SUCCESS;
    }
    if args.detach {
        return detach(&config.daemon.pin_dir);
    }
    let runtime = match tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
    {
        Ok(r) => r,
        Err(e) => {
            eprintln!("lb-daemon: starting the runtime: {e}");
            return ExitCode::FAILURE;
        }
    };
    match runtime.block_on(run(&args, config)) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            error!("{e:#}");
            eprintln!("lb-daemon: {e:#}");
            ExitCode::FAILURE
        }
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

async fn run(args: &Args, config: Config) -> anyhow::Result<()> {
    raise_fd_limit(config.proxy.max_open_files)?;
    let object = object(args.bpf_object.as_deref())?;
    let mut dp = Dataplane::load(&object, &config.daemon)?;
    let mut tables = Tables::plan(&config, &SystemLinks)?;
    dp.apply(&Changes::between(None, &tables))
        .context("filling the maps")?;
    // Listeners first: flows the data plane passes up must find them.
    let conns = Arc::new(ConnTable::default());
    let mut proxy = Proxy::new(conns.clone());
    proxy.apply(&config)?;
    dp.attach(&config.daemon.interface, config.daemon.xdp_mode)?;

    let inventory = Arc::new(RwLock::new(Inventory::of(&config, &proxy)));
    let metrics = Arc::new(Metrics::new(dp.counters.clone(), inventory.clone()));
    let listen = config.daemon.metrics_listen;
    let listener = tokio::net::TcpListener::bind(listen)
        .await
        .with_context(|| format!("metrics_listen {listen}"))?;
    let mut server = tokio::spawn(metrics::serve(listener, metrics.clone(), conns));
    info!(
        interface = %config.daemon.interface,
        engine_id = config.daemon.engine_id,
        virtual_services = config.virtual_services.len(),
        %listen,
        "ready"
    );

    let mut hup = signal(SignalKind::hangup())?;
    let mut term = signal(SignalKind::terminate())?;
    let mut int = signal(SignalKind::interrupt())?;
    let mut current = config;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                match reload(&args.config, &current, &tables, &mut dp, &mut proxy) {
                    Ok((config, new_tables)) => {
                        *inventory.write().unwrap_or_else(std::sync::PoisonError::into_inner) = Inventory::of(&config, &proxy);
                        current = config;
                        tables = new_tables;
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
    server.abort();
    info!(
        pin_dir = %current.daemon.pin_dir.display(),
        "stopped; the XDP program stays attached and steering with its pinned tables (`lb-daemon --detach` removes it)"
    );
    Ok(())
}

/// Loads and applies the configuration again. Nothing is applied unless the whole new
/// configuration is valid, plannable, its backends routable and its new sockets open; if writing
/// the maps fails midway, the previous tables and proxy configuration are put back.
fn reload(
    path: &Path,
    current: &Config,
    tables: &Tables,
    dp: &mut Dataplane,
    proxy: &mut Proxy,
) -> anyhow::Result<(Config, Tables)> {
    let config = Config::load(path)?;
    let (old, new) = (&current.daemon, &config.daemon);
    let restart_only = [
        ("interface", old.interface != new.interface),
        ("xdp_mode", old.xdp_mode != new.xdp_mode),
        ("pin_dir", old.pin_dir != new.pin_dir),
        ("metrics_listen", old.metrics_listen != new.metrics_listen),
        (
            "max_virtual_services",
            old.max_virtual_services != new.max_virtual_services,
        ),
        (
            "conn_table_size",
            old.conn_table_size != new.conn_table_size,
        ),
        (
            "persist_table_size",
            old.persist_table_size != new.persist_table_size,
        ),
    ];
    if let Some((field, _)) = restart_only.iter().find(|(_, changed)| *changed) {
        bail!("daemon.{field} changed: it takes effect only at a restart");
    }
    let new_tables = Tables::plan(&config, &SystemLinks)?;
    proxy.apply(&config)?;
    let changes = Changes::between(Some(tables), &new_tables);
    if let Err(e) = dp.apply(&changes) {
        warn!("applying the new tables failed ({e}); restoring the previous ones");
        dp.apply(&Changes::between(Some(&new_tables), tables))
            .context("restoring the previous tables")?;
        proxy
            .apply(current)
            .context("restoring the previous proxy configuration")?;
        return Err(e).context("applying the new tables");
    }
    info!(
        ring_slots = changes.ring_set.len(),
        engines = changes.engines_enable.len()
            + changes.engines_disable.len()
            + changes.engines_remove.len(),
        vips = changes.vips_set.len() + changes.vips_remove.len(),
        "configuration reloaded"
    );
    Ok((config, new_tables))
}
