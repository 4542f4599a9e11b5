//! The XDP program, path by path, through `BPF_PROG_TEST_RUN`: every test loads its own data plane
//! (own pin directory, small tables) with `STANDARD_CONFIG` and checks exact verdicts, exact output
//! bytes and exactly which reason counters move. Needs root; skips otherwise.

use std::net::{IpAddr, Ipv4Addr, Ipv6Addr, SocketAddr};
use std::time::Duration;

use lb_common::{PROTO_TCP, PROTO_UDP, Reason};
use lb_daemon::tables::Tables;
use lb_tests::fixtures::{
    CLIENT4, CLIENT6, E_L2_A, E_L2_B, E_LOCAL, E_REDIRECT, E_TUNNEL, ENGINE4_V4, ENGINE4_V6,
    Fixture, Flow, LO_LINK_MAC, OUR_MAC, Packet, ROUTER4, ROUTER6, STANDARD_CONFIG, TUNNEL_SRC4,
    TUNNEL_SRC6, Testbed, VIP4, VIP4_REDIRECT, VIP4_SECONDARY, VIP4_STICKY, VIP6, VS_DNS,
    VS_STICKY, VS_WEB, VS_WEB6, client_owner, client4, client6, edit, engine_mac, engine_state,
    flow_owner, fx_conn_hit, fx_new_flow, fx_non_vip, icmp_frag_needed, icmpv6_packet_too_big,
    ip6ip6, ipip, other_ifindex, rewrite_macs, tcp_flags, web_port, web4, web6, with_ipv6_ext, xdp,
};

/// A fresh standard test bed, or `None` (after the skip note) without root.
fn testbed() -> Option<Testbed> {
    testbed_with(STANDARD_CONFIG)
}

fn testbed_with(config: &str) -> Option<Testbed> {
    if !lb_tests::require_root() {
        return None;
    }
    Some(Testbed::with_config(config).expect("test data plane"))
}

fn sock(ip: impl Into<IpAddr>, port: u16) -> SocketAddr {
    SocketAddr::new(ip.into(), port)
}

/// The `nth` port of `CLIENT6` whose flow to `[VIP6]:80` lands on `engine`.
fn web6_port(tb: &Testbed, engine: u32, nth: usize) -> u16 {
    tb.ports_to(VS_WEB6, CLIENT6.into(), web6(), PROTO_TCP, engine)
        .nth(nth)
        .expect("a port")
}

/// Records the flow of `pkt` (a SYN) and checks it went where the ring said.
fn record(tb: &Testbed, pkt: &Packet) {
    tb.check(&tb.expect_new_flow(pkt));
}

/// An L2 `XDP_TX` of `frame` to `engine`.
fn tx_to(description: &str, frame: Vec<u8>, engine: u32, reasons: &[Reason]) -> Fixture {
    let out = rewrite_macs(&frame, engine_mac(engine), OUR_MAC);
    Fixture::new(description, frame, xdp::TX)
        .output(out)
        .reasons(reasons)
}

/// `n` new flows to `VIP4:80` from ports `first..`: each goes where the current ring says, and none
/// to `avoid`.
fn new_flows_avoid(tb: &Testbed, first: u16, n: u16, avoid: u32) {
    for port in first..first + n {
        let pkt = Packet::syn(client4(port), web4());
        let fx = tb.expect_new_flow(&pkt);
        let owner = tb.ring_owner(VS_WEB, pkt.flow().hash());
        assert_ne!(
            owner, avoid,
            "port {port}: the ring still names engine {avoid}"
        );
        let out = tb.check(&fx);
        assert_ne!(
            out.output[0..6],
            engine_mac(avoid),
            "port {port} sent to engine {avoid}'s MAC"
        );
        assert_eq!(tb.conn_owner(&pkt.flow()), Some(owner));
    }
}

#[test]
fn non_vip_traffic_passes_unchanged() {
    let Some(tb) = testbed() else { return };
    tb.check(&fx_non_vip());
    let wrong_port = Packet::syn(client4(40001), sock(VIP4, 81)).build();
    tb.check_pass("VIP address, wrong port", wrong_port, Reason::PassNotVip);
    let wrong_proto = Packet::udp(client4(40002), web4())
        .with_payload(b"x")
        .build();
    tb.check(
        &Fixture::new(
            "VIP address and port, wrong protocol (UDP)",
            wrong_proto,
            xdp::PASS,
        )
        .unchanged()
        .reasons(&[Reason::PassNotVip]),
    );
    let v6 = Packet::syn(
        client6(40003),
        sock(Ipv6Addr::new(0xfd00, 0, 0, 0, 0, 0, 0, 0x99), 80),
    )
    .build();
    tb.check_pass("non-VIP IPv6", v6, Reason::PassNotVip);
    let ping = Packet::icmp(
        CLIENT4.into(),
        Ipv4Addr::new(10, 100, 0, 99).into(),
        8,
        0,
        [0, 1, 0, 1],
        b"ping",
    )
    .build();
    tb.check_pass("ICMP echo to a non-VIP", ping, Reason::PassNotVip);
    let arp = lb_tests::fixtures::arp_request(VIP4);
    tb.check_pass("ARP request for the VIP", arp, Reason::PassNotIp);
    // Nothing was recorded.
    assert_eq!(
        tb.conn_owner(&Packet::syn(client4(40001), sock(VIP4, 81)).flow()),
        None
    );
}

#[test]
fn new_flow_to_l2_engine_is_sent_with_rewritten_macs() {
    let Some(tb) = testbed() else { return };
    let fx = fx_new_flow(&tb, 0);
    // The oracle's expectation, restated by hand: only the two MACs change.
    let mut by_hand = fx.input.clone();
    by_hand[0..6].copy_from_slice(&[0x02, 0, 0, 0, 0, 0x02]);
    by_hand[6..12].copy_from_slice(&OUR_MAC);
    assert_eq!(fx.expected_output.as_deref(), Some(by_hand.as_slice()));
    assert_eq!(
        fx.expected_reasons,
        vec![(Reason::ConnNew, 1), (Reason::TxL2, 1)]
    );
    tb.check(&fx);
    let port = web_port(&tb, E_L2_A, 0);
    let flow = Packet::syn(client4(port), web4()).flow();
    assert_eq!(tb.conn_owner(&flow), Some(E_L2_A));
    let Flow::V4(key) = flow else { unreachable!() };
    let entry = tb.dp.conn_v4.get(&key, 0).unwrap();
    assert_eq!((entry.engine_id, entry.vs_id), (E_L2_A, VS_WEB));
    let vs = tb.dp.counters.vs(VS_WEB).unwrap();
    let engine = tb.dp.counters.engine(E_L2_A).unwrap();
    let len = fx.input.len() as u64;
    assert_eq!((vs.packets, vs.bytes, vs.new_flows), (1, len, 1));
    assert_eq!(
        (engine.packets, engine.bytes, engine.new_flows),
        (1, len, 1)
    );
    // The same flow again: a connection hit, same engine.
    tb.check(&fx_conn_hit(&tb));
    assert_eq!(tb.dp.counters.vs(VS_WEB).unwrap().new_flows, 1);
}

#[test]
fn new_flow_owned_by_this_host_passes_unchanged() {
    let Some(tb) = testbed() else { return };
    let pkt = Packet::syn(client4(web_port(&tb, E_LOCAL, 0)), web4());
    let fx = Fixture::new("new flow to the local engine", pkt.build(), xdp::PASS)
        .unchanged()
        .reasons(&[Reason::ConnNew, Reason::Local]);
    tb.check(&fx);
    assert_eq!(tb.conn_owner(&pkt.flow()), Some(E_LOCAL));
    let ack = Packet::ack(client4(web_port(&tb, E_LOCAL, 0)), web4()).build();
    tb.check(
        &Fixture::new("local flow, hit", ack, xdp::PASS)
            .unchanged()
            .reasons(&[Reason::ConnHit, Reason::Local]),
    );
}

/// Where the data plane places a flow whose ring slot names this host while nothing here listens:
/// the engine of the first of the next 64 ring slots that names another one.
fn placed_away(tb: &Testbed, vs: u32, hash: u32) -> Option<u32> {
    let ring = &tb.tables.rings[&vs];
    let first = lb_common::hash::ring_slot(hash) as usize;
    (1..=64)
        .map(|k| ring[(first + k) % ring.len()])
        .find(|&e| e != E_LOCAL)
}

