//! The proxy topology run by a controller: the namespaces of [`crate::proxy_lab`] (client, backends
//! with nginx, four engines) without standalone daemons, a controller namespace `ctl` on the segment
//! (`10.77.0.250`, gRPC on 7400, mutual TLS with a PKI made by `lbctl certs init`), and `lb-daemon`
//! in managed mode on every engine. Everything is driven the way an operator would: `lbctl`.

use std::collections::BTreeMap;
use std::net::Ipv4Addr;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use serde_json::Value;
use tempfile::TempDir;

use crate::cgroup::CpuQuota;
use crate::daemon::{ControllerSection, Daemon, DaemonSection, PinDir};
use crate::lab::{Ns, Output, Proc};
use crate::netns::in_ns;
use crate::proxy_lab::{Options, ProxyLab};
use crate::steering::EngineSpec;

pub const CONTROLLER_ADDR: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 250);
pub const CONTROLLER_PORT: u16 = 7400;

/// What `lbctl` answered.
#[derive(Debug)]
pub struct Lbctl {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

impl Lbctl {
    pub fn json(&self) -> Result<Value> {
        ensure!(
            self.code == 0,
            "lbctl failed ({}): {}",
            self.code,
            self.stderr
        );
        serde_json::from_str(&self.stdout)
            .with_context(|| format!("lbctl output {:?}", self.stdout))
    }
}

pub struct ControllerLab {
    // Drop order: daemons, their pins (kept across restarts of a daemon), controller, the
    // directories, the topology.
    daemons: BTreeMap<u8, Daemon>,
    pins: BTreeMap<u8, Arc<PinDir>>,
    controller: Option<Proc>,
    pub ctl: Ns,
    state: TempDir,
    pub pki: PathBuf,
    pub heartbeat_ms: u64,
    pub max_missed: u32,
    /// More arguments of the controller (e.g. the rebalance loop's).
    pub controller_args: Vec<String>,
    /// Per engine id, a cgroup with a CPU quota its daemon runs in.
    quotas: BTreeMap<u8, CpuQuota>,
    /// Per engine id, the engine group its daemon registers in (absent: the default group), from
    /// its next start.
    pub engine_groups: BTreeMap<u8, String>,
    pub lab: ProxyLab,
}

impl ControllerLab {
    /// Builds the topology, the PKI, starts the controller and a managed daemon on every engine,
    /// and waits until every engine is connected.
    pub fn build(prefix: &str) -> Result<Self> {
        Self::build_with(prefix, &[], None)
    }

    /// [`ControllerLab::build`] with more controller arguments and, with `cpu_quota`, each daemon
    /// in a cgroup of its own limited to that many CPUs (its heartbeats then report its CPU
    /// against the quota).
    pub fn build_with(
        prefix: &str,
        controller_args: &[&str],
        cpu_quota: Option<f64>,
    ) -> Result<Self> {
        let lab = ProxyLab::build(&Options {
            lab_prefix: prefix.to_owned(),
            engines: (1..=4)
                .map(|i| EngineSpec::new(&format!("se{i}"), i))
                .collect(),
            backends: 4,
            daemons: false,
            ..Options::default()
        })?;
        let ctl = lab.lab.add_ns("ctl")?;
        lab.lab
            .attach(&ctl, "eth0", &format!("{CONTROLLER_ADDR}/24"))?;
        let state = tempfile::Builder::new().prefix("lb-ctl-").tempdir()?;
        let pki = state.path().join("pki");
        let names: Vec<String> = lab.engines.iter().map(|e| e.name.clone()).collect();
        make_pki(&pki, CONTROLLER_ADDR, &names)?;
        let mut this = Self {
            daemons: BTreeMap::new(),
            pins: BTreeMap::new(),
            controller: None,
            ctl,
            state,
            pki,
            heartbeat_ms: 1000,
            max_missed: 3,
            controller_args: controller_args.iter().map(|&a| a.to_owned()).collect(),
            quotas: BTreeMap::new(),
            engine_groups: BTreeMap::new(),
            lab,
        };
        if let Some(cpus) = cpu_quota {
            for e in &this.lab.engines {
                let q = CpuQuota::new(&format!("{}-{}", this.lab.lab.base(), e.name), cpus)?;
                this.quotas.insert(e.id, q);
            }
        }
        this.start_controller()?;
        let ids: Vec<u8> = this.lab.engines.iter().map(|e| e.id).collect();
        for id in ids {
            this.start_daemon(id)?;
        }
        this.wait(Duration::from_secs(20), "every engine connected", |l| {
            let engines = l.lbctl(&["engines"])?.json()?;
            let arr = engines.as_array().context("an array")?;
            Ok(arr.len() == l.lab.engines.len()
                && arr.iter().all(|e| e["connected"] == Value::Bool(true)))
        })?;
        Ok(this)
    }

