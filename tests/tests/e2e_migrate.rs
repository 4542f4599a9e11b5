//! End to end: connections whose handshakes are still in flight when their virtual service's
//! primary migrates, or when their engine is scaled in.
//!
//! `web` runs on two engines; the client's pure ACKs to the VIP are held back (an nftables drop
//! in the client's namespace), so a connection the primary steered to the secondary stays half
//! open in the secondary's kernel (`SYN_RECV`), unknown to its proxy. `lbctl migrate` then moves
//! the primary to the spare engine. The client's first data segment reaches the new primary,
//! which does not know the flow and asks the others who owns it: the secondary claims it from its
//! kernel's socket table, the segment's retransmission is forwarded there, the handshake
//! completes and the request is answered. Had the secondary answered from its proxy's table only,
//! nobody would own the flow, the new primary would take it and its stack would reset it. The old
//! primary, promoted moments before, stops its gratuitous ARPs when it is demoted (their rest
//! would pull the client back to it).
//!
//! Scaled in, an engine first gets weight 0 and keeps listening until the primary has applied
//! that and a handshake grace has passed: a connection half open there when the scale-in begins
//! completes and is served (had the engine left as soon as the primary applied its weight 0, its
//! listener would have closed and its kernel reset the connection).

use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lb_tests::Ns;
use lb_tests::client::HeldConnection;
use lb_tests::controller_lab::{ControllerLab, placement};
use lb_tests::require_root;

/// Holds back (or, `false`, lets through again) the client's segments to `vip`:80 that carry
/// only ACK: the last step of a handshake, not data (PSH) or FIN.
fn hold_acks(l: &ControllerLab, client: &Ns, vip: &str, hold: bool) -> Result<()> {
    let lab = &l.lab.lab;
    if !hold {
        lab.exec(client, &["nft", "delete", "table", "inet", "lbhold"])?;
        return Ok(());
    }
    lab.exec(client, &["nft", "add", "table", "inet", "lbhold"])?;
    lab.exec(
        client,
        &[
            "nft", "add", "chain", "inet", "lbhold", "out", "{", "type", "filter", "hook",
            "output", "priority", "0", ";", "}",
        ],
    )?;
    lab.exec(
        client,
        &[
            "nft", "add", "rule", "inet", "lbhold", "out", "ip", "daddr", vip, "tcp", "dport",
            "80", "tcp", "flags", "==", "ack", "drop",
        ],
    )?;
    Ok(())
}

/// Whether engine `id`'s kernel holds a half-open connection from `peer`.
fn half_open_on(l: &ControllerLab, id: u8, peer: &str) -> Result<bool> {
    let out = l
        .lab
        .lab
        .exec(&l.engine_ns(id)?, &["ss", "-Htn", "state", "syn-recv"])?;
    Ok(out
        .lines()
        .any(|line| line.split_whitespace().last() == Some(peer)))
}

/// A connection half open on one engine: the client's ACKs to the VIP are held back.
struct HalfOpen {
    client: Ns,
    vip: String,
    conn: HeldConnection,
    /// The client's address of it.
    peer: String,
}

