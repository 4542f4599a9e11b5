//! The standard steering topology: clients and engines on one segment, one virtual service
//! `VIP:port/tcp` whose primary is the first engine, `lb-daemon` on every engine.
//!
//! Addresses: client `i` is `10.77.0.(2+i)`, engine id `k` is `10.77.0.(10+k)` with MAC
//! `02:00:0a:4d:00:(10+k)`; the VIP defaults to `10.78.0.10:80`.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result, ensure};

use crate::client::{self, Load, LoadResult};
use crate::daemon::{Config, Daemon, DaemonSection, EngineEntry, Member, PinDir, VirtualService};
use crate::engine::{ClientHost, EngineHost, Role, setup_client, setup_engine};
use crate::lab::Lab;

/// An engine of the topology.
#[derive(Clone, Debug)]
pub struct EngineSpec {
    /// Namespace role and nginx answer (`se1`).
    pub name: String,
    /// Engine id (1..=200).
    pub id: u8,
}

impl EngineSpec {
    pub fn new(name: &str, id: u8) -> Self {
        Self {
            name: name.to_owned(),
            id,
        }
    }
}

/// Topology parameters.
#[derive(Clone, Debug)]
pub struct Options {
    pub lab_prefix: String,
    pub vip: Ipv4Addr,
    pub port: u16,
    /// The first is the primary.
    pub engines: Vec<EngineSpec>,
    /// Virtual-service members (engine id, weight) at start.
    pub members: Vec<Member>,
    pub clients: usize,
    /// `daemon.xdp_mode`.
    pub xdp_mode: String,
    pub daemon_bin: PathBuf,
    pub xdp_object: PathBuf,
    /// Start `lb-daemon` on every engine (false: lab and nginx only).
    pub daemons: bool,
}

impl Default for Options {
    fn default() -> Self {
        Self {
            lab_prefix: "lbt".to_owned(),
            vip: Ipv4Addr::new(10, 78, 0, 10),
            port: 80,
            engines: vec![
                EngineSpec::new("se1", 1),
                EngineSpec::new("se2", 2),
                EngineSpec::new("se3", 3),
            ],
            members: vec![
                Member { id: 1, weight: 1 },
                Member { id: 2, weight: 1 },
                Member { id: 3, weight: 2 },
            ],
            clients: 1,
            xdp_mode: "native".to_owned(),
            daemon_bin: crate::daemon_bin(),
            xdp_object: crate::xdp_object(),
            daemons: true,
        }
    }
}

/// How [`Steering::stop_daemon`] stops a daemon.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Stop {
    /// SIGTERM: a restart or an upgrade.
    Term,
    /// SIGKILL: a crash.
    Kill,
}

/// The running topology. Drop stops the daemons (SIGTERM), then nginx, then deletes the lab.
pub struct Steering {
    // Drop order = declaration order: daemons, engines (nginx), clients, lab.
    daemons: BTreeMap<u8, Daemon>,
    pub engines: Vec<EngineHost>,
    pub clients: Vec<ClientHost>,
    members: Vec<Member>,
    opts: Options,
    pub lab: Lab,
}

impl std::fmt::Debug for Steering {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Steering")
            .field("lab", &self.lab)
            .field("members", &self.members)
            .finish_non_exhaustive()
    }
}

/// Lab address of engine `id`.
pub fn engine_cidr(id: u8) -> String {
    format!("10.77.0.{}/24", 10 + u16::from(id))
}

impl Steering {
    /// Builds the lab (`XDP_PASS` on the bridge ports from the testkit object), the clients, the
    /// engines with nginx, and (with `opts.daemons`) starts `lb-daemon` on every engine.
    pub fn build(opts: &Options) -> Result<Self> {
        ensure!(!opts.engines.is_empty(), "need at least one engine");
        ensure!(
            opts.engines.iter().all(|e| (1..=200).contains(&e.id)),
            "engine ids must be 1..=200"
        );
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
        let mut steering = Self {
            daemons: BTreeMap::new(),
            engines: Vec::new(),
            clients,
            members: opts.members.clone(),
            opts: opts.clone(),
            lab,
        };
        for (i, spec) in opts.engines.iter().enumerate() {
            let role = if i == 0 {
                Role::Primary
            } else {
                Role::Secondary
            };
            steering.add_engine_host(spec, role)?;
        }
        if opts.daemons {
            for spec in &opts.engines {
                steering.start_daemon(spec.id)?;
            }
        }
        Ok(steering)
    }

    fn add_engine_host(&mut self, spec: &EngineSpec, role: Role) -> Result<()> {
        let host = setup_engine(
            &self.lab,
            &spec.name,
            spec.id,
            &engine_cidr(spec.id),
            self.opts.vip,
            self.opts.port,
            role,
        )?;
        self.engines.push(host);
        Ok(())
    }

    /// Adds a secondary engine host (namespace, nginx, and its daemon when the topology runs
    /// daemons). It gets no traffic until [`Steering::set_members`] names it.
    pub fn add_engine(&mut self, spec: &EngineSpec) -> Result<()> {
        ensure!(
            self.engine(spec.id).is_none(),
            "engine {} exists already",
            spec.id
        );
        self.add_engine_host(spec, Role::Secondary)?;
        if self.opts.daemons {
            self.start_daemon(spec.id)?;
        }
        Ok(())
    }

    pub fn engine(&self, id: u8) -> Option<&EngineHost> {
        self.engines.iter().find(|e| e.id == id)
    }

    /// The primary engine (the first).
    pub fn primary(&self) -> &EngineHost {
        &self.engines[0]
    }