    pub fn db(&self) -> PathBuf {
        self.state.path().join("controller.redb")
    }

    pub fn start_controller(&mut self) -> Result<()> {
        ensure!(self.controller.is_none(), "the controller runs already");
        let bin = crate::controller_bin();
        ensure!(
            bin.exists(),
            "{} not built (cargo build -p controller)",
            bin.display()
        );
        let listen = format!("0.0.0.0:{CONTROLLER_PORT}");
        let db = self.db();
        let heartbeat_ms = self.heartbeat_ms.to_string();
        let max_missed = self.max_missed.to_string();
        let mut argv: Vec<&str> = vec![
            bin.to_str().context("path")?,
            "--listen",
            &listen,
            "--db",
            db.to_str().context("path")?,
            "--tls-dir",
            self.pki.to_str().context("path")?,
            "--heartbeat-interval-ms",
            &heartbeat_ms,
            "--max-missed",
            &max_missed,
            "--max-virtual-services",
            "4",
        ];
        argv.extend(self.controller_args.iter().map(String::as_str));
        let p = self.lab.lab.spawn(
            &self.ctl,
            &argv,
            &Output::File(self.state.path().join("controller.log")),
        )?;
        self.controller = Some(p);
        self.wait(Duration::from_secs(10), "the controller answers", |l| {
            Ok(l.lbctl(&["engines"])?.code == 0)
        })?;
        Ok(())
    }

    /// SIGTERM to the controller; true when it exited cleanly.
    pub fn stop_controller(&mut self) -> bool {
        self.controller
            .take()
            .and_then(|p| p.stop(Duration::from_secs(10)))
            .is_some_and(|s| s.success())
    }

    pub fn controller_log(&self) -> String {
        std::fs::read_to_string(self.state.path().join("controller.log")).unwrap_or_default()
    }

    /// Starts (again) engine `id`'s daemon, on the pins (and state) it had if it ran before: a
    /// restart on the same host.
    pub fn start_daemon(&mut self, id: u8) -> Result<()> {
        let engine = self
            .lab
            .engines
            .iter()
            .find(|e| e.id == id)
            .context("no such engine")?;
        let pins = match self.pins.get(&id) {
            Some(p) => p.clone(),
            None => Arc::new(PinDir::new(&format!(
                "{}-{}",
                self.lab.lab.base(),
                engine.name
            ))?),
        };
        self.pins.insert(id, pins.clone());
        let mut daemon = DaemonSection::lab("eth0", id, pins.path());
        daemon.manage_vip_addresses = true;
        let controller = ControllerSection {
            address: format!("https://{CONTROLLER_ADDR}:{CONTROLLER_PORT}"),
            name: engine.name.clone(),
            tls_dir: self.pki.clone(),
            state_file: self
                .state
                .path()
                .join(format!("{}-desired.json", engine.name)),
            heartbeat_interval_ms: u32::try_from(self.heartbeat_ms).unwrap_or(1000),
            tags: BTreeMap::new(),
            group: self.engine_groups.get(&id).cloned(),
        };
        let d = Daemon::start_managed(
            &self.lab.lab,
            &engine.ns.clone(),
            daemon,
            &controller,
            pins,
            &crate::daemon_bin(),
            &crate::xdp_object(),
            &self
                .quotas
                .get(&id)
                .map(CpuQuota::wrapper)
                .unwrap_or_default(),
        )?;
        self.daemons.insert(id, d);
        Ok(())
    }

    /// Waits until each engine of `names` has heard its peers' daemons answer for a while.
    pub fn wait_all_hear(&self, names: &[String]) -> Result<()> {
        self.wait(
            Duration::from_secs(10),
            "every engine hears every other",
            |l| {
                Ok(l.lab
                    .engines
                    .iter()
                    .filter(|e| names.contains(&e.name))
                    .all(|e| {
                        l.daemon(e.id)
                            .and_then(|d| d.metrics().ok())
                            .is_some_and(|m| {
                                crate::daemon::metric_sum(&m, "lb_peer_probe_replies_total", &[])
                                    > 10.0
                            })
                    }))
            },
        )
        .map(|_| ())
    }

