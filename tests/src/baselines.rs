//! The L4 proxies a user would pick instead, run in a lab namespace for comparison: `HAProxy`
//! (`mode tcp`) and nginx's `stream` proxy. Each gets its own config, logs and (for nginx) pid file
//! in a private temp dir; `HAProxy` runs with `-db` (foreground, no pid file: the handle is the
//! spawned process). Both are stopped on drop (and killed with the lab in any case).

use std::fmt::Write as _;
use std::net::SocketAddr;
use std::path::PathBuf;
use std::time::{Duration, Instant};

use anyhow::{Context, Result, bail, ensure};
use tempfile::TempDir;

use crate::lab::{Lab, Ns, Output, Proc};

/// Debian's dynamic stream module (package `libnginx-mod-stream`).
pub const NGINX_STREAM_MODULE: &str = "/usr/lib/nginx/modules/ngx_stream_module.so";

/// Connections each baseline proxy takes at most: two descriptors each stay under the lab's
/// open-files limit of 20000.
pub const MAX_CONNECTIONS: u32 = 8000;

/// One listener of a baseline proxy and the servers it spreads connections over (round robin).
#[derive(Clone, Debug)]
pub struct Frontend {
    pub listen: SocketAddr,
    pub servers: Vec<SocketAddr>,
    /// `HAProxy`: TCP health checks every 2 s (nginx's open-source stream module has only passive
    /// checks).
    pub check: bool,
}

/// A running baseline proxy.
pub struct BaselineProxy {
    kind: &'static str,
    ns: Ns,
    proc: Proc,
    dir: TempDir,
}

impl BaselineProxy {
    /// The proxy's main process (its workers are its children).
    pub fn pid(&self) -> u32 {
        self.proc.pid()
    }
}

impl std::fmt::Debug for BaselineProxy {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("BaselineProxy")
            .field("kind", &self.kind)
            .field("ns", &self.ns)
            .field("pid", &self.proc.pid())
            .finish_non_exhaustive()
    }
}

/// The `HAProxy` configuration [`BaselineProxy::haproxy`] writes.
pub fn haproxy_config(frontends: &[Frontend], threads: u32) -> String {
    let mut c = format!(
        "global\n    nbthread {threads}\n    maxconn {MAX_CONNECTIONS}\n\n\
         defaults\n    mode tcp\n    timeout connect 3s\n    timeout client 300s\n    timeout server 300s\n"
    );
    for (i, f) in frontends.iter().enumerate() {
        let _ = write!(
            c,
            "\nlisten l{i}\n    bind {}\n    balance roundrobin\n",
            f.listen
        );
        for (j, s) in f.servers.iter().enumerate() {
            let check = if f.check { " check inter 2s" } else { "" };
            let _ = writeln!(c, "    server s{j} {s}{check}");
        }
    }
    c
}

/// The nginx configuration [`BaselineProxy::nginx_stream`] writes.
pub fn nginx_stream_config(dir: &std::path::Path, frontends: &[Frontend], workers: u32) -> String {
    let d = dir.display();
    let mut servers = String::new();
    for (i, f) in frontends.iter().enumerate() {
        let _ = writeln!(servers, "    upstream u{i} {{");
        for s in &f.servers {
            let _ = writeln!(servers, "        server {s};");
        }
        let _ = writeln!(servers, "    }}");
        let _ = writeln!(
            servers,
            "    server {{\n        listen {} backlog=4096;\n        proxy_pass u{i};\n        proxy_connect_timeout 3s;\n        proxy_timeout 300s;\n    }}",
            f.listen
        );
    }
    format!(
        "load_module {NGINX_STREAM_MODULE};\n\
         daemon off;\nmaster_process on;\nworker_processes {workers};\n\
         worker_rlimit_nofile {nofile};\npid {d}/nginx.pid;\nerror_log {d}/error.log warn;\n\
         events {{\n    worker_connections {MAX_CONNECTIONS};\n}}\n\
         stream {{\n{servers}}}\n",
        nofile = 2 * MAX_CONNECTIONS + 64
    )
}

impl BaselineProxy {
    /// Starts `haproxy -db -f CONF` with `threads` threads in `ns` and waits until every frontend
    /// listens.
    pub fn haproxy(lab: &Lab, ns: &Ns, frontends: &[Frontend], threads: u32) -> Result<Self> {
        let dir = tempfile::Builder::new().prefix("lb-haproxy-").tempdir()?;
        let conf = dir.path().join("haproxy.cfg");
        std::fs::write(&conf, haproxy_config(frontends, threads))?;
        let conf_s = conf.to_str().context("non-UTF-8 path")?;
        // Validate first: a config error then says what is wrong instead of "exited".
        let check = lab.exec(ns, &["haproxy", "-c", "-q", "-f", conf_s]);
        if let Err(e) = check {
            bail!("haproxy -c: {e:#}");
        }
        let proc = lab.spawn(
            ns,
            &["haproxy", "-db", "-f", conf_s],
            &Output::File(dir.path().join("haproxy.log")),
        )?;
        let p = Self {
            kind: "haproxy",
            ns: ns.clone(),
            proc,
            dir,
        };
        p.wait_listening(frontends)?;
        Ok(p)
    }

