//! The TCP proxy's relay on loopback: bulk throughput and short request/response connections
//! through a proxy (accept → connect to the sink → relay), for each way of relaying, against a
//! direct baseline (source → sink) measured in the same run.
//!
//! Placement (2 cores): the load generator (source and sink, one current-thread runtime) runs on
//! CPU 0, the proxy (one current-thread runtime on its own thread) on CPU 1, so the proxy's CPU
//! time is that thread's `getrusage(RUSAGE_THREAD)`. Loopback receive processing runs in the
//! sender's context, so the proxy's figure includes delivering into the sink's socket. Cases are
//! interleaved run by run; every figure is the median over the runs.

use crate::machine::median;
use std::{
    cell::RefCell,
    fs,
    net::{Shutdown, SocketAddr},
    path::PathBuf,
    rc::Rc,
    sync::{
        Arc,
        atomic::{AtomicUsize, Ordering},
    },
    time::{Duration, Instant},
};

use crate::machine::{cmd_output, cpu_model, loadavg};
use anyhow::{Context, bail, ensure};
use lb_daemon::proxy::relay::{
    COPY_BUFFER, PIPE_SIZE, Progress, RelayEnd, RelayKind, SPLICE_AFTER, relay,
};
use nix::{
    sched::{CpuSet, sched_setaffinity},
    sys::resource::{UsageWho, getrusage},
    unistd::Pid,
};
use serde::Serialize;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::{mpsc, oneshot},
};

#[derive(clap::Args)]
pub struct Options {
    /// MiB pushed through per bulk run.
    #[arg(long, default_value_t = 2048)]
    bulk_mib: u64,
    /// Runs per case; every figure is the median over them.
    #[arg(long, default_value_t = 5)]
    runs: usize,
    /// Request/response connections per run.
    #[arg(long, default_value_t = 2000)]
    connections: usize,
    /// Request/response connections in flight at once.
    #[arg(long, default_value_t = 32)]
    concurrency: usize,
    /// Cases to run (default: all): `direct`, `copy_bidirectional`, `copy`, `splice`, `tokio-uring`.
    #[arg(long, value_delimiter = ',')]
    cases: Vec<String>,
    /// Do not pin the load generator and the proxy to separate CPUs.
    #[arg(long)]
    no_pin: bool,
    /// Where to write relay.json and relay.md.
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

const REQUEST: usize = 100;
const RESPONSE: usize = 1024;
const IO_CHUNK: usize = 256 * 1024;
const LOADGEN_CPU: usize = 0;
const PROXY_CPU: usize = 1;

/// What sits between the source and the sink.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Via {
    Direct,
    /// `tokio::io::copy_bidirectional` as is (8 KiB buffers, no idle timeout, no counters).
    CopyBidirectional,
    /// `lb_daemon::proxy::relay::relay`.
    Relay(RelayKind),
    /// `tokio-uring` 0.5: read/write with owned 64 KiB buffers on an `io_uring` runtime.
    Uring,
}

impl Via {
    const ALL: [Via; 5] = [
        Via::Direct,
        Via::CopyBidirectional,
        Via::Relay(RelayKind::Copy),
        Via::Relay(RelayKind::Splice),
        Via::Uring,
    ];

    fn name(self) -> &'static str {
        match self {
            Via::Direct => "direct",
            Via::CopyBidirectional => "copy_bidirectional",
            Via::Relay(RelayKind::Copy) => "copy",
            Via::Relay(RelayKind::Splice) => "splice",
            Via::Uring => "tokio-uring",
        }
    }

    fn describe(self) -> String {
        match self {
            Via::Direct => "source → sink, no proxy".into(),
            Via::CopyBidirectional => "tokio::io::copy_bidirectional (8 KiB buffers)".into(),
            Via::Relay(RelayKind::Copy) => format!(
                "relay(Copy): own read/write loop, {} KiB buffer per direction, idle timeout, live counters",
                COPY_BUFFER / 1024
            ),
            Via::Relay(RelayKind::Splice) => format!(
                "relay(Splice): copy through {} KiB until a read fills it, then splice(2) socket → pipe → socket, {} KiB pipe per direction, idle timeout, live counters",
                SPLICE_AFTER / 1024,
                PIPE_SIZE / 1024
            ),
            Via::Uring => {
                "tokio-uring 0.5 read/write_all, 64 KiB owned buffers (own runtime)".into()
            }
        }
    }
}

