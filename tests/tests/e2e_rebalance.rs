//! End to end: the auto-rebalance loop on compressed timings (interval 10 s, window 3 s), with
//! the real controller, four managed engines and wrk.
//!
//! The namespaces share the host's CPUs, so each engine's daemon runs in a cgroup of its own
//! with a CPU quota (a fifth of a CPU): its heartbeats report its usage against the quota
//! (`cpu_source` "cgroup"), which load through its proxy can push past the maximum while the host
//! stays far from it.
//!
//! - Load from wrk (one request per connection) makes the one engine of `web` hot: the loop
//!   scales `web` out; the new engine gets new connections once it serves; a connection
//!   established before stays on its engine and keeps working; wrk sees no error.
//! - The load stops: the loop scales `web` back in. The engine leaving drains: a connection open
//!   on it keeps working and, closed within the scale-in timeout, ends the drain with nothing
//!   reset (a `drain` event, no `drain_reset`).
//! - A migration of the primary to a free engine under wrk (keep-alive, and one request per
//!   connection besides): zero failed requests; the new engine holds the VIP; the old one drains.

use std::collections::BTreeMap;
use std::time::{Duration, Instant};

use lb_tests::client::{HeldConnection, NewConnections};
use lb_tests::controller_lab::{ControllerLab, placement};
use lb_tests::require_root;
use lb_tests::tools::{Wrk, WrkLoop};
use serde_json::Value;

fn reasons(events: &[Value]) -> Vec<String> {
    events
        .iter()
        .map(|e| format!("{} {}", e["kind"], e["reason"]))
        .collect()
}

/// Engine id → connections its proxy accepted for `web`.
fn accepted(l: &ControllerLab) -> BTreeMap<u8, f64> {
    l.metric_per_engine("lb_proxy_connections_total", &[("vs", "web")])
        .unwrap()
}

