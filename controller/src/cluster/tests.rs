use std::collections::BTreeMap;

use lb_model::{Algorithm, BackendConfig, Protocol};

use super::{
    scaling::{BASE_WEIGHT, HANDSHAKE_GRACE, PRIMARY_WEIGHT_MAX, PRIMARY_WEIGHT_MIN},
    *,
};
use crate::store::MemStore;

fn engine(name: &str, id: u32, zone: &str) -> EngineRecord {
    EngineRecord {
        name: name.into(),
        id,
        addresses: vec![format!("10.77.0.{}", 10 + id).parse().unwrap()],
        mac: format!("02:00:0a:4d:00:{:02x}", 10 + id).parse().unwrap(),
        tags: BTreeMap::from([("zone".into(), zone.into())]),
        capacity: 2,
        group: DEFAULT_GROUP.into(),
    }
}

fn pool(name: &str) -> PoolConfig {
    PoolConfig {
        name: name.into(),
        algorithm: Algorithm::RoundRobin,
        backends: vec![BackendConfig {
            address: "10.77.0.21".parse().unwrap(),
            port: 80,
            weight: 1,
            enabled: true,
        }],
        health_check: None,
    }
}

fn spec(name: &str, port: u16, min: u32) -> VsSpec {
    VsSpec {
        name: name.into(),
        vip: "10.78.0.10".parse().unwrap(),
        port,
        protocol: Protocol::Tcp,
        pool: "web".into(),
        persistence_timeout_s: 0,
        max_connections: 100_000,
        min_engines: min,
        max_engines: 4,
        tags: BTreeMap::new(),
        engine_group: DEFAULT_GROUP.into(),
        bgp: None,
    }
}

fn cluster(store: Arc<dyn Store>, now: Instant) -> Cluster {
    Cluster::load(Settings::default(), store, now).unwrap()
}

/// Three engines in zone a, one in zone b, a pool.
fn standard(now: Instant) -> (Cluster, Arc<MemStore>) {
    let store = Arc::new(MemStore::default());
    let mut c = cluster(store.clone(), now);
    for (n, id, z) in [
        ("se1", 1, "a"),
        ("se2", 2, "a"),
        ("se3", 3, "a"),
        ("se4", 4, "b"),
    ] {
        c.register(engine(n, id, z), now).unwrap();
    }
    c.create_pool(pool("web")).unwrap();
    (c, store)
}

fn desired(c: &Cluster) -> Desired {
    serde_json::from_str(&c.snapshot().json).unwrap()
}

/// A heartbeat claiming `(vs_id, epoch)`s.
fn claims(c: &[(u32, u64)]) -> Observed {
    Observed {
        claims: c
            .iter()
            .map(|(vs_id, epoch)| Claim {
                vs_id: *vs_id,
                epoch: *epoch,
            })
            .collect(),
        ..Observed::default()
    }
}

/// A heartbeat reporting peers `(engine id, daemon up, data plane up)`.
fn reports(r: &[(u32, bool, bool)]) -> Observed {
    Observed {
        peers: r
            .iter()
            .map(|(id, daemon_up, dataplane_up)| {
                (
                    *id,
                    PeerReport {
                        daemon_up: *daemon_up,
                        dataplane_up: *dataplane_up,
                    },
                )
            })
            .collect(),
        ..Observed::default()
    }
}

/// (primary id, epoch) of virtual service 0 in the snapshot.
fn primary_epoch(c: &Cluster) -> (u32, u64) {
    let d = desired(c);
    let v = &d.virtual_services[0];
    (v.primary, v.epoch)
}

fn events_of(c: &Cluster, kind: &str) -> Vec<crate::events::Event> {
    c.events
        .recent()
        .into_iter()
        .filter(|e| e.kind == kind)
        .collect()
}

/// Records every (epoch → primary) the snapshots name, failing on a second primary at an epoch.
#[derive(Default)]
struct Primaries(BTreeMap<u64, u32>);

impl Primaries {
    fn see(&mut self, c: &Cluster) {
        let (primary, epoch) = primary_epoch(c);
        let was = *self.0.entry(epoch).or_insert(primary);
        assert_eq!(was, primary, "two primaries at epoch {epoch}");
    }
}

#[test]
fn a_virtual_service_is_placed_and_in_the_snapshot() {
    let now = Instant::now();
    let (mut c, _) = standard(now);
    let v0 = c.snapshot().version;
    let vs = c.create_vs(spec("web", 80, 2)).unwrap();
    assert_eq!(vs.id, 0);
    assert_eq!(vs.placement, ["se1", "se2"], "least loaded, ties by name");
    let s = c.snapshot();
    assert_eq!(s.version, v0 + 1, "one change, one version");
    let d = desired(&c);
    assert_eq!(d.engines.len(), 4);
    let v = &d.virtual_services[0];
    assert_eq!((v.id, v.primary), (0, 1));
    assert_eq!(v.engines.iter().map(|m| m.id).collect::<Vec<_>>(), [1, 2]);
    assert_eq!(v.pool.as_deref(), Some("web"));
    // The next virtual service goes to the engines with fewer services.
    let vs = c.create_vs(spec("api", 81, 2)).unwrap();
    assert_eq!(
        (vs.id, vs.placement.clone()),
        (1, vec!["se3".into(), "se4".into()])
    );
}

#[test]
fn bad_calls_change_nothing() {
    let now = Instant::now();
    let (mut c, _) = standard(now);
    c.create_vs(spec("web", 80, 1)).unwrap();
    let before = (c.snapshot(), c.persisted().clone());
    let mut other_pool = spec("x", 82, 1);
    other_pool.pool = "nope".into();
    let mut min_over_max = spec("x", 82, 3);
    min_over_max.max_engines = 2;
    let mut over_native = spec("x", 82, 1);
    over_native.max_engines = 5;
    let mut tagged = spec("x", 82, 2);
    tagged.tags = BTreeMap::from([("zone".into(), "b".into())]);
    let cases: Vec<(VsSpec, &str)> = vec![
        (spec("web", 81, 1), "exists"),
        (
            spec("x", 80, 1),
            "already served by virtual service \"web\"",
        ),
        (spec("bad name", 82, 1), "not a valid name"),
        (spec("x", 82, 0), "must be at least 1"),
        (other_pool, "pool \"nope\""),
        (min_over_max, "above max_engines"),
        (over_native, "native scaling limit of 4"),
        (tagged, "needs 2 engine(s) tagged zone=b, 1 eligible"),
    ];
    for (s, want) in cases {
        let err = c.create_vs(s.clone()).unwrap_err();
        assert!(err.to_string().contains(want), "{s:?}: {err}");
    }
    let mut bad_pool = pool("p2");
    bad_pool.backends[0].port = 0;
    let err = c.create_pool(bad_pool).unwrap_err();
    assert!(
        matches!(&err, ClusterError::InvalidArgument { field, .. } if field == "backends[0].port"),
        "{err}"
    );
    assert_eq!(
        c.delete_pool("web").unwrap_err().to_string(),
        "pool \"web\" is used by virtual service \"web\""
    );
    assert_eq!((c.snapshot(), c.persisted().clone()), before);
}

#[test]
fn updates_need_the_current_resource_version() {
    let now = Instant::now();
    let (mut c, _) = standard(now);
    let mut p = pool("web");
    p.backends[0].weight = 5;
    let err = c.update_pool(p.clone(), 7).unwrap_err();
    assert!(matches!(err, ClusterError::Aborted(_)), "{err}");
    let rec = c.update_pool(p.clone(), 1).unwrap();
    assert_eq!(rec.resource_version, 2);
    assert!(matches!(
        c.update_pool(p, 1).unwrap_err(),
        ClusterError::Aborted(_)
    ));
}

