//! End to end: engines terminate the virtual service and source-NAT it to a backend pool.
//!
//! Topology ([`lb_tests::proxy_lab`]): client 10.77.0.2 → VIP 10.78.0.10 (primary se1's XDP
//! program steers) → the proxies of se1/se2/se3 (10.77.0.11-13, `lb-daemon`) → nginx on
//! be1/be2/be3 (10.77.0.21-23, logging each request's peer address and port).
//!
//! The tests run one at a time (a lock): each builds its own lab, and their timing checks (health
//! detection, drain and idle timeouts, "reset within 1 s") should not compete for the two cores.
//! Needs root, `lb-daemon` (`$LB_DAEMON_BIN`) and the XDP objects (`$LB_XDP_OBJECT`).

use std::collections::BTreeSet;
use std::io::{ErrorKind, Read, Write};
use std::net::{IpAddr, Ipv4Addr, SocketAddr, TcpStream};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use lb_tests::client::HeldConnection;
use lb_tests::daemon::{Config, HealthCheck, PinDir, ProxySection, start_expecting_failure};
use lb_tests::proxy_lab::{IPERF_PORT, Options, ProxyLab, ReloadOrder, engine_addr};
use lb_tests::require_root;
use lb_tests::tools::{Iperf, Wrk};

static SERIAL: Mutex<()> = Mutex::new(());

fn serial() -> MutexGuard<'static, ()> {
    SERIAL.lock().unwrap_or_else(PoisonError::into_inner)
}

const CLIENT: Ipv4Addr = Ipv4Addr::new(10, 77, 0, 2);
/// `proxy.drain_timeout_s` of the drain test.
const DRAIN_S: u64 = 3;
/// `proxy.idle_timeout_s` of the reload / idle test.
const IDLE_S: u64 = 2;

/// The engines' addresses: the only sources a backend may see.
fn engine_ips(lab: &ProxyLab) -> BTreeSet<IpAddr> {
    lab.engines
        .iter()
        .map(|e| IpAddr::V4(engine_addr(e.id)))
        .collect()
}

/// The `web` virtual service's series.
const WEB: [(&str, &str); 1] = [("vs", "web")];

/// Per-engine `lb_proxy_*_total{vs="web"}` (counters are integers carried as floats).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn per_engine(lab: &ProxyLab, metric: &str) -> std::collections::BTreeMap<u8, u64> {
    lab.metric_per_engine(metric, &WEB)
        .unwrap()
        .into_iter()
        .map(|(id, v)| (id, v as u64))
        .collect()
}

fn total(lab: &ProxyLab, metric: &str) -> u64 {
    per_engine(lab, metric).values().sum()
}

fn fast_http_check() -> HealthCheck {
    HealthCheck {
        kind: "http".to_owned(),
        interval_ms: 200,
        timeout_ms: 150,
        rise: 2,
        fall: 2,
        http_path: Some("/".to_owned()),
        expected_status: Some(200),
    }
}

/// Holds keep-alive connections until every backend name in `need` has one (at most `max`).
fn hold_until(lab: &ProxyLab, need: &[&str], max: usize) -> Vec<(HeldConnection, String)> {
    let mut held = Vec::new();
    while held.len() < max {
        let mut c =
            HeldConnection::open(lab.client(0), lab.vip_http(), Duration::from_secs(3)).unwrap();
        let name = c.get().unwrap();
        held.push((c, name));
        if need
            .iter()
            .all(|n| held.iter().any(|(_, h)| h.as_str() == *n))
            && held.len() >= 6
        {
            break;
        }
    }
    held
}

/// The primary's daemon crashes: its proxy's listeners are gone but its data plane still steers, so
/// new connections the ring gives to the primary are placed on the other engines (no listener, no
/// reset) until the daemon is back.
#[test]
fn new_connections_avoid_a_primary_whose_daemon_is_away() {
    if !require_root() {
        return;
    }
    let _serial = serial();
    let mut lab = ProxyLab::build(&Options {
        lab_prefix: "lbtpk".to_owned(),
        ..Options::default()
    })
    .expect("build the proxy lab");
    let before = per_engine(&lab, "lb_proxy_connections_total");
    let r = lab.load(150).unwrap();
    assert_eq!(r.errors, 0, "{r}");
    let served = per_engine(&lab, "lb_proxy_connections_total");
    assert!(
        served[&1] > before[&1],
        "the primary proxies its share while its daemon runs: {served:?}"
    );

    let pins = lab.kill_daemon(1).unwrap();
    let others = |lab: &ProxyLab| {
        per_engine(lab, "lb_proxy_connections_total")
            .values()
            .sum::<u64>()
    };
    let before = others(&lab);
    let r = lab.load(300).unwrap();
    println!("300 requests with the primary's daemon killed: {r}");
    assert_eq!(
        r.errors, 0,
        "no new connection fails while the primary's daemon is away: {r}"
    );
    assert_eq!(
        others(&lab) - before,
        300,
        "the other engines proxied every connection"
    );

    lab.start_daemon_on(1, pins)
        .expect("restart the primary's daemon");
    let before = per_engine(&lab, "lb_proxy_connections_total");
    let r = lab.load(150).unwrap();
    assert_eq!(r.errors, 0, "{r}");
    let after = per_engine(&lab, "lb_proxy_connections_total");
    assert!(
        after[&1] > before.get(&1).copied().unwrap_or(0),
        "the restarted primary takes new connections again: {after:?}"
    );
}

