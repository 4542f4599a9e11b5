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
    pub engines: Vec<EngineEntry>,
    pub virtual_services: Vec<VirtualService>,
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
        Ok(Self { path })
    }

    pub fn path(&self) -> &Path {
        &self.path
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
        std::fs::write(self.dir.path().join("lb.toml"), config.to_toml()?)?;
        self.config = config;
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
                    bail!("lb-daemon rejected the reload; log:\n{}", self.log_tail(30));
                }
                if ok > ok_before {
                    return Ok(());
                }
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        bail!(
            "no reload counted ({RELOADS_OK}) within 10 s of SIGHUP; log:\n{}",
            self.log_tail(30)
        )
    }

    /// SIGTERM, wait up to `grace`; `Some(status)` if it exited by itself, `None` if killed.
    pub fn stop(&self, grace: Duration) -> Option<std::process::ExitStatus> {
        self.proc.stop(grace)
    }
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

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn config_serializes_to_the_schema() {
        let cfg = Config {
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
                id: 0,
                name: "web".into(),
                vip: "10.78.0.10".into(),
                port: 80,
                protocol: "tcp".into(),
                primary: 1,
                persistence_timeout_s: 0,
                engines: vec![Member { id: 1, weight: 1 }, Member { id: 2, weight: 2 }],
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
    }

    #[test]
    fn metric_parsing() {
        let text = "# HELP x y\nlb_packets_total{reason=\"tx_l2\"} 12\nother 1\n";
        assert_eq!(metric_lines(text, "lb_").len(), 1);
        assert_eq!(
            metric_value(text, "lb_packets_total{reason=\"tx_l2\"}"),
            Some(12.0)
        );
    }
}
