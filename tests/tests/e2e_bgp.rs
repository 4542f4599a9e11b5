//! End to end: route health injection to a real router. BIRD 2 runs in a router namespace
//! (10.99.0.1, AS 65000, accepting /32s of 10.200.0.0/16 from a neighbour range, exporting them
//! into its kernel table with ECMP); three engines (10.99.0.11-13, `lb-daemon`, AS 65001) each serve
//! the VIP 10.200.0.10:80 by themselves and announce it by BGP; engine `i`'s pool is one nginx,
//! `b{i}`, that answers with its name, so a response tells which engine proxied it. A client
//! (10.98.0.2) sits behind the router on its own link.
//!
//! ```text
//!   client ── rtr (BIRD, ECMP) ══ br0 ══ se1 se2 se3 (lb-daemon, BGP) ── b1 b2 b3 (nginx)
//! ```
//!
//! Needs root, `lb-daemon` (`$LB_DAEMON_BIN`), the XDP objects and BIRD (`cargo xtask setup`).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::net::{Ipv4Addr, Ipv6Addr, SocketAddr};
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use lb_tests::client::{Load, http_load};
use lb_tests::daemon::{
    Backend, Config, Daemon, DaemonSection, EngineEntry, HealthCheck, Member, PinDir, Pool,
    VirtualService, metric_value,
};
use lb_tests::lab::Output;
use lb_tests::nginx::Nginx;
use lb_tests::{Lab, Ns, Proc, daemon_bin, require_root, testkit_object, xdp_object};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 200, 0, 10);
const ROUTER: Ipv4Addr = Ipv4Addr::new(10, 99, 0, 1);
const CLIENT: &str = "10.98.0.2";
const ENGINES: [u8; 3] = [1, 2, 3];
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x200, 0, 0, 0, 0, 0, 0x10);
const ROUTER6: Ipv6Addr = Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 1);

fn engine_addr6(id: u8) -> Ipv6Addr {
    Ipv6Addr::new(0xfd99, 0, 0, 0, 0, 0, 0, 0x10 + u16::from(id))
}
const PEER_SERIES: &str = "{peer=\"10.99.0.1:179\"}";

fn engine_addr(id: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, 10 + id)
}

fn backend_addr(id: u8) -> Ipv4Addr {
    Ipv4Addr::new(10, 99, 0, 20 + id)
}

const BIRD_CONF: &str = r#"
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
enum Kind {
    Bird,
    /// FRR: zebra (installs the routes) and bgpd.
    Frr,
    /// `GoBGP`: a speaker without a kernel table; its RIB is read with the `gobgp` CLI.
    Gobgp,
}

/// FRR's BFD profile (bfdd), put before `router bgp`, 100 ms × 3.
const FRR_BFD: &str = "bfd
 profile fast
  receive-interval 100
  transmit-interval 100
  detect-multiplier 3
 !
!
router bgp 65000";

/// BIRD's BFD protocol (put before `protocol bgp lbs`), 100 ms × 3.
const BIRD_BFD: &str = r#"protocol bfd {
  interface "eth0" { min rx interval 100 ms; min tx interval 100 ms; multiplier 3; };
}
protocol bgp lbs {"#;

struct Router {
    kind: Kind,
    _procs: Vec<Proc>,
    log: PathBuf,
}

const FRR_CONF: &str = "
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

fn gobgp_conf(engines: &[u8]) -> String {
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

struct BgpLab {
    lab: Lab,
    rtr: Ns,
    client: Ns,
    backends: BTreeMap<u8, (Ns, Option<Nginx>)>,
    engines: BTreeMap<u8, (Ns, Option<Daemon>, Arc<PinDir>)>,
    router: Option<Router>,
    dir: tempfile::TempDir,
    /// The engines also announce [`VIP6`] over an IPv6 session to the router's [`ROUTER6`].
    v6: bool,
    /// BFD on the sessions (BIRD, FRR).
    bfd: bool,
}

impl BgpLab {
    fn build(kind: Kind, ids: &[u8]) -> Result<Self> {
        Self::build_with(kind, ids, false)
    }

    fn build_with(kind: Kind, ids: &[u8], v6: bool) -> Result<Self> {
        Self::build_full(kind, ids, v6, false)
    }

    fn build_full(kind: Kind, ids: &[u8], v6: bool, bfd: bool) -> Result<Self> {
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
        for &id in ids {
            me.start_engine(id, false)?;
        }
        Ok(me)
    }

    fn start_bird(&mut self) -> Result<()> {
        let conf = self.dir.path().join("bird.conf");
        let text = if self.bfd {
            BIRD_CONF
                .replace("protocol bgp lbs {", BIRD_BFD)
                .replace("dynamic name \"lb\";", "dynamic name \"lb\";\n  bfd on;")
        } else {
            BIRD_CONF.to_owned()
        };
        std::fs::write(&conf, text)?;
        let log = self.dir.path().join("bird.log");
        let sock = self.dir.path().join("bird.ctl");
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
            _procs: vec![bird],
            log,
        });
        Ok(())
    }

