//! The topology builder: namespaces, one bridged L2 segment, tracked processes, RAII cleanup.
//!
//! ```no_run
//! # fn main() -> anyhow::Result<()> {
//! use lb_tests::Lab;
//! let lab = Lab::new("lbt")?;
//! lab.enable_xdp_pass(&lb_tests::testkit_object())?; // trap 1: XDP_PASS on every bridge port
//! let client = lab.add_ns("client")?;
//! let se1 = lab.add_ns("se1")?;
//! lab.attach(&client, "eth0", "10.77.0.2/24")?; // trap 2: tx checksum offload off
//! lab.attach(&se1, "eth0", "10.77.0.11/24")?;
//! lab.exec(&client, &["ping", "-c1", "-W1", "10.77.0.11"])?;
//! # Ok(()) }
//! // dropping `lab` kills its processes and deletes every namespace it made
//! ```
//!
//! Namespace names are `<prefix><pid>-<lab number>-<role>`, so concurrent labs (other tests, other
//! processes) never collide, and [`Lab::new`] can delete what a killed run left behind (namespaces
//! of this prefix whose pid is gone).

use std::fmt;
use std::fs::{File, OpenOptions};
use std::net::Ipv4Addr;
use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicU32, Ordering};
use std::sync::{Arc, Mutex, MutexGuard, PoisonError};
use std::time::{Duration, Instant};

use anyhow::{Context, Result, anyhow, bail, ensure};
use aya::Ebpf;
use aya::programs::{Xdp, XdpMode};
use nix::sys::signal::{Signal, kill};
use nix::unistd::Pid;

use crate::cmd::{run, run_quiet};
use crate::netns::in_ns;

/// Name of the bridge in the switch namespace.
pub const BRIDGE: &str = "br0";
/// Name of the `XDP_PASS` program in the data plane object (for the bridge-side veth ends).
pub const XDP_PASS_PROGRAM: &str = "xdp_pass";

static LAB_COUNTER: AtomicU32 = AtomicU32::new(0);

fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    // A panic while holding a lab lock must not stop the cleanup.
    m.lock().unwrap_or_else(PoisonError::into_inner)
}

/// A network namespace made by a [`Lab`] (its full name, as `ip netns` knows it).
#[derive(Clone, Debug, PartialEq, Eq, Hash)]
pub struct Ns(String);

impl Ns {
    pub fn name(&self) -> &str {
        &self.0
    }
}

impl fmt::Display for Ns {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.0)
    }
}

impl AsRef<str> for Ns {
    fn as_ref(&self) -> &str {
        &self.0
    }
}

/// A host interface on the lab segment (one end of a veth pair; the other is a `br0` port).
#[derive(Clone, Debug)]
pub struct Iface {
    pub ns: Ns,
    /// Name inside `ns` (`eth0`, ...).
    pub name: String,
    /// Name of the bridge port (the peer) inside the switch namespace.
    pub port: String,
    /// Deterministic: `02:00:` followed by the four bytes of `addr`.
    pub mac: [u8; 6],
    pub addr: Ipv4Addr,
    pub prefix_len: u8,
}

impl Iface {
    /// `aa:bb:cc:dd:ee:ff`
    pub fn mac_string(&self) -> String {
        fmt_mac(&self.mac)
    }
}

/// The MAC [`Lab::attach`] gives the host end of the veth for `addr`: `02:00:a:b:c:d`
/// (locally administered, unicast).
pub fn host_mac(addr: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = addr.octets();
    [0x02, 0x00, a, b, c, d]
}

/// The MAC of the bridge-side end for `addr`: `02:01:a:b:c:d`.
pub fn port_mac(addr: Ipv4Addr) -> [u8; 6] {
    let [a, b, c, d] = addr.octets();
    [0x02, 0x01, a, b, c, d]
}

pub fn fmt_mac(mac: &[u8; 6]) -> String {
    mac.iter()
        .map(|b| format!("{b:02x}"))
        .collect::<Vec<_>>()
        .join(":")
}

/// A process started in a namespace. Clones share the process; the [`Lab`] keeps one and kills the
/// process on drop if it still runs. The child is reaped only through this handle, so its pid is
/// never reused while a handle exists.
#[derive(Clone)]
pub struct Proc {
    inner: Arc<ProcInner>,
}

struct ProcInner {
    label: String,
    pid: u32,
    child: Mutex<Child>,
}

