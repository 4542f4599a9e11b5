//! The tunnel topology: the primary on the client segment steers every flow through IP-in-IP to an
//! engine behind a router.
//!
//! ```text
//!   client 10.77.0.2 ─┐                       ┌─ rtr 10.77.0.1 ══ 10.88.0.1 ── se2 10.88.0.12
//!   se1 10.77.0.11 ───┴── br0 (segment) ──────┘   (forwards)       (VIP on lo, tc decap, nginx)
//!   (primary: VIP on eth0, lb-daemon; engine 2 in tunnel mode via rtr's MAC)
//! ```
//!
//! The kernel here has no `ipip` device, so se2 strips the outer header with the testkit's
//! `tunnel_decap` tc program (loaded by the test with aya, attached on se2's `eth0` ingress). se2
//! answers the client directly (source: the VIP) through the router. All MTUs are 1500: a full-size
//! client segment becomes 1520 bytes once encapsulated.

use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;

use anyhow::{Context, Result};
use aya::{
    Ebpf,
    programs::{SchedClassifier, TcAttachType, tc},
};

use crate::daemon::{Config, Daemon, DaemonSection, EngineEntry, Member, VirtualService};
use crate::engine::{ClientHost, Role, arp_sysctls, setup_client, setup_engine_ns};
use crate::lab::{Lab, Ns, fmt_mac};
use crate::netns::in_ns;
use crate::nginx::Nginx;

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 10);
pub const PORT: u16 = 80;
const PRIMARY: &str = "10.77.0.11";
const ROUTER_FRONT: &str = "10.77.0.1";
const ROUTER_BACK: &str = "10.88.0.1";
pub const TUNNEL_ENGINE: Ipv4Addr = Ipv4Addr::new(10, 88, 0, 12);

/// The running topology. Drop order: daemon, decap program, nginx, then the lab.
pub struct Tunnel {
    pub daemon: Option<Daemon>,
    _decap: Ebpf,
    _nginx: Nginx,
    pub client: ClientHost,
    pub primary: Ns,
    pub router: Ns,
    pub engine: Ns,
    router_mac: [u8; 6],
    pub lab: Lab,
}

