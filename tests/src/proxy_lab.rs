//! The proxy topology: clients, engines whose `lb-daemon` terminates the virtual services (no
//! nginx on the VIP), and backend hosts with nginx (and optionally `iperf3 -s`) on the same segment.
//!
//! ```text
//!   client1 10.77.0.2 ──► VIP 10.78.0.10 (ARP: se1) ── se1 XDP ──► se1/se2/se3 proxies
//!                                                          (10.77.0.11-13, source NAT)
//!                                                            ──► be1/be2/be3 10.77.0.21-23
//! ```
//!
//! Virtual services: `web` (id 0) `VIP:80/tcp` → pool `web` (every backend's nginx on port 80,
//! answering the backend's name); with [`Options::iperf`] also `iperf` (id 1) `VIP:5201/tcp` and
//! `iperf-udp` (id 2) `VIP:5201/udp` → pool `iperf` (`be1:5201` only: an iperf3 test's control
//! connection, data connections and UDP stream must all reach the same server).
//!
//! The configuration every daemon gets is built from the public fields ([`ProxyLab::services`],
//! [`ProxyLab::pools`], [`ProxyLab::proxy`], [`ProxyLab::engine_states`]): change them and call
//! [`ProxyLab::reload_all`].

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};

use crate::client::{self, Load, LoadResult};
use crate::daemon::{
    Backend, Config, Daemon, DaemonSection, EngineEntry, HealthCheck, Member, Pool, ProxySection,
    VirtualService, metric_sum,
};
use crate::engine::{ClientHost, Role, setup_client, setup_engine_ns};
use crate::lab::{Iface, Lab, Ns, Output, Proc};
use crate::netns::in_ns;
use crate::nginx::{AccessLog, Nginx, NginxOptions};
use crate::steering::{EngineSpec, engine_cidr};

/// The web service's port on the VIP and on the backends.
pub const HTTP_PORT: u16 = 80;
/// iperf3's port on the VIP and on the backends.
pub const IPERF_PORT: u16 = 5201;
/// Id of the `web` virtual service.
pub const WEB_VS: u32 = 0;

/// Lab address of backend `i` (0-based): `10.77.0.(21+i)`.
pub fn backend_addr(i: usize) -> Ipv4Addr {
    let i = u8::try_from(i).expect("backend index");
    Ipv4Addr::new(10, 77, 0, 21 + i)
}

/// Lab address of engine `id`.
pub fn engine_addr(id: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 77, 0, 10 + id)
}

/// A backend host: nginx on `addr:80` answering `name` (and logging each request's peer), and
/// optionally `iperf3 -s -p 5201`.
pub struct BackendHost {
    /// Also the namespace role and nginx's answer (`be1`, ...).
    pub name: String,
    pub ns: Ns,
    pub iface: Iface,
    pub addr: Ipv4Addr,
    nginx: Option<Nginx>,
    iperf: Option<Proc>,
    access_log: AccessLog,
}

impl std::fmt::Debug for BackendHost {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BackendHost")
            .field("name", &self.name)
            .field("addr", &self.addr)
            .finish_non_exhaustive()
    }
}

impl BackendHost {
    /// `addr:80`.
    pub fn http(&self) -> SocketAddr {
        SocketAddr::from((self.addr, HTTP_PORT))
    }

    /// The current nginx (also after [`BackendHost::kill_nginx`], for its logs), `None` before the
    /// first start.
    pub fn nginx(&self) -> Option<&Nginx> {
        self.nginx.as_ref()
    }

    /// SIGKILLs nginx (its sockets close at once, like a crashed server).
    pub fn kill_nginx(&self) {
        if let Some(n) = &self.nginx {
            n.proc().kill();
        }
    }

    /// Starts a new nginx (replacing a killed one; its log starts empty).
    pub fn start_nginx(&mut self, lab: &Lab) -> Result<()> {
        if let Some(old) = self.nginx.take() {
            old.proc().kill();
        }
        self.nginx = Some(Nginx::start_with(
            lab,
            &self.ns,
            &self.name,
            &[self.http()],
            &NginxOptions {
                access_log: self.access_log,
            },
        )?);
        Ok(())
    }

    /// The iperf3 server, if started.
    pub fn iperf(&self) -> Option<&Proc> {
        self.iperf.as_ref()
    }
}