#[test]
fn new_flow_for_this_host_without_a_listener_is_placed_on_another_engine() {
    let Some(mut tb) = testbed() else { return };
    tb.close_sockets();
    // A port the ring gives to this host and whose fallback is an engine on the segment.
    let (port, away) = tb
        .ports_to(VS_WEB, CLIENT4.into(), web4(), PROTO_TCP, E_LOCAL)
        .find_map(|p| {
            let hash = Packet::syn(client4(p), web4()).flow().hash();
            placed_away(&tb, VS_WEB, hash)
                .filter(|e| [E_L2_A, E_L2_B].contains(e))
                .map(|e| (p, e))
        })
        .expect("a local port placed away on the segment");
    let syn = Packet::syn(client4(port), web4());
    tb.check(&tx_to(
        "SYN for this host, nothing listening: placed away",
        syn.build(),
        away,
        &[Reason::ConnNew, Reason::PlacedAwayNoListener, Reason::TxL2],
    ));
    assert_eq!(tb.conn_owner(&syn.flow()), Some(away));
    // The listener is back: the flow stays where it was placed (its packets are already there)...
    tb.open_sockets().unwrap();
    let ack = Packet::ack(client4(port), web4()).build();
    tb.check(&tx_to(
        "the placed-away flow, listener back",
        ack,
        away,
        &[Reason::ConnHit, Reason::TxL2],
    ));
    // ...and new flows for this host pass up again.
    let local = Packet::syn(client4(web_port(&tb, E_LOCAL, 3)), web4()).build();
    tb.check(
        &Fixture::new("SYN for this host, listening", local, xdp::PASS)
            .unchanged()
            .reasons(&[Reason::ConnNew, Reason::Local]),
    );

    // A retransmitted SYN of a flow recorded for this host before the listener went away.
    let port = web_port(&tb, E_LOCAL, 5);
    let first = Packet::syn(client4(port), web4());
    tb.check(
        &Fixture::new("SYN recorded locally", first.build(), xdp::PASS)
            .unchanged()
            .reasons(&[Reason::ConnNew, Reason::Local]),
    );
    tb.close_sockets();
    let away = placed_away(&tb, VS_WEB, first.flow().hash()).unwrap();
    let out = tb.run(&first.build()).unwrap();
    assert_ne!(
        out.action,
        xdp::PASS,
        "a retransmitted SYN without listener"
    );
    assert_eq!(tb.conn_owner(&first.flow()), Some(away));
    // Mid-flow packets of a local flow are not looked up: they pass (their socket, if it is gone,
    // is gone with the daemon).
    let ack = Packet::ack(client4(web_port(&tb, E_LOCAL, 3)), web4()).build();
    tb.check(
        &Fixture::new("local flow without listener, mid-flow", ack, xdp::PASS)
            .unchanged()
            .reasons(&[Reason::ConnHit, Reason::Local]),
    );
}

#[test]
fn udp_new_flow_for_this_host_without_a_socket_is_placed_away() {
    let Some(mut tb) = testbed() else { return };
    tb.close_sockets();
    let dns = sock(VIP4, 53);
    let (port, away) = tb
        .ports_to(VS_DNS, CLIENT4.into(), dns, PROTO_UDP, E_LOCAL)
        .find_map(|p| {
            let hash = Packet::udp(client4(p), dns).flow().hash();
            placed_away(&tb, VS_DNS, hash)
                .filter(|e| [E_L2_A, E_L2_B].contains(e))
                .map(|e| (p, e))
        })
        .expect("a local port placed away on the segment");
    let pkt = Packet::udp(client4(port), dns);
    tb.check(&tx_to(
        "UDP for this host, no socket: placed away",
        pkt.build(),
        away,
        &[Reason::ConnNew, Reason::PlacedAwayNoListener, Reason::TxL2],
    ));
    assert_eq!(tb.conn_owner(&pkt.flow()), Some(away));
}

#[test]
fn syn_with_nowhere_else_to_go_is_dropped_until_a_listener_is_back() {
    let config = edit(
        STANDARD_CONFIG,
        "engines = [ { id = 1 }, { id = 2 }, { id = 3 }, { id = 4 } ] # web engines",
        "engines = [ { id = 1 } ] # web engines",
    );
    let Some(mut tb) = testbed_with(&config) else {
        return;
    };
    tb.close_sockets();
    let syn = Packet::syn(client4(40000), web4());
    tb.check(
        &Fixture::new("only this host, nothing listening", syn.build(), xdp::DROP)
            .unchanged()
            .reasons(&[Reason::ConnNew, Reason::DropNoListener]),
    );
    assert_eq!(
        tb.conn_owner(&syn.flow()),
        None,
        "the retransmission is placed afresh"
    );
    tb.open_sockets().unwrap();
    tb.check(
        &Fixture::new(
            "the retransmitted SYN, listener back",
            syn.build(),
            xdp::PASS,
        )
        .unchanged()
        .reasons(&[Reason::ConnNew, Reason::Local]),
    );
    assert_eq!(tb.conn_owner(&syn.flow()), Some(E_LOCAL));
}

#[test]
fn syn_steered_to_this_secondary_without_a_listener_is_dropped() {
    let Some(mut tb) = testbed() else { return };
    let vs = sock(VIP4_SECONDARY, 80);
    tb.close_sockets();
    tb.check(
        &Fixture::new(
            "SYN to a secondary VIP, nothing listening",
            Packet::syn(client4(40000), vs).build(),
            xdp::DROP,
        )
        .unchanged()
        .reasons(&[Reason::DropNoListener]),
    );
    // Anything but a SYN passes as before: only a connection's first packet needs a socket.
    tb.check_pass(
        "mid-flow segment to a secondary VIP",
        Packet::ack(client4(40000), vs).build(),
        Reason::PassNotPrimary,
    );
    tb.open_sockets().unwrap();
    tb.check_pass(
        "SYN to a secondary VIP, listening",
        Packet::syn(client4(40000), vs).build(),
        Reason::PassNotPrimary,
    );
}

#[test]
fn a_draining_service_without_listeners_refuses_new_connections() {
    // A draining service closed its listeners on purpose: its SYNs go up to be reset at once, here
    // and on a secondary, instead of being placed away or dropped.
    let config = STANDARD_CONFIG
        .replace("name = \"web\"\n", "name = \"web\"\ndraining = true\n")
        .replace(
            "name = \"secondary\"\n",
            "name = \"secondary\"\ndraining = true\n",
        );
    let Some(mut tb) = testbed_with(&config) else {
        return;
    };
    tb.close_sockets();
    let syn = Packet::syn(client4(web_port(&tb, E_LOCAL, 0)), web4()).build();
    tb.check(
        &Fixture::new("SYN for this host, service draining", syn, xdp::PASS)
            .unchanged()
            .reasons(&[Reason::ConnNew, Reason::Local]),
    );
    tb.check_pass(
        "SYN to a draining secondary VIP",
        Packet::syn(client4(40000), sock(VIP4_SECONDARY, 80)).build(),
        Reason::PassNotPrimary,
    );
}

#[test]
fn recorded_flow_keeps_its_engine_after_the_ring_changes() {
    let Some(mut tb) = testbed() else { return };
    let port = web_port(&tb, E_L2_A, 0);
    record(&tb, &Packet::syn(client4(port), web4()));

    // Engine 2 keeps its entry but gets weight 0: it leaves the ring.
    let weight0 = edit(
        STANDARD_CONFIG,
        "{ id = 2 }, { id = 3 }, { id = 4 } ] # web engines",
        "{ id = 2, weight = 0 }, { id = 3 }, { id = 4 } ] # web engines",
    );
    tb.reconfigure(&weight0).unwrap();
    assert!(!tb.tables.rings[&VS_WEB].contains(&E_L2_A));
    assert_ne!(
        tb.ring_owner(VS_WEB, Packet::syn(client4(port), web4()).flow().hash()),
        E_L2_A
    );
    let ack = Packet::ack(client4(port), web4()).build();
    tb.check(&tx_to(
        "hit after weight 0",
        ack.clone(),
        E_L2_A,
        &[Reason::ConnHit, Reason::TxL2],
    ));
    new_flows_avoid(&tb, 20000, 200, E_L2_A);

    // Engine 2 removed from the service altogether (still defined and active).
    let removed = edit(
        STANDARD_CONFIG,
        "{ id = 1 }, { id = 2 }, { id = 3 }, { id = 4 } ] # web engines",
        "{ id = 1 }, { id = 3 }, { id = 4 } ] # web engines",
    );
    tb.reconfigure(&removed).unwrap();
    assert!(!tb.tables.rings[&VS_WEB].contains(&E_L2_A));
    tb.check(&tx_to(
        "hit after removal from the service",
        ack,
        E_L2_A,
        &[Reason::ConnHit, Reason::TxL2],
    ));
    assert_eq!(
        tb.conn_owner(&Packet::syn(client4(port), web4()).flow()),
        Some(E_L2_A)
    );
    new_flows_avoid(&tb, 30000, 200, E_L2_A);
}

/// A client port whose flow to `VIP4:80` the ring of `before` gives to `from` and the ring of
/// `after` to `to`.
fn moving_port(before: &Tables, after: &Tables, from: u32, to: u32) -> u16 {
    (1024..=u16::MAX)
        .find(|p| {
            flow_owner(before, VS_WEB, client4(*p), web4(), PROTO_TCP) == from
                && flow_owner(after, VS_WEB, client4(*p), web4(), PROTO_TCP) == to
        })
        .expect("a port that moves")
}

#[test]
fn draining_engine_keeps_existing_flows_and_gets_no_new_ones() {
    let Some(mut tb) = testbed() else { return };
    let draining = engine_state(STANDARD_CONFIG, E_L2_B, "draining");
    let port = moving_port(&tb.tables, &tb.plan(&draining).unwrap(), E_L2_B, E_L2_A);
    record(&tb, &Packet::syn(client4(port), web4()));
    tb.reconfigure(&draining).unwrap();
    assert!(!tb.tables.rings[&VS_WEB].contains(&E_L2_B));
    let ack = Packet::ack(client4(port), web4()).build();
    tb.check(&tx_to(
        "existing flow of a draining engine",
        ack.clone(),
        E_L2_B,
        &[Reason::ConnHit, Reason::TxL2],
    ));
    new_flows_avoid(&tb, 20000, 200, E_L2_B);
    // A SYN reusing the ports of a draining engine's flow is a new connection: placed again.
    let syn = Packet::syn(client4(port), web4());
    tb.check(&tx_to(
        "SYN on the ports of a draining engine's flow",
        syn.build(),
        E_L2_A,
        &[Reason::SynToDraining, Reason::TxL2],
    ));
    assert_eq!(tb.conn_owner(&syn.flow()), Some(E_L2_A));
    tb.check(&tx_to(
        "the new connection sticks",
        ack,
        E_L2_A,
        &[Reason::ConnHit, Reason::TxL2],
    ));
}