#[test]
fn a_failed_secondary_is_replaced_and_marked_down() {
    let start = Instant::now();
    let (mut c, _) = standard(start);
    c.create_vs(spec("web", 80, 2)).unwrap();
    // se1, se3, se4 heartbeat every second; se2 (the secondary) goes silent.
    let mut failed_at = None;
    for s in 1..=10u64 {
        let now = start + Duration::from_secs(s);
        for e in ["se1", "se3", "se4"] {
            c.heartbeat(e, Observed::default(), now);
        }
        c.tick(now).unwrap();
        if failed_at.is_none() && c.health("se2") == Some(EngineHealth::Failed) {
            failed_at = Some(s);
        }
    }
    assert!(
        failed_at.is_some_and(|s| s <= 4),
        "failed after {failed_at:?} s"
    );
    let vs = &c.persisted().services["web"];
    assert_eq!(vs.placement, ["se1", "se3"], "se2 dropped, se3 added (N+M)");
    let d = desired(&c);
    let se2 = d.engines.iter().find(|e| e.id == 2).unwrap();
    assert_eq!(se2.state, EngineState::Down);
    assert_eq!(
        d.virtual_services[0]
            .engines
            .iter()
            .map(|m| m.id)
            .collect::<Vec<_>>(),
        [1, 3]
    );
    let kinds: Vec<&str> = c.events.recent().iter().map(|e| e.kind).collect();
    assert!(
        kinds.contains(&"health") && kinds.contains(&"placement"),
        "{kinds:?}"
    );
    assert!(c.anomalies().iter().any(|(a, _)| a.kind == "engine_failed"));
}

#[test]
fn a_failed_primary_stays_and_is_an_anomaly() {
    let start = Instant::now();
    let (mut c, _) = standard(start);
    c.create_vs(spec("web", 80, 2)).unwrap();
    for s in 1..=6u64 {
        let now = start + Duration::from_secs(s);
        // se2 sees se1's data plane still steering (its daemon crashed): it must not be replaced.
        c.heartbeat("se2", reports(&[(1, false, true)]), now);
        for e in ["se3", "se4"] {
            c.heartbeat(e, Observed::default(), now);
        }
        c.tick(now).unwrap();
    }
    let vs = &c.persisted().services["web"];
    assert_eq!(
        vs.placement[0], "se1",
        "the primary is not replaced while its data plane steers"
    );
    let kinds: BTreeSet<&str> = c.anomalies().iter().map(|(a, _)| a.kind).collect();
    assert!(kinds.contains("primary_failed"), "{kinds:?}");
}

#[test]
fn a_restarted_controller_keeps_the_version_and_snapshot() {
    let now = Instant::now();
    let (mut c, store) = standard(now);
    c.create_vs(spec("web", 80, 2)).unwrap();
    let before = c.snapshot();
    drop(c);
    let c = cluster(store, now + Duration::from_mins(1));
    assert_eq!(c.snapshot(), before);
    assert_eq!(c.persisted().services["web"].placement, ["se1", "se2"]);
}

#[test]
fn acks_nacks_and_anomalies() {
    let start = Instant::now();
    let (mut c, _) = standard(start);
    let v = c.snapshot().version;
    c.connected("se1", 0, start);
    c.sent("se1", v, start);
    c.nack("se1", v, "interface eth9: no such interface", start);
    c.tick(start).unwrap();
    let a = c.anomalies();
    assert!(
        a.iter()
            .any(|(a, _)| a.kind == "nack" && a.reason.contains("eth9")),
        "{a:?}"
    );
    c.ack("se1", v, start);
    c.tick(start).unwrap();
    assert!(!c.anomalies().iter().any(|(a, _)| a.kind == "nack"));
    let kinds: Vec<&str> = c.events.recent().iter().map(|e| e.kind).collect();
    assert!(kinds.contains(&"anomaly_raised") && kinds.contains(&"anomaly_cleared"));
    // Not acked for longer than the timeout.
    let alive = |c: &mut Cluster, t: Instant| {
        for e in ["se1", "se2", "se3", "se4"] {
            c.heartbeat(e, Observed::default(), t);
        }
    };
    c.connected("se2", 0, start);
    let v = c.snapshot().version;
    c.sent("se2", v - 1, start);
    alive(&mut c, start + Duration::from_secs(5));
    c.tick(start + Duration::from_secs(6)).unwrap();
    assert_eq!(c.snapshot().version, v);
    assert!(
        !c.anomalies().iter().any(|(a, _)| a.kind == "not_acked"),
        "the current version has not gone out yet: not late"
    );
    c.sent("se2", v, start + Duration::from_secs(6));
    alive(&mut c, start + Duration::from_secs(9));
    c.tick(start + Duration::from_secs(10)).unwrap();
    assert!(!c.anomalies().iter().any(|(a, _)| a.kind == "not_acked"));
    alive(&mut c, start + Duration::from_secs(12));
    c.tick(start + Duration::from_secs(12)).unwrap();
    assert_eq!(c.snapshot().version, v);
    assert!(
        c.anomalies().iter().any(|(a, _)| a.kind == "not_acked"),
        "{:?}",
        c.anomalies()
    );
}

/// `engine` has applied the current snapshot and its proxy serves `serving`, at `now`.
fn serves(c: &mut Cluster, engine: &str, serving: &[&str], cpu_pct: f64, now: Instant) {
    // The others stay alive, as they were.
    for other in ["se1", "se2", "se3", "se4"] {
        if other != engine {
            let o = c.observed(other).cloned().unwrap_or_default();
            c.heartbeat(other, o, now);
        }
    }
    let version = c.snapshot().version;
    c.ack(engine, version, now);
    c.heartbeat(
        engine,
        Observed {
            cpu_pct,
            last_heartbeat_unix_ms: 1,
            serving: serving.iter().map(|s| (*s).to_owned()).collect(),
            ..Observed::default()
        },
        now,
    );
    c.tick(now).unwrap();
}

/// (engine id, weight) of virtual service 0 in the snapshot.
fn members(c: &Cluster) -> Vec<(u32, u32)> {
    desired(c).virtual_services[0]
        .engines
        .iter()
        .map(|m| (m.id, m.weight))
        .collect()
}

fn phases(c: &Cluster) -> Vec<(String, u32, &'static str)> {
    let rec = c.persisted().services["web"].clone();
    c.placement_view(&rec)
        .into_iter()
        .map(|p| (p.engine, p.weight, p.phase))
        .collect()
}

#[test]
fn a_scaled_out_engine_gets_new_connections_once_it_serves() {
    let now = Instant::now();
    let (mut c, _) = standard(now);
    c.create_vs(spec("web", 80, 1)).unwrap();
    assert_eq!(members(&c), [(1, BASE_WEIGHT)], "alone: a plain weight");
    let vs = c.scale_out("web", None).unwrap();
    assert_eq!(vs.placement, ["se1", "se2"]);
    assert_eq!(
        members(&c),
        [(1, 80), (2, 0)],
        "pending: nothing new for se2"
    );
    assert_eq!(phases(&c)[1], ("se2".into(), 0, "pending"));
    // Applied, but its proxy does not serve yet (no healthy backend): still nothing.
    serves(&mut c, "se2", &[], 10.0, now + Duration::from_secs(1));
    assert_eq!(members(&c), [(1, 80), (2, 0)]);
    // Serving, but not the version that placed it: still nothing.
    c.heartbeat(
        "se3",
        Observed {
            serving: BTreeSet::from(["web".to_owned()]),
            ..Observed::default()
        },
        now,
    );
    serves(&mut c, "se2", &["web"], 10.0, now + Duration::from_secs(2));
    assert_eq!(members(&c), [(1, 80), (2, BASE_WEIGHT)]);
    assert_eq!(phases(&c)[1], ("se2".into(), BASE_WEIGHT, "serving"));
    assert!(
        events_of(&c, "scaling")
            .iter()
            .any(|e| e.reason.contains("se2 serves web"))
    );
}

