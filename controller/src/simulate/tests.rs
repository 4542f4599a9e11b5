//! The trace format line by line, the model against the generator, and replays of the example
//! traces through the real decision code.

use super::*;

const MIN: Duration = Duration::from_mins(1);

fn parse(text: &str) -> Result<Trace, TraceError> {
    Trace::parse(&[("a.jsonl", text)])
}

fn example(kind: TraceKind) -> Trace {
    Trace::parse(&[(kind.name(), &generate(kind))]).expect("a generated trace parses")
}

/// A heartbeat line: `engine` at `cpu` %, `vs_pps` per service, its `pps` their sum.
fn hb(t_ms: u64, engine: &str, cpu: f64, vs: &[(&str, f64)]) -> String {
    let vs_pps: BTreeMap<&str, f64> = vs.iter().copied().collect();
    json!({
        "type": "heartbeat",
        "t_ms": t_ms,
        "engine": engine,
        "cpu_pct": cpu,
        "pps": vs.iter().map(|v| v.1).sum::<f64>(),
        "vs_pps": vs_pps,
    })
    .to_string()
}

fn service(name: &str, placement: &[&str]) -> Service {
    Service {
        name: name.into(),
        placement: placement.iter().map(|e| (*e).to_owned()).collect(),
        min_engines: 1,
        max_engines: 4,
        by_bgp: false,
    }
}

/// A minute's interval and cool-down: the loop reacts within minutes of a change of load.
fn compressed() -> RebalanceSettings {
    RebalanceSettings {
        interval: MIN,
        window: Duration::from_secs(30),
        cooldown: MIN,
        max: 80.0,
        min: 30.0,
        ..RebalanceSettings::default()
    }
}

/// The changes carried out, in order.
fn changes(sim: &Simulation) -> Vec<(Duration, Action)> {
    sim.events
        .iter()
        .filter(|e| e.placement.is_some())
        .map(|e| (e.offset, e.action.clone().expect("a change has an action")))
        .collect()
}

fn err(text: &str) -> String {
    parse(text).expect_err("a bad line").to_string()
}

#[test]
fn good_lines_with_defaults_and_unknown_fields() {
    let text = format!(
        "{}\n{}\n\n{}\n",
        r#"{"type":"service","name":"web","placement":["se1","se2"],"min_engines":2,"max_engines":3}"#,
        r#"{"type":"heartbeat","t_ms":1764700000000,"engine":"se1","cpu_pct":55.0,"pps":12000.0,"mbps":80.0,"connections":300,"new_connections_per_s":40.0,"vs_pps":{"web":11000.0},"vs_mbps":{"web":75.0},"later":{"x":[1]}}"#,
        r#"{"type":"heartbeat","t_ms":1764700001000,"engine":"se2"}"#,
    );
    let t = parse(&text).unwrap();
    assert_eq!(
        t.heartbeats,
        vec![
            Heartbeat {
                t_ms: 1_764_700_000_000,
                engine: "se1".into(),
                cpu_pct: 55.0,
                pps: 12000.0,
                mbps: 80.0,
                connections: 300.0,
                new_connections_per_s: 40.0,
                vs_pps: [("web".to_owned(), 11000.0)].into(),
                vs_mbps: [("web".to_owned(), 75.0)].into(),
            },
            Heartbeat {
                t_ms: 1_764_700_001_000,
                engine: "se2".into(),
                cpu_pct: 0.0,
                pps: 0.0,
                mbps: 0.0,
                connections: 0.0,
                new_connections_per_s: 0.0,
                vs_pps: BTreeMap::new(),
                vs_mbps: BTreeMap::new(),
            },
        ]
    );
    assert_eq!(
        t.services,
        vec![Service {
            min_engines: 2,
            max_engines: 3,
            ..service("web", &["se1", "se2"])
        }]
    );
    assert!(t.inferred.is_empty());
    assert_eq!(t.span(), Duration::from_secs(1));
    assert_eq!(t.start_ms(), 1_764_700_000_000);
    // A service line's defaults.
    let t = parse(&format!(
        "{}\n{}",
        r#"{"type":"service","name":"web","placement":["se1"]}"#,
        hb(0, "se1", 1.0, &[])
    ))
    .unwrap();
    assert_eq!(t.services, vec![service("web", &["se1"])]);
}

