//! The decision tree branch by branch, and the loop replayed on a virtual clock.

// The loads compared are averages of equal samples: exact in floating point.
#![allow(clippy::float_cmp)]

use super::*;

const S: Duration = Duration::from_secs(1);

fn settings() -> RebalanceSettings {
    RebalanceSettings {
        enabled: true,
        buffer_se: 0,
        cooldown: Duration::ZERO,
        ..RebalanceSettings::default()
    }
}

fn vs(name: &str, placement: &[&str]) -> Service {
    Service {
        name: name.into(),
        placement: placement.iter().map(|s| (*s).to_owned()).collect(),
        min_engines: 1,
        max_engines: 4,
        by_bgp: false,
    }
}

fn engines(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

/// One sample a second from `from` for `secs` seconds: `cpu` %, and `pps` per service.
fn feed(r: &mut Rebalancer, engine: &str, from: Instant, secs: u64, cpu: f64, pps: &[(&str, f64)]) {
    for i in 0..secs {
        r.record(
            engine,
            Sample {
                at: from + S * u32::try_from(i).unwrap(),
                cpu_pct: cpu,
                pps: pps.iter().map(|(_, p)| p).sum(),
                mbps: 0.0,
                connections: 0.0,
                new_connections_per_s: 0.0,
                vs_pps: pps.iter().map(|(v, p)| ((*v).to_owned(), *p)).collect(),
            },
        );
    }
}

/// An engine's load through an interval: (name, CPU %, packets per second per service).
type Load<'a> = (&'a str, f64, &'a [(&'a str, f64)]);