#[test]
fn a_scaled_in_engine_drains_and_its_resets_are_flagged() {
    let now = Instant::now();
    let (mut c, _) = standard(now);
    c.create_vs(spec("web", 80, 1)).unwrap();
    c.scale_out("web", Some("se3")).unwrap();
    serves(&mut c, "se3", &["web"], 10.0, now);
    assert_eq!(
        desired(&c).proxy.drain_timeout_s,
        30,
        "vs_scalein_timeout is the engines' drain timeout"
    );
    let vs = c.scale_in("web", Some("se3")).unwrap();
    // First nothing new for se3, which still listens: the primary has not applied that yet.
    assert_eq!(vs.placement, ["se1", "se3"]);
    assert_eq!(members(&c), [(1, 80), (3, 0)]);
    assert_eq!(phases(&c)[1], ("se3".into(), 0, "draining"));
    assert!(
        c.scale_in("web", Some("se3"))
            .unwrap_err()
            .to_string()
            .contains("already leaving")
    );
    assert!(
        c.scale_in("web", None)
            .unwrap_err()
            .to_string()
            .contains("min_engines"),
        "a leaving engine does not count toward min_engines"
    );
    assert!(
        c.scaling
            .in_progress(|_| true)
            .is_some_and(|p| p.contains("se3 leaves web"))
    );
    // se3 applying it changes nothing: the primary's ring is what sends it connections.
    serves(&mut c, "se3", &["web"], 10.0, now + Duration::from_secs(1));
    assert_eq!(c.persisted().services["web"].placement, ["se1", "se3"]);
    serves(&mut c, "se1", &["web"], 10.0, now + Duration::from_secs(1));
    // The primary no longer sends it SYNs; those sent before complete their handshakes there.
    assert_eq!(c.persisted().services["web"].placement, ["se1", "se3"]);
    let applied = now + Duration::from_secs(1);
    c.tick(applied + HANDSHAKE_GRACE.saturating_sub(Duration::from_millis(1)))
        .unwrap();
    assert_eq!(
        c.persisted().services["web"].placement,
        ["se1", "se3"],
        "it listens for the whole handshake grace"
    );
    c.tick(applied + HANDSHAKE_GRACE).unwrap();
    assert_eq!(c.persisted().services["web"].placement, ["se1"]);
    assert_eq!(phases(&c)[1], ("se3".into(), 0, "draining"));
    let report = |open, finished, reset, done| Observed {
        drains: vec![DrainReport {
            virtual_service: "web".into(),
            open,
            finished,
            reset,
            remaining_ms: 12_000,
            done,
        }],
        ..Observed::default()
    };
    c.heartbeat("se3", report(5, 3, 0, false), now + Duration::from_secs(18));
    let rec = c.persisted().services["web"].clone();
    let view = c.placement_view(&rec);
    assert_eq!(
        (view[1].open_connections, view[1].remaining_ms),
        (5, 12_000)
    );
    assert!(events_of(&c, "drain_reset").is_empty());
    c.heartbeat("se3", report(0, 6, 2, true), now + Duration::from_secs(31));
    let flagged = events_of(&c, "drain_reset");
    assert_eq!(flagged.len(), 1);
    assert!(
        flagged[0]
            .reason
            .contains("6 connections finished, 2 reset"),
        "{}",
        flagged[0].reason
    );
    assert!(flagged[0].objects.contains(&"vs/web".to_owned()));
    assert_eq!(phases(&c).len(), 1, "the drain has ended");
    // A drain without resets is an event of its own kind.
    c.heartbeat("se4", report(0, 4, 0, true), now + Duration::from_secs(32));
    assert_eq!(events_of(&c, "drain").len(), 1);
}

#[test]
fn a_migration_promotes_the_target_once_it_serves_then_the_old_primary_leaves() {
    let now = Instant::now();
    let (mut c, _) = standard(now);
    c.create_vs(spec("web", 80, 1)).unwrap();
    let epoch = c.persisted().services["web"].epoch;
    let vs = c.migrate("web", None, Some("se4")).unwrap();
    assert_eq!(vs.placement, ["se1", "se4"], "the target first joins");
    assert_eq!(members(&c), [(1, 80), (4, 0)]);
    assert!(
        c.migrate("web", None, Some("se3"))
            .unwrap_err()
            .to_string()
            .contains("already migrating")
    );
    assert!(
        c.scale_in("web", Some("se4"))
            .unwrap_err()
            .to_string()
            .contains("migrating")
    );
    let t = now + Duration::from_secs(1);
    serves(&mut c, "se4", &["web"], 10.0, t);
    let rec = c.persisted().services["web"].clone();
    assert_eq!(rec.placement, ["se4", "se1"], "the target is primary");
    assert_eq!(rec.epoch, epoch + 1);
    assert_eq!(primary_epoch(&c), (4, epoch + 1));
    assert_eq!(
        members(&c),
        [(4, 80), (1, 0)],
        "the old primary gets nothing new"
    );
    assert_eq!(phases(&c)[1], ("se1".into(), 0, "draining"));
    // Only the target has applied the promotion: the old primary stays.
    serves(&mut c, "se4", &["web"], 10.0, t + Duration::from_secs(1));
    assert_eq!(c.persisted().services["web"].placement, ["se4", "se1"]);
    serves(&mut c, "se1", &["web"], 10.0, t + Duration::from_secs(2));
    assert_eq!(
        c.persisted().services["web"].placement,
        ["se4", "se1"],
        "the old primary's handshakes complete first"
    );
    c.tick(t + Duration::from_secs(2) + HANDSHAKE_GRACE)
        .unwrap();
    assert_eq!(c.persisted().services["web"].placement, ["se4"]);
    assert_eq!(phases(&c)[1], ("se1".into(), 0, "draining"), "it drains");
    assert!(
        c.scale_in("web", None)
            .unwrap_err()
            .to_string()
            .contains("min_engines")
    );
    // A secondary's migration: the new one serves, then the old one leaves.
    c.scale_out("web", Some("se2")).unwrap();
    serves(&mut c, "se2", &["web"], 10.0, t + Duration::from_secs(3));
    c.migrate("web", Some("se2"), Some("se3")).unwrap();
    assert_eq!(
        c.persisted().services["web"].placement,
        ["se4", "se2", "se3"]
    );
    serves(&mut c, "se3", &["web"], 10.0, t + Duration::from_secs(4));
    assert_eq!(
        members(&c),
        [(4, 80), (2, 0), (3, BASE_WEIGHT)],
        "se2 gets nothing new"
    );
    serves(&mut c, "se4", &["web"], 10.0, t + Duration::from_secs(5));
    assert_eq!(
        c.persisted().services["web"].placement,
        ["se4", "se2", "se3"]
    );
    c.tick(t + Duration::from_secs(5) + HANDSHAKE_GRACE)
        .unwrap();
    assert_eq!(c.persisted().services["web"].placement, ["se4", "se3"]);
    assert_eq!(primary_epoch(&c), (4, epoch + 1), "no promotion");
}

#[test]
fn a_restarted_controller_keeps_the_weights_in_force() {
    let now = Instant::now();
    let (mut c, store) = standard(now);
    c.create_vs(spec("web", 80, 1)).unwrap();
    c.scale_out("web", Some("se2")).unwrap();
    serves(&mut c, "se2", &["web"], 10.0, now);
    serves(&mut c, "se1", &["web"], 65.0, now);
    c.scale_out("web", Some("se3")).unwrap();
    assert_eq!(members(&c), [(1, 30), (2, BASE_WEIGHT), (3, 0)]);
    let before = c.snapshot();
    drop(c);
    let mut c = cluster(store, now + Duration::from_secs(1));
    c.tick(now + Duration::from_secs(2)).unwrap();
    assert_eq!(c.snapshot(), before, "same snapshot, same version");
    // The pending engine still gets its weight once it serves.
    serves(&mut c, "se3", &["web"], 10.0, now + Duration::from_secs(3));
    assert_eq!(members(&c), [(1, 30), (2, BASE_WEIGHT), (3, BASE_WEIGHT)]);
}