impl fmt::Debug for Proc {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Proc({} pid {})", self.inner.label, self.inner.pid)
    }
}

impl Proc {
    pub fn pid(&self) -> u32 {
        self.inner.pid
    }

    pub fn label(&self) -> &str {
        &self.inner.label
    }

    /// `Some(status)` once the process has exited.
    pub fn try_wait(&self) -> Result<Option<ExitStatus>> {
        Ok(lock(&self.inner.child).try_wait()?)
    }

    pub fn is_running(&self) -> bool {
        matches!(self.try_wait(), Ok(None))
    }

    /// Sends `sig` if the process has not exited yet (checked under the lock that reaps it, so the
    /// signal can never reach a recycled pid).
    pub fn signal(&self, sig: Signal) -> Result<()> {
        let mut child = lock(&self.inner.child);
        if child.try_wait()?.is_none() {
            let pid = i32::try_from(self.inner.pid).context("pid out of range")?;
            kill(Pid::from_raw(pid), sig).with_context(|| format!("kill -{sig} {self:?}"))?;
        }
        Ok(())
    }

    /// Waits up to `timeout` for the process to exit.
    pub fn wait_timeout(&self, timeout: Duration) -> Result<Option<ExitStatus>> {
        let deadline = Instant::now() + timeout;
        loop {
            if let Some(status) = self.try_wait()? {
                return Ok(Some(status));
            }
            if Instant::now() >= deadline {
                return Ok(None);
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }

    /// SIGTERM, wait up to `grace`, then SIGKILL and reap. Returns the exit status if the process
    /// exited on its own or after SIGTERM, `None` if it had to be killed.
    pub fn stop(&self, grace: Duration) -> Option<ExitStatus> {
        let _ = self.signal(Signal::SIGTERM);
        if let Ok(Some(status)) = self.wait_timeout(grace) {
            return Some(status);
        }
        self.kill();
        None
    }

    /// SIGKILL and reap (no-op if already gone).
    pub fn kill(&self) {
        let mut child = lock(&self.inner.child);
        if matches!(child.try_wait(), Ok(None)) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }
}

/// Where a spawned process's stdout and stderr go.
#[derive(Clone, Debug, Default)]
pub enum Output {
    /// Discarded.
    #[default]
    Null,
    /// Both appended to this file.
    File(PathBuf),
    /// Inherited from the test (shows in `cargo test -- --nocapture`).
    Inherit,
}

struct State {
    namespaces: Vec<Ns>,
    switch: Option<Ns>,
    ports: Vec<String>,
    procs: Vec<Proc>,
    xdp_object: Option<PathBuf>,
    xdp: Option<Ebpf>,
}

/// A set of namespaces on one bridged segment, deleted on drop.
///
/// Every method takes `&self`, so helpers and tests can share one lab freely. Processes started
/// with [`Lab::spawn`] get `PR_SET_PDEATHSIG = SIGKILL`: they die with the thread that started
/// them even if this process is killed before `Drop` runs, so start them from the thread that owns
/// the lab (a test's thread, `main`), never from a short-lived helper thread.
pub struct Lab {
    base: String,
    prefix: String,
    state: Mutex<State>,
}

impl fmt::Debug for Lab {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.debug_struct("Lab")
            .field("base", &self.base)
            .finish_non_exhaustive()
    }
}

impl Lab {
    /// A new, empty lab. `prefix`: 1 to 8 ASCII letters (e.g. `lbt`). Also deletes namespaces left
    /// by earlier runs with the same prefix whose process is gone.
    pub fn new(prefix: &str) -> Result<Self> {
        ensure!(
            (1..=8).contains(&prefix.len()) && prefix.bytes().all(|b| b.is_ascii_lowercase()),
            "lab prefix must be 1-8 lowercase ASCII letters, got {prefix:?}"
        );
        sweep_stale(prefix);
        let n = LAB_COUNTER.fetch_add(1, Ordering::Relaxed);
        Ok(Self {
            base: format!("{prefix}{}-{n}", std::process::id()),
            prefix: prefix.to_owned(),
            state: Mutex::new(State {
                namespaces: Vec::new(),
                switch: None,
                ports: Vec::new(),
                procs: Vec::new(),
                xdp_object: None,
                xdp: None,
            }),
        })
    }