/// Starts `iperf3 -s -p PORT` in `ns` and waits (up to 10 s) until it listens.
pub fn start_iperf_server(lab: &Lab, ns: &Ns, port: u16) -> Result<Proc> {
    let p = port.to_string();
    let proc = lab.spawn(ns, &["iperf3", "-s", "-p", &p], &Output::Null)?;
    let deadline = Instant::now() + Duration::from_secs(10);
    let suffix = format!(":{port}");
    loop {
        if let Some(status) = proc.try_wait()? {
            bail!("iperf3 -s in {ns} exited at once ({status})");
        }
        let listening = lab.exec(ns, &["ss", "-Hltn"])?;
        if listening.lines().any(|l| {
            l.split_whitespace()
                .nth(3)
                .is_some_and(|a| a.ends_with(&suffix))
        }) {
            return Ok(proc);
        }
        ensure!(
            Instant::now() < deadline,
            "iperf3 -s in {ns} not listening after 10 s"
        );
        std::thread::sleep(Duration::from_millis(50));
    }
}

/// An engine host (no server of its own on the VIP: the daemon's proxy listens there).
#[derive(Clone, Debug)]
pub struct ProxyEngine {
    pub name: String,
    pub id: u8,
    pub ns: Ns,
    pub iface: Iface,
    pub role: Role,
}

/// Topology parameters.
#[derive(Clone, Debug)]
pub struct Options {
    pub lab_prefix: String,
    pub vip: Ipv4Addr,
    /// The first is the primary.
    pub engines: Vec<EngineSpec>,
    /// Members of every virtual service (engine id, weight).
    pub members: Vec<Member>,
    pub clients: usize,
    /// Backend hosts (1..=8).
    pub backends: usize,
    /// iperf3 servers on the backends and the `iperf` / `iperf-udp` virtual services.
    pub iperf: bool,
    pub access_log: AccessLog,
    /// Algorithm of pool `web`.
    pub algorithm: String,
    pub health_check: Option<HealthCheck>,
    pub proxy: ProxySection,
    pub xdp_mode: String,
    pub conn_table_size: u32,
    pub daemon_bin: PathBuf,
    pub xdp_object: PathBuf,
    /// Start `lb-daemon` on every engine.
    pub daemons: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            lab_prefix: "lbtp".to_owned(),
            vip: Ipv4Addr::new(10, 78, 0, 10),
            engines: vec![
                EngineSpec::new("se1", 1),
                EngineSpec::new("se2", 2),
                EngineSpec::new("se3", 3),
            ],
            members: vec![
                Member { id: 1, weight: 1 },
                Member { id: 2, weight: 1 },
                Member { id: 3, weight: 1 },
            ],
            clients: 1,
            backends: 3,
            iperf: false,
            access_log: AccessLog::Peer,
            algorithm: "round_robin".to_owned(),
            health_check: None,
            proxy: ProxySection::default(),
            xdp_mode: "native".to_owned(),
            conn_table_size: 65536,
            daemon_bin: crate::daemon_bin(),
            xdp_object: crate::xdp_object(),
            daemons: true,
        }
    }
}

/// Which daemon [`ProxyLab::reload_all`] reloads first.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum ReloadOrder {
    /// Secondaries, then the primary (the primary steers to new engines only once they know
    /// their services).
    PrimaryLast,
    /// The primary first (it stops steering new flows to a draining engine before that engine
    /// closes its listener).
    PrimaryFirst,
}

/// The running proxy topology. Drop stops the daemons, then the servers, then deletes the lab.
pub struct ProxyLab {
    // Drop order = declaration order.
    daemons: BTreeMap<u8, Daemon>,
    pub backends: Vec<BackendHost>,
    pub engines: Vec<ProxyEngine>,
    pub clients: Vec<ClientHost>,
    /// The virtual services every daemon gets.
    pub services: Vec<VirtualService>,
    pub pools: Vec<Pool>,
    pub proxy: ProxySection,
    /// `engines[].state` by engine id (absent: active).
    pub engine_states: BTreeMap<u8, String>,
    opts: Options,
    pub lab: Lab,
}

impl std::fmt::Debug for ProxyLab {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("ProxyLab")
            .field("lab", &self.lab)
            .finish_non_exhaustive()
    }
}