/// A restart in the middle of a scale-in and of a migration resumes both: the leaving engine keeps
/// weight 0 and leaves once the primary has applied it; the migration's old primary keeps weight
/// 0 and leaves once both have applied the promotion.
#[test]
fn a_restarted_controller_resumes_the_steps_in_flight() {
    let now = Instant::now();
    let (mut c, store) = standard(now);
    c.create_vs(spec("web", 80, 1)).unwrap();
    c.create_vs(VsSpec {
        vip: "10.78.0.11".parse().unwrap(),
        ..spec("api", 80, 1)
    })
    .unwrap();
    c.scale_out("web", Some("se3")).unwrap();
    serves(&mut c, "se3", &["web"], 10.0, now);
    c.scale_in("web", Some("se3")).unwrap();
    assert_eq!(phases(&c)[1], ("se3".into(), 0, "draining"));
    let api_primary = c.persisted().services["api"].placement[0].clone();
    let target = ["se2", "se4"]
        .into_iter()
        .find(|e| *e != api_primary)
        .unwrap();
    c.migrate("api", None, Some(target)).unwrap();
    serves(&mut c, target, &["api"], 10.0, now);
    let api = c.persisted().services["api"].clone();
    assert_eq!(api.placement, [target, api_primary.as_str()], "promoted");
    let before = c.snapshot();
    drop(c);

    let later = now + Duration::from_secs(1);
    let mut c = cluster(store, later);
    c.tick(later).unwrap();
    assert_eq!(c.snapshot(), before, "same snapshot, same version");
    assert_eq!(
        phases(&c)[1],
        ("se3".into(), 0, "draining"),
        "still on its way out"
    );
    let api_view = c.placement_view(&c.persisted().services["api"].clone());
    assert_eq!(
        (api_view[1].weight, api_view[1].phase),
        (0, "draining"),
        "the old primary still hands over"
    );
    assert!(c.scaling.in_progress(|_| true).is_some());
    // The primaries apply what was built before the restart: both steps end, after the
    // handshake grace.
    let primary = c.persisted().services["web"].placement[0].clone();
    serves(&mut c, &primary, &["web"], 10.0, later);
    serves(&mut c, target, &["api"], 10.0, later);
    serves(&mut c, &api_primary, &["api"], 10.0, later);
    assert_eq!(c.persisted().services["web"].placement.len(), 2);
    assert_eq!(c.persisted().services["api"].placement.len(), 2);
    c.tick(later + HANDSHAKE_GRACE).unwrap();
    assert_eq!(c.persisted().services["web"].placement, [primary.as_str()]);
    assert_eq!(c.persisted().services["api"].placement, [target]);
}

#[test]
fn scaling_errors_say_which_limit() {
    let now = Instant::now();
    let (mut c, _) = standard(now);
    c.create_vs(spec("web", 80, 1)).unwrap();
    let e = c.scale_out("web", Some("se9")).unwrap_err().to_string();
    assert!(e.contains("no such engine"), "{e}");
    let e = c.scale_out("web", Some("se1")).unwrap_err().to_string();
    assert!(e.contains("already placed"), "{e}");
    for _ in 0..3 {
        c.scale_out("web", None).unwrap();
    }
    let e = c.scale_out("web", None).unwrap_err().to_string();
    assert!(
        e.contains("max_engines (4)") && e.contains("BGP/ECMP"),
        "{e}"
    );
    let e = c.scale_in("web", Some("se1")).unwrap_err().to_string();
    assert!(e.contains("migrate it instead"), "{e}");
    c.create_vs(VsSpec {
        max_engines: 2,
        ..spec("api", 81, 1)
    })
    .unwrap();
    c.scale_out("api", None).unwrap();
    let e = c.scale_out("api", None).unwrap_err().to_string();
    assert!(
        e.contains("max_engines (2)") && !e.contains("BGP"),
        "below the native limit the service's own max is the reason: {e}"
    );
    let e = c.scale_out("nope", None).unwrap_err().to_string();
    assert!(e.contains("\"nope\""), "{e}");
}

#[test]
fn the_primary_weight_follows_its_spare_cpu_in_steps() {
    assert_eq!(primary_weight(0.0), PRIMARY_WEIGHT_MAX);
    assert_eq!(primary_weight(35.0), 60);
    assert_eq!(primary_weight(95.0), PRIMARY_WEIGHT_MIN);
    assert_eq!(primary_weight(f64::NAN), PRIMARY_WEIGHT_MIN);
    let now = Instant::now();
    let (mut c, _) = standard(now);
    c.create_vs(spec("web", 80, 1)).unwrap();
    c.scale_out("web", Some("se2")).unwrap();
    serves(&mut c, "se2", &["web"], 10.0, now);
    serves(&mut c, "se1", &["web"], 65.0, now);
    assert_eq!(members(&c), [(1, 30), (2, BASE_WEIGHT)]);
    assert_eq!(events_of(&c, "weights").len(), 1);
    // Within the hold time nothing changes, however far the CPU moves.
    serves(&mut c, "se1", &["web"], 5.0, now + Duration::from_secs(10));
    assert_eq!(members(&c), [(1, 30), (2, BASE_WEIGHT)]);
    // After it, a small move changes nothing, a large one does.
    serves(&mut c, "se1", &["web"], 55.0, now + Duration::from_secs(40));
    assert_eq!(members(&c), [(1, 30), (2, BASE_WEIGHT)]);
    serves(&mut c, "se1", &["web"], 5.0, now + Duration::from_secs(41));
    assert_eq!(members(&c), [(1, 80), (2, BASE_WEIGHT)]);
    let rec = c.persisted().services["web"].clone();
    assert_eq!(c.placement_view(&rec)[0].weight, 80, "the API shows it");
}

#[test]
fn a_restarted_controller_keeps_failed_engines_down_until_they_heartbeat() {
    let start = Instant::now();
    let (mut c, store) = standard(start);
    c.create_vs(spec("web", 80, 2)).unwrap();
    for s in 1..=6u64 {
        let now = start + Duration::from_secs(s);
        for e in ["se1", "se3", "se4"] {
            c.heartbeat(e, Observed::default(), now);
        }
        c.tick(now).unwrap();
    }
    let before = c.snapshot();
    drop(c);
    let later = start + Duration::from_secs(100);
    let mut c = cluster(store, later);
    // The others were not heard from since the restart: within the grace, nothing fails.
    c.tick(later + Duration::from_secs(10)).unwrap();
    assert_eq!(c.snapshot(), before);
    assert_eq!(c.health("se1"), Some(EngineHealth::Healthy));
    assert_eq!(c.snapshot(), before, "no new version: se2 is still down");
    assert_eq!(c.health("se2"), Some(EngineHealth::Failed));
    c.heartbeat("se2", Observed::default(), later);
    assert_eq!(c.health("se2"), Some(EngineHealth::Healthy));
}

#[test]
fn an_engine_made_promotion_is_recorded() {
    let now = Instant::now();
    let (mut c, _) = standard(now);
    c.create_vs(spec("web", 80, 3)).unwrap();
    let v0 = c.snapshot().version;
    // Every engine's usual heartbeat: se1 claims its role at the recorded epoch: nothing changes.
    c.heartbeat("se1", claims(&[(0, 0)]), now);
    c.heartbeat("se2", Observed::default(), now);
    assert_eq!(c.snapshot().version, v0);
    // se2 took over at epoch 1.
    c.heartbeat("se2", claims(&[(0, 1)]), now);
    let vs = &c.persisted().services["web"];
    assert_eq!(
        vs.placement,
        ["se2", "se1", "se3"],
        "se2 first, the rest in order"
    );
    assert_eq!(vs.epoch, 1);
    assert_eq!(c.snapshot().version, v0 + 1, "one change, one version");
    assert_eq!(primary_epoch(&c), (2, 1));
    let ev = events_of(&c, "promotion");
    assert_eq!(ev.len(), 1, "{ev:?}");
    assert_eq!(ev[0].objects, ["vs/web", "engine/se2", "engine/se1"]);
    assert!(
        ev[0].reason.contains("epoch 1") && ev[0].reason.contains("previous primary se1"),
        "{}",
        ev[0].reason
    );
    // The same claim again, and the old primary's stale one: nothing more.
    c.heartbeat("se2", claims(&[(0, 1)]), now);
    c.heartbeat("se1", claims(&[(0, 0)]), now);
    assert_eq!(c.snapshot().version, v0 + 1);
    assert_eq!(events_of(&c, "promotion").len(), 1);
    // The persisted record survives a restart of the controller.
    assert_eq!(c.persisted().services["web"].epoch, 1);
}

