//! `lb-daemon` in a namespace: config file, bpffs pin directory, start, reload, metrics, stop.
//!
//! The pin directory is a private bpffs mount under `/run/lb-tests/`, not `/sys/fs/bpf`: `ip netns
//! exec` gives the command a fresh sysfs on `/sys` (for the namespace's `/sys/class/net`), so
//! `/sys/fs/bpf` is not bpffs in there (this host has no bpffs mounted there either). A mount under
//! `/run` is seen by the daemon (mounts propagate into `ip netns exec`'s mount namespace) and by the
//! test, and survives daemon restarts as long as the [`PinDir`] lives.

use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use nix::sys::signal::Signal;
use serde::Serialize;
use tempfile::TempDir;

use crate::client::http_get;
use crate::cmd::{run, run_quiet};
use crate::lab::{Lab, Ns, Output, Proc};

/// The daemon's reload counters (Prometheus series).
pub const RELOADS_OK: &str = "lb_config_reloads_total{result=\"ok\"}";
pub const RELOADS_ERROR: &str = "lb_config_reloads_total{result=\"error\"}";

/// Where [`PinDir`] mounts its bpffs instances.
pub const PIN_ROOT: &str = "/run/lb-tests";

/// The daemon configuration (the schema of `deploy/lb.example.toml`).
#[derive(Clone, Debug, Serialize)]
pub struct Config {
    pub daemon: DaemonSection,
    /// `[proxy]` (left out when `None`: the daemon's defaults).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub proxy: Option<ProxySection>,
    pub engines: Vec<EngineEntry>,
    pub virtual_services: Vec<VirtualService>,
    /// `[[pools]]` (left out when empty).
    #[serde(skip_serializing_if = "Vec::is_empty")]
    pub pools: Vec<Pool>,
    /// `[bgp]` as written (left out when `None`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bgp: Option<toml::Value>,
    /// `[peers]` as written (left out when `None`).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub peers: Option<toml::Value>,
}

#[derive(Clone, Debug, Serialize)]
pub struct DaemonSection {
    pub interface: String,
    pub engine_id: u8,
    pub xdp_mode: String,
    pub pin_dir: PathBuf,
    pub metrics_listen: SocketAddr,
    pub max_virtual_services: u32,
    pub conn_table_size: u32,
    pub persist_table_size: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tunnel_source_v4: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub tunnel_source_v6: Option<String>,
    #[serde(skip_serializing_if = "std::ops::Not::not")]
    pub manage_vip_addresses: bool,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state_dir: Option<PathBuf>,
}

impl DaemonSection {
    /// Lab defaults: native XDP on `interface`, metrics on `127.0.0.1:9100` (each namespace has
    /// its own loopback), small tables.
    pub fn lab(interface: &str, engine_id: u8, pin_dir: &Path) -> Self {
        Self {
            interface: interface.to_owned(),
            engine_id,
            xdp_mode: "native".to_owned(),
            pin_dir: pin_dir.to_owned(),
            metrics_listen: SocketAddr::from(([127, 0, 0, 1], 9100)),
            max_virtual_services: 4,
            conn_table_size: 65536,
            persist_table_size: 4096,
            tunnel_source_v4: None,
            tunnel_source_v6: None,
            manage_vip_addresses: false,
            state_dir: None,
        }
    }
}

#[derive(Clone, Debug, Default, Serialize)]
pub struct EngineEntry {
    pub id: u8,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mac: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mode: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub state: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub interface: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_v4: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub address_v6: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub mtu: Option<u16>,
}

#[derive(Clone, Debug, Serialize)]
pub struct VirtualService {
    pub id: u32,
    pub name: String,
    pub vip: String,
    pub port: u16,
    pub protocol: String,
    pub primary: u8,
    pub persistence_timeout_s: u32,
    pub engines: Vec<Member>,
    /// The pool the engines' proxies connect to (`None`: steering only).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub pool: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_connections: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub draining: Option<bool>,
    /// The service's `bgp` section (announced by BGP), as written.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub bgp: Option<toml::Value>,
}

/// `[proxy]`: every field optional (`None` leaves the daemon's default).
#[derive(Clone, Debug, Default, Serialize)]
pub struct ProxySection {
    #[serde(skip_serializing_if = "Option::is_none")]
    pub source_v4: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub connect_timeout_ms: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub idle_timeout_s: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub udp_idle_timeout_s: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub drain_timeout_s: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_open_files: Option<u64>,
}

