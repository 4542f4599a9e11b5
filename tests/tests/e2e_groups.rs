//! End to end: engine groups, with the real controller, four managed engines and `lbctl`.
//!
//! - `lbctl group create edge` with its own scale-in timeout (8 s) and `max_scaleout_per_vs`
//!   (2); settings out of range are refused naming the setting.
//! - An engine registering in a group that does not exist is refused and says so; two engines
//!   move to `edge` by restarting their daemons with `controller.group = "edge"`.
//! - `web` (the default group) is placed on the default group's engines only, `api` (on a VIP of
//!   its own) on `edge`'s; a scale-out across groups, or past the group's limit, is refused
//!   naming the group; `api` serves through its VIP.
//! - Scaling `api` in: the engine leaving drains for `edge`'s 8 s (what it reports, not the
//!   default group's 30 s), then resets the connection still open (a `drain_reset` event).
//! - Deleting `api` takes its VIP off every engine.

use std::net::SocketAddr;
use std::time::{Duration, Instant};

use anyhow::{Context, Result};
use lb_tests::client::HeldConnection;
use lb_tests::controller_lab::{ControllerLab, placement};
use lb_tests::require_root;
use serde_json::Value;

fn group_of(l: &ControllerLab, engine: &str) -> Result<(String, bool)> {
    let e = l.lbctl(&["engine", engine])?.json()?;
    Ok((
        e["group"].as_str().unwrap_or_default().to_owned(),
        e["connected"] == Value::Bool(true),
    ))
}