#[test]
fn stale_unknown_unplaced_and_absurd_claims_change_nothing() {
    let now = Instant::now();
    let (mut c, _) = standard(now);
    c.create_vs(spec("web", 80, 2)).unwrap();
    let before = (c.snapshot(), c.persisted().clone());
    // se4 is not placed for web; vs id 7 does not exist; an epoch far above the record; a claim at
    // the recorded epoch by a secondary; peers that do not exist.
    c.heartbeat("se4", claims(&[(0, 5)]), now);
    c.heartbeat("se2", claims(&[(7, 3)]), now);
    c.heartbeat("se2", claims(&[(0, u64::MAX)]), now);
    c.heartbeat("se2", claims(&[(0, MAX_EPOCH_STEP + 1)]), now);
    c.heartbeat("se2", claims(&[(0, 0)]), now);
    c.heartbeat(
        "se3",
        reports(&[(99, false, false), (u32::MAX, true, true)]),
        now,
    );
    assert_eq!((c.snapshot(), c.persisted().clone()), before);
    assert!(events_of(&c, "promotion").is_empty());
    assert!(
        events_of(&c, "peer_report").is_empty(),
        "unknown peers are ignored"
    );
    assert!(c.observed("se3").unwrap().peers.is_empty());
    assert!(
        c.observed("se2")
            .unwrap()
            .claims
            .iter()
            .all(|cl| cl.vs_id == 0),
        "claims of unknown services are not kept"
    );
    // Recorded at epoch 2; then a claim at epoch 1 (lower) is stale.
    c.heartbeat("se2", claims(&[(0, 2)]), now);
    assert_eq!(primary_epoch(&c), (2, 2));
    let after = c.snapshot();
    c.heartbeat("se1", claims(&[(0, 1)]), now);
    assert_eq!(c.snapshot(), after);
    assert_eq!(c.persisted().services["web"].placement, ["se2", "se1"]);
}

#[test]
fn a_failed_old_primary_is_dropped_after_the_promotion_and_a_spare_added() {
    let start = Instant::now();
    let (mut c, _) = standard(start);
    c.create_vs(spec("web", 80, 2)).unwrap();
    let mut seen = Primaries::default();
    seen.see(&c);
    // se1 (the primary) is gone; se2 takes over at once and says so; the controller fails se1 a
    // few seconds later.
    for s in 1..=10u64 {
        let now = start + Duration::from_secs(s);
        c.heartbeat("se2", claims(&[(0, 1)]), now);
        seen.see(&c);
        for e in ["se3", "se4"] {
            c.heartbeat(e, Observed::default(), now);
        }
        c.tick(now).unwrap();
        seen.see(&c);
        if s == 1 {
            assert_eq!(
                c.persisted().services["web"].placement,
                ["se2", "se1"],
                "recorded at the first heartbeat; se1 is not failed yet"
            );
        }
    }
    assert_eq!(c.health("se1"), Some(EngineHealth::Failed));
    let vs = &c.persisted().services["web"];
    assert_eq!(
        vs.placement,
        ["se2", "se3"],
        "the failed old primary left like a secondary, a spare took its place (N+M)"
    );
    assert_eq!(vs.epoch, 1);
    assert_eq!(primary_epoch(&c), (2, 1));
    assert_eq!(events_of(&c, "promotion").len(), 1);
    let kinds: BTreeSet<&str> = c.anomalies().iter().map(|(a, _)| a.kind).collect();
    assert!(!kinds.contains("primary_failed"), "{kinds:?}");
}

#[test]
fn the_controller_promotes_when_the_engines_cannot() {
    let start = Instant::now();
    let (mut c, _) = standard(start);
    c.create_vs(spec("web", 80, 2)).unwrap();
    let mut seen = Primaries::default();
    seen.see(&c);
    let (mut failed_at, mut promoted_at) = (None, None);
    // se1 is gone and nobody promotes (the engines cannot reach each other): se2 reports se1 down
    // in its view.
    for ms in (100..=20_000u64).step_by(100) {
        let now = start + Duration::from_millis(ms);
        if ms.is_multiple_of(1000) {
            c.heartbeat("se2", reports(&[(1, false, false)]), now);
            for e in ["se3", "se4"] {
                c.heartbeat(e, Observed::default(), now);
            }
            c.tick(now).unwrap();
        }
        seen.see(&c);
        if failed_at.is_none() && c.health("se1") == Some(EngineHealth::Failed) {
            failed_at = Some(ms);
        }
        if promoted_at.is_none() && primary_epoch(&c) != (1, 0) {
            promoted_at = Some(ms);
        }
    }
    let (failed_at, promoted_at) = (failed_at.unwrap(), promoted_at.unwrap());
    let grace = u64::try_from(Settings::default().promotion_grace.as_millis()).unwrap();
    assert!(
        promoted_at >= failed_at + grace && promoted_at <= failed_at + grace + 1000,
        "failed at {failed_at} ms, promoted at {promoted_at} ms"
    );
    assert_eq!(
        primary_epoch(&c),
        (2, 1),
        "the first healthy engine, at epoch + 1"
    );
    let vs = &c.persisted().services["web"];
    assert_eq!(vs.placement, ["se2", "se3"], "se1 left, a spare came");
    let d = desired(&c);
    assert_eq!(
        d.engines.iter().find(|e| e.id == 1).unwrap().state,
        EngineState::Down,
        "no longer primary: down"
    );
    let ev = events_of(&c, "promotion");
    assert_eq!(ev.len(), 1, "one promotion: {ev:?}");
    assert!(ev[0].reason.contains("controller"), "{}", ev[0].reason);
    assert_eq!(ev[0].objects, ["vs/web", "engine/se2", "engine/se1"]);
    assert_eq!(
        events_of(&c, "peer_report").len(),
        1,
        "se2 reported se1 down once, not at every heartbeat"
    );
    // se2's claim at the epoch the controller gave it changes nothing.
    let v = c.snapshot().version;
    c.heartbeat("se2", claims(&[(0, 1)]), start + Duration::from_secs(21));
    assert_eq!(c.snapshot().version, v);
}

#[test]
fn no_promotion_while_a_healthy_peer_sees_the_primarys_data_plane_steer() {
    let start = Instant::now();
    let (mut c, _) = standard(start);
    c.create_vs(spec("web", 80, 2)).unwrap();
    // se1's daemon crashed; its XDP program still steers and se2 sees it echo.
    for s in 1..=20u64 {
        let now = start + Duration::from_secs(s);
        c.heartbeat("se2", reports(&[(1, false, true)]), now);
        for e in ["se3", "se4"] {
            c.heartbeat(e, Observed::default(), now);
        }
        c.tick(now).unwrap();
    }
    assert_eq!(c.health("se1"), Some(EngineHealth::Failed));
    assert_eq!(primary_epoch(&c), (1, 0), "not replaced while it steers");
    let d = desired(&c);
    assert_eq!(
        d.engines.iter().find(|e| e.id == 1).unwrap().state,
        EngineState::Active,
        "a failed primary stays active: its peers keep probing it"
    );
    assert_eq!(c.persisted().services["web"].placement[0], "se1");
    assert!(events_of(&c, "promotion").is_empty());
    let a = c.anomalies();
    assert!(
        a.iter().any(|(a, _)| a.kind == "primary_failed"
            && a.reason.contains("se2")
            && a.reason.contains("data plane still steering")),
        "{a:?}"
    );
    let pr = events_of(&c, "peer_report");
    assert_eq!(pr.len(), 1, "{pr:?}");
    assert_eq!(pr[0].objects, ["engine/se2", "engine/se1"]);
    assert!(pr[0].reason.contains("data plane up"), "{}", pr[0].reason);
    // Its data plane goes too: past the grace already, the controller promotes at the next tick.
    let now = start + Duration::from_secs(21);
    c.heartbeat("se2", reports(&[(1, false, false)]), now);
    for e in ["se3", "se4"] {
        c.heartbeat(e, Observed::default(), now);
    }
    c.tick(now).unwrap();
    assert_eq!(primary_epoch(&c), (2, 1));
    assert_eq!(events_of(&c, "peer_report").len(), 2);
    assert!(
        !c.anomalies()
            .iter()
            .any(|(a, _)| a.kind == "primary_failed")
    );
}