/// `[controller]` (managed mode).
#[derive(Clone, Debug, Serialize)]
pub struct ControllerSection {
    pub address: String,
    pub name: String,
    pub tls_dir: PathBuf,
    pub state_file: PathBuf,
    pub heartbeat_interval_ms: u32,
    #[serde(skip_serializing_if = "std::collections::BTreeMap::is_empty")]
    pub tags: std::collections::BTreeMap<String, String>,
    /// The engine group it registers in (left out: the default group).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
}

/// `[[pools]]`.
#[derive(Clone, Debug, Serialize)]
pub struct Pool {
    pub name: String,
    /// `round_robin`, `weighted_round_robin`, `least_connections`, `consistent_hash`.
    pub algorithm: String,
    pub backends: Vec<Backend>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub health_check: Option<HealthCheck>,
}

/// One backend of a pool.
#[derive(Clone, Debug, Serialize)]
pub struct Backend {
    pub address: String,
    pub port: u16,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub weight: Option<u32>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub enabled: Option<bool>,
}

impl Backend {
    pub fn new(address: &str, port: u16) -> Self {
        Self {
            address: address.to_owned(),
            port,
            weight: None,
            enabled: None,
        }
    }
}

/// `[pools.health_check]`.
#[derive(Clone, Debug, Serialize)]
pub struct HealthCheck {
    /// `tcp` or `http`.
    pub kind: String,
    pub interval_ms: u32,
    pub timeout_ms: u32,
    pub rise: u32,
    pub fall: u32,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub http_path: Option<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    pub expected_status: Option<u16>,
}

#[derive(Clone, Copy, Debug, Serialize)]
pub struct Member {
    pub id: u8,
    pub weight: u32,
}

impl Config {
    pub fn to_toml(&self) -> Result<String> {
        Ok(toml::to_string(self)?)
    }
}

/// A private bpffs mount (`/run/lb-tests/<label>`), unmounted and removed on drop. Pinned maps live
/// as long as the mount, so share it (`Arc`) between daemon restarts.
#[derive(Debug)]
pub struct PinDir {
    path: PathBuf,
    /// The daemon's `state_dir` (saved roles): a host's files that outlive its daemon, like its pins.
    state: tempfile::TempDir,
}

impl PinDir {
    /// `label`: unique, e.g. `<lab base>-se1`.
    pub fn new(label: &str) -> Result<Self> {
        let path = Path::new(PIN_ROOT).join(label);
        std::fs::create_dir_all(&path).with_context(|| format!("mkdir {}", path.display()))?;
        let p = path.to_str().context("non-UTF-8 pin path")?;
        if let Err(e) = run(&["mount", "-t", "bpf", "bpf", p]) {
            let _ = std::fs::remove_dir(&path);
            return Err(e);
        }
        let state = tempfile::Builder::new()
            .prefix(&format!("lb-state-{label}-"))
            .tempdir()?;
        Ok(Self { path, state })
    }

    pub fn path(&self) -> &Path {
        &self.path
    }

    pub fn state_dir(&self) -> &Path {
        self.state.path()
    }
}

impl Drop for PinDir {
    fn drop(&mut self) {
        if let Some(p) = self.path.to_str() {
            run_quiet(&["umount", "-l", p]);
            run_quiet(&["rm", "-rf", p]);
        }
    }
}

/// A running `lb-daemon`. Drop sends SIGTERM, waits up to 10 s, then kills.
pub struct Daemon {
    ns: Ns,
    proc: Proc,
    config: Config,
    // Field order: the directory with config and log outlives the process handle; the pin
    // directory is dropped last.
    dir: TempDir,
    pins: Arc<PinDir>,
}

impl std::fmt::Debug for Daemon {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Daemon")
            .field("ns", &self.ns)
            .field("pid", &self.proc.pid())
            .field("dir", &self.dir.path())
            .finish_non_exhaustive()
    }
}

/// How long [`Daemon::start`] waits for metrics and the XDP attachment.
pub const START_TIMEOUT: Duration = Duration::from_secs(30);

