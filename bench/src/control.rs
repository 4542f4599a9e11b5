//! The control plane: how long a change takes to reach every engine, and what the controller costs.
//!
//! The real controller (release build) runs on loopback with mutual TLS. Engines are simulated: gRPC
//! clients that register, hold a session, parse every snapshot as the daemon does
//! (`lb_model::Desired` from JSON) and ACK it, and heartbeat every second. Measured:
//! - the time from a `CreateVirtualService` call to every engine acking the version it made, at 1,
//!   100 and 1000 virtual services on 4 engines; and from an update to every ACK, at 1000 (p50/p99
//!   over `--updates` updates: `apply_ms_p50`, `apply_ms_p99`);
//! - the controller's CPU (its own `utime + stime`) and resident memory with 1000 virtual services
//!   and 64 engines heartbeating, over `--idle-s` seconds.

use std::{
    collections::HashMap,
    fs,
    net::{SocketAddr, TcpListener},
    path::PathBuf,
    process::{Child, Command, Stdio},
    sync::{Arc, Mutex},
    time::{Duration, Instant},
};

use anyhow::{Context, Result, bail, ensure};
use lb_api::v1::{
    self as pb, controller_message, engine_api_client::EngineApiClient, engine_message,
    operator_client::OperatorClient,
};
use serde::Serialize;
use tokio::sync::{Notify, mpsc};
use tokio_stream::wrappers::ReceiverStream;
use tonic::transport::Channel;

use crate::machine;

#[derive(clap::Args)]
pub struct Options {
    /// Engines acking changes in the latency phase.
    #[arg(long, default_value_t = 4)]
    engines: u32,
    /// Engines heartbeating in the cost phase.
    #[arg(long, default_value_t = 64)]
    sim_engines: u32,
    /// Updates measured at 1000 virtual services.
    #[arg(long, default_value_t = 50)]
    updates: usize,
    /// Seconds the controller's cost is measured over.
    #[arg(long, default_value_t = 30)]
    idle_s: u64,
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

/// What every simulated engine has acked.
#[derive(Default)]
struct Acks {
    versions: Mutex<HashMap<String, u64>>,
    changed: Notify,
}

impl Acks {
    fn min_over(&self, names: &[String]) -> u64 {
        let v = self
            .versions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        names
            .iter()
            .map(|n| v.get(n).copied().unwrap_or(0))
            .min()
            .unwrap_or(0)
    }

    fn max(&self) -> u64 {
        let v = self
            .versions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        v.values().copied().max().unwrap_or(0)
    }

    /// Waits until every engine of `names` acked a version above `above`.
    async fn wait_above(&self, names: &[String], above: u64) -> Result<()> {
        let deadline = Instant::now() + Duration::from_mins(1);
        loop {
            let notified = self.changed.notified();
            if self.min_over(names) > above {
                return Ok(());
            }
            ensure!(
                Instant::now() < deadline,
                "engines did not ACK version {} within 60 s",
                above + 1
            );
            let _ = tokio::time::timeout(Duration::from_millis(200), notified).await;
        }
    }
}

struct ControllerProc {
    child: Child,
}

impl Drop for ControllerProc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl ControllerProc {
    /// (user + system CPU seconds, resident MiB) of the process.
    #[allow(clippy::cast_precision_loss)]
    fn usage(&self) -> Result<(f64, f64)> {
        let pid = self.child.id();
        let stat = fs::read_to_string(format!("/proc/{pid}/stat"))?;
        let after = stat.rsplit_once(')').context("stat format")?.1;
        let f: Vec<&str> = after.split_whitespace().collect();
        let ticks: u64 = f[11].parse::<u64>()? + f[12].parse::<u64>()?;
        let hz = 100.0;
        let status = fs::read_to_string(format!("/proc/{pid}/status"))?;
        let rss_kib: f64 = status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|l| l.split_whitespace().next()?.parse().ok())
            .context("VmRSS")?;
        Ok((ticks as f64 / hz, rss_kib / 1024.0))
    }
}

fn free_port() -> Result<u16> {
    Ok(TcpListener::bind("127.0.0.1:0")?.local_addr()?.port())
}

async fn channel(addr: SocketAddr, pki: &std::path::Path, who: &str) -> Result<Channel> {
    let tls = lb_api::tls::client_config(pki, who).map_err(anyhow::Error::msg)?;
    Ok(Channel::from_shared(format!("https://{addr}"))?
        .tls_config(tls)?
        .connect()
        .await?)
}