#[test]
#[allow(clippy::too_many_lines)]
fn the_loop_scales_a_hot_service_out_and_back_in_and_a_migration_under_load_fails_nothing() {
    if !require_root() {
        return;
    }
    let l = ControllerLab::build_with(
        "lbrb",
        &[
            "--auto-rebalance",
            "--rebalance-interval-s",
            "10",
            "--rebalance-window-s",
            "3",
            // No decision in the interval right after a change: time to look at it.
            "--rebalance-cooldown-s",
            "15",
            "--vs-scalein-timeout-s",
            "30",
        ],
        Some(0.2),
    )
    .expect("build the controller lab");
    l.create_web_pool().unwrap();
    let first = placement(&l.create_web_service(1).unwrap());
    let primary = l.id_of(&first[0]).unwrap();
    l.wait_cgroup_cpu().unwrap();

    // A connection established before anything moves.
    let client = l.lab.client(0).clone();
    let mut before =
        HeldConnection::open(&client, l.lab.vip_http(), Duration::from_secs(5)).unwrap();
    before.get().unwrap();
    let before_addr = before.local_addr().unwrap();

    // Hot: wrk, one request per connection, through the one engine, in runs of 3 s until told
    // to stop (at most 20 runs).
    let scaled_out_before = l.events("rebalance").unwrap().len();
    let wrk = Wrk {
        connections: 8,
        duration: Duration::from_secs(3),
        close: true,
        ..Wrk::new(&format!("http://{}/", l.lab.vip_http()))
    };
    let load = WrkLoop::start(&client, wrk, 20);
    let started = Instant::now();
    let mut scaled_to = String::new();
    l.wait(Duration::from_secs(30), "the loop scales web out", |l| {
        let v = l.lbctl(&["vs", "get", "web"])?.json()?;
        let now = placement(&v);
        if now.len() > 1 {
            scaled_to.clone_from(&now[1]);
        }
        Ok(now.len() > 1)
    })
    .unwrap_or_else(|e| {
        let engines = l.lbctl(&["engines"]).map(|o| o.stdout).unwrap_or_default();
        panic!(
            "{e:#}\nrebalance log: {:#?}\nengines: {engines}",
            reasons(&l.events("rebalance").unwrap_or_default())
        )
    });
    let threshold_to_decision = started.elapsed();
    let decided = l.events("rebalance").unwrap();
    println!(
        "scaled out to {scaled_to} {threshold_to_decision:?} after the load began: {:#?}",
        reasons(&decided[scaled_out_before..])
    );
    assert!(
        decided[scaled_out_before..].iter().any(|e| e["reason"]
            .as_str()
            .is_some_and(|r| r.contains("scale out web"))),
        "{:#?}",
        reasons(&decided)
    );
    let scaled_id = l.id_of(&scaled_to).unwrap();
    let serving = Instant::now();
    l.wait_serving("web", Duration::from_secs(10)).unwrap();
    println!(
        "{scaled_to} serves web {:?} after the scale-out",
        serving.elapsed()
    );
    let a0 = accepted(&l);
    std::thread::sleep(Duration::from_secs(3));
    let a1 = accepted(&l);
    let new_on = |id: u8| a1.get(&id).copied().unwrap_or(0.0) - a0.get(&id).copied().unwrap_or(0.0);
    println!(
        "new connections in 3 s: {} on the primary, {} on {scaled_to}",
        new_on(primary),
        new_on(scaled_id)
    );
    assert!(
        new_on(scaled_id) > 0.0,
        "the new engine takes new connections"
    );
    assert!(new_on(primary) > 0.0, "the primary keeps a share");
    // The connection from before is where it was, and works.
    before.get().unwrap();
    assert_eq!(
        l.connection_owners().unwrap().get(&before_addr).copied(),
        Some(primary),
        "an established connection stays on its engine"
    );
    let (requests, errors) = load.finish().unwrap();
    println!("wrk across the scale-out: {requests} requests, {errors} failed");
    assert!(requests > 0);
    assert_eq!(errors, 0, "no request failed across the scale-out");
    drop(before);

    // Cold: the loop scales web in. A connection open on the engine leaving keeps working and,
    // closed within the timeout, leaves nothing to reset.
    let mut on_n = None;
    for _ in 0..40 {
        let c = HeldConnection::open(&client, l.lab.vip_http(), Duration::from_secs(5)).unwrap();
        let a = c.local_addr().unwrap();
        std::thread::sleep(Duration::from_millis(50));
        if l.connection_owners().unwrap().get(&a) == Some(&scaled_id) {
            on_n = Some(c);
            break;
        }
    }
    let mut on_n = on_n.expect("a connection on the scaled-out engine");
    l.wait(Duration::from_secs(45), "the loop scales web in", |l| {
        let v = l.lbctl(&["vs", "get", "web"])?.json()?;
        Ok(placement(&v) == [first[0].clone()])
    })
    .unwrap_or_else(|e| {
        panic!(
            "{e:#}\n{:#?}",
            reasons(&l.events("rebalance").unwrap_or_default())
        )
    });
    let v = l.lbctl(&["vs", "get", "web"]).unwrap().json().unwrap();
    let draining: Vec<&Value> = v["placement"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|e| e["phase"] == "draining")
        .collect();
    println!("scaled in: {v}");
    assert!(
        draining.iter().any(|e| e["engine"] == scaled_to.as_str()),
        "{scaled_to} drains: {v}"
    );
    on_n.get()
        .expect("a draining engine serves its open connections");
    drop(on_n);
    l.wait(Duration::from_secs(20), "the drain ends", |l| {
        Ok(!l.events("drain")?.is_empty())
    })
    .unwrap();
    let drains = l.events("drain").unwrap();
    println!("{:#?}", reasons(&drains));
    assert!(
        drains.iter().all(|e| e["kind"] == "drain"),
        "nothing reset: {:#?}",
        reasons(&drains)
    );
    assert!(
        drains
            .iter()
            .any(|e| e["reason"].as_str().is_some_and(|r| r.contains(&scaled_to))),
        "{:#?}",
        reasons(&drains)
    );

    // A migration of the primary under load: nothing fails.
    let spare = l
        .lab
        .engines
        .iter()
        .map(|e| e.name.clone())
        .find(|e| *e != first[0] && *e != scaled_to)
        .unwrap();
    let keepalive = Wrk {
        connections: 8,
        duration: Duration::from_secs(15),
        ..Wrk::new(&format!("http://{}/", l.lab.vip_http()))
    };
    let ns = client.clone();
    let load = std::thread::spawn(move || keepalive.run(&ns));
    let fresh = NewConnections::start(&client, l.lab.vip_http(), Duration::from_millis(20));
    let fresh_began = Instant::now();
    std::thread::sleep(Duration::from_secs(3));
    let migration_at = fresh_began.elapsed().as_secs_f64();
    let out = l.lbctl(&["migrate", "web", "--to", &spare]).unwrap();
    assert_eq!(out.code, 0, "lbctl migrate: {}", out.stderr);
    let migrating = Instant::now();
    l.wait(Duration::from_secs(20), "the target is primary", |l| {
        Ok(l.recorded_primary("web")?.0.as_deref() == Some(spare.as_str()))
    })
    .unwrap();
    println!(
        "{spare} primary {:?} after lbctl migrate",
        migrating.elapsed()
    );
    l.wait(Duration::from_secs(10), "the target holds the VIP", |l| {
        Ok(l.vip_holders()? == [spare.clone()])
    })
    .unwrap();
    let kept = load.join().unwrap().unwrap();
    let fresh = fresh.finish().unwrap();
    println!(
        "wrk (keep-alive) across the migration: {} requests, {} failed, p99 {} ms; new \
         connections: {fresh}",
        kept.requests,
        kept.errors(),
        kept.p99_ms
    );
    if kept.errors() > 0 || fresh.errors > 0 {
        println!("migration started {migration_at:.2} s after the new connections");
        l.print_engines_report();
    }
    assert!(kept.requests > 0 && fresh.ok() > 0);
    assert_eq!(
        kept.errors(),
        0,
        "no keep-alive request failed: {}",
        kept.text
    );
    assert_eq!(fresh.errors, 0, "no new connection failed: {fresh}");
    // The old primary terminated wrk's 8 keep-alive connections: demoted, it pushed them to the
    // target, which learnt each from that list or by asking (whichever came first).
    let (old_id, new_id) = (l.id_of(&first[0]).unwrap(), l.id_of(&spare).unwrap());
    let pushed = l.metric_per_engine("lb_flows_pushed_total", &[]).unwrap()[&old_id];
    let loaded = l
        .metric_per_engine("lb_flows_bulk_loaded_total", &[])
        .unwrap()[&new_id];
    let answered = l
        .metric_per_engine("lb_owner_queries_answered_total", &[])
        .unwrap()[&new_id];
    let kernel_held = l
        .metric_per_engine("lb_owner_flows_kernel_held_total", &[])
        .unwrap();
    println!(
        "flows pushed by {}: {pushed}; {spare} loaded {loaded} of them and had {answered} \
         owner queries answered; claimed from the kernel's socket table (per engine): \
         {kernel_held:?}",
        first[0]
    );
    assert!(
        pushed >= 8.0,
        "the old primary pushed its connections: {pushed}"
    );
    assert!(loaded + answered >= 8.0, "the target learnt them");
    l.wait(Duration::from_secs(10), "the old primary has left", |l| {
        let v = l.lbctl(&["vs", "get", "web"])?.json()?;
        Ok(!placement(&v).contains(&first[0]))
    })
    .unwrap();
    let migrated = l.events("scaling").unwrap();
    assert!(
        migrated.iter().any(|e| e["reason"]
            .as_str()
            .is_some_and(|r| r.contains(&format!("{spare} is primary")))),
        "{:#?}",
        reasons(&migrated)
    );
}