#[test]
fn a_bad_line_is_an_error_naming_the_file_and_line() {
    let ok = hb(1, "se1", 10.0, &[("web", 1.0)]);
    for (bad, why) in [
        ("not json".to_owned(), "expected"),
        (
            r#"{"type":"heartbeat","t_ms":2,"engine":"se1","cpu_pct":"high"}"#.to_owned(),
            "invalid type: string \"high\", expected f64",
        ),
        (
            r#"{"type":"sample","t_ms":2}"#.to_owned(),
            "unknown variant `sample`",
        ),
        (
            r#"{"type":"heartbeat","t_ms":2}"#.to_owned(),
            "missing field `engine`",
        ),
        (
            r#"{"t_ms":2,"engine":"se1"}"#.to_owned(),
            "missing field `type`",
        ),
        (
            r#"{"type":"heartbeat","t_ms":-2,"engine":"se1"}"#.to_owned(),
            "invalid value",
        ),
        (hb(2, "se1", -1.0, &[]), "cpu_pct -1 is negative"),
        (hb(2, "", 1.0, &[]), "engine is empty"),
        (
            r#"{"type":"heartbeat","t_ms":2,"engine":"se1","vs_pps":{"web":-5}}"#.to_owned(),
            "vs_pps.web -5 is negative",
        ),
        (
            r#"{"type":"service","name":"web","min_engines":3,"max_engines":2}"#.to_owned(),
            "min_engines 3 must be 1 … max_engines (2)",
        ),
        (
            r#"{"type":"service","name":"web","placement":["se1","se1"]}"#.to_owned(),
            "engine \"se1\" is placed twice",
        ),
    ] {
        let e = err(&format!("{ok}\n\n{bad}\n{ok}"));
        assert!(e.starts_with("a.jsonl:3:"), "{bad}: {e}");
        assert!(e.contains(why), "{bad}: {e}");
        assert!(
            !e.contains("at line 1"),
            "serde_json's own line is dropped: {e}"
        );
    }
    assert_eq!(err(""), "a.jsonl: no heartbeat lines");
    let web = r#"{"type":"service","name":"web","placement":["se1"]}"#;
    let other = r#"{"type":"service","name":"web","placement":["se2"]}"#;
    let e = Trace::parse(&[("a.jsonl", &format!("{web}\n{ok}")), ("b.jsonl", other)])
        .unwrap_err()
        .to_string();
    assert_eq!(
        e,
        "b.jsonl:1: service \"web\" differs from its line at a.jsonl:1"
    );
    // The same line in both is fine.
    assert!(Trace::parse(&[("a.jsonl", &format!("{web}\n{ok}")), ("b.jsonl", web)]).is_ok());
    let missing = Trace::load(&["/nonexistent/trace.jsonl"]).unwrap_err();
    assert!(
        missing
            .to_string()
            .starts_with("/nonexistent/trace.jsonl: "),
        "{missing}"
    );
}