impl Daemon {
    /// Writes `config` (its `pin_dir` is replaced by `pins`), starts
    /// `ip netns exec <ns> <bin> --config FILE --bpf-object <object>` and waits until its metrics
    /// endpoint answers and `daemon.interface` shows an XDP program.
    pub fn start(
        lab: &Lab,
        ns: &Ns,
        mut config: Config,
        pins: Arc<PinDir>,
        bin: &Path,
        object: &Path,
    ) -> Result<Self> {
        if !bin.exists() {
            bail!(
                "daemon binary {} not found (build it: cargo build -p lb-daemon; or set LB_DAEMON_BIN)",
                bin.display()
            );
        }
        if !object.exists() {
            bail!(
                "XDP object {} not found (build it, see lb-ebpf/README.md; or set LB_XDP_OBJECT)",
                object.display()
            );
        }
        pins.path().clone_into(&mut config.daemon.pin_dir);
        config.daemon.state_dir = Some(pins.state_dir().to_owned());
        let dir = tempfile::Builder::new()
            .prefix(&format!("lb-daemon-{}-", config.daemon.engine_id))
            .tempdir()?;
        let conf_path = dir.path().join("lb.toml");
        std::fs::write(&conf_path, config.to_toml()?)?;
        let conf_s = conf_path.to_str().context("non-UTF-8 path")?;
        let bin_s = bin.to_str().context("non-UTF-8 path")?;
        let obj_s = object.to_str().context("non-UTF-8 path")?;
        let proc = lab.spawn(
            ns,
            &[bin_s, "--config", conf_s, "--bpf-object", obj_s],
            &Output::File(dir.path().join("daemon.log")),
        )?;
        let daemon = Self {
            ns: ns.clone(),
            proc,
            config,
            dir,
            pins,
        };
        daemon
            .wait_ready(START_TIMEOUT)
            .with_context(|| format!("lb-daemon in {ns}; log:\n{}", daemon.log_tail(30)))?;
        Ok(daemon)
    }

    fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.proc.try_wait()? {
                bail!("exited during start-up ({status})");
            }
            // Connect only once the endpoint listens: a connection refused would be answered with
            // a reset, and tests count the engine's resets.
            let port = self.config.daemon.metrics_listen.port().to_string();
            let listening = run(&[
                "ip",
                "netns",
                "exec",
                self.ns.name(),
                "ss",
                "-Hltn",
                "sport",
                "=",
                &format!(":{port}"),
            ])?;
            if listening.trim().is_empty() {
                if Instant::now() >= deadline {
                    bail!("not ready after {timeout:?}: metrics endpoint not listening");
                }
                std::thread::sleep(Duration::from_millis(50));
                continue;
            }
            let last_err = match self.metrics() {
                Ok(_) => {
                    let link = run(&[
                        "ip",
                        "-n",
                        self.ns.name(),
                        "link",
                        "show",
                        "dev",
                        &self.config.daemon.interface,
                    ])?;
                    if link.contains(" xdp") {
                        return Ok(());
                    }
                    format!("metrics up but no XDP on the interface: {link}")
                }
                Err(e) => format!("{e:#}"),
            };
            if Instant::now() >= deadline {
                bail!("not ready after {timeout:?}: {last_err}");
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Starts `lb-daemon` in managed mode: a file with `daemon` (its `pin_dir` replaced by `pins`)
    /// and `[controller]` only; waits like [`Daemon::start`]. `wrapper`: a command that runs
    /// first and `exec`s the daemon's argv it is given (empty: none).
    #[allow(clippy::too_many_arguments)]
    pub fn start_managed(
        lab: &Lab,
        ns: &Ns,
        mut daemon: DaemonSection,
        controller: &ControllerSection,
        pins: Arc<PinDir>,
        bin: &Path,
        object: &Path,
        wrapper: &[String],
    ) -> Result<Self> {
        #[derive(Serialize)]
        struct File<'a> {
            daemon: &'a DaemonSection,
            controller: &'a ControllerSection,
        }
        pins.path().clone_into(&mut daemon.pin_dir);
        daemon.state_dir = Some(pins.state_dir().to_owned());
        let dir = tempfile::Builder::new()
            .prefix(&format!("lb-daemon-m{}-", daemon.engine_id))
            .tempdir()?;
        let conf_path = dir.path().join("lb.toml");
        std::fs::write(
            &conf_path,
            toml::to_string(&File {
                daemon: &daemon,
                controller,
            })?,
        )?;
        let conf_s = conf_path.to_str().context("non-UTF-8 path")?;
        let mut argv: Vec<&str> = wrapper.iter().map(String::as_str).collect();
        argv.extend([
            bin.to_str().context("non-UTF-8 path")?,
            "--config",
            conf_s,
            "--bpf-object",
            object.to_str().context("non-UTF-8 path")?,
        ]);
        let proc = lab.spawn(ns, &argv, &Output::File(dir.path().join("daemon.log")))?;
        let d = Self {
            ns: ns.clone(),
            proc,
            config: Config {
                bgp: None,
                peers: None,
                daemon,
                proxy: None,
                engines: Vec::new(),
                virtual_services: Vec::new(),
                pools: Vec::new(),
            },
            dir,
            pins,
        };
        d.wait_ready(START_TIMEOUT)
            .with_context(|| format!("managed lb-daemon in {ns}; log:\n{}", d.log_tail(30)))?;
        Ok(d)
    }

