//! Per-packet cost of the XDP data plane, measured with `BPF_PROG_TEST_RUN` (`repeat` N; the kernel
//! reports the mean per iteration) and compared with a floor program (swap MACs, `XDP_TX`) measured
//! in the same run. Cases are interleaved round by round so drift hits them alike; each figure is
//! the median over the rounds.
//!
//! Paths that would see their own output on the next iteration go through `bench_wrap` (see
//! `lb-ebpf/src/testkit.rs`), which restores the input and tail-calls the program under test; its
//! cost, measured by tail-calling the floor through it, is subtracted.

use std::{
    collections::BTreeMap,
    fs,
    net::{Ipv4Addr, SocketAddr},
    path::{Path, PathBuf},
};

use crate::machine::{cmd_output, cpu_model};
use anyhow::{Context, ensure};
use aya::{
    Ebpf,
    maps::{Array, MapData, ProgramArray},
    programs::{ProgramFd, TestRun, TestRunOptions, Xdp},
};
use lb_common::Reason;
use lb_tests::fixtures::{Fixture, OUR_MAC, Packet, Testbed, engine_mac, ipip, rewrite_macs, xdp};
use serde::Serialize;

const MODE_NEW_FLOW: u32 = 1;
const MODE_STRIP_IPIP: u32 = 2;

