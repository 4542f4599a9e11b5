//! Load tools run inside a namespace, with bounded run times and parsed results: `wrk` (HTTP
//! requests/s, latency percentiles, socket errors) and `iperf3` (TCP and UDP throughput).
//!
//! Every command runs under `timeout`, so a hung tool can never stall a test or a benchmark.

use std::process::Output;
use std::time::Duration;

use anyhow::{Context, Result, bail, ensure};

use crate::cmd::output;
use crate::lab::Ns;

/// Extra seconds a tool gets beyond its own duration before `timeout` kills it.
const GRACE_S: u64 = 20;

/// Runs `argv` in `ns` under `timeout -k 2 <limit>` and returns what it did.
fn run_bounded(ns: &Ns, limit: Duration, argv: &[&str]) -> Result<Output> {
    let limit_s = format!("{}", limit.as_secs().max(1));
    let mut full = vec![
        "ip",
        "netns",
        "exec",
        ns.name(),
        "timeout",
        "-k",
        "2",
        limit_s.as_str(),
    ];
    full.extend_from_slice(argv);
    output(&full)
}

/// A `wrk` run.
#[derive(Clone, Debug)]
pub struct Wrk {
    pub url: String,
    pub threads: u32,
    pub connections: u32,
    pub duration: Duration,
    /// Send `Connection: close` (one request per connection).
    pub close: bool,
    /// wrk's per-request timeout.
    pub timeout: Duration,
}

impl Wrk {
    /// Keep-alive, 2 threads, 50 connections, 3 s.
    pub fn new(url: &str) -> Self {
        Self {
            url: url.to_owned(),
            threads: 2,
            connections: 50,
            duration: Duration::from_secs(3),
            close: false,
            timeout: Duration::from_secs(2),
        }
    }

    /// Runs it in `ns` (bounded by its duration plus a grace period).
    pub fn run(&self, ns: &Ns) -> Result<WrkResult> {
        let t = format!("-t{}", self.threads);
        let c = format!("-c{}", self.connections);
        let d = format!("-d{}s", self.duration.as_secs().max(1));
        let timeout = format!("{}s", self.timeout.as_secs().max(1));
        let mut argv = vec![
            "wrk",
            t.as_str(),
            c.as_str(),
            d.as_str(),
            "--latency",
            "--timeout",
            timeout.as_str(),
        ];
        if self.close {
            argv.extend(["-H", "Connection: close"]);
        }
        argv.push(&self.url);
        let out = run_bounded(ns, self.duration + Duration::from_secs(GRACE_S), &argv)?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.success(),
            "`{}` in {ns} failed ({}): {}{}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout
        );
        parse_wrk(&stdout).with_context(|| format!("wrk output:\n{stdout}"))
    }
}

/// `wrk` run again and again (each run as given, at most `max_runs`) from a thread until
/// [`WrkLoop::finish`]: a load that can be stopped at a moment the test chooses.
pub struct WrkLoop {
    stop: std::sync::Arc<std::sync::atomic::AtomicBool>,
    thread: std::thread::JoinHandle<Result<(u64, u64)>>,
}

impl WrkLoop {
    pub fn start(ns: &Ns, wrk: Wrk, max_runs: usize) -> WrkLoop {
        let stop = std::sync::Arc::new(std::sync::atomic::AtomicBool::new(false));
        let flag = stop.clone();
        let ns = ns.clone();
        let thread = std::thread::spawn(move || -> Result<(u64, u64)> {
            let (mut requests, mut errors) = (0, 0);
            for _ in 0..max_runs {
                if flag.load(std::sync::atomic::Ordering::Relaxed) {
                    break;
                }
                let r = wrk.run(&ns)?;
                requests += r.requests;
                errors += r.errors();
            }
            Ok((requests, errors))
        });
        WrkLoop { stop, thread }
    }

    /// Stops after the run in progress: (requests, failed requests) of all runs.
    pub fn finish(self) -> Result<(u64, u64)> {
        self.stop.store(true, std::sync::atomic::Ordering::Relaxed);
        self.thread
            .join()
            .map_err(|_| anyhow::anyhow!("wrk loop thread panicked"))?
    }
}

/// wrk's socket error counts.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub struct SocketErrors {
    pub connect: u64,
    pub read: u64,
    pub write: u64,
    pub timeout: u64,
}

impl SocketErrors {
    pub fn total(&self) -> u64 {
        self.connect + self.read + self.write + self.timeout
    }
}

/// What `wrk --latency` printed.
#[derive(Clone, Debug, Default)]
pub struct WrkResult {
    pub requests: u64,
    pub requests_per_s: f64,
    /// 50th and 99th latency percentiles, in milliseconds.
    pub p50_ms: f64,
    pub p99_ms: f64,
    pub socket_errors: SocketErrors,
    /// "Non-2xx or 3xx responses".
    pub non_2xx: u64,
    /// The whole output.
    pub text: String,
}