#[test]
fn proxy_terminates_and_source_nats_to_backends() {
    if !require_root() {
        return;
    }
    let _serial = serial();
    let lab = ProxyLab::build(&Options {
        lab_prefix: "lbtpa".to_owned(),
        iperf: true,
        ..Options::default()
    })
    .expect("build the proxy lab");

    requests_are_source_natted(&lab);
    wrk_runs_clean(&lab);
    iperf_tcp_and_udp(&lab);
    connections_lookup(&lab);
}

/// 2000 requests: all answered, by every backend, which saw only engine addresses; every engine
/// proxied some.
fn requests_are_source_natted(lab: &ProxyLab) {
    let engines = engine_ips(lab);
    let r = lab.load(2000).unwrap();
    println!("2000 requests through the VIP: {r}");
    assert_eq!(r.errors, 0, "{r}");
    assert_eq!(r.ok(), 2000, "{r}");
    for b in &lab.backends {
        assert!(
            r.per_engine.get(&b.name).copied().unwrap_or(0) > 0,
            "{} answered nothing: {r}",
            b.name
        );
    }
    assert!(
        r.per_engine
            .keys()
            .all(|k| lab.backends.iter().any(|b| &b.name == k)),
        "an answer from something that is not a backend: {r}"
    );

    // Every backend saw only engine addresses, never the client's.
    let mut logged = 0;
    for b in &lab.backends {
        let peers = b.nginx().unwrap().peers();
        logged += peers.len();
        let foreign: BTreeSet<IpAddr> = peers
            .iter()
            .map(|(a, _)| *a)
            .filter(|a| !engines.contains(a))
            .collect();
        assert!(
            foreign.is_empty(),
            "{} saw sources other than the engines {engines:?}: {foreign:?}",
            b.name
        );
        assert!(!peers.iter().any(|(a, _)| *a == IpAddr::V4(CLIENT)));
    }
    assert!(logged >= 2000, "backends logged {logged} requests");

    // Each engine's proxy took part.
    let conns = per_engine(lab, "lb_proxy_connections_total");
    println!("lb_proxy_connections_total{{vs=\"web\"}} per engine: {conns:?}");
    for e in &lab.engines {
        assert!(
            conns.get(&e.id).copied().unwrap_or(0) > 0,
            "{} proxied nothing: {conns:?}",
            e.name
        );
    }
    assert!(conns.values().sum::<u64>() >= 2000, "{conns:?}");
}

/// wrk, keep-alive and one request per connection: no errors.
fn wrk_runs_clean(lab: &ProxyLab) {
    let url = format!("http://{}/", lab.vip_http());
    let ka = Wrk::new(&url).run(lab.client(0)).unwrap();
    println!("wrk keep-alive: {ka}");
    assert!(ka.requests > 1000, "{ka}");
    assert_eq!(ka.errors(), 0, "wrk keep-alive errors: {ka}\n{}", ka.text);
    let short = Wrk {
        close: true,
        duration: Duration::from_secs(2),
        ..Wrk::new(&url)
    }
    .run(lab.client(0))
    .unwrap();
    println!("wrk Connection: close: {short}");
    assert!(short.requests > 500, "{short}");
    assert_eq!(
        short.errors(),
        0,
        "wrk short errors: {short}\n{}",
        short.text
    );
}