/// CPU time (user + system), seconds.
#[derive(Clone, Copy, Default)]
struct Cpu(f64);

fn cpu(who: UsageWho) -> Cpu {
    let u = getrusage(who).expect("getrusage");
    let secs = |t: nix::sys::time::TimeVal| {
        #[allow(clippy::cast_precision_loss)]
        let s = t.tv_sec() as f64 + t.tv_usec() as f64 / 1e6;
        s
    };
    Cpu(secs(u.user_time()) + secs(u.system_time()))
}

fn pin(cpu: usize) -> anyhow::Result<()> {
    let mut set = CpuSet::new();
    set.set(cpu)?;
    sched_setaffinity(Pid::from_raw(0), &set).with_context(|| format!("cannot pin to CPU {cpu}"))
}

enum Ctl {
    /// The proxy thread's CPU time so far.
    Usage(oneshot::Sender<Cpu>),
}

/// A proxy on its own thread; it stops when this is dropped (its control channel closes).
struct Proxy {
    addr: SocketAddr,
    ctl: mpsc::UnboundedSender<Ctl>,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl Proxy {
    fn start(via: Via, sink: SocketAddr, cpu: Option<usize>) -> anyhow::Result<Proxy> {
        let listener = std::net::TcpListener::bind("127.0.0.1:0")?;
        let addr = listener.local_addr()?;
        let (ctl, rx) = mpsc::unbounded_channel();
        let (ready_tx, ready_rx) = std::sync::mpsc::channel::<Result<(), String>>();
        let thread = std::thread::Builder::new()
            .name(format!("proxy {}", via.name()))
            .spawn(move || {
                if let Some(cpu) = cpu
                    && let Err(e) = pin(cpu)
                {
                    let _ = ready_tx.send(Err(format!("{e:#}")));
                    return;
                }
                match via {
                    Via::Uring => uring::serve(listener, sink, rx, &ready_tx),
                    _ => serve_tokio(listener, sink, via, rx, &ready_tx),
                }
            })?;
        let proxy = Proxy {
            addr,
            ctl,
            thread: Some(thread),
        };
        match ready_rx.recv() {
            Ok(Ok(())) => Ok(proxy),
            Ok(Err(e)) => bail!("{e}"),
            Err(_) => bail!("the proxy thread ended before it was ready"),
        }
    }

    async fn cpu(&self) -> Cpu {
        let (tx, rx) = oneshot::channel();
        self.ctl.send(Ctl::Usage(tx)).expect("proxy alive");
        rx.await.expect("proxy answers")
    }
}

impl Drop for Proxy {
    fn drop(&mut self) {
        let (ctl, _) = mpsc::unbounded_channel();
        drop(std::mem::replace(&mut self.ctl, ctl));
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

fn serve_tokio(
    listener: std::net::TcpListener,
    sink: SocketAddr,
    via: Via,
    mut ctl: mpsc::UnboundedReceiver<Ctl>,
    ready: &std::sync::mpsc::Sender<Result<(), String>>,
) {
    let rt = match tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
    {
        Ok(rt) => rt,
        Err(e) => {
            let _ = ready.send(Err(e.to_string()));
            return;
        }
    };
    rt.block_on(async move {
        let listener = match listener
            .set_nonblocking(true)
            .and_then(|()| TcpListener::from_std(listener))
        {
            Ok(l) => l,
            Err(e) => {
                let _ = ready.send(Err(e.to_string()));
                return;
            }
        };
        let _ = ready.send(Ok(()));
        loop {
            tokio::select! {
                accepted = listener.accept() => {
                    let Ok((client, _)) = accepted else { continue };
                    tokio::spawn(proxy_connection(client, sink, via));
                }
                msg = ctl.recv() => match msg {
                    Some(Ctl::Usage(tx)) => { let _ = tx.send(cpu(UsageWho::RUSAGE_THREAD)); }
                    None => break,
                },
            }
        }
    });
}

async fn proxy_connection(mut client: TcpStream, sink: SocketAddr, via: Via) {
    let Ok(mut backend) = TcpStream::connect(sink).await else {
        return;
    };
    let _ = client.set_nodelay(true);
    let _ = backend.set_nodelay(true);
    match via {
        Via::CopyBidirectional => {
            let _ = tokio::io::copy_bidirectional(&mut client, &mut backend).await;
        }
        Via::Relay(kind) => {
            let progress = Progress::default();
            let end = relay(
                kind,
                &mut client,
                &mut backend,
                Duration::from_mins(1),
                &progress,
            )
            .await;
            if end != RelayEnd::Closed {
                eprintln!("relay {kind}: {end:?}");
            }
        }
        Via::Direct | Via::Uring => unreachable!("not a tokio proxy"),
    }
}

mod uring {
    use super::{
        Ctl, Rc, Shutdown, SocketAddr, UsageWho, cpu,
        mpsc::{self},
    };
    use tokio_uring::{
        buf::BoundedBuf,
        net::{TcpListener, TcpStream},
    };

    pub(super) fn serve(
        listener: std::net::TcpListener,
        sink: SocketAddr,
        mut ctl: mpsc::UnboundedReceiver<Ctl>,
        ready: &std::sync::mpsc::Sender<Result<(), String>>,
    ) {
        // `tokio_uring::start` panics when io_uring is unavailable; this reports it.
        let rt = match tokio_uring::Runtime::new(&tokio_uring::builder()) {
            Ok(rt) => rt,
            Err(e) => {
                let _ = ready.send(Err(format!("io_uring unavailable: {e}")));
                return;
            }
        };
        rt.block_on(async move {
            let listener = TcpListener::from_std(listener);
            let _ = ready.send(Ok(()));
            // An io_uring operation is not cancelled by dropping its future: an accept dropped
            // in a `select!` would still take the next connection and lose it. So the accept
            // loop runs on its own and is never dropped before the runtime.
            tokio_uring::spawn(async move {
                loop {
                    if let Ok((client, _)) = listener.accept().await {
                        tokio_uring::spawn(connection(client, sink));
                    }
                }
            });
            while let Some(Ctl::Usage(tx)) = ctl.recv().await {
                let _ = tx.send(cpu(UsageWho::RUSAGE_THREAD));
            }
        });
    }

    async fn connection(client: TcpStream, sink: SocketAddr) {
        let Ok(backend) = TcpStream::connect(sink).await else {
            return;
        };
        let _ = client.set_nodelay(true);
        let _ = backend.set_nodelay(true);
        let (client, backend) = (Rc::new(client), Rc::new(backend));
        let _ = tokio::join!(
            one_way(client.clone(), backend.clone()),
            one_way(backend, client),
        );
    }

    async fn one_way(from: Rc<TcpStream>, to: Rc<TcpStream>) -> std::io::Result<()> {
        let mut buf = vec![0u8; 64 * 1024];
        loop {
            let (read, b) = from.read(buf).await;
            buf = b;
            let n = read?;
            if n == 0 {
                return to.shutdown(Shutdown::Write);
            }
            let (written, b) = to.write_all(buf.slice(..n)).await;
            buf = b.into_inner();
            written?;
        }
    }
}

/// One bulk run: the source pushes `bytes` and half-closes; the sink reads to EOF and closes;
/// the time is from connecting to the source seeing that close.
async fn bulk_once(via: Via, bytes: u64, proxy_cpu: Option<usize>) -> anyhow::Result<Sample> {
    let sink = TcpListener::bind("127.0.0.1:0").await?;
    let sink_addr = sink.local_addr()?;
    let proxy = match via {
        Via::Direct => None,
        _ => Some(Proxy::start(via, sink_addr, proxy_cpu)?),
    };
    let target = proxy.as_ref().map_or(sink_addr, |p| p.addr);
    let proxy_before = match &proxy {
        Some(p) => p.cpu().await,
        None => Cpu::default(),
    };
    let process_before = cpu(UsageWho::RUSAGE_SELF);
    let start = Instant::now();
    let receive = async {
        let (mut s, _) = sink.accept().await?;
        let mut buf = vec![0u8; IO_CHUNK];
        let mut total = 0u64;
        loop {
            let n = s.read(&mut buf).await?;
            if n == 0 {
                break;
            }
            total += n as u64;
        }
        anyhow::Ok(total)
    };
    let send = async {
        let mut s = TcpStream::connect(target).await?;
        let buf = vec![0x5au8; IO_CHUNK];
        let mut left = bytes;
        while left > 0 {
            let n = usize::try_from(left).unwrap_or(IO_CHUNK).min(IO_CHUNK);
            s.write_all(&buf[..n]).await?;
            left -= n as u64;
        }
        s.shutdown().await?;
        let n = s.read(&mut [0u8; 16]).await?;
        ensure!(n == 0, "the sink sent data");
        anyhow::Ok(start.elapsed())
    };
    let (received, took) = tokio::try_join!(receive, send)?;
    ensure!(
        received == bytes,
        "{}: the sink got {received} of {bytes} bytes",
        via.name()
    );
    let process = cpu(UsageWho::RUSAGE_SELF).0 - process_before.0;
    let proxy_cpu = match &proxy {
        Some(p) => p.cpu().await.0 - proxy_before.0,
        None => 0.0,
    };
    Ok(Sample {
        seconds: took.as_secs_f64(),
        proxy_cpu,
        process_cpu: process,
    })
}

struct Sample {
    seconds: f64,
    proxy_cpu: f64,
    process_cpu: f64,
}

struct RrSample {
    seconds: f64,
    latencies_us: Vec<f64>,
    failures: usize,
    proxy_cpu: f64,
    process_cpu: f64,
}

/// One request/response run: `connections` connections, `concurrency` at a time, each sending
/// [`REQUEST`] bytes and reading [`RESPONSE`] bytes; the sink closes after answering.
async fn rr_once(
    via: Via,
    connections: usize,
    concurrency: usize,
    proxy_cpu: Option<usize>,
) -> anyhow::Result<RrSample> {
    let sink = TcpListener::bind("127.0.0.1:0").await?;
    let sink_addr = sink.local_addr()?;
    let sink_task = tokio::spawn(async move {
        loop {
            let Ok((mut s, _)) = sink.accept().await else {
                continue;
            };
            tokio::spawn(async move {
                let _ = s.set_nodelay(true);
                let mut req = [0u8; REQUEST];
                if s.read_exact(&mut req).await.is_ok() {
                    let _ = s.write_all(&[0x42; RESPONSE]).await;
                }
            });
        }
    });
    let proxy = match via {
        Via::Direct => None,
        _ => Some(Proxy::start(via, sink_addr, proxy_cpu)?),
    };
    let target = proxy.as_ref().map_or(sink_addr, |p| p.addr);
    let proxy_before = match &proxy {
        Some(p) => p.cpu().await,
        None => Cpu::default(),
    };
    let process_before = cpu(UsageWho::RUSAGE_SELF);
    let next = Arc::new(AtomicUsize::new(0));
    let latencies = Rc::new(RefCell::new(Vec::with_capacity(connections)));
    let failures = Rc::new(RefCell::new(0usize));
    let start = Instant::now();
    let local = tokio::task::LocalSet::new();
    for _ in 0..concurrency {
        let (next, latencies, failures) = (next.clone(), latencies.clone(), failures.clone());
        local.spawn_local(async move {
            while next.fetch_add(1, Ordering::Relaxed) < connections {
                let t = Instant::now();
                match request(target).await {
                    Ok(()) => latencies.borrow_mut().push(t.elapsed().as_secs_f64() * 1e6),
                    Err(_) => *failures.borrow_mut() += 1,
                }
            }
        });
    }
    local.await;
    let seconds = start.elapsed().as_secs_f64();
    let process = cpu(UsageWho::RUSAGE_SELF).0 - process_before.0;
    let proxy_cpu = match &proxy {
        Some(p) => p.cpu().await.0 - proxy_before.0,
        None => 0.0,
    };
    sink_task.abort();
    let latencies_us = latencies.take();
    let failures = *failures.borrow();
    Ok(RrSample {
        seconds,
        latencies_us,
        failures,
        proxy_cpu,
        process_cpu: process,
    })
}

/// Connect, send the request, read the whole response (the latency ends here), then the close.
async fn request(target: SocketAddr) -> std::io::Result<()> {
    let mut s = TcpStream::connect(target).await?;
    s.set_nodelay(true)?;
    s.write_all(&[0x41; REQUEST]).await?;
    let mut resp = [0u8; RESPONSE];
    s.read_exact(&mut resp).await?;
    let end = s.read(&mut [0u8; 1]).await?;
    if end != 0 {
        return Err(std::io::ErrorKind::InvalidData.into());
    }
    Ok(())
}

#[derive(Serialize)]
struct BulkResult {
    gbit_s: f64,
    gbit_s_runs: Vec<f64>,
    /// Proxy thread CPU seconds per GiB relayed (0 for direct).
    proxy_cpu_s_per_gib: f64,
    /// Proxy thread CPU time / wall time.
    proxy_cpu_utilisation: f64,
    /// Whole process (load generator + proxy) CPU seconds per GiB.
    process_cpu_s_per_gib: f64,
}

#[derive(Serialize)]
struct RrResult {
    connections_per_s: f64,
    connections_per_s_runs: Vec<f64>,
    p50_us: f64,
    p99_us: f64,
    /// Proxy thread CPU microseconds per connection.
    proxy_cpu_us_per_conn: f64,
    process_cpu_us_per_conn: f64,
    failures: usize,
}

#[derive(Serialize)]
struct Case {
    via: &'static str,
    what: String,
    bulk: Option<BulkResult>,
    request_response: Option<RrResult>,
    /// Why the case has no figures.
    unavailable: Option<String>,
}

#[derive(Serialize)]
struct Report {
    date: String,
    machine: String,
    kernel: String,
    method: String,
    placement: String,
    bulk_mib: u64,
    runs: usize,
    connections: usize,
    concurrency: usize,
    request_bytes: usize,
    response_bytes: usize,
    default_kind: String,
    loadavg_before: String,
    loadavg_after: String,
    cases: Vec<Case>,
    notes: Vec<&'static str>,
}

/// What the figures cannot say by themselves.
const NOTES: [&str; 4] = [
    "Direct is a same-CPU, cache-hot bound (the sink reads what the source just wrote on the same core). Through the proxy, a relay whose thread is well below 100 % busy is bounded by cross-CPU wake-ups on this 2-vCPU VM and by the load generator's one CPU, so bulk Gbit/s is noisy (other work on the machine shows in it, see the load average); proxy CPU per GiB is the figure that separates the relays.",
    "tokio-uring 0.5 builds with rustc 1.95 (no rust-version declared, edition 2018) and io_uring works on this kernel (kernel.io_uring_disabled = 0). It needs its own runtime (a current-thread tokio runtime with a LocalSet on a dedicated thread; it cannot run on the daemon's multi-thread runtime), buffers are owned and moved through every call, and dropping an operation's future does not cancel it: a first version of this bench dropped a pending accept in a select! and lost the next connection. Its last release is 0.5.0 (2024) and its tracker says it has no maintainer.",
    "sockmap (an sk_skb stream verdict redirecting between the two sockets) is not a case of this bench: it was built with the relay's counters, idle timeout and half-close (commit d87b21a) and measured end to end in `bench e2e` (2026-12-03), where it reached 0.58x HAProxy's keep-alive requests/s against splice's 0.96x (the kernel sends each redirected chunk from a work queue); see the README.",
    "Splice copies each direction through a 16 KiB buffer until a read fills it, then creates that direction's pipe (two descriptors, on top of the connection's two sockets): the request/response connections here never create one, the bulk ones do after their first 16 KiB. A direction whose pipe cannot be created goes on copying.",
];

fn percentile(v: &mut [f64], p: usize) -> f64 {
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    v[(v.len() * p / 100).min(v.len() - 1)]
}

pub fn run(opts: &Options) -> anyhow::Result<()> {
    ensure!(
        opts.runs >= 1 && opts.bulk_mib >= 1 && opts.connections >= 1 && opts.concurrency >= 1,
        "--runs, --bulk-mib, --connections and --concurrency must be at least 1"
    );
    // Before pinning: the thread's affinity would hide the other CPUs.
    let machine = cpu_model();
    let cpus = std::thread::available_parallelism().map_or(1, std::num::NonZero::get);
    let pinned = !opts.no_pin && cpus >= 2;
    let placement = if pinned {
        pin(LOADGEN_CPU)?;
        format!(
            "load generator (source + sink, one current-thread tokio runtime) pinned to CPU {LOADGEN_CPU}; proxy (one current-thread runtime on its own thread) pinned to CPU {PROXY_CPU}; direct uses CPU {LOADGEN_CPU} only"
        )
    } else {
        "unpinned: load generator and proxy threads share the CPUs".to_string()
    };
    let proxy_cpu = pinned.then_some(PROXY_CPU);
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()?;
    let loadavg_before = loadavg();
    let cases = rt.block_on(measure(opts, proxy_cpu))?;
    let report = Report {
        date: cmd_output("date", &["-u", "+%Y-%m-%d"]),
        machine,
        kernel: cmd_output("uname", &["-r"]),
        method: format!(
            "loopback 127.0.0.1. Bulk: one connection pushes {} MiB and half-closes, the sink reads to EOF and closes; time from connect to the source seeing the close. Request/response: {} connections, {} in flight, each connect + {REQUEST} B request + {RESPONSE} B response + close; latency from connect to the last response byte. CPU time from getrusage (RUSAGE_THREAD for the proxy thread, RUSAGE_SELF for the process). Cases interleaved within each run; medians over {} runs after one warm-up run each.",
            opts.bulk_mib, opts.connections, opts.concurrency, opts.runs
        ),
        placement,
        bulk_mib: opts.bulk_mib,
        runs: opts.runs,
        connections: opts.connections,
        concurrency: opts.concurrency,
        request_bytes: REQUEST,
        response_bytes: RESPONSE,
        default_kind: RelayKind::default().to_string(),
        loadavg_before,
        loadavg_after: loadavg(),
        cases,
        notes: NOTES.to_vec(),
    };
    let out_dir = opts
        .out_dir
        .clone()
        .unwrap_or_else(|| lb_tests::workspace_root().join("bench/results"));
    fs::create_dir_all(&out_dir)?;
    fs::write(
        out_dir.join("relay.json"),
        serde_json::to_string_pretty(&report)? + "\n",
    )?;
    let md = markdown(&report);
    fs::write(out_dir.join("relay.md"), &md)?;
    print!("{md}");
    println!(
        "\nwrote {} and relay.md",
        out_dir.join("relay.json").display()
    );
    Ok(())
}

/// Every sample of one case.
struct Samples {
    via: Via,
    unavailable: Option<String>,
    bulk: Vec<Sample>,
    rr: Vec<RrSample>,
}

fn selected(opts: &Options) -> anyhow::Result<Vec<Via>> {
    if opts.cases.is_empty() {
        return Ok(Via::ALL.to_vec());
    }
    opts.cases
        .iter()
        .map(|name| {
            Via::ALL
                .into_iter()
                .find(|v| v.name() == name)
                .with_context(|| format!("unknown case {name:?}"))
        })
        .collect()
}

async fn measure(opts: &Options, proxy_cpu: Option<usize>) -> anyhow::Result<Vec<Case>> {
    let bytes = opts.bulk_mib << 20;
    let mut all: Vec<Samples> = selected(opts)?
        .into_iter()
        .map(|via| Samples {
            via,
            unavailable: None,
            bulk: Vec::new(),
            rr: Vec::new(),
        })
        .collect();
    // Warm-up, and find out which cases can run at all.
    for s in &mut all {
        match bulk_once(s.via, bytes.min(256 << 20), proxy_cpu).await {
            Ok(_) => {
                rr_once(
                    s.via,
                    opts.connections.min(200),
                    opts.concurrency,
                    proxy_cpu,
                )
                .await?;
            }
            Err(e) if s.via == Via::Uring => {
                eprintln!("{}: {e:#}", s.via.name());
                s.unavailable = Some(format!("{e:#}"));
            }
            Err(e) => return Err(e),
        }
    }
    for run in 0..opts.runs {
        for s in all.iter_mut().filter(|s| s.unavailable.is_none()) {
            let b = bulk_once(s.via, bytes, proxy_cpu).await?;
            eprintln!(
                "run {run} bulk {:>18}: {:6.2} Gbit/s, proxy CPU {:.3} s",
                s.via.name(),
                gbit_s(bytes, b.seconds),
                b.proxy_cpu
            );
            s.bulk.push(b);
        }
        for s in all.iter_mut().filter(|s| s.unavailable.is_none()) {
            let r = rr_once(s.via, opts.connections, opts.concurrency, proxy_cpu).await?;
            #[allow(clippy::cast_precision_loss)]
            let rate = opts.connections as f64 / r.seconds;
            eprintln!(
                "run {run} rr   {:>18}: {rate:8.0} conn/s, {} failures",
                s.via.name(),
                r.failures
            );
            s.rr.push(r);
        }
    }
    Ok(all
        .into_iter()
        .map(|s| summarise(s, bytes, opts.connections))
        .collect())
}

fn summarise(mut s: Samples, bytes: u64, connections: usize) -> Case {
    #[allow(clippy::cast_precision_loss)]
    let gib = bytes as f64 / f64::from(1u32 << 30);
    #[allow(clippy::cast_precision_loss)]
    let conns = connections as f64;
    let (via, what) = (s.via.name(), s.via.describe());
    if let Some(why) = s.unavailable {
        return Case {
            via,
            what,
            bulk: None,
            request_response: None,
            unavailable: Some(why),
        };
    }
    let med = |f: &dyn Fn(&Sample) -> f64| median(&s.bulk.iter().map(f).collect::<Vec<_>>());
    let gbit_s_runs: Vec<f64> = s.bulk.iter().map(|b| gbit_s(bytes, b.seconds)).collect();
    let bulk = BulkResult {
        gbit_s: median(&gbit_s_runs),
        gbit_s_runs,
        proxy_cpu_s_per_gib: med(&|b| b.proxy_cpu / gib),
        proxy_cpu_utilisation: med(&|b| b.proxy_cpu / b.seconds),
        process_cpu_s_per_gib: med(&|b| b.process_cpu / gib),
    };
    let r = &mut s.rr;
    let connections_per_s_runs: Vec<f64> = r.iter().map(|x| conns / x.seconds).collect();
    let p50: Vec<f64> = r
        .iter_mut()
        .map(|x| percentile(&mut x.latencies_us, 50))
        .collect();
    let p99: Vec<f64> = r
        .iter_mut()
        .map(|x| percentile(&mut x.latencies_us, 99))
        .collect();
    let per_conn = |f: &dyn Fn(&RrSample) -> f64| {
        median(&r.iter().map(|x| f(x) / conns * 1e6).collect::<Vec<_>>())
    };
    let request_response = RrResult {
        connections_per_s: median(&connections_per_s_runs),
        connections_per_s_runs,
        p50_us: median(&p50),
        p99_us: median(&p99),
        proxy_cpu_us_per_conn: per_conn(&|x| x.proxy_cpu),
        process_cpu_us_per_conn: per_conn(&|x| x.process_cpu),
        failures: r.iter().map(|x| x.failures).sum(),
    };
    Case {
        via,
        what,
        bulk: Some(bulk),
        request_response: Some(request_response),
        unavailable: None,
    }
}

fn gbit_s(bytes: u64, seconds: f64) -> f64 {
    #[allow(clippy::cast_precision_loss)]
    let bits = bytes as f64 * 8.0;
    bits / seconds / 1e9
}

fn ratio(a: f64, b: f64) -> String {
    if b.is_finite() && b != 0.0 && a.is_finite() {
        format!("{:.2}×", a / b)
    } else {
        String::new()
    }
}

fn markdown(r: &Report) -> String {
    use std::fmt::Write;
    let mut s = format!(
        "TCP proxy relay on loopback, medians of {} runs ({}, {}, kernel {})\n\n",
        r.runs, r.date, r.machine, r.kernel
    );
    let _ = writeln!(
        s,
        "Method: {}\n\nPlacement: {}. Load average before/after: {} / {}.\n",
        r.method, r.placement, r.loadavg_before, r.loadavg_after
    );
    let find = |name: &str| r.cases.iter().find(|c| c.via == name);
    let bulk_of = |name: &str| find(name).and_then(|c| c.bulk.as_ref());
    let rr_of = |name: &str| find(name).and_then(|c| c.request_response.as_ref());
    let (d_bulk, d_rr) = (bulk_of("direct"), rr_of("direct"));
    s += "| via | bulk Gbit/s | × direct | proxy CPU s/GiB | proxy CPU busy | process CPU s/GiB | conn/s | × direct | p50 µs | p99 µs | proxy CPU µs/conn |\n";
    s += "|---|---|---|---|---|---|---|---|---|---|---|\n";
    for c in &r.cases {
        if let (Some(b), Some(q)) = (&c.bulk, &c.request_response) {
            let _ = writeln!(
                s,
                "| {} | {:.1} | {} | {:.3} | {:.0} % | {:.3} | {:.0} | {} | {:.0} | {:.0} | {:.1} |",
                c.via,
                b.gbit_s,
                ratio(b.gbit_s, d_bulk.map_or(f64::NAN, |d| d.gbit_s)),
                b.proxy_cpu_s_per_gib,
                b.proxy_cpu_utilisation * 100.0,
                b.process_cpu_s_per_gib,
                q.connections_per_s,
                ratio(
                    q.connections_per_s,
                    d_rr.map_or(f64::NAN, |d| d.connections_per_s)
                ),
                q.p50_us,
                q.p99_us,
                q.proxy_cpu_us_per_conn,
            );
        } else {
            let _ = writeln!(
                s,
                "| {} | unavailable: {} | | | | | | | | | |",
                c.via,
                c.unavailable.as_deref().unwrap_or("?")
            );
        }
    }
    if let (Some(cb), Some(cq)) = (bulk_of("copy"), rr_of("copy")) {
        s += "\nBetween kinds, relative to `copy` (the relay's read/write loop):\n\n";
        s += "| via | bulk Gbit/s | proxy CPU per GiB | conn/s | proxy CPU per conn | p99 |\n";
        s += "|---|---|---|---|---|---|\n";
        for c in r
            .cases
            .iter()
            .filter(|c| c.via != "direct" && c.via != "copy")
        {
            if let (Some(b), Some(q)) = (&c.bulk, &c.request_response) {
                let _ = writeln!(
                    s,
                    "| {} | {} | {} | {} | {} | {} |",
                    c.via,
                    ratio(b.gbit_s, cb.gbit_s),
                    ratio(b.proxy_cpu_s_per_gib, cb.proxy_cpu_s_per_gib),
                    ratio(q.connections_per_s, cq.connections_per_s),
                    ratio(q.proxy_cpu_us_per_conn, cq.proxy_cpu_us_per_conn),
                    ratio(q.p99_us, cq.p99_us),
                );
            }
        }
    }
    s += "\nCases:\n";
    for c in &r.cases {
        let _ = writeln!(s, "- {}: {}", c.via, c.what);
    }
    s += "\nNotes:\n";
    for n in &r.notes {
        let _ = writeln!(s, "- {n}");
    }
    let _ = writeln!(
        s,
        "\nDefault relay (`RelayKind::default()`): **{}**.",
        r.default_kind
    );
    s += &decision(r);
    s
}

/// The decision paragraph, with this run's figures.
fn decision(r: &Report) -> String {
    use std::fmt::Write;
    let find = |name: &str| r.cases.iter().find(|c| c.via == name);
    let bulk_of = |name: &str| find(name).and_then(|c| c.bulk.as_ref());
    let rr_of = |name: &str| find(name).and_then(|c| c.request_response.as_ref());
    let mut s = String::new();
    if let (Some(cb), Some(sb), Some(cq), Some(sq)) = (
        bulk_of("copy"),
        bulk_of("splice"),
        rr_of("copy"),
        rr_of("splice"),
    ) {
        let _ = write!(
            s,
            "\nDecision: splice against copy moves a GiB with {} the proxy CPU ({:.3} vs {:.3} s) at {} the throughput, \
             and short connections run at {} the rate with {} the p99, for {} the proxy CPU per connection (they stay \
             in splice's copy phase and never create a pipe). Both relays are this project's code in safe Rust over tokio readiness (splice through nix, \
             a syscall stable since Linux 2.6.17); copy stays as the fallback of a direction whose pipe cannot be created \
             and as a setting.",
            ratio(sb.proxy_cpu_s_per_gib, cb.proxy_cpu_s_per_gib),
            sb.proxy_cpu_s_per_gib,
            cb.proxy_cpu_s_per_gib,
            ratio(sb.gbit_s, cb.gbit_s),
            ratio(sq.connections_per_s, cq.connections_per_s),
            ratio(sq.p99_us, cq.p99_us),
            ratio(sq.proxy_cpu_us_per_conn, cq.proxy_cpu_us_per_conn),
        );
        if let Some(ub) = bulk_of("tokio-uring") {
            let _ = write!(
                s,
                " tokio-uring is not used: {} copy's proxy CPU per GiB here, its own runtime beside the daemon's, \
                 and no maintainer.",
                ratio(ub.proxy_cpu_s_per_gib, cb.proxy_cpu_s_per_gib)
            );
        }
        if let Some(tb) = bulk_of("copy_bidirectional") {
            let _ = write!(
                s,
                " `copy_bidirectional` alone has no idle timeout or live counters and, with its 8 KiB buffers, \
                 {} copy's proxy CPU per GiB.",
                ratio(tb.proxy_cpu_s_per_gib, cb.proxy_cpu_s_per_gib)
            );
        }
        s.push('\n');
    }
    s
}