    /// Starts nginx with the stream module (`workers` worker processes under a foreground
    /// master) in `ns` and waits until every frontend listens.
    pub fn nginx_stream(lab: &Lab, ns: &Ns, frontends: &[Frontend], workers: u32) -> Result<Self> {
        ensure!(
            std::path::Path::new(NGINX_STREAM_MODULE).exists(),
            "{NGINX_STREAM_MODULE} missing: apt-get install libnginx-mod-stream"
        );
        let dir = tempfile::Builder::new()
            .prefix("lb-nginx-stream-")
            .tempdir()?;
        let conf = dir.path().join("nginx.conf");
        std::fs::write(&conf, nginx_stream_config(dir.path(), frontends, workers))?;
        let prefix = format!("{}/", dir.path().display());
        let conf_s = conf.to_str().context("non-UTF-8 path")?;
        let err_log = dir.path().join("error.log");
        let err_s = err_log.to_str().context("non-UTF-8 path")?;
        let proc = lab.spawn(
            ns,
            &["nginx", "-p", &prefix, "-c", conf_s, "-e", err_s],
            &Output::File(dir.path().join("stdio.log")),
        )?;
        let p = Self {
            kind: "nginx-stream",
            ns: ns.clone(),
            proc,
            dir,
        };
        p.wait_listening(frontends)?;
        Ok(p)
    }

    /// Waits up to 10 s until `ss` shows a listener on each frontend's address (no test
    /// connection: one would reach a backend, and iperf3 servers take any connection for a test).
    fn wait_listening(&self, frontends: &[Frontend]) -> Result<()> {
        let deadline = Instant::now() + Duration::from_secs(10);
        for f in frontends {
            let want = f.listen.to_string();
            loop {
                if let Some(status) = self.proc.try_wait()? {
                    bail!(
                        "{} in {} exited at start ({status}): {}",
                        self.kind,
                        self.ns,
                        self.log_tail()
                    );
                }
                let out = crate::cmd::run(&["ip", "netns", "exec", self.ns.name(), "ss", "-Hltn"])?;
                if out
                    .lines()
                    .any(|l| l.split_whitespace().nth(3) == Some(want.as_str()))
                {
                    break;
                }
                if Instant::now() >= deadline {
                    bail!(
                        "{} in {}: {} not listening after 10 s: {}",
                        self.kind,
                        self.ns,
                        f.listen,
                        self.log_tail()
                    );
                }
                std::thread::sleep(Duration::from_millis(50));
            }
        }
        Ok(())
    }

    pub fn proc(&self) -> &Proc {
        &self.proc
    }

    pub fn dir(&self) -> PathBuf {
        self.dir.path().to_owned()
    }

    fn log_tail(&self) -> String {
        let mut out = String::new();
        for f in ["haproxy.log", "error.log", "stdio.log"] {
            if let Ok(t) = std::fs::read_to_string(self.dir.path().join(f)) {
                let lines: Vec<&str> = t.lines().collect();
                out.push_str(&lines[lines.len().saturating_sub(5)..].join(" | "));
            }
        }
        out
    }
}

impl Drop for BaselineProxy {
    fn drop(&mut self) {
        // nginx: SIGTERM makes the master stop its workers; HAProxy stops at once.
        self.proc.stop(Duration::from_secs(3));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn frontends() -> Vec<Frontend> {
        vec![Frontend {
            listen: "10.77.0.31:80".parse().unwrap(),
            servers: vec![
                "10.77.0.21:80".parse().unwrap(),
                "10.77.0.22:80".parse().unwrap(),
            ],
            check: true,
        }]
    }

    #[test]
    fn haproxy_config_lists_servers() {
        let c = haproxy_config(&frontends(), 2);
        assert!(c.contains("nbthread 2"));
        assert!(c.contains("mode tcp"));
        assert!(c.contains("bind 10.77.0.31:80"));
        assert!(c.contains("server s1 10.77.0.22:80 check inter 2s"));
    }

    #[test]
    fn nginx_config_loads_the_stream_module() {
        let c = nginx_stream_config(std::path::Path::new("/tmp/x"), &frontends(), 2);
        assert!(c.starts_with("load_module /usr/lib/nginx/modules/ngx_stream_module.so;"));
        assert!(c.contains("worker_processes 2;"));
        assert!(c.contains("server 10.77.0.21:80;"));
        assert!(c.contains("listen 10.77.0.31:80 backlog=4096;"));
        assert!(c.contains("proxy_pass u0;"));
    }
}