#[derive(clap::Args)]
pub struct Options {
    /// Iterations per measurement (kernel side).
    #[arg(long, default_value_t = 50_000)]
    repeat: u32,
    /// Rounds; every figure is the median over them.
    #[arg(long, default_value_t = 7)]
    rounds: usize,
    /// Where to write xdp.json and xdp.md.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

/// The daemon's default table sizes (a connection table of 2^20 flows per family). Engine 1 is
/// this host, 2 an L2 neighbour, 4 a tunnel engine; virtual service 0 (port 80) spreads over engine
/// 2 only and virtual service 1 (port 443) over engine 4 only, so every flow's path is known.
const CONFIG: &str = r#"
[daemon]
interface = "eth0"
engine_id = 1
max_virtual_services = 64
conn_table_size = 1048576
persist_table_size = 262144
tunnel_source_v4 = "192.0.2.1"

[[engines]]
id = 1
[[engines]]
id = 2
mac = "02:00:00:00:00:02"
[[engines]]
id = 4
mac = "02:00:00:00:00:fe"
mode = "tunnel"
address_v4 = "192.0.2.4"

[[virtual_services]]
id = 0
name = "l2"
vip = "10.100.0.10"
port = 80
protocol = "tcp"
primary = 1
engines = [ { id = 2 } ]

[[virtual_services]]
id = 1
name = "tunnel"
vip = "10.100.0.10"
port = 443
protocol = "tcp"
primary = 1
engines = [ { id = 4 } ]
"#;

fn run_prog(prog: &Xdp, pkt: &[u8], repeat: u32) -> anyhow::Result<(u32, f64)> {
    let mut out = vec![0u8; pkt.len() + 256];
    let r = prog.test_run(TestRunOptions {
        data_in: Some(pkt),
        data_out: Some(&mut out),
        repeat,
        ..Default::default()
    })?;
    #[allow(clippy::cast_precision_loss)]
    Ok((r.return_value, r.duration.as_nanos() as f64))
}

#[derive(Serialize)]
struct Report {
    date: String,
    machine: String,
    kernel: String,
    method: &'static str,
    repeat: u32,
    rounds: usize,
    floor_ns: f64,
    conn_hit_ns: f64,
    new_flow_ns: f64,
    pass_ns: f64,
    pass_vip_port_ns: f64,
    tunnel_conn_hit_ns: f64,
    wrapper_overhead_ns: f64,
    ratios_to_floor: BTreeMap<&'static str, f64>,
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    ensure!(
        opts.rounds >= 1 && opts.repeat >= 1,
        "--rounds and --repeat must be at least 1"
    );
    let root = lb_tests::workspace_root();
    let testkit_path = lb_tests::testkit_object();
    let report = measure(opts, &testkit_path)?;
    let out_dir = opts
        .out_dir
        .clone()
        .unwrap_or_else(|| root.join("bench/results"));
    fs::create_dir_all(&out_dir)?;
    fs::write(
        out_dir.join("xdp.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    let md = markdown(&report);
    fs::write(out_dir.join("xdp.md"), &md)?;
    print!("{md}");
    println!("\nwrote {} and xdp.md", out_dir.join("xdp.json").display());
    Ok(())
}

/// The measured paths, each a fixture verified (verdict, output bytes, counters) before timing.
struct Cases {
    conn_hit: Fixture,
    new_flow: Fixture,
    pass: Fixture,
    pass_vip_port: Fixture,
    tunnel: Fixture,
}

fn cases(tb: &Testbed) -> anyhow::Result<Cases> {
    let vip = |port| SocketAddr::new(Ipv4Addr::new(10, 100, 0, 10).into(), port);
    let client = |port| SocketAddr::new(Ipv4Addr::new(10, 9, 0, 1).into(), port);
    let other = |port| SocketAddr::new(Ipv4Addr::new(10, 99, 0, 1).into(), port);
    let syn = Packet::syn(client(40_000), vip(80)).build();
    let ack = Packet::ack(client(40_000), vip(80)).build();
    let tunnel_syn = Packet::syn(client(40_001), vip(443)).build();
    let tunnel_ack = Packet::ack(client(40_001), vip(443)).build();
    let new_syn = Packet::syn(client(1), vip(80)).build();
    let c = Cases {
        conn_hit: Fixture::new("connection hit → L2 engine", ack.clone(), xdp::TX)
            .after(vec![syn])
            .output(rewrite_macs(&ack, engine_mac(2), OUR_MAC))
            .reasons(&[Reason::ConnHit, Reason::TxL2]),
        new_flow: Fixture::new("new flow → L2 engine", new_syn.clone(), xdp::TX)
            .output(rewrite_macs(&new_syn, engine_mac(2), OUR_MAC))
            .reasons(&[Reason::ConnNew, Reason::TxL2]),
        // Non-VIP traffic: to a port no VIP uses (the common case: the engine's own connections), and
        // to another address on a VIP's port (misses the connection and VIP tables).
        pass: Fixture::new(
            "non-VIP, other port",
            Packet::ack(client(40_000), other(22)).build(),
            xdp::PASS,
        )
        .unchanged()
        .reasons(&[Reason::PassNotVip]),
        pass_vip_port: Fixture::new(
            "non-VIP, VIP port",
            Packet::ack(client(40_000), other(80)).build(),
            xdp::PASS,
        )
        .unchanged()
        .reasons(&[Reason::PassNotVip]),
        tunnel: Fixture::new(
            "connection hit → tunnel engine",
            tunnel_ack.clone(),
            xdp::TX,
        )
        .after(vec![tunnel_syn])
        .output(ipip(
            &tunnel_ack,
            [2, 0, 0, 0, 0, 0xfe],
            OUR_MAC,
            Ipv4Addr::new(192, 0, 2, 1),
            Ipv4Addr::new(192, 0, 2, 4),
        ))
        .reasons(&[Reason::ConnHit, Reason::TxTunnel]),
    };
    for fx in [
        &c.conn_hit,
        &c.new_flow,
        &c.pass,
        &c.pass_vip_port,
        &c.tunnel,
    ] {
        tb.verify(fx)?;
    }
    Ok(c)
}

/// The floor program and the restoring wrapper, loaded from the testkit object.
struct Testkit {
    ebpf: Ebpf,
    targets: ProgramArray<MapData>,
    mode: Array<MapData, u32>,
}

impl Testkit {
    fn load(path: &Path) -> anyhow::Result<Self> {
        let mut ebpf =
            Ebpf::load_file(path).with_context(|| format!("loading {}", path.display()))?;
        for name in ["xdp_floor", "bench_wrap"] {
            let p: &mut Xdp = ebpf
                .program_mut(name)
                .with_context(|| format!("no {name}"))?
                .try_into()?;
            p.load()?;
        }
        let targets =
            ProgramArray::try_from(ebpf.take_map("BENCH_TARGET").context("no BENCH_TARGET")?)?;
        let mode = Array::try_from(ebpf.take_map("BENCH_MODE").context("no BENCH_MODE")?)?;
        Ok(Testkit {
            ebpf,
            targets,
            mode,
        })
    }

    fn program(&self, name: &str) -> anyhow::Result<&Xdp> {
        Ok(self
            .ebpf
            .program(name)
            .with_context(|| format!("no {name}"))?
            .try_into()?)
    }

    /// Points the wrapper at `target` in `mode`.
    fn wrap(&mut self, mode: u32, target: &ProgramFd) -> anyhow::Result<()> {
        self.mode.set(0, mode, 0)?;
        self.targets.set(0, target, 0)?;
        Ok(())
    }
}

fn measure(opts: &Options, testkit_path: &Path) -> anyhow::Result<Report> {
    let tb = Testbed::with_config(CONFIG)?;
    let c = cases(&tb)?;
    let mut kit = Testkit::load(testkit_path)?;
    let lb = tb.dp.program();
    let (lb_fd, floor_fd) = (
        lb.fd()?.try_clone()?,
        kit.program("xdp_floor")?.fd()?.try_clone()?,
    );

    let mut samples: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let mut sample = |name: &'static str, p: &Xdp, fx: &Fixture| -> anyhow::Result<()> {
        let (got, ns) = run_prog(p, &fx.input, opts.repeat)?;
        ensure!(
            got == fx.expected_action,
            "{name}: verdict {got}, expected {}",
            fx.expected_action
        );
        samples.entry(name).or_default().push(ns);
        Ok(())
    };
    for _ in 0..opts.rounds {
        sample("floor", kit.program("xdp_floor")?, &c.conn_hit)?;
        sample("conn_hit", lb, &c.conn_hit)?;
        sample("pass", lb, &c.pass)?;
        sample("pass_vip_port", lb, &c.pass_vip_port)?;
        for (mode, target, name, fx) in [
            (MODE_NEW_FLOW, &lb_fd, "wrap_new_flow", &c.new_flow),
            (MODE_NEW_FLOW, &floor_fd, "wrap_floor_new_flow", &c.new_flow),
            (MODE_STRIP_IPIP, &lb_fd, "wrap_tunnel", &c.tunnel),
            (MODE_STRIP_IPIP, &floor_fd, "wrap_floor_tunnel", &c.tunnel),
        ] {
            kit.wrap(mode, target)?;
            sample(name, kit.program("bench_wrap")?, fx)?;
        }
    }
    Ok(report(opts, &samples))
}

fn report(opts: &Options, samples: &BTreeMap<&str, Vec<f64>>) -> Report {
    let m = |k: &str| crate::machine::median(&samples[k]);
    let floor_ns = m("floor");
    let new_flow_ns = m("wrap_new_flow") - m("wrap_floor_new_flow") + floor_ns;
    let tunnel_ns = m("wrap_tunnel") - m("wrap_floor_tunnel") + floor_ns;
    let (conn_hit_ns, pass_ns, pass_vip_port_ns) = (m("conn_hit"), m("pass"), m("pass_vip_port"));
    let ratios = BTreeMap::from([
        ("conn_hit", conn_hit_ns / floor_ns),
        ("new_flow", new_flow_ns / floor_ns),
        ("pass", pass_ns / floor_ns),
        ("pass_vip_port", pass_vip_port_ns / floor_ns),
        ("tunnel_conn_hit", tunnel_ns / floor_ns),
    ]);
    Report {
        date: cmd_output("date", &["-u", "+%Y-%m-%d"]),
        machine: cpu_model(),
        kernel: cmd_output("uname", &["-r"]),
        method: "BPF_PROG_TEST_RUN, repeat N per measurement (kernel mean per iteration), cases interleaved per round, median over rounds; new flow and tunnel through a restoring tail-call wrapper whose cost (measured with the floor as target) is subtracted; default table sizes",
        repeat: opts.repeat,
        rounds: opts.rounds,
        floor_ns,
        conn_hit_ns,
        new_flow_ns,
        pass_ns,
        pass_vip_port_ns,
        tunnel_conn_hit_ns: tunnel_ns,
        wrapper_overhead_ns: m("wrap_floor_new_flow") - floor_ns,
        ratios_to_floor: ratios,
    }
}

fn markdown(r: &Report) -> String {
    let row = |name: &str, ns: f64, target: &str| {
        format!(
            "| {name} | {ns:.1} | {:.2}× | {target} |\n",
            ns / r.floor_ns
        )
    };
    let mut s = format!(
        "XDP data plane, BPF_PROG_TEST_RUN, {} × {} iterations, medians ({}, {}, kernel {})\n\n| path | ns/packet | × floor | target |\n|---|---|---|---|\n",
        r.rounds, r.repeat, r.date, r.machine, r.kernel
    );
    s += &row("floor: swap MACs, XDP_TX", r.floor_ns, "");
    s += &row(
        "connection hit → L2 engine (XDP_TX)",
        r.conn_hit_ns,
        "≤ 2.0×",
    );
    s += &row(
        "new flow → L2 engine (Maglev, conn insert)",
        r.new_flow_ns,
        "≤ 4.0×",
    );
    s += &row("non-VIP packet, port no VIP uses (XDP_PASS)", r.pass_ns, "");
    s += &row(
        "non-VIP packet to a VIP's port (XDP_PASS)",
        r.pass_vip_port_ns,
        "",
    );
    s += &row(
        "connection hit → tunnel engine (IPIP encap)",
        r.tunnel_conn_hit_ns,
        "",
    );
    s
}