    /// Prints, for a failure's report, what each engine counted that tells where packets and
    /// flows went (the non-zero series), the end of each engine's log and of the controller's.
    pub fn print_engines_report(&self) {
        const KEYS: [&str; 8] = [
            "xdp_packets",
            "owner_",
            "flows_",
            "drain",
            "refused",
            "promotions",
            "demotions",
            "garp",
        ];
        for e in &self.lab.engines {
            let Some(d) = self.daemon(e.id) else { continue };
            let metrics = d.metrics().unwrap_or_default();
            let lines: Vec<&str> = metrics
                .lines()
                .filter(|s| !s.starts_with('#') && !s.ends_with(" 0"))
                .filter(|s| KEYS.iter().any(|k| s.contains(k)))
                .collect();
            println!(
                "--- {} ---\n{}\n{}",
                e.name,
                lines.join("\n"),
                d.log_tail(40)
            );
        }
        println!("--- controller ---\n{}", tail(&self.controller_log(), 40));
    }

    /// The namespace of engine `id`.
    pub fn engine_ns(&self, id: u8) -> Result<Ns> {
        Ok(self
            .lab
            .engines
            .iter()
            .find(|e| e.id == id)
            .context("no such engine")?
            .ns
            .clone())
    }

    /// Which engine's proxy holds each client address (from every running daemon's
    /// `/connections`).
    pub fn connection_owners(&self) -> Result<BTreeMap<std::net::SocketAddr, u8>> {
        let mut out = BTreeMap::new();
        for (id, d) in &self.daemons {
            let (status, body) = d.connections("")?;
            ensure!(status == 200, "/connections: {status} {body}");
            let v: Value = serde_json::from_str(&body)?;
            for c in v.as_array().context("/connections is a list")? {
                if let Some(a) = c["client"].as_str().and_then(|a| a.parse().ok()) {
                    out.insert(a, *id);
                }
            }
        }
        Ok(out)
    }

    /// The controller's record of virtual service `vs`: (its primary, its epoch).
    pub fn recorded_primary(&self, vs: &str) -> Result<(Option<String>, u64)> {
        let v = self.lbctl(&["vs", "get", vs])?.json()?;
        Ok((
            placement(&v).first().cloned(),
            v["epoch"].as_u64().unwrap_or(0),
        ))
    }

    /// Waits until every engine reports its CPU against its cgroup's quota (a lab built with one).
    pub fn wait_cgroup_cpu(&self) -> Result<()> {
        self.wait(
            Duration::from_secs(10),
            "engines report their cgroup CPU",
            |l| {
                let engines = l.lbctl(&["engines"])?.json()?;
                Ok(engines
                    .as_array()
                    .is_some_and(|a| a.iter().all(|e| e["cpu_source"] == "cgroup")))
            },
        )?;
        Ok(())
    }

    /// Waits until no engine placed for `vs` is pending a scale-out and every placed engine has
    /// applied the snapshot that gives each of them a weight (the controller shows an engine
    /// serving as soon as it decides so; the primary's ring has it once the next snapshot is
    /// applied); returns the placement, the primary first.
    pub fn wait_serving(&self, vs: &str, timeout: Duration) -> Result<Vec<String>> {
        let mut placed = Vec::new();
        self.wait(
            timeout,
            &format!("every engine placed for {vs} serves it"),
            |l| {
                let v = l.lbctl(&["vs", "get", vs])?.json()?;
                placed = placement(&v);
                let decided = v["placement"]
                    .as_array()
                    .is_some_and(|a| a.iter().all(|p| p["phase"] != "pending"));
                Ok(decided && placed.iter().all(|e| l.applied_weights(e, vs, &placed)))
            },
        )?;
        Ok(placed)
    }

    /// Whether the snapshot engine `name` applied last gives each of `engines` a weight above 0
    /// in `vs`.
    fn applied_weights(&self, name: &str, vs: &str, engines: &[String]) -> bool {
        let Some(applied) = self.applied(name) else {
            return false;
        };
        let Some(s) = applied
            .desired
            .virtual_services
            .iter()
            .find(|s| s.name == vs)
        else {
            return false;
        };
        engines.iter().all(|e| {
            self.lab
                .engines
                .iter()
                .find(|x| x.name == *e)
                .is_some_and(|x| {
                    s.engines
                        .iter()
                        .any(|m| m.id == u32::from(x.id) && m.weight > 0)
                })
        })
    }

