//! A BGP lab: real routers (BIRD 2, FRR, `GoBGP`) in a router namespace between a client and
//! engines running `lb-daemon` with its BGP speaker. BIRD and FRR install what they learn into the
//! router's kernel table (ECMP); `GoBGP`'s RIB is read with its CLI. Engine `i` (10.99.0.1i, AS 65001)
//! serves the VIP 10.200.0.10:80 by itself, with one nginx backend `b{i}` that answers its name, so a
//! response tells which engine proxied it. The client (10.98.0.2) sits behind the router on its own
//! link. Used by `tests/e2e_bgp.rs` and `lb-bench bgp`.
//!
//! [`BgpLab::build_scaled`] makes the engines one service scaled by BGP instead: every engine's
//! configuration lists all of them (MAC, address) and `[peers]`, so that a flow the router moves to
//! another engine mid-connection is found and sent back to its owner.
//!
//! [`BgpLab::build_managed`] runs the engines under a controller instead (namespace `ctl` on the
//! segment, 10.99.0.250): managed daemons, nothing configured until the test drives `lbctl`.
//!
//! ```text
//!   client ── rtr (router, ECMP) ══ br0 ══ se1 se2 … (lb-daemon, BGP) ── b1 b2 … (nginx)
//!                                      ╚═ ctl (controller, managed mode only)
//! ```

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};

use crate::client::{Load, LoadResult, http_load};
use crate::daemon::{
    Backend, Config, Daemon, DaemonSection, EngineEntry, HealthCheck, Member, PinDir, Pool,
    VirtualService, metric_value,
};
use crate::lab::{Output, fmt_mac, host_mac};
use crate::nginx::Nginx;
use crate::{Lab, Ns, Proc, daemon_bin, testkit_object, xdp_object};

pub const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
/// The controller of [`BgpLab::build_managed`].
pub const CONTROLLER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 250);
pub const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
pub const CLIENT: &str = "10.98.0.2";
pub const ENGINES: [u8; 3] = [1, 2, 3];
pub const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x10);
pub const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 1);

pub fn engine_addr6(id: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 0x10 + u16::from(id))
}
pub const PEER_SERIES: &str = "{peer=\"10.99.0.1:179\"}";

pub fn engine_addr(id: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, 10 + id)
}

pub fn backend_addr(id: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, 20 + id)
}

pub const BIRD_CONF: &str = r#"
router id 10.99.0.1;
protocol device {}
protocol kernel {
  ipv4 { import none; export where source = RTS_BGP; };
  merge paths on limit 16;
}
protocol kernel {
  ipv6 { import none; export where source = RTS_BGP; };
  merge paths on limit 16;
}
protocol bgp lbs6 {
  local fd99::1 as 65000;
  neighbor range fd99::/64 as 65001;
  dynamic name "lbsix";
  hold time 9; keepalive time 3;
  error wait time 1, 2;
  ipv6 { import where net ~ [ fd00:200::/64{128,128} ]; export none; };
}
protocol bgp lbs {
  local 10.99.0.1 as 65000;
  neighbor range 10.99.0.0/24 as 65001;
  dynamic name "lb";
  hold time 9; keepalive time 3;
  error wait time 1, 2;
  ipv4 { import where net ~ [ 10.200.0.0/16{32,32} ]; export none; };
}
"#;

/// The router implementation in `rtr`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Kind {
    Bird,
    /// FRR: zebra (installs the routes) and bgpd.
    Frr,
    /// `GoBGP`: a speaker without a kernel table; its RIB is read with the `gobgp` CLI.
    Gobgp,
}

/// FRR's BFD profile (bfdd), put before `router bgp`, 100 ms × 3.
pub const FRR_BFD: &str = "bfd
 profile fast
  receive-interval 100
  transmit-interval 100
  detect-multiplier 3
 !
!
router bgp 65000";