/// Checks that `web` serves, holds the client's ACKs back, then opens connections until one is
/// half open on engine `secondary` (the `primary` proxies a share too).
fn half_open_connection(l: &ControllerLab, primary: u8, secondary: u8) -> HalfOpen {
    let client = l.lab.client(0).clone();
    let vip = l.lab.vip().to_string();
    let mut warm = HeldConnection::open(&client, l.lab.vip_http(), Duration::from_secs(5)).unwrap();
    warm.get().expect("web serves");
    drop(warm);
    hold_acks(l, &client, &vip, true).unwrap();
    for _ in 0..30 {
        let conn = HeldConnection::open(&client, l.lab.vip_http(), Duration::from_secs(5)).unwrap();
        let peer = conn.local_addr().unwrap().to_string();
        for _ in 0..20 {
            if half_open_on(l, secondary, &peer).unwrap() {
                return HalfOpen {
                    client,
                    vip,
                    conn,
                    peer,
                };
            }
            if half_open_on(l, primary, &peer).unwrap() {
                break;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
    }
    panic!("no connection half open on the secondary in 30 tries");
}

impl HalfOpen {
    /// Lets the client's ACKs through again.
    fn release(&self, l: &ControllerLab) {
        hold_acks(l, &self.client, &self.vip, false).unwrap();
    }
}

#[test]
#[allow(clippy::too_many_lines)]
fn a_handshake_in_flight_across_a_migration_completes_on_its_engine() {
    if !require_root() {
        return;
    }
    let l = ControllerLab::build("lbhs").expect("build the controller lab");
    l.create_web_pool().unwrap();
    let created = Instant::now();
    let on = placement(&l.create_web_service(2).unwrap());
    let (primary, secondary) = (l.id_of(&on[0]).unwrap(), l.id_of(&on[1]).unwrap());
    l.wait_serving("web", Duration::from_secs(20)).unwrap();
    let target = l
        .lab
        .engines
        .iter()
        .find(|e| !on.contains(&e.name))
        .map(|e| e.name.clone())
        .unwrap();
    let mut h = half_open_connection(&l, primary, secondary);
    let peer = h.peer.clone();

    let out = l.lbctl(&["migrate", "web", "--to", &target]).unwrap();
    assert_eq!(out.code, 0, "lbctl migrate: {}", out.stderr);
    let target_id = l.id_of(&target).unwrap();
    let target_mac = l.engine_mac(target_id).unwrap();
    l.wait(
        Duration::from_secs(20),
        "the target is primary and the client sends to it",
        |l| {
            Ok(
                l.recorded_primary("web")?.0.as_deref() == Some(target.as_str())
                    && l.vip_holders()? == [target.clone()]
                    && l.client_neighbour(l.lab.vip().into())
                        .is_some_and(|(mac, _)| mac == target_mac),
            )
        },
    )
    .unwrap();
    assert!(
        half_open_on(&l, secondary, &peer).unwrap(),
        "{peer} is still half open on the secondary"
    );
    let garps = |l: &ControllerLab| l.metric_per_engine("lb_garp_sent_total", &[]).unwrap();
    let garps_demoted = garps(&l)[&primary];

    h.release(&l);
    let body = h
        .conn
        .get()
        .with_context(|| format!("{peer} across the migration to {target}"));
    let claimed = l
        .metric_per_engine("lb_owner_flows_kernel_held_total", &[])
        .unwrap();
    let answered = l
        .metric_per_engine("lb_owner_queries_answered_total", &[])
        .unwrap();
    println!(
        "{peer}: {body:?}; claimed from the kernel's socket table {claimed:?}; owner queries \
         answered {answered:?}"
    );
    if body.is_err() {
        l.print_engines_report();
    }
    let body = body.unwrap();
    assert!(!body.is_empty(), "an empty body");
    assert!(
        claimed[&secondary] >= 1.0,
        "the secondary claimed the flow from its kernel: {claimed:?}"
    );
    assert!(
        answered[&target_id] >= 1.0,
        "the new primary had its query answered: {answered:?}"
    );
    // The old primary took the role moments before the migration, so its gratuitous ARPs (over
    // 4 s) were not done: demoted, it stopped them (the rest would have pulled the client back to
    // it, whose stack resets the connection).
    std::thread::sleep(
        (created + Duration::from_secs(5)).saturating_duration_since(Instant::now()),
    );
    let garps_after = garps(&l)[&primary];
    assert!(
        (garps_after - garps_demoted).abs() < 0.5,
        "the old primary announced the VIP after its demotion: {garps_demoted} → {garps_after}"
    );
    assert_eq!(
        l.client_neighbour(l.lab.vip().into()).map(|(mac, _)| mac),
        Some(target_mac.clone()),
        "the client sends to the new primary"
    );
    // The connection lives on, on the secondary.
    let again = h.conn.get();
    if again.is_err() {
        l.print_engines_report();
    }
    let again = again.expect("a second request on it");
    assert!(!again.is_empty());
}

#[test]
fn a_handshake_in_flight_across_a_scale_in_completes_on_the_leaving_engine() {
    if !require_root() {
        return;
    }
    let l = ControllerLab::build("lbsi").expect("build the controller lab");
    l.create_web_pool().unwrap();
    l.create_web_service(1).unwrap();
    let out = l.lbctl(&["scale-out", "web"]).unwrap();
    assert_eq!(out.code, 0, "lbctl scale-out: {}", out.stderr);
    let on = l.wait_serving("web", Duration::from_secs(20)).unwrap();
    assert_eq!(on.len(), 2, "{on:?}");
    let (primary, secondary) = (l.id_of(&on[0]).unwrap(), l.id_of(&on[1]).unwrap());
    let mut h = half_open_connection(&l, primary, secondary);
    let peer = h.peer.clone();
    let out = l.lbctl(&["scale-in", "web", "--engine", &on[1]]).unwrap();
    assert_eq!(out.code, 0, "lbctl scale-in: {}", out.stderr);
    // The primary sends the leaving engine nothing new once it has applied its weight 0.
    let weight_on_primary = |l: &ControllerLab| {
        l.applied(&on[0]).and_then(|a| {
            let vs = a
                .desired
                .virtual_services
                .iter()
                .find(|v| v.name == "web")?;
            vs.engines
                .iter()
                .find(|m| m.id == u32::from(secondary))
                .map(|m| m.weight)
        })
    };
    l.wait(
        Duration::from_secs(10),
        "the primary applied the leaving engine's weight 0",
        |l| Ok(weight_on_primary(l) == Some(0)),
    )
    .unwrap();
    // Past the controller's next tick (1 s here): an engine that left as soon as the primary had
    // applied its weight 0 would have closed its listener by now.
    std::thread::sleep(Duration::from_millis(1500));
    assert!(
        half_open_on(&l, secondary, &peer).unwrap(),
        "{peer} is still half open on the leaving engine"
    );
    h.release(&l);
    let body = h.conn.get();
    if body.is_err() {
        l.print_engines_report();
    }
    let body = body.unwrap_or_else(|e| panic!("{peer} across the scale-in: {e:#}"));
    assert!(!body.is_empty(), "an empty body");
    // The grace ends: the engine leaves and drains, the connection lives on there.
    l.wait(
        Duration::from_secs(15),
        "the scaled-in engine left the placement",
        |l| Ok(placement(&l.lbctl(&["vs", "get", "web"])?.json()?) == [on[0].clone()]),
    )
    .unwrap();
    let again = h.conn.get();
    if again.is_err() {
        l.print_engines_report();
    }
    assert!(!again.expect("a second request on it, draining").is_empty());
}
