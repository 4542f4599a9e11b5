//! End to end: one controller, four managed engines, nginx backends, a client — driven with lbctl.
//!
//! A virtual service asking for three engines, created with lbctl, is placed, pushed, `ACKed` and
//! serves; a pool no engine can
//! reach is `NACKed` (an anomaly) while the engines keep serving; the controller stopped under load
//! costs nothing and, restarted, changes nothing; a killed secondary is failed within
//! `interval × (max_missed + 1)`, replaced by the spare engine (N+M), and new connections all succeed;
//! certificates of the wrong role or CA are refused.

use std::time::{Duration, Instant};

use lb_tests::client::{HeldConnection, NewConnections};
use lb_tests::controller_lab::{ControllerLab, placement};
use lb_tests::daemon::metric_sum;
use lb_tests::require_root;
use serde_json::Value;

fn snapshots(l: &ControllerLab, id: u8, result: &str) -> f64 {
    let text = l.daemon(id).expect("a daemon").metrics().unwrap();
    metric_sum(
        &text,
        "lb_controller_snapshots_total",
        &[("result", result)],
    )
}

#[test]
#[allow(clippy::too_many_lines)]
fn controller_places_pushes_survives_and_fails_engines() {
    if !require_root() {
        return;
    }
    let mut l = ControllerLab::build("lbtc").expect("build the controller lab");
    let all = [1u8, 2, 3, 4];

    // Create a pool and a virtual service on all three engines.
    // Three of the four backends; the fourth joins with a pool update later.
    let backends: Vec<String> = l.lab.backends[..3]
        .iter()
        .map(|b| format!("--backend={}", b.http()))
        .collect();
    let mut args = vec![
        "pool",
        "create",
        "web",
        "--check",
        "http",
        "--check-interval-ms",
        "300",
        "--check-timeout-ms",
        "200",
    ];
    args.extend(backends.iter().map(String::as_str));
    let pool = l.lbctl(&args).unwrap().json().unwrap();
    assert_eq!(pool["resource_version"], 1);
    let vs = l.create_web_service(3).unwrap();
    let placement = placement(&vs);
    assert_eq!(vs["placement"][0]["role"], "primary");
    // A placed engine gets new connections once it reported that it serves (until then it is
    // pending, out of the primary's ring).
    l.wait_serving("web", Duration::from_secs(20)).unwrap();
    // The snapshot every engine applied (another one, e.g. backends found healthy, may be on its
    // way: wait until they agree).
    let mut version = None;
    l.wait(
        Duration::from_secs(10),
        "every engine on one snapshot",
        |l| {
            version = l.applied_everywhere(&all)?;
            Ok(version.is_some())
        },
    )
    .unwrap();
    let version = version.unwrap();
    for id in all {
        assert!(
            snapshots(&l, id, "applied") >= 1.0,
            "engine {id} applied a snapshot"
        );
    }
    let r = l.lab.load(300).unwrap();
    println!("300 requests through the controller-made service: {r}");
    assert_eq!(r.errors, 0, "{r}");
    assert_eq!(r.per_engine.len(), 3, "every backend served: {r}");
    let served = l
        .metric_per_engine("lb_proxy_connections_total", &[("vs", "web")])
        .unwrap();
    let placed_ids: Vec<u8> = placement
        .iter()
        .map(|n| l.lab.engines.iter().find(|e| e.name == *n).unwrap().id)
        .collect();
    for id in &placed_ids {
        assert!(
            served.get(id).is_some_and(|n| *n > 0.0),
            "engine {id} proxied: {served:?}"
        );
    }
    let spare = all
        .iter()
        .copied()
        .find(|i| !placed_ids.contains(i))
        .unwrap();
    assert!(
        served.get(&spare).copied().unwrap_or(0.0) < 1.0,
        "the spare serves nothing: {served:?}"
    );
    let shown = l.lbctl(&["vs", "get", "web"]).unwrap().json().unwrap();
    assert_eq!(shown["health"]["engines_serving"], 3, "{shown}");

    // The pool changes under held connections (a backend added, one disabled): engines apply it
    // without a single map write, and the connections in flight are unaffected.
    let held_on = |name: &str, held: &[(HeldConnection, String)]| {
        held.iter().filter(|(_, n)| n == name).count()
    };
    let mut held: Vec<(HeldConnection, String)> = Vec::new();
    while held.len() < 60 && held_on("be1", &held) < 3 {
        let mut c = HeldConnection::open(l.lab.client(0), l.lab.vip_http(), Duration::from_secs(3))
            .unwrap();
        let n = c.get().unwrap();
        held.push((c, n));
    }
    assert!(held_on("be1", &held) >= 3, "held connections on be1");
    // (all map writes, ring slot writes) over every engine, both from one read of each engine's
    // metrics (read apart, a ring change between the reads would count in one figure only).
    let writes = |l: &ControllerLab| -> (f64, f64) {
        all.iter().fold((0.0, 0.0), |(every, ring), id| {
            let text = l.daemon(*id).expect("a daemon").metrics().unwrap();
            let name = "lb_dataplane_map_writes_total";
            (
                every + metric_sum(&text, name, &[]),
                ring + metric_sum(&text, name, &[("map", "RING")]),
            )
        })
    };
    // The primary's weight follows its CPU (a `weights` event, new ring slots on the primary):
    // the one other thing that may write maps meanwhile, told apart by its event.
    let weight_changes = |l: &ControllerLab| {
        l.lbctl(&["events", "--kind", "weights"])
            .unwrap()
            .stdout
            .lines()
            .filter(|s| !s.trim().is_empty())
            .count()
    };
    let weights_before = weight_changes(&l);
    let writes_before = writes(&l);
    assert!(
        writes_before.0 > 0.0,
        "the service's creation wrote the maps"
    );
    let be1 = l.lab.backends[0].http().to_string();
    let mut args = vec!["pool".to_owned(), "update".into(), "web".into()];
    args.extend(
        l.lab
            .backends
            .iter()
            .map(|b| format!("--backend={}", b.http())),
    );
    args.push(format!("--disable={be1}"));
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let updated = l.lbctl(&args).unwrap().json().unwrap();
    assert_eq!(updated["resource_version"], 2, "{updated}");
    let version = l
        .wait_applied_after(&all, version, "the pool update applied")
        .unwrap();
    for (i, (c, name)) in held.iter_mut().enumerate() {
        let now = c
            .get()
            .unwrap_or_else(|e| panic!("held connection {i} on {name}: {e:#}"));
        assert_eq!(&now, name, "held connection {i} moved");
    }
    let r = l.lab.load(200).unwrap();
    println!("after adding be4 and disabling be1: {r}");
    assert_eq!(r.errors, 0, "{r}");
    assert_eq!(
        r.per_engine.get("be1"),
        None,
        "no new connection to the disabled backend: {r}"
    );
    assert!(
        r.per_engine.get("be4").is_some_and(|n| *n > 0),
        "the new backend serves: {r}"
    );
    let writes_after = writes(&l);
    let reweighted = weight_changes(&l) > weights_before;
    let (all_writes, ring_writes) = (
        writes_after.0 - writes_before.0,
        writes_after.1 - writes_before.1,
    );
    println!(
        "map writes across the pool change: {all_writes} ({ring_writes} ring slots; the \
         primary's weight changed meanwhile: {reweighted})"
    );
    assert!(
        (all_writes - ring_writes).abs() < 0.5,
        "a pool change writes no map entry ({writes_before:?} before, {writes_after:?} after)"
    );
    assert!(
        reweighted || ring_writes.abs() < 0.5,
        "no ring slot either, unless the primary's weight changed ({writes_before:?} before, \
         {writes_after:?} after)"
    );
    drop(held);

    // A pool whose backend no engine can route to: every engine NACKs; it is an anomaly; the
    // engines keep serving what they ran.
    let bad = l
        .lbctl(&["pool", "create", "unroutable", "--backend", "10.99.0.1:80"])
        .unwrap();
    assert_eq!(bad.code, 0, "the controller accepts it: {}", bad.stderr);
    l.wait(Duration::from_secs(10), "a NACK anomaly", |l| {
        let a = l.lbctl(&["anomalies"])?.json()?;
        Ok(a.as_array().is_some_and(|a| {
            a.iter().any(|x| {
                x["kind"] == "nack" && x["reason"].as_str().unwrap_or("").contains("unreachable")
            })
        }))
    })
    .unwrap();
    // Each engine shows the version it runs and the controller's, which it refused.
    let engines = l.lbctl(&["engines"]).unwrap().json().unwrap();
    for e in engines.as_array().unwrap() {
        let (applied, desired) = (&e["applied_version"], &e["desired_version"]);
        assert!(
            applied.as_u64().unwrap() < desired.as_u64().unwrap(),
            "a NACKing engine is behind the controller: {e}"
        );
    }
    // (The controller may make a newer version meanwhile; every one with the pool is refused.)
    let table = l.lbctl_text(&["engines"]).unwrap();
    let behind = format!("{} → ", engines[0]["applied_version"]);
    assert!(table.contains(&behind), "`{behind}` in\n{table}");
    let r = l.lab.load(90).unwrap();
    assert_eq!(r.errors, 0, "the engines serve their previous state: {r}");
    assert_eq!(l.lbctl(&["pool", "delete", "unroutable"]).unwrap().code, 0);
    l.wait(Duration::from_secs(10), "the NACK cleared", |l| {
        let a = l.lbctl(&["anomalies"])?.json()?;
        Ok(!a
            .as_array()
            .is_some_and(|a| a.iter().any(|x| x["kind"] == "nack")))
    })
    .unwrap();
    let version = l
        .wait_applied_after(&all, version, "applied after the delete")
        .unwrap();

    // The controller away for a while under load: nothing fails. Restarted: same state, nothing
    // re-applied anywhere.
    let applied_before: Vec<f64> = all.iter().map(|id| snapshots(&l, *id, "applied")).collect();
    let load = NewConnections::start(l.lab.client(0), l.lab.vip_http(), Duration::from_millis(20));
    assert!(l.stop_controller(), "the controller stops cleanly");
    std::thread::sleep(Duration::from_secs(20));
    l.start_controller().unwrap();
    l.wait(Duration::from_secs(20), "the engines reconnected", |l| {
        let e = l.lbctl(&["engines"])?.json()?;
        Ok(e.as_array()
            .is_some_and(|a| a.iter().all(|e| e["connected"] == Value::Bool(true))))
    })
    .unwrap();
    let during = load.finish().unwrap();
    println!("new connections while the controller was away and back: {during}");
    assert_eq!(during.errors, 0, "{during}");
    assert!(during.ok() > 200, "{during}");
    assert_eq!(
        l.applied_everywhere(&all).unwrap(),
        Some(version),
        "same version everywhere"
    );
    let applied_after: Vec<f64> = all.iter().map(|id| snapshots(&l, *id, "applied")).collect();
    assert_eq!(
        applied_before, applied_after,
        "no engine re-applied anything"
    );
    let again = l.lbctl(&["vs", "get", "web"]).unwrap().json().unwrap();
    // The engines and their order (the weights follow the primary's CPU).
    assert_eq!(
        lb_tests::controller_lab::placement(&again),
        placement,
        "placement intact"
    );
    assert_eq!(again["resource_version"], vs["resource_version"]);

    // Security: an engine's certificate on the operator API; a certificate of another CA.
    let fake = tempfile::tempdir().unwrap();
    std::fs::copy(l.pki.join("ca.pem"), fake.path().join("ca.pem")).unwrap();
    std::fs::copy(
        l.pki.join("engine-se1.pem"),
        fake.path().join("operator-x.pem"),
    )
    .unwrap();
    std::fs::copy(
        l.pki.join("engine-se1.key"),
        fake.path().join("operator-x.key"),
    )
    .unwrap();
    let denied = l.lbctl_as(fake.path(), "x", &["engines"]).unwrap();
    assert_eq!(denied.code, 17, "PermissionDenied: {}", denied.stderr);
    let other = tempfile::tempdir().unwrap();
    let out = std::process::Command::new(lb_tests::lbctl_bin())
        .args(["certs", "init", "--dir"])
        .arg(other.path())
        .args(["--controller-name", "127.0.0.1", "--operator", "admin"])
        .output()
        .unwrap();
    assert!(out.status.success());
    std::fs::copy(l.pki.join("ca.pem"), other.path().join("ca.pem")).unwrap();
    let foreign = l.lbctl_as(other.path(), "admin", &["engines"]).unwrap();
    assert_ne!(
        foreign.code, 0,
        "a client certificate of another CA is refused"
    );
    println!(
        "another CA's certificate: exit {} ({})",
        foreign.code,
        foreign.stderr.trim()
    );

    // A secondary's daemon dies: failed within interval × (max_missed + 1) (plus polling),
    // dropped from the snapshot, the spare engine takes its place, and new connections all succeed.
    let victim_name = placement[2].clone();
    let victim = l
        .lab
        .engines
        .iter()
        .find(|e| e.name == victim_name)
        .unwrap()
        .id;
    let killed = Instant::now();
    l.kill_daemon(victim).unwrap();
    l.wait(Duration::from_secs(10), "the secondary failed", |l| {
        let e = l.lbctl(&["engine", &victim_name])?.json()?;
        Ok(e["state"] == "failed")
    })
    .unwrap();
    let detect = killed.elapsed();
    let bound = Duration::from_millis(l.heartbeat_ms * u64::from(l.max_missed + 1));
    println!(
        "secondary {victim_name} failed {detect:?} after its daemon was killed (bound {bound:?})"
    );
    assert!(detect <= bound + Duration::from_millis(1500), "{detect:?}");
    let events = l.lbctl(&["events"]).unwrap().stdout;
    assert!(
        events.contains(&format!("engine/{victim_name}"))
            && events.contains("failed: no heartbeat"),
        "a health event: {events}"
    );
    let rest: Vec<u8> = all.iter().copied().filter(|i| *i != victim).collect();
    l.wait(
        Duration::from_secs(10),
        "the survivors applied the snapshot without it",
        |l| Ok(l.applied_everywhere(&rest)?.is_some_and(|v| v > version)),
    )
    .unwrap();
    let shown = l.lbctl(&["vs", "get", "web"]).unwrap().json().unwrap();
    let placed: Vec<&str> = shown["placement"]
        .as_array()
        .unwrap()
        .iter()
        .map(|p| p["engine"].as_str().unwrap())
        .collect();
    assert!(!placed.contains(&victim_name.as_str()), "{shown}");
    let spare_name = format!("se{spare}");
    assert!(
        placed.contains(&spare_name.as_str()),
        "the spare replaced it: {shown}"
    );
    let before = l
        .metric_per_engine("lb_proxy_connections_total", &[("vs", "web")])
        .unwrap();
    let r = l.lab.load(200).unwrap();
    println!("200 new connections after the failure: {r}");
    assert_eq!(r.errors, 0, "{r}");
    let after = l
        .metric_per_engine("lb_proxy_connections_total", &[("vs", "web")])
        .unwrap();
    assert!(
        after.get(&spare).copied().unwrap_or(0.0) > before.get(&spare).copied().unwrap_or(0.0),
        "the replacement takes new connections: {after:?}"
    );
}
