//! End to end: the data plane outlives the daemon. A restart (SIGTERM, start), a crash (SIGKILL,
//! start) and an upgrade to another object (SIGTERM, start with it) of the primary's daemon reset no
//! connection and fail no new one: the XDP program stays attached with its pinned tables and the
//! starting daemon swaps its program into the pinned link atomically. Pinned tables that do not fit
//! are refused with the map named; `--detach` removes the program and the pins.
//!
//! Topology as in `e2e_steering`: client + se1 (primary) + se2 + se3, nginx on every engine's VIP.

use std::time::Duration;

use lb_tests::client::{Keeper, NewConnections};
use lb_tests::daemon::{Member, metric_lines, start_expecting_failure};
use lb_tests::require_root;
use lb_tests::steering::{EngineSpec, Options, Steering, Stop};

/// Held connections, each sending a request every [`PERIOD`].
const HELD: usize = 1000;
const PERIOD: Duration = Duration::from_secs(1);

fn members(weights: [u32; 3]) -> Vec<Member> {
    (1..=3)
        .zip(weights)
        .map(|(id, weight)| Member { id, weight })
        .collect()
}

/// The `lb_xdp_program_info` line of the primary's metrics.
fn program_info(lab: &Steering) -> String {
    let text = lab.primary_metrics().expect("primary metrics");
    let lines = metric_lines(&text, "lb_xdp_program_info");
    assert_eq!(lines.len(), 1, "one attached program: {lines:?}");
    lines[0].to_owned()
}

/// Waits for the held connections to go through at least two more rounds.
fn settle() {
    std::thread::sleep(2 * PERIOD + Duration::from_millis(500));
}

#[test]
fn restart_crash_and_upgrade_reset_no_connection() {
    if !require_root() {
        return;
    }
    let mut lab = Steering::build(&Options {
        lab_prefix: "lbtr".to_owned(),
        ..Options::default()
    })
    .expect("build the steering topology");
    let client = lab.clients[0].ns.clone();
    let primary_ns = lab.primary().ns.clone();
    let variant = lb_tests::xdp_variant_object();
    assert!(
        variant.exists(),
        "{} missing (cargo xtask build-ebpf builds it)",
        variant.display()
    );

    let keeper = Keeper::start(&client, lab.vip(), HELD, PERIOD).expect("held connections");
    let fresh = NewConnections::start(&client, lab.vip(), Duration::from_millis(20));
    let rsts_before = lab.lab.tcp_counter(&primary_ns, "OutRsts").unwrap();
    let first = program_info(&lab);

    // 1. Restart with se3 alone taking new flows: the new ring differs from the old one wherever se1
    //    and se2 had slots, so a connection that lost its table entry would move to se3.
    let pins = lab.stop_daemon(1, Stop::Term).expect("SIGTERM the primary");
    settle(); // the daemon is away: the data plane alone steers
    lab.start_daemon_on(1, pins, members([0, 0, 1]), None)
        .expect("start the primary again");
    settle();
    let restarted = program_info(&lab);
    assert_ne!(restarted, first, "a restart loads a new program instance");

    // 2. A crash.
    let pins = lab.stop_daemon(1, Stop::Kill).expect("SIGKILL the primary");
    settle();
    lab.start_daemon_on(1, pins, members([0, 0, 1]), None)
        .expect("start the primary after the crash");
    settle();

    // 3. An upgrade to a different (compatible) object.
    let pins = lab
        .stop_daemon(1, Stop::Term)
        .expect("SIGTERM for the upgrade");
    lab.start_daemon_on(1, pins, members([0, 0, 1]), Some(&variant))
        .expect("start the upgraded daemon");
    settle();
    let upgraded = program_info(&lab);
    let tag = |line: &str| {
        line.split("tag=\"")
            .nth(1)
            .and_then(|t| t.split('"').next())
            .map(str::to_owned)
    };
    assert_ne!(
        tag(&upgraded),
        tag(&restarted),
        "the upgraded program is another object: {upgraded} vs {restarted}"
    );

    let fresh = fresh.finish().unwrap();
    let held = keeper.finish().unwrap();
    let rsts = lab.lab.tcp_counter(&primary_ns, "OutRsts").unwrap() - rsts_before;
    eprintln!(
        "held: {} connections {:?}, {} rounds, {} requests; new connections: {fresh}; primary OutRsts +{rsts}",
        held.connections,
        held.per_engine(),
        held.rounds,
        held.requests
    );
    assert!(
        held.per_engine().keys().any(|e| e != "se1"),
        "some held connections are owned by secondaries: {:?}",
        held.per_engine()
    );
    assert!(held.rounds >= 10, "the held connections kept sending");
    assert!(
        held.failed.is_empty(),
        "{} held connections failed, first: {:?}",
        held.failed.len(),
        held.failed.first()
    );
    assert!(
        held.moved.is_empty(),
        "{} held connections moved, first: {:?}",
        held.moved.len(),
        held.moved.first()
    );
    assert_eq!(fresh.errors, 0, "new connections failed: {fresh}");
    assert!(fresh.ok() > 100, "the new-connection loop ran: {fresh}");
    assert_eq!(rsts, 0, "the primary's stack sent resets");

    // New connections follow the restarted daemon's ring: all to se3.
    let r = lab.load(200).unwrap();
    assert_eq!(r.errors, 0, "{r}");
    assert_eq!(r.per_engine.get("se3").copied(), Some(200), "{r}");
}