#[test]
fn flows_of_a_removed_engine_are_replaced() {
    let Some(mut tb) = testbed() else { return };
    let removed = STANDARD_CONFIG
        .replace(
            "[[engines]]\nid = 3\nmac = \"02:00:00:00:00:03\"\nstate = \"active\" # engine 3\n",
            "",
        )
        .replace(", { id = 3 }", "");
    assert!(!removed.contains("{ id = 3 }") && !removed.contains("# engine 3"));
    let port = moving_port(&tb.tables, &tb.plan(&removed).unwrap(), E_L2_B, E_L2_A);
    record(&tb, &Packet::syn(client4(port), web4()));
    tb.reconfigure(&removed).unwrap();
    assert!(!tb.tables.engines.contains_key(&E_L2_B));
    let ack = Packet::ack(client4(port), web4());
    tb.check(&tx_to(
        "flow of a removed engine",
        ack.build(),
        E_L2_A,
        &[Reason::ConnOwnerDown, Reason::TxL2],
    ));
    assert_eq!(tb.conn_owner(&ack.flow()), Some(E_L2_A));
}

#[test]
fn recorded_flows_of_a_service_that_changed_are_not_followed() {
    let Some(mut tb) = testbed() else { return };
    let port = web_port(&tb, E_L2_A, 0);
    record(&tb, &Packet::syn(client4(port), web4()));
    let ack = Packet::ack(client4(port), web4()).build();
    let web_block =
        "name = \"web\"\nvip = \"10.100.0.10\"\nport = 80\nprotocol = \"tcp\"\nprimary = 1\n";

    // Another engine became primary: its packets are no longer ours to steer.
    let moved = edit(
        STANDARD_CONFIG,
        web_block,
        &web_block.replace("primary = 1", "primary = 2"),
    );
    tb.reconfigure(&moved).unwrap();
    tb.check_pass(
        "recorded flow, primary moved away",
        ack.clone(),
        Reason::PassNotPrimary,
    );

    // The service id is re-used for another VIP: the old flow is no VIP traffic any more.
    let reused = edit(
        STANDARD_CONFIG,
        web_block,
        &web_block.replace("10.100.0.10", "10.100.0.60"),
    );
    tb.reconfigure(&reused).unwrap();
    tb.check_pass(
        "recorded flow, service id re-used",
        ack.clone(),
        Reason::PassNotVip,
    );
    let new_vip = sock(Ipv4Addr::new(10, 100, 0, 60), 80);
    let syn = Packet::syn(client4(port), new_vip);
    let fx = tb.expect_new_flow(&syn);
    tb.check(&fx);

    // The service removed.
    let block = format!(
        "[[virtual_services]]\nid = 0\n{web_block}engines = [ {{ id = 1 }}, {{ id = 2 }}, {{ id = 3 }}, {{ id = 4 }} ] # web engines\n"
    );
    tb.reconfigure(&edit(STANDARD_CONFIG, &block, "")).unwrap();
    tb.check_pass("recorded flow, service removed", ack, Reason::PassNotVip);
}

#[test]
fn flows_of_a_down_engine_are_rehashed_to_an_active_one() {
    let Some(mut tb) = testbed() else { return };
    let down = engine_state(STANDARD_CONFIG, E_L2_B, "down");
    let down_tables = tb.plan(&down).unwrap();
    // A flow engine 3 owns now and the ring without engine 3 gives to engine 2.
    let port = moving_port(&tb.tables, &down_tables, E_L2_B, E_L2_A);
    let flow = Packet::syn(client4(port), web4()).flow();
    record(&tb, &Packet::syn(client4(port), web4()));
    assert_eq!(tb.conn_owner(&flow), Some(E_L2_B));

    tb.reconfigure(&down).unwrap();
    let ack = Packet::ack(client4(port), web4()).build();
    tb.check(&tx_to(
        "flow of a down engine",
        ack.clone(),
        E_L2_A,
        &[Reason::ConnOwnerDown, Reason::TxL2],
    ));
    assert_eq!(
        tb.conn_owner(&flow),
        Some(E_L2_A),
        "the connection entry follows the new owner"
    );
    tb.check(&tx_to(
        "re-hashed flow, next segment",
        ack,
        E_L2_A,
        &[Reason::ConnHit, Reason::TxL2],
    ));
    new_flows_avoid(&tb, 20000, 200, E_L2_B);
}

#[test]
fn tcp_segment_without_syn_and_without_entry_is_counted_and_forwarded() {
    let Some(tb) = testbed() else { return };
    let port = web_port(&tb, E_L2_A, 0);
    let ack = Packet::ack(client4(port), web4());
    let fx = tb.expect_new_flow(&ack);
    assert_eq!(
        fx.expected_reasons,
        vec![
            (Reason::TcpNonSynMiss, 1),
            (Reason::ConnNew, 1),
            (Reason::TxL2, 1)
        ]
    );
    tb.check(&fx);
    assert_eq!(tb.conn_owner(&ack.flow()), Some(E_L2_A));
}

/// The sticky service with engines 2 and 3 becomes 1:4 weighted: a client the ring gave to engine 2
/// before and gives to engine 3 after.
fn sticky_change(tb: &Testbed, config: &str) -> (String, Ipv4Addr) {
    let changed = edit(
        config,
        "engines = [ { id = 2 }, { id = 3 } ] # sticky engines",
        "engines = [ { id = 2 }, { id = 3, weight = 4 } ] # sticky engines",
    );
    let after = tb.plan(&changed).unwrap();
    let client = (1..=254u8)
        .map(|x| Ipv4Addr::new(198, 18, 0, x))
        .find(|c| {
            client_owner(&tb.tables, VS_STICKY, (*c).into()) == E_L2_A
                && client_owner(&after, VS_STICKY, (*c).into()) == E_L2_B
        })
        .expect("a client that moves");
    (changed, client)
}

fn sticky_syn(client: Ipv4Addr, port: u16) -> Vec<u8> {
    Packet::syn(sock(client, port), sock(VIP4_STICKY, 443)).build()
}

#[test]
fn source_ip_persistence_holds_across_ring_changes() {
    let Some(mut tb) = testbed() else { return };
    let (changed, client) = sticky_change(&tb, STANDARD_CONFIG);
    tb.check(&tx_to(
        "first flow of the client",
        sticky_syn(client, 10001),
        E_L2_A,
        &[Reason::ConnNew, Reason::TxL2],
    ));
    assert_eq!(tb.persisted(VS_STICKY, client.into()), Some(E_L2_A));
    for port in 10002..10008 {
        tb.check(&tx_to(
            "another flow of the client",
            sticky_syn(client, port),
            E_L2_A,
            &[Reason::PersistHit, Reason::ConnNew, Reason::TxL2],
        ));
    }
    tb.reconfigure(&changed).unwrap();
    assert_eq!(client_owner(&tb.tables, VS_STICKY, client.into()), E_L2_B);
    for port in 10008..10012 {
        tb.check(&tx_to(
            "flow after the ring change",
            sticky_syn(client, port),
            E_L2_A,
            &[Reason::PersistHit, Reason::ConnNew, Reason::TxL2],
        ));
    }
    let ack = Packet::ack(sock(client, 10001), sock(VIP4_STICKY, 443)).build();
    tb.check(&tx_to(
        "existing flow",
        ack,
        E_L2_A,
        &[Reason::ConnHit, Reason::TxL2],
    ));
    // A client without an entry follows the new ring.
    let other = (1..=254u8)
        .map(|x| Ipv4Addr::new(198, 18, 1, x))
        .find(|c| client_owner(&tb.tables, VS_STICKY, (*c).into()) == E_L2_B)
        .unwrap();
    tb.check(&tx_to(
        "new client",
        sticky_syn(other, 10001),
        E_L2_B,
        &[Reason::ConnNew, Reason::TxL2],
    ));
    assert_eq!(tb.persisted(VS_STICKY, other.into()), Some(E_L2_B));

    // The persisted engine drains: the client's new flows follow the ring (engine 3), and the entry
    // moves with them; its existing flow stays.
    tb.reconfigure(&engine_state(&changed, E_L2_A, "draining"))
        .unwrap();
    tb.check(&tx_to(
        "persisted engine draining",
        sticky_syn(client, 10012),
        E_L2_B,
        &[Reason::ConnNew, Reason::TxL2],
    ));
    assert_eq!(tb.persisted(VS_STICKY, client.into()), Some(E_L2_B));
    tb.check(&tx_to(
        "and sticks there",
        sticky_syn(client, 10013),
        E_L2_B,
        &[Reason::PersistHit, Reason::ConnNew, Reason::TxL2],
    ));
    let ack = Packet::ack(sock(client, 10001), sock(VIP4_STICKY, 443)).build();
    tb.check(&tx_to(
        "existing flow of the draining engine",
        ack,
        E_L2_A,
        &[Reason::ConnHit, Reason::TxL2],
    ));
}

