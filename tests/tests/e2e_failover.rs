//! End to end: peer liveness. The primary probes its secondaries (UDP, authenticated, every 50 ms);
//! when a secondary's daemon is killed, the primary stops sending it new flows within 300 ms, on
//! its own — the controller notices only seconds later. Measured from the client: every
//! connection started 300 ms or more after the kill is answered at once (no SYN retransmission),
//! and none fails.

use std::time::{Duration, Instant};

use lb_tests::client::one_request;
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
    let l = ControllerLab::build("lbtf").expect("build the controller lab");
    let mut l = l;
    let mut args = vec!["pool", "create", "web"];
    let backends: Vec<String> = l
        .lab
        .backends
        .iter()
        .map(|b| format!("--backend={}", b.http()))
        .collect();
    args.extend(backends.iter().map(String::as_str));
    assert_eq!(l.lbctl(&args).unwrap().code, 0);
    let vs = l.create_web_service(3).unwrap();
    let placement = placement(&vs);
    let id_of = |name: &str| l.lab.engines.iter().find(|e| e.name == name).unwrap().id;
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
    let results = worker.join().unwrap();
    let slow = Duration::from_millis(500);
    let bad: Vec<_> = results
        .iter()
        .filter(|(_, took, r)| r.is_err() || *took > slow)
        .collect();
    let last_bad = bad.iter().map(|(began, ..)| *began).max();
    println!(
        "{} connections, killed at {killed:?}; slow or failed: {}; the last of them started at {last_bad:?}",
        results.len(),
        bad.len()
    );
    let failed: Vec<_> = results.iter().filter(|(.., r)| r.is_err()).collect();
    assert!(failed.is_empty(), "connections failed: {failed:?}");
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
    if let Some(line) = log.lines().find(|x| x.contains("peer down")) {
        println!(
            "kill at {:?} (unix); primary: {line}",
            killed_wall.duration_since(std::time::UNIX_EPOCH).unwrap()
        );
    }
    // The controller had not noticed yet when the data plane had already moved on.
    let e = l.lbctl(&["engine", &placement[2]]).unwrap().json().unwrap();
    println!("controller's view 3.5 s after the kill: {}", e["state"]);
}