    /// The unique part of this lab's names (`<prefix><pid>-<n>`); also useful for other
    /// per-lab resources (pin directories, temp dirs).
    pub fn base(&self) -> &str {
        &self.base
    }

    pub fn prefix(&self) -> &str {
        &self.prefix
    }

    /// Every namespace made so far, in creation order.
    pub fn namespaces(&self) -> Vec<Ns> {
        lock(&self.state).namespaces.clone()
    }

    /// Creates namespace `<base>-<role>` with `lo` up. `role`: short, `[a-z0-9]`.
    pub fn add_ns(&self, role: &str) -> Result<Ns> {
        ensure!(
            !role.is_empty()
                && role.len() <= 12
                && role
                    .bytes()
                    .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit()),
            "namespace role must be 1-12 of [a-z0-9], got {role:?}"
        );
        let ns = Ns(format!("{}-{role}", self.base));
        run(&["ip", "netns", "add", ns.name()])?;
        lock(&self.state).namespaces.push(ns.clone());
        self.ip(&ns, &["link", "set", "lo", "up"])?;
        Ok(ns)
    }

    /// The switch namespace `sw` with bridge `br0` (made on first use). Where the host has
    /// `br_netfilter` loaded, a new namespace starts with `bridge-nf-call-iptables=1`, and the bridge
    /// then drops malformed IPv4 frames before any engine sees them (trap 3): the switch turns it
    /// off, so the lab forwards what a real switch forwards.
    pub fn switch(&self) -> Result<Ns> {
        if let Some(sw) = lock(&self.state).switch.clone() {
            return Ok(sw);
        }
        let sw = self.add_ns("sw")?;
        for table in ["iptables", "ip6tables", "arptables"] {
            let key = format!("net/bridge/bridge-nf-call-{table}");
            // The keys exist only while br_netfilter is loaded; without it nothing filters.
            let present = self
                .exec(&sw, &["test", "-e", &format!("/proc/sys/{key}")])
                .is_ok();
            if present {
                self.sysctl(&sw, &key.replace('/', "."), "0")?;
            }
        }
        self.ip(
            &sw,
            &["link", "add", BRIDGE, "type", "bridge", "stp_state", "0"],
        )?;
        self.ip(&sw, &["link", "set", BRIDGE, "up"])?;
        lock(&self.state).switch = Some(sw.clone());
        Ok(sw)
    }

    /// Connects `ns` to the segment: a veth pair whose end `ifname` (in `ns`) gets `cidr`
    /// (`10.77.0.11/24`) and MAC [`host_mac`], and whose other end (MAC [`port_mac`]) is a port of
    /// `br0`. Brings both up, turns tx checksum offload off on `ifname` (trap 2) and, after
    /// [`Lab::enable_xdp_pass`], attaches `xdp_pass` to the port (trap 1).
    pub fn attach(&self, ns: &Ns, ifname: &str, cidr: &str) -> Result<Iface> {
        ensure!(
            !ifname.is_empty() && ifname.len() <= 15,
            "bad interface name {ifname:?}"
        );
        let (addr, prefix_len) = parse_cidr(cidr)?;
        let sw = self.switch()?;
        let port = {
            let st = lock(&self.state);
            format!("p{}", st.ports.len())
        };
        let mac = host_mac(addr);
        let pmac = fmt_mac(&port_mac(addr));
        let hmac = fmt_mac(&mac);
        self.ip(
            &sw,
            &[
                "link",
                "add",
                &port,
                "address",
                &pmac,
                "type",
                "veth",
                "peer",
                "name",
                ifname,
                "address",
                &hmac,
                "netns",
                ns.name(),
            ],
        )?;
        lock(&self.state).ports.push(port.clone());
        self.ip(&sw, &["link", "set", &port, "master", BRIDGE, "up"])?;
        self.ip(ns, &["addr", "add", cidr, "dev", ifname])?;
        self.ip(ns, &["link", "set", ifname, "up"])?;
        self.exec(ns, &["ethtool", "-K", ifname, "tx", "off"])?;
        let iface = Iface {
            ns: ns.clone(),
            name: ifname.to_owned(),
            port: port.clone(),
            mac,
            addr,
            prefix_len,
        };
        let want_xdp = lock(&self.state).xdp_object.is_some();
        if want_xdp {
            self.attach_xdp_pass(&port)?;
        }
        Ok(iface)
    }