#[test]
fn source_ip_persistence_expires_after_its_timeout() {
    let one_second = edit(
        STANDARD_CONFIG,
        "persistence_timeout_s = 300 # sticky timeout",
        "persistence_timeout_s = 1 # sticky timeout",
    );
    let Some(mut tb) = testbed_with(&one_second) else {
        return;
    };
    let (changed, client) = sticky_change(&tb, &one_second);
    let start = std::time::Instant::now();
    tb.check(&tx_to(
        "first flow",
        sticky_syn(client, 10001),
        E_L2_A,
        &[Reason::ConnNew, Reason::TxL2],
    ));
    tb.reconfigure(&changed).unwrap();
    if start.elapsed() < Duration::from_millis(800) {
        tb.check(&tx_to(
            "within the timeout",
            sticky_syn(client, 10002),
            E_L2_A,
            &[Reason::PersistHit, Reason::ConnNew, Reason::TxL2],
        ));
    } else {
        eprintln!(
            "reconfigure took {:?}: within-timeout check skipped",
            start.elapsed()
        );
    }
    std::thread::sleep(Duration::from_millis(1500));
    tb.check(&tx_to(
        "after the timeout: the ring",
        sticky_syn(client, 10003),
        E_L2_B,
        &[Reason::ConnNew, Reason::TxL2],
    ));
    assert_eq!(tb.persisted(VS_STICKY, client.into()), Some(E_L2_B));
    let ack = Packet::ack(sock(client, 10001), sock(VIP4_STICKY, 443)).build();
    tb.check(&tx_to(
        "the first flow keeps its engine",
        ack,
        E_L2_A,
        &[Reason::ConnHit, Reason::TxL2],
    ));
}

#[test]
fn ipv6_and_udp_new_flows() {
    let Some(tb) = testbed() else { return };
    let v6 = Packet::syn(client6(web6_port(&tb, E_L2_A, 0)), web6());
    tb.check(&tx_to(
        "IPv6 new flow",
        v6.build(),
        E_L2_A,
        &[Reason::ConnNew, Reason::TxL2],
    ));
    assert_eq!(tb.conn_owner(&v6.flow()), Some(E_L2_A));

    let dns = sock(VIP4, 53);
    let port = tb
        .ports_to(VS_DNS, CLIENT4.into(), dns, PROTO_UDP, E_L2_B)
        .next()
        .unwrap();
    let udp = Packet::udp(client4(port), dns).with_payload(b"\x12\x34\x01\x00\x00\x01");
    tb.check(&tx_to(
        "UDP new flow",
        udp.build(),
        E_L2_B,
        &[Reason::ConnNew, Reason::TxL2],
    ));
    assert_eq!(tb.conn_owner(&udp.flow()), Some(E_L2_B));
    tb.check(&tx_to(
        "UDP, same flow",
        udp.build(),
        E_L2_B,
        &[Reason::ConnHit, Reason::TxL2],
    ));
}

#[test]
fn vlan_tag_is_kept() {
    let Some(tb) = testbed() else { return };
    let pkt = Packet::syn(client4(web_port(&tb, E_L2_A, 0)), web4())
        .with_vlan(100)
        .build();
    assert_eq!(&pkt[12..16], &[0x81, 0x00, 0x00, 100]);
    tb.check(&tx_to(
        "802.1Q tagged new flow",
        pkt,
        E_L2_A,
        &[Reason::ConnNew, Reason::TxL2],
    ));
    let mut qinq_outer = Packet::syn(client4(web_port(&tb, E_L2_A, 1)), web4())
        .with_vlan(7)
        .build();
    qinq_outer[12..14].copy_from_slice(&[0x88, 0xa8]);
    tb.check(&tx_to(
        "802.1ad tagged new flow",
        qinq_outer,
        E_L2_A,
        &[Reason::ConnNew, Reason::TxL2],
    ));
    let v6 = Packet::syn(client6(web6_port(&tb, E_L2_B, 0)), web6())
        .with_vlan(4000)
        .build();
    tb.check(&tx_to(
        "802.1Q tagged IPv6",
        v6,
        E_L2_B,
        &[Reason::ConnNew, Reason::TxL2],
    ));
    // Two tags: the data plane reads one; the EtherType behind it is a tag again, not IP.
    let single = Packet::syn(client4(40000), web4()).with_vlan(5).build();
    let mut double = single[..16].to_vec();
    double.extend_from_slice(&[0x81, 0x00, 0x00, 6]);
    double.extend_from_slice(&single[16..]);
    tb.check_pass("two VLAN tags", double, Reason::PassNotIp);
}

#[test]
fn ipv4_options_and_ethernet_padding() {
    let Some(tb) = testbed() else { return };
    // Router alert + NOPs: IHL 8; the ports are found behind the options.
    let opts = [
        0x94, 0x04, 0x00, 0x00, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x01, 0x00,
    ];
    let pkt = Packet::syn(client4(web_port(&tb, E_L2_A, 0)), web4())
        .with_ip_options(&opts)
        .build();
    assert_eq!(pkt[14], 0x48);
    tb.check(&tx_to(
        "IPv4 with options",
        pkt,
        E_L2_A,
        &[Reason::ConnNew, Reason::TxL2],
    ));
    let tpkt = Packet::syn(client4(web_port(&tb, E_TUNNEL, 0)), web4())
        .with_ip_options(&opts)
        .with_df();
    let frame = tpkt.build();
    let out = ipip(
        &frame,
        engine_mac(E_TUNNEL),
        OUR_MAC,
        TUNNEL_SRC4,
        ENGINE4_V4,
    );
    tb.check(
        &Fixture::new("IPv4 with options, tunnelled", frame, xdp::TX)
            .output(out)
            .reasons(&[Reason::ConnNew, Reason::TxTunnel]),
    );
    // A minimum-size frame: 54 bytes of SYN and 6 bytes of Ethernet padding, sent as they are.
    let mut padded = Packet::syn(client4(web_port(&tb, E_L2_B, 0)), web4()).build();
    padded.extend_from_slice(&[0; 6]);
    tb.check(&tx_to(
        "padded minimum-size frame",
        padded,
        E_L2_B,
        &[Reason::ConnNew, Reason::TxL2],
    ));
}

#[test]
fn vip_of_another_primary_passes() {
    let Some(tb) = testbed() else { return };
    let pkt = Packet::syn(client4(40000), sock(VIP4_SECONDARY, 80)).build();
    tb.check_pass("not primary", pkt, Reason::PassNotPrimary);
    assert_eq!(
        tb.conn_owner(&Packet::syn(client4(40000), sock(VIP4_SECONDARY, 80)).flow()),
        None
    );
}

#[test]
fn tunnel_ipv4_in_ipv4() {
    let Some(tb) = testbed() else { return };
    let pkt = Packet::syn(client4(web_port(&tb, E_TUNNEL, 0)), web4())
        .with_tos(0x2a)
        .with_df()
        .with_payload(b"0123456789");
    let frame = pkt.build();
    let out = ipip(
        &frame,
        engine_mac(E_TUNNEL),
        OUR_MAC,
        TUNNEL_SRC4,
        ENGINE4_V4,
    );
    // Spot-check the independent construction itself.
    assert_eq!(out.len(), frame.len() + 20);
    assert_eq!(&out[12..14], &[0x08, 0x00]);
    assert_eq!(out[14], 0x45);
    assert_eq!(out[15], 0x2a, "TOS copied");
    assert_eq!(
        u16::from_be_bytes([out[16], out[17]]),
        u16::from_be_bytes([frame[16], frame[17]]) + 20
    );
    assert_eq!(&out[18..22], &[0, 0, 0x40, 0], "id 0, DF copied");
    assert_eq!((out[22], out[23]), (64, 4));
    assert_eq!(&out[26..30], &TUNNEL_SRC4.octets());
    assert_eq!(&out[30..34], &ENGINE4_V4.octets());
    assert_eq!(&out[34..], &frame[14..]);
    tb.check(
        &Fixture::new("IPv4 flow to the tunnel engine", frame, xdp::TX)
            .output(out)
            .reasons(&[Reason::ConnNew, Reason::TxTunnel]),
    );
    assert_eq!(tb.conn_owner(&pkt.flow()), Some(E_TUNNEL));

    // Without DF the outer header has none either; UDP too.
    let dns = sock(VIP4, 53);
    let port = tb
        .ports_to(VS_DNS, CLIENT4.into(), dns, PROTO_UDP, E_TUNNEL)
        .next()
        .unwrap();
    let udp = Packet::udp(client4(port), dns)
        .with_payload(b"query")
        .build();
    let out = ipip(&udp, engine_mac(E_TUNNEL), OUR_MAC, TUNNEL_SRC4, ENGINE4_V4);
    assert_eq!(&out[18..22], &[0, 0, 0, 0]);
    tb.check(
        &Fixture::new("UDP without DF to the tunnel engine", udp, xdp::TX)
            .output(out)
            .reasons(&[Reason::ConnNew, Reason::TxTunnel]),
    );
}

