//! End to end: the failures failover must tell apart, and the input it must refuse.
//!
//! - A primary whose **daemon crashed** (`kill -9`) while its data plane still steers is not
//!   replaced: its peers see its echoes, nobody promotes itself, the surviving engines' connections
//!   live, and new connections are served (its XDP program places them on engines with a
//!   listener). Restarted on the same pins, it takes its role back with no change anywhere.
//! - With the **controller stopped**, a primary whose host goes away is still replaced: the
//!   engines agree by the succession rule alone. The controller, started again, records what they
//!   decided.
//! - **Forged or stray messages** on the peer port are refused and counted by reason, and change
//!   nothing: no peer goes down, no role moves, no persistence entry is written.

use std::net::{IpAddr, Ipv4Addr, SocketAddr, UdpSocket};
use std::time::{Duration, Instant};

use lb_daemon::peers::{Kind, Message, seal};
use lb_tests::client::{Keeper, one_request, served_again, unknown_segments};
use lb_tests::controller_lab::{ControllerLab, placement};
use lb_tests::daemon::metric_sum;
use lb_tests::netns::{enter, in_ns};
use lb_tests::require_root;

/// A metric summed over the running daemons of `ids`.
fn metric_of(l: &ControllerLab, ids: &[u8], name: &str, labels: &[(&str, &str)]) -> f64 {
    ids.iter()
        .filter_map(|id| l.daemon(*id)?.metrics().ok())
        .map(|m| metric_sum(&m, name, labels))
        .sum()
}

#[test]
#[allow(clippy::too_many_lines)]
fn a_primary_whose_daemon_crashed_is_not_replaced_while_it_steers() {
    if !require_root() {
        return;
    }
    let (mut l, placement) = ControllerLab::with_web_service("lbtk", 3, &[])
        .expect("build the controller lab with a web service");
    let id_of = |name: &str| l.id_of(name).unwrap();
    let primary = id_of(&placement[0]);
    let secondaries: Vec<u8> = placement[1..].iter().map(|n| id_of(n)).collect();
    let client = l.lab.client(0).clone();
    let keeper = Keeper::start(&client, l.lab.vip_http(), 150, Duration::from_secs(1)).unwrap();
    std::thread::sleep(Duration::from_millis(1500));
    let owner_of = l.connection_owners().unwrap();

    l.kill_daemon(primary).unwrap();
    let killed = Instant::now();
    // Longer than the controller takes to fail the primary by its heartbeats (about 3 s).
    std::thread::sleep(Duration::from_secs(5));
    let r = l.lab.load(60).unwrap();
    let report = keeper.finish().unwrap();
    println!(
        "{:?} after the kill: new connections {r}; held {} (lost {}, moved {}), rounds {}",
        killed.elapsed(),
        report.connections,
        report.failed.len(),
        report.moved.len(),
        report.rounds
    );
    let daemon_downs = metric_of(
        &l,
        &secondaries,
        "lb_peer_transitions_total",
        &[("signal", "daemon"), ("to", "down")],
    );
    // Each secondary's view (its heartbeats, through the controller): the primary's daemon down,
    // its data plane up. (The transitions are counted over all peers: under load another peer may
    // miss probes for a moment too.)
    assert!(
        daemon_downs >= 2.0,
        "both secondaries saw the primary's daemon go: {daemon_downs}"
    );
    let engines = l.lbctl(&["engines"]).unwrap().json().unwrap();
    for s in &secondaries {
        let view = engines
            .as_array()
            .unwrap()
            .iter()
            .find(|e| e["id"] == u64::from(*s))
            .and_then(|e| e["peers"].as_array())
            .and_then(|p| p.iter().find(|p| p["id"] == u64::from(primary)).cloned())
            .unwrap_or_else(|| panic!("engine {s} reports on the primary: {engines}"));
        assert_eq!(
            (&view["daemon_up"], &view["dataplane_up"]),
            (
                &serde_json::Value::Bool(false),
                &serde_json::Value::Bool(true)
            ),
            "engine {s} sees the primary's daemon down, its data plane up: {view}"
        );
    }
    assert!(
        metric_of(
            &l,
            &secondaries,
            "lb_peer_transitions_total",
            &[("signal", "dataplane"), ("to", "down")]
        )
        .abs()
            < f64::EPSILON,
        "its data plane never stopped echoing"
    );
    assert!(
        metric_of(&l, &secondaries, "lb_promotions_total", &[]).abs() < f64::EPSILON,
        "no secondary promoted itself"
    );
    assert_eq!(l.vip_holders().unwrap(), [placement[0].clone()]);
    assert_eq!(r.errors, 0, "new connections while the daemon is down: {r}");
    // Only the connections the dead proxy held are gone.
    for (i, e) in &report.failed {
        let c = report.clients[*i];
        assert_eq!(
            owner_of.get(&c),
            Some(&primary),
            "{c} failed ({e}) but was not the dead proxy's"
        );
    }
    assert!(
        owner_of.values().filter(|o| **o != primary).count() > 50,
        "the secondaries held connections: {owner_of:?}"
    );
    assert!(report.moved.is_empty(), "moved: {:?}", report.moved);
    let v = l.lbctl(&["vs", "get", "web"]).unwrap().json().unwrap();
    assert_eq!(
        lb_tests::controller_lab::placement(&v)[0],
        placement[0],
        "the controller kept it: {v}"
    );
    assert_eq!(v["epoch"], 0, "{v}");

    // Restarted on its pins (systemd's job), it serves as before; nobody changes role.
    l.start_daemon(primary).unwrap();
    let ids: Vec<u8> = l.lab.engines.iter().map(|e| e.id).collect();
    l.wait(
        Duration::from_secs(20),
        "the restarted primary applied the snapshot",
        |l| Ok(l.applied_everywhere(&ids)?.is_some()),
    )
    .unwrap();
    l.wait_all_hear(&placement).unwrap();
    let r = l.lab.load(60).unwrap();
    assert_eq!(r.errors, 0, "after the restart: {r}");
    assert_eq!(l.vip_holders().unwrap(), [placement[0].clone()]);
    for id in &ids {
        let m = l.daemon(*id).unwrap().metrics().unwrap();
        assert!(
            metric_sum(&m, "lb_demotions_total", &[]).abs() < f64::EPSILON,
            "engine {id} demoted"
        );
        if *id != primary {
            assert!(
                metric_sum(&m, "lb_promotions_total", &[]).abs() < f64::EPSILON,
                "engine {id} promoted"
            );
        }
    }
}