/// iperf3 TCP and UDP through the VIP (pool `iperf`: be1:5201).
fn iperf_tcp_and_udp(lab: &ProxyLab) {
    let vip = lab.vip().to_string();
    let tcp = Iperf::tcp(&vip, IPERF_PORT).run(lab.client(0)).unwrap();
    println!(
        "iperf3 TCP: {:.2} Gbit/s received",
        tcp.received_gbit_per_s()
    );
    assert!(
        tcp.received_bits_per_s > 100e6,
        "iperf3 TCP through the proxy: {tcp:?}"
    );
    let udp = Iperf::udp(&vip, IPERF_PORT, "50M")
        .run(lab.client(0))
        .unwrap();
    let (sent, got) = (
        udp.udp_packets.unwrap_or(0),
        udp.udp_received().unwrap_or(0),
    );
    println!("iperf3 UDP 50 Mbit/s: {got} of {sent} datagrams received");
    assert!(
        sent > 1000 && got * 2 > sent,
        "iperf3 UDP through the proxy: {udp:?}"
    );
    let udp_sessions = lab
        .metric_total("lb_proxy_connections_total", &[("vs", "iperf-udp")])
        .unwrap();
    assert!(udp_sessions >= 1.0, "no UDP session counted");
}

/// `/connections`: a held connection is found on exactly one engine, with its backend and the
/// engine-side address the backend logged.
fn connections_lookup(lab: &ProxyLab) {
    let mut held =
        HeldConnection::open(lab.client(0), lab.vip_http(), Duration::from_secs(3)).unwrap();
    let backend_name = held.get().unwrap();
    let client_addr = held.local_addr().unwrap();
    let (engine, rec) = lab
        .find_connection(client_addr, lab.vip_http(), "tcp")
        .unwrap()
        .unwrap_or_else(|| panic!("no engine knows {client_addr} → {}", lab.vip_http()));
    println!("/connections record on engine {engine}: {rec}");
    let be = lab
        .backends
        .iter()
        .find(|b| b.name == backend_name)
        .expect("answer from a backend");
    assert_eq!(
        rec["backend"].as_str(),
        Some(be.http().to_string().as_str())
    );
    assert_eq!(
        rec["client"].as_str(),
        Some(client_addr.to_string().as_str())
    );
    assert_eq!(
        rec["vip"].as_str(),
        Some(lab.vip_http().to_string().as_str())
    );
    assert_eq!(rec["protocol"].as_str(), Some("tcp"));
    assert_eq!(rec["virtual_service"].as_str(), Some("web"));
    let side: SocketAddr = rec["engine_side"]
        .as_str()
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("engine_side missing or not an address: {rec}"));
    assert_eq!(side.ip(), IpAddr::V4(engine_addr(engine)), "{rec}");
    assert!(rec["bytes_to_backend"].as_u64().unwrap_or(0) > 0, "{rec}");
    assert!(rec["bytes_to_client"].as_u64().unwrap_or(0) > 0, "{rec}");
    let peers = be.nginx().unwrap().peers();
    assert!(
        peers.contains(&(side.ip(), side.port())),
        "{} never logged a request from engine_side {side}",
        be.name
    );
    // The list holds it too; an unknown client is a 404.
    let (status, list) = lab.daemon(engine).unwrap().connections("").unwrap();
    assert_eq!(status, 200);
    assert!(
        list.contains(&client_addr.to_string()),
        "list lacks {client_addr}: {list}"
    );
    let (status, _) = lab
        .daemon(engine)
        .unwrap()
        .connections(&format!(
            "client=10.77.0.2:1&vip={}&protocol=tcp",
            lab.vip_http()
        ))
        .unwrap();
    assert_eq!(status, 404);
    assert_eq!(held.get().unwrap(), backend_name, "held connection moved");
}

/// What a client saw when it tried the service.
#[derive(Debug, PartialEq, Eq)]
enum Probe {
    Refused,
    Reset,
    /// Closed with a FIN and no answer.
    Eof,
    Answer,
    Timeout,
    Other(String),
}

/// Connects to `target`, sends a request and reads (timeouts 3 s). Runs in the client namespace.
fn probe(target: SocketAddr) -> (Probe, Duration) {
    let start = Instant::now();
    let t = Duration::from_secs(3);
    let classify = |e: &std::io::Error| match e.kind() {
        ErrorKind::ConnectionRefused => Probe::Refused,
        ErrorKind::ConnectionReset | ErrorKind::BrokenPipe | ErrorKind::ConnectionAborted => {
            Probe::Reset
        }
        ErrorKind::WouldBlock | ErrorKind::TimedOut => Probe::Timeout,
        _ => Probe::Other(e.to_string()),
    };
    let mut s = match TcpStream::connect_timeout(&target, t) {
        Ok(s) => s,
        Err(e) => return (classify(&e), start.elapsed()),
    };
    s.set_read_timeout(Some(t)).unwrap();
    s.set_write_timeout(Some(t)).unwrap();
    if let Err(e) = s.write_all(b"GET / HTTP/1.1\r\nHost: x\r\nConnection: close\r\n\r\n") {
        return (classify(&e), start.elapsed());
    }
    let mut buf = [0u8; 512];
    let p = match s.read(&mut buf) {
        Ok(0) => Probe::Eof,
        Ok(_) => Probe::Answer,
        Err(e) => classify(&e),
    };
    (p, start.elapsed())
}