    /// Starts the daemon of the engine host `host` (namespace `ns`) on a fresh pin directory named
    /// after the lab and the host, with the configuration `config_for` gives for that directory.
    pub fn start_fresh(
        lab: &Lab,
        ns: &Ns,
        host: &str,
        config_for: impl FnOnce(&Path) -> Config,
        bin: &Path,
        object: &Path,
    ) -> Result<Self> {
        let pins = Arc::new(PinDir::new(&format!("{}-{host}", lab.base()))?);
        let config = config_for(pins.path());
        Daemon::start(lab, ns, config, pins, bin, object)
    }

    pub fn ns(&self) -> &Ns {
        &self.ns
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    pub fn config(&self) -> &Config {
        &self.config
    }

    pub fn pins(&self) -> &Arc<PinDir> {
        &self.pins
    }

    pub fn log_path(&self) -> PathBuf {
        self.dir.path().join("daemon.log")
    }

    /// The last `n` lines of the daemon's stdout/stderr.
    pub fn log_tail(&self, n: usize) -> String {
        let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(n)..].join("\n")
    }

    /// The text of `GET /metrics` (fetched inside the daemon's namespace).
    pub fn metrics(&self) -> Result<String> {
        let (status, body) = http_get(
            &self.ns,
            self.config.daemon.metrics_listen,
            "/metrics",
            Duration::from_secs(2),
        )?;
        if status != 200 {
            bail!("GET /metrics: HTTP {status}");
        }
        Ok(body)
    }

    /// Rewrites the config file with `config` (pin dir kept), sends SIGHUP and waits (up to 10 s)
    /// until the daemon counts the reload: `lb_config_reloads_total{result="ok"}` grows. A growing
    /// `result="error"` series, an exit or no reload at all is an error (with the log's tail).
    pub fn reload(&mut self, mut config: Config) -> Result<()> {
        self.pins.path().clone_into(&mut config.daemon.pin_dir);
        config.daemon.state_dir = Some(self.pins.state_dir().to_owned());
        match self.send_reload(&config)? {
            ReloadOutcome::Applied => {
                self.config = config;
                Ok(())
            }
            ReloadOutcome::Refused => {
                bail!("lb-daemon rejected the reload; log:\n{}", self.log_tail(30))
            }
        }
    }

    /// Like [`Daemon::reload`], but expects the daemon to refuse `config`: succeeds when
    /// `lb_config_reloads_total{result="error"}` grows (and `result="ok"` does not) and returns the
    /// log lines the reload added. [`Daemon::config`] stays the configuration that runs.
    pub fn reload_refused(&mut self, mut config: Config) -> Result<String> {
        self.pins.path().clone_into(&mut config.daemon.pin_dir);
        config.daemon.state_dir = Some(self.pins.state_dir().to_owned());
        let before = std::fs::read_to_string(self.log_path())
            .unwrap_or_default()
            .len();
        match self.send_reload(&config)? {
            ReloadOutcome::Refused => {
                // The error line may follow the counter by a moment.
                std::thread::sleep(Duration::from_millis(100));
                let text = std::fs::read_to_string(self.log_path()).unwrap_or_default();
                Ok(text.get(before..).unwrap_or_default().to_owned())
            }
            ReloadOutcome::Applied => bail!(
                "lb-daemon applied a configuration it should have refused; log:\n{}",
                self.log_tail(30)
            ),
        }
    }