#[test]
fn without_the_controller_a_gone_primary_is_still_replaced() {
    if !require_root() {
        return;
    }
    let (mut l, placement) = ControllerLab::with_web_service("lbtc", 3, &[])
        .expect("build the controller lab with a web service");
    let old_ns = l.engine_ns(l.id_of(&placement[0]).unwrap()).unwrap();
    assert!(l.stop_controller(), "the controller stopped cleanly");

    let gone = Instant::now();
    l.lab
        .lab
        .ip(&old_ns, &["link", "set", "eth0", "down"])
        .unwrap();
    let served = served_again(
        l.lab.client(0),
        l.lab.vip_http(),
        gone,
        Duration::from_millis(250),
        Duration::from_secs(5),
    );
    println!("without the controller, the VIP was served again after {served:?}");
    let served = served.expect("the VIP is served again");
    assert!(served < Duration::from_secs(1), "{served:?}");
    // The old primary, cut off, still has it on its dead link; nothing reaches it there.
    assert!(l.vip_holders().unwrap().contains(&placement[1]));
    let r = l.lab.load(60).unwrap();
    assert_eq!(r.errors, 0, "{r}");

    // The controller comes back and records what the engines decided.
    l.start_controller().unwrap();
    l.wait(
        Duration::from_secs(20),
        "the controller records the promotion",
        |l| Ok(l.recorded_primary("web")? == (Some(placement[1].clone()), 1)),
    )
    .unwrap();
    // The old primary's link back: it hears the higher epoch (and the controller's snapshot says
    // the same) and gives the VIP up.
    l.lab
        .lab
        .ip(&old_ns, &["link", "set", "eth0", "up"])
        .unwrap();
    l.wait(Duration::from_secs(10), "one VIP holder", |l| {
        Ok(l.vip_holders()? == [placement[1].clone()])
    })
    .unwrap();
    let r = l.lab.load(60).unwrap();
    assert_eq!(r.errors, 0, "{r}");
}

