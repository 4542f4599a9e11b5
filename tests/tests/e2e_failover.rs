//! End to end: peer liveness. The primary probes its secondaries (UDP, authenticated, every 50 ms);
//! when a secondary's daemon is killed, the primary stops sending it new flows within 300 ms, on
//! its own — the controller notices only seconds later. Measured from the client: every
//! connection started 300 ms or more after the kill is answered at once (no SYN retransmission),
//! and none fails but, possibly, the one the victim's proxy held as it died.

use std::net::IpAddr;
use std::time::{Duration, Instant};

use lb_tests::client::{HeldConnection, Keeper, one_request, served_again};
use lb_tests::controller_lab::{ControllerLab, placement};
use lb_tests::daemon::metric_sum;
use lb_tests::netns::enter;
use lb_tests::require_root;

#[test]
#[allow(clippy::too_many_lines)]
fn a_dead_secondary_gets_no_new_flows_within_300_ms() {
    if !require_root() {
        return;
    }
    let mut l = ControllerLab::build("lbtf").expect("build the controller lab");
    l.create_web_pool().unwrap();
    let vs = l.create_web_service(3).unwrap();
    let placement = placement(&vs);
    let id_of = |name: &str| l.id_of(name).unwrap();
    let primary = id_of(&placement[0]);
    let victim = id_of(&placement[2]);
    // The primary probes its two secondaries and hears them.
    l.wait(
        Duration::from_secs(5),
        "the primary hears its secondaries",
        |l| {
            let m = l.daemon(primary).unwrap().metrics()?;
            Ok(metric_sum(&m, "lb_peer_probe_replies_total", &[]) > 10.0)
        },
    )
    .unwrap();
    let r = l.lab.load(90).unwrap();
    assert_eq!(r.errors, 0, "{r}");

    // New connections in a loop from the client while the victim's daemon is killed.
    let target = l.lab.vip_http();
    let client = l.lab.client(0).clone();
    let start = Instant::now();
    let kill_at = Duration::from_secs(1);
    let worker = std::thread::spawn(move || {
        enter(client.name()).unwrap();
        let mut out = Vec::new();
        while start.elapsed() < Duration::from_millis(3500) {
            let began = start.elapsed();
            let t = Instant::now();
            let r = one_request(target, Duration::from_secs(4));
            out.push((began, t.elapsed(), r.map_err(|e| format!("{e:#}"))));
            std::thread::sleep(Duration::from_millis(5));
        }
        out
    });
    std::thread::sleep(kill_at.saturating_sub(start.elapsed()));
    let killed = start.elapsed();
    let killed_wall = std::time::SystemTime::now();
    l.kill_daemon(victim).unwrap();
    // SIGKILL sent and the process reaped: until then its kernel listener may still complete a
    // handshake, reset when the process's sockets close.
    let died = start.elapsed();
    let results = worker.join().unwrap();
    let slow = Duration::from_millis(500);
    let bad: Vec<_> = results
        .iter()
        .filter(|(_, took, r)| r.is_err() || *took > slow)
        .collect();
    let last_bad = bad.iter().map(|(began, ..)| *began).max();
    println!(
        "{} connections, killed at {killed:?} (dead at {died:?}); slow or failed: {}; the last of them started at {last_bad:?}",
        results.len(),
        bad.len()
    );
    // The loop is sequential: one connection at most is open while the daemon dies, and if the
    // victim held it, it is lost with it (the victim's own flow). Any other fails the test.
    let failed: Vec<_> = results.iter().filter(|(.., r)| r.is_err()).collect();
    let in_flight_at_kill = |(began, took, _): &&(Duration, Duration, Result<String, String>)| {
        *began <= died && *began + *took >= killed
    };
    assert!(
        failed.len() <= 1 && failed.iter().all(in_flight_at_kill),
        "connections failed: {failed:?}"
    );
    if let Some(last) = last_bad {
        assert!(
            last < killed + Duration::from_millis(300),
            "a connection started {:?} after the kill still went to the dead secondary",
            last.checked_sub(killed).unwrap()
        );
    }
    let after: Vec<_> = results
        .iter()
        .filter(|(b, ..)| *b >= killed + Duration::from_millis(300))
        .collect();
    assert!(
        after.len() > 50,
        "the loop ran after the kill: {}",
        after.len()
    );
    let m = l.daemon(primary).unwrap().metrics().unwrap();
    assert!(
        metric_sum(&m, "lb_peer_transitions_total", &[("to", "down")]) >= 1.0,
        "the primary marked its secondary down"
    );
    // When the primary marked it down, from its log (wall clock).
    let log = l.daemon(primary).unwrap().log_tail(200);
    if let Some(line) = log.lines().find(|x| x.contains("peer daemon down")) {
        println!(
            "kill at {:?} (unix); primary: {line}",
            killed_wall.duration_since(std::time::UNIX_EPOCH).unwrap()
        );
    }
    // The controller had not noticed yet when the data plane had already moved on.
    let e = l.lbctl(&["engine", &placement[2]]).unwrap().json().unwrap();
    println!("controller's view 3.5 s after the kill: {}", e["state"]);
}