/// A segment of a recorded flow to the tunnel engine, `ip_len` bytes long from its IP header on.
fn tunnel_segment(tb: &Testbed, v6: bool, nth: usize, ip_len: usize, vlan: Option<u16>) -> Packet {
    let (client, vip, hdrs) = if v6 {
        (client6(web6_port(tb, E_TUNNEL, nth)), web6(), 40 + 20)
    } else {
        (client4(web_port(tb, E_TUNNEL, nth)), web4(), 20 + 20)
    };
    let syn = Packet::syn(client, vip);
    let syn = match vlan {
        Some(id) => syn.with_vlan(id),
        None => syn,
    };
    assert_eq!(
        tb.run(&syn.build()).unwrap().action,
        xdp::TX,
        "SYN tunnelled"
    );
    let seg = Packet::ack(client, vip).with_payload(&vec![0x5a; ip_len - hdrs]);
    match vlan {
        Some(id) => seg.with_vlan(id),
        None => seg,
    }
}

#[test]
fn too_big_for_the_tunnel_is_answered_with_the_mtu_to_use() {
    let Some(tb) = testbed() else { return };
    // The tunnel engine's path MTU is its egress interface's (1500): a 1480-byte packet fits once
    // encapsulated, a 1481-byte one does not.
    let fits = tunnel_segment(&tb, false, 0, 1480, None).with_df().build();
    let out = ipip(
        &fits,
        engine_mac(E_TUNNEL),
        OUR_MAC,
        TUNNEL_SRC4,
        ENGINE4_V4,
    );
    assert_eq!(out.len() - 14, 1500);
    tb.check(
        &Fixture::new("1480 bytes with DF: fits the tunnel", fits, xdp::TX)
            .output(out)
            .reasons(&[Reason::ConnHit, Reason::TxTunnel]),
    );

    let big = tunnel_segment(&tb, false, 1, 1481, None).with_df().build();
    let reply = icmp_frag_needed(&big, 1480);
    // Spot-check the independent construction: 14 + 20 + 8 + 56 bytes, type 3 code 4, MTU 1480,
    // from the VIP to the client.
    assert_eq!(reply.len(), 98);
    assert_eq!(&reply[0..6], &big[6..12]);
    assert_eq!((reply[23], reply[34], reply[35]), (1, 3, 4));
    assert_eq!(u16::from_be_bytes([reply[40], reply[41]]), 1480);
    assert_eq!(&reply[26..30], &VIP4.octets());
    assert_eq!(&reply[30..34], &CLIENT4.octets());
    assert_eq!(&reply[42..], &big[14..70]);
    tb.check(
        &Fixture::new("1481 bytes with DF: fragmentation needed", big, xdp::TX)
            .output(reply)
            .reasons(&[Reason::ConnHit, Reason::IcmpTooBigSent]),
    );

    let tagged = tunnel_segment(&tb, false, 2, 1500, Some(7))
        .with_df()
        .build();
    let reply = icmp_frag_needed(&tagged, 1480);
    assert_eq!(&reply[12..16], &tagged[12..16], "VLAN tag kept");
    tb.check(
        &Fixture::new(
            "VLAN-tagged, too big: the reply keeps the tag",
            tagged,
            xdp::TX,
        )
        .output(reply)
        .reasons(&[Reason::ConnHit, Reason::IcmpTooBigSent]),
    );

    let no_df = tunnel_segment(&tb, false, 3, 1481, None).build();
    tb.check(
        &Fixture::new("1481 bytes without DF: dropped", no_df, xdp::DROP)
            .unchanged()
            .reasons(&[Reason::ConnHit, Reason::DropTooBigNoDf]),
    );
}

#[test]
fn too_big_ipv6_for_the_tunnel_is_answered_with_packet_too_big() {
    let Some(tb) = testbed() else { return };
    let fits = tunnel_segment(&tb, true, 0, 1460, None).build();
    let out = ip6ip6(
        &fits,
        engine_mac(E_TUNNEL),
        OUR_MAC,
        TUNNEL_SRC6,
        ENGINE4_V6,
        Packet::ack(client6(web6_port(&tb, E_TUNNEL, 0)), web6())
            .flow()
            .hash()
            & 0x000f_ffff,
    );
    tb.check(
        &Fixture::new("IPv6, 1460 bytes: fits the tunnel", fits, xdp::TX)
            .output(out)
            .reasons(&[Reason::ConnHit, Reason::TxTunnel]),
    );
    let big = tunnel_segment(&tb, true, 1, 1461, None).build();
    let reply = icmpv6_packet_too_big(&big, 1460);
    assert_eq!(reply.len(), 14 + 40 + 8 + 200);
    assert_eq!((reply[20], reply[54]), (58, 2), "ICMPv6 packet too big");
    assert_eq!(
        u32::from_be_bytes([reply[58], reply[59], reply[60], reply[61]]),
        1460
    );
    assert_eq!(&reply[22..38], &VIP6.octets());
    assert_eq!(&reply[38..54], &CLIENT6.octets());
    tb.check(
        &Fixture::new("IPv6, 1461 bytes: packet too big", big, xdp::TX)
            .output(reply)
            .reasons(&[Reason::ConnHit, Reason::IcmpTooBigSent]),
    );
}

#[test]
fn too_big_replies_are_rate_limited() {
    let Some(tb) = testbed() else { return };
    let big = tunnel_segment(&tb, false, 0, 1500, None).with_df().build();
    let start = std::time::Instant::now();
    let (mut sent, mut limited) = (0u64, 0u64);
    for _ in 0..600 {
        match tb.run(&big).unwrap().action {
            xdp::TX => sent += 1,
            xdp::DROP => limited += 1,
            other => panic!("verdict {}", xdp::name(other)),
        }
    }
    let ms = u64::try_from(start.elapsed().as_millis()).unwrap();
    let counts = tb.reason_counts().unwrap();
    assert_eq!(counts[Reason::IcmpTooBigSent as usize], sent);
    assert_eq!(counts[Reason::DropTooBigRateLimited as usize], limited);
    // A burst of 100 then one a millisecond, per CPU (the runs may move between two CPUs).
    assert!(sent >= 100, "the burst goes out: {sent}");
    assert!(
        sent <= 2 * (100 + ms + 1),
        "{sent} replies in {ms} ms are over the rate"
    );
    assert!(limited > 0, "600 replies in {ms} ms: none limited");
}

#[test]
fn tunnel_ipv6_in_ipv6() {
    let Some(tb) = testbed() else { return };
    let pkt = Packet::syn(client6(web6_port(&tb, E_TUNNEL, 0)), web6())
        .with_tos(0xb8)
        .with_payload(b"abc");
    let frame = pkt.build();
    let label = pkt.flow().hash() & 0xf_ffff;
    let out = ip6ip6(
        &frame,
        engine_mac(E_TUNNEL),
        OUR_MAC,
        TUNNEL_SRC6,
        ENGINE4_V6,
        label,
    );
    assert_eq!(out.len(), frame.len() + 40);
    assert_eq!(&out[12..14], &[0x86, 0xdd]);
    assert_eq!(
        u32::from_be_bytes([out[14], out[15], out[16], out[17]]),
        0x6000_0000 | label,
        "version 6, class 0, flow label"
    );
    assert_eq!(
        usize::from(u16::from_be_bytes([out[18], out[19]])),
        frame.len() - 14
    );
    assert_eq!((out[20], out[21]), (41, 64));
    assert_eq!(&out[54..], &frame[14..]);
    tb.check(
        &Fixture::new("IPv6 flow to the tunnel engine", frame, xdp::TX)
            .output(out)
            .reasons(&[Reason::ConnNew, Reason::TxTunnel]),
    );
}

#[test]
fn tunnel_keeps_the_vlan_tag() {
    let Some(tb) = testbed() else { return };
    let v4 = Packet::syn(client4(web_port(&tb, E_TUNNEL, 0)), web4())
        .with_vlan(42)
        .with_df()
        .build();
    let out = ipip(&v4, engine_mac(E_TUNNEL), OUR_MAC, TUNNEL_SRC4, ENGINE4_V4);
    assert_eq!(&out[12..18], &[0x81, 0x00, 0x00, 42, 0x08, 0x00]);
    tb.check(
        &Fixture::new("tagged IPv4 to the tunnel engine", v4, xdp::TX)
            .output(out)
            .reasons(&[Reason::ConnNew, Reason::TxTunnel]),
    );
    let pkt6 = Packet::syn(client6(web6_port(&tb, E_TUNNEL, 0)), web6()).with_vlan(43);
    let v6 = pkt6.build();
    let out = ip6ip6(
        &v6,
        engine_mac(E_TUNNEL),
        OUR_MAC,
        TUNNEL_SRC6,
        ENGINE4_V6,
        pkt6.flow().hash() & 0xf_ffff,
    );
    tb.check(
        &Fixture::new("tagged IPv6 to the tunnel engine", v6, xdp::TX)
            .output(out)
            .reasons(&[Reason::ConnNew, Reason::TxTunnel]),
    );
}