/// A datagram shaped like a peer message: header, body, and `mac` as its tag.
fn raw_message(kind: u8, from: u32, body: &[u8], mac: [u8; 16]) -> Vec<u8> {
    let mut b = b"LBP2".to_vec();
    b.extend_from_slice(&[kind, 0, 0, 0]);
    b.extend_from_slice(&from.to_be_bytes());
    b.extend_from_slice(&1u64.to_be_bytes());
    b.extend_from_slice(&1u64.to_be_bytes());
    b.extend_from_slice(body);
    b.extend_from_slice(&mac);
    b
}

#[test]
#[allow(clippy::too_many_lines)]
fn forged_and_stray_peer_messages_are_refused_and_counted() {
    if !require_root() {
        return;
    }
    let (l, placement) =
        ControllerLab::with_web_service("lbtz", 3, &["--persistence-timeout-s", "300"])
            .expect("build the controller lab with a web service");
    let id_of = |name: &str| l.id_of(name).unwrap();
    let target_id = id_of(&placement[1]);
    let other_secondary = id_of(&placement[2]);
    let applied = l.applied(&placement[1]).expect("a saved snapshot");
    let peers = applied
        .desired
        .peers
        .clone()
        .expect("[peers] from the controller");
    let key = ring::hmac::Key::new(
        ring::hmac::HMAC_SHA256,
        &peers.key_bytes().expect("a valid key"),
    );
    let to = SocketAddr::new(
        IpAddr::V4(Ipv4Addr::new(10, 77, 0, 10 + target_id)),
        peers.port,
    );
    let refused = |reason: &str| {
        metric_of(
            &l,
            &[target_id],
            "lb_peer_probes_refused_total",
            &[("reason", reason)],
        )
    };
    let reasons = ["length", "magic", "kind", "mac", "body", "stranger"];
    let before: Vec<f64> = reasons.iter().map(|r| refused(r)).collect();
    let mirror_refused_before = metric_of(&l, &[target_id], "lb_persist_mirror_refused_total", &[]);
    let written_before = metric_of(&l, &[target_id], "lb_persist_mirror_written_total", &[]);
    let downs_before = metric_of(
        &l,
        &[target_id],
        "lb_peer_transitions_total",
        &[("to", "down")],
    );

    let sealed = |kind: Kind, from: u32, body: Vec<u8>| {
        seal(
            &key,
            &Message {
                kind,
                from,
                epoch: 1,
                seq: 1,
                body,
            },
        )
    };
    // A persistence entry for the service: client 10.77.0.99 → engine `other_secondary`.
    let mut entry = 0u32.to_be_bytes().to_vec();
    entry.extend_from_slice(&[10, 77, 0, 99]);
    entry.extend_from_slice(&[0; 12]);
    entry.extend_from_slice(&u32::from(other_secondary).to_be_bytes());
    entry.extend_from_slice(&0u32.to_be_bytes());
    let datagrams: Vec<(&str, Vec<u8>)> = vec![
        ("length", vec![0u8; 10]),
        ("length", vec![b'L'; 1401]),
        ("magic", vec![0u8; 60]),
        ("kind", raw_message(9, 1, &[], [0; 16])),
        (
            "mac",
            raw_message(0, u32::from(other_secondary), &[], [7; 16]),
        ),
        (
            "mac",
            raw_message(6, u32::from(id_of(&placement[0])), &entry, [7; 16]),
        ),
        // Authentic (the key leaked, or a misconfigured engine), yet wrong.
        (
            "body",
            sealed(Kind::Request, u32::from(other_secondary), vec![1; 5]),
        ),
        ("stranger", sealed(Kind::Request, 77, Vec::new())),
        ("stranger", sealed(Kind::Persist, 77, entry.clone())),
    ];
    let client = l.lab.client(0).clone();
    let sent: Vec<(&str, Vec<u8>)> = datagrams.clone();
    in_ns(client.name(), || {
        let s = UdpSocket::bind("0.0.0.0:0")?;
        for (_, d) in &sent {
            s.send_to(d, to)?;
        }
        // Authentic and from a peer, but that peer is not the service's primary: the mirror
        // refuses its persistence entry.
        s.send_to(
            &sealed(Kind::Persist, u32::from(other_secondary), entry.clone()),
            to,
        )?;
        Ok(())
    })
    .unwrap();
    std::thread::sleep(Duration::from_millis(500));

    for (i, r) in reasons.iter().enumerate() {
        let want =
            f64::from(u32::try_from(datagrams.iter().filter(|(w, _)| w == r).count()).unwrap());
        let got = refused(r) - before[i];
        assert!(
            (got - want).abs() < f64::EPSILON,
            "refused for {r}: {got}, want {want}"
        );
    }
    let mirror_refused =
        metric_of(&l, &[target_id], "lb_persist_mirror_refused_total", &[]) - mirror_refused_before;
    assert!(
        (mirror_refused - 1.0).abs() < f64::EPSILON,
        "the mirror refused {mirror_refused}"
    );
    assert!(
        (metric_of(&l, &[target_id], "lb_persist_mirror_written_total", &[]) - written_before)
            .abs()
            < f64::EPSILON,
        "nothing written"
    );
    assert!(
        (metric_of(
            &l,
            &[target_id],
            "lb_peer_transitions_total",
            &[("to", "down")]
        ) - downs_before)
            .abs()
            < f64::EPSILON,
        "no peer went down"
    );
    let all: Vec<u8> = placement.iter().map(|n| id_of(n)).collect();
    assert!(
        (metric_of(&l, &all, "lb_promotions_total", &[]) - 1.0).abs() < f64::EPSILON,
        "one promotion: the first primary's start"
    );
    assert_eq!(l.vip_holders().unwrap(), [placement[0].clone()]);
    let r = l.lab.load(60).unwrap();
    assert_eq!(r.errors, 0, "{r}");
}