/// BIRD's BFD protocol (put before `protocol bgp lbs`), 100 ms × 3.
pub const BIRD_BFD: &str = r#"protocol bfd {
  interface "eth0" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; };
}
protocol bgp lbs {"#;

pub struct Router {
    pub kind: Kind,
    procs: Vec<Proc>,
    pub log: PathBuf,
}

impl Router {
    /// SIGTERM to its daemons.
    pub fn stop(&self) {
        for p in &self.procs {
            p.stop(Duration::from_secs(5));
        }
    }
}

pub const FRR_CONF: &str = "
frr defaults traditional
hostname rtr
router bgp 65000
 bgp router-id 10.99.0.1
 no bgp ebgp-requires-policy
 neighbor LB peer-group
 neighbor LB remote-as external
 neighbor LB timers 3 9
 bgp listen range 10.99.0.0/24 peer-group LB
 address-family ipv4 unicast
  maximum-paths 16
 exit-address-family
";

pub fn gobgp_conf(engines: &[u8]) -> String {
    let mut c =
        String::from("[global.config]\n  as = 65000\n  router-id = \"10.99.0.1\"\n  port = 179\n");
    for id in engines {
        let _ = write!(
            c,
            "[[neighbors]]\n  [neighbors.config]\n    neighbor-address = \"{}\"\n    peer-as = 65001\n  [neighbors.transport.config]\n    passive-mode = true\n",
            engine_addr(*id)
        );
    }
    c
}

pub struct BgpLab {
    pub lab: Lab,
    pub rtr: Ns,
    pub client: Ns,
    pub backends: BTreeMap<u8, (Ns, Option<Nginx>)>,
    pub engines: BTreeMap<u8, (Ns, Option<Daemon>, Arc<PinDir>)>,
    pub router: Option<Router>,
    pub dir: tempfile::TempDir,
    /// The engines also announce [`VIP6`] over an IPv6 session to the router's [`ROUTER6`].
    pub v6: bool,
    /// BFD on the sessions (BIRD, FRR).
    pub bfd: bool,
    /// The hold time the engines offer (the router offers 9 s; the smaller one counts).
    pub hold_time_s: u16,
    /// The engines of the one service scaled by BGP, in every engine's configuration, with
    /// `[peers]`; empty: each engine serves the VIP by itself.
    pub members: Vec<u8>,
    /// Managed mode: the controller.
    pub control: Option<Control>,
    /// The engines' TCP MD5 key for the router (from their next start).
    pub password: Option<String>,
    /// BIRD's TCP MD5 key for the engines (from its next start).
    pub router_password: Option<String>,
    /// Also a UDP service on the VIP, port [`UDP_PORT`], pool `b{i}`:[`UDP_PORT`] (from each
    /// engine's next start), and the responders answering there.
    pub udp: bool,
    responders: Vec<UdpResponder>,
}

/// The UDP service's port on the VIP and on the backends.
pub const UDP_PORT: u16 = 5353;

/// A UDP server in a backend namespace answering every datagram with its name, until dropped.
pub struct UdpResponder {
    stop: Arc<std::sync::atomic::AtomicBool>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl UdpResponder {
    pub fn start(ns: &Ns, addr: SocketAddr, name: &str) -> Result<Self> {
        let socket = crate::netns::in_ns(ns.name(), || Ok(std::net::UdpSocket::bind(addr)?))?;
        socket.set_read_timeout(Some(Duration::from_millis(100)))?;
        let stop = Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let name = name.as_bytes().to_vec();
        let thread = std::thread::spawn(move || {
            let mut buf = [0u8; 2048];
            while !flag.load(std::sync::atomic::Ordering::Relaxed) {
                if let Ok((_, from)) = socket.recv_from(&mut buf) {
                    let _ = socket.send_to(&name, from);
                }
            }
        });
        Ok(UdpResponder {
            stop,
            thread: Some(thread),
        })
    }
}

impl Drop for UdpResponder {
    fn drop(&mut self) {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The controller of a managed lab: its namespace, PKI and process.
pub struct Control {
    pub ctl: Ns,
    pub pki: PathBuf,
    pub proc: Proc,
}

impl BgpLab {
    pub fn build(kind: Kind, ids: &[u8]) -> Result<Self> {
        Self::build_with(kind, ids, false)
    }

    pub fn build_with(kind: Kind, ids: &[u8], v6: bool) -> Result<Self> {
        Self::build_full(kind, ids, v6, false)
    }

    pub fn build_full(kind: Kind, ids: &[u8], v6: bool, bfd: bool) -> Result<Self> {
        Self::build_timed(kind, ids, v6, bfd, 9)
    }

    /// One service scaled by BGP over the engines `members` (see the module), of which `started`
    /// run from the start; the others have their namespaces and are started with
    /// [`BgpLab::start_engine`].
    pub fn build_scaled(kind: Kind, members: &[u8], started: &[u8]) -> Result<Self> {
        Self::build_inner(kind, members, started, false, false, 9, members.to_vec())
    }

    /// [`BgpLab::build_scaled`] with every engine started and BFD on every session.
    pub fn build_scaled_bfd(kind: Kind, members: &[u8]) -> Result<Self> {
        Self::build_inner(kind, members, members, false, true, 9, members.to_vec())
    }

    /// [`BgpLab::build_scaled`] with a UDP service scaled by BGP beside the TCP one, and a
    /// [`UdpResponder`] on each backend.
    pub fn build_scaled_udp(kind: Kind, members: &[u8], started: &[u8]) -> Result<Self> {
        let mut me = Self::build_inner(kind, members, &[], false, false, 9, members.to_vec())?;
        me.udp = true;
        for (id, (ns, _)) in &me.backends {
            let addr = SocketAddr::from((backend_addr(*id), UDP_PORT));
            me.responders
                .push(UdpResponder::start(ns, addr, &format!("b{id}"))?);
        }
        for &id in started {
            me.start_engine(id, false)?;
        }
        Ok(me)
    }

    /// A lab whose engines offer `hold_time_s` (at most the router's 9 s).
    pub fn build_timed(
        kind: Kind,
        ids: &[u8],
        v6: bool,
        bfd: bool,
        hold_time_s: u16,
    ) -> Result<Self> {
        Self::build_inner(kind, ids, ids, v6, bfd, hold_time_s, Vec::new())
    }

    fn build_inner(
        kind: Kind,
        ids: &[u8],
        started: &[u8],
        v6: bool,
        bfd: bool,
        hold_time_s: u16,
        members: Vec<u8>,
    ) -> Result<Self> {
        let lab = Lab::new("lbbgp")?;
        lab.enable_xdp_pass(&testkit_object())?;
        let rtr = lab.add_ns("rtr")?;
        lab.attach(&rtr, "eth0", &format!("{ROUTER}/24"))?;
        lab.sysctl(&rtr, "net.ipv4.ip_forward", "1")?;
        // Hash on ports too: otherwise every connection of the one client takes one next hop.
        lab.sysctl(&rtr, "net.ipv4.fib_multipath_hash_policy", "1")?;
        let client = client_behind(&lab, &rtr)?;
        let mut backends = BTreeMap::new();
        for &id in ids {
            let ns = lab.add_ns(&format!("b{id}"))?;
            lab.attach(&ns, "eth0", &format!("{}/24", backend_addr(id)))?;
            let nginx = Nginx::start(
                &lab,
                &ns,
                &format!("b{id}"),
                &[SocketAddr::from((backend_addr(id), 80))],
            )?;
            backends.insert(id, (ns, Some(nginx)));
        }
        let mut engines = BTreeMap::new();
        for &id in ids {
            let ns = lab.add_ns(&format!("se{id}"))?;
            lab.attach(&ns, "eth0", &format!("{}/24", engine_addr(id)))?;
            lab.ip(
                &ns,
                &["route", "add", "default", "via", &ROUTER.to_string()],
            )?;
            lab.ip(&ns, &["addr", "add", &format!("{VIP}/32"), "dev", "lo"])?;
            if v6 {
                lab.ip(
                    &ns,
                    &[
                        "addr",
                        "add",
                        &format!("{}/64", engine_addr6(id)),
                        "dev",
                        "eth0",
                        "nodad",
                    ],
                )?;
                lab.ip(&ns, &["addr", "add", &format!("{VIP6}/128"), "dev", "lo"])?;
            }
            let pins = Arc::new(PinDir::new(&format!("{}-se{id}", lab.base()))?);
            engines.insert(id, (ns, None, pins));
        }
        let dir = tempfile::tempdir()?;
        let mut me = BgpLab {
            lab,
            rtr,
            client,
            backends,
            engines,
            router: None,
            dir,
            v6,
            bfd,
            hold_time_s,
            members,
            control: None,
            password: None,
            router_password: None,
            udp: false,
            responders: Vec::new(),
        };
        if v6 {
            me.lab.ip(
                &me.rtr,
                &[
                    "addr",
                    "add",
                    &format!("{ROUTER6}/64"),
                    "dev",
                    "eth0",
                    "nodad",
                ],
            )?;
        }
        match kind {
            Kind::Bird => me.start_bird()?,
            Kind::Frr => me.start_frr()?,
            Kind::Gobgp => me.start_gobgp(ids)?,
        }
        for &id in started {
            me.start_engine(id, false)?;
        }
        Ok(me)
    }

    /// BIRD requiring TCP MD5 with `key` from the engines of `ids`, which run with `key` too.
    pub fn build_signed(ids: &[u8], key: &str) -> Result<Self> {
        let mut me = Self::build_inner(Kind::Bird, ids, &[], false, false, 9, Vec::new())?;
        if let Some(r) = me.router.take() {
            r.stop();
        }
        me.router_password = Some(key.to_owned());
        me.password = Some(key.to_owned());
        me.start_bird()?;
        for &id in ids {
            me.start_engine(id, false)?;
        }
        Ok(me)
    }

    /// SIGTERM to engine `id`'s daemon.
    pub fn stop_engine(&mut self, id: u8) -> Result<()> {
        let d = self
            .engines
            .get_mut(&id)
            .and_then(|e| e.1.take())
            .context("engine not running")?;
        d.proc().stop(Duration::from_secs(10));
        Ok(())
    }

    /// The router, BFD on its sessions, a controller and a managed daemon on each engine of
    /// `ids`, every engine connected; nothing configured (the test does it by `lbctl`).
    pub fn build_managed(kind: Kind, ids: &[u8]) -> Result<Self> {
        let mut me = Self::build_inner(kind, ids, &[], false, true, 9, Vec::new())?;
        let ctl = me.lab.add_ns("ctl")?;
        me.lab.attach(&ctl, "eth0", &format!("{CONTROLLER}/24"))?;
        let pki = me.dir.path().join("pki");
        let names: Vec<String> = ids.iter().map(|i| format!("se{i}")).collect();
        crate::controller_lab::make_pki(&pki, CONTROLLER, &names)?;
        let bin = crate::controller_bin();
        let db = me.dir.path().join("controller.redb");
        let proc = me.lab.spawn(
            &ctl,
            &[
                path(&bin)?,
                "--listen",
                &format!("0.0.0.0:{}", crate::controller_lab::CONTROLLER_PORT),
                "--db",
                path(&db)?,
                "--tls-dir",
                path(&pki)?,
                "--heartbeat-interval-ms",
                "500",
                "--max-missed",
                "3",
            ],
            &Output::File(me.dir.path().join("controller.log")),
        )?;
        me.control = Some(Control { ctl, pki, proc });
        me.wait_lbctl(Duration::from_secs(10), "the controller answers", |l| {
            Ok(l.lbctl(&["engines"])?.code == 0)
        })?;
        for &id in ids {
            me.start_managed(id)?;
        }
        me.wait_lbctl(Duration::from_secs(20), "every engine connected", |l| {
            let engines = l.lbctl(&["engines"])?.json()?;
            let all = engines.as_array().context("an array")?;
            Ok(all.len() == ids.len() && all.iter().all(|e| e["connected"] == true))
        })?;
        Ok(me)
    }

    /// Starts engine `id`'s daemon in managed mode.
    pub fn start_managed(&mut self, id: u8) -> Result<()> {
        let control = self.control.as_ref().context("not a managed lab")?;
        let controller = crate::daemon::ControllerSection {
            address: format!(
                "https://{CONTROLLER}:{}",
                crate::controller_lab::CONTROLLER_PORT
            ),
            name: format!("se{id}"),
            tls_dir: control.pki.clone(),
            state_file: self.dir.path().join(format!("se{id}-desired.json")),
            heartbeat_interval_ms: 500,
            tags: BTreeMap::new(),
            group: None,
        };
        let (ns, slot, pins) = self.engines.get_mut(&id).context("no such engine")?;
        let d = Daemon::start_managed(
            &self.lab,
            ns,
            DaemonSection::lab("eth0", id, pins.path()),
            &controller,
            pins.clone(),
            &daemon_bin(),
            &xdp_object(),
            &[],
        )?;
        *slot = Some(d);
        Ok(())
    }

    /// `lbctl --json ARGS` against the controller of a managed lab.
    pub fn lbctl(&self, args: &[&str]) -> Result<crate::controller_lab::Lbctl> {
        let c = self.control.as_ref().context("not a managed lab")?;
        crate::controller_lab::lbctl_in(&c.ctl, &c.pki, "admin", args)
    }

    pub fn controller_log(&self) -> String {
        std::fs::read_to_string(self.dir.path().join("controller.log"))
            .map(|t| crate::controller_lab::tail(&t, 30))
            .unwrap_or_default()
    }

    /// Polls `f` every 100 ms until it says yes; an error after `timeout`, naming `what`, with the
    /// controller's and engines' logs.
    pub fn wait_lbctl(
        &self,
        timeout: Duration,
        what: &str,
        f: impl FnMut(&Self) -> Result<bool>,
    ) -> Result<Duration> {
        crate::controller_lab::poll(self, timeout, what, f, |l| {
            format!(
                "controller log:\n{}\nengine logs:\n{}",
                l.controller_log(),
                l.engine_logs()
            )
        })
    }

    /// SIGKILL to engine `id`'s daemon.
    pub fn kill_engine(&mut self, id: u8) -> Result<()> {
        let d = self
            .engines
            .get_mut(&id)
            .and_then(|e| e.1.take())
            .context("engine not running")?;
        d.proc().kill();
        Ok(())
    }

    pub fn start_bird(&mut self) -> Result<()> {
        let conf = self.dir.path().join("bird.conf");
        let text = if self.bfd {
            BIRD_CONF
                .replace("protocol bgp lbs {", BIRD_BFD)
                .replace("dynamic name \"lb\";", "dynamic name \"lb\";\n  bfd on;")
        } else {
            BIRD_CONF.to_owned()
        };
        let text = match &self.router_password {
            Some(key) => text.replace(
                "dynamic name \"lb\";",
                &format!("dynamic name \"lb\";\n  password \"{key}\";"),
            ),
            None => text,
        };
        std::fs::write(&conf, text)?;
        let log = self.dir.path().join("bird.log");
        let sock = self.dir.path().join("bird.ctl");
        // A restart: the old socket must not pass for the new BIRD's.
        let _ = std::fs::remove_file(&sock);
        let bird = self.lab.spawn(
            &self.rtr,
            &[
                "bird",
                "-f",
                "-c",
                path(&conf)?,
                "-s",
                path(&sock)?,
                "-P",
                path(&self.dir.path().join("bird.pid"))?,
                "-D",
                path(&log)?,
            ],
            &Output::File(self.dir.path().join("bird.out")),
        )?;
        // BIRD parses its configuration before it opens the control socket.
        let start = Instant::now();
        while !sock.exists() {
            if !bird.is_running() || start.elapsed() > Duration::from_secs(10) {
                bail!(
                    "BIRD did not start: {}",
                    std::fs::read_to_string(self.dir.path().join("bird.out")).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        self.router = Some(Router {
            kind: Kind::Bird,
            procs: vec![bird],
            log,
        });
        Ok(())
    }

    /// The directory FRR's daemons share (sockets, logs), owned by the `frr` user.
    pub fn frr_dir(&self) -> PathBuf {
        self.dir.path().join("frr")
    }

    pub fn start_frr(&mut self) -> Result<()> {
        let dir = self.frr_dir();
        std::fs::create_dir_all(&dir)?;
        let conf = dir.join("frr.conf");
        let text = if self.bfd {
            FRR_CONF.replace("router bgp 65000", FRR_BFD).replace(
                " neighbor LB timers 3 9",
                " neighbor LB timers 3 9\n neighbor LB bfd profile fast",
            )
        } else {
            FRR_CONF.to_owned()
        };
        std::fs::write(&conf, text)?;
        std::fs::write(dir.join("zebra.conf"), "hostname rtr\n")?;
        crate::cmd::run(&["chown", "-R", "frr:frr", path(&dir)?])?;
        crate::cmd::run(&["chmod", "755", path(self.dir.path())?])?;
        let zserv = dir.join("zserv.api");
        let log = dir.join("frr.log");
        let mut procs = Vec::new();
        let mut daemons = vec![("zebra", dir.join("zebra.conf"))];
        if self.bfd {
            daemons.push(("bfdd", conf.clone()));
        }
        daemons.push(("bgpd", conf));
        let bfdctl = dir.join("bfdd.sock");
        for (daemon, conf) in daemons {
            let bin = format!("/usr/lib/frr/{daemon}");
            let pid = dir.join(format!("{daemon}.pid"));
            let bfd_args: Vec<&str> = if daemon == "bfdd" {
                vec!["--bfdctl", path(&bfdctl)?]
            } else {
                vec![]
            };
            let p = self.lab.spawn(
                &self.rtr,
                &[
                    &[
                        &bin,
                        "-f",
                        path(&conf)?,
                        "-i",
                        path(&pid)?,
                        "-z",
                        path(&zserv)?,
                        "--vty_socket",
                        path(&dir)?,
                        "-P",
                        "0",
                        "-u",
                        "frr",
                        "-g",
                        "frr",
                        "--log",
                        &format!("file:{}", path(&log)?),
                    ][..],
                    &bfd_args,
                ]
                .concat(),
                &Output::File(dir.join(format!("{daemon}.out"))),
            )?;
            let start = Instant::now();
            while !pid.exists() {
                if !p.is_running() || start.elapsed() > Duration::from_secs(10) {
                    bail!(
                        "{daemon} did not start: {}",
                        std::fs::read_to_string(dir.join(format!("{daemon}.out")))
                            .unwrap_or_default()
                    );
                }
                std::thread::sleep(Duration::from_millis(20));
            }
            procs.push(p);
        }
        self.router = Some(Router {
            kind: Kind::Frr,
            procs,
            log,
        });
        Ok(())
    }

    pub fn start_gobgp(&mut self, ids: &[u8]) -> Result<()> {
        let conf = self.dir.path().join("gobgpd.toml");
        std::fs::write(&conf, gobgp_conf(ids))?;
        let log = self.dir.path().join("gobgpd.log");
        let p = self.lab.spawn(
            &self.rtr,
            &[
                "gobgpd",
                "-f",
                path(&conf)?,
                "--api-hosts",
                "127.0.0.1:50051",
            ],
            &Output::File(log.clone()),
        )?;
        let start = Instant::now();
        while self.gobgp(&["global"]).is_err() {
            if !p.is_running() || start.elapsed() > Duration::from_secs(10) {
                bail!(
                    "gobgpd did not start: {}",
                    std::fs::read_to_string(&log).unwrap_or_default()
                );
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        self.router = Some(Router {
            kind: Kind::Gobgp,
            procs: vec![p],
            log,
        });
        Ok(())
    }

    /// `gobgp` CLI against the router's gobgpd.
    pub fn gobgp(&self, args: &[&str]) -> Result<String> {
        let mut command = vec!["gobgp", "-u", "127.0.0.1", "-p", "50051"];
        command.extend_from_slice(args);
        self.lab.exec(&self.rtr, &command)
    }

    /// The router's own view of the VIP's route (attributes included).
    pub fn router_route(&self) -> Result<String> {
        match self.kind() {
            Kind::Bird => self.lab.exec(
                &self.rtr,
                &[
                    "birdc",
                    "-s",
                    path(&self.dir.path().join("bird.ctl"))?,
                    "show",
                    "route",
                    "all",
                ],
            ),
            Kind::Frr => self.lab.exec(
                &self.rtr,
                &[
                    "vtysh",
                    "--vty_socket",
                    path(&self.frr_dir())?,
                    "-c",
                    &format!("show bgp ipv4 unicast {VIP}/32"),
                ],
            ),
            Kind::Gobgp => self.gobgp(&["global", "rib", "-a", "ipv4", &format!("{VIP}/32")]),
        }
    }

    pub fn kind(&self) -> Kind {
        self.router.as_ref().map_or(Kind::Bird, |r| r.kind)
    }

    pub fn config(&self, id: u8, pins: &Path, draining: bool) -> Result<Config> {
        let bfd = if self.bfd {
            "bfd = { min_tx_ms = 100, min_rx_ms = 100, multiplier = 3 }\n"
        } else {
            ""
        };
        let peer6 = if self.v6 {
            format!("[[peers]]\naddress = \"{ROUTER6}\"\nasn = 65000\n")
        } else {
            String::new()
        };
        let bgp: toml::Value = toml::from_str(&format!(
            r#"
asn = 65001
router_id = "{}"
hold_time_s = {}
min_backoff_ms = 200
max_backoff_s = 2
communities = ["65001:10"]
[[peers]]
address = "{ROUTER}"
asn = 65000
{password}{bfd}{peer6}"#,
            engine_addr(id),
            self.hold_time_s,
            password = self
                .password
                .as_ref()
                .map_or(String::new(), |k| format!("password = \"{k}\"\n")),
        ))?;
        let members = if self.members.is_empty() {
            vec![id]
        } else {
            self.members.clone()
        };
        let service = |vs_id: u32, name: &str, vip: String| -> Result<VirtualService> {
            Ok(VirtualService {
                id: vs_id,
                name: name.to_owned(),
                vip,
                port: 80,
                protocol: "tcp".to_owned(),
                primary: members[0],
                persistence_timeout_s: 0,
                engines: members.iter().map(|&id| Member { id, weight: 1 }).collect(),
                pool: Some("web".to_owned()),
                max_connections: None,
                draining: draining.then_some(true),
                bgp: Some(toml::from_str("med = 10")?),
            })
        };
        let mut services = vec![service(0, "web", VIP.to_string())?];
        if self.v6 {
            services.push(service(1, "web6", VIP6.to_string())?);
        }
        if self.udp {
            let mut dns = service(2, "dns", VIP.to_string())?;
            dns.port = UDP_PORT;
            "udp".clone_into(&mut dns.protocol);
            dns.pool = Some("udp".to_owned());
            services.push(dns);
        }
        Ok(Config {
            daemon: DaemonSection::lab("eth0", id, pins),
            proxy: None,
            engines: members
                .iter()
                .map(|&m| EngineEntry {
                    id: m,
                    mac: (m != id).then(|| fmt_mac(&host_mac(engine_addr(m)))),
                    address_v4: (!self.members.is_empty()).then(|| engine_addr(m).to_string()),
                    ..EngineEntry::default()
                })
                .collect(),
            virtual_services: services,
            pools: std::iter::once(Pool {
                name: "web".to_owned(),
                algorithm: "round_robin".to_owned(),
                backends: vec![Backend::new(&backend_addr(id).to_string(), 80)],
                health_check: Some(HealthCheck {
                    kind: "http".to_owned(),
                    interval_ms: 200,
                    timeout_ms: 150,
                    rise: 2,
                    fall: 2,
                    http_path: Some("/".to_owned()),
                    expected_status: Some(200),
                }),
            })
            .chain(self.udp.then(|| Pool {
                name: "udp".to_owned(),
                algorithm: "round_robin".to_owned(),
                backends: vec![Backend::new(&backend_addr(id).to_string(), UDP_PORT)],
                health_check: None,
            }))
            .collect(),
            bgp: Some(bgp),
            peers: (!self.members.is_empty())
                .then(|| toml::from_str("key = \"00112233445566778899aabbccddeeff\"\n"))
                .transpose()?,
        })
    }

    pub fn start_engine(&mut self, id: u8, draining: bool) -> Result<()> {
        let pins = self.engines.get(&id).context("no such engine")?.2.clone();
        let config = self.config(id, pins.path(), draining)?;
        let (ns, slot, pins) = self.engines.get_mut(&id).context("no such engine")?;
        let d = Daemon::start(
            &self.lab,
            ns,
            config,
            pins.clone(),
            &daemon_bin(),
            &xdp_object(),
        )?;
        *slot = Some(d);
        Ok(())
    }

    pub fn daemon(&self, id: u8) -> &Daemon {
        self.engines[&id].1.as_ref().expect("engine running")
    }

    pub fn daemon_mut(&mut self, id: u8) -> &mut Daemon {
        self.engines
            .get_mut(&id)
            .and_then(|e| e.1.as_mut())
            .expect("engine running")
    }

    /// The next hops of the router's kernel route for the VIP.
    pub fn next_hops(&self) -> Result<BTreeSet<Ipv4Addr>> {
        if self.kind() == Kind::Gobgp {
            // `*> 10.200.0.10/32  10.99.0.11  65001  00:00:01  [{Origin: i} ...]`, a line a path.
            let rib = self.router_route()?;
            return Ok(rib
                .lines()
                .filter(|l| l.contains(&format!("{VIP}/32")))
                .filter_map(|l| {
                    l.split_whitespace()
                        .find_map(|w| w.parse::<Ipv4Addr>().ok().filter(|a| *a != VIP))
                })
                .collect());
        }
        let out = self
            .lab
            .ip(&self.rtr, &["route", "show", &format!("{VIP}/32")])?;
        via_hops(&out)
    }

    /// The next hops of the router's kernel route for [`VIP6`].
    pub fn next_hops6(&self) -> Result<BTreeSet<Ipv6Addr>> {
        let out = self
            .lab
            .ip(&self.rtr, &["-6", "route", "show", &format!("{VIP6}/128")])?;
        via_hops(&out)
    }

    /// Waits until the router's next hops for [`VIP6`] are exactly those of `ids`; returns how long.
    pub fn wait_hops6(&self, ids: &[u8], within: Duration) -> Result<Duration> {
        let want = ids.iter().map(|i| engine_addr6(*i)).collect();
        self.wait_for(&want, Self::next_hops6, within)
    }

    /// Waits until the router's next hops for the VIP are exactly those of `ids`; returns how long.
    pub fn wait_hops(&self, ids: &[u8], within: Duration) -> Result<Duration> {
        let want = ids.iter().map(|i| engine_addr(*i)).collect();
        self.wait_for(&want, Self::next_hops, within)
    }

    fn wait_for<A: Ord + std::fmt::Debug>(
        &self,
        want: &BTreeSet<A>,
        next_hops: fn(&Self) -> Result<BTreeSet<A>>,
        within: Duration,
    ) -> Result<Duration> {
        let start = Instant::now();
        loop {
            let got = next_hops(self)?;
            if got == *want {
                return Ok(start.elapsed());
            }
            if start.elapsed() > within {
                bail!(
                    "router next hops {got:?}, wanted {want:?} within {within:?}\nthe router's route:\n{}\nrouter log:\n{}\nengine logs:\n{}",
                    self.router_route().unwrap_or_else(|e| format!("{e:#}")),
                    self.router_log(),
                    self.engine_logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    pub fn router_log(&self) -> String {
        self.router
            .as_ref()
            .and_then(|r| std::fs::read_to_string(&r.log).ok())
            .map(|t| crate::controller_lab::tail(&t, 30))
            .unwrap_or_default()
    }

    pub fn engine_logs(&self) -> String {
        self.engines
            .iter()
            .filter_map(|(id, (_, d, _))| {
                d.as_ref().map(|d| format!("se{id}:\n{}", d.log_tail(15)))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// Waits until BFD is up on every engine of `ids`.
    pub fn wait_bfd_up(&self, ids: &[u8], within: Duration) -> Result<Duration> {
        let start = Instant::now();
        while ids
            .iter()
            .any(|id| self.metric(*id, "lb_bgp_bfd_up").unwrap_or(0) != 1)
        {
            if start.elapsed() > within {
                bail!(
                    "BFD did not come up within {within:?}:\n{}\n{}",
                    self.router_log(),
                    self.engine_logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        Ok(start.elapsed())
    }

    /// One of engine `id`'s BGP series for the router (integers, carried as floats).
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    pub fn metric(&self, id: u8, name: &str) -> Result<u64> {
        let text = self.daemon(id).metrics()?;
        metric_value(&text, &format!("{name}{PEER_SERIES}"))
            .map(|v| v as u64)
            .with_context(|| format!("se{id} has no {name}{PEER_SERIES}"))
    }

    /// `n` short connections from the client: responses per backend (= per engine).
    pub fn spread(&self, n: usize) -> Result<LoadResult> {
        http_load(&self.client, &Load::new(SocketAddr::from((VIP, 80)), n))
    }
}

/// The client's namespace, on its own link to the router (10.98.0.0/24).
pub fn client_behind(lab: &Lab, rtr: &Ns) -> Result<Ns> {
    let client = lab.add_ns("client")?;
    lab.ip(
        &client,
        &[
            "link",
            "add",
            "eth0",
            "type",
            "veth",
            "peer",
            "name",
            "cl0",
            "netns",
            rtr.name(),
        ],
    )?;
    lab.ip(
        &client,
        &["addr", "add", &format!("{CLIENT}/24"), "dev", "eth0"],
    )?;
    lab.ip(&client, &["link", "set", "eth0", "up"])?;
    lab.ip(&client, &["route", "add", "default", "via", "10.98.0.1"])?;
    lab.ip(rtr, &["addr", "add", "10.98.0.1/24", "dev", "cl0"])?;
    lab.ip(rtr, &["link", "set", "cl0", "up"])?;
    Ok(client)
}

/// The addresses after each `via` of `ip route show` output.
fn via_hops<A: Ord + std::str::FromStr>(out: &str) -> Result<BTreeSet<A>>
where
    A::Err: std::error::Error + Send + Sync + 'static,
{
    out.split_whitespace()
        .collect::<Vec<_>>()
        .windows(2)
        .filter(|w| w[0] == "via")
        .map(|w| w[1].parse().with_context(|| format!("route line {out:?}")))
        .collect()
}

pub fn path(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}