    /// Attaches program `xdp_pass` of `object` to every bridge port, now and on later
    /// [`Lab::attach`] calls, so that frames an XDP program sends back out of a host's veth
    /// (`XDP_TX`) are not dropped by the peer. The program stays attached while the lab lives.
    pub fn enable_xdp_pass(&self, object: &Path) -> Result<()> {
        self.switch()?;
        let mut ebpf = Ebpf::load_file(object)
            .with_context(|| format!("load BPF object {}", object.display()))?;
        let prog: &mut Xdp = ebpf
            .program_mut(XDP_PASS_PROGRAM)
            .with_context(|| format!("no program {XDP_PASS_PROGRAM} in {}", object.display()))?
            .try_into()
            .with_context(|| format!("{XDP_PASS_PROGRAM} is not an XDP program"))?;
        prog.load()
            .with_context(|| format!("load {XDP_PASS_PROGRAM}"))?;
        let ports = {
            let mut st = lock(&self.state);
            ensure!(st.xdp.is_none(), "XDP_PASS already enabled");
            st.xdp = Some(ebpf);
            st.xdp_object = Some(object.to_owned());
            st.ports.clone()
        };
        for port in ports {
            self.attach_xdp_pass(&port)?;
        }
        Ok(())
    }

    fn attach_xdp_pass(&self, port: &str) -> Result<()> {
        let sw = self.switch()?;
        {
            let mut st = lock(&self.state);
            let ebpf = st.xdp.as_mut().context("XDP_PASS not enabled")?;
            let prog: &mut Xdp = ebpf
                .program_mut(XDP_PASS_PROGRAM)
                .context("xdp_pass vanished")?
                .try_into()?;
            // if_nametoindex and the attach resolve the interface in the caller's namespace.
            in_ns(sw.name(), || {
                prog.attach(port, XdpMode::Default)
                    .with_context(|| format!("attach {XDP_PASS_PROGRAM} to {port}"))
            })?;
        }
        let link = self.ip(&sw, &["link", "show", "dev", port])?;
        ensure!(
            link.contains(" xdp"),
            "{port} shows no XDP program after attach: {link}"
        );
        Ok(())
    }

    /// `ip -n <ns> args...`
    pub fn ip(&self, ns: &Ns, args: &[&str]) -> Result<String> {
        let mut full = vec!["ip", "-n", ns.name()];
        full.extend_from_slice(args);
        run(&full)
    }

    /// `ip netns exec <ns> argv...`, returns stdout; non-zero exit is an error.
    pub fn exec(&self, ns: &Ns, argv: &[&str]) -> Result<String> {
        let mut full = vec!["ip", "netns", "exec", ns.name()];
        full.extend_from_slice(argv);
        run(&full)
    }

    /// A counter of the `Tcp:` lines of `/proc/net/snmp` inside `ns` (`OutRsts`, `ActiveOpens`, ...).
    pub fn tcp_counter(&self, ns: &Ns, name: &str) -> Result<u64> {
        let snmp = self.exec(ns, &["cat", "/proc/net/snmp"])?;
        let mut tcp = snmp.lines().filter(|l| l.starts_with("Tcp:"));
        let (Some(names), Some(values)) = (tcp.next(), tcp.next()) else {
            bail!("no Tcp: lines in /proc/net/snmp of {ns}");
        };
        names
            .split_whitespace()
            .zip(values.split_whitespace())
            .find(|(n, _)| *n == name)
            .with_context(|| format!("no Tcp counter {name} in {ns}"))?
            .1
            .parse()
            .with_context(|| format!("Tcp {name} in {ns}"))
    }

    /// `sysctl -w key=value` inside `ns`.
    pub fn sysctl(&self, ns: &Ns, key: &str, value: &str) -> Result<()> {
        self.exec(ns, &["sysctl", "-qw", &format!("{key}={value}")])?;
        Ok(())
    }