/// A secondary that is alive but cannot serve (its backends unreachable from it, so its health
/// checks take them all down) tells its peers in its probes, and the primary gives it no new flows
/// of that service: every connection started 300 ms or more after its last backend went down is
/// served. When its backends come back, it gets flows again.
#[test]
#[allow(clippy::too_many_lines)]
fn a_secondary_that_cannot_serve_gets_no_new_flows_within_300_ms() {
    if !require_root() {
        return;
    }
    let l = ControllerLab::build("lbtu").expect("build the controller lab");
    let backends = l.backend_args();
    let mut args = vec![
        "pool",
        "create",
        "web",
        "--check",
        "tcp",
        "--check-interval-ms",
        "100",
        "--check-timeout-ms",
        "90",
    ];
    args.extend(backends.iter().map(String::as_str));
    let out = l.lbctl(&args).unwrap();
    assert_eq!(out.code, 0, "lbctl pool create: {}", out.stderr);
    let vs = l.create_web_service(3).unwrap();
    let placement = placement(&vs);
    let id_of = |name: &str| l.id_of(name).unwrap();
    let victim = id_of(&placement[2]);
    let victim_ns = l.engine_ns(victim).unwrap();
    l.wait_all_hear(&placement).unwrap();
    let up = |l: &ControllerLab| {
        l.daemon(victim)
            .and_then(|d| d.metrics().ok())
            .map_or(-1.0, |m| metric_sum(&m, "lb_backend_up", &[]))
    };
    assert!(up(&l) >= 1.0, "the victim's backends are up");
    let proxied = |l: &ControllerLab| metric_of(l, &[victim], "lb_proxy_connections_total", &[]);
    let before = proxied(&l);
    let r = l.lab.load(60).unwrap();
    assert_eq!(r.errors, 0, "{r}");
    assert!(proxied(&l) > before, "the victim takes flows while healthy");

    let target = l.lab.vip_http();
    let client = l.lab.client(0).clone();
    let start = Instant::now();
    let (results, unhealthy) = std::thread::scope(|s| {
        let worker = s.spawn(|| {
            enter(client.name()).unwrap();
            let mut out = Vec::new();
            while start.elapsed() < Duration::from_millis(3500) {
                let began = start.elapsed();
                let r = one_request(target, Duration::from_secs(2));
                out.push((began, r.map_err(|e| format!("{e:#}"))));
                std::thread::sleep(Duration::from_millis(5));
            }
            out
        });
        std::thread::sleep(Duration::from_millis(500));
        // Its backends become unreachable from the victim alone.
        for b in &l.lab.backends {
            l.lab
                .lab
                .ip(
                    &victim_ns,
                    &[
                        "route",
                        "add",
                        "blackhole",
                        &format!("{}/32", b.http().ip()),
                    ],
                )
                .unwrap();
        }
        let mut unhealthy = None;
        while start.elapsed() < Duration::from_secs(3) {
            if up(&l).abs() < f64::EPSILON {
                unhealthy = Some(start.elapsed());
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        (worker.join().unwrap(), unhealthy)
    });
    let unhealthy = unhealthy.expect("the victim's health checks took its backends down");
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    let last_failed = failed.iter().map(|(b, _)| *b).max();
    println!(
        "{} connections; the victim's last backend down at {unhealthy:?}; {} failed, the last started at {last_failed:?}",
        results.len(),
        failed.len()
    );
    if let Some(last) = last_failed {
        assert!(
            last < unhealthy + Duration::from_millis(300),
            "a connection started {:?} after the victim lost its backends still went there: {:?}",
            last.saturating_sub(unhealthy),
            failed.last()
        );
    }
    let after = results
        .iter()
        .filter(|(b, _)| *b >= unhealthy + Duration::from_millis(300))
        .count();
    assert!(after > 50, "the loop ran after: {after}");
    let m = l.daemon(id_of(&placement[0])).unwrap().log_tail(200);
    assert!(
        m.contains("peer's health changed"),
        "the primary heard it: {m}"
    );

    // Its backends back: it takes flows again.
    for b in &l.lab.backends {
        l.lab
            .lab
            .ip(
                &victim_ns,
                &[
                    "route",
                    "del",
                    "blackhole",
                    &format!("{}/32", b.http().ip()),
                ],
            )
            .unwrap();
    }
    l.wait(
        Duration::from_secs(5),
        "the victim's backends are up",
        |l| Ok(up(l) >= 1.0),
    )
    .unwrap();
    std::thread::sleep(Duration::from_millis(300));
    let before = proxied(&l);
    let r = l.lab.load(60).unwrap();
    assert_eq!(r.errors, 0, "{r}");
    assert!(proxied(&l) > before, "the victim takes flows again");
}

/// An IPv6 virtual service fails over like an IPv4 one: the promoted engine puts the VIP on its
/// interface and sends unsolicited neighbour advertisements (Override), which move the client's
/// neighbour entry; the VIP is served again within a second.
#[test]
#[allow(clippy::too_many_lines)]
fn an_ipv6_vip_fails_over_with_unsolicited_neighbour_advertisements() {
    if !require_root() {
        return;
    }
    let l = ControllerLab::build("lbts").expect("build the controller lab");
    let v6 = |ns: &lb_tests::Ns, cidr: &str| {
        l.lab
            .lab
            .ip(ns, &["-6", "addr", "add", cidr, "dev", "eth0", "nodad"])
            .unwrap();
    };
    v6(l.lab.client(0), "fd00:77::2/64");
    for e in &l.lab.engines {
        v6(&e.ns, &format!("fd00:77::{}/64", 10 + e.id));
    }
    let vip: std::net::Ipv6Addr = "fd00:77::100".parse().unwrap();
    let target = SocketAddr::new(vip.into(), 80);
    l.create_web_pool().unwrap();
    let out = l
        .lbctl(&[
            "vs",
            "create",
            "web6",
            "--vip",
            &vip.to_string(),
            "--port",
            "80",
            "--pool",
            "web",
            "--min-engines",
            "3",
        ])
        .unwrap();
    assert_eq!(out.code, 0, "lbctl vs create: {}", out.stderr);
    let placement = placement(&out.json().unwrap());
    let ids: Vec<u8> = l.lab.engines.iter().map(|e| e.id).collect();
    l.wait(Duration::from_secs(20), "every engine applied it", |l| {
        Ok(l.applied_everywhere(&ids)?.is_some())
    })
    .unwrap();
    l.wait_all_hear(&placement).unwrap();
    l.wait(Duration::from_secs(10), "the primary holds the VIP", |l| {
        Ok(l.holders_of(vip.into())? == [placement[0].clone()])
    })
    .unwrap();
    let client = l.lab.client(0).clone();
    // Served over IPv6 (this also gives the client a neighbour entry for the VIP).
    assert!(
        served_again(
            &client,
            target,
            Instant::now(),
            Duration::from_millis(250),
            Duration::from_secs(5)
        )
        .is_some(),
        "the IPv6 VIP is served"
    );
    let r = lb_tests::client::http_load(&client, &lb_tests::client::Load::new(target, 60)).unwrap();
    assert_eq!(r.errors, 0, "{r}");
    let old = l.id_of(&placement[0]).unwrap();
    let new = l.id_of(&placement[1]).unwrap();
    assert_eq!(
        l.client_neighbour(vip.into()).map(|n| n.0),
        Some(l.engine_mac(old).unwrap()),
        "the client goes to the primary"
    );

    let gone = Instant::now();
    l.lab
        .lab
        .ip(&l.engine_ns(old).unwrap(), &["link", "set", "eth0", "down"])
        .unwrap();
    let served = served_again(
        &client,
        target,
        gone,
        Duration::from_millis(250),
        Duration::from_secs(5),
    );
    println!("the IPv6 VIP was served again after {served:?}");
    let served = served.expect("the IPv6 VIP is served again");
    assert!(served < Duration::from_secs(1), "{served:?}");
    assert_eq!(
        l.client_neighbour(vip.into()).map(|n| n.0),
        Some(l.engine_mac(new).unwrap()),
        "the neighbour advertisement moved the client"
    );
    let m = l.daemon(new).unwrap().metrics().unwrap();
    assert!(metric_sum(&m, "lb_unsolicited_na_sent_total", &[]) >= 1.0);
    assert!(l.holders_of(vip.into()).unwrap().contains(&placement[1]));
    let r = lb_tests::client::http_load(&client, &lb_tests::client::Load::new(target, 60)).unwrap();
    assert_eq!(r.errors, 0, "{r}");
}

/// A secondary whose host goes away (its link down) under wrk: the primary's probes find it gone
/// and its flows and new ones go to the others. Each of wrk's connections the secondary held fails
/// once (reset by the engine its flow is re-hashed to) and reconnects; every new connection started
/// 300 ms or more after the link went down is served.
#[test]
#[allow(clippy::too_many_lines)]
fn a_secondary_whose_host_is_gone_under_wrk_costs_only_its_own_connections() {
    if !require_root() {
        return;
    }
    let (l, placement) = ControllerLab::with_web_service("lbtw", 3, &[])
        .expect("build the controller lab with a web service");
    let victim = l.id_of(&placement[2]).unwrap();
    let victim_ns = l.engine_ns(victim).unwrap();
    let client = l.lab.client(0).clone();
    let target = l.lab.vip_http();
    let wrk = lb_tests::tools::Wrk {
        connections: 30,
        duration: Duration::from_secs(6),
        timeout: Duration::from_secs(1),
        ..lb_tests::tools::Wrk::new(&format!("http://{target}/"))
    };
    let start = Instant::now();
    let (wrk_result, results, gone) = std::thread::scope(|s| {
        let load = s.spawn(|| wrk.run(&client));
        let probe = s.spawn(|| {
            enter(client.name()).unwrap();
            let mut out = Vec::new();
            while start.elapsed() < Duration::from_secs(5) {
                let began = start.elapsed();
                let r = one_request(target, Duration::from_secs(2));
                out.push((began, r.map_err(|e| format!("{e:#}"))));
                std::thread::sleep(Duration::from_millis(10));
            }
            out
        });
        std::thread::sleep(Duration::from_secs(2));
        let gone = start.elapsed();
        l.lab
            .lab
            .ip(&victim_ns, &["link", "set", "eth0", "down"])
            .unwrap();
        (load.join().unwrap(), probe.join().unwrap(), gone)
    });
    let w = wrk_result.expect("wrk ran");
    let failed: Vec<_> = results.iter().filter(|(_, r)| r.is_err()).collect();
    println!(
        "wrk: {w}; link down at {gone:?}; new connections {} ({} failed, the last started at {:?})",
        results.len(),
        failed.len(),
        failed.iter().map(|(b, _)| *b).max()
    );
    for (began, e) in &failed {
        assert!(
            *began < gone + Duration::from_millis(300),
            "a connection started {:?} after the link went down failed: {e:?}",
            began.saturating_sub(gone)
        );
    }
    assert!(
        results
            .iter()
            .filter(|(b, _)| *b >= gone + Duration::from_millis(300))
            .count()
            > 50,
        "the loop ran after the fault"
    );
    assert!(
        w.errors() <= u64::from(wrk.connections),
        "at most one error per wrk connection: {w}"
    );
    assert!(w.requests > 1000, "{w}");
    let m = l
        .daemon(l.id_of(&placement[0]).unwrap())
        .unwrap()
        .metrics()
        .unwrap();
    assert!(
        metric_sum(
            &m,
            "lb_peer_transitions_total",
            &[("signal", "dataplane"), ("to", "down")]
        ) >= 1.0,
        "the primary found the secondary gone, not just its daemon"
    );
}

/// Segments of the non-SYN flood.
const SEGMENTS: u32 = 200_000;

/// A flood of TCP segments without SYN for flows nobody knows (a scan, or a forged flood) at the
/// primary: each would be an owner query. The data plane's rate limit and ring bound what reaches
/// the daemon (the rest is placed by the ring and reset by the engine that gets it), the daemon
/// bounds what it waits for, and nothing else changes: the service is served during and after, no
/// peer goes down, no role moves.
#[test]
#[allow(clippy::too_many_lines)]
fn a_flood_of_unknown_non_syn_segments_is_bounded() {
    if !require_root() {
        return;
    }
    let (l, placement) = ControllerLab::with_web_service("lbtn", 3, &[])
        .expect("build the controller lab with a web service");
    let ids: Vec<u8> = placement.iter().map(|n| l.id_of(n).unwrap()).collect();
    let primary = ids[0];
    let reason = |r: &str| metric_of(&l, &[primary], "lb_xdp_packets_total", &[("reason", r)]);
    let (asked0, overflow0) = (reason("owner_asked"), reason("owner_query_overflow"));
    let transitions0 = metric_of(&l, &ids, "lb_peer_transitions_total", &[("to", "down")]);
    let client = l.lab.client(0).clone();
    let SocketAddr::V4(target) = l.lab.vip_http() else {
        panic!("an IPv4 VIP")
    };
    let started = Instant::now();
    let (sent, during) = std::thread::scope(|s| {
        // Sources of the client's subnet nobody uses.
        let flood =
            s.spawn(|| unknown_segments(&client, target, SEGMENTS, Ipv4Addr::new(10, 77, 0, 150)));
        // The service answers while the flood runs.
        let during = served_again(
            &client,
            SocketAddr::V4(target),
            Instant::now(),
            Duration::from_millis(500),
            Duration::from_secs(5),
        );
        (flood.join().unwrap().unwrap(), during)
    });
    let flood_time = started.elapsed();
    std::thread::sleep(Duration::from_millis(500));
    let asked = reason("owner_asked") - asked0;
    let overflow = reason("owner_query_overflow") - overflow0;
    let m = l.daemon(primary).unwrap().metrics().unwrap();
    println!(
        "{sent} segments in {flood_time:?}: asked {asked}, overflow (placed by the ring) {overflow}; daemon: asked {}, waiting-overflow {}, answered {}, unowned {}, unanswered {}; served during the flood after {during:?}",
        metric_sum(&m, "lb_owner_queries_asked_total", &[]),
        metric_sum(&m, "lb_owner_queries_overflow_total", &[]),
        metric_sum(&m, "lb_owner_queries_answered_total", &[]),
        metric_sum(&m, "lb_owner_queries_unowned_total", &[]),
        metric_sum(&m, "lb_owner_queries_unanswered_total", &[]),
    );
    assert!(sent > SEGMENTS / 2, "the flood was sent: {sent}");
    assert!(during.is_some(), "served during the flood");
    // Every segment reached the primary's data plane was asked about or placed.
    assert!(
        asked + overflow >= f64::from(sent) * 0.9,
        "asked {asked} + overflow {overflow} of {sent}"
    );
    // The per-CPU rate (one query per 20 µs, bursts of 1024) bounds what was asked.
    let cpus =
        f64::from(u32::try_from(std::thread::available_parallelism().unwrap().get()).unwrap());
    let bound = cpus * (1024.0 + flood_time.as_secs_f64() / 20e-6);
    assert!(asked <= bound, "asked {asked}, bound {bound}");
    assert!(overflow > 0.0, "the flood went over the rate: {overflow}");
    assert!(
        (metric_of(&l, &ids, "lb_peer_transitions_total", &[("to", "down")]) - transitions0).abs()
            < f64::EPSILON,
        "no peer went down"
    );
    assert!(
        metric_of(&l, &ids[1..], "lb_promotions_total", &[]).abs() < f64::EPSILON,
        "no role moved"
    );
    let r = l.lab.load(60).unwrap();
    assert_eq!(r.errors, 0, "after the flood: {r}");
}