    /// The snapshot engine `name` applied last, as it saved it.
    pub fn applied(&self, name: &str) -> Option<lb_daemon::managed::Applied> {
        lb_daemon::managed::Applied::load(&self.state.path().join(format!("{name}-desired.json")))
    }

    /// The engines that have the VIP on their `eth0` (they answer ARP for it): the daemons place it
    /// there where they are primary, and on `lo` elsewhere.
    pub fn vip_holders(&self) -> Result<Vec<String>> {
        self.holders_of(self.lab.vip().into())
    }

    /// The engines that have `addr` on their `eth0` (either family).
    pub fn holders_of(&self, addr: std::net::IpAddr) -> Result<Vec<String>> {
        self.holders_on(addr, "eth0")
    }

    /// The engines that have `addr` on device `dev`.
    pub fn holders_on(&self, addr: std::net::IpAddr, dev: &str) -> Result<Vec<String>> {
        let mut holders = Vec::new();
        for e in &self.lab.engines {
            let Ok(out) = self.lab.lab.ip(&e.ns, &["-j", "addr", "show", "dev", dev]) else {
                continue;
            };
            if out.contains(&format!("\"{addr}\"")) {
                holders.push(e.name.clone());
            }
        }
        Ok(holders)
    }

    /// The MAC of engine `id`'s `eth0`.
    pub fn engine_mac(&self, id: u8) -> Result<String> {
        let out = self
            .lab
            .lab
            .ip(&self.engine_ns(id)?, &["-j", "link", "show", "eth0"])?;
        let v: Value = serde_json::from_str(&out)?;
        Ok(v[0]["address"].as_str().context("no address")?.to_owned())
    }

    /// The first client's neighbour entry for `addr` on its `eth0`: (MAC, state).
    pub fn client_neighbour(&self, addr: std::net::IpAddr) -> Option<(String, String)> {
        let out = self
            .lab
            .lab
            .ip(
                self.lab.client(0),
                &["-j", "neigh", "show", &addr.to_string(), "dev", "eth0"],
            )
            .ok()?;
        let v: Value = serde_json::from_str(&out).ok()?;
        let e = v.as_array()?.first()?;
        Some((e["lladdr"].as_str()?.to_owned(), e["state"].to_string()))
    }

    /// The `--backend=ADDR` arguments of `lbctl pool create` naming every backend's nginx.
    pub fn backend_args(&self) -> Vec<String> {
        self.lab
            .backends
            .iter()
            .map(|b| format!("--backend={}", b.http()))
            .collect()
    }

    /// `lbctl pool create web` with every backend.
    pub fn create_web_pool(&self) -> Result<()> {
        let backends = self.backend_args();
        let mut args = vec!["pool", "create", "web"];
        args.extend(backends.iter().map(String::as_str));
        let out = self.lbctl(&args)?;
        ensure!(out.code == 0, "lbctl pool create: exit {}", out.code);
        Ok(())
    }

    /// A lab with pool `web` and service `web` on `min_engines` engines (`more`: further
    /// `lbctl vs create` arguments), every placed engine hearing its peers; with the placement.
    pub fn with_web_service(
        prefix: &str,
        min_engines: u32,
        more: &[&str],
    ) -> Result<(Self, Vec<String>)> {
        let l = Self::build(prefix)?;
        l.create_web_pool()?;
        let placement = placement(&l.create_web_service_with(min_engines, more)?);
        l.wait_all_hear(&placement)?;
        Ok((l, placement))
    }

    /// `lbctl vs create web` on the lab's VIP, port 80, pool `web` (made by the caller), on
    /// `min_engines` engines; waits until every engine applied the snapshot and the primary it was
    /// placed on (alone) holds the VIP. Returns the service as lbctl shows it.
    pub fn create_web_service(&self, min_engines: u32) -> Result<Value> {
        self.create_web_service_with(min_engines, &[])
    }