impl ProxyLab {
    /// Builds the lab (`XDP_PASS` on the bridge ports), clients, backends (nginx, iperf3),
    /// engines, and starts `lb-daemon` on every engine (with `opts.daemons`).
    pub fn build(opts: &Options) -> Result<Self> {
        ensure!(!opts.engines.is_empty(), "need at least one engine");
        ensure!(
            opts.engines.iter().all(|e| (1..=9).contains(&e.id)),
            "engine ids must be 1..=9 (addresses 10.77.0.11-19)"
        );
        ensure!((1..=8).contains(&opts.backends), "1 to 8 backends");
        let lab = Lab::new(&opts.lab_prefix)?;
        lab.enable_xdp_pass(&crate::testkit_object())?;
        let mut clients = Vec::new();
        for i in 0..opts.clients {
            let n = u8::try_from(i).context("too many clients")?;
            ensure!(n < 8, "at most 8 clients");
            clients.push(setup_client(
                &lab,
                &format!("client{}", n + 1),
                &format!("10.77.0.{}/24", 2 + n),
            )?);
        }
        let mut backends = Vec::new();
        for i in 0..opts.backends {
            let name = format!("be{}", i + 1);
            let addr = backend_addr(i);
            let ns = lab.add_ns(&name)?;
            let iface = lab.attach(&ns, "eth0", &format!("{addr}/24"))?;
            let iperf = if opts.iperf {
                Some(start_iperf_server(&lab, &ns, IPERF_PORT)?)
            } else {
                None
            };
            let mut host = BackendHost {
                name,
                ns,
                iface,
                addr,
                nginx: None,
                iperf,
                access_log: opts.access_log,
            };
            host.start_nginx(&lab)?;
            backends.push(host);
        }
        let mut engines = Vec::new();
        for (i, spec) in opts.engines.iter().enumerate() {
            let role = if i == 0 {
                Role::Primary
            } else {
                Role::Secondary
            };
            let (ns, iface) =
                setup_engine_ns(&lab, &spec.name, &engine_cidr(spec.id), opts.vip, role)?;
            // The proxy opens a connection per client: short-connection load needs the same
            // port settings as a client (netns-lab notes, TIME_WAIT).
            lab.sysctl(&ns, "net.ipv4.tcp_tw_reuse", "1")?;
            lab.sysctl(&ns, "net.ipv4.ip_local_port_range", "1024 65000")?;
            engines.push(ProxyEngine {
                name: spec.name.clone(),
                id: spec.id,
                ns,
                iface,
                role,
            });
        }
        let (services, pools) = standard_services(opts, &backends);
        let mut this = Self {
            daemons: BTreeMap::new(),
            backends,
            engines,
            clients,
            services,
            pools,
            proxy: opts.proxy.clone(),
            engine_states: BTreeMap::new(),
            opts: opts.clone(),
            lab,
        };
        if opts.daemons {
            let ids: Vec<u8> = this.engines.iter().map(|e| e.id).collect();
            for id in ids {
                this.start_daemon(id)?;
            }
        }
        Ok(this)
    }

    pub fn options(&self) -> &Options {
        &self.opts
    }

    pub fn engine(&self, id: u8) -> Option<&ProxyEngine> {
        self.engines.iter().find(|e| e.id == id)
    }

    /// The primary engine (the first).
    pub fn primary(&self) -> &ProxyEngine {
        &self.engines[0]
    }

    pub fn daemon(&self, id: u8) -> Option<&Daemon> {
        self.daemons.get(&id)
    }

    pub fn daemon_mut(&mut self, id: u8) -> Option<&mut Daemon> {
        self.daemons.get_mut(&id)
    }

    /// Engine ids with a running daemon.
    pub fn daemon_ids(&self) -> Vec<u8> {
        self.daemons.keys().copied().collect()
    }

    /// `VIP:80`.
    pub fn vip_http(&self) -> SocketAddr {
        SocketAddr::from((self.opts.vip, HTTP_PORT))
    }

    pub fn vip(&self) -> Ipv4Addr {
        self.opts.vip
    }

    /// The client namespace `i`.
    pub fn client(&self, i: usize) -> &Ns {
        &self.clients[i].ns
    }

    /// The daemon configuration of engine `engine_id`, from the public fields.
    pub fn config_for(&self, engine_id: u8, pin_dir: &std::path::Path) -> Config {
        let engines = self
            .engines
            .iter()
            .map(|e| EngineEntry {
                id: e.id,
                mac: (e.id != engine_id).then(|| e.iface.mac_string()),
                mode: (e.id != engine_id).then(|| "l2".to_owned()),
                state: self.engine_states.get(&e.id).cloned(),
                ..EngineEntry::default()
            })
            .collect();
        let mut daemon = DaemonSection::lab("eth0", engine_id, pin_dir);
        daemon.xdp_mode.clone_from(&self.opts.xdp_mode);
        daemon.conn_table_size = self.opts.conn_table_size;
        // Room for services added after the start (ids 0..=7).
        daemon.max_virtual_services = 8;
        Config {
            bgp: None,
            peers: None,
            daemon,
            proxy: Some(self.proxy.clone()),
            engines,
            virtual_services: self.services.clone(),
            pools: self.pools.clone(),
        }
    }