    pub fn daemon(&self, id: u8) -> Option<&Daemon> {
        self.daemons.get(&id)
    }

    pub fn vip(&self) -> SocketAddr {
        SocketAddr::from((self.opts.vip, self.opts.port))
    }

    pub fn members(&self) -> &[Member] {
        &self.members
    }

    /// The daemon config of engine `engine_id`: every known engine (with its MAC unless it is
    /// this host), one virtual service with the current members.
    pub fn config_for(&self, engine_id: u8, pin_dir: &std::path::Path) -> Config {
        let engines = self
            .engines
            .iter()
            .map(|e| EngineEntry {
                id: e.id,
                mac: (e.id != engine_id).then(|| e.iface.mac_string()),
                mode: (e.id != engine_id).then(|| "l2".to_owned()),
                ..EngineEntry::default()
            })
            .collect();
        let mut daemon = DaemonSection::lab("eth0", engine_id, pin_dir);
        daemon.xdp_mode.clone_from(&self.opts.xdp_mode);
        Config {
            bgp: None,
            peers: None,
            daemon,
            engines,
            virtual_services: vec![VirtualService {
                bgp: None,
                id: 0,
                name: "web".to_owned(),
                vip: self.opts.vip.to_string(),
                port: self.opts.port,
                protocol: "tcp".to_owned(),
                primary: self.primary().id,
                persistence_timeout_s: 0,
                engines: self.members.clone(),
                pool: None,
                max_connections: None,
                draining: None,
            }],
            proxy: None,
            pools: Vec::new(),
        }
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

    /// Sets the virtual service's members, rewrites every daemon's config and reloads them
    /// (SIGHUP), the primary last (secondaries learn new engines before traffic can arrive).
    pub fn set_members(&mut self, members: Vec<Member>) -> Result<()> {
        self.members = members;
        let primary = self.primary().id;
        let mut ids: Vec<u8> = self
            .daemons
            .keys()
            .copied()
            .filter(|&i| i != primary)
            .collect();
        if self.daemons.contains_key(&primary) {
            ids.push(primary);
        }
        for id in ids {
            let pins = self.daemons[&id].pins().clone();
            let config = self.config_for(id, pins.path());
            self.daemons
                .get_mut(&id)
                .context("daemon vanished")?
                .reload(config)
                .with_context(|| format!("reload daemon of engine {id}"))?;
        }
        Ok(())
    }

    /// Stops engine `id`'s daemon (SIGTERM: checks it exited cleanly; SIGKILL: a crash), checks
    /// that its XDP program is still attached (the data plane outlives the daemon), and returns its
    /// pin directory for [`Steering::start_daemon_on`].
    pub fn stop_daemon(&mut self, id: u8, how: Stop) -> Result<Arc<PinDir>> {
        let old = self
            .daemons
            .remove(&id)
            .context("no daemon on that engine")?;
        let pins = old.pins().clone();
        match how {
            Stop::Term => {
                let status = old.stop(Duration::from_secs(10));
                ensure!(
                    status.is_some_and(|s| s.success()),
                    "daemon of engine {id} did not exit cleanly on SIGTERM ({status:?}); log:\n{}",
                    old.log_tail(20)
                );
            }
            Stop::Kill => old.proc().kill(),
        }
        drop(old);
        let host = self.engine(id).context("no such engine")?;
        let link = self.lab.ip(&host.ns, &["link", "show", "eth0"])?;
        ensure!(
            link.contains(" xdp"),
            "XDP detached when the daemon stopped ({how:?}):\n{link}"
        );
        Ok(pins)
    }

    /// Starts engine `id`'s daemon on `pins` with the XDP object `object` (the topology's own when
    /// `None`) and the virtual service's members set to `members`.
    pub fn start_daemon_on(
        &mut self,
        id: u8,
        pins: Arc<PinDir>,
        members: Vec<Member>,
        object: Option<&Path>,
    ) -> Result<()> {
        self.members = members;
        let config = self.config_for(id, pins.path());
        let host = self.engine(id).context("no such engine")?;
        let daemon = Daemon::start(
            &self.lab,
            &host.ns,
            config,
            pins,
            &self.opts.daemon_bin,
            object.unwrap_or(&self.opts.xdp_object),
        )?;
        self.daemons.insert(id, daemon);
        Ok(())
    }

    /// [`Steering::stop_daemon`] then [`Steering::start_daemon_on`] with the same object.
    pub fn restart_daemon(&mut self, id: u8, how: Stop, members: Vec<Member>) -> Result<()> {
        let pins = self.stop_daemon(id, how)?;
        self.start_daemon_on(id, pins, members, None)
    }

    /// Expected share of new flows per engine name (percent), from the member weights.
    pub fn expected_percent(&self) -> BTreeMap<String, f64> {
        let total: u32 = self.members.iter().map(|m| m.weight).sum();
        self.members
            .iter()
            .filter_map(|m| {
                let name = self.engine(m.id)?.name.clone();
                Some((name, 100.0 * f64::from(m.weight) / f64::from(total.max(1))))
            })
            .collect()
    }

    /// `connections` HTTP connections from client 0 to the VIP.
    pub fn load(&self, connections: usize) -> Result<LoadResult> {
        let client = self.clients.first().context("no client")?;
        client::http_load(&client.ns, &Load::new(self.vip(), connections))
    }

    /// The primary daemon's `/metrics` text.
    pub fn primary_metrics(&self) -> Result<String> {
        self.daemons
            .get(&self.primary().id)
            .context("no daemon on the primary")?
            .metrics()
    }
}