impl WrkResult {
    /// Socket errors plus non-2xx/3xx responses.
    pub fn errors(&self) -> u64 {
        self.socket_errors.total() + self.non_2xx
    }
}

impl std::fmt::Display for WrkResult {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "{} requests, {:.0} req/s, p50 {:.2} ms, p99 {:.2} ms, socket errors {:?}, non-2xx {}",
            self.requests,
            self.requests_per_s,
            self.p50_ms,
            self.p99_ms,
            self.socket_errors,
            self.non_2xx
        )
    }
}

/// `1.23ms`, `456.00us`, `1.02s`, `2.00m` → milliseconds.
fn parse_duration_ms(s: &str) -> Option<f64> {
    let s = s.trim();
    let (num, factor) = if let Some(n) = s.strip_suffix("us") {
        (n, 0.001)
    } else if let Some(n) = s.strip_suffix("ms") {
        (n, 1.0)
    } else if let Some(n) = s.strip_suffix('s') {
        (n, 1000.0)
    } else if let Some(n) = s.strip_suffix('m') {
        (n, 60_000.0)
    } else if let Some(n) = s.strip_suffix('h') {
        (n, 3_600_000.0)
    } else {
        return None;
    };
    num.parse::<f64>().ok().map(|v| v * factor)
}

/// Parses the text `wrk --latency` prints.
pub fn parse_wrk(text: &str) -> Result<WrkResult> {
    let mut r = WrkResult {
        text: text.to_owned(),
        ..WrkResult::default()
    };
    let mut have_rps = false;
    let mut have_requests = false;
    for line in text.lines() {
        let l = line.trim();
        if let Some(v) = l.strip_prefix("Requests/sec:") {
            r.requests_per_s = v.trim().parse().context("Requests/sec")?;
            have_rps = true;
        } else if let Some(v) = l.strip_prefix("Socket errors:") {
            for part in v.split(',') {
                let mut kv = part.split_whitespace();
                let (Some(k), Some(n)) = (kv.next(), kv.next()) else {
                    bail!("bad socket error line {l:?}");
                };
                let n: u64 = n.parse().with_context(|| format!("in {l:?}"))?;
                match k {
                    "connect" => r.socket_errors.connect = n,
                    "read" => r.socket_errors.read = n,
                    "write" => r.socket_errors.write = n,
                    "timeout" => r.socket_errors.timeout = n,
                    _ => bail!("unknown socket error kind in {l:?}"),
                }
            }
        } else if let Some(v) = l.strip_prefix("Non-2xx or 3xx responses:") {
            r.non_2xx = v.trim().parse().context("Non-2xx")?;
        } else if l.contains(" requests in ") {
            r.requests = l
                .split_whitespace()
                .next()
                .and_then(|n| n.parse().ok())
                .with_context(|| format!("bad line {l:?}"))?;
            have_requests = true;
        } else if let Some(v) = l.strip_prefix("50%") {
            r.p50_ms = parse_duration_ms(v).with_context(|| format!("bad line {l:?}"))?;
        } else if let Some(v) = l.strip_prefix("99%") {
            r.p99_ms = parse_duration_ms(v).with_context(|| format!("bad line {l:?}"))?;
        }
    }
    ensure!(
        have_rps && have_requests,
        "no request count or Requests/sec in wrk's output"
    );
    Ok(r)
}

/// An `iperf3` client run (`-J`).
#[derive(Clone, Debug)]
pub struct Iperf {
    pub server: String,
    pub port: u16,
    pub duration: Duration,
    /// UDP at this rate (`-u -b RATE`, e.g. `50M`); `None`: TCP.
    pub udp_rate: Option<String>,
    /// Socket buffers of both ends (`-w`, e.g. `4M`); `None`: the system's default.
    pub window: Option<String>,
}

impl Iperf {
    /// TCP, 3 s.
    pub fn tcp(server: &str, port: u16) -> Self {
        Self {
            server: server.to_owned(),
            port,
            duration: Duration::from_secs(3),
            udp_rate: None,
            window: None,
        }
    }

    /// UDP at `rate`, 3 s.
    pub fn udp(server: &str, port: u16, rate: &str) -> Self {
        Self {
            udp_rate: Some(rate.to_owned()),
            ..Self::tcp(server, port)
        }
    }

