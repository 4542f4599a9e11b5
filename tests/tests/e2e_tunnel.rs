//! End to end: tunnel mode with full-size packets. Every flow is steered through IP-in-IP to an
//! engine behind a router (see `lb_tests::tunnel`); the client's full-size segments do not fit once
//! encapsulated, so the primary answers with ICMP "fragmentation needed" and the client lowers its
//! path MTU: requests of 1, 6 and 64 KB all succeed. With a path MTU configured larger than the
//! path really carries, the primary transmits frames the interface then drops: the request fails,
//! and the failed transmits show in `/metrics`.

use std::time::Duration;

use lb_tests::client::post;
use lb_tests::daemon::metric_value;
use lb_tests::netns::in_ns;
use lb_tests::require_root;
use lb_tests::tunnel::{Tunnel, VIP};

const SIZES: [usize; 3] = [1024, 6 * 1024, 64 * 1024];

/// A reason counter of the primary (counters are integers carried as floats).
#[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
fn reason(metrics: &str, label: &str) -> u64 {
    let series = format!("lb_xdp_packets_total{{reason=\"{label}\"}}");
    metric_value(metrics, &series).unwrap_or(0.0) as u64
}

fn tx_errors(metrics: &str, kind: &str) -> Option<f64> {
    metric_value(
        metrics,
        &format!("lb_xdp_tx_errors_total{{kind=\"{kind}\"}}"),
    )
}

#[test]
fn full_size_requests_through_the_tunnel_succeed_and_failed_transmits_show() {
    if !require_root() {
        return;
    }
    let mut lab = Tunnel::build("lbtt", None).expect("build the tunnel topology");
    let client = lab.client.ns.clone();
    let vip = lab.vip();

    let results = in_ns(client.name(), || {
        Ok(SIZES
            .iter()
            .flat_map(|&size| (0..3).map(move |_| (size, post(vip, size, Duration::from_secs(5)))))
            .map(|(size, r)| (size, r.map_err(|e| format!("{e:#}"))))
            .collect::<Vec<_>>())
    })
    .unwrap();
    let metrics = lab.metrics().unwrap();
    for (size, r) in &results {
        assert_eq!(
            r.as_deref(),
            Ok("se2"),
            "a {size}-byte request through the tunnel engine; primary metrics:\n{metrics}"
        );
    }
    let route = lab
        .lab
        .ip(&client, &["route", "get", &VIP.to_string()])
        .unwrap();
    println!("client route to the VIP: {route}");
    assert!(
        route.contains("mtu 1480"),
        "the client learnt the path MTU from the primary's ICMP: {route}"
    );
    let sent = reason(&metrics, "icmp_too_big_sent");
    assert!(sent > 0, "the primary counted its ICMP replies:\n{metrics}");
    assert!(reason(&metrics, "tx_tunnel") > 0);
    assert_eq!(
        tx_errors(&metrics, "bulk_tx_drop"),
        Some(0.0),
        "nothing the primary sent was dropped by the interface:\n{metrics}"
    );
    let log = lab.daemon.as_ref().unwrap().log_path();
    assert_eq!(
        transmit_drops_logged(&log),
        0,
        "no transmit failure logged while none happened"
    );

    // A path MTU the network does not carry: encapsulated full-size frames leave XDP_TX and are
    // dropped by the interface (no ICMP, nothing for the client): the request fails, and the
    // failed transmits are counted.
    lab.set_mtu(Some(9000)).unwrap();
    lab.lab
        .exec(&client, &["ip", "route", "flush", "cache"])
        .unwrap();
    // 20 requests at once: each full-size segment, and each retransmission of it, is dropped.
    let lost = in_ns(client.name(), || {
        Ok(std::thread::scope(|s| {
            let posts: Vec<_> = (0..20)
                .map(|_| s.spawn(|| post(vip, 6 * 1024, Duration::from_secs(2))))
                .collect();
            posts
                .into_iter()
                .map(|p| p.join().unwrap())
                .collect::<Vec<_>>()
        }))
    })
    .unwrap();
    assert!(
        lost.iter().all(Result::is_err),
        "a 6 KB request should not get through"
    );
    let metrics = lab.metrics().unwrap();
    let dropped = tx_errors(&metrics, "bulk_tx_drop").unwrap_or(0.0);
    println!("with mtu 9000: {dropped} frames dropped after XDP_TX");
    assert!(
        dropped > 0.0,
        "the interface's drops of transmitted frames are visible:\n{metrics}"
    );
    assert_eq!(
        reason(&metrics, "icmp_too_big_sent"),
        sent,
        "no ICMP: the data plane believed the packets fit"
    );
    // The data plane logs the drops (aya-log, into the daemon's log), rate-limited: one line a
    // second per CPU at most, however many frames were dropped.
    let logged = transmit_drops_logged(&log);
    println!("transmit-drop lines in the daemon's log: {logged}");
    assert!(
        logged >= 1,
        "the drops are in the daemon's log:\n{}",
        lab.daemon.as_ref().unwrap().log_tail(30)
    );
    // The 2 s of requests span at most 3 one-second windows on each CPU.
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    assert!(
        logged <= 3 * cpus,
        "{logged} lines for {dropped} drops in about 2 s: not rate-limited\n{}",
        lab.daemon.as_ref().unwrap().log_tail(30)
    );
}

/// The data plane's log lines for frames an interface dropped after `XDP_TX`.
fn transmit_drops_logged(log: &std::path::Path) -> usize {
    std::fs::read_to_string(log)
        .unwrap_or_default()
        .lines()
        .filter(|l| {
            l.contains("lb_xdp")
                && l.contains("dropped")
                && l.contains("frames the data plane transmitted")
        })
        .count()
}