/// The primary's host goes away (its link down): the first engine of the succession takes over
/// within a second, on its own (the engines agree by the succession rule; the controller is not
/// needed), announces the VIP with gratuitous ARP, and learns the surviving engines' flows, so
/// not one connection they own is reset. When the old primary's link comes back it hears the
/// higher epoch and rejoins as a secondary: one primary, one VIP holder.
#[test]
#[allow(clippy::too_many_lines)]
fn a_gone_primary_is_replaced_and_the_survivors_connections_live() {
    if !require_root() {
        return;
    }
    let (l, placement) = ControllerLab::with_web_service("lbtg", 4, &[])
        .expect("build the controller lab with a web service");
    let id_of = |name: &str| l.id_of(name).unwrap();
    let old = id_of(&placement[0]);
    let new = id_of(&placement[1]);
    let old_ns = l.engine_ns(old).unwrap();
    let target = l.lab.vip_http();
    let client = l.lab.client(0).clone();
    let keeper = Keeper::start(&client, target, 500, Duration::from_secs(1)).unwrap();
    let owner_of = l.connection_owners().unwrap();
    std::thread::sleep(Duration::from_millis(500));

    // The primary's host goes away.
    let gone = Instant::now();
    l.lab
        .lab
        .ip(&old_ns, &["link", "set", "eth0", "down"])
        .unwrap();
    let served = served_again(
        &client,
        target,
        gone,
        Duration::from_millis(250),
        Duration::from_secs(5),
    );
    if served.is_none() {
        for e in &l.lab.engines {
            if let Some(d) = l.daemon(e.id) {
                println!("--- {} ---\n{}", e.name, d.log_tail(40));
                if let Ok(m) = d.metrics() {
                    for line in m.lines().filter(|x| {
                        (x.contains("echo")
                            || x.contains("lb_xdp_packets")
                            || x.contains("refused"))
                            && !x.ends_with(" 0")
                            && !x.starts_with('#')
                    }) {
                        println!("{line}");
                    }
                }
            }
        }
        println!(
            "holders {:?}, neighbour {:?}",
            l.vip_holders(),
            l.client_neighbour(l.lab.vip().into())
        );
        panic!("the VIP is not served again");
    }
    // The controller hears the promotion in the new primary's heartbeats and records it: the new
    // primary first in the placement, at epoch 1, with a "promotion" event; and the survivors
    // report the old primary gone.
    l.wait(
        Duration::from_secs(5),
        "the controller records the new primary at epoch 1",
        |l| Ok(l.recorded_primary("web")? == (Some(placement[1].clone()), 1)),
    )
    .unwrap();
    let recorded = gone.elapsed();
    println!("the controller recorded the promotion {recorded:?} after the link went down");
    assert!(
        recorded < Duration::from_secs(5),
        "recorded after {recorded:?}"
    );
    let events = controller_events(&l);
    let promotions: Vec<&serde_json::Value> =
        events.iter().filter(|e| e["kind"] == "promotion").collect();
    assert_eq!(promotions.len(), 1, "one promotion event: {promotions:?}");
    let objects = promotions[0]["objects"].to_string();
    assert!(
        objects.contains("vs/web")
            && objects.contains(&format!("engine/{}", placement[1]))
            && objects.contains(&format!("engine/{}", placement[0])),
        "{objects}"
    );
    l.wait(
        Duration::from_secs(5),
        "a survivor reports the old primary down",
        |l| {
            Ok(controller_events(l).iter().any(|e| {
                e["kind"] == "peer_report"
                    && e["objects"][1] == format!("engine/{}", placement[0])
                    && e["reason"].as_str().is_some_and(|r| r.contains("gone"))
            }))
        },
    )
    .unwrap();
    // Long enough for several rounds after the failover (a connection of the gone primary fails
    // once, then is skipped).
    std::thread::sleep(Duration::from_secs(6));
    let report = keeper.finish().unwrap();
    println!("served by the new primary {served:?} after the old one's link went down");
    let served = served.expect("the VIP is served again");
    assert!(
        served < Duration::from_secs(1),
        "the VIP came back after {served:?}"
    );

    // Not one connection owned by a surviving engine failed or moved.
    let mut per_owner: std::collections::BTreeMap<u8, (usize, usize)> =
        std::collections::BTreeMap::new();
    for (i, c) in report.clients.iter().enumerate() {
        let owner = *owner_of
            .get(c)
            .unwrap_or_else(|| panic!("no engine holds {c}"));
        let e = per_owner.entry(owner).or_default();
        e.0 += 1;
        if report.failed.iter().any(|(f, _)| *f == i) || report.moved.iter().any(|(m, ..)| *m == i)
        {
            e.1 += 1;
        }
    }
    println!(
        "connections per owner (held, lost): {per_owner:?}; rounds {}",
        report.rounds
    );
    // One round before the failover (rounds start a second apart; it came 0.5 s in), so a second
    // round means every surviving connection was used after it.
    assert!(
        report.rounds >= 2,
        "the connections were used after the failover"
    );
    for (owner, (held, lost)) in &per_owner {
        if *owner != old {
            assert_eq!(
                *lost,
                0,
                "engine {owner} survived, yet {lost} of its {held} connections were lost: {:?}",
                report.failed.iter().take(3).collect::<Vec<_>>()
            );
        }
    }
    assert!(
        per_owner.keys().filter(|o| **o != old).count() >= 2,
        "survivors owned connections: {per_owner:?}"
    );

    // The new primary took over, announced itself, and learned the survivors' flows.
    let m = l.daemon(new).unwrap().metrics().unwrap();
    assert!(metric_sum(&m, "lb_promotions_total", &[]) >= 1.0);
    assert!(
        metric_sum(&m, "lb_garp_sent_total", &[]) >= 1.0,
        "GARP sent"
    );
    let learned = metric_sum(&m, "lb_flows_bulk_loaded_total", &[])
        + metric_sum(&m, "lb_owner_queries_answered_total", &[]);
    println!(
        "new primary: bulk-loaded {}, asked {}, answered {}, unowned {}",
        metric_sum(&m, "lb_flows_bulk_loaded_total", &[]),
        metric_sum(&m, "lb_owner_queries_asked_total", &[]),
        metric_sum(&m, "lb_owner_queries_answered_total", &[]),
        metric_sum(&m, "lb_owner_queries_unowned_total", &[]),
    );
    assert!(
        learned > 0.0,
        "the new primary learned the survivors' flows"
    );
    // The client's neighbour entry (arp_accept=0 here: an existing entry is updated by the GARP).
    let want = l.engine_mac(new).unwrap();
    let neigh = l.client_neighbour(l.lab.vip().into());
    assert_eq!(
        neigh.as_ref().map(|n| n.0.clone()),
        Some(want.clone()),
        "{neigh:?}"
    );
    assert!(l.vip_holders().unwrap().contains(&placement[1]));

    // The old primary's link comes back: it hears epoch 1 and gives the VIP up.
    l.lab
        .lab
        .ip(&old_ns, &["link", "set", "eth0", "up"])
        .unwrap();
    l.wait(
        Duration::from_secs(5),
        "the old primary rejoined as a secondary",
        |l| Ok(l.vip_holders()? == [placement[1].clone()]),
    )
    .unwrap();
    let m = l.daemon(old).unwrap().metrics().unwrap();
    let demotions = metric_sum(&m, "lb_demotions_total", &[]);
    assert!(
        (demotions - 1.0).abs() < f64::EPSILON,
        "demoted once: {demotions}"
    );
    let r = l.lab.load(60).unwrap();
    assert_eq!(r.errors, 0, "{r}");
    let neigh = l.client_neighbour(l.lab.vip().into());
    assert_eq!(
        neigh.map(|n| n.0),
        Some(want),
        "the client still goes to the new primary"
    );
    // The controller still names the new primary at epoch 1: the old one's return promoted no one.
    let v = l.lbctl(&["vs", "get", "web"]).unwrap().json().unwrap();
    assert_eq!(
        lb_tests::controller_lab::placement(&v).first(),
        Some(&placement[1]),
        "{v}"
    );
    assert_eq!(v["epoch"], 1, "{v}");
    let promotions = controller_events(&l)
        .iter()
        .filter(|e| e["kind"] == "promotion")
        .count();
    assert_eq!(promotions, 1, "one promotion in all");
}

