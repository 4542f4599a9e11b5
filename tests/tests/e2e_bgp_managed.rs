//! End to end: a service in scaling mode bgp, driven through the controller the way an operator
//! would (`lbctl`). BIRD 2 runs in the router namespace (10.99.0.1, AS 65000, BFD); four engines
//! (10.99.0.11-14) run `lb-daemon` in managed mode against a controller on the segment; the
//! client (10.98.0.2) sits behind the router.
//!
//! ```text
//!   client ── rtr (BIRD, ECMP, BFD) ══ br0 ══ se1 … se4 (managed lb-daemon) ── b1 … b4 (nginx)
//!                                          ╚═ ctl (controller)
//! ```
//!
//! Needs root, `lb-daemon` and `controller` built, the XDP objects and BIRD (`cargo xtask setup`).

use std::collections::BTreeSet;
use std::time::Duration;

use anyhow::{Context, Result, ensure};
use lb_tests::bgp_lab::{BgpLab, Kind, ROUTER, backend_addr};
use lb_tests::controller_lab::placement;
use lb_tests::daemon::metric_sum;
use lb_tests::require_root;
use serde_json::Value;

const IDS: [u8; 4] = [1, 2, 3, 4];

/// Engine ids of `names` (`se3` → 3).
fn ids(names: &[String]) -> Result<Vec<u8>> {
    names
        .iter()
        .map(|n| {
            n.strip_prefix("se")
                .and_then(|i| i.parse().ok())
                .with_context(|| format!("engine name {n}"))
        })
        .collect()
}

fn vs(lab: &BgpLab) -> Result<Value> {
    lab.lbctl(&["vs", "get", "web"])?.json()
}

/// Connections engine `id`'s proxy accepted for `web`.
fn accepted(lab: &BgpLab, id: u8) -> Result<f64> {
    Ok(metric_sum(
        &lab.daemon(id).metrics()?,
        "lb_proxy_connections_total",
        &[("vs", "web")],
    ))
}

/// A pool of the four backends; a service in mode bgp refused before the BGP settings, then the
/// settings (BIRD's AS, BFD, the lab's hold time and backoff) and the service `web` (3 engines).
fn configure(lab: &BgpLab) -> Result<Value> {
    let backends: Vec<String> = IDS
        .iter()
        .map(|i| format!("{}:80", backend_addr(*i)))
        .collect();
    let mut pool = vec!["pool", "create", "web", "--check", "http"];
    for b in &backends {
        pool.extend(["--backend", b.as_str()]);
    }
    lab.lbctl(&pool)?.json()?;
    let create = [
        "vs",
        "create",
        "web",
        "--vip",
        "10.200.0.10",
        "--port",
        "80",
        "--pool",
        "web",
        "--mode",
        "bgp",
        "--min-engines",
        "3",
        "--med",
        "10",
    ];
    // Mode bgp before the BGP settings: refused, saying what to do first.
    let refused = lab.lbctl(&create)?;
    ensure!(
        refused.code != 0 && refused.stderr.contains("lbctl bgp set"),
        "{refused:?}"
    );
    let peer = format!("{ROUTER}:65000");
    lab.lbctl(&[
        "bgp",
        "set",
        "--asn",
        "65001",
        "--peer",
        &peer,
        "--bfd",
        "--hold-time-s",
        "9",
        "--min-backoff-ms",
        "200",
        "--max-backoff-s",
        "2",
        "--community",
        "65001:10",
    ])?
    .json()?;
    lab.lbctl(&create)?.json()
}

/// Every engine's session, in the API: established with BFD up, announcing the VIP where placed.
/// The unplaced engine's session is up too, announcing nothing.
fn check_sessions(lab: &BgpLab, placed: &[u8]) -> Result<()> {
    lab.wait_lbctl(Duration::from_secs(10), "every session in lbctl", |l| {
        let b = l.lbctl(&["bgp", "get"])?.json()?;
        let sessions = b["sessions"].as_array().context("sessions")?;
        Ok(sessions.len() == IDS.len()
            && sessions.iter().all(|s| {
                let name = s["engine"].as_str().unwrap_or_default();
                let want = u64::from(ids(&[name.to_owned()]).is_ok_and(|i| placed.contains(&i[0])));
                s["peers"][0]["state"] == "established"
                    && s["peers"][0]["bfd"] == "up"
                    && s["peers"][0]["routes_announced"] == want
            }))
    })?;
    let events = lab.lbctl(&["events", "--kind", "bgp_session"])?;
    ensure!(
        events.stdout.matches("established").count() >= IDS.len(),
        "{events:?}"
    );
    Ok(())
}