#[test]
fn never_two_primaries_at_one_epoch() {
    let start = Instant::now();
    let (mut c, _) = standard(start);
    c.create_vs(spec("web", 80, 3)).unwrap();
    let mut seen = Primaries::default();
    seen.see(&c);
    // A healed partition: se3 and se2 both promoted themselves at epoch 1; se3 is heard first.
    c.heartbeat("se3", claims(&[(0, 1)]), start);
    seen.see(&c);
    c.heartbeat("se2", claims(&[(0, 1)]), start);
    seen.see(&c);
    assert_eq!(
        primary_epoch(&c),
        (3, 1),
        "the first heard is recorded, once"
    );
    assert_eq!(events_of(&c, "promotion").len(), 1);
    // A later promotion at a higher epoch wins; an equal claim after it changes nothing.
    c.heartbeat("se2", claims(&[(0, 2)]), start);
    seen.see(&c);
    c.heartbeat("se3", claims(&[(0, 2)]), start);
    seen.see(&c);
    assert_eq!(primary_epoch(&c), (2, 2));
    assert_eq!(
        c.persisted().services["web"].placement,
        ["se2", "se3", "se1"]
    );
    // se2 goes silent and nobody promotes: the controller does, at the next epoch (never at one
    // already recorded).
    for s in 1..=20u64 {
        let now = start + Duration::from_secs(s);
        for e in ["se3", "se4"] {
            c.heartbeat(e, Observed::default(), now);
        }
        c.tick(now).unwrap();
        seen.see(&c);
    }
    assert_eq!(primary_epoch(&c), (3, 3));
    assert_eq!(
        seen.0,
        BTreeMap::from([(0, 1), (1, 3), (2, 2), (3, 3)]),
        "one primary per epoch"
    );
    assert_eq!(events_of(&c, "promotion").len(), 3);
}

/// The rebalance loop run by the cluster on a virtual clock (compressed timings: a 10 s interval,
/// a 3 s window), from heartbeats: a hot engine whose load is one service scales it out; the
/// decision is an event with its reason and the loads; a dry run only logs it.
#[test]
fn the_rebalance_loop_scales_a_hot_service_out_from_heartbeats() {
    for dry_run in [false, true] {
        let start = Instant::now();
        let store = Arc::new(MemStore::default());
        let settings = Settings {
            default_group: RebalanceSettings {
                enabled: true,
                dry_run,
                interval: Duration::from_secs(10),
                window: Duration::from_secs(3),
                buffer_se: 0,
                cooldown: Duration::ZERO,
                ..RebalanceSettings::default()
            },
            ..Settings::default()
        };
        let mut c = Cluster::load(settings, store, start).unwrap();
        for (n, id) in [("se1", 1), ("se2", 2), ("se3", 3)] {
            c.register(engine(n, id, "a"), start).unwrap();
        }
        c.create_pool(pool("web")).unwrap();
        let placed = c.create_vs(spec("web", 80, 1)).unwrap().placement;
        assert_eq!(placed.len(), 1);
        let hot = placed[0].clone();
        for s in 1..=12u64 {
            let now = start + Duration::from_secs(s);
            for e in ["se1", "se2", "se3"] {
                let busy = e == hot;
                c.heartbeat(
                    e,
                    Observed {
                        cpu_pct: if busy { 92.0 } else { 35.0 },
                        vs_pps: if busy {
                            BTreeMap::from([("web".to_owned(), 50_000.0)])
                        } else {
                            BTreeMap::new()
                        },
                        ..Observed::default()
                    },
                    now,
                );
            }
            c.tick(now).unwrap();
        }
        let events: Vec<_> = c
            .events
            .recent()
            .into_iter()
            .filter(|e| e.kind == "rebalance")
            .collect();
        assert_eq!(events.len(), 1, "one decision in 12 s: {events:?}");
        let reason = &events[0].reason;
        assert!(
            reason.starts_with(&format!(
                "{hot} at 92 % CPU: web makes 100 % of its packets → scale out web to "
            )),
            "{reason}"
        );
        assert!(reason.contains("loads: se1 "), "{reason}");
        let placement = &c.persisted().services["web"].placement;
        if dry_run {
            assert!(reason.contains("(dry run: not carried out)"), "{reason}");
            assert_eq!(*placement, placed, "nothing changed");
        } else {
            assert_eq!(placement.len(), 2, "scaled out: {placement:?}");
            assert_eq!(placement[0], hot, "the primary stays");
            assert!(desired(&c).virtual_services[0].engines.len() == 2);
        }
    }
}

fn in_group(name: &str, id: u32, group: &str) -> EngineRecord {
    EngineRecord {
        group: group.into(),
        ..engine(name, id, "a")
    }
}

fn edge_spec(name: &str, port: u16, min: u32) -> VsSpec {
    VsSpec {
        engine_group: "edge".into(),
        ..spec(name, port, min)
    }
}

/// Engine groups bound where a service may run: placement, scale-out and replacement stay in the
/// service's group, and every refusal says which group.
#[test]
fn a_service_runs_only_on_engines_of_its_group() {
    let now = Instant::now();
    let (mut c, _) = standard(now);
    let e = c.register(in_group("se5", 5, "edge"), now).unwrap_err();
    assert!(
        matches!(&e, ClusterError::FailedPrecondition(m) if m.contains("engine group \"edge\" does not exist")),
        "{e}"
    );
    c.create_group("edge", RebalanceSettings::default())
        .unwrap();
    c.register(in_group("se5", 5, "edge"), now).unwrap();
    c.register(in_group("se6", 6, "edge"), now).unwrap();
    // se5 and se6 are idle and hold nothing: placement would pick them if it could.
    let web = c.create_vs(spec("web", 80, 2)).unwrap();
    assert!(
        web.placement
            .iter()
            .all(|e| ["se1", "se2", "se3", "se4"].contains(&e.as_str())),
        "{:?}",
        web.placement
    );
    let api = c.create_vs(edge_spec("api", 81, 2)).unwrap();
    assert_eq!(api.placement, ["se5", "se6"]);
    let e = c.scale_out("api", None).unwrap_err().to_string();
    assert!(
        e.contains("in engine group \"edge\"") && e.contains("needs 1 engine(s), 0 eligible"),
        "{e}"
    );
    let e = c.scale_out("api", Some("se1")).unwrap_err().to_string();
    assert!(
        e.contains("se1\" is not eligible")
            && e.contains("engine group \"default\", the service in \"edge\""),
        "{e}"
    );
    let e = c.migrate("web", None, Some("se5")).unwrap_err().to_string();
    assert!(e.contains("engine group \"edge\""), "{e}");
    let e = c
        .create_vs(VsSpec {
            engine_group: "nope".into(),
            ..spec("x", 82, 1)
        })
        .unwrap_err();
    assert_eq!(e, ClusterError::NotFound("engine group \"nope\"".into()));
    let rv = c.persisted().services["api"].resource_version;
    let e = c
        .update_vs(
            VsSpec {
                engine_group: DEFAULT_GROUP.into(),
                ..edge_spec("api", 81, 2)
            },
            rv,
        )
        .unwrap_err();
    assert!(
        matches!(&e, ClusterError::InvalidArgument { field, .. } if field == "engine_group"),
        "{e}"
    );
    // An engine hosting a service cannot change group; an empty one can.
    let e = c
        .register(engine("se5", 5, "a"), now)
        .unwrap_err()
        .to_string();
    assert!(e.contains("hosts api"), "{e}");
    let spare =
        c.p.engines
            .keys()
            .find(|n| !c.p.services.values().any(|v| v.placement.contains(n)))
            .cloned()
            .expect("a default engine without services");
    let id = c.p.engines[&spare].id;
    c.register(in_group(&spare, id, "edge"), now).unwrap();
    assert_eq!(c.group("edge").unwrap().engines.len(), 3);
    // A failed engine of the group is replaced from the group.
    c.health.track_failed("se6", now);
    c.tick(now).unwrap();
    assert_eq!(
        c.persisted().services["api"].placement,
        ["se5", spare.as_str()]
    );
    // Deleting: not the default group, not one in use.
    let e = c.delete_group(DEFAULT_GROUP).unwrap_err().to_string();
    assert!(e.contains("cannot be deleted"), "{e}");
    let e = c.delete_group("edge").unwrap_err().to_string();
    assert!(
        e.contains("in use by engines [") && e.contains("virtual services [api]"),
        "{e}"
    );
    c.create_group("spare", RebalanceSettings::default())
        .unwrap();
    c.delete_group("spare").unwrap();
    assert!(c.group("spare").is_err());
}