    /// Runs it in `ns` (bounded by its duration plus a grace period).
    pub fn run(&self, ns: &Ns) -> Result<IperfResult> {
        let port = self.port.to_string();
        let t = self.duration.as_secs().max(1).to_string();
        let mut argv = vec![
            "iperf3",
            "-c",
            self.server.as_str(),
            "-p",
            port.as_str(),
            "-t",
            t.as_str(),
            "-J",
            "--connect-timeout",
            "3000",
        ];
        if let Some(rate) = &self.udp_rate {
            argv.extend(["-u", "-b", rate.as_str()]);
        }
        if let Some(w) = &self.window {
            argv.extend(["-w", w.as_str()]);
        }
        let out = run_bounded(ns, self.duration + Duration::from_secs(GRACE_S), &argv)?;
        let stdout = String::from_utf8_lossy(&out.stdout).into_owned();
        ensure!(
            out.status.success(),
            "`{}` in {ns} failed ({}): {} {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim(),
            stdout.chars().take(2000).collect::<String>()
        );
        parse_iperf(&stdout)
    }
}

/// What an iperf3 client reported.
#[derive(Clone, Copy, Debug, Default)]
pub struct IperfResult {
    pub sent_bits_per_s: f64,
    pub received_bits_per_s: f64,
    /// UDP: datagrams sent and lost (as the server counted them).
    pub udp_packets: Option<u64>,
    pub udp_lost: Option<u64>,
}

impl IperfResult {
    pub fn received_gbit_per_s(&self) -> f64 {
        self.received_bits_per_s / 1e9
    }

    /// UDP: datagrams the server received.
    pub fn udp_received(&self) -> Option<u64> {
        Some(self.udp_packets?.saturating_sub(self.udp_lost?))
    }
}

/// Parses `iperf3 -J` output.
pub fn parse_iperf(text: &str) -> Result<IperfResult> {
    let v: serde_json::Value = serde_json::from_str(text).context("iperf3 JSON")?;
    if let Some(e) = v.get("error").and_then(serde_json::Value::as_str) {
        bail!("iperf3: {e}");
    }
    let end = v.get("end").context("iperf3 JSON without `end`")?;
    let num = |sum: &str, key: &str| end.get(sum).and_then(|s| s.get(key));
    let f = |sum: &str, key: &str| num(sum, key).and_then(serde_json::Value::as_f64);
    let u = |sum: &str, key: &str| num(sum, key).and_then(serde_json::Value::as_u64);
    Ok(IperfResult {
        sent_bits_per_s: f("sum_sent", "bits_per_second").unwrap_or(0.0),
        received_bits_per_s: f("sum_received", "bits_per_second").unwrap_or(0.0),
        udp_packets: u("sum_received", "packets"),
        udp_lost: u("sum_received", "lost_packets"),
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    const WRK: &str = "Running 3s test @ http://10.78.0.10/
  2 threads and 50 connections
  Thread Stats   Avg      Stdev     Max   +/- Stdev
    Latency     1.10ms  523.22us  12.01ms   80.00%
    Req/Sec    22.10k     1.20k   25.00k    70.00%
  Latency Distribution
     50%  986.00us
     75%    1.30ms
     90%    1.70ms
     99%    2.90ms
  132000 requests in 3.00s, 20.01MB read
  Socket errors: connect 0, read 3, write 1, timeout 2
  Non-2xx or 3xx responses: 5
Requests/sec:  43999.12
Transfer/sec:      6.67MB
";

    #[test]
    fn parses_wrk() {
        let r = parse_wrk(WRK).unwrap();
        assert_eq!(r.requests, 132_000);
        assert!((r.requests_per_s - 43_999.12).abs() < 1e-6);
        assert!((r.p50_ms - 0.986).abs() < 1e-9);
        assert!((r.p99_ms - 2.9).abs() < 1e-9);
        assert_eq!(
            r.socket_errors,
            SocketErrors {
                connect: 0,
                read: 3,
                write: 1,
                timeout: 2
            }
        );
        assert_eq!(r.non_2xx, 5);
        assert_eq!(r.errors(), 11);
        let clean: String = WRK
            .lines()
            .filter(|l| !l.contains("errors") && !l.contains("Non-2xx"))
            .flat_map(|l| [l, "\n"])
            .collect();
        assert_eq!(parse_wrk(&clean).unwrap().errors(), 0);
        assert!(parse_wrk("unable to connect to 10.78.0.10:80").is_err());
        assert!((parse_duration_ms("1.02s").unwrap() - 1020.0).abs() < 1e-9);
    }

    #[test]
    fn parses_iperf() {
        let r = parse_iperf(
            r#"{"end":{"sum_sent":{"bits_per_second":2e9},
                "sum_received":{"bits_per_second":1.5e9,"packets":100,"lost_packets":4}}}"#,
        )
        .unwrap();
        assert!((r.received_gbit_per_s() - 1.5).abs() < 1e-9);
        assert_eq!(r.udp_received(), Some(96));
        assert!(parse_iperf(r#"{"error":"unable to connect"}"#).is_err());
    }
}