#[test]
fn tunnel_without_an_address_of_the_family_drops() {
    // The engine has no IPv6 endpoint.
    let v4_only = edit(
        STANDARD_CONFIG,
        "address_v6 = \"2001:db8::4\" # engine 4 address_v6",
        "",
    );
    let Some(mut tb) = testbed_with(&v4_only) else {
        return;
    };
    let pkt = Packet::syn(client6(web6_port(&tb, E_TUNNEL, 0)), web6()).build();
    tb.check(
        &Fixture::new("IPv6 to an engine without address_v6", pkt, xdp::DROP)
            .unchanged()
            .reasons(&[Reason::ConnNew, Reason::DropTunnelNoAddr]),
    );

    // This host has no IPv6 tunnel source (no valid configuration says so: written directly).
    tb.reconfigure(STANDARD_CONFIG).unwrap();
    let mut t = tb.tables.clone();
    t.globals.tunnel_src_v6_be = [0; 4];
    tb.apply_tables(t).unwrap();
    let pkt = Packet::syn(client6(web6_port(&tb, E_TUNNEL, 1)), web6()).build();
    tb.check(
        &Fixture::new("IPv6 tunnel without a source address", pkt, xdp::DROP)
            .unchanged()
            .reasons(&[Reason::ConnNew, Reason::DropTunnelNoAddr]),
    );
    // IPv4 still works.
    let v4 = Packet::syn(client4(web_port(&tb, E_TUNNEL, 0)), web4()).build();
    let out = ipip(&v4, engine_mac(E_TUNNEL), OUR_MAC, TUNNEL_SRC4, ENGINE4_V4);
    tb.check(
        &Fixture::new("IPv4 tunnel", v4, xdp::TX)
            .output(out)
            .reasons(&[Reason::ConnNew, Reason::TxTunnel]),
    );
}

/// An ICMP "fragmentation needed" from a router to the VIP about the reply VIP:80 → `client`.
fn frag_needed(client: SocketAddr, quote_len: usize) -> Vec<u8> {
    let reply = Packet::tcp(web4(), client, tcp_flags::ACK)
        .with_df()
        .with_payload(&[0x55; 1400])
        .build_ip();
    Packet::icmp(
        ROUTER4.into(),
        VIP4.into(),
        3,
        4,
        [0, 0, 0x05, 0x78],
        &reply[..quote_len],
    )
    .build()
}

#[test]
fn icmp_fragmentation_needed_goes_to_the_flow_owner() {
    let Some(tb) = testbed() else { return };
    let port = web_port(&tb, E_L2_B, 0);
    record(&tb, &Packet::syn(client4(port), web4()));
    let icmp = frag_needed(client4(port), 28);
    tb.check(&tx_to(
        "frag needed about a recorded flow",
        icmp,
        E_L2_B,
        &[Reason::ConnHit, Reason::IcmpSteered, Reason::TxL2],
    ));
    // A longer quote (as Linux routers send) is the same.
    tb.check(&tx_to(
        "frag needed, long quote",
        frag_needed(client4(port), 576 - 28),
        E_L2_B,
        &[Reason::ConnHit, Reason::IcmpSteered, Reason::TxL2],
    ));

    // A flow not in the table: the ring decides, and nothing is recorded.
    let unrecorded = web_port(&tb, E_L2_A, 0);
    tb.check(&tx_to(
        "frag needed about an unrecorded flow",
        frag_needed(client4(unrecorded), 28),
        E_L2_A,
        &[Reason::IcmpSteered, Reason::TxL2],
    ));
    assert_eq!(
        tb.conn_owner(&Packet::syn(client4(unrecorded), web4()).flow()),
        None
    );

    // Owned by the tunnel engine: the ICMP packet is tunnelled.
    let tport = web_port(&tb, E_TUNNEL, 0);
    record(&tb, &Packet::syn(client4(tport), web4()));
    let icmp = frag_needed(client4(tport), 28);
    let out = ipip(
        &icmp,
        engine_mac(E_TUNNEL),
        OUR_MAC,
        TUNNEL_SRC4,
        ENGINE4_V4,
    );
    tb.check(
        &Fixture::new("frag needed, tunnel owner", icmp, xdp::TX)
            .output(out)
            .reasons(&[Reason::ConnHit, Reason::IcmpSteered, Reason::TxTunnel]),
    );

    // Quotes about what is not a steered service.
    let other = Packet::tcp(
        sock(Ipv4Addr::new(10, 100, 0, 99), 80),
        client4(port),
        tcp_flags::ACK,
    )
    .build_ip();
    let icmp = Packet::icmp(
        ROUTER4.into(),
        VIP4.into(),
        3,
        4,
        [0, 0, 5, 0x78],
        &other[..28],
    )
    .build();
    tb.check_pass("frag needed quoting a non-VIP", icmp, Reason::PassNotVip);
    let secondary = Packet::tcp(sock(VIP4_SECONDARY, 80), client4(port), tcp_flags::ACK).build_ip();
    let icmp = Packet::icmp(
        ROUTER4.into(),
        VIP4_SECONDARY.into(),
        3,
        4,
        [0, 0, 5, 0x78],
        &secondary[..28],
    )
    .build();
    tb.check_pass(
        "frag needed quoting a secondary VIP",
        icmp,
        Reason::PassNotPrimary,
    );
}

#[test]
fn icmpv6_packet_too_big_goes_to_the_flow_owner() {
    let Some(tb) = testbed() else { return };
    let too_big = |port: u16| {
        let reply = Packet::tcp(web6(), client6(port), tcp_flags::ACK)
            .with_payload(&[0x66; 1400])
            .build_ip();
        Packet::icmp(
            ROUTER6.into(),
            VIP6.into(),
            2,
            0,
            [0, 0, 0x05, 0x00],
            &reply[..1232],
        )
        .build()
    };
    let port = web6_port(&tb, E_L2_A, 0);
    record(&tb, &Packet::syn(client6(port), web6()));
    tb.check(&tx_to(
        "packet too big about a recorded flow",
        too_big(port),
        E_L2_A,
        &[Reason::ConnHit, Reason::IcmpSteered, Reason::TxL2],
    ));
    // Owned by the tunnel engine: tunnelled with the flow's label, like the flow's own packets.
    let tport = web6_port(&tb, E_TUNNEL, 0);
    let syn = Packet::syn(client6(tport), web6());
    record(&tb, &syn);
    let icmp = too_big(tport);
    let label = syn.flow().hash() & 0xf_ffff;
    let out = ip6ip6(
        &icmp,
        engine_mac(E_TUNNEL),
        OUR_MAC,
        TUNNEL_SRC6,
        ENGINE4_V6,
        label,
    );
    tb.check(
        &Fixture::new("packet too big, tunnel owner", icmp, xdp::TX)
            .output(out)
            .reasons(&[Reason::ConnHit, Reason::IcmpSteered, Reason::TxTunnel]),
    );
}

#[test]
fn other_icmp_to_a_vip_passes() {
    let Some(tb) = testbed() else { return };
    let echo = Packet::icmp(
        CLIENT4.into(),
        VIP4.into(),
        8,
        0,
        [0x12, 0x34, 0, 1],
        b"ping",
    )
    .build();
    tb.check_pass("ICMP echo to the VIP", echo, Reason::PassIcmp);
    let echo6 = Packet::icmp(
        CLIENT6.into(),
        VIP6.into(),
        128,
        0,
        [0x12, 0x34, 0, 1],
        b"ping",
    )
    .build();
    tb.check_pass("ICMPv6 echo to the VIP", echo6, Reason::PassIcmp);
    let router_ll = Ipv6Addr::new(0xfe80, 0, 0, 0, 0, 0, 0, 0xfe);
    let ns = Packet::icmp(
        router_ll.into(),
        VIP6.into(),
        135,
        0,
        [0; 4],
        &VIP6.octets(),
    )
    .with_ttl(255)
    .build();
    tb.check_pass("neighbour solicitation to the VIP", ns, Reason::PassIcmp);
    // Port unreachable (type 3 code 3) is not about path MTU.
    let reply = Packet::udp(sock(VIP4, 53), client4(5353)).build_ip();
    let unreach = Packet::icmp(ROUTER4.into(), VIP4.into(), 3, 3, [0; 4], &reply[..28]).build();
    tb.check_pass("port unreachable to the VIP", unreach, Reason::PassIcmp);
    // The ICMP header itself cut off.
    let cut = echo_cut(VIP4);
    tb.check_pass("ICMP without its header, to the VIP", cut, Reason::PassIcmp);
    let cut = echo_cut(Ipv4Addr::new(10, 100, 0, 99));
    tb.check_pass(
        "ICMP without its header, not to a VIP",
        cut,
        Reason::PassTruncated,
    );
}

/// An ICMP echo cut right after the IPv4 header.
fn echo_cut(dst: Ipv4Addr) -> Vec<u8> {
    let mut f = Packet::icmp(CLIENT4.into(), dst.into(), 8, 0, [0; 4], b"").build();
    f.truncate(34);
    f
}

#[test]
fn icmp_error_with_a_short_quote_is_dropped() {
    let Some(tb) = testbed() else { return };
    let port = web_port(&tb, E_L2_B, 0);
    record(&tb, &Packet::syn(client4(port), web4()));
    for (len, what) in [
        (0, "no quote"),
        (10, "quoted IP header cut"),
        (20, "no quoted ports"),
        (22, "half the quoted ports"),
    ] {
        let icmp = frag_needed(client4(port), len);
        tb.check(
            &Fixture::new(format!("frag needed, {what}"), icmp, xdp::DROP)
                .unchanged()
                .reasons(&[Reason::DropIcmpMalformed]),
        );
    }
    let mut bad_ihl = Packet::tcp(web4(), client4(port), tcp_flags::ACK).build_ip();
    bad_ihl[0] = 0x43;
    let icmp = Packet::icmp(
        ROUTER4.into(),
        VIP4.into(),
        3,
        4,
        [0, 0, 5, 0x78],
        &bad_ihl[..28],
    )
    .build();
    tb.check(
        &Fixture::new("frag needed, quoted IHL 3", icmp, xdp::DROP)
            .unchanged()
            .reasons(&[Reason::DropIcmpMalformed]),
    );
    let reply = Packet::tcp(web6(), client6(1000), tcp_flags::ACK).build_ip();
    let icmp = Packet::icmp(
        ROUTER6.into(),
        VIP6.into(),
        2,
        0,
        [0, 0, 5, 0],
        &reply[..30],
    )
    .build();
    tb.check(
        &Fixture::new("packet too big, quote cut", icmp, xdp::DROP)
            .unchanged()
            .reasons(&[Reason::DropIcmpMalformed]),
    );
    // Not to a VIP: none of our business.
    let mut icmp = frag_needed(client4(port), 10);
    icmp[30..34].copy_from_slice(&[10, 100, 0, 99]);
    tb.check_pass("short quote, not to a VIP", icmp, Reason::PassNotVip);
}

