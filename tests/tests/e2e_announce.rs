//! End to end: `lb_daemon::announce` against real neighbour tables. An engine namespace `se` runs
//! `VipAddresses` and `announce` (a current-thread tokio runtime on a thread inside `se`); three
//! client namespaces on the same segment show what a host sees:
//!
//! - `client` (`arp_accept=0`, the default) holds a neighbour entry for the VIP with a wrong MAC
//!   (the "old primary"): the gratuitous ARP / unsolicited NA (Override) rewrites it to se's MAC
//!   within a second;
//! - `quiet` (`arp_accept=0`, no entry): nothing is created; it also runs tcpdump, the real peer
//!   that counts the frames on the wire;
//! - `accept` (`arp_accept=1`, no entry): the gratuitous ARP creates an entry.
//!
//! While the VIP is on `lo` (a secondary), nobody gets an ARP / ND answer for it. Moves add to the
//! new place before removing from the old one (seen with `ip monitor address`), and `place` is
//! idempotent. Needs root (the test fails, rather than skips, without root when CI=true).

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr};
use std::path::Path;
use std::sync::Arc;
use std::sync::atomic::Ordering;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail};
use lb_daemon::announce::{AnnounceCounters, AnnounceError, Placed, VipAddresses, announce};
use lb_tests::lab::{Output, fmt_mac};
use lb_tests::netns::enter;
use lb_tests::{Lab, Ns, Proc, is_root};
use serde_json::Value;
use tokio::sync::mpsc;

const VIP4: Ipv4Addr = Ipv4Addr::new(10, 100, 0, 10);
const VIP6: Ipv6Addr = Ipv6Addr::new(0xfd00, 0x100, 0, 0, 0, 0, 0, 0x10);
const WRONG_MAC: &str = "02:00:00:00:00:99";

/// Root, or a skip note; without root under CI=true the test fails (it must run there).
fn root_or_skip() -> bool {
    if is_root() {
        return true;
    }
    assert!(
        std::env::var("CI").as_deref() != Ok("true"),
        "CI=true but not running as root: e2e_announce must run in CI"
    );
    eprintln!("skipping: needs root (network namespaces, raw sockets)");
    false
}

type Reply<T> = std::sync::mpsc::Sender<Result<T, AnnounceError>>;

enum Cmd {
    Place(IpAddr, bool, Reply<Placed>),
    Remove(IpAddr, Reply<bool>),
    Announce(IpAddr, Arc<AnnounceCounters>),
    /// Waits for every announcement started so far.
    Finish(std::sync::mpsc::Sender<()>),
}

/// `VipAddresses` living on a thread inside the engine namespace, driven from the test's thread.
struct Engine {
    tx: Option<mpsc::UnboundedSender<Cmd>>,
    thread: Option<std::thread::JoinHandle<()>>,
    mac: [u8; 6],
    ifindex: u32,
}

impl Engine {
    fn start(ns: &Ns, interface: &str) -> Result<Engine> {
        let (tx, mut rx) = mpsc::unbounded_channel::<Cmd>();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<([u8; 6], u32)>>();
        let ns = ns.name().to_owned();
        let interface = interface.to_owned();
        let thread = std::thread::spawn(move || {
            let rt = match enter(&ns).and_then(|()| {
                tokio::runtime::Builder::new_current_thread()
                    .enable_all()
                    .build()
                    .context("tokio runtime")
            }) {
                Ok(rt) => rt,
                Err(e) => {
                    let _ = ready_tx.send(Err(e));
                    return;
                }
            };
            rt.block_on(async move {
                let vips = match VipAddresses::new(&interface).await {
                    Ok(v) => v,
                    Err(e) => {
                        let _ = ready_tx.send(Err(e.into()));
                        return;
                    }
                };
                let _ = ready_tx.send(Ok((vips.mac(), vips.ifindex())));
                let mut running = Vec::new();
                while let Some(cmd) = rx.recv().await {
                    match cmd {
                        Cmd::Place(vip, on_interface, reply) => {
                            let _ = reply.send(vips.place(vip, on_interface).await);
                        }
                        Cmd::Remove(vip, reply) => {
                            let _ = reply.send(vips.remove(vip).await);
                        }
                        Cmd::Announce(vip, counters) => {
                            running.push(announce(vips.ifindex(), vips.mac(), vip, counters));
                        }
                        Cmd::Finish(reply) => {
                            for h in running.drain(..) {
                                let _ = h.await;
                            }
                            let _ = reply.send(());
                        }
                    }
                }
            });
        });
        let (mac, ifindex) = ready_rx
            .recv_timeout(Duration::from_secs(5))
            .context("engine thread did not start")??;
        Ok(Engine {
            tx: Some(tx),
            thread: Some(thread),
            mac,
            ifindex,
        })
    }