    /// The configuration engine `id`'s daemon would get now (with its pin directory).
    pub fn current_config(&self, id: u8) -> Result<Config> {
        let d = self.daemons.get(&id).context("no daemon on that engine")?;
        Ok(self.config_for(id, d.pins().path()))
    }

    fn start_daemon(&mut self, id: u8) -> Result<()> {
        let host = self.engine(id).context("no such engine")?;
        let daemon = Daemon::start_fresh(
            &self.lab,
            &host.ns,
            &host.name,
            |pins| self.config_for(id, pins),
            &self.opts.daemon_bin,
            &self.opts.xdp_object,
        )?;
        self.daemons.insert(id, daemon);
        Ok(())
    }

    /// Kills engine `id`'s daemon (SIGKILL: a crash; its data plane keeps steering) and returns its
    /// pin directory for [`ProxyLab::start_daemon_on`].
    pub fn kill_daemon(&mut self, id: u8) -> Result<std::sync::Arc<crate::daemon::PinDir>> {
        let old = self
            .daemons
            .remove(&id)
            .context("no daemon on that engine")?;
        let pins = old.pins().clone();
        old.proc().kill();
        Ok(pins)
    }

    /// Starts engine `id`'s daemon on an existing pin directory (a restart).
    pub fn start_daemon_on(
        &mut self,
        id: u8,
        pins: std::sync::Arc<crate::daemon::PinDir>,
    ) -> Result<()> {
        let host = self.engine(id).context("no such engine")?;
        let config = self.config_for(id, pins.path());
        let daemon = Daemon::start(
            &self.lab,
            &host.ns,
            config,
            pins,
            &self.opts.daemon_bin,
            &self.opts.xdp_object,
        )?;
        self.daemons.insert(id, daemon);
        Ok(())
    }

    /// Rewrites every daemon's configuration from the public fields and reloads them (SIGHUP) in
    /// `order`; each reload must be applied.
    pub fn reload_all(&mut self, order: ReloadOrder) -> Result<()> {
        let primary = self.primary().id;
        let mut ids: Vec<u8> = self
            .daemons
            .keys()
            .copied()
            .filter(|&i| i != primary)
            .collect();
        if self.daemons.contains_key(&primary) {
            match order {
                ReloadOrder::PrimaryFirst => ids.insert(0, primary),
                ReloadOrder::PrimaryLast => ids.push(primary),
            }
        }
        for id in ids {
            let config = self.current_config(id)?;
            self.daemons
                .get_mut(&id)
                .context("daemon vanished")?
                .reload(config)
                .with_context(|| format!("reload daemon of engine {id}"))?;
        }
        Ok(())
    }

    /// `connections` HTTP requests (one per connection) from client 0 to `VIP:80`, counted per
    /// answering backend.
    pub fn load(&self, connections: usize) -> Result<LoadResult> {
        let client = self.clients.first().context("no client")?;
        client::http_load(&client.ns, &Load::new(self.vip_http(), connections))
    }

    /// Every daemon's `/metrics`, by engine id.
    pub fn metrics(&self) -> Result<BTreeMap<u8, String>> {
        self.daemons
            .iter()
            .map(|(id, d)| {
                d.metrics()
                    .with_context(|| format!("metrics of engine {id}"))
                    .map(|m| (*id, m))
            })
            .collect()
    }

    /// [`metric_sum`] of `name` with `labels` on every daemon, by engine id.
    pub fn metric_per_engine(
        &self,
        name: &str,
        labels: &[(&str, &str)],
    ) -> Result<BTreeMap<u8, f64>> {
        Ok(self
            .metrics()?
            .into_iter()
            .map(|(id, text)| (id, metric_sum(&text, name, labels)))
            .collect())
    }

    /// [`metric_sum`] of `name` with `labels` over every daemon.
    pub fn metric_total(&self, name: &str, labels: &[(&str, &str)]) -> Result<f64> {
        Ok(self.metric_per_engine(name, labels)?.values().sum())
    }