/// One simulated engine: registers as `sim<i>` (engine id `i`), ACKs every snapshot after parsing
/// it, heartbeats every second.
async fn engine(addr: SocketAddr, pki: PathBuf, i: u32, acks: Arc<Acks>) -> Result<()> {
    let name = format!("sim{i}");
    let mut c = EngineApiClient::new(channel(addr, &pki, &format!("engine-{name}")).await?)
        .max_decoding_message_size(256 << 20);
    c.register(pb::RegisterRequest {
        name: name.clone(),
        engine_id: i,
        addresses: vec![format!("10.1.{}.{}", i / 250, i % 250 + 1)],
        mac: format!("02:00:00:00:{:02x}:{:02x}", i / 256, i % 256),
        tags: HashMap::new(),
        capacity: 2,
        group: String::new(),
    })
    .await?;
    let (tx, rx) = mpsc::channel(16);
    let msg = |m| pb::EngineMessage { msg: Some(m) };
    tx.send(msg(engine_message::Msg::Hello(pb::Hello {
        name: name.clone(),
        applied_version: 0,
    })))
    .await?;
    let mut inbound = c.session(ReceiverStream::new(rx)).await?.into_inner();
    let beat = tx.clone();
    tokio::spawn(async move {
        let mut t = tokio::time::interval(Duration::from_secs(1));
        loop {
            t.tick().await;
            let h = pb::Heartbeat {
                cpu_pct: 10.0,
                ..Default::default()
            };
            if beat
                .send(msg(engine_message::Msg::Heartbeat(h)))
                .await
                .is_err()
            {
                break;
            }
        }
    });
    while let Some(m) = inbound.message().await? {
        let Some(controller_message::Msg::Snapshot(s)) = m.msg else {
            continue;
        };
        let _: lb_model::Desired = serde_json::from_str(&s.desired_json)?;
        tx.send(msg(engine_message::Msg::Ack(pb::Ack {
            version: s.version,
        })))
        .await?;
        acks.versions
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .insert(name.clone(), s.version);
        acks.changed.notify_waiters();
    }
    Ok(())
}

fn vs(i: usize) -> pb::VirtualService {
    pb::VirtualService {
        name: format!("vs{i}"),
        vip: format!("10.200.{}.{}", i / 250, i % 250 + 1),
        port: 80,
        protocol: "tcp".into(),
        pool: "web".into(),
        ..Default::default()
    }
}

#[derive(Serialize)]
struct Report {
    date: String,
    machine: String,
    engines: u32,
    /// Create to every ACK, per scale (virtual services existing after the create).
    create_ms: Vec<(usize, f64)>,
    apply_ms_p50: f64,
    apply_ms_p99: f64,
    updates: usize,
    sim_engines: u32,
    controller_cpu_pct_64_engines: f64,
    controller_rss_mib: f64,
    idle_s: u64,
}

fn percentile(sorted: &[f64], p: f64) -> f64 {
    #[allow(
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss,
        clippy::cast_precision_loss
    )]
    let i = ((sorted.len() as f64 - 1.0) * p).round() as usize;
    sorted[i.min(sorted.len() - 1)]
}

pub fn run(opts: &Options) -> Result<()> {
    ensure!(
        opts.engines >= 1 && opts.sim_engines >= opts.engines,
        "--sim-engines must be at least --engines"
    );
    ensure!(opts.sim_engines <= 255, "engine ids are 0..=255");
    let rt = tokio::runtime::Runtime::new()?;
    rt.block_on(measure(opts))
}