/// A rebalancer whose first interval started at `t0`, with `loads` (engine, cpu, per-VS pps)
/// reported through the whole interval; returns the decision at its end.
fn decide_once(st: RebalanceSettings, loads: &[Load<'_>], services: &[Service]) -> Decision {
    let t0 = Instant::now();
    let mut r = Rebalancer::new(st);
    let healthy = engines(&loads.iter().map(|l| l.0).collect::<Vec<_>>());
    assert!(
        r.tick(t0, &healthy, services).is_none(),
        "the first interval starts"
    );
    for (e, cpu, pps) in loads {
        feed(&mut r, e, t0 + S, 300, *cpu, pps);
    }
    r.tick(t0 + Duration::from_mins(5), &healthy, services)
        .expect("a decision at the end of the interval")
}

#[test]
fn the_defaults_are_avis_and_bad_settings_are_refused_by_name() {
    let d = RebalanceSettings::default();
    assert!(!d.enabled, "manual by default");
    assert_eq!(
        (d.interval, d.window),
        (Duration::from_mins(5), Duration::from_secs(30))
    );
    assert_eq!((d.max, d.min, d.hot_share), (80.0, 30.0, 0.70));
    assert_eq!(
        (d.max_scaleout_per_vs, d.min_scaleout_per_vs, d.buffer_se),
        (4, 1, 1)
    );
    assert_eq!(d.scalein_timeout, Duration::from_secs(30));
    d.validate().unwrap();
    let bad = |f: &dyn Fn(&mut RebalanceSettings), field: &str| {
        let mut s = RebalanceSettings::default();
        f(&mut s);
        let e = s.validate().unwrap_err();
        assert!(e.starts_with(field), "{e} (wanted {field})");
    };
    bad(&|s| s.interval = Duration::ZERO, "auto_rebalance_interval");
    bad(&|s| s.window = Duration::from_secs(301), "window");
    bad(&|s| s.window = Duration::ZERO, "window");
    bad(&|s| s.max = 95.0, "max_cpu_usage");
    bad(&|s| s.max = 101.0, "max_cpu_usage");
    bad(&|s| s.min = 10.0, "min_cpu_usage");
    bad(
        &|s| {
            s.max = 50.0;
            s.min = 55.0;
        },
        "max",
    );
    bad(&|s| s.max = f64::NAN, "min/max");
    bad(&|s| s.hot_share = 1.0, "hot_share");
    bad(&|s| s.max_scaleout_per_vs = 65, "max_scaleout_per_vs");
    bad(&|s| s.min_scaleout_per_vs = 5, "min_scaleout_per_vs");
    bad(
        &|s| s.scalein_timeout = Duration::ZERO,
        "vs_scalein_timeout",
    );
    bad(
        &|s| s.scalein_timeout = Duration::from_secs(3601),
        "vs_scalein_timeout",
    );
    assert_eq!(Criterion::parse("pps"), Ok(Criterion::Pps));
    assert!(Criterion::parse("load").unwrap_err().contains("one of"));
    // Another criterion: its own thresholds, no CPU ranges.
    let pps = RebalanceSettings {
        criterion: Criterion::Pps,
        max: 2_000_000.0,
        min: 100_000.0,
        ..RebalanceSettings::default()
    };
    pps.validate().unwrap();
}

#[test]
fn hot_with_a_dominant_service_scales_it_out_to_the_least_loaded_engine() {
    let d = decide_once(
        settings(),
        &[
            ("se1", 85.0, &[("web", 74.0), ("api", 26.0)]),
            ("se2", 50.0, &[]),
            ("se3", 40.0, &[]),
            ("se4", 40.0, &[]),
        ],
        &[vs("web", &["se1", "se2"]), vs("api", &["se1"])],
    );
    assert_eq!(
        d.action,
        Some(Action::ScaleOut {
            vs: "web".into(),
            to: "se3".into()
        }),
        "se3 and se4 tie at 40 %: the first by name; {}",
        d.reason
    );
    assert_eq!(
        d.reason,
        "se1 at 85 % CPU: web makes 74 % of its packets → scale out web to se3"
    );
    assert_eq!(d.loads["se1"], 85.0);
}

#[test]
fn hot_without_a_dominant_service_migrates_the_heaviest() {
    let d = decide_once(
        settings(),
        &[
            ("se1", 90.0, &[("web", 60.0), ("api", 40.0)]),
            ("se2", 20.0, &[]),
        ],
        &[vs("web", &["se1"]), vs("api", &["se1"])],
    );
    assert_eq!(
        d.action,
        Some(Action::Migrate {
            vs: "web".into(),
            from: "se1".into(),
            to: "se2".into()
        }),
        "{}",
        d.reason
    );
    // Two services at 45 % each: migrate one, the same one every time.
    let two = || {
        decide_once(
            settings(),
            &[
                ("se1", 90.0, &[("web", 45.0), ("api", 45.0), ("dns", 10.0)]),
                ("se2", 20.0, &[]),
            ],
            &[
                vs("web", &["se1"]),
                vs("api", &["se1"]),
                vs("dns", &["se1"]),
            ],
        )
    };
    let first = two();
    assert_eq!(
        first.action,
        Some(Action::Migrate {
            vs: "api".into(),
            from: "se1".into(),
            to: "se2".into()
        }),
        "{}",
        first.reason
    );
    assert_eq!(two().action, first.action, "deterministic");
}

#[test]
fn a_dominant_service_at_its_maximum_or_without_a_free_engine_is_said_so() {
    let at_max = decide_once(
        RebalanceSettings {
            max_scaleout_per_vs: 2,
            ..settings()
        },
        &[
            ("se1", 85.0, &[("web", 100.0)]),
            ("se2", 50.0, &[]),
            ("se3", 10.0, &[]),
        ],
        &[vs("web", &["se1", "se2"])],
    );
    assert_eq!(at_max.action, None);
    assert!(
        at_max
            .reason
            .contains("web makes 100 % of its packets, but is at its maximum of 2 engines"),
        "{}",
        at_max.reason
    );
    // The last free engine is the failover buffer (N+M).
    let buffer = decide_once(
        RebalanceSettings {
            buffer_se: 1,
            ..settings()
        },
        &[
            ("se1", 85.0, &[("web", 100.0)]),
            ("se2", 50.0, &[]),
            ("se3", 50.0, &[]),
        ],
        &[vs("web", &["se1", "se2"])],
    );
    assert_eq!(buffer.action, None);
    assert!(
        buffer
            .reason
            .contains("no eligible engine is free (buffer_se 1)"),
        "{}",
        buffer.reason
    );
    // A hot engine is no target.
    let all_hot = decide_once(
        settings(),
        &[("se1", 85.0, &[("web", 100.0)]), ("se2", 88.0, &[])],
        &[vs("web", &["se1"])],
    );
    assert_eq!(all_hot.action, None, "{}", all_hot.reason);
}

#[test]
fn cold_scales_a_secondary_in_or_consolidates_or_says_why_not() {
    let d = decide_once(
        settings(),
        &[
            ("se1", 50.0, &[("web", 10.0)]),
            ("se2", 10.0, &[("web", 5.0)]),
        ],
        &[vs("web", &["se1", "se2"])],
    );
    assert_eq!(
        d.action,
        Some(Action::ScaleIn {
            vs: "web".into(),
            engine: "se2".into()
        }),
        "{}",
        d.reason
    );
    // A primary at the service's minimum: consolidate onto an engine that stays below max.
    let d = decide_once(
        settings(),
        &[
            ("se1", 40.0, &[("web", 10.0)]),
            ("se2", 10.0, &[("api", 5.0)]),
            ("se3", 75.0, &[]),
        ],
        &[vs("web", &["se1"]), vs("api", &["se2"])],
    );
    assert_eq!(
        d.action,
        Some(Action::Migrate {
            vs: "api".into(),
            from: "se2".into(),
            to: "se1".into()
        }),
        "se1 (40 + 10 < 80), not se3 (75 + 10 ≥ 80): {}",
        d.reason
    );
    // The only other engine would go above max with it (72 + 10 ≥ 80): no consolidation.
    let d = decide_once(
        settings(),
        &[
            ("se1", 72.0, &[("web", 10.0)]),
            ("se2", 10.0, &[("api", 5.0)]),
        ],
        &[vs("web", &["se1"]), vs("api", &["se2"])],
    );
    assert_eq!(d.action, None, "{}", d.reason);
    assert!(d.reason.contains("no engine can take them"), "{}", d.reason);
    // At min_engines, nowhere to go.
    let mut pinned = vs("web", &["se1", "se2"]);
    pinned.min_engines = 2;
    let d = decide_once(
        settings(),
        &[
            ("se1", 25.0, &[("web", 10.0)]),
            ("se2", 10.0, &[("web", 5.0)]),
        ],
        &[pinned],
    );
    assert_eq!(d.action, None);
    assert!(
        d.reason.contains("below 30, but web at min_engines"),
        "{}",
        d.reason
    );
}

#[test]
fn thresholds_are_exclusive_on_both_sides() {
    let d = decide_once(
        settings(),
        &[
            ("se1", 80.0, &[("web", 100.0)]),
            ("se2", 30.0, &[("web", 1.0)]),
            ("se3", 50.0, &[]),
        ],
        &[vs("web", &["se1", "se2"])],
    );
    assert_eq!(
        d.action, None,
        "exactly max is not above it, exactly min not below: {}",
        d.reason
    );
    assert_eq!(
        d.reason,
        "every engine with services within 30–80 % CPU (or without samples)"
    );
}

#[test]
fn only_the_last_window_of_the_interval_counts() {
    let t0 = Instant::now();
    let healthy = engines(&["se1", "se2", "se3"]);
    let services = [vs("web", &["se1", "se2"])];
    let mut r = Rebalancer::new(settings());
    assert!(r.tick(t0, &healthy, &services).is_none());
    // Hot for the first 270 s, normal for the last 30 s: nothing.
    feed(&mut r, "se1", t0 + S, 269, 95.0, &[("web", 100.0)]);
    feed(&mut r, "se1", t0 + S * 270, 31, 60.0, &[("web", 100.0)]);
    feed(&mut r, "se2", t0 + S, 300, 50.0, &[]);
    feed(&mut r, "se3", t0 + S, 300, 50.0, &[]);
    let d = r.tick(t0 + S * 300, &healthy, &services).unwrap();
    assert_eq!(d.action, None, "{}", d.reason);
    assert!((d.loads["se1"] - 60.0).abs() < 1e-9);
    // Normal until the last 30 s, hot then: scale out.
    feed(&mut r, "se1", t0 + S * 301, 269, 60.0, &[("web", 100.0)]);
    feed(&mut r, "se1", t0 + S * 570, 31, 95.0, &[("web", 100.0)]);
    feed(&mut r, "se2", t0 + S * 301, 300, 50.0, &[]);
    feed(&mut r, "se3", t0 + S * 301, 300, 50.0, &[]);
    let d = r.tick(t0 + S * 600, &healthy, &services).unwrap();
    assert_eq!(
        d.action,
        Some(Action::ScaleOut {
            vs: "web".into(),
            to: "se3".into()
        }),
        "{}",
        d.reason
    );
}

#[test]
fn one_change_per_interval_and_a_cool_down_after_it() {
    let t0 = Instant::now();
    let healthy = engines(&["se1", "se2", "se3", "se4"]);
    let services = [vs("web", &["se1"])];
    let mut r = Rebalancer::new(RebalanceSettings {
        cooldown: Duration::from_mins(10),
        ..settings()
    });
    assert!(r.tick(t0, &healthy, &services).is_none());
    let mut decisions = Vec::new();
    // Hot throughout; ticks every 10 s for 25 minutes.
    for step in 1..=150u32 {
        let now = t0 + S * (step * 10);
        let from = t0 + S * ((step - 1) * 10);
        feed(&mut r, "se1", from, 10, 95.0, &[("web", 100.0)]);
        for e in ["se2", "se3", "se4"] {
            feed(&mut r, e, from, 10, 40.0, &[]);
        }
        if let Some(d) = r.tick(now, &healthy, &services) {
            decisions.push((now.duration_since(t0).as_secs(), d));
        }
    }
    let at: Vec<u64> = decisions.iter().map(|(t, _)| *t).collect();
    assert_eq!(at, [300, 600, 900, 1200, 1500], "one decision per interval");
    let changes: Vec<u64> = decisions
        .iter()
        .filter(|(_, d)| d.action.is_some())
        .map(|(t, _)| *t)
        .collect();
    assert_eq!(changes, [300, 900, 1500], "none during the 600 s cool-down");
    assert!(
        decisions[1]
            .1
            .reason
            .starts_with("cooling down: the last change was 300 s ago")
    );
}

#[test]
fn off_decides_nothing_and_dry_run_changes_nothing() {
    let t0 = Instant::now();
    let healthy = engines(&["se1", "se2"]);
    let services = [vs("web", &["se1"])];
    let mut off = Rebalancer::new(RebalanceSettings {
        enabled: false,
        ..settings()
    });
    feed(&mut off, "se1", t0, 300, 95.0, &[("web", 1.0)]);
    assert!(off.tick(t0, &healthy, &services).is_none());
    assert!(off.tick(t0 + S * 900, &healthy, &services).is_none());

    let mut dry = Rebalancer::new(RebalanceSettings {
        dry_run: true,
        cooldown: Duration::from_hours(1),
        ..settings()
    });
    assert!(dry.tick(t0, &healthy, &services).is_none());
    for k in 1..=2u32 {
        feed(
            &mut dry,
            "se1",
            t0 + S * (300 * (k - 1) + 1),
            300,
            95.0,
            &[("web", 1.0)],
        );
        feed(
            &mut dry,
            "se2",
            t0 + S * (300 * (k - 1) + 1),
            300,
            20.0,
            &[],
        );
        let d = dry.tick(t0 + S * (300 * k), &healthy, &services).unwrap();
        assert!(d.dry_run);
        assert_eq!(
            d.action,
            Some(Action::ScaleOut {
                vs: "web".into(),
                to: "se2".into()
            }),
            "dry run: decided again, as nothing changed ({})",
            d.reason
        );
    }
}

#[test]
fn engines_without_samples_or_services_are_no_cause_and_no_target() {
    let t0 = Instant::now();
    let healthy = engines(&["se1", "se2", "se3"]);
    let services = [vs("web", &["se1"])];
    let mut r = Rebalancer::new(settings());
    assert!(r.tick(t0, &healthy, &services).is_none());
    feed(&mut r, "se1", t0 + S, 300, 95.0, &[("web", 100.0)]);
    // se2 never reported; se3 is hot with nothing on it.
    feed(&mut r, "se3", t0 + S, 300, 99.0, &[]);
    let d = r.tick(t0 + S * 300, &healthy, &services).unwrap();
    assert_eq!(d.action, None, "{}", d.reason);
    assert!(
        d.reason.contains("se3 at 99 % CPU hosts no service"),
        "{}",
        d.reason
    );
    assert!(!d.loads.contains_key("se2"));
    // Samples older than an interval are dropped.
    r.forget("se3");
    assert!(r.load("se3", t0 + S * 300).is_none());
    feed(&mut r, "se1", t0 + S * 1000, 1, 10.0, &[]);
    assert!((r.load("se1", t0 + S * 1000).unwrap() - 10.0).abs() < 1e-9);
    assert_eq!(r.samples["se1"].len(), 1, "the old ones went");
}

#[test]
fn another_criterion_reads_its_own_measure() {
    let t0 = Instant::now();
    let healthy = engines(&["se1", "se2"]);
    let services = [vs("web", &["se1"])];
    let mut r = Rebalancer::new(RebalanceSettings {
        criterion: Criterion::NewConnections,
        max: 1000.0,
        min: 10.0,
        ..settings()
    });
    assert!(r.tick(t0, &healthy, &services).is_none());
    for i in 1..=300u32 {
        for (e, rate, cpu) in [("se1", 5000.0, 20.0), ("se2", 100.0, 20.0)] {
            r.record(
                e,
                Sample {
                    at: t0 + S * i,
                    cpu_pct: cpu,
                    pps: 0.0,
                    mbps: 0.0,
                    connections: 0.0,
                    new_connections_per_s: rate,
                    vs_pps: if e == "se1" {
                        BTreeMap::from([("web".to_owned(), 1.0)])
                    } else {
                        BTreeMap::new()
                    },
                },
            );
        }
    }
    let d = r.tick(t0 + S * 300, &healthy, &services).unwrap();
    assert_eq!(
        d.reason,
        "se1 at 5000 new connections/s: web makes 100 % of its packets → scale out web to se2",
        "CPU (20 %) would have said nothing"
    );
}

#[test]
fn a_hot_service_in_scaling_mode_bgp_scales_past_the_native_limit() {
    let six = ["se1", "se2", "se3", "se4", "se5", "se6"];
    let loads: Vec<Load<'_>> = six
        .iter()
        .map(|e| -> Load<'_> {
            if *e == "se1" {
                (e, 85.0, &[("web", 90.0)])
            } else {
                (e, 40.0, &[])
            }
        })
        .collect();
    let wide = RebalanceSettings {
        max_scaleout_per_vs: 16,
        ..settings()
    };
    let mut web = vs("web", &six[..4]);
    web.max_engines = 64;
    web.by_bgp = true;
    let d = decide_once(wide, &loads, std::slice::from_ref(&web));
    assert_eq!(
        d.action,
        Some(Action::ScaleOut {
            vs: "web".into(),
            to: "se5".into()
        }),
        "{}",
        d.reason
    );
    // The same service, native: at its maximum of 4, and the decision says what would help.
    let native = vs("web", &six[..4]);
    let d = decide_once(wide, &loads, &[native]);
    assert_eq!(d.action, None, "{}", d.reason);
    assert!(
        d.reason.contains("at its maximum of 4 engines") && d.reason.contains("scaling mode bgp"),
        "{}",
        d.reason
    );
    // In mode bgp too, the group's max_scaleout_per_vs bounds it.
    let d = decide_once(settings(), &loads, &[web]);
    assert_eq!(d.action, None, "{}", d.reason);
    assert!(
        d.reason.contains("at its maximum of 4 engines") && !d.reason.contains("scaling mode bgp"),
        "{}",
        d.reason
    );
}