#[test]
fn fragments_to_a_vip_are_dropped() {
    let Some(tb) = testbed() else { return };
    let first = Packet::syn(client4(40000), web4())
        .with_fragment(true, 0)
        .build();
    tb.check(
        &Fixture::new("first fragment to the VIP", first, xdp::DROP)
            .unchanged()
            .reasons(&[Reason::DropFragment]),
    );
    let later = Packet::udp(client4(40000), sock(VIP4, 53))
        .with_payload(&[1; 16])
        .with_fragment(false, 185)
        .build();
    tb.check(
        &Fixture::new("last fragment to the VIP", later, xdp::DROP)
            .unchanged()
            .reasons(&[Reason::DropFragment]),
    );
    let v6 = Packet::syn(client6(40000), web6())
        .with_fragment(true, 0)
        .build();
    tb.check(
        &Fixture::new("IPv6 fragment to the VIP", v6, xdp::DROP)
            .unchanged()
            .reasons(&[Reason::DropFragment]),
    );
    let other = Packet::syn(client4(40000), sock(Ipv4Addr::new(10, 100, 0, 99), 80))
        .with_fragment(true, 0)
        .build();
    tb.check_pass("fragment to a non-VIP", other, Reason::PassNotVip);
    assert_eq!(
        tb.conn_owner(&Packet::syn(client4(40000), web4()).flow()),
        None
    );
}

#[test]
fn ipv6_extension_headers_are_walked() {
    let Some(tb) = testbed() else { return };
    for (i, kinds) in [&[60u8][..], &[0, 43, 60], &[0, 60, 43, 60]]
        .into_iter()
        .enumerate()
    {
        let pkt = Packet::syn(client6(web6_port(&tb, E_L2_A, i)), web6()).build();
        let frame = with_ipv6_ext(&pkt, kinds);
        tb.check(&tx_to(
            &format!("{} extension headers", kinds.len()),
            frame,
            E_L2_A,
            &[Reason::ConnNew, Reason::TxL2],
        ));
    }
    let pkt = Packet::syn(client6(web6_port(&tb, E_L2_A, 9)), web6()).build();
    let frame = with_ipv6_ext(&pkt, &[0, 60, 43, 43, 60]);
    tb.check_pass("5 extension headers", frame, Reason::PassIpv6Ext);
}

#[test]
fn truncated_frames_never_abort() {
    let Some(tb) = testbed() else { return };
    let base = Packet::syn(client4(web_port(&tb, E_L2_A, 0)), web4())
        .with_payload(b"abcdefgh")
        .build();
    assert_eq!(base.len(), 62);
    let mut recorded = false;
    for len in 0..=60 {
        let cut = base[..len].to_vec();
        if len < 14 {
            // BPF_PROG_TEST_RUN refuses frames shorter than an Ethernet header.
            match tb.run(&cut) {
                Err(aya::programs::ProgramError::SyscallError(e)) => {
                    assert_eq!(
                        e.io_error.raw_os_error(),
                        Some(nix::errno::Errno::EINVAL as i32),
                        "len {len}"
                    );
                }
                other => {
                    panic!("len {len}: the kernel ran a frame shorter than 14 bytes: {other:?}")
                }
            }
            continue;
        }
        let what = format!("{len} of 62 bytes");
        let fx = match len {
            14..34 => Fixture::new(what, cut, xdp::PASS)
                .unchanged()
                .reasons(&[Reason::PassTruncated]),
            // IP header complete, to the VIP: ports (34..38) or TCP flags (38..48) missing.
            34..48 => Fixture::new(what, cut, xdp::DROP)
                .unchanged()
                .reasons(&[Reason::DropTruncated]),
            _ => {
                let first = if recorded {
                    Reason::ConnHit
                } else {
                    Reason::ConnNew
                };
                recorded = true;
                tx_to(&what, cut, E_L2_A, &[first, Reason::TxL2])
            }
        };
        tb.check(&fx);
    }
    let mut ihl3 = base.clone();
    ihl3[14] = 0x43;
    tb.check_pass("IPv4 IHL 3", ihl3, Reason::PassMalformed);
    let mut v5 = base.clone();
    v5[14] = 0x55;
    tb.check_pass("IP version 5 in an IPv4 frame", v5, Reason::PassMalformed);
    let mut v6_wrong = Packet::syn(client6(1000), web6()).build();
    v6_wrong[14] = 0x45;
    tb.check_pass(
        "version 4 in an IPv6 frame",
        v6_wrong,
        Reason::PassMalformed,
    );
    let tcp2 = base[..36].to_vec();
    tb.check(
        &Fixture::new("TCP header cut to 2 bytes", tcp2, xdp::DROP)
            .unchanged()
            .reasons(&[Reason::DropTruncated]),
    );
    let mut tcp2_other = base[..36].to_vec();
    tcp2_other[30..34].copy_from_slice(&[10, 100, 0, 99]);
    tb.check(
        &Fixture::new(
            "TCP header cut to 2 bytes, not to a VIP",
            tcp2_other,
            xdp::PASS,
        )
        .unchanged()
        .reasons(&[Reason::PassTruncated]),
    );
    // Ports complete but the TCP flags cut off, not to a VIP (on a port VIPs use): none of the
    // data plane's business, so it passes like every other non-VIP packet.
    for len in [38, 47] {
        let mut cut = base[..len].to_vec();
        cut[30..34].copy_from_slice(&[10, 100, 0, 99]);
        tb.check(
            &Fixture::new(
                format!("non-VIP TCP cut to {} bytes", len - 34),
                cut,
                xdp::PASS,
            )
            .unchanged()
            .reasons(&[Reason::PassTruncated]),
        );
    }
    let v6_cut = Packet::syn(client6(1000), web6()).build()[..40].to_vec();
    tb.check_pass("IPv6 header cut", v6_cut, Reason::PassTruncated);
}

/// xorshift64: deterministic, no dependencies.
struct Rng(u64);

impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 << 13;
        self.0 ^= self.0 >> 7;
        self.0 ^= self.0 << 17;
        self.0
    }
    fn below(&mut self, n: u64) -> usize {
        usize::try_from(self.next() % n).expect("small")
    }
    fn bytes(&mut self, n: usize) -> Vec<u8> {
        (0..n).map(|_| self.next().to_le_bytes()[3]).collect()
    }
}

/// Services (and one non-service) the fuzz aims at: address, port, protocol.
const TARGETS4: [(Ipv4Addr, u16, u8); 6] = [
    (VIP4, 80, 6),
    (VIP4, 53, 17),
    (VIP4_STICKY, 443, 6),
    (VIP4_SECONDARY, 80, 6),
    (VIP4_REDIRECT, 80, 6),
    (Ipv4Addr::new(10, 100, 0, 99), 80, 6),
];

/// A random TCP or UDP header from `sport` to `dport` (random flags, fields and checksum).
fn random_l4(rng: &mut Rng, proto: u8, sport: u16, dport: u16) -> Vec<u8> {
    let mut h = sport.to_be_bytes().to_vec();
    h.extend_from_slice(&dport.to_be_bytes());
    if proto == 6 {
        let mut rest = rng.bytes(16);
        rest[8] = 0x50;
        rest[9] = if rng.below(2) == 0 {
            tcp_flags::SYN
        } else {
            rest[9]
        };
        h.extend_from_slice(&rest);
    } else {
        h.extend_from_slice(&rng.bytes(4));
    }
    h
}

/// A random IPv4 header (mostly well-formed) from `src` to `dst`.
fn random_ipv4(rng: &mut Rng, proto: u8, src: Ipv4Addr, dst: Ipv4Addr) -> Vec<u8> {
    let mut h = rng.bytes(20);
    if rng.below(8) != 0 {
        h[0] = 0x45;
    }
    if rng.below(4) != 0 {
        h[6] &= 0x40; // unfragmented, DF or not
        h[7] = 0;
    }
    h[9] = if rng.below(10) == 0 { h[9] } else { proto };
    h[12..16].copy_from_slice(&src.octets());
    h[16..20].copy_from_slice(&dst.octets());
    h
}

/// A random IPv6 header (mostly well-formed) from `src` to `dst`.
fn random_ipv6(rng: &mut Rng, next: u8, src: Ipv6Addr, dst: Ipv6Addr) -> Vec<u8> {
    let mut h = rng.bytes(40);
    if rng.below(8) != 0 {
        h[0] = 0x60 | (h[0] & 0x0f);
    }
    h[6] = if rng.below(10) == 0 { h[6] } else { next };
    h[8..24].copy_from_slice(&src.octets());
    h[24..40].copy_from_slice(&dst.octets());
    h
}