#[allow(clippy::too_many_lines, clippy::cast_precision_loss)]
async fn measure(opts: &Options) -> Result<()> {
    let dir = tempfile::tempdir()?;
    let pki = dir.path().join("pki");
    let names: Vec<String> = (1..=opts.sim_engines).map(|i| format!("sim{i}")).collect();
    controller::tls::init_pki(&pki, &["127.0.0.1".into()], &names, &["admin".into()])?;
    let addr: SocketAddr = format!("127.0.0.1:{}", free_port()?).parse()?;
    let bin = lb_tests::controller_bin();
    ensure!(
        bin.exists(),
        "{} missing (cargo build --release -p controller)",
        bin.display()
    );
    let child = Command::new(&bin)
        .args([
            "--listen",
            &addr.to_string(),
            "--max-virtual-services",
            "1024",
            "--tls-dir",
        ])
        .arg(&pki)
        .arg("--db")
        .arg(dir.path().join("c.redb"))
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()?;
    let ctl = ControllerProc { child };
    let deadline = Instant::now() + Duration::from_secs(10);
    let mut op = loop {
        if let Ok(ch) = channel(addr, &pki, "operator-admin").await {
            break OperatorClient::new(ch).max_decoding_message_size(256 << 20);
        }
        if Instant::now() > deadline {
            bail!("the controller did not start");
        }
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    let acks = Arc::new(Acks::default());
    // Set when the measurement is over: the sessions' ends are the controller stopping, not news.
    let done = Arc::new(std::sync::atomic::AtomicBool::new(false));
    let start_engines = |from: u32, to: u32| {
        for i in from..=to {
            let acks = acks.clone();
            let pki = pki.clone();
            let done = done.clone();
            tokio::spawn(async move {
                if let Err(e) = engine(addr, pki, i, acks).await
                    && !done.load(std::sync::atomic::Ordering::Relaxed)
                {
                    eprintln!("sim{i}: {e:#}");
                }
            });
        }
    };
    start_engines(1, opts.engines);
    let latency: Vec<String> = names[..opts.engines as usize].to_vec();
    acks.wait_above(&latency, 0).await?;
    op.create_pool(pb::Pool {
        name: "web".into(),
        backends: (1..=4)
            .map(|i| pb::Backend {
                address: format!("10.0.1.{i}"),
                port: 80,
                ..Default::default()
            })
            .collect(),
        ..Default::default()
    })
    .await?;
    acks.wait_above(&latency, 1).await?;

    let mut create_ms = Vec::new();
    let mut existing = 0usize;
    for scale in [1usize, 100, 1000] {
        while existing < scale {
            let v0 = acks.max();
            let t = Instant::now();
            op.create_virtual_service(vs(existing)).await?;
            acks.wait_above(&latency, v0).await?;
            existing += 1;
            if existing == scale {
                let ms = t.elapsed().as_secs_f64() * 1000.0;
                println!(
                    "create #{scale} → all {} engines acked in {ms:.1} ms",
                    opts.engines
                );
                create_ms.push((scale, ms));
            }
        }
    }
    let mut updates = Vec::new();
    for u in 0..opts.updates {
        let name = format!("vs{}", u % 1000);
        let mut cur = op
            .get_virtual_service(pb::Name { name })
            .await?
            .into_inner();
        cur.max_connections = Some(50_000 + u32::try_from(u).unwrap_or(0));
        let v0 = acks.max();
        let t = Instant::now();
        op.update_virtual_service(cur).await?;
        acks.wait_above(&latency, v0).await?;
        updates.push(t.elapsed().as_secs_f64() * 1000.0);
    }
    updates.sort_by(f64::total_cmp);
    let (p50, p99) = (percentile(&updates, 0.5), percentile(&updates, 0.99));
    println!(
        "update at 1000 virtual services → all acked: p50 {p50:.1} ms, p99 {p99:.1} ms ({} updates)",
        updates.len()
    );

    start_engines(opts.engines + 1, opts.sim_engines);
    let version = acks.max();
    acks.wait_above(&names, version - 1).await?;
    // Settle: the registrations' changes are done.
    tokio::time::sleep(Duration::from_secs(3)).await;
    let (cpu0, _) = ctl.usage()?;
    let t = Instant::now();
    tokio::time::sleep(Duration::from_secs(opts.idle_s)).await;
    let (cpu1, rss) = ctl.usage()?;
    let cpu_pct = 100.0 * (cpu1 - cpu0) / t.elapsed().as_secs_f64();
    println!(
        "controller with 1000 virtual services and {} engines heartbeating: {cpu_pct:.2} % of one core, {rss:.1} MiB resident",
        opts.sim_engines
    );
    let report = Report {
        date: machine::cmd_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine: machine::cpu_model(),
        engines: opts.engines,
        create_ms,
        apply_ms_p50: p50,
        apply_ms_p99: p99,
        updates: updates.len(),
        sim_engines: opts.sim_engines,
        controller_cpu_pct_64_engines: cpu_pct,
        controller_rss_mib: rss,
        idle_s: opts.idle_s,
    };
    let out = opts
        .out_dir
        .clone()
        .unwrap_or_else(|| lb_tests::workspace_root().join("bench/results"));
    fs::create_dir_all(&out)?;
    fs::write(
        out.join("control.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    println!("wrote {}", out.join("control.json").display());
    done.store(true, std::sync::atomic::Ordering::Relaxed);
    drop(ctl);
    Ok(())
}