    fn send(&self, cmd: Cmd) -> Result<()> {
        self.tx
            .as_ref()
            .context("engine stopped")?
            .send(cmd)
            .map_err(|_| anyhow!("engine thread gone"))
    }

    fn place(&self, vip: IpAddr, on_interface: bool) -> Result<Placed> {
        let (reply, rx) = std::sync::mpsc::channel();
        self.send(Cmd::Place(vip, on_interface, reply))?;
        Ok(rx.recv_timeout(Duration::from_secs(5))??)
    }

    fn remove(&self, vip: IpAddr) -> Result<bool> {
        let (reply, rx) = std::sync::mpsc::channel();
        self.send(Cmd::Remove(vip, reply))?;
        Ok(rx.recv_timeout(Duration::from_secs(5))??)
    }

    fn announce(&self, vip: IpAddr, counters: &Arc<AnnounceCounters>) -> Result<()> {
        self.send(Cmd::Announce(vip, Arc::clone(counters)))
    }

    fn finish(&self, timeout: Duration) -> Result<()> {
        let (reply, rx) = std::sync::mpsc::channel();
        self.send(Cmd::Finish(reply))?;
        rx.recv_timeout(timeout)
            .context("announcements did not finish")
    }
}

impl Drop for Engine {
    fn drop(&mut self) {
        drop(self.tx.take());
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

/// The interfaces of `ns` holding `vip` as a host address (/32, /128), from `ip -j addr`.
fn vip_devices(lab: &Lab, ns: &Ns, vip: IpAddr) -> Result<Vec<String>> {
    let out = lab.ip(ns, &["-j", "addr", "show"])?;
    let links: Value = serde_json::from_str(&out).context("ip -j addr")?;
    let want_prefix = if vip.is_ipv4() { 32 } else { 128 };
    let mut devs = Vec::new();
    for link in links.as_array().into_iter().flatten() {
        let has = link["addr_info"].as_array().into_iter().flatten().any(|a| {
            a["local"].as_str().and_then(|s| s.parse::<IpAddr>().ok()) == Some(vip)
                && a["prefixlen"].as_u64() == Some(want_prefix)
        });
        if has {
            devs.push(link["ifname"].as_str().unwrap_or("?").to_owned());
        }
    }
    Ok(devs)
}

/// `(lladdr, states)` of the neighbour entry for `vip` on `eth0` of `ns`, if there is one.
fn neighbour(lab: &Lab, ns: &Ns, vip: IpAddr) -> Result<Option<(Option<String>, Vec<String>)>> {
    let vip = vip.to_string();
    let out = lab.ip(ns, &["-j", "neigh", "show", "to", &vip, "dev", "eth0"])?;
    let entries: Value = serde_json::from_str(&out).context("ip -j neigh")?;
    Ok(entries.as_array().and_then(|a| a.first()).map(|e| {
        let lladdr = e["lladdr"].as_str().map(str::to_owned);
        let states = e["state"]
            .as_array()
            .into_iter()
            .flatten()
            .filter_map(|s| s.as_str().map(str::to_owned))
            .collect();
        (lladdr, states)
    }))
}

fn lladdr(lab: &Lab, ns: &Ns, vip: IpAddr) -> Option<String> {
    neighbour(lab, ns, vip).ok().flatten().and_then(|(l, _)| l)
}

/// Polls `f` every 10 ms until it holds or `timeout` passes; returns the time it took.
fn wait_for(timeout: Duration, mut f: impl FnMut() -> bool) -> Option<Duration> {
    let start = Instant::now();
    loop {
        if f() {
            return Some(start.elapsed());
        }
        if start.elapsed() >= timeout {
            return None;
        }
        std::thread::sleep(Duration::from_millis(10));
    }
}

/// Starts `argv` in `ns` with its output in `file` and waits until `ready` appears there.
fn spawn_ready(lab: &Lab, ns: &Ns, argv: &[&str], file: &Path, ready: &str) -> Result<Proc> {
    let p = lab.spawn(ns, argv, &Output::File(file.to_owned()))?;
    let seen = wait_for(Duration::from_secs(5), || {
        std::fs::read_to_string(file).is_ok_and(|s| s.contains(ready))
    });
    if seen.is_none() {
        bail!(
            "`{}` not ready: {}",
            argv.join(" "),
            std::fs::read_to_string(file).unwrap_or_default()
        );
    }
    Ok(p)
}

/// Adds `cidr` to `eth0` of `ns` without duplicate address detection (usable at once).
fn add_v6(lab: &Lab, ns: &Ns, cidr: &str) -> Result<()> {
    lab.ip(ns, &["-6", "addr", "add", cidr, "dev", "eth0", "nodad"])?;
    Ok(())
}

#[test]
#[allow(clippy::too_many_lines)]
fn vip_moves_and_announcements_update_neighbours() {
    if !root_or_skip() {
        return;
    }
    let test_start = Instant::now();
    let tmp = tempfile::tempdir().unwrap();
    let lab = Lab::new("lbtan").unwrap();
    let se = lab.add_ns("se").unwrap();
    let se_if = lab.attach(&se, "eth0", "10.77.0.11/24").unwrap();
    add_v6(&lab, &se, "fd00:77::11/64").unwrap();
    let mut clients = Vec::new();
    for (role, v4, v6) in [
        ("client", "10.77.0.2/24", "fd00:77::2/64"),
        ("quiet", "10.77.0.3/24", "fd00:77::3/64"),
        ("accept", "10.77.0.4/24", "fd00:77::4/64"),
    ] {
        let ns = lab.add_ns(role).unwrap();
        lab.attach(&ns, "eth0", v4).unwrap();
        add_v6(&lab, &ns, v6).unwrap();
        // The VIPs are on-link for clients (they ARP / solicit for the VIP itself). The route also
        // makes the VIP a unicast on-link sender, which Linux requires of a gratuitous ARP.
        lab.ip(&ns, &["route", "add", "10.100.0.0/24", "dev", "eth0"])
            .unwrap();
        lab.ip(&ns, &["-6", "route", "add", "fd00:100::/64", "dev", "eth0"])
            .unwrap();
        clients.push(ns);
    }
    let [client, quiet, accept] = <[Ns; 3]>::try_from(clients).unwrap();
    lab.sysctl(&accept, "net.ipv4.conf.eth0.arp_accept", "1")
        .unwrap();
    let se_mac = fmt_mac(&se_if.mac);
    let v4 = IpAddr::V4(VIP4);
    let v6 = IpAddr::V6(VIP6);

    let engine = Engine::start(&se, "eth0").unwrap();
    assert_eq!(engine.mac, se_if.mac, "MAC resolved by netlink");
    let link: Value =
        serde_json::from_str(&lab.ip(&se, &["-j", "link", "show", "dev", "eth0"]).unwrap())
            .unwrap();
    assert_eq!(link[0]["ifindex"].as_u64(), Some(u64::from(engine.ifindex)));
    for dev in ["all", "eth0"] {
        for (key, want) in [("arp_ignore", "1"), ("arp_announce", "2")] {
            let k = format!("net.ipv4.conf.{dev}.{key}");
            let v = lab.exec(&se, &["sysctl", "-n", &k]).unwrap();
            assert_eq!(v.trim(), want, "{k} in se");
        }
    }

    // --- Secondary: the VIPs on lo; nobody gets an ARP / ND answer for them. ---
    assert_eq!(engine.place(v4, false).unwrap(), Placed::Added);
    assert_eq!(engine.place(v6, false).unwrap(), Placed::Added);
    assert_eq!(engine.place(v4, false).unwrap(), Placed::Unchanged);
    assert_eq!(vip_devices(&lab, &se, v4).unwrap(), ["lo"]);
    assert_eq!(vip_devices(&lab, &se, v6).unwrap(), ["lo"]);
    // Control: se's own addresses do resolve, so the silence below means something.
    lab.exec(&client, &["ping", "-c1", "-W2", "10.77.0.11"])
        .unwrap();
    lab.exec(&client, &["ping", "-6", "-c1", "-W2", "fd00:77::11"])
        .unwrap();
    // (iputils-arping is not installed here; a ping makes the client ARP / solicit the VIP.)
    for vip in [v4, v6] {
        let r = lab.exec(&client, &["ping", "-c1", "-W1", &vip.to_string()]);
        assert!(r.is_err(), "ping {vip} answered while it is on se's lo");
        let n = neighbour(&lab, &client, vip).unwrap();
        assert!(
            n.as_ref()
                .is_none_or(|(l, _)| l.as_deref() != Some(&*se_mac)),
            "se answered ARP/ND for {vip} from lo: {n:?}"
        );
    }

    // --- Primary, IPv4: an entry with the old primary's MAC is rewritten by the gratuitous ARP. ---
    lab.ip(
        &client,
        &[
            "neigh",
            "replace",
            "10.100.0.10",
            "lladdr",
            WRONG_MAC,
            "dev",
            "eth0",
            "nud",
            "stale",
        ],
    )
    .unwrap();
    assert_eq!(lladdr(&lab, &client, v4).as_deref(), Some(WRONG_MAC));
    for ns in [&quiet, &accept] {
        assert_eq!(neighbour(&lab, ns, v4).unwrap(), None, "{ns}");
    }
    let capture = tmp.path().join("tcpdump.txt");
    let tcpdump = spawn_ready(
        &lab,
        &quiet,
        &["tcpdump", "-i", "eth0", "-n", "-e", "-l", "-tt", "arp"],
        &capture,
        "listening on",
    )
    .unwrap();
    let monitor_log = tmp.path().join("monitor.txt");
    let monitor = lab
        .spawn(
            &se,
            &["ip", "monitor", "address"],
            &Output::File(monitor_log.clone()),
        )
        .unwrap();
    // Ready once it reports a probe address.
    let ready = wait_for(Duration::from_secs(5), || {
        let _ = lab.ip(&se, &["addr", "add", "127.0.0.77/32", "dev", "lo"]);
        let _ = lab.ip(&se, &["addr", "del", "127.0.0.77/32", "dev", "lo"]);
        std::fs::read_to_string(&monitor_log).is_ok_and(|s| s.contains("127.0.0.77"))
    });
    assert!(ready.is_some(), "ip monitor address never reported");

    assert_eq!(engine.place(v4, true).unwrap(), Placed::Moved);
    assert_eq!(vip_devices(&lab, &se, v4).unwrap(), ["eth0"]);
    let counters = Arc::new(AnnounceCounters::default());
    let t4 = Instant::now();
    engine.announce(v4, &counters).unwrap();
    let took = wait_for(Duration::from_secs(1), || {
        lladdr(&lab, &client, v4).as_deref() == Some(&*se_mac)
    });
    assert!(
        took.is_some(),
        "client's entry for {v4} not updated within 1 s: {:?}",
        neighbour(&lab, &client, v4)
    );
    eprintln!("IPv4 entry with a wrong MAC updated after {took:?}");
    // arp_accept=1: the gratuitous ARP creates an entry where there was none.
    let created = wait_for(Duration::from_secs(1), || {
        lladdr(&lab, &accept, v4).as_deref() == Some(&*se_mac)
    });
    assert!(
        created.is_some(),
        "arp_accept=1: no entry created: {:?}",
        neighbour(&lab, &accept, v4)
    );

    // The add on eth0 came before the delete on lo.
    monitor.stop(Duration::from_millis(200));
    let events = std::fs::read_to_string(&monitor_log).unwrap();
    let lines: Vec<&str> = events
        .lines()
        .filter(|l| l.contains("10.100.0.10"))
        .collect();
    let added = lines
        .iter()
        .position(|l| !l.starts_with("Deleted") && l.contains("eth0"));
    let deleted = lines
        .iter()
        .position(|l| l.starts_with("Deleted") && l.contains(" lo"));
    assert!(
        matches!((added, deleted), (Some(a), Some(d)) if a < d),
        "not add-then-delete: {lines:#?}"
    );

    // tcpdump on a real peer saw the announcements: sends at 0, 0.25 and 1 s fall in 1.5 s.
    std::thread::sleep(Duration::from_millis(1500).saturating_sub(t4.elapsed()));
    tcpdump.stop(Duration::from_millis(500));
    let captured = std::fs::read_to_string(&capture).unwrap();
    let from_se = format!("{se_mac} > ff:ff:ff:ff:ff:ff");
    // `-tt`: each line starts with the capture time in seconds.
    let garps: Vec<f64> = captured
        .lines()
        .filter(|l| {
            l.contains(&from_se)
                && (l.contains("Announcement 10.100.0.10")
                    || l.contains("who-has 10.100.0.10 tell 10.100.0.10"))
        })
        .filter_map(|l| l.split_whitespace().next()?.parse().ok())
        .collect();
    assert!(
        garps.len() >= 2,
        "tcpdump saw {} gratuitous ARPs in 1.5 s:\n{captured}",
        garps.len()
    );
    let gap = garps[1] - garps[0];
    assert!(
        (0.2..0.4).contains(&gap),
        "second gratuitous ARP {gap:.3} s after the first, not 0.25 s:\n{captured}"
    );
    eprintln!(
        "tcpdump saw {} gratuitous ARPs in the first 1.5 s, the second {gap:.3} s after the first",
        garps.len()
    );
    // arp_accept=0 (the default): after 3 gratuitous ARPs still no entry where there was none.
    assert_eq!(
        neighbour(&lab, &quiet, v4).unwrap(),
        None,
        "arp_accept=0 created an entry"
    );

    // --- Primary, IPv6: the unsolicited NA (Override) rewrites an entry with a wrong MAC. ---
    lab.ip(
        &client,
        &[
            "-6",
            "neigh",
            "replace",
            "fd00:100::10",
            "lladdr",
            WRONG_MAC,
            "dev",
            "eth0",
            "nud",
            "stale",
        ],
    )
    .unwrap();
    assert_eq!(lladdr(&lab, &client, v6).as_deref(), Some(WRONG_MAC));
    assert_eq!(engine.place(v6, true).unwrap(), Placed::Moved);
    assert_eq!(vip_devices(&lab, &se, v6).unwrap(), ["eth0"]);
    engine.announce(v6, &counters).unwrap();
    let took = wait_for(Duration::from_secs(1), || {
        lladdr(&lab, &client, v6).as_deref() == Some(&*se_mac)
    });
    assert!(
        took.is_some(),
        "client's entry for {v6} not updated within 1 s: {:?}",
        neighbour(&lab, &client, v6)
    );
    eprintln!("IPv6 entry with a wrong MAC updated after {took:?}");
    // Without an entry nothing is created (accept_untracked_na=0, the default).
    std::thread::sleep(Duration::from_millis(300));
    assert_eq!(neighbour(&lab, &quiet, v6).unwrap(), None);
    // And now se answers for the VIP itself: the path works end to end.
    lab.exec(&quiet, &["ping", "-c1", "-W2", "10.100.0.10"])
        .unwrap();
    lab.exec(&quiet, &["ping", "-6", "-c1", "-W2", "fd00:100::10"])
        .unwrap();

    // Each announcement is 5 frames over 4 s.
    engine.finish(Duration::from_secs(6)).unwrap();
    assert_eq!(counters.garp_sent.load(Ordering::Relaxed), 5);
    assert_eq!(counters.na_sent.load(Ordering::Relaxed), 5);
    assert_eq!(counters.send_errors.load(Ordering::Relaxed), 0);

    // --- Back to secondary: off eth0, on lo; idempotent. Then the VS is deleted. ---
    for vip in [v4, v6] {
        assert_eq!(engine.place(vip, false).unwrap(), Placed::Moved, "{vip}");
        assert_eq!(vip_devices(&lab, &se, vip).unwrap(), ["lo"], "{vip}");
        assert_eq!(
            engine.place(vip, false).unwrap(),
            Placed::Unchanged,
            "{vip}"
        );
    }
    for vip in [v4, v6] {
        assert!(engine.remove(vip).unwrap(), "{vip}");
        assert!(vip_devices(&lab, &se, vip).unwrap().is_empty(), "{vip}");
        assert!(!engine.remove(vip).unwrap(), "{vip}: removed twice");
    }
    eprintln!("whole test took {:?}", test_start.elapsed());
}
