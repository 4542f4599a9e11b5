//! The lab itself: namespaces, bridge, cleanup, nginx, `XDP_PASS` on the bridge ports, bpffs pins.
//! No daemon needed. Needs root.

use std::collections::BTreeMap;
use std::net::{Ipv4Addr, SocketAddr};
use std::path::Path;
use std::time::Duration;

use lb_tests::client::{HeldConnection, Load, http_load, one_request};
use lb_tests::cmd::run;
use lb_tests::daemon::PinDir;
use lb_tests::engine::{Role, setup_client, setup_engine};
use lb_tests::lab::Output;
use lb_tests::netns::in_ns;
use lb_tests::{Lab, require_root};

const VIP: Ipv4Addr = Ipv4Addr::new(10, 78, 0, 10);

fn netns_list() -> String {
    run(&["ip", "netns", "list"]).unwrap()
}

fn assert_gone(names: &[String]) {
    let list = netns_list();
    for n in names {
        assert!(
            !list.lines().any(|l| l.split_whitespace().next() == Some(n)),
            "namespace {n} left behind"
        );
    }
}

#[test]
fn namespaces_bridge_ping_and_cleanup() {
    if !require_root() {
        return;
    }
    let names;
    let pid;
    {
        let lab = Lab::new("lbtb").unwrap();
        let a = lab.add_ns("a").unwrap();
        let b = lab.add_ns("b").unwrap();
        let ia = lab.attach(&a, "eth0", "10.77.0.2/24").unwrap();
        lab.attach(&b, "eth0", "10.77.0.3/24").unwrap();
        assert_eq!(ia.mac_string(), "02:00:0a:4d:00:02");
        let link = lab.ip(&a, &["link", "show", "dev", "eth0"]).unwrap();
        assert!(link.contains("02:00:0a:4d:00:02"), "{link}");
        let feats = lab.exec(&a, &["ethtool", "-k", "eth0"]).unwrap();
        assert!(
            feats.contains("tx-checksumming: off"),
            "tx checksum offload still on: {feats}"
        );
        lab.exec(&a, &["ping", "-c", "2", "-W", "2", "10.77.0.3"])
            .unwrap();
        // The switch forwards what a real one does: no br_netfilter checks (trap 3).
        let sw = lab.switch().unwrap();
        for table in ["iptables", "ip6tables", "arptables"] {
            let key = format!("net.bridge.bridge-nf-call-{table}");
            if let Ok(v) = lab.exec(&sw, &["sysctl", "-n", &key]) {
                assert_eq!(v.trim(), "0", "{key} in the switch namespace");
            }
        }
        lab.sysctl(&b, "net.ipv4.conf.all.arp_ignore", "1").unwrap();
        assert_eq!(
            lab.exec(&b, &["sysctl", "-n", "net.ipv4.conf.all.arp_ignore"])
                .unwrap()
                .trim(),
            "1"
        );
        let sleeper = lab.spawn(&a, &["sleep", "1000"], &Output::Null).unwrap();
        pid = sleeper.pid();
        assert!(sleeper.is_running());
        names = lab
            .namespaces()
            .iter()
            .map(|n| n.name().to_owned())
            .collect::<Vec<_>>();
        assert_eq!(names.len(), 3, "{names:?}"); // a, b, sw
        let list = netns_list();
        for n in &names {
            assert!(list.contains(n.as_str()), "{n} missing in {list}");
        }
    }
    assert_gone(&names);
    assert!(
        !Path::new("/proc").join(pid.to_string()).exists(),
        "process {pid} survived the lab"
    );
}

#[test]
fn cleanup_on_panic() {
    if !require_root() {
        return;
    }
    let names = std::sync::Mutex::new(Vec::new());
    let r = std::panic::catch_unwind(|| {
        let lab = Lab::new("lbtp").unwrap();
        let a = lab.add_ns("a").unwrap();
        lab.attach(&a, "eth0", "10.77.0.2/24").unwrap();
        names
            .lock()
            .unwrap()
            .extend(lab.namespaces().iter().map(|n| n.name().to_owned()));
        panic!("boom");
    });
    assert!(r.is_err());
    let names = names.into_inner().unwrap();
    assert_eq!(names.len(), 2);
    assert_gone(&names);
}

#[test]
fn nginx_engines_answer_their_name_across_the_bridge() {
    if !require_root() {
        return;
    }
    let lab = Lab::new("lbtn").unwrap();
    let client = setup_client(&lab, "client", "10.77.0.2/24").unwrap();
    let se1 = setup_engine(&lab, "se1", 1, "10.77.0.11/24", VIP, 80, Role::Primary).unwrap();
    let se2 = setup_engine(&lab, "se2", 2, "10.77.0.12/24", VIP, 80, Role::Secondary).unwrap();
    let vip = SocketAddr::from((VIP, 80));

    // Without steering every connection reaches the primary (only it answers ARP for the VIP).
    let r = http_load(&client.ns, &Load::new(vip, 200)).unwrap();
    assert_eq!(r.errors, 0, "{r}");
    let mut want = BTreeMap::new();
    want.insert("se1".to_owned(), 100.0);
    r.check_spread(&want, 0.0).unwrap();
    assert!(se1.nginx.requests_logged() >= 200);

    // The secondary holds the VIP on lo and answers locally.
    let name = in_ns(se2.ns.name(), || one_request(vip, Duration::from_secs(2))).unwrap();
    assert_eq!(name, "se2");

    // Only se1's MAC is in the client's neighbour table for the VIP.
    let neigh = lab
        .ip(&client.ns, &["neigh", "show", &VIP.to_string()])
        .unwrap();
    assert!(neigh.contains(&se1.iface.mac_string()), "{neigh}");

    // A held keep-alive connection answers again later.
    let mut held = HeldConnection::open(&client.ns, vip, Duration::from_secs(2)).unwrap();
    assert_eq!(held.get().unwrap(), "se1");
    std::thread::sleep(Duration::from_millis(200));
    assert_eq!(held.get().unwrap(), "se1");
}

#[test]
fn xdp_pass_on_bridge_ports() {
    if !require_root() {
        return;
    }
    let object = lb_tests::testkit_object();
    assert!(
        object.exists(),
        "{} not built: cargo xtask build-ebpf",
        object.display()
    );
    let lab = Lab::new("lbtx").unwrap();
    let a = lab.add_ns("a").unwrap();
    let ia = lab.attach(&a, "eth0", "10.77.0.2/24").unwrap();
    lab.enable_xdp_pass(&object).unwrap(); // attaches to the existing port ...
    let b = lab.add_ns("b").unwrap();
    let ib = lab.attach(&b, "eth0", "10.77.0.3/24").unwrap(); // ... and to later ones
    let sw = lab.switch().unwrap();
    for port in [&ia.port, &ib.port] {
        let link = lab.ip(&sw, &["link", "show", "dev", port]).unwrap();
        assert!(link.contains(" xdp"), "{port}: {link}");
    }
    lab.exec(&a, &["ping", "-c", "2", "-W", "2", "10.77.0.3"])
        .unwrap();
}

#[test]
fn pin_dir_is_a_private_bpffs() {
    if !require_root() {
        return;
    }
    let path;
    {
        let pins = PinDir::new(&format!("lbtpin{}", std::process::id())).unwrap();
        path = pins.path().to_owned();
        let fs = run(&["stat", "-f", "-c", "%T", path.to_str().unwrap()]).unwrap();
        assert_eq!(fs.trim(), "bpf_fs");
    }
    assert!(!path.exists(), "{} left behind", path.display());
}