impl Tunnel {
    /// Builds the namespaces, the router, the tunnel engine with nginx and decapsulation, and
    /// starts `lb-daemon` on the primary with engine 2's path MTU `mtu` (`None`: the interface's).
    pub fn build(prefix: &str, mtu: Option<u16>) -> Result<Self> {
        let lab = Lab::new(prefix)?;
        lab.enable_xdp_pass(&crate::testkit_object())?;
        let client = setup_client(&lab, "client", "10.77.0.2/24")?;
        let (primary, _) =
            setup_engine_ns(&lab, "se1", &format!("{PRIMARY}/24"), VIP, Role::Primary)?;
        lab.ip(
            &primary,
            &["route", "add", "10.88.0.0/24", "via", ROUTER_FRONT],
        )?;

        let router = lab.add_ns("rtr")?;
        let front = lab.attach(&router, "eth0", &format!("{ROUTER_FRONT}/24"))?;
        let engine = lab.add_ns("se2")?;
        lab.ip(
            &router,
            &[
                "link",
                "add",
                "eth1",
                "type",
                "veth",
                "peer",
                "name",
                "eth0",
                "netns",
                engine.name(),
            ],
        )?;
        lab.ip(
            &router,
            &["addr", "add", &format!("{ROUTER_BACK}/24"), "dev", "eth1"],
        )?;
        lab.ip(&router, &["link", "set", "eth1", "up"])?;
        lab.sysctl(&router, "net.ipv4.ip_forward", "1")?;
        // The client's segment is on-link for the router; the VIPs are behind the primary.
        lab.ip(
            &router,
            &["route", "add", crate::engine::VIP_NET, "via", PRIMARY],
        )?;

        lab.ip(
            &engine,
            &["addr", "add", &format!("{TUNNEL_ENGINE}/24"), "dev", "eth0"],
        )?;
        lab.ip(&engine, &["link", "set", "eth0", "up"])?;
        lab.ip(&engine, &["route", "add", "default", "via", ROUTER_BACK])?;
        lab.ip(&engine, &["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
        arp_sysctls(&lab, &engine, "eth0")?;
        for ns in [&engine, &router] {
            for dev in ["all", "default", "eth0"] {
                lab.sysctl(ns, &format!("net.ipv4.conf.{dev}.rp_filter"), "0")?;
            }
        }
        let nginx = Nginx::start(&lab, &engine, "se2", &[SocketAddr::from((VIP, PORT))])?;
        let decap = attach_decap(&engine, &crate::testkit_object())?;

        let mut this = Self {
            daemon: None,
            _decap: decap,
            _nginx: nginx,
            client,
            primary,
            router,
            engine,
            router_mac: front.mac,
            lab,
        };
        this.start_daemon(mtu)?;
        Ok(this)
    }

    /// The primary's configuration: itself (no new flows) and engine 2 in tunnel mode through the
    /// router, taking every new flow.
    pub fn config(&self, pin_dir: &Path, mtu: Option<u16>) -> Config {
        let mut daemon = DaemonSection::lab("eth0", 1, pin_dir);
        daemon.tunnel_source_v4 = Some(PRIMARY.to_owned());
        Config {
            bgp: None,
            peers: None,
            daemon,
            proxy: None,
            engines: vec![
                EngineEntry {
                    id: 1,
                    ..EngineEntry::default()
                },
                EngineEntry {
                    id: 2,
                    mac: Some(fmt_mac(&self.router_mac)),
                    mode: Some("tunnel".to_owned()),
                    address_v4: Some(TUNNEL_ENGINE.to_string()),
                    mtu,
                    ..EngineEntry::default()
                },
            ],
            virtual_services: vec![VirtualService {
                bgp: None,
                id: 0,
                name: "web".to_owned(),
                vip: VIP.to_string(),
                port: PORT,
                protocol: "tcp".to_owned(),
                primary: 1,
                persistence_timeout_s: 0,
                engines: vec![Member { id: 1, weight: 0 }, Member { id: 2, weight: 1 }],
                pool: None,
                max_connections: None,
                draining: None,
            }],
            pools: Vec::new(),
        }
    }

    fn start_daemon(&mut self, mtu: Option<u16>) -> Result<()> {
        let primary = self.primary.clone();
        let daemon = Daemon::start_fresh(
            &self.lab,
            &primary,
            "se1",
            |pins| self.config(pins, mtu),
            &crate::daemon_bin(),
            &crate::xdp_object(),
        )?;
        self.daemon = Some(daemon);
        Ok(())
    }

    /// Reloads the primary with engine 2's path MTU set to `mtu`.
    pub fn set_mtu(&mut self, mtu: Option<u16>) -> Result<()> {
        let daemon = self.daemon.as_mut().context("no daemon")?;
        let config = {
            let pins = daemon.pins().clone();
            let mut c = daemon.config().clone();
            c.engines[1].mtu = mtu;
            pins.path().clone_into(&mut c.daemon.pin_dir);
            c
        };
        daemon.reload(config)
    }

    pub fn vip(&self) -> SocketAddr {
        SocketAddr::from((VIP, PORT))
    }

    /// The primary's `/metrics`.
    pub fn metrics(&self) -> Result<String> {
        self.daemon.as_ref().context("no daemon")?.metrics()
    }
}

/// Loads `tunnel_decap` from the testkit object and attaches it to `eth0` ingress in `ns`.
fn attach_decap(ns: &Ns, testkit: &Path) -> Result<Ebpf> {
    let bytes = std::fs::read(testkit)
        .with_context(|| format!("reading {} (cargo xtask build-ebpf)", testkit.display()))?;
    in_ns(ns.name(), || {
        let mut ebpf = Ebpf::load(&bytes).context("loading the testkit object")?;
        let prog: &mut SchedClassifier = ebpf
            .program_mut("tunnel_decap")
            .context("no tunnel_decap in the testkit object")?
            .try_into()?;
        prog.load()?;
        // An existing clsact qdisc is fine.
        let _ = tc::qdisc_add_clsact("eth0");
        prog.attach("eth0", TcAttachType::Ingress)
            .context("attaching tunnel_decap")?;
        Ok(ebpf)
    })
}