    /// Writes `config` to the daemon's file, sends SIGHUP and waits (up to 10 s) until one of the
    /// reload counters grows.
    fn send_reload(&self, config: &Config) -> Result<ReloadOutcome> {
        std::fs::write(self.dir.path().join("lb.toml"), config.to_toml()?)?;
        let counts = |text: &str| {
            (
                metric_value(text, RELOADS_OK).unwrap_or(0.0),
                metric_value(text, RELOADS_ERROR).unwrap_or(0.0),
            )
        };
        let (ok_before, err_before) = counts(&self.metrics()?);
        self.proc.signal(Signal::SIGHUP)?;
        let deadline = Instant::now() + Duration::from_secs(10);
        while Instant::now() < deadline {
            if let Some(status) = self.proc.try_wait()? {
                bail!(
                    "lb-daemon exited on reload ({status}); log:\n{}",
                    self.log_tail(30)
                );
            }
            if let Ok(text) = self.metrics() {
                let (ok, err) = counts(&text);
                if err > err_before {
                    return Ok(ReloadOutcome::Refused);
                }
                if ok > ok_before {
                    return Ok(ReloadOutcome::Applied);
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "no reload counted ({RELOADS_OK} or {RELOADS_ERROR}) within 10 s of SIGHUP; log:\n{}",
            self.log_tail(30)
        )
    }

    /// `GET /connections[?query]` on the metrics listener: (status, body).
    pub fn connections(&self, query: &str) -> Result<(u16, String)> {
        let path = if query.is_empty() {
            "/connections".to_owned()
        } else {
            format!("/connections?{query}")
        };
        http_get(
            &self.ns,
            self.config.daemon.metrics_listen,
            &path,
            Duration::from_secs(2),
        )
    }

    /// SIGTERM, wait up to `grace`; `Some(status)` if it exited by itself, `None` if killed.
    pub fn stop(&self, grace: Duration) -> Option<std::process::ExitStatus> {
        self.proc.stop(grace)
    }
}

/// What the daemon did with a reload.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
enum ReloadOutcome {
    Applied,
    Refused,
}

/// How a daemon run that was expected to fail ended.
#[derive(Debug)]
pub struct FailedStart {
    pub status: std::process::ExitStatus,
    /// Everything it wrote to stdout and stderr.
    pub log: String,
}

/// Starts `lb-daemon` in `ns` with `config` (its `pin_dir` replaced by `pins`) and waits up to
/// `timeout` for it to exit, which it is expected to do (a configuration it must refuse). An error
/// if it is still running then (it is killed) or exits successfully.
pub fn start_expecting_failure(
    lab: &Lab,
    ns: &Ns,
    mut config: Config,
    pins: &PinDir,
    bin: &Path,
    object: &Path,
    timeout: Duration,
) -> Result<FailedStart> {
    pins.path().clone_into(&mut config.daemon.pin_dir);
    config.daemon.state_dir = Some(pins.state_dir().to_owned());
    let dir = tempfile::Builder::new()
        .prefix(&format!("lb-daemon-bad-{}-", config.daemon.engine_id))
        .tempdir()?;
    let conf_path = dir.path().join("lb.toml");
    std::fs::write(&conf_path, config.to_toml()?)?;
    let log_path = dir.path().join("daemon.log");
    let conf_s = conf_path.to_str().context("non-UTF-8 path")?;
    let bin_s = bin.to_str().context("non-UTF-8 path")?;
    let obj_s = object.to_str().context("non-UTF-8 path")?;
    let proc = lab.spawn(
        ns,
        &[bin_s, "--config", conf_s, "--bpf-object", obj_s],
        &Output::File(log_path.clone()),
    )?;
    let status = proc.wait_timeout(timeout)?;
    let log = std::fs::read_to_string(&log_path).unwrap_or_default();
    let Some(status) = status else {
        proc.stop(Duration::from_secs(5));
        bail!("lb-daemon still runs {timeout:?} after start with a bad configuration; log:\n{log}");
    };
    if status.success() {
        bail!("lb-daemon exited successfully with a bad configuration; log:\n{log}");
    }
    Ok(FailedStart { status, log })
}

impl Drop for Daemon {
    fn drop(&mut self) {
        self.proc.stop(Duration::from_secs(10));
    }
}

/// Lines of Prometheus text starting with `prefix` (e.g. `lb_`), comments left out.
pub fn metric_lines<'a>(text: &'a str, prefix: &str) -> Vec<&'a str> {
    text.lines().filter(|l| l.starts_with(prefix)).collect()
}

/// The value of the first sample whose name-and-labels part equals `series`
/// (e.g. `lb_packets_total{reason="tx_l2"}`).
pub fn metric_value(text: &str, series: &str) -> Option<f64> {
    text.lines().find_map(|l| {
        let (k, v) = l.rsplit_once(' ')?;
        (k == series).then(|| v.parse().ok())?
    })
}