#[test]
fn incompatible_pins_are_refused_and_detach_removes_everything() {
    if !require_root() {
        return;
    }
    let mut lab = Steering::build(&Options {
        lab_prefix: "lbti".to_owned(),
        engines: vec![EngineSpec::new("se1", 1)],
        members: vec![Member { id: 1, weight: 1 }],
        ..Options::default()
    })
    .expect("build a one-engine topology");
    let ns = lab.primary().ns.clone();
    let bin = lb_tests::daemon_bin();
    let object = lb_tests::xdp_object();

    // A second daemon on the same pin directory while the first runs.
    let pins = lab.daemon(1).unwrap().pins().clone();
    let config = lab.config_for(1, pins.path());
    let second = start_expecting_failure(
        &lab.lab,
        &ns,
        config.clone(),
        &pins,
        &bin,
        &object,
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(
        second.log.contains("in use by another lb-daemon"),
        "{}",
        second.log
    );

    // Tables pinned with another capacity than the configuration asks for.
    let pins = lab.stop_daemon(1, Stop::Term).unwrap();
    let mut smaller = config.clone();
    smaller.daemon.conn_table_size /= 2;
    let refused = start_expecting_failure(
        &lab.lab,
        &ns,
        smaller,
        &pins,
        &bin,
        &object,
        Duration::from_secs(20),
    )
    .unwrap();
    assert!(
        refused.log.contains("pinned map CONN_V4") && refused.log.contains("capacity"),
        "the refusal names the map and what differs: {}",
        refused.log
    );
    let link = lab.lab.ip(&ns, &["link", "show", "eth0"]).unwrap();
    assert!(
        link.contains(" xdp"),
        "a refused start leaves the running data plane alone: {link}"
    );

    // --detach: no program, no pins.
    let conf = tempfile::NamedTempFile::new().unwrap();
    let mut c = config;
    pins.path().clone_into(&mut c.daemon.pin_dir);
    std::fs::write(conf.path(), c.to_toml().unwrap()).unwrap();
    let out = lab
        .lab
        .exec(
            &ns,
            &[
                bin.to_str().unwrap(),
                "--detach",
                "--config",
                conf.path().to_str().unwrap(),
            ],
        )
        .expect("lb-daemon --detach");
    assert!(out.contains("removed XDP link"), "{out}");
    let link = lab.lab.ip(&ns, &["link", "show", "eth0"]).unwrap();
    assert!(!link.contains(" xdp"), "XDP still attached: {link}");
    // A bpffs mount's own iterator files (`maps.debug`, `progs.debug`) are not pins.
    let left: Vec<_> = std::fs::read_dir(pins.path())
        .map(|d| {
            d.flatten()
                .map(|e| e.file_name().to_string_lossy().into_owned())
                .filter(|n| n != "maps.debug" && n != "progs.debug")
                .collect()
        })
        .unwrap_or_default();
    assert!(left.is_empty(), "pins left behind: {left:?}");

    // A fresh start after that works and serves.
    lab.start_daemon_on(1, pins, vec![Member { id: 1, weight: 1 }], None)
        .unwrap();
    let r = lab.load(20).unwrap();
    assert_eq!(r.errors, 0, "{r}");
}