#[test]
#[allow(clippy::too_many_lines)]
fn engine_groups_bound_placement_and_carry_their_own_scale_in_timeout() {
    if !require_root() {
        return;
    }
    let mut l = ControllerLab::build("lbgr").expect("build the controller lab");
    l.create_web_pool().unwrap();

    let g = l
        .lbctl(&[
            "group",
            "create",
            "edge",
            "--vs-scalein-timeout-s",
            "8",
            "--max-scaleout-per-vs",
            "2",
        ])
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(g["vs_scalein_timeout_s"], 8, "{g}");
    assert_eq!(g["max_scaleout_per_vs"], 2, "{g}");
    assert_eq!(g["auto_rebalance"], false, "off unless asked: {g}");
    assert_eq!(g["auto_rebalance_interval_s"], 300, "the default: {g}");
    for (args, field) in [
        (&["--window-s", "400"][..], "window"),
        (&["--max-usage", "95"][..], "max_cpu_usage"),
        (
            &["--min-usage", "70", "--max-usage", "60"][..],
            "min_cpu_usage",
        ),
        (&["--interval-s", "0"][..], "auto_rebalance_interval"),
        (&["--vs-scalein-timeout-s", "0"][..], "vs_scalein_timeout"),
    ] {
        let mut argv = vec!["group", "create", "bad"];
        argv.extend_from_slice(args);
        let out = l.lbctl(&argv).unwrap();
        assert_eq!(out.code, 13, "invalid argument: {args:?}: {out:?}");
        assert!(out.stderr.contains(field), "{args:?}: {}", out.stderr);
    }
    let groups = l.lbctl(&["group", "list"]).unwrap().json().unwrap();
    let names: Vec<&str> = groups
        .as_array()
        .unwrap()
        .iter()
        .filter_map(|g| g["name"].as_str())
        .collect();
    assert_eq!(names, ["default", "edge"], "nothing of the refused ones");

    // A group that does not exist: refused, and the daemon says why.
    let se2 = l.id_of("se2").unwrap();
    l.engine_groups.insert(se2, "nope".into());
    l.kill_daemon(se2).unwrap();
    l.start_daemon(se2).unwrap();
    l.wait(Duration::from_secs(15), "se2 is refused", |l| {
        Ok(l.daemon(se2).context("se2")?.log_tail(50).lines().any(|s| {
            s.contains("engine group") && s.contains("nope") && s.contains("does not exist")
        }))
    })
    .unwrap_or_else(|e| panic!("{e:#}\n{}", l.daemon(se2).unwrap().log_tail(30)));
    l.engine_groups.remove(&se2);
    l.kill_daemon(se2).unwrap();
    l.start_daemon(se2).unwrap();

    // se3 and se4 move to edge.
    for name in ["se3", "se4"] {
        let id = l.id_of(name).unwrap();
        l.engine_groups.insert(id, "edge".into());
        l.kill_daemon(id).unwrap();
        l.start_daemon(id).unwrap();
    }
    l.wait(
        Duration::from_secs(20),
        "se3 and se4 in edge, every engine connected",
        |l| {
            Ok(["se1", "se2"]
                .iter()
                .all(|e| group_of(l, e).is_ok_and(|g| g == ("default".into(), true)))
                && ["se3", "se4"]
                    .iter()
                    .all(|e| group_of(l, e).is_ok_and(|g| g == ("edge".into(), true))))
        },
    )
    .unwrap();
    let edge = l.lbctl(&["group", "get", "edge"]).unwrap().json().unwrap();
    assert_eq!(edge["engines"], serde_json::json!(["se3", "se4"]), "{edge}");

    // web in the default group, api in edge.
    let web = placement(&l.create_web_service(2).unwrap());
    let mut sorted = web.clone();
    sorted.sort();
    assert_eq!(sorted, ["se1", "se2"], "the default group's engines only");
    let api_vip: SocketAddr = "10.78.0.11:80".parse().unwrap();
    let api = l
        .lbctl(&[
            "vs",
            "create",
            "api",
            "--vip",
            "10.78.0.11",
            "--port",
            "80",
            "--pool",
            "web",
            "--min-engines",
            "1",
            "--engine-group",
            "edge",
        ])
        .unwrap()
        .json()
        .unwrap();
    assert_eq!(api["engine_group"], "edge", "{api}");
    let api = l.lbctl(&["scale-out", "api"]).unwrap().json().unwrap();
    let api_placed = placement(&api);
    let mut sorted = api_placed.clone();
    sorted.sort();
    assert_eq!(sorted, ["se3", "se4"], "edge's engines only: {api}");
    let out = l.lbctl(&["scale-out", "api"]).unwrap();
    assert_eq!(out.code, 19, "failed precondition: {out:?}");
    assert!(
        out.stderr
            .contains("engine group \"edge\"'s max_scaleout_per_vs (2)"),
        "{}",
        out.stderr
    );
    let out = l.lbctl(&["scale-out", "web", "--engine", "se3"]).unwrap();
    assert_eq!(out.code, 19, "{out:?}");
    assert!(
        out.stderr.contains("it is in engine group") && out.stderr.contains("edge"),
        "{}",
        out.stderr
    );
    let out = l
        .lbctl(&["vs", "update", "api", "--engine-group", "default"])
        .unwrap();
    assert_eq!(out.code, 13, "the group is fixed: {out:?}");

    // Every engine runs a snapshot where each service carries its group's timeout.
    l.wait_serving("api", Duration::from_secs(20)).unwrap();
    let ids: Vec<u8> = l.lab.engines.iter().map(|e| e.id).collect();
    l.wait(
        Duration::from_secs(20),
        "every engine applied api and its primary holds api's VIP",
        |l| {
            Ok(l.applied_everywhere(&ids)?.is_some()
                && l.holders_of(api_vip.ip())? == [api_placed[0].clone()])
        },
    )
    .unwrap();
    let applied = l.applied("se1").expect("se1's applied snapshot").desired;
    let timeout_of = |name: &str| {
        applied
            .virtual_services
            .iter()
            .find(|v| v.name == name)
            .and_then(|v| v.drain_timeout_s)
    };
    assert_eq!((timeout_of("web"), timeout_of("api")), (Some(30), Some(8)));

    // A connection through api's VIP on its secondary.
    let client = l.lab.client(0).clone();
    let secondary = api_placed[1].clone();
    let secondary_id = l.id_of(&secondary).unwrap();
    let mut held = None;
    for _ in 0..100 {
        let mut c = HeldConnection::open(&client, api_vip, Duration::from_secs(5)).unwrap();
        c.get().expect("api serves through its VIP");
        let a = c.local_addr().unwrap();
        if l.connection_owners().unwrap().get(&a) == Some(&secondary_id) {
            held = Some(c);
            break;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    let mut held = held.expect("a connection on api's secondary");

    // Scale in: the secondary drains for edge's 8 s, then resets what is still open.
    let resets_before = l.events("drain_reset").unwrap().len();
    let out = l
        .lbctl(&["scale-in", "api", "--engine", &secondary])
        .unwrap();
    assert_eq!(out.code, 0, "{out:?}");
    let began = Instant::now();
    let mut reported = None;
    l.wait(
        Duration::from_secs(15),
        "the secondary reports its drain",
        |l| {
            let v = l.lbctl(&["vs", "get", "api"])?.json()?;
            reported = v["placement"]
                .as_array()
                .context("placement")?
                .iter()
                .find(|p| {
                    p["engine"] == secondary.as_str()
                        && p["open_connections"].as_u64().is_some_and(|n| n >= 1)
                })
                .and_then(|p| p["remaining_ms"].as_u64());
            Ok(reported.is_some_and(|ms| ms > 0))
        },
    )
    .unwrap();
    let remaining = reported.unwrap();
    println!("{secondary} drains api: {remaining} ms left as it reports");
    assert!(
        remaining <= 8_000,
        "edge's timeout (8 s), not the default's 30 s: {remaining} ms"
    );
    held.get()
        .expect("the draining engine still serves the open connection");
    l.wait(Duration::from_secs(20), "the drain resets", |l| {
        Ok(l.events("drain_reset")?.len() > resets_before)
    })
    .unwrap();
    let reset_after = began.elapsed();
    println!("reset {reset_after:?} after the scale-in");
    assert!(
        reset_after < Duration::from_secs(25),
        "before the default group's 30 s: {reset_after:?}"
    );
    let reset = l.events("drain_reset").unwrap();
    let last = reset.last().unwrap();
    assert!(
        last["objects"]
            .as_array()
            .is_some_and(|o| o.iter().any(|x| x == "vs/api")),
        "{last}"
    );
    assert!(
        held.get().is_err(),
        "the connection left open was reset at the deadline"
    );
    assert_eq!(
        placement(&l.lbctl(&["vs", "get", "web"]).unwrap().json().unwrap()).len(),
        2,
        "web untouched"
    );

    // Deleted, api's VIP leaves every engine (its interface and lo); web's stays.
    assert!(!l.holders_on(api_vip.ip(), "lo").unwrap().is_empty());
    l.lbctl(&["vs", "delete", "api"]).unwrap().json().ok();
    l.wait(Duration::from_secs(10), "api's VIP is on no engine", |l| {
        Ok(l.holders_of(api_vip.ip())?.is_empty() && l.holders_on(api_vip.ip(), "lo")?.is_empty())
    })
    .unwrap();
    assert_eq!(l.vip_holders().unwrap(), [web[0].clone()]);
}