#[test]
fn health_checks_take_backends_out_and_back_and_no_backend_means_reset() {
    if !require_root() {
        return;
    }
    let _serial = serial();
    let mut lab = ProxyLab::build(&Options {
        lab_prefix: "lbtph".to_owned(),
        health_check: Some(fast_http_check()),
        ..Options::default()
    })
    .expect("build the proxy lab");
    let wait = Duration::from_secs(5);
    for b in &lab.backends {
        lab.wait_backend("web", b.http(), true, wait).unwrap();
    }

    // Connections held on every backend, then be2's nginx dies.
    let mut held = hold_until(&lab, &["be1", "be2", "be3"], 30);
    let on = |n: &str| held.iter().filter(|(_, h)| h == n).count();
    assert!(
        on("be2") > 0 && on("be1") + on("be3") > 0,
        "held connections not spread: {:?}",
        held.iter().map(|(_, n)| n).collect::<Vec<_>>()
    );
    let be2 = lab.backends[1].http();
    lab.backends[1].kill_nginx();
    let killed = Instant::now();
    let detect = lab.wait_backend("web", be2, false, wait).unwrap();
    println!(
        "be2 down on every engine {:.0} ms after its nginx died",
        detect.as_secs_f64() * 1000.0
    );
    // Only the connections that were on be2 fail.
    for (i, (c, name)) in held.iter_mut().enumerate() {
        let r = c.get();
        if name == "be2" {
            assert!(
                r.is_err(),
                "held connection {i} on the dead be2 still answers"
            );
        } else {
            assert_eq!(
                r.as_deref().ok(),
                Some(name.as_str()),
                "held connection {i} on {name} broke: {r:?}"
            );
        }
    }
    // After detection every new request succeeds, and none goes to be2.
    let r = lab.load(300).unwrap();
    println!("300 requests with be2 down: {r}");
    assert_eq!(r.errors, 0, "{r}");
    assert_eq!(r.per_engine.get("be2"), None, "{r}");
    assert!(killed.elapsed() < Duration::from_secs(20));

    // be2 comes back: up again, and it gets requests.
    lab.backends[1].start_nginx(&lab.lab).unwrap();
    let rise = lab.wait_backend("web", be2, true, wait).unwrap();
    println!("be2 up again after {:.0} ms", rise.as_secs_f64() * 1000.0);
    let r = lab.load(300).unwrap();
    println!("300 requests with be2 back: {r}");
    assert_eq!(r.errors, 0, "{r}");
    assert!(r.per_engine.get("be2").copied().unwrap_or(0) > 0, "{r}");
    let changes = lab
        .metric_total(
            "lb_backend_health_changes_total",
            &[("backend", &be2.to_string())],
        )
        .unwrap();
    assert!(
        changes >= 2.0,
        "be2 went down and up: {changes} health changes"
    );
    drop(held);

    no_backend_means_reset(&mut lab);
}

/// No backend at all: new clients are reset at once (well under 1 s), and counted.
fn no_backend_means_reset(lab: &mut ProxyLab) {
    const PROBES: u64 = 20;
    let wait = Duration::from_secs(5);
    for b in &lab.backends {
        b.kill_nginx();
    }
    for b in &lab.backends {
        lab.wait_backend("web", b.http(), false, wait).unwrap();
    }
    let before = total(lab, "lb_proxy_refused_no_backend_total");
    let vip = lab.vip_http();
    let seen = lab
        .in_client(0, || {
            Ok((0..PROBES).map(|_| probe(vip)).collect::<Vec<_>>())
        })
        .unwrap();
    println!("no backend: {seen:?}");
    for (p, took) in &seen {
        assert!(
            matches!(p, Probe::Refused | Probe::Reset),
            "expected a reset or refusal, got {p:?} after {took:?}"
        );
        assert!(*took < Duration::from_secs(1), "{p:?} took {took:?}");
    }
    let refused = total(lab, "lb_proxy_refused_no_backend_total") - before;
    assert_eq!(
        refused, PROBES,
        "lb_proxy_refused_no_backend_total grew by {refused} for {PROBES} refused clients"
    );

    // And back.
    for i in 0..lab.backends.len() {
        lab.backends[i].start_nginx(&lab.lab).unwrap();
    }
    for b in &lab.backends {
        lab.wait_backend("web", b.http(), true, wait).unwrap();
    }
    let r = lab.load(100).unwrap();
    assert_eq!(r.errors, 0, "{r}");
}