/// The scale-in timeout is the group's: each service carries its group's in the snapshot, a
/// drain of it says so, and changing it changes the snapshot.
#[test]
fn each_group_has_its_own_scalein_timeout() {
    let now = Instant::now();
    let (mut c, _) = standard(now);
    c.create_group(
        "edge",
        RebalanceSettings {
            scalein_timeout: Duration::from_mins(2),
            ..RebalanceSettings::default()
        },
    )
    .unwrap();
    for (n, id) in [("se5", 5), ("se6", 6)] {
        c.register(in_group(n, id, "edge"), now).unwrap();
    }
    c.create_vs(spec("web", 80, 1)).unwrap();
    c.create_vs(edge_spec("api", 81, 1)).unwrap();
    c.scale_out("api", Some("se6")).unwrap();
    let timeouts = |c: &Cluster| {
        let d = desired(c);
        let of = |name: &str| {
            d.virtual_services
                .iter()
                .find(|v| v.name == name)
                .and_then(|v| v.drain_timeout_s)
        };
        (d.proxy.drain_timeout_s, of("web"), of("api"))
    };
    assert_eq!(timeouts(&c), (30, Some(30), Some(120)));
    c.scale_in("api", Some("se6")).unwrap();
    let reason = events_of(&c, "scaling").last().unwrap().reason.clone();
    assert!(reason.contains("drain for 120 s"), "{reason}");
    let view = c.placement_view(&c.persisted().services["api"].clone());
    assert_eq!(view[1].remaining_ms, 120_000);
    let before = c.snapshot().version;
    let rv = c.group(DEFAULT_GROUP).unwrap().record.resource_version;
    c.update_group(
        DEFAULT_GROUP,
        RebalanceSettings {
            scalein_timeout: Duration::from_secs(45),
            ..RebalanceSettings::default()
        },
        rv,
    )
    .unwrap();
    assert_eq!(timeouts(&c), (45, Some(45), Some(120)));
    assert!(c.snapshot().version > before);
    let e = c
        .update_group(DEFAULT_GROUP, RebalanceSettings::default(), rv)
        .unwrap_err();
    assert!(matches!(e, ClusterError::Aborted(_)), "{e}");
}

#[test]
fn group_settings_are_checked_naming_the_setting() {
    let now = Instant::now();
    let (mut c, _) = standard(now);
    let bad = [
        (
            "window",
            RebalanceSettings {
                window: Duration::from_secs(400),
                ..RebalanceSettings::default()
            },
        ),
        (
            "max",
            RebalanceSettings {
                max: 50.0,
                min: 55.0,
                ..RebalanceSettings::default()
            },
        ),
        (
            "max_cpu_usage",
            RebalanceSettings {
                max: 120.0,
                ..RebalanceSettings::default()
            },
        ),
        (
            "auto_rebalance_interval",
            RebalanceSettings {
                interval: Duration::ZERO,
                ..RebalanceSettings::default()
            },
        ),
        (
            "max_scaleout_per_vs",
            // Up to 64: the limit of scaling mode bgp (a native service stops at its max_engines).
            RebalanceSettings {
                max_scaleout_per_vs: 65,
                ..RebalanceSettings::default()
            },
        ),
    ];
    for (field, settings) in bad {
        let e = c.create_group("g", settings).unwrap_err();
        assert!(
            matches!(&e, ClusterError::InvalidArgument { field: f, .. } if f == field),
            "{field}: {e}"
        );
    }
    assert!(c.group("g").is_err(), "nothing was created");
    let e = c
        .create_group("bad name!", RebalanceSettings::default())
        .unwrap_err();
    assert!(matches!(e, ClusterError::InvalidArgument { .. }), "{e}");
    c.create_group("g", RebalanceSettings::default()).unwrap();
    let e = c
        .create_group("g", RebalanceSettings::default())
        .unwrap_err();
    assert!(matches!(e, ClusterError::AlreadyExists(_)), "{e}");
}

/// Groups, their settings and their members survive a controller restart.
#[test]
fn a_restarted_controller_keeps_its_groups() {
    let now = Instant::now();
    let (mut c, store) = standard(now);
    let edge = RebalanceSettings {
        enabled: true,
        scalein_timeout: Duration::from_secs(90),
        ..RebalanceSettings::default()
    };
    c.create_group("edge", edge).unwrap();
    c.register(in_group("se5", 5, "edge"), now).unwrap();
    c.create_vs(edge_spec("api", 81, 1)).unwrap();
    let snapshot = c.snapshot();
    drop(c);
    let c = cluster(store, now);
    assert_eq!(c.snapshot(), snapshot, "same snapshot, same version");
    let g = c.group("edge").unwrap();
    assert_eq!(g.record.settings, edge);
    assert_eq!(g.engines, ["se5"]);
    assert_eq!(g.virtual_services, ["api"]);
    assert!(c.rebalancers["edge"].settings.enabled);
    assert!(!c.rebalancers[DEFAULT_GROUP].settings.enabled);
}

/// Each group runs its own loop: a hot engine in each of two groups is a change in each, in the
/// same interval, while a change in flight in one group does not hold the other back; a group
/// with the loop off decides nothing.
#[test]
fn each_group_rebalances_on_its_own() {
    let start = Instant::now();
    let on = RebalanceSettings {
        enabled: true,
        interval: Duration::from_secs(10),
        window: Duration::from_secs(3),
        buffer_se: 0,
        cooldown: Duration::ZERO,
        ..RebalanceSettings::default()
    };
    let settings = Settings {
        default_group: on,
        ..Settings::default()
    };
    let mut c = Cluster::load(settings, Arc::new(MemStore::default()), start).unwrap();
    c.create_group("edge", on).unwrap();
    c.create_group("idle", RebalanceSettings::default())
        .unwrap();
    let engines = [
        ("se1", 1, DEFAULT_GROUP),
        ("se2", 2, DEFAULT_GROUP),
        ("se5", 5, "edge"),
        ("se6", 6, "edge"),
        ("se7", 7, "idle"),
        ("se8", 8, "idle"),
    ];
    for (n, id, g) in engines {
        c.register(in_group(n, id, g), start).unwrap();
    }
    c.create_pool(pool("web")).unwrap();
    let services = [
        c.create_vs(spec("web", 80, 1)).unwrap().placement[0].clone(),
        c.create_vs(edge_spec("api", 81, 1)).unwrap().placement[0].clone(),
        c.create_vs(VsSpec {
            engine_group: "idle".into(),
            ..spec("img", 82, 1)
        })
        .unwrap()
        .placement[0]
            .clone(),
    ];
    let vs_of = |e: &str| match services.iter().position(|p| p == e) {
        Some(0) => Some("web"),
        Some(1) => Some("api"),
        Some(2) => Some("img"),
        _ => None,
    };
    for s in 1..=12u64 {
        let now = start + Duration::from_secs(s);
        for (e, _, _) in engines {
            c.heartbeat(
                e,
                Observed {
                    cpu_pct: if vs_of(e).is_some() { 92.0 } else { 35.0 },
                    vs_pps: vs_of(e)
                        .map(|vs| BTreeMap::from([(vs.to_owned(), 50_000.0)]))
                        .unwrap_or_default(),
                    ..Observed::default()
                },
                now,
            );
        }
        c.tick(now).unwrap();
    }
    let decisions = events_of(&c, "rebalance");
    assert_eq!(
        decisions.len(),
        2,
        "one per group with the loop on: {decisions:?}"
    );
    for (group, vs) in [(DEFAULT_GROUP, "web"), ("edge", "api")] {
        let d = decisions
            .iter()
            .find(|d| d.objects.contains(&obj("group", group)))
            .unwrap_or_else(|| panic!("no decision in {group}: {decisions:?}"));
        assert!(d.reason.contains(&format!("→ scale out {vs} to ")), "{d:?}");
        assert_eq!(c.persisted().services[vs].placement.len(), 2, "{vs}");
    }
    assert!(events_of(&c, "rebalance_failed").is_empty());
    assert_eq!(c.persisted().services["img"].placement.len(), 1);
}