    /// Starts `ip netns exec <ns> argv...` (the command replaces `ip`, so the pid is the
    /// command's). The lab kills it on drop if it still runs.
    pub fn spawn(&self, ns: &Ns, argv: &[&str], out: &Output) -> Result<Proc> {
        let (program, rest) = argv.split_first().context("empty command")?;
        let mut cmd = Command::new("ip");
        cmd.args(["netns", "exec", ns.name(), program]).args(rest);
        cmd.stdin(Stdio::null());
        match out {
            Output::Null => {
                cmd.stdout(Stdio::null()).stderr(Stdio::null());
            }
            Output::Inherit => {}
            Output::File(path) => {
                let file: File = OpenOptions::new()
                    .create(true)
                    .append(true)
                    .open(path)
                    .with_context(|| format!("open {}", path.display()))?;
                cmd.stdout(file.try_clone()?).stderr(file);
            }
        }
        // SAFETY: prctl is async-signal-safe and touches no memory of the parent.
        unsafe {
            cmd.pre_exec(|| {
                nix::sys::prctl::set_pdeathsig(Signal::SIGKILL).map_err(std::io::Error::from)
            });
        }
        let child = cmd
            .spawn()
            .with_context(|| format!("spawn `{}` in {ns}", argv.join(" ")))?;
        let handle = Proc {
            inner: Arc::new(ProcInner {
                label: format!("{ns}: {program}"),
                pid: child.id(),
                child: Mutex::new(child),
            }),
        };
        lock(&self.state).procs.push(handle.clone());
        Ok(handle)
    }

    /// Kills every process still running in the lab's namespaces (tracked or not).
    fn kill_all(&self) {
        let (procs, namespaces) = {
            let mut st = lock(&self.state);
            (std::mem::take(&mut st.procs), st.namespaces.clone())
        };
        for p in &procs {
            p.kill();
        }
        for ns in &namespaces {
            kill_ns_pids(ns.name());
        }
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        self.kill_all();
        let (xdp, namespaces) = {
            let mut st = lock(&self.state);
            (st.xdp.take(), std::mem::take(&mut st.namespaces))
        };
        // Detaches xdp_pass from the ports (closing the link fds).
        drop(xdp);
        for ns in namespaces.iter().rev() {
            run_quiet(&["ip", "netns", "del", ns.name()]);
        }
    }
}

fn kill_ns_pids(ns: &str) {
    if let Ok(pids) = run(&["ip", "netns", "pids", ns]) {
        for pid in pids
            .split_whitespace()
            .filter_map(|p| p.parse::<i32>().ok())
        {
            let _ = kill(Pid::from_raw(pid), Signal::SIGKILL);
        }
    }
}

/// Deletes namespaces `<prefix><pid>-...` whose creating process no longer exists.
fn sweep_stale(prefix: &str) {
    let Ok(list) = run(&["ip", "netns", "list"]) else {
        return;
    };
    for line in list.lines() {
        let Some(name) = line.split_whitespace().next() else {
            continue;
        };
        let Some(rest) = name.strip_prefix(prefix) else {
            continue;
        };
        let Some((pid, _)) = rest.split_once('-') else {
            continue;
        };
        if pid.is_empty() || !pid.bytes().all(|b| b.is_ascii_digit()) {
            continue;
        }
        if !Path::new("/proc").join(pid).exists() {
            kill_ns_pids(name);
            run_quiet(&["ip", "netns", "del", name]);
        }
    }
}

/// `10.77.0.11/24` → (10.77.0.11, 24).
pub fn parse_cidr(cidr: &str) -> Result<(Ipv4Addr, u8)> {
    let (a, p) = cidr
        .split_once('/')
        .ok_or_else(|| anyhow!("expected ADDR/PREFIX, got {cidr:?}"))?;
    let addr: Ipv4Addr = a
        .parse()
        .with_context(|| format!("bad address in {cidr:?}"))?;
    let prefix: u8 = p
        .parse()
        .with_context(|| format!("bad prefix in {cidr:?}"))?;
    if prefix > 32 {
        bail!("bad prefix in {cidr:?}");
    }
    Ok((addr, prefix))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn macs_are_deterministic() {
        let a: Ipv4Addr = "10.77.0.11".parse().unwrap();
        assert_eq!(fmt_mac(&host_mac(a)), "02:00:0a:4d:00:0b");
        assert_eq!(fmt_mac(&port_mac(a)), "02:01:0a:4d:00:0b");
    }

    #[test]
    fn cidr() {
        assert_eq!(
            parse_cidr("10.77.0.2/24").unwrap(),
            ("10.77.0.2".parse().unwrap(), 24)
        );
        assert!(parse_cidr("10.77.0.2").is_err());
        assert!(parse_cidr("10.77.0.2/33").is_err());
    }
}