/// A random frame: noise; a TCP/UDP packet (IPv4 or IPv6, maybe tagged, maybe with extension
/// headers) at a service; or an ICMP / ICMPv6 "too big" quoting a reply of a service. Half of the
/// non-noise frames are then cut at a random length.
fn random_frame(rng: &mut Rng) -> Vec<u8> {
    let kind = rng.below(6);
    if kind == 0 {
        let len = rng.below(256);
        return rng.bytes(len);
    }
    let mut f = OUR_MAC.to_vec();
    f.extend_from_slice(&lb_tests::fixtures::ROUTER_MAC);
    if rng.below(4) == 0 {
        f.extend_from_slice(&[0x81, 0x00, 0x00, 0x05]);
    }
    let client4 = Ipv4Addr::new(198, 51, 100, rng.bytes(1)[0]);
    let client6 = Ipv6Addr::new(0x2001, 0xdb8, 0xc, 0, 0, 0, 0, u16::from(rng.bytes(1)[0]));
    let sport = 1024 + u16::try_from(rng.below(60000)).expect("small");
    let (addr, port, proto) = TARGETS4[rng.below(TARGETS4.len() as u64)];
    match kind {
        1 | 2 => {
            f.extend_from_slice(&[0x08, 0x00]);
            f.extend(random_ipv4(rng, proto, client4, addr));
            f.extend(random_l4(rng, proto, sport, port));
        }
        3 => {
            f.extend_from_slice(&[0x86, 0xdd]);
            let ext = rng.below(3) == 0;
            f.extend(random_ipv6(rng, if ext { 60 } else { 6 }, client6, VIP6));
            if ext {
                f.extend_from_slice(&[6, 0, 1, 4, 0, 0, 0, 0]);
            }
            f.extend(random_l4(rng, 6, sport, 80));
        }
        4 => {
            f.extend_from_slice(&[0x08, 0x00]);
            f.extend(random_ipv4(rng, 1, ROUTER4, addr));
            f.extend_from_slice(&[3, 4, 0, 0, 0, 0, 5, 0x78]);
            f.extend(random_ipv4(rng, proto, addr, client4));
            f.extend(random_l4(rng, proto, port, sport));
        }
        _ => {
            f.extend_from_slice(&[0x86, 0xdd]);
            f.extend(random_ipv6(rng, 58, ROUTER6, VIP6));
            f.extend_from_slice(&[2, 0, 0, 0, 0, 0, 5, 0]);
            f.extend(random_ipv6(rng, 6, VIP6, client6));
            f.extend(random_l4(rng, 6, 80, sport));
        }
    }
    let tail = rng.below(64);
    f.extend(rng.bytes(tail));
    if rng.below(2) == 0 {
        let len = rng.below(f.len() as u64 + 1);
        f.truncate(len);
    }
    f
}

/// Reasons that end a packet (every run counts exactly one), with the verdicts they go with.
fn terminal(r: Reason) -> Option<&'static [u32]> {
    match r {
        Reason::PassNotIp
        | Reason::PassNotVip
        | Reason::PassNotPrimary
        | Reason::PassTruncated
        | Reason::PassMalformed
        | Reason::PassIcmp
        | Reason::PassIpv6Ext
        | Reason::Local => Some(&[xdp::PASS]),
        Reason::TxL2 | Reason::IcmpTooBigSent | Reason::PeerEchoAnswered => Some(&[xdp::TX]),
        Reason::RedirectL2 => Some(&[xdp::REDIRECT]),
        Reason::TxTunnel => Some(&[xdp::TX, xdp::REDIRECT]),
        Reason::DropTruncated
        | Reason::DropFragment
        | Reason::DropNoEngine
        | Reason::DropTunnelNoAddr
        | Reason::DropAdjustHead
        | Reason::DropIcmpMalformed
        | Reason::DropRedirect
        | Reason::DropNoListener
        | Reason::DropTooBigNoDf
        | Reason::DropTooBigRateLimited
        | Reason::DropPeerEchoRateLimited
        | Reason::OwnerAsked => Some(&[xdp::DROP]),
        Reason::ConnHit
        | Reason::ConnNew
        | Reason::ConnOwnerDown
        | Reason::TcpNonSynMiss
        | Reason::PersistHit
        | Reason::IcmpSteered
        | Reason::SynToDraining
        | Reason::PlacedAwayNoListener
        | Reason::OwnerQueryOverflow => None,
    }
}

#[test]
fn random_frames_never_abort() {
    let Some(tb) = testbed() else { return };
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let other = other_ifindex().unwrap();
    let mut verdicts = [0u32; 5];
    for i in 0..2000 {
        let frame = random_frame(&mut rng);
        let before = tb.reason_counts().unwrap();
        // Every other frame arrives on another interface, so engine 5 is reached by redirect.
        let run = if i % 2 == 1 {
            tb.run_on(&frame, other)
        } else {
            tb.run(&frame)
        };
        match run {
            Ok(o) => {
                assert!(
                    (1..=4).contains(&o.action),
                    "frame {i} ({frame:02x?}): verdict {}",
                    o.action
                );
                verdicts[o.action as usize] += 1;
                let after = tb.reason_counts().unwrap();
                let ends: Vec<Reason> = Reason::ALL
                    .iter()
                    .copied()
                    .filter(|r| after[*r as usize] != before[*r as usize] && terminal(*r).is_some())
                    .collect();
                assert_eq!(
                    ends.len(),
                    1,
                    "frame {i} ({frame:02x?}): terminal reasons {ends:?}"
                );
                assert!(
                    terminal(ends[0]).unwrap().contains(&o.action),
                    "frame {i}: {:?} with {}",
                    ends[0],
                    xdp::name(o.action)
                );
                if o.action == xdp::PASS {
                    assert_eq!(
                        o.output, frame,
                        "frame {i}: passed frames reach the stack unmodified"
                    );
                }
            }
            Err(aya::programs::ProgramError::SyscallError(e)) if frame.len() < 14 => {
                assert_eq!(
                    e.io_error.raw_os_error(),
                    Some(nix::errno::Errno::EINVAL as i32)
                );
            }
            Err(e) => panic!("frame {i} ({frame:02x?}): test_run failed: {e}"),
        }
    }
    eprintln!("verdicts (aborted, drop, pass, tx, redirect): {verdicts:?}");
    let counts = tb.reason_counts().unwrap();
    let seen: Vec<String> = Reason::ALL
        .iter()
        .filter(|r| counts[**r as usize] > 0)
        .map(|r| format!("{}={}", r.label(), counts[*r as usize]))
        .collect();
    eprintln!("reasons: {}", seen.join(" "));
    assert!(
        verdicts[xdp::TX as usize] > 0 && verdicts[xdp::DROP as usize] > 0,
        "the fuzz reaches the steering paths"
    );
}

#[test]
fn engine_behind_another_interface_is_redirected() {
    let Some(mut tb) = testbed() else { return };
    let ingress = other_ifindex().unwrap();
    let vs = sock(VIP4_REDIRECT, 80);
    let syn = Packet::syn(client4(40000), vs).build();
    let out = rewrite_macs(&syn, engine_mac(E_REDIRECT), LO_LINK_MAC);
    tb.check(
        &Fixture::new("engine 5 on lo, arriving elsewhere", syn, xdp::REDIRECT)
            .on_ingress(ingress)
            .output(out)
            .reasons(&[Reason::ConnNew, Reason::RedirectL2]),
    );
    // Arriving on the engine's own interface (the test run's default ingress is lo): plain XDP_TX.
    let ack = Packet::ack(client4(40000), vs).build();
    let out = rewrite_macs(&ack, engine_mac(E_REDIRECT), LO_LINK_MAC);
    tb.check(
        &Fixture::new("engine 5 on lo, arriving on lo", ack, xdp::TX)
            .output(out)
            .reasons(&[Reason::ConnHit, Reason::TxL2]),
    );

    // The devmap entry gone (an inconsistent state no reload produces): dropped, counted.
    let mut t = tb.tables.clone();
    t.devmap.remove(&E_REDIRECT);
    tb.apply_tables(t).unwrap();
    let syn = Packet::syn(client4(40001), vs).build();
    let out = rewrite_macs(&syn, engine_mac(E_REDIRECT), LO_LINK_MAC);
    tb.check(
        &Fixture::new("no devmap entry", syn, xdp::DROP)
            .on_ingress(ingress)
            .output(out)
            .reasons(&[Reason::ConnNew, Reason::DropRedirect]),
    );
}

#[test]
fn service_without_active_engine_drops() {
    let Some(mut tb) = testbed() else { return };
    let vs = sock(VIP4_REDIRECT, 80);
    let recorded = Packet::syn(client4(40000), vs).build();
    tb.run(&recorded).unwrap();
    assert_eq!(
        tb.conn_owner(&Packet::syn(client4(40000), vs).flow()),
        Some(E_REDIRECT)
    );
    tb.reconfigure(&engine_state(STANDARD_CONFIG, E_REDIRECT, "down"))
        .unwrap();
    let syn = Packet::syn(client4(40001), vs).build();
    tb.check(
        &Fixture::new("new flow, no active engine", syn, xdp::DROP)
            .unchanged()
            .reasons(&[Reason::DropNoEngine]),
    );
    let ack = Packet::ack(client4(40000), vs).build();
    tb.check(
        &Fixture::new("flow of the down engine, nowhere to go", ack, xdp::DROP)
            .unchanged()
            .reasons(&[Reason::ConnOwnerDown, Reason::DropNoEngine]),
    );
}