#[test]
fn draining_engine_keeps_connections_until_the_timeout_then_resets() {
    if !require_root() {
        return;
    }
    let _serial = serial();
    let mut lab = ProxyLab::build(&Options {
        lab_prefix: "lbtpd".to_owned(),
        proxy: ProxySection {
            drain_timeout_s: Some(u32::try_from(DRAIN_S).unwrap()),
            ..ProxySection::default()
        },
        ..Options::default()
    })
    .expect("build the proxy lab");
    let vip = lab.vip_http();

    // Held connections, each located on its engine; pick a secondary that holds one.
    let mut held = Vec::new();
    let mut target = None;
    for _ in 0..30 {
        let mut c = HeldConnection::open(lab.client(0), vip, Duration::from_secs(3)).unwrap();
        c.get().unwrap();
        let (engine, _) = lab
            .find_connection(c.local_addr().unwrap(), vip, "tcp")
            .unwrap()
            .expect("held connection on no engine");
        held.push((c, engine));
        if engine != lab.primary().id && held.len() >= 6 {
            target = Some(engine);
            break;
        }
    }
    let drained = target.expect("no held connection landed on a secondary");
    println!(
        "held on engines {:?}; draining engine {drained}",
        held.iter().map(|(_, e)| *e).collect::<Vec<_>>()
    );
    let conns_before = per_engine(&lab, "lb_proxy_connections_total");

    // Draining in every config: the primary's XDP stops placing new flows on it (reloaded first),
    // its proxy stops accepting.
    lab.engine_states.insert(drained, "draining".to_owned());
    // The drain starts between these two instants (when the engine applies its reload).
    let before_reload = Instant::now();
    lab.reload_all(ReloadOrder::PrimaryFirst).unwrap();
    let t0 = Instant::now();

    // New connections meanwhile: all succeed, none on the draining engine.
    let r = lab.load(200).unwrap();
    println!("200 requests while engine {drained} drains: {r}");
    assert_eq!(r.errors, 0, "{r}");
    let conns_after = per_engine(&lab, "lb_proxy_connections_total");
    assert_eq!(
        conns_after.get(&drained),
        conns_before.get(&drained),
        "the draining engine took new connections: before {conns_before:?}, after {conns_after:?}"
    );

    // The held connections on it keep working within the timeout, and are reset after it.
    let mut reset_at = None;
    while t0.elapsed() < Duration::from_secs(DRAIN_S + 4) {
        let mut failed = false;
        for (c, e) in &mut held {
            if *e != drained {
                continue;
            }
            if let Err(err) = c.get() {
                println!(
                    "held connection on engine {drained} failed {:.2} s after the reload: {err:#}",
                    t0.elapsed().as_secs_f64()
                );
                failed = true;
            }
        }
        if failed {
            reset_at = Some(t0.elapsed());
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    let reset_at = reset_at.expect("held connections on the draining engine were never reset");
    assert!(
        reset_at <= Duration::from_millis(DRAIN_S * 1000 + 1500),
        "reset only {reset_at:?} after the reload, drain_timeout_s = {DRAIN_S}"
    );
    let since_start = reset_at + (t0 - before_reload);
    assert!(
        since_start >= Duration::from_millis(DRAIN_S * 1000 - 100),
        "reset {since_start:?} after the drain began at the latest, before drain_timeout_s = {DRAIN_S}"
    );
    let resets = per_engine(&lab, "lb_proxy_drain_resets_total");
    println!("lb_proxy_drain_resets_total per engine: {resets:?}");
    assert!(
        resets.get(&drained).copied().unwrap_or(0) >= 1,
        "{resets:?}"
    );
    // The others were not touched.
    for (i, (c, e)) in held.iter_mut().enumerate() {
        if *e != drained {
            c.get()
                .unwrap_or_else(|err| panic!("held connection {i} on engine {e} broke: {err:#}"));
        }
    }
    let r = lab.load(100).unwrap();
    assert_eq!(r.errors, 0, "{r}");
    drop(held);

    lab.engine_states.clear();
    lab.reload_all(ReloadOrder::PrimaryLast).unwrap();
    service_drain(&mut lab);
}

/// The virtual service itself drains (`virtual_services[0].draining`, every engine): new clients
/// are refused at once (listeners closed), held connections continue until the timeout and are
/// then reset; undraining opens the listeners again.
fn service_drain(lab: &mut ProxyLab) {
    let vip = lab.vip_http();
    let mut held: Vec<HeldConnection> = (0..6)
        .map(|_| {
            let mut c = HeldConnection::open(lab.client(0), vip, Duration::from_secs(3)).unwrap();
            c.get().unwrap();
            c
        })
        .collect();
    let resets_before = total(lab, "lb_proxy_drain_resets_total");
    lab.services[0].draining = Some(true);
    lab.reload_all(ReloadOrder::PrimaryFirst).unwrap();
    let t0 = Instant::now();
    let seen = lab
        .in_client(0, || Ok((0..3).map(|_| probe(vip)).collect::<Vec<_>>()))
        .unwrap();
    println!("new clients while the service drains: {seen:?}");
    for (p, took) in &seen {
        assert!(
            matches!(p, Probe::Refused | Probe::Reset) && *took < Duration::from_secs(1),
            "a new client of a draining service: {p:?} after {took:?}"
        );
    }
    while t0.elapsed() < Duration::from_millis(DRAIN_S * 1000 - 700) {
        for (i, c) in held.iter_mut().enumerate() {
            c.get().unwrap_or_else(|e| {
                panic!(
                    "held connection {i} failed {:?} into the service's drain: {e:#}",
                    t0.elapsed()
                )
            });
        }
        std::thread::sleep(Duration::from_millis(300));
    }
    std::thread::sleep(Duration::from_millis(DRAIN_S * 1000 + 1500).saturating_sub(t0.elapsed()));
    for (i, c) in held.iter_mut().enumerate() {
        assert!(
            c.get().is_err(),
            "held connection {i} still works {:?} after the service started draining",
            t0.elapsed()
        );
    }
    let resets = total(lab, "lb_proxy_drain_resets_total") - resets_before;
    assert_eq!(
        resets, 6,
        "lb_proxy_drain_resets_total grew by {resets} for 6 connections"
    );

    lab.services[0].draining = None;
    lab.reload_all(ReloadOrder::PrimaryLast).unwrap();
    let r = lab.load(100).unwrap();
    println!("after undraining the service: {r}");
    assert_eq!(r.errors, 0, "{r}");
}

/// The lab's configuration for engine `id` with `edit` applied.
fn edited(lab: &ProxyLab, id: u8, edit: &dyn Fn(&mut Config)) -> Config {
    let mut c = lab.current_config(id).unwrap();
    edit(&mut c);
    c
}

type Edit = Box<dyn Fn(&mut Config)>;

/// Configurations the daemon must refuse, with the field its message must name.
fn bad_edits() -> Vec<(&'static str, &'static str, Edit)> {
    vec![
        (
            "unknown pool",
            "virtual_services[0].pool",
            Box::new(|c: &mut Config| c.virtual_services[0].pool = Some("nope".to_owned())),
        ),
        (
            "port 0",
            "virtual_services[0].port",
            Box::new(|c: &mut Config| c.virtual_services[0].port = 0),
        ),
        (
            "duplicate VIP",
            "virtual_services[1].vip",
            Box::new(|c: &mut Config| {
                let mut dup = c.virtual_services[0].clone();
                dup.id = 1;
                "web2".clone_into(&mut dup.name);
                c.virtual_services.push(dup);
            }),
        ),
        (
            "unreachable backend",
            "pools[0].backends[3].address",
            Box::new(|c: &mut Config| {
                c.pools[0]
                    .backends
                    .push(lb_tests::daemon::Backend::new("203.0.113.9", 80));
            }),
        ),
    ]
}

#[test]
fn bad_configs_are_refused_at_start_and_on_reload() {
    if !require_root() {
        return;
    }
    let _serial = serial();
    // One engine without a daemon for the start attempts, backends to point at.
    let lab = ProxyLab::build(&Options {
        lab_prefix: "lbtps".to_owned(),
        engines: vec![lb_tests::steering::EngineSpec::new("se1", 1)],
        members: vec![lb_tests::daemon::Member { id: 1, weight: 1 }],
        backends: 1,
        daemons: false,
        ..Options::default()
    })
    .expect("build the lab");
    let opts = lab.options().clone();
    let se1 = lab.primary().ns.clone();
    let pins = PinDir::new(&format!("{}-bad", lab.lab.base())).unwrap();
    let mut edits = bad_edits();
    // One backend here: the unreachable one is backends[1].
    edits[3].1 = "pools[0].backends[1].address";
    for (what, field, edit) in &edits {
        let mut cfg = lab.config_for(1, pins.path());
        edit(&mut cfg);
        let f = start_expecting_failure(
            &lab.lab,
            &se1,
            cfg,
            &pins,
            &opts.daemon_bin,
            &opts.xdp_object,
            Duration::from_secs(15),
        )
        .unwrap_or_else(|e| panic!("{what}: {e:#}"));
        println!("{what}: {} — {}", f.status, f.log.trim());
        let want = if *what == "unreachable backend" { 1 } else { 2 };
        assert_eq!(f.status.code(), Some(want), "{what}: {}", f.log);
        assert!(
            f.log.contains(field),
            "{what}: message does not name {field}: {}",
            f.log
        );
        let link = lab.lab.ip(&se1, &["link", "show", "eth0"]).unwrap();
        assert!(!link.contains(" xdp"), "{what}: XDP left attached: {link}");
    }
    // The same engine starts with the good configuration.
    let good = lab.config_for(1, pins.path());
    let d = lb_tests::daemon::Daemon::start(
        &lab.lab,
        &se1,
        good,
        Arc::new(pins),
        &opts.daemon_bin,
        &opts.xdp_object,
    )
    .expect("the good configuration starts");
    drop(d);
}

/// A reload reaches services that are already running (a new idle timeout applies to the next
/// connection), and an edit of a pool keeps its backends' health and counters: a backend its
/// health check took down stays down, instead of coming back "up" with zeroed counters.
#[test]
fn reloads_reach_running_services_and_pool_edits_keep_health() {
    if !require_root() {
        return;
    }
    let _serial = serial();
    let mut lab = ProxyLab::build(&Options {
        lab_prefix: "lbtpe".to_owned(),
        health_check: Some(fast_http_check()),
        ..Options::default()
    })
    .expect("build the proxy lab");
    let wait = Duration::from_secs(5);
    for b in &lab.backends {
        lab.wait_backend("web", b.http(), true, wait).unwrap();
    }
    let r = lab.load(90).unwrap();
    assert_eq!(r.errors, 0, "{r}");
    let be1 = lab.backends[0].http().to_string();
    let be1_total = |lab: &ProxyLab| {
        lab.metric_total(
            "lb_backend_connections_total",
            &[("pool", "web"), ("backend", be1.as_str())],
        )
        .unwrap()
    };
    let served = be1_total(&lab);
    assert!(served > 0.0);
    let be2 = lab.backends[1].http();
    lab.backends[1].kill_nginx();
    lab.wait_backend("web", be2, false, wait).unwrap();

    // One weight changes: the pool is edited, not rebuilt.
    lab.pools[0].backends[0].weight = Some(2);
    lab.reload_all(ReloadOrder::PrimaryLast).unwrap();
    let b2 = be2.to_string();
    let up = lab
        .metric_per_engine(
            "lb_backend_up",
            &[("pool", "web"), ("backend", b2.as_str())],
        )
        .unwrap();
    assert!(
        up.values().all(|v| *v == 0.0) && up.len() == 3,
        "be2 is still down right after the edit on every engine: {up:?}"
    );
    assert!(
        be1_total(&lab) >= served,
        "be1's connection count survived the edit"
    );
    let r = lab.load(60).unwrap();
    assert_eq!(r.errors, 0, "{r}");
    assert_eq!(
        r.per_engine.get("be2"),
        None,
        "nothing to the down backend: {r}"
    );

    // The idle timeout changes under running services: the next idle client is closed after it.
    lab.proxy.idle_timeout_s = Some(1);
    lab.reload_all(ReloadOrder::PrimaryLast).unwrap();
    let vip = lab.vip_http();
    let (r, took) = lab
        .in_client(0, || {
            let mut s = TcpStream::connect_timeout(&vip, Duration::from_secs(3))?;
            s.set_read_timeout(Some(Duration::from_secs(10)))?;
            let start = Instant::now();
            let mut buf = [0u8; 16];
            Ok((s.read(&mut buf).map_err(|e| e.kind()), start.elapsed()))
        })
        .unwrap();
    assert!(
        matches!(r, Ok(0) | Err(ErrorKind::ConnectionReset)) && took < Duration::from_secs(4),
        "an idle client after idle_timeout_s = 1 was reloaded in: {r:?} after {took:?}"
    );
}

#[test]
fn bad_reloads_keep_the_old_config_and_idle_clients_are_closed() {
    if !require_root() {
        return;
    }
    let _serial = serial();
    let mut lab = ProxyLab::build(&Options {
        lab_prefix: "lbtpr".to_owned(),
        proxy: ProxySection {
            idle_timeout_s: Some(u32::try_from(IDLE_S).unwrap()),
            ..ProxySection::default()
        },
        ..Options::default()
    })
    .expect("build the proxy lab");

    for (what, field, edit) in bad_edits() {
        for id in lab.daemon_ids() {
            let cfg = edited(&lab, id, &*edit);
            let log = lab
                .daemon_mut(id)
                .unwrap()
                .reload_refused(cfg)
                .unwrap_or_else(|e| panic!("{what} on engine {id}: {e:#}"));
            assert!(
                log.contains(field),
                "{what}: engine {id}'s refusal does not name {field}: {log}"
            );
        }
        let r = lab.load(150).unwrap();
        println!("after the refused reload ({what}): {r}");
        assert_eq!(r.errors, 0, "{what}: {r}");
        assert_eq!(r.per_engine.len(), 3, "{what}: {r}");
    }
    // Nothing was half-applied: a good reload still works and serves.
    lab.reload_all(ReloadOrder::PrimaryLast).unwrap();
    let r = lab.load(150).unwrap();
    assert_eq!(r.errors, 0, "{r}");

    // A client that connects and sends nothing is closed after idle_timeout_s; one that keeps
    // talking is not.
    let idle_before = total(&lab, "lb_proxy_idle_timeouts_total");
    let vip = lab.vip_http();
    let mut busy = HeldConnection::open(lab.client(0), vip, Duration::from_secs(3)).unwrap();
    let idle = lab
        .in_client(0, || {
            let s = TcpStream::connect_timeout(&vip, Duration::from_secs(3))?;
            Ok(s)
        })
        .unwrap();
    let opened = Instant::now();
    let reader = std::thread::spawn(move || {
        let mut idle = idle;
        idle.set_read_timeout(Some(Duration::from_secs(IDLE_S + 5)))
            .unwrap();
        let mut buf = [0u8; 16];
        let r = idle.read(&mut buf);
        (r.map_err(|e| e.kind()), opened.elapsed())
    });
    while opened.elapsed() < Duration::from_millis(IDLE_S * 1000 + 1500) {
        busy.get().expect("a talking client must not be timed out");
        std::thread::sleep(Duration::from_millis(400));
    }
    let (r, took) = reader.join().unwrap();
    println!("idle client: {r:?} after {took:?}");
    assert!(
        matches!(r, Ok(0) | Err(ErrorKind::ConnectionReset)),
        "idle client: expected a close, got {r:?} after {took:?}"
    );
    assert!(
        took >= Duration::from_millis(IDLE_S * 1000 - 300)
            && took <= Duration::from_millis(IDLE_S * 1000 + 2500),
        "idle client closed after {took:?}, idle_timeout_s = {IDLE_S}"
    );
    busy.get().unwrap();
    let idle_timeouts = total(&lab, "lb_proxy_idle_timeouts_total") - idle_before;
    assert!(
        idle_timeouts >= 1,
        "lb_proxy_idle_timeouts_total did not grow"
    );
    drop(busy);
    connection_limit(&mut lab);
}

/// `max_connections = 1` (per engine, applied by reload): at most one held connection per engine,
/// every other new client is reset at once and counted.
fn connection_limit(lab: &mut ProxyLab) {
    let vip = lab.vip_http();
    lab.services[0].max_connections = Some(1);
    lab.reload_all(ReloadOrder::PrimaryLast).unwrap();
    let before = total(lab, "lb_proxy_refused_limit_total");
    let mut held = Vec::new();
    let mut refused = Vec::new();
    for _ in 0..9 {
        let start = Instant::now();
        // The reset can come before connect() has even returned (it then reports it).
        match HeldConnection::open(lab.client(0), vip, Duration::from_secs(3)).and_then(|mut c| {
            c.get()?;
            Ok(c)
        }) {
            Ok(c) => held.push(c),
            Err(e) => refused.push((format!("{e:#}"), start.elapsed())),
        }
    }
    println!(
        "max_connections = 1: {} held, refused: {refused:?}",
        held.len()
    );
    assert!(
        (1..=lab.engines.len()).contains(&held.len()),
        "{} connections held with max_connections = 1 on {} engines",
        held.len(),
        lab.engines.len()
    );
    for (e, took) in &refused {
        assert!(
            e.contains("reset") || e.contains("refused"),
            "expected a reset, got {e}"
        );
        assert!(*took < Duration::from_secs(1), "refusal took {took:?}: {e}");
    }
    let counted = total(lab, "lb_proxy_refused_limit_total") - before;
    assert_eq!(
        counted,
        refused.len() as u64,
        "lb_proxy_refused_limit_total grew by {counted} for {} refused clients",
        refused.len()
    );
    drop(held);
    lab.services[0].max_connections = None;
    lab.reload_all(ReloadOrder::PrimaryLast).unwrap();
}