fn bgp_settings() -> BgpConfig {
    BgpConfig::new(
        65001,
        std::net::Ipv4Addr::UNSPECIFIED,
        vec![lb_model::BgpPeerConfig {
            address: "10.77.0.1".parse().unwrap(),
            asn: 65000,
            port: 179,
            hold_time_s: None,
            bfd: Some(lb_model::BfdConfig::default()),
            next_hop_v4: None,
            next_hop_v6: None,
            password: None,
        }],
    )
}

fn bgp_spec(name: &str, port: u16, min: u32) -> VsSpec {
    VsSpec {
        max_engines: BGP_MAX_ENGINES,
        bgp: Some(lb_model::VsBgpConfig {
            med: Some(10),
            local_pref: None,
        }),
        ..spec(name, port, min)
    }
}

#[test]
fn scaling_mode_bgp_needs_the_bgp_settings_and_reaches_every_engine_with_its_own_router_id() {
    let now = Instant::now();
    let (mut c, _) = standard(now);
    let err = c.create_vs(bgp_spec("web", 80, 2)).unwrap_err();
    assert!(
        matches!(&err, ClusterError::FailedPrecondition(m) if m.contains("lbctl bgp set")),
        "{err}"
    );
    // Beyond the native limit, a native service is told what to do.
    let mut wide = spec("web", 80, 1);
    wide.max_engines = 8;
    let err = c.create_vs(wide).unwrap_err();
    assert!(err.to_string().contains("scaling mode bgp"), "{err}");

    assert!(matches!(
        c.set_bgp(Some(bgp_settings()), 3).unwrap_err(),
        ClusterError::Aborted(_)
    ));
    let rec = c.set_bgp(Some(bgp_settings()), 0).unwrap().unwrap();
    assert_eq!(rec.resource_version, 1);
    assert!(
        events_of(&c, "bgp")
            .iter()
            .any(|e| e.reason.contains("10.77.0.1 AS 65000 bfd"))
    );
    let mut too_wide = bgp_spec("web", 80, 1);
    too_wide.max_engines = 65;
    let err = c.create_vs(too_wide).unwrap_err();
    assert!(
        matches!(&err, ClusterError::InvalidArgument { field, .. } if field == "scaling.max_engines"),
        "{err}"
    );
    c.create_vs(bgp_spec("web", 80, 3)).unwrap();

    let d = desired(&c);
    let b = d.bgp.clone().expect("the BGP settings in the snapshot");
    assert!(b.router_id.is_unspecified(), "each engine fills in its own");
    assert_eq!(d.virtual_services[0].bgp.as_ref().unwrap().med, Some(10));
    assert_eq!(d.virtual_services[0].engines.len(), 3);
    // Every engine's configuration from the snapshot: its own address as the BGP identifier.
    for e in &d.engines {
        let config = lb_model::Config::from_parts(DaemonConfig::new("eth0", e.id), d.clone())
            .unwrap_or_else(|err| panic!("engine {}: {err}", e.id));
        assert_eq!(
            config.bgp.unwrap().router_id.to_string(),
            format!("10.77.0.{}", 10 + e.id)
        );
    }

    let err = c.set_bgp(None, 1).unwrap_err();
    assert!(
        matches!(&err, ClusterError::FailedPrecondition(m) if m.contains("\"web\"")),
        "{err}"
    );
    c.delete_vs("web").unwrap();
    assert_eq!(c.set_bgp(None, 1).unwrap(), None);
    assert_eq!(desired(&c).bgp, None);
}

#[test]
fn a_failed_engine_of_a_bgp_service_leaves_at_once_and_nothing_is_promoted() {
    let start = Instant::now();
    let (mut c, _) = standard(start);
    c.set_bgp(Some(bgp_settings()), 0).unwrap();
    c.create_vs(bgp_spec("web", 80, 2)).unwrap();
    assert_eq!(c.persisted().services["web"].placement, ["se1", "se2"]);
    // se1, first in the placement, goes silent.
    for s in 1..=10u64 {
        let now = start + Duration::from_secs(s);
        for e in ["se2", "se3", "se4"] {
            c.heartbeat(e, Observed::default(), now);
        }
        c.tick(now).unwrap();
    }
    assert_eq!(c.health("se1"), Some(EngineHealth::Failed));
    let vs = &c.persisted().services["web"];
    assert_eq!(vs.placement, ["se2", "se3"], "se1 left, se3 added (N+M)");
    assert_eq!(vs.epoch, 0, "no primary, no promotion");
    assert!(events_of(&c, "promotion").is_empty());
    let kinds: BTreeSet<&str> = c.anomalies().iter().map(|(a, _)| a.kind).collect();
    assert!(!kinds.contains("primary_failed"), "{kinds:?}");
    let d = desired(&c);
    let se1 = d.engines.iter().find(|e| e.id == 1).unwrap();
    assert_eq!(se1.state, EngineState::Down, "not kept active as a primary");
}

#[test]
fn any_engine_of_a_bgp_service_scales_in_and_none_is_primary() {
    let now = Instant::now();
    let (mut c, _) = standard(now);
    c.set_bgp(Some(bgp_settings()), 0).unwrap();
    c.create_vs(bgp_spec("web", 80, 2)).unwrap();
    c.scale_out("web", Some("se3")).unwrap();
    serves(&mut c, "se3", &["web"], 10.0, now + Duration::from_secs(1));
    let rec = c.persisted().services["web"].clone();
    assert_eq!(rec.placement, ["se1", "se2", "se3"]);
    assert!(c.placement_view(&rec).iter().all(|p| p.role == "member"));
    assert_eq!(
        members(&c),
        [(1, BASE_WEIGHT), (2, BASE_WEIGHT), (3, BASE_WEIGHT)],
        "no primary share: every engine steers its own"
    );
    let err = c.migrate("web", None, None).unwrap_err();
    assert!(err.to_string().contains("name the engine"), "{err}");
    // The first engine scales in like any other (natively: "migrate it instead").
    c.scale_in("web", Some("se1")).unwrap();
    assert_eq!(
        c.persisted().services["web"].placement,
        ["se2", "se3", "se1"]
    );
    assert_eq!(
        members(&c),
        [(2, BASE_WEIGHT), (3, BASE_WEIGHT), (1, 0)],
        "se1 takes no new connections"
    );
    let engine = crate::api::engine_to_pb("se2", &c).unwrap();
    assert_eq!(engine.roles["web"], "member");
}

#[test]
fn an_engines_bgp_sessions_are_shown_and_their_changes_are_events() {
    let now = Instant::now();
    let (mut c, _) = standard(now);
    let session = |state: &str, error: &str| Observed {
        bgp: vec![BgpSessionReport {
            peer: "10.77.0.1:179".into(),
            state: state.into(),
            uptime_s: 0,
            routes_announced: 1,
            last_error: error.into(),
            bfd: "up".into(),
        }],
        ..Observed::default()
    };
    c.heartbeat("se1", session("connect", ""), now);
    c.heartbeat("se1", session("established", ""), now);
    c.heartbeat("se1", session("established", ""), now);
    c.heartbeat("se1", session("idle", "hold timer expired"), now);
    let reasons: Vec<String> = events_of(&c, "bgp_session")
        .into_iter()
        .map(|e| e.reason)
        .collect();
    assert_eq!(
        reasons,
        [
            "se1: BGP session with 10.77.0.1:179 established, 1 routes announced",
            "se1: BGP session with 10.77.0.1:179 is idle: hold timer expired",
        ],
        "one event per change, none while it stays up"
    );
    let e = crate::api::engine_to_pb("se1", &c).unwrap();
    assert_eq!(e.bgp_peers.len(), 1);
    assert_eq!(e.bgp_peers[0].state, "idle");
    assert_eq!(e.bgp_peers[0].last_error, "hold timer expired");
}