/// The operator's path: BGP settings and a service in mode bgp by `lbctl`; the controller pushes
/// them, each engine announces the VIP with its own address, the router spreads the client's
/// connections over them, a scale-out adds a next hop, and a dead engine loses its next hop (BFD)
/// and leaves the placement while the others carry the traffic.
#[test]
fn a_service_in_scaling_mode_bgp_is_announced_by_its_engines_and_follows_the_placement()
-> Result<()> {
    if !require_root() {
        return Ok(());
    }
    let mut lab = BgpLab::build_managed(Kind::Bird, &IDS)?;
    let created = configure(&lab)?;
    assert_eq!(created["scaling"]["mode"], "bgp", "{created}");
    assert_eq!(created["scaling"]["max_engines"], 64, "{created}");
    let placed = ids(&placement(&created))?;
    assert_eq!(placed.len(), 3, "{created}");
    assert!(
        created["placement"]
            .as_array()
            .context("placement")?
            .iter()
            .all(|p| p["role"] == "member"),
        "no primary in mode bgp: {created}"
    );
    let t = lab.wait_hops(&placed, Duration::from_secs(30))?;
    eprintln!("announced by {placed:?} {t:?} after the service was created");
    let route = lab.router_route()?;
    assert!(
        route.contains("BGP.med: 10") && route.contains("(65001,10)"),
        "{route}"
    );

    check_sessions(&lab, &placed)?;

    // Past the native limit natively: refused with what to do instead.
    let wide = lab.lbctl(&[
        "vs",
        "create",
        "wide",
        "--vip",
        "10.200.0.11",
        "--port",
        "80",
        "--pool",
        "web",
        "--max-engines",
        "8",
    ])?;
    ensure!(
        wide.code != 0 && wide.stderr.contains("scaling mode bgp"),
        "{wide:?}"
    );

    // Scale out: the fourth engine's next hop joins once it serves.
    let scaled = lab.lbctl(&["scale-out", "web"])?.json()?;
    let all = ids(&placement(&scaled))?;
    assert_eq!(
        all.iter().copied().collect::<BTreeSet<_>>(),
        IDS.iter().copied().collect(),
        "{scaled}"
    );
    let t = lab.wait_hops(&IDS, Duration::from_secs(30))?;
    eprintln!("scaled out: four next hops {t:?} after lbctl scale-out");

    // The router spreads short connections over all four; none fails.
    let before: Vec<f64> = IDS
        .iter()
        .map(|i| accepted(&lab, *i))
        .collect::<Result<_>>()?;
    let r = lab.spread(400)?;
    assert_eq!(r.errors, 0, "{:?}", r.error_samples);
    for (i, id) in IDS.iter().enumerate() {
        let n = accepted(&lab, *id)? - before[i];
        eprintln!("se{id} accepted {n} of 400");
        assert!(n > 0.0, "se{id} got none of the router's share");
    }

    // kill -9 one engine: BFD withdraws its next hop, the controller drops it from the placement
    // (no primary to promote), and the others carry the traffic.
    let dead = all[0];
    lab.kill_engine(dead)?;
    let rest: Vec<u8> = IDS.iter().copied().filter(|i| *i != dead).collect();
    let t = lab.wait_hops(&rest, Duration::from_secs(3))?;
    eprintln!("se{dead} killed: its next hop gone {t:?} later");
    let t = lab.wait_lbctl(Duration::from_secs(10), "the dead engine leaves", |l| {
        let placed = ids(&placement(&vs(l)?))?;
        Ok(!placed.contains(&dead) && placed.len() == 3)
    })?;
    eprintln!("se{dead} left the placement {t:?} after its next hop");
    let promotions = lab.lbctl(&["events", "--kind", "promotion"])?;
    ensure!(promotions.stdout.trim().is_empty(), "{promotions:?}");
    let r = lab.spread(200)?;
    assert_eq!(r.errors, 0, "{:?}", r.error_samples);
    Ok(())
}