    /// The directory FRR's daemons share (sockets, logs), owned by the `frr` user.
    fn frr_dir(&self) -> PathBuf {
        self.dir.path().join("frr")
    }

    fn start_frr(&mut self) -> Result<()> {
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
        lb_tests::cmd::run(&["chown", "-R", "frr:frr", path(&dir)?])?;
        lb_tests::cmd::run(&["chmod", "755", path(self.dir.path())?])?;
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
            _procs: procs,
            log,
        });
        Ok(())
    }

    fn start_gobgp(&mut self, ids: &[u8]) -> Result<()> {
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
            _procs: vec![p],
            log,
        });
        Ok(())
    }

    /// `gobgp` CLI against the router's gobgpd.
    fn gobgp(&self, args: &[&str]) -> Result<String> {
        let mut command = vec!["gobgp", "-u", "127.0.0.1", "-p", "50051"];
        command.extend_from_slice(args);
        self.lab.exec(&self.rtr, &command)
    }

    /// The router's own view of the VIP's route (attributes included).
    fn router_route(&self) -> Result<String> {
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

    fn kind(&self) -> Kind {
        self.router.as_ref().map_or(Kind::Bird, |r| r.kind)
    }

    fn config(&self, id: u8, pins: &Path, draining: bool) -> Result<Config> {
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
hold_time_s = 9
min_backoff_ms = 200
max_backoff_s = 2
communities = ["65001:10"]
[[peers]]
address = "{ROUTER}"
asn = 65000
{bfd}{peer6}"#,
            engine_addr(id)
        ))?;
        let service = |vs_id: u32, name: &str, vip: String| -> Result<VirtualService> {
            Ok(VirtualService {
                id: vs_id,
                name: name.to_owned(),
                vip,
                port: 80,
                protocol: "tcp".to_owned(),
                primary: id,
                persistence_timeout_s: 0,
                engines: vec![Member { id, weight: 1 }],
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
        Ok(Config {
            daemon: DaemonSection::lab("eth0", id, pins),
            proxy: None,
            engines: vec![EngineEntry {
                id,
                ..EngineEntry::default()
            }],
            virtual_services: services,
            pools: vec![Pool {
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
            }],
            bgp: Some(bgp),
        })
    }

    fn start_engine(&mut self, id: u8, draining: bool) -> Result<()> {
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

    fn daemon(&self, id: u8) -> &Daemon {
        self.engines[&id].1.as_ref().expect("engine running")
    }

    fn daemon_mut(&mut self, id: u8) -> &mut Daemon {
        self.engines
            .get_mut(&id)
            .and_then(|e| e.1.as_mut())
            .expect("engine running")
    }

    /// The next hops of the router's kernel route for the VIP.
    fn next_hops(&self) -> Result<BTreeSet<Ipv4Addr>> {
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
        let mut hops = BTreeSet::new();
        let words: Vec<&str> = out.split_whitespace().collect();
        for w in words.windows(2) {
            if w[0] == "via" {
                hops.insert(
                    w[1].parse()
                        .with_context(|| format!("route line {out:?}"))?,
                );
            }
        }
        Ok(hops)
    }

    /// The next hops of the router's kernel route for [`VIP6`].
    fn next_hops6(&self) -> Result<BTreeSet<Ipv6Addr>> {
        let out = self
            .lab
            .ip(&self.rtr, &["-6", "route", "show", &format!("{VIP6}/128")])?;
        let words: Vec<&str> = out.split_whitespace().collect();
        let mut hops = BTreeSet::new();
        for w in words.windows(2) {
            if w[0] == "via" {
                hops.insert(
                    w[1].parse()
                        .with_context(|| format!("route line {out:?}"))?,
                );
            }
        }
        Ok(hops)
    }

    fn wait_hops6(&self, ids: &[u8], within: Duration) -> Result<Duration> {
        let want: BTreeSet<Ipv6Addr> = ids.iter().map(|i| engine_addr6(*i)).collect();
        let start = Instant::now();
        loop {
            let got = self.next_hops6()?;
            if got == want {
                return Ok(start.elapsed());
            }
            if start.elapsed() > within {
                bail!(
                    "router IPv6 next hops {got:?}, wanted {want:?} within {within:?}\nrouter log:\n{}\nengine logs:\n{}",
                    self.router_log(),
                    self.engine_logs()
                );
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// Waits until the router's next hops for the VIP are exactly those of `ids`; returns how long.
    fn wait_hops(&self, ids: &[u8], within: Duration) -> Result<Duration> {
        let want: BTreeSet<Ipv4Addr> = ids.iter().map(|i| engine_addr(*i)).collect();
        let start = Instant::now();
        loop {
            let got = self.next_hops()?;
            if got == want {
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

    fn router_log(&self) -> String {
        self.router
            .as_ref()
            .and_then(|r| std::fs::read_to_string(&r.log).ok())
            .map(|t| lb_tests::controller_lab::tail(&t, 30))
            .unwrap_or_default()
    }

    fn engine_logs(&self) -> String {
        self.engines
            .iter()
            .filter_map(|(id, (_, d, _))| {
                d.as_ref().map(|d| format!("se{id}:\n{}", d.log_tail(15)))
            })
            .collect::<Vec<_>>()
            .join("\n")
    }

    /// One of engine `id`'s BGP series for the router (integers, carried as floats).
    #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
    fn metric(&self, id: u8, name: &str) -> Result<u64> {
        let text = self.daemon(id).metrics()?;
        metric_value(&text, &format!("{name}{PEER_SERIES}"))
            .map(|v| v as u64)
            .with_context(|| format!("se{id} has no {name}{PEER_SERIES}"))
    }

    /// `n` short connections from the client: responses per backend (= per engine).
    fn spread(&self, n: usize) -> Result<lb_tests::client::LoadResult> {
        http_load(&self.client, &Load::new(SocketAddr::from((VIP, 80)), n))
    }
}

/// The client's namespace, on its own link to the router (10.98.0.0/24).
fn client_behind(lab: &Lab, rtr: &Ns) -> Result<Ns> {
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

fn path(p: &Path) -> Result<&str> {
    p.to_str().context("non-UTF-8 path")
}

/// Checks the attributes the router got for the VIP (MED 10, community 65001:10).
fn check_attributes(lab: &BgpLab) -> Result<()> {
    let route = lab.router_route()?;
    let (med, community) = match lab.kind() {
        Kind::Bird => ("BGP.med: 10", "(65001,10)"),
        Kind::Frr => ("metric 10", "65001:10"),
        Kind::Gobgp => ("{Med: 10}", "65001:10"),
    };
    ensure!(
        route.contains(med),
        "{:?} got no MED 10:\n{route}",
        lab.kind()
    );
    ensure!(
        route.contains(community),
        "{:?} got no community 65001:10:\n{route}",
        lab.kind()
    );
    Ok(())
}

/// Three engines and a router with a kernel table: announce, spread, withdraw on a dead backend,
/// on a drain, on kill -9 and on SIGTERM.
fn announce_spread_and_withdraw(kind: Kind) -> Result<()> {
    let mut lab = BgpLab::build(kind, &ENGINES)?;

    // Every engine announces: one route, three next hops.
    let t = lab.wait_hops(&ENGINES, Duration::from_secs(20))?;
    eprintln!("{kind:?}: all three next hops in the router's table after {t:?}");
    for id in ENGINES {
        assert_eq!(lab.metric(id, "lb_bgp_session_established")?, 1);
        assert_eq!(lab.metric(id, "lb_bgp_routes_announced")?, 1);
    }
    check_attributes(&lab)?;

    // Short connections spread over the engines by the router's ECMP hash.
    let r = lab.spread(300)?;
    eprintln!(
        "{kind:?}: spread over the engines: {:?}, errors {}",
        r.per_engine, r.errors
    );
    assert_eq!(r.errors, 0, "{:?}", r.error_samples);
    for id in ENGINES {
        let share = r.percent(&format!("b{id}"));
        assert!(
            share >= 10.0,
            "engine {id} got {share:.1} % of 300 connections: {:?}",
            r.per_engine
        );
    }

    // The only backend of engine 3 dies: its service is unhealthy there, its route goes.
    lab.backends.get_mut(&3).unwrap().1.take();
    let t = lab.wait_hops(&[1, 2], Duration::from_secs(5))?;
    eprintln!("{kind:?}: engine 3's next hop withdrawn {t:?} after its backend stopped");
    let r = lab.spread(100)?;
    assert_eq!(r.errors, 0, "after the withdrawal: {:?}", r.error_samples);
    assert!(!r.per_engine.contains_key("b3"));
    // It comes back with its backend.
    let ns = lab.backends[&3].0.clone();
    let nginx = Nginx::start(
        &lab.lab,
        &ns,
        "b3",
        &[SocketAddr::from((backend_addr(3), 80))],
    )?;
    lab.backends.get_mut(&3).unwrap().1 = Some(nginx);
    lab.wait_hops(&ENGINES, Duration::from_secs(5))?;

    // Engine 2 drains its service (a reload): withdrawn.
    let pins = lab.engines[&2].2.clone();
    let draining = lab.config(2, pins.path(), true)?;
    lab.daemon_mut(2).reload(draining)?;
    let t = lab.wait_hops(&[1, 3], Duration::from_secs(3))?;
    eprintln!("{kind:?}: engine 2's next hop withdrawn {t:?} after it started draining");

    // kill -9 engine 3: the session closes with the process and the router withdraws by itself.
    lab.daemon(3).proc().kill();
    let t = lab.wait_hops(&[1], Duration::from_secs(3))?;
    eprintln!("{kind:?}: engine 3's next hop gone {t:?} after kill -9");
    let r = lab.spread(50)?;
    assert_eq!(r.errors, 0, "one engine left: {:?}", r.error_samples);
    assert_eq!(r.per_engine.get("b1"), Some(&50));

    // A graceful stop withdraws, then sends a Cease.
    let stopped = Instant::now();
    lab.daemon(1).stop(Duration::from_secs(5));
    lab.wait_hops(&[], Duration::from_secs(3))?;
    eprintln!(
        "{kind:?}: engine 1 stopped (SIGTERM) in {:?}",
        stopped.elapsed()
    );
    let log = lab.daemon(1).log_tail(40);
    assert!(
        log.contains("routes withdrawn, Cease sent"),
        "engine 1's log:\n{log}"
    );
    Ok(())
}

#[test]
fn bird_takes_an_ecmp_route_that_follows_the_engines_health() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    announce_spread_and_withdraw(Kind::Bird)
}

#[test]
fn frr_takes_an_ecmp_route_that_follows_the_engines_health() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    announce_spread_and_withdraw(Kind::Frr)
}

/// `GoBGP` as a third implementation: the session comes up, the route with its attributes is in
/// its RIB, a stop takes it out.
#[test]
fn gobgp_gets_the_route_and_loses_it_on_stop() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let lab = BgpLab::build(Kind::Gobgp, &[1, 2])?;
    let t = lab.wait_hops(&[1, 2], Duration::from_secs(20))?;
    eprintln!("GoBGP: both paths in its RIB after {t:?}");
    check_attributes(&lab)?;
    lab.daemon(2).stop(Duration::from_secs(5));
    let t = lab.wait_hops(&[1], Duration::from_secs(3))?;
    eprintln!("GoBGP: engine 2's path gone {t:?} after SIGTERM");
    let neighbors = lab.gobgp(&["neighbor"])?;
    let engine1 = neighbors
        .lines()
        .find(|l| l.contains("10.99.0.11"))
        .unwrap_or_default();
    assert!(
        engine1.contains("Establ"),
        "GoBGP's neighbours:\n{neighbors}"
    );
    Ok(())
}

/// IPv6: a /128 VIP announced over an IPv6 session (MP-BGP, `MP_REACH_NLRI` with the engine's
/// global address as next hop) reaches BIRD's kernel table as an ECMP route; each session carries
/// only its own family.
#[test]
fn an_ipv6_vip_reaches_the_router_over_an_ipv6_session() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let lab = BgpLab::build_with(Kind::Bird, &[1, 2], true)?;
    let t = lab.wait_hops6(&[1, 2], Duration::from_secs(20))?;
    eprintln!("IPv6: both next hops for {VIP6} in the router's table after {t:?}");
    lab.wait_hops(&[1, 2], Duration::from_secs(5))?;
    for id in [1, 2] {
        let text = lab.daemon(id).metrics()?;
        for peer in ["10.99.0.1:179", "[fd99::1]:179"] {
            let series = |name: &str| metric_value(&text, &format!("{name}{{peer=\"{peer}\"}}"));
            assert_eq!(
                series("lb_bgp_session_established"),
                Some(1.0),
                "se{id} {peer}"
            );
            // Each session announces the VIP of its own family and counts the other.
            assert_eq!(
                series("lb_bgp_routes_announced"),
                Some(1.0),
                "se{id} {peer}"
            );
        }
    }
    lab.daemon(2).proc().kill();
    let t = lab.wait_hops6(&[1], Duration::from_secs(3))?;
    eprintln!("IPv6: engine 2's next hop gone {t:?} after kill -9");
    Ok(())
}

/// BFD: an engine that hangs (SIGSTOP: its sessions stay open, nothing answers) loses its next hop
/// within the router's BFD detection time (3 × 100 ms), not the 9 s hold time; it comes back after
/// SIGCONT.
fn hung_engine_withdrawn_by_bfd(kind: Kind) -> Result<()> {
    let lab = BgpLab::build_full(kind, &[1, 2], false, true)?;
    lab.wait_hops(&[1, 2], Duration::from_secs(20))?;
    let start = Instant::now();
    while [1, 2]
        .iter()
        .any(|id| lab.metric(*id, "lb_bgp_bfd_up").unwrap_or(0) != 1)
    {
        ensure!(
            start.elapsed() < Duration::from_secs(10),
            "BFD did not come up:\n{}\n{}",
            lab.router_log(),
            lab.engine_logs()
        );
        std::thread::sleep(Duration::from_millis(50));
    }
    eprintln!(
        "{kind:?}: BFD up on both engines after {:?}",
        start.elapsed()
    );
    // It stays up: no session flaps (an engine slow to speed up after Up is timed out by the
    // router at the faster rate it announced).
    std::thread::sleep(Duration::from_secs(1));
    for id in [1, 2] {
        assert_eq!(
            lab.metric(id, "lb_bgp_bfd_up")?,
            1,
            "se{id}: BFD went down again"
        );
        assert_eq!(
            lab.metric(id, "lb_bgp_sessions_established_total")?,
            1,
            "se{id}: the BGP session restarted\n{}",
            lab.engine_logs()
        );
    }
    lab.daemon(2)
        .proc()
        .signal(nix::sys::signal::Signal::SIGSTOP)?;
    let t = lab.wait_hops(&[1], Duration::from_secs(3));
    lab.daemon(2)
        .proc()
        .signal(nix::sys::signal::Signal::SIGCONT)?;
    let t = t?;
    eprintln!("{kind:?}: engine 2's next hop gone {t:?} after SIGSTOP");
    assert!(t < Duration::from_secs(1), "withdrawn after {t:?}");
    let back = lab.wait_hops(&[1, 2], Duration::from_secs(15))?;
    eprintln!("{kind:?}: engine 2 back {back:?} after SIGCONT");
    Ok(())
}

#[test]
fn bird_bfd_withdraws_a_hung_engine_in_under_a_second() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    hung_engine_withdrawn_by_bfd(Kind::Bird)
}

#[test]
fn frr_bfd_withdraws_a_hung_engine_in_under_a_second() -> Result<()> {
    if !require_root() {
        return Ok(());
    }
    hung_engine_withdrawn_by_bfd(Kind::Frr)
}