/// The sum of every sample of metric `name` (any labels) whose labels include all of `labels`
/// (`[("pool", "web")]`); 0 when there is none.
pub fn metric_sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (n, label_text) = match series.split_once('{') {
                Some((n, rest)) => (n, rest.strip_suffix('}')?),
                None => (series, ""),
            };
            if n != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| label_text.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok())?
        })
        .sum()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_serializes_to_the_schema() {
        let cfg = Config {
            bgp: None,
            peers: None,
            daemon: DaemonSection::lab("eth0", 1, Path::new("/run/lb-tests/x")),
            engines: vec![
                EngineEntry {
                    id: 1,
                    ..EngineEntry::default()
                },
                EngineEntry {
                    id: 2,
                    mac: Some("02:00:0a:4d:00:0c".into()),
                    ..EngineEntry::default()
                },
            ],
            virtual_services: vec![VirtualService {
                bgp: None,
                id: 0,
                name: "web".into(),
                vip: "10.78.0.10".into(),
                port: 80,
                protocol: "tcp".into(),
                primary: 1,
                persistence_timeout_s: 0,
                engines: vec![Member { id: 1, weight: 1 }, Member { id: 2, weight: 2 }],
                pool: Some("web".into()),
                max_connections: None,
                draining: None,
            }],
            proxy: Some(ProxySection {
                idle_timeout_s: Some(2),
                ..ProxySection::default()
            }),
            pools: vec![Pool {
                name: "web".into(),
                algorithm: "round_robin".into(),
                backends: vec![Backend::new("10.77.0.21", 80)],
                health_check: Some(HealthCheck {
                    kind: "tcp".into(),
                    interval_ms: 200,
                    timeout_ms: 150,
                    rise: 2,
                    fall: 2,
                    http_path: None,
                    expected_status: None,
                }),
            }],
        };
        let text = cfg.to_toml().unwrap();
        let back: toml::Value = toml::from_str(&text).unwrap();
        assert_eq!(back["daemon"]["interface"].as_str(), Some("eth0"));
        assert_eq!(
            back["daemon"]["metrics_listen"].as_str(),
            Some("127.0.0.1:9100")
        );
        assert_eq!(
            back["engines"][1]["mac"].as_str(),
            Some("02:00:0a:4d:00:0c")
        );
        assert!(back["engines"][0].get("mac").is_none());
        assert_eq!(
            back["virtual_services"][0]["engines"][1]["weight"].as_integer(),
            Some(2)
        );
        assert_eq!(back["virtual_services"][0]["pool"].as_str(), Some("web"));
        assert!(back["virtual_services"][0].get("draining").is_none());
        assert_eq!(back["proxy"]["idle_timeout_s"].as_integer(), Some(2));
        assert!(back["proxy"].get("drain_timeout_s").is_none());
        assert_eq!(
            back["pools"][0]["backends"][0]["port"].as_integer(),
            Some(80)
        );
        assert_eq!(
            back["pools"][0]["health_check"]["kind"].as_str(),
            Some("tcp")
        );
    }

    #[test]
    fn metric_parsing() {
        let text = "# HELP x y\nlb_packets_total{reason=\"tx_l2\"} 12\nother 1\n";
        assert_eq!(metric_lines(text, "lb_").len(), 1);
        assert_eq!(
            metric_value(text, "lb_packets_total{reason=\"tx_l2\"}"),
            Some(12.0)
        );
        let text = "lb_up{pool=\"web\",backend=\"10.0.0.1:80\"} 1\n\
                    lb_up{pool=\"web\",backend=\"10.0.0.2:80\"} 0\n\
                    lb_up{pool=\"db\",backend=\"10.0.0.3:80\"} 1\n\
                    lb_up_total 7\nlb_n 3\n";
        assert!((metric_sum(text, "lb_up", &[]) - 2.0).abs() < f64::EPSILON);
        assert!((metric_sum(text, "lb_up", &[("pool", "web")]) - 1.0).abs() < f64::EPSILON);
        assert!(metric_sum(text, "lb_up", &[("backend", "10.0.0.2:80")]).abs() < f64::EPSILON);
        assert!((metric_sum(text, "lb_n", &[]) - 3.0).abs() < f64::EPSILON);
    }
}
