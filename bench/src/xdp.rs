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
    path::{Path, PathBuf},
};

use anyhow::{Context, bail, ensure};
use aya::{
    Ebpf,
    maps::ProgramArray,
    programs::{TestRun, TestRunOptions, Xdp},
};
use etherparse::PacketBuilder;
use lb_daemon::{
    config::Config,
    dataplane::Dataplane,
    tables::{Changes, Link, Links, PlanError, Tables},
};
use serde::Serialize;

const XDP_PASS: u32 = 2;
const XDP_TX: u32 = 3;
const MODE_NEW_FLOW: u32 = 1;
const MODE_STRIP_IPIP: u32 = 2;

#[derive(clap::Args)]
pub struct Options {
    /// Iterations per measurement (kernel side).
    #[arg(long, default_value_t = 100_000)]
    repeat: u32,
    /// Rounds; every figure is the median over them.
    #[arg(long, default_value_t = 9)]
    rounds: usize,
    /// Where to write xdp.json and xdp.md.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

const OUR_MAC: [u8; 6] = [2, 0, 0, 0, 0, 1];
const CLIENT_MAC: [u8; 6] = [2, 0, 0, 0, 0, 0xc1];
const VIP: [u8; 4] = [10, 100, 0, 10];

/// The daemon's default table sizes (a connection table of 2^20 flows per family).
/// Engine 1 is this host, 2 an L2 neighbour, 3 a tunnel engine. Virtual service 0 spreads over
/// engine 2 only and virtual service 1 over engine 3 only, so every flow's owner is known.
const CONFIG: &str = r#"
[daemon]
interface = "bench0"
engine_id = 1
pin_dir = "PIN_DIR"
max_virtual_services = 4
conn_table_size = 1048576
persist_table_size = 1024
tunnel_source_v4 = "192.0.2.1"

[[engines]]
id = 1
[[engines]]
id = 2
mac = "02:00:00:00:00:02"
[[engines]]
id = 3
mac = "02:00:00:00:00:fe"
mode = "tunnel"
address_v4 = "192.0.2.3"

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
engines = [ { id = 3 } ]
"#;

struct BenchLinks;
impl Links for BenchLinks {
    fn link(&self, _name: &str) -> Result<Link, PlanError> {
        Ok(Link {
            ifindex: 0,
            mac: OUR_MAC,
        })
    }
}

/// A TCP segment from `client:sport` to `dst:dport`.
fn tcp(dst: [u8; 4], client: [u8; 4], sport: u16, dport: u16, syn: bool) -> Vec<u8> {
    let b = PacketBuilder::ethernet2(CLIENT_MAC, OUR_MAC)
        .ipv4(client, dst, 64)
        .tcp(sport, dport, 1000, 64240);
    let b = if syn { b.syn() } else { b.ack(1) };
    let payload = [0u8; 0];
    let mut out = Vec::with_capacity(b.size(payload.len()));
    b.write(&mut out, &payload).expect("writing to a Vec");
    out
}

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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
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
    let root = crate::workspace_root();
    let object = std::env::var_os("LB_XDP_OBJECT")
        .map_or_else(|| root.join("target/bpf/lb-xdp.o"), PathBuf::from);
    let testkit_path = object.with_file_name("lb-xdp-testkit.o");
    let pin_dir = PathBuf::from(format!("/sys/fs/bpf/lb-bench-{}", std::process::id()));
    let result = measure(opts, &object, &testkit_path, &pin_dir);
    let _ = fs::remove_dir_all(&pin_dir);
    let report = result?;
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

fn measure(
    opts: &Options,
    object: &Path,
    testkit_path: &Path,
    pin_dir: &Path,
) -> anyhow::Result<Report> {
    let bytes = fs::read(object).with_context(|| format!("reading {}", object.display()))?;
    let config = Config::parse(&CONFIG.replace("PIN_DIR", &pin_dir.display().to_string()))?;
    let mut dp = Dataplane::load(&bytes, &config.daemon)?;
    dp.apply(&Changes::between(
        None,
        &Tables::plan(&config, &BenchLinks)?,
    ))?;

    let mut testkit = Ebpf::load_file(testkit_path)
        .with_context(|| format!("loading {}", testkit_path.display()))?;
    for name in ["xdp_floor", "bench_wrap"] {
        let p: &mut Xdp = testkit
            .program_mut(name)
            .with_context(|| format!("no {name}"))?
            .try_into()?;
        p.load()?;
    }
    let mut targets = ProgramArray::try_from(
        testkit
            .take_map("BENCH_TARGET")
            .context("no BENCH_TARGET")?,
    )?;
    let mut mode = aya::maps::Array::<_, u32>::try_from(
        testkit.take_map("BENCH_MODE").context("no BENCH_MODE")?,
    )?;
    let floor: &Xdp = testkit
        .program("xdp_floor")
        .context("no xdp_floor")?
        .try_into()?;
    let wrap: &Xdp = testkit
        .program("bench_wrap")
        .context("no bench_wrap")?
        .try_into()?;
    let lb = dp.program();

    let client = [10, 9, 0, 1];
    let hit = tcp(VIP, client, 40_000, 80, false);
    let new_flow = tcp(VIP, client, 1, 80, true);
    // Non-VIP traffic: to a port no VIP uses (the common case: the engine's own connections), and
    // to another address on a VIP's port (must miss the connection and VIP tables).
    let pass = tcp([10, 99, 0, 1], client, 40_000, 22, false);
    let pass_vip_port = tcp([10, 99, 0, 1], client, 40_000, 80, false);
    let tunnel = tcp(VIP, client, 40_001, 443, false);

    // Record the flows the hit cases use, and check every path does what it is measured for.
    let check = |p: &Xdp, pkt: &[u8], want: u32, what: &str| -> anyhow::Result<()> {
        let (got, _) = run_prog(p, pkt, 1)?;
        if got != want {
            bail!("{what}: verdict {got}, expected {want}");
        }
        Ok(())
    };
    check(lb, &hit, XDP_TX, "connection hit (L2)")?;
    check(lb, &tunnel, XDP_TX, "connection hit (tunnel)")?;
    check(lb, &pass, XDP_PASS, "non-VIP pass")?;
    check(lb, &pass_vip_port, XDP_PASS, "non-VIP pass on a VIP port")?;
    check(floor, &hit, XDP_TX, "floor")?;

    let mut samples: BTreeMap<&str, Vec<f64>> = BTreeMap::new();
    let floor_fd = floor.fd()?.try_clone()?;
    let lb_fd = lb.fd()?.try_clone()?;
    for _ in 0..opts.rounds {
        let mut sample =
            |name: &'static str, p: &Xdp, pkt: &[u8], want: u32| -> anyhow::Result<()> {
                let (got, ns) = run_prog(p, pkt, opts.repeat)?;
                ensure!(got == want, "{name}: verdict {got}, expected {want}");
                samples.entry(name).or_default().push(ns);
                Ok(())
            };
        sample("floor", floor, &hit, XDP_TX)?;
        sample("conn_hit", lb, &hit, XDP_TX)?;
        sample("pass", lb, &pass, XDP_PASS)?;
        sample("pass_vip_port", lb, &pass_vip_port, XDP_PASS)?;
        mode.set(0, MODE_NEW_FLOW, 0)?;
        targets.set(0, &lb_fd, 0)?;
        sample("wrap_new_flow", wrap, &new_flow, XDP_TX)?;
        targets.set(0, &floor_fd, 0)?;
        sample("wrap_floor_new_flow", wrap, &new_flow, XDP_TX)?;
        mode.set(0, MODE_STRIP_IPIP, 0)?;
        targets.set(0, &lb_fd, 0)?;
        sample("wrap_tunnel", wrap, &tunnel, XDP_TX)?;
        targets.set(0, &floor_fd, 0)?;
        sample("wrap_floor_tunnel", wrap, &tunnel, XDP_TX)?;
    }
    let m = |k: &str| median(samples[k].clone());
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
    Ok(Report {
        date: cmd_output("date", &["-u", "+%Y-%m-%d"]),
        machine: cpu_model(),
        kernel: cmd_output("uname", &["-r"]),
        method: "BPF_PROG_TEST_RUN, repeat N per measurement (kernel mean per iteration), cases interleaved per round, median over rounds; new flow and tunnel through a restoring tail-call wrapper whose cost (measured with the floor as target) is subtracted",
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
    })
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

fn cmd_output(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_string())
        .unwrap_or_default()
}

fn cpu_model() -> String {
    let cpus = std::thread::available_parallelism().map_or(0, std::num::NonZero::get);
    let model = fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|s| {
            s.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split(':').nth(1))
                .map(|m| m.trim().to_string())
        })
        .unwrap_or_else(|| "unknown CPU".into());
    format!("{model}, {cpus} cores")
}