    /// [`ControllerLab::create_web_service`] with more `lbctl vs create` arguments.
    pub fn create_web_service_with(&self, min_engines: u32, more: &[&str]) -> Result<Value> {
        let vip = self.lab.vip().to_string();
        let min = min_engines.to_string();
        let mut args = vec![
            "vs",
            "create",
            "web",
            "--vip",
            &vip,
            "--port",
            "80",
            "--pool",
            "web",
            "--min-engines",
            &min,
        ];
        args.extend_from_slice(more);
        let vs = self.lbctl(&args)?.json()?;
        let placement = placement(&vs);
        ensure!(
            placement.len() == min_engines as usize,
            "placed on {placement:?}"
        );
        let ids: Vec<u8> = self.lab.engines.iter().map(|e| e.id).collect();
        self.wait(
            Duration::from_secs(20),
            "every engine applied the snapshot",
            |l| Ok(l.applied_everywhere(&ids)?.is_some()),
        )?;
        let primary = placement[0].clone();
        self.wait(Duration::from_secs(10), "the primary holds the VIP", |l| {
            Ok(l.vip_holders()? == [primary.clone()])
        })?;
        Ok(vs)
    }

    /// The engine id of engine `name`.
    pub fn id_of(&self, name: &str) -> Option<u8> {
        self.lab
            .engines
            .iter()
            .find(|e| e.name == name)
            .map(|e| e.id)
    }

    /// `lbctl ARGS` as operator `admin`, human output.
    pub fn lbctl_text(&self, args: &[&str]) -> Result<String> {
        lbctl_text_in(&self.ctl, &self.pki, args)
    }

    pub fn daemon(&self, id: u8) -> Option<&Daemon> {
        self.daemons.get(&id)
    }

