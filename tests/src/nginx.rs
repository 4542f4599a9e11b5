//! nginx in a namespace, answering `200 "<name>\n"` on every path, so a client learns which engine
//! served it. Config, pid, logs and temp dirs live in a private temp dir; one process
//! (`master_process off`), killed on drop.

use std::fmt::Write as _;
use std::net::{IpAddr, SocketAddr};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail};
use tempfile::TempDir;

use crate::lab::{Lab, Ns, Output, Proc};
use crate::netns::in_ns;

/// A running nginx.
pub struct Nginx {
    name: String,
    ns: Ns,
    listen: Vec<SocketAddr>,
    proc: Proc,
    dir: TempDir,
}

impl std::fmt::Debug for Nginx {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Nginx")
            .field("name", &self.name)
            .field("ns", &self.ns)
            .field("listen", &self.listen)
            .finish_non_exhaustive()
    }
}

/// What nginx writes to its access log.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
pub enum AccessLog {
    /// nginx's `combined` format (the client's address first).
    #[default]
    Combined,
    /// `$remote_addr $remote_port "$request" $status`: the peer's address and port, so a test can
    /// tell exactly which connection of a proxy a request came over ([`Nginx::peers`]).
    Peer,
    /// No access log (benchmarks).
    Off,
}

/// Settings of [`Nginx::start_with`].
#[derive(Clone, Copy, Debug, Default)]
pub struct NginxOptions {
    pub access_log: AccessLog,
}

/// The nginx configuration [`Nginx::start`] writes.
pub fn config(dir: &Path, name: &str, listen: &[SocketAddr]) -> String {
    config_with(dir, name, listen, &NginxOptions::default())
}

/// The nginx configuration [`Nginx::start_with`] writes.
pub fn config_with(dir: &Path, name: &str, listen: &[SocketAddr], opts: &NginxOptions) -> String {
    let d = dir.display();
    let access_log = match opts.access_log {
        AccessLog::Combined => format!("access_log {d}/access.log;"),
        AccessLog::Peer => format!(
            "log_format peer '$remote_addr $remote_port \"$request\" $status';\n    access_log {d}/access.log peer;"
        ),
        AccessLog::Off => "access_log off;".to_owned(),
    };
    let mut listens = String::new();
    for addr in listen {
        let _ = writeln!(listens, "        listen {addr} backlog=4096;");
    }
    format!(
        r#"daemon off;
master_process off;
worker_processes 1;
worker_rlimit_nofile 8192;
pid {d}/nginx.pid;
error_log {d}/error.log warn;
events {{
    worker_connections 4096;
}}
http {{
    {access_log}
    client_body_temp_path {d}/tmp/body;
    proxy_temp_path {d}/tmp/proxy;
    fastcgi_temp_path {d}/tmp/fastcgi;
    uwsgi_temp_path {d}/tmp/uwsgi;
    scgi_temp_path {d}/tmp/scgi;
    keepalive_timeout 600s;
    keepalive_requests 1000000;
    server {{
{listens}        location / {{
            default_type text/plain;
            return 200 "{name}\n";
        }}
    }}
}}
"#
    )
}

impl Nginx {
    /// Starts nginx in `ns` listening on `listen` (the addresses must already be local to `ns`)
    /// and waits until each address accepts connections (inside `ns`).
    pub fn start(lab: &Lab, ns: &Ns, name: &str, listen: &[SocketAddr]) -> Result<Self> {
        Self::start_with(lab, ns, name, listen, &NginxOptions::default())
    }

    /// [`Nginx::start`] with settings.
    pub fn start_with(
        lab: &Lab,
        ns: &Ns,
        name: &str,
        listen: &[SocketAddr],
        opts: &NginxOptions,
    ) -> Result<Self> {
        if listen.is_empty() {
            bail!("nginx needs at least one listen address");
        }
        if !name
            .bytes()
            .all(|b| b.is_ascii_alphanumeric() || b == b'-' || b == b'_')
        {
            bail!("nginx name must be [A-Za-z0-9_-], got {name:?}");
        }
        let dir = tempfile::Builder::new()
            .prefix(&format!("lb-nginx-{name}-"))
            .tempdir()?;
        std::fs::create_dir_all(dir.path().join("tmp"))?;
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, config_with(dir.path(), name, listen, opts))?;
        let prefix = format!("{}/", dir.path().display());
        let conf_s = conf.display().to_string();
        let err_log = dir.path().join("error.log").display().to_string();
        let proc = lab.spawn(
            ns,
            &["nginx", "-p", &prefix, "-c", &conf_s, "-e", &err_log],
            &Output::File(dir.path().join("stdio.log")),
        )?;
        let nginx = Self {
            name: name.to_owned(),
            ns: ns.clone(),
            listen: listen.to_vec(),
            proc,
            dir,
        };
        nginx
            .wait_ready(Duration::from_secs(10))
            .with_context(|| format!("nginx {name} in {ns}: {}", nginx.error_log_tail()))?;
        Ok(nginx)
    }

    fn wait_ready(&self, timeout: Duration) -> Result<()> {
        let deadline = Instant::now() + timeout;
        for addr in &self.listen {
            loop {
                if let Some(status) = self.proc.try_wait()? {
                    bail!("exited early ({status})");
                }
                let ok = in_ns(self.ns.name(), || {
                    Ok(
                        std::net::TcpStream::connect_timeout(addr, Duration::from_millis(200))
                            .is_ok(),
                    )
                })?;
                if ok {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!("{addr} not accepting after {timeout:?}");
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub fn ns(&self) -> &Ns {
        &self.ns
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    pub fn access_log(&self) -> PathBuf {
        self.dir.path().join("access.log")
    }

    /// Requests logged so far (lines of the access log).
    pub fn requests_logged(&self) -> usize {
        std::fs::read_to_string(self.access_log()).map_or(0, |s| s.lines().count())
    }

    /// The peers of the logged requests, in log order: the first field of each line (the client's
    /// address, in every [`AccessLog`] format) and, with [`AccessLog::Peer`], the second (its port;
    /// 0 otherwise).
    pub fn peers(&self) -> Vec<(IpAddr, u16)> {
        let text = std::fs::read_to_string(self.access_log()).unwrap_or_default();
        text.lines()
            .filter_map(|l| {
                let mut fields = l.split_whitespace();
                let addr = fields.next()?.parse().ok()?;
                let port = fields.next().and_then(|p| p.parse().ok()).unwrap_or(0);
                Some((addr, port))
            })
            .collect()
    }

    fn error_log_tail(&self) -> String {
        let text = std::fs::read_to_string(self.dir.path().join("error.log")).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(5)..].join(" | ")
    }
}

impl Drop for Nginx {
    fn drop(&mut self) {
        self.proc.stop(Duration::from_secs(2));
    }
}