/// The controller's recent events (`lbctl --json events`: one object a line).
fn controller_events(l: &ControllerLab) -> Vec<serde_json::Value> {
    let out = l.lbctl(&["events"]).unwrap();
    assert_eq!(out.code, 0, "lbctl events: {}", out.stderr);
    out.stdout
        .lines()
        .filter_map(|line| serde_json::from_str(line).ok())
        .collect()
}

/// The engine that takes a connection from each of `sources` (in the client namespace).
fn engines_of(l: &ControllerLab, sources: &[IpAddr]) -> Vec<u8> {
    let client = l.lab.client(0);
    let target = l.lab.vip_http();
    let mut held = Vec::new();
    for s in sources {
        let mut c = HeldConnection::open_from(client, Some(*s), target, Duration::from_secs(2))
            .unwrap_or_else(|e| panic!("a connection from {s}: {e:#}"));
        c.get()
            .unwrap_or_else(|e| panic!("a request from {s}: {e:#}"));
        held.push(c);
    }
    let owner_of = l.connection_owners().unwrap();
    held.iter()
        .map(|c| c.local_addr().unwrap())
        .map(|a| {
            *owner_of
                .get(&a)
                .unwrap_or_else(|| panic!("no engine holds {a}"))
        })
        .collect()
}

/// Source-IP persistence survives a failover: the primary mirrors its persistence table to the
/// other engines, so the promoted one sends each persistent client where it went before — even
/// where the ring (now without the old primary, and with an engine added since the clients came)
/// would place it elsewhere.
#[test]
#[allow(clippy::too_many_lines)]
fn a_promoted_primary_sends_persistent_clients_where_they_went() {
    if !require_root() {
        return;
    }
    let (l, placement) =
        ControllerLab::with_web_service("lbtm", 3, &["--persistence-timeout-s", "300"])
            .expect("build the controller lab with a web service");
    let id_of = |name: &str| l.id_of(name).unwrap();
    let old = id_of(&placement[0]);
    let new = id_of(&placement[1]);

    // 24 clients, each from an address of its own.
    let sources: Vec<IpAddr> = (150..174u8)
        .map(|i| IpAddr::V4(std::net::Ipv4Addr::new(10, 77, 0, i)))
        .collect();
    for s in &sources {
        l.lab
            .lab
            .ip(
                l.lab.client(0),
                &["addr", "add", &format!("{s}/24"), "dev", "eth0"],
            )
            .unwrap();
    }
    let before = engines_of(&l, &sources);
    assert_eq!(
        engines_of(&l, &sources),
        before,
        "persistent before anything moves"
    );

    // A fourth engine joins: a new ring, yet the clients stay where their entries say.
    let out = l.lbctl(&["scale-out", "web"]).unwrap();
    assert_eq!(out.code, 0, "lbctl scale-out");
    let joined = lb_tests::controller_lab::placement(&out.json().unwrap());
    assert_eq!(joined.len(), 4, "{joined:?}");
    let ids: Vec<u8> = l.lab.engines.iter().map(|e| e.id).collect();
    l.wait(Duration::from_secs(20), "the scale-out applied", |l| {
        Ok(l.applied_everywhere(&ids)?.is_some())
    })
    .unwrap();
    l.wait_all_hear(&joined).unwrap();
    // It gets new connections (a new ring) once it serves.
    l.wait_serving("web", Duration::from_secs(20)).unwrap();
    l.wait(Duration::from_secs(20), "the new ring applied", |l| {
        Ok(l.applied_everywhere(&ids)?.is_some())
    })
    .unwrap();
    assert_eq!(
        engines_of(&l, &sources),
        before,
        "persistent across the new ring"
    );

    // The entries reach the engine next in line.
    let n = f64::from(u32::try_from(sources.len()).unwrap());
    l.wait(
        Duration::from_secs(5),
        "the persistence table is mirrored",
        |l| {
            let m = l.daemon(new).unwrap().metrics()?;
            Ok(metric_sum(&m, "lb_persist_mirror_written_total", &[]) >= n)
        },
    )
    .unwrap();

    // The primary's host goes away; its successor takes over.
    l.lab
        .lab
        .ip(&l.engine_ns(old).unwrap(), &["link", "set", "eth0", "down"])
        .unwrap();
    l.wait(
        Duration::from_secs(5),
        "the new primary holds the VIP",
        |l| Ok(l.vip_holders()?.contains(&placement[1])),
    )
    .unwrap();
    let target = l.lab.vip_http();
    let client = l.lab.client(0).clone();
    std::thread::spawn(move || {
        enter(client.name()).unwrap();
        let deadline = Instant::now() + Duration::from_secs(5);
        while one_request(target, Duration::from_millis(250)).is_err() {
            assert!(Instant::now() < deadline, "the VIP is not served again");
        }
    })
    .join()
    .unwrap();

    let after = engines_of(&l, &sources);
    let added = id_of(&joined[3]);
    let mut kept = 0;
    for ((s, b), a) in sources.iter().zip(&before).zip(&after) {
        if *b == old {
            assert_ne!(*a, old, "{s} still goes to the gone primary");
        } else {
            assert_eq!(a, b, "{s} went to {b} before the failover, to {a} after");
            kept += 1;
        }
    }
    println!(
        "{kept} of {} persistent clients of surviving engines kept their engine; the added engine {} got {} of the gone primary's",
        sources.len(),
        joined[3],
        after
            .iter()
            .filter(|a| **a == added)
            .map(|_| 1)
            .sum::<usize>()
    );
    assert!(kept >= 8, "clients on surviving engines: {kept}");
    let m = l.daemon(new).unwrap().metrics().unwrap();
    assert!(metric_sum(&m, "lb_promotions_total", &[]) >= 1.0);
    assert!(
        metric_sum(&m, "lb_xdp_packets_total", &[("reason", "persist_hit")]) > 0.0,
        "the new primary placed by its mirrored entries"
    );
    let refused: f64 = l
        .lab
        .engines
        .iter()
        .filter_map(|e| l.daemon(e.id)?.metrics().ok())
        .map(|m| metric_sum(&m, "lb_persist_mirror_refused_total", &[]))
        .sum();
    assert!(
        refused.abs() < f64::EPSILON,
        "mirror messages refused: {refused}"
    );
}