    /// Waits (polling every 50 ms, up to `timeout`) until every daemon reports
    /// `lb_backend_up{pool, backend} == up`; returns how long it took.
    pub fn wait_backend(
        &self,
        pool: &str,
        backend: SocketAddr,
        up: bool,
        timeout: Duration,
    ) -> Result<Duration> {
        let want = if up { 1.0 } else { 0.0 };
        let b = backend.to_string();
        let labels = [("pool", pool), ("backend", b.as_str())];
        wait_until(timeout, || {
            let per = self.metric_per_engine("lb_backend_up", &labels)?;
            let all = self.metrics()?;
            // The series must exist (metric_sum gives 0 for a missing one).
            let present = all.values().all(|t| {
                t.lines().any(|l| {
                    l.starts_with("lb_backend_up{")
                        && l.contains(&format!("backend=\"{b}\""))
                        && l.contains(&format!("pool=\"{pool}\""))
                })
            });
            Ok(present && per.values().all(|v| (v - want).abs() < f64::EPSILON))
        })
        .with_context(|| {
            format!(
                "lb_backend_up{{pool=\"{pool}\",backend=\"{b}\"}} did not become {want} on every engine within {timeout:?}: {:?}",
                self.metric_per_engine("lb_backend_up", &labels)
            )
        })
    }

    /// Asks every daemon's `/connections` for the TCP connection `client` → `vip`; returns the
    /// engine that has it and its JSON record. An error if more than one engine claims it.
    pub fn find_connection(
        &self,
        client: SocketAddr,
        vip: SocketAddr,
        protocol: &str,
    ) -> Result<Option<(u8, serde_json::Value)>> {
        let query = format!("client={client}&vip={vip}&protocol={protocol}");
        let mut found = None;
        for (id, d) in &self.daemons {
            let (status, body) = d.connections(&query)?;
            match status {
                200 => {
                    let v: serde_json::Value = serde_json::from_str(&body)
                        .with_context(|| format!("engine {id} /connections?{query}: {body}"))?;
                    ensure!(
                        found.is_none(),
                        "two engines claim {client} → {vip}: {found:?} and {id} {v}"
                    );
                    found = Some((*id, v));
                }
                404 => {}
                _ => bail!("engine {id} /connections?{query}: HTTP {status}: {body}"),
            }
        }
        Ok(found)
    }

    /// Runs `f` inside client `i`'s namespace.
    pub fn in_client<T: Send>(&self, i: usize, f: impl FnOnce() -> Result<T> + Send) -> Result<T> {
        in_ns(self.client(i).name(), f)
    }
}

/// Polls `f` every 50 ms until it returns true (Ok: the time it took) or `timeout` passes (an
/// error carrying `f`'s last error, if any).
pub fn wait_until(timeout: Duration, mut f: impl FnMut() -> Result<bool>) -> Result<Duration> {
    let start = Instant::now();
    loop {
        let last = match f() {
            Ok(true) => return Ok(start.elapsed()),
            Ok(false) => None,
            Err(e) => Some(e),
        };
        if start.elapsed() >= timeout {
            return match last {
                Some(e) => Err(e.context(format!("still failing after {timeout:?}"))),
                None => bail!("condition not met within {timeout:?}"),
            };
        }
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn standard_services(opts: &Options, backends: &[BackendHost]) -> (Vec<VirtualService>, Vec<Pool>) {
    let primary = opts.engines[0].id;
    let vs = |id: u32, name: &str, port: u16, protocol: &str, pool: &str| VirtualService {
        bgp: None,
        id,
        name: name.to_owned(),
        vip: opts.vip.to_string(),
        port,
        protocol: protocol.to_owned(),
        primary,
        persistence_timeout_s: 0,
        engines: opts.members.clone(),
        pool: Some(pool.to_owned()),
        max_connections: None,
        draining: None,
    };
    let mut services = vec![vs(WEB_VS, "web", HTTP_PORT, "tcp", "web")];
    let mut pools = vec![Pool {
        name: "web".to_owned(),
        algorithm: opts.algorithm.clone(),
        backends: backends
            .iter()
            .map(|b| Backend::new(&b.addr.to_string(), HTTP_PORT))
            .collect(),
        health_check: opts.health_check.clone(),
    }];
    if opts.iperf {
        services.push(vs(1, "iperf", IPERF_PORT, "tcp", "iperf"));
        services.push(vs(2, "iperf-udp", IPERF_PORT, "udp", "iperf"));
        pools.push(Pool {
            name: "iperf".to_owned(),
            algorithm: "round_robin".to_owned(),
            backends: vec![Backend::new(&backends[0].addr.to_string(), IPERF_PORT)],
            health_check: None,
        });
    }
    (services, pools)
}