#[test]
fn files_merge_by_time() {
    let a = [
        hb(1000, "se1", 1.0, &[]),
        hb(3000, "se1", 3.0, &[]),
        hb(4000, "se1", 4.0, &[]),
    ]
    .join("\n");
    let b = [hb(2000, "se2", 2.0, &[]), hb(3000, "se2", 3.5, &[])].join("\n");
    let t = Trace::parse(&[("a", &a), ("b", &b)]).unwrap();
    let order: Vec<(u64, &str)> = t
        .heartbeats
        .iter()
        .map(|h| (h.t_ms, h.engine.as_str()))
        .collect();
    assert_eq!(
        order,
        [
            (1000, "se1"),
            (2000, "se2"),
            (3000, "se1"),
            (3000, "se2"),
            (4000, "se1")
        ]
    );
    assert_eq!(t.sources, ["a", "b"]);
    assert_eq!(t.span(), Duration::from_secs(3));

    // One file per engine replays as the one file they were cut from.
    let whole = generate(TraceKind::DailyRamp);
    let (services, beats): (Vec<&str>, Vec<&str>) = whole
        .lines()
        .partition(|l| l.contains(r#""type":"service""#));
    let per_engine: Vec<String> = ["se1", "se2", "se3", "se4"]
        .iter()
        .map(|e| {
            let mine = beats
                .iter()
                .filter(|l| l.contains(&format!(r#""engine":"{e}""#)));
            services
                .iter()
                .chain(mine)
                .copied()
                .collect::<Vec<_>>()
                .join("\n")
        })
        .collect();
    let split = Trace::parse(
        &per_engine
            .iter()
            .enumerate()
            .map(|(i, t)| (["1", "2", "3", "4"][i], t.as_str()))
            .collect::<Vec<_>>(),
    )
    .unwrap();
    let one = example(TraceKind::DailyRamp);
    assert_eq!(split.heartbeats.len(), one.heartbeats.len());
    assert_eq!(
        replay(&split, RebalanceSettings::default()).events,
        replay(&one, RebalanceSettings::default()).events
    );
}

#[test]
fn services_without_a_line_are_inferred_from_vs_pps() {
    let text = [
        // The primary counts all of web's packets; the secondaries their shares.
        hb(0, "se2", 10.0, &[("web", 500.0)]),
        hb(0, "se1", 10.0, &[("web", 1500.0)]),
        hb(0, "se3", 10.0, &[("web", 500.0), ("api", 200.0)]),
        hb(1000, "se4", 10.0, &[("api", 0.0)]),
        // Given: kept as given. Without a placement: inferred.
        r#"{"type":"service","name":"db","placement":["se4"],"max_engines":2}"#.to_owned(),
        r#"{"type":"service","name":"cache","min_engines":2}"#.to_owned(),
        hb(1000, "se2", 10.0, &[("cache", 9.0), ("db", 3.0)]),
    ]
    .join("\n");
    let t = parse(&text).unwrap();
    assert_eq!(
        t.services,
        vec![
            service("api", &["se3", "se4"]),
            Service {
                min_engines: 2,
                ..service("cache", &["se2"])
            },
            Service {
                max_engines: 2,
                ..service("db", &["se4"])
            },
            service("web", &["se1", "se2", "se3"]),
        ]
    );
    assert_eq!(
        t.inferred,
        ["api", "cache", "web"].map(str::to_owned).into()
    );
    assert_eq!(
        t.engines,
        ["se1", "se2", "se3", "se4"].map(str::to_owned).into()
    );
    // The example without service lines.
    let flash = example(TraceKind::FlashCrowd);
    assert_eq!(
        flash.services,
        vec![
            service("api", &["se2"]),
            service("db", &["se3"]),
            service("web", &["se1"])
        ]
    );
    assert_eq!(flash.inferred.len(), 3);
}

#[test]
fn the_fit_recovers_the_generators_engines() {
    let fits = fit_engines(&example(TraceKind::DailyRamp));
    for (engine, idle, cost) in [
        ("se1", 10.0, 0.000_40),
        ("se2", 5.0, 0.000_42),
        ("se4", 3.0, 0.000_40),
    ] {
        let f = fits[engine];
        assert_eq!(f.method, FitMethod::LeastSquares, "{engine}");
        assert!((f.idle - idle).abs() < 0.5, "{engine}: {f:?}");
        assert!((f.cost - cost).abs() < 0.000_01, "{engine}: {f:?}");
        assert!(f.r2.unwrap() > 0.99, "{engine}: {f:?}");
    }
    // se3 served nothing: its own idle, the others' cost.
    let se3 = fits["se3"];
    assert_eq!(se3.method, FitMethod::Others);
    assert!((se3.idle - 4.0).abs() < 0.2, "{se3:?}");
    // A flat engine: through the origin. The flash crowd's saturated samples are left out.
    let flash = fit_engines(&example(TraceKind::FlashCrowd));
    assert_eq!(flash["se2"].method, FitMethod::ThroughOrigin);
    assert!(flash["se2"].idle.abs() < f64::EPSILON);
    assert_eq!(flash["se1"].method, FitMethod::LeastSquares);
    assert!(flash["se1"].samples < 360, "{:?}", flash["se1"]);
    assert!((flash["se1"].cost - 0.000_40).abs() < 0.000_02);
}

#[test]
fn a_flash_crowd_scales_the_hot_service_out_during_the_spike_and_back_in_after() {
    let trace = example(TraceKind::FlashCrowd);
    let (from, until) = FLASH_SPIKE;
    for settings in [compressed(), RebalanceSettings::default()] {
        let sim = replay(&trace, settings);
        let c = changes(&sim);
        assert_eq!(c.len(), 2, "{c:?}");
        let (out_at, out) = &c[0];
        assert_eq!(
            *out,
            Action::ScaleOut {
                vs: "web".into(),
                to: "se4".into()
            }
        );
        assert!(
            *out_at > from && *out_at <= from + settings.interval + 2 * MIN,
            "{out_at:?}"
        );
        let (in_at, back) = &c[1];
        assert_eq!(
            *back,
            Action::ScaleIn {
                vs: "web".into(),
                engine: "se4".into()
            }
        );
        assert!(
            *in_at > until && *in_at <= until + settings.interval + 2 * MIN,
            "{in_at:?}"
        );
        assert_eq!(sim.placement, trace.services);
        // The loop cuts the time se1 spends hot.
        let se1 = sim.cpu["se1"];
        assert!(
            se1.before.above >= until.checked_sub(from).unwrap(),
            "{se1:?}"
        );
        assert!(se1.after.above <= settings.interval + 2 * MIN, "{se1:?}");
        assert!(sim.cpu["se4"].after.peak > 60.0);
    }
}

#[test]
fn a_day_scales_web_out_twice_by_noon_and_back_in_by_night() {
    let sim = replay(&example(TraceKind::DailyRamp), RebalanceSettings::default());
    let web_in = |engine: &str| Action::ScaleIn {
        vs: "web".into(),
        engine: engine.into(),
    };
    let web_out = |to: &str| Action::ScaleOut {
        vs: "web".into(),
        to: to.into(),
    };
    let c = changes(&sim);
    assert_eq!(
        c.iter().map(|c| c.1.clone()).collect::<Vec<_>>(),
        [
            // Night: the recorded secondary is idle.
            web_in("se4"),
            web_out("se4"),
            web_out("se3"),
            web_in("se4"),
            web_in("se3"),
        ]
    );
    let hour = Duration::from_hours(1);
    assert!(c[1].0 > 6 * hour && c[2].0 < 13 * hour, "{c:?}");
    assert!(c[3].0 > 13 * hour && c[4].0 < 23 * hour, "{c:?}");
    // One decision per interval after the first.
    assert_eq!(sim.events.len(), 287);
    assert!(sim.cpu["se1"].after.peak < sim.cpu["se1"].before.peak);
}

#[test]
fn a_flat_trace_between_the_thresholds_makes_no_change() {
    // Cold-ish but above min, one idle engine with nothing on it; an hour, every 10 s.
    let mut lines = vec![
        r#"{"type":"service","name":"web","placement":["se1","se2"]}"#.to_owned(),
        r#"{"type":"service","name":"api","placement":["se3"]}"#.to_owned(),
    ];
    for i in 0..360 {
        let t = i * 10_000;
        lines.push(hb(t, "se1", 35.0, &[("web", 40_000.0)]));
        lines.push(hb(t, "se2", 34.0, &[("web", 20_000.0)]));
        lines.push(hb(t, "se3", 45.0, &[("api", 30_000.0)]));
        lines.push(hb(t, "se4", 2.0, &[]));
    }
    let trace = parse(&lines.join("\n")).unwrap();
    for settings in [compressed(), RebalanceSettings::default()] {
        let sim = replay(&trace, settings);
        assert!(!sim.events.is_empty());
        assert!(
            sim.events.iter().all(|e| e.action.is_none()),
            "{:?}",
            sim.events
        );
        assert_eq!(sim.placement, trace.services);
        // The model reproduces a placement it does not change.
        for (e, c) in &sim.cpu {
            assert!((c.after.peak - c.recorded.peak).abs() < 0.01, "{e}: {c:?}");
        }
    }
}

#[test]
fn the_same_trace_gives_the_same_output() {
    let run = || {
        let trace = example(TraceKind::FlashCrowd);
        let sim = replay(&trace, compressed());
        (render_human(&trace, &sim), render_json(&trace, &sim))
    };
    let first = run();
    assert_eq!(first, run());
    assert_eq!(
        generate(TraceKind::DailyRamp),
        generate(TraceKind::DailyRamp)
    );
}

#[test]
fn the_committed_examples_are_the_generated_ones() {
    for (kind, committed) in [
        (
            TraceKind::DailyRamp,
            include_str!("../../traces/daily-ramp.jsonl"),
        ),
        (
            TraceKind::FlashCrowd,
            include_str!("../../traces/flash-crowd.jsonl"),
        ),
    ] {
        assert!(
            committed == generate(kind),
            "controller/traces/{}.jsonl differs from `controller simulate --generate {0}`",
            kind.name()
        );
        assert!(
            committed.len() < 300_000,
            "{}: {} bytes",
            kind.name(),
            committed.len()
        );
        let t = Trace::parse(&[(kind.name(), committed)]).unwrap();
        assert_eq!(t.engines.len(), 4);
        assert_eq!(t.services.len(), 3);
        assert!(
            changes(&replay(&t, RebalanceSettings::default()))
                .iter()
                .any(|c| matches!(c.1, Action::ScaleOut { .. }))
        );
        assert_eq!(kind.name().parse::<TraceKind>(), Ok(kind));
    }
    assert!("daily".parse::<TraceKind>().is_err());
    // Any heartbeat interval.
    let fine = Trace::parse(&[(
        "1s",
        &generate_every(TraceKind::FlashCrowd, Duration::from_secs(1)),
    )])
    .unwrap();
    assert_eq!(fine.heartbeats.len(), 4 * 7200);
}

#[test]
fn changes_are_carried_out_as_the_controller_does_or_refused_as_it_would() {
    let mut p = vec![service("web", &["se1", "se2"])];
    let migrate = |from: &str, to: &str| Action::Migrate {
        vs: "web".into(),
        from: from.into(),
        to: to.into(),
    };
    // A secondary's migration: the target takes its place; a primary's: the target leads.
    carry_out(&mut p, &migrate("se2", "se3")).unwrap();
    assert_eq!(p[0].placement, ["se1", "se3"]);
    carry_out(&mut p, &migrate("se1", "se4")).unwrap();
    assert_eq!(p[0].placement, ["se4", "se3"]);
    let scale_in = |e: &str| Action::ScaleIn {
        vs: "web".into(),
        engine: e.into(),
    };
    assert_eq!(
        carry_out(&mut p, &scale_in("se4")).unwrap_err(),
        "se4 is the primary of web: migrate it instead"
    );
    carry_out(&mut p, &scale_in("se3")).unwrap();
    assert_eq!(
        carry_out(&mut p, &scale_in("se3")).unwrap_err(),
        "web is at its min_engines (1)"
    );
    p[0].max_engines = 2;
    let out = |to: &str| Action::ScaleOut {
        vs: "web".into(),
        to: to.into(),
    };
    carry_out(&mut p, &out("se1")).unwrap();
    assert_eq!(p[0].placement, ["se4", "se1"]);
    assert_eq!(
        carry_out(&mut p, &out("se2")).unwrap_err(),
        "web is at its max_engines (2)"
    );
    assert!(
        carry_out(&mut p, &migrate("se1", "se2"))
            .unwrap_err()
            .contains("a migration adds the target before the old engine leaves")
    );
    assert_eq!(
        carry_out(&mut p, &out("se9")).unwrap_err(),
        "web is at its max_engines (2)"
    );
    assert!(carry_out(&mut [], &out("se1")).is_err());
}

#[test]
fn a_dry_run_changes_nothing() {
    let trace = example(TraceKind::FlashCrowd);
    let sim = replay(
        &trace,
        RebalanceSettings {
            dry_run: true,
            ..compressed()
        },
    );
    assert!(changes(&sim).is_empty());
    assert_eq!(sim.placement, trace.services);
    let dry: Vec<&Event> = sim.events.iter().filter(|e| e.action.is_some()).collect();
    assert!(!dry.is_empty() && dry.iter().all(|e| e.dry_run));
    assert!(
        render_human(&trace, &sim).contains("scale out web to se4 (dry run: not carried out) — ")
    );
}

#[test]
fn the_renderings_say_what_happened() {
    let trace = example(TraceKind::FlashCrowd);
    let sim = replay(&trace, RebalanceSettings::default());
    let human = render_human(&trace, &sim);
    assert!(
        human.contains("\n+00:45:00  scale out web to se4 — se1 at 100 % CPU"),
        "{human}"
    );
    assert!(human.contains("\n           placement: api [se2] · db [se3] · web [se1 se4]\n"));
    assert!(
        human.contains("\n+00:05:00  no change — every engine with services within 30–80 % CPU")
    );
    assert!(human.contains("summary: 2 changes (1 scale out, 1 scale in, 0 migrate)"));
    assert!(human.contains("web [se1] (inferred)"));
    let lines: Vec<Value> = render_json(&trace, &sim)
        .lines()
        .map(|l| serde_json::from_str(l).expect("each line is JSON"))
        .collect();
    assert_eq!(lines.len(), sim.events.len() + 2);
    assert_eq!(lines[0]["type"], "header");
    assert_eq!(lines[0]["services"][2]["inferred"], true);
    let out = lines
        .iter()
        .find(|l| l["action"]["kind"] == "scale_out")
        .unwrap();
    assert_eq!(out["type"], "decision");
    assert_eq!(out["offset"], "+00:45:00");
    assert_eq!(out["t_s"], 2700.0);
    assert_eq!(out["action"]["to"], "se4");
    assert_eq!(out["placement"]["web"], json!(["se1", "se4"]));
    assert_eq!(out["carried_out"], true);
    assert_eq!(lines[1]["action"], Value::Null);
    let summary = lines.last().unwrap();
    assert_eq!(summary["type"], "summary");
    assert_eq!(summary["changes"]["scale_in"], 1);
    assert_eq!(summary["placement"]["web"], json!(["se1"]));
}