    /// [`crate::daemon::metric_sum`] of `name` with `labels`, per running managed daemon.
    pub fn metric_per_engine(
        &self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<BTreeMap<u8, f64>> {
        self.daemons
            .iter()
            .map(|(id, d)| Ok((*id, crate::daemon::metric_sum(&d.metrics()?, name, labels))))
            .collect()
    }

    /// SIGKILL to engine `id`'s daemon (its data plane stays).
    pub fn kill_daemon(&mut self, id: u8) -> Result<()> {
        let d = self.daemons.remove(&id).context("no daemon there")?;
        d.proc().kill();
        Ok(())
    }

    /// The controller's events of kinds starting with `kind` (`lbctl events --kind`, JSON lines).
    pub fn events(&self, kind: &str) -> Result<Vec<Value>> {
        let out = self.lbctl(&["events", "--kind", kind])?;
        ensure!(out.code == 0, "lbctl events: {}", out.stderr);
        out.stdout
            .lines()
            .filter(|s| !s.trim().is_empty())
            .map(|s| serde_json::from_str(s).context("an event"))
            .collect()
    }

    /// `lbctl --json ARGS` in the controller's namespace, as operator `admin`.
    pub fn lbctl(&self, args: &[&str]) -> Result<Lbctl> {
        self.lbctl_as(&self.pki, "admin", args)
    }

    /// `lbctl` with the PKI directory `pki` and operator certificate `operator`.
    pub fn lbctl_as(&self, pki: &Path, operator: &str, args: &[&str]) -> Result<Lbctl> {
        lbctl_in(&self.ctl, pki, operator, args)
    }

    /// Polls `f` every 100 ms until it says yes; an error after `timeout`, naming `what`.
    pub fn wait(
        &self,
        timeout: Duration,
        what: &str,
        f: impl FnMut(&Self) -> Result<bool>,
    ) -> Result<Duration> {
        poll(self, timeout, what, f, |l| {
            format!("controller log:\n{}", tail(&l.controller_log(), 30))
        })
    }

    /// Waits until every engine in `ids` runs the same version above `after`; returns it (the one
    /// seen: the controller may make another at any time, e.g. a primary's weight).
    pub fn wait_applied_after(&self, ids: &[u8], after: u64, what: &str) -> Result<u64> {
        let mut seen = 0;
        self.wait(Duration::from_secs(10), what, |l| {
            seen = l.applied_everywhere(ids)?.unwrap_or(0);
            Ok(seen > after)
        })?;
        Ok(seen)
    }

    /// Every engine in `ids` runs the controller's current version (> 0), and none reports an
    /// error.
    pub fn applied_everywhere(&self, ids: &[u8]) -> Result<Option<u64>> {
        let engines = self.lbctl(&["engines"])?.json()?;
        let mut versions = Vec::new();
        for e in engines.as_array().context("an array")? {
            let id = u8::try_from(e["id"].as_u64().context("id")?)?;
            if ids.contains(&id) {
                if e["last_error"].as_str().is_some_and(|s| !s.is_empty()) {
                    return Ok(None);
                }
                let applied = e["applied_version"].as_u64().context("version")?;
                if Some(applied) != e["desired_version"].as_u64() {
                    return Ok(None);
                }
                versions.push(applied);
            }
        }
        Ok((versions.len() == ids.len()
            && versions.windows(2).all(|w| w[0] == w[1])
            && versions.first().is_some_and(|v| *v > 0))
        .then(|| versions[0]))
    }
}

/// Polls `f(this)` every 100 ms until it says yes; after `timeout` an error naming `what`, the
/// last error `f` returned, and `logs(this)`.
pub fn poll<T>(
    this: &T,
    timeout: Duration,
    what: &str,
    mut f: impl FnMut(&T) -> Result<bool>,
    logs: impl Fn(&T) -> String,
) -> Result<Duration> {
    let start = Instant::now();
    let mut last = String::new();
    loop {
        match f(this) {
            Ok(true) => return Ok(start.elapsed()),
            Ok(false) => last.clear(),
            Err(e) => last = format!("{e:#}"),
        }
        if start.elapsed() > timeout {
            bail!("{what}: not within {timeout:?} ({last}); {}", logs(this));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// A development PKI in `dir` (`lbctl certs init`): the controller at `controller` and on
/// loopback, operator `admin`, and `engines`.
pub fn make_pki(dir: &Path, controller: Ipv4Addr, engines: &[String]) -> Result<()> {
    let mut args: Vec<String> = vec![
        "certs".into(),
        "init".into(),
        "--dir".into(),
        dir.display().to_string(),
        "--controller-name".into(),
        controller.to_string(),
        "--controller-name".into(),
        "127.0.0.1".into(),
        "--operator".into(),
        "admin".into(),
    ];
    for e in engines {
        args.extend(["--engine".into(), e.clone()]);
    }
    let out = Command::new(crate::lbctl_bin()).args(&args).output()?;
    ensure!(
        out.status.success(),
        "lbctl certs init: {}",
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(())
}

/// `lbctl GLOBAL ARGS` in namespace `ctl` against the controller there on loopback, with the PKI
/// directory `pki`.
fn run_lbctl(ctl: &Ns, pki: &Path, global: &[&str], args: &[&str]) -> Result<std::process::Output> {
    let bin = crate::lbctl_bin();
    in_ns(ctl.name(), || {
        Ok(Command::new(&bin)
            .args([
                "--controller",
                &format!("https://127.0.0.1:{CONTROLLER_PORT}"),
                "--tls-dir",
                pki.to_str().context("path")?,
            ])
            .args(global)
            .args(args)
            .output()?)
    })
}

/// `lbctl --json ARGS` in namespace `ctl` against the controller there on loopback, with the PKI
/// directory `pki` and operator certificate `operator`.
pub fn lbctl_in(ctl: &Ns, pki: &Path, operator: &str, args: &[&str]) -> Result<Lbctl> {
    let out = run_lbctl(ctl, pki, &["--operator", operator, "--json"], args)?;
    Ok(Lbctl {
        code: out.status.code().unwrap_or(-1),
        stdout: String::from_utf8_lossy(&out.stdout).into_owned(),
        stderr: String::from_utf8_lossy(&out.stderr).into_owned(),
    })
}

/// `lbctl ARGS` as operator `admin` in namespace `ctl`, human output; an error unless it succeeds.
pub fn lbctl_text_in(ctl: &Ns, pki: &Path, args: &[&str]) -> Result<String> {
    let out = run_lbctl(ctl, pki, &[], args)?;
    ensure!(
        out.status.success(),
        "lbctl {}: {}",
        args.join(" "),
        String::from_utf8_lossy(&out.stderr)
    );
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// The engines of a virtual service (`lbctl vs get --json`), the primary first; engines draining
/// it are left out.
pub fn placement(vs: &Value) -> Vec<String> {
    vs["placement"]
        .as_array()
        .map(|a| {
            a.iter()
                .filter(|p| p["phase"] != "draining")
                .filter_map(|p| p["engine"].as_str().map(str::to_owned))
                .collect()
        })
        .unwrap_or_default()
}

pub fn tail(text: &str, n: usize) -> String {
    let lines: Vec<&str> = text.lines().collect();
    lines[lines.len().saturating_sub(n)..].join("\n")
}
