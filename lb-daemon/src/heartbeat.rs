//! What an engine reports in its heartbeats: its CPU (against its cgroup's CPU quota where it has
//! one, else the host's, with the host's, the daemon's own and the softirq share besides), the
//! daemon's resident memory, packets per second and megabits per second per virtual service (the
//! BPF per-VS counters: a primary's hold every packet of the service it steers, a secondary's its
//! own share), proxied connections open now and accepted per second, per pool how many backends
//! are up, the services its proxy serves and those it drains, and for failover what this engine
//! claims (the virtual services it is primary of, at their epochs: the controller records an
//! engine-made promotion from them) and what its peer probes tell of every peer.
//!
//! With `--record-heartbeats FILE` every heartbeat is also appended to FILE as a JSON line, the
//! trace format `controller simulate --trace` replays.

use std::{
    collections::{BTreeMap, HashMap},
    io::Write as _,
    path::{Path, PathBuf},
    sync::{Arc, Mutex, RwLock, atomic::Ordering},
    time::{Instant, SystemTime, UNIX_EPOCH},
};

use lb_api::v1 as pb;
use tokio::sync::watch;

use crate::{
    conntable::ConnTable,
    dataplane::Counters,
    metrics::Inventory,
    peers::{Plan, View},
    proxy::{Drain, Service},
};

#[derive(Default)]
struct Last {
    cpu: Option<CpuTimes>,
    packets: Option<(u64, Instant)>,
    /// Per virtual service id: its (packets, bytes) at the last beat.
    vs_counts: HashMap<u32, (u64, u64)>,
    /// Connections the proxy had accepted in all at the last beat.
    accepted: Option<u64>,
    /// Services draining, until their drain has ended (reported done once).
    drains: Vec<Draining>,
}

/// A service whose drain began: what it had open then, and its resets before.
struct Draining {
    service: Arc<Service>,
    open_at_start: u64,
    resets_before: u64,
}

pub struct Sampler {
    counters: Arc<Counters>,
    inventory: Arc<RwLock<Inventory>>,
    conns: Arc<ConnTable>,
    /// The failover module's plan (its `claims` are this engine's) and the peer task's view.
    peers: Option<(watch::Receiver<Option<Plan>>, watch::Receiver<View>)>,
    /// The BGP speaker's sessions.
    bgp: Option<crate::bgp::PeerList>,
    last: Mutex<Last>,
}

/// CPU time counters read at one beat.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
struct CpuTimes {
    /// Jiffies of all CPUs: busy (neither idle nor iowait), softirq, and in all.
    host_busy: u64,
    host_softirq: u64,
    host_total: u64,
    /// The daemon's user + system time, in clock ticks.
    daemon_ticks: u64,
    /// The daemon's cgroup: its CPU usage (ns) and quota (CPUs' worth), if it has a quota.
    cgroup: Option<(u64, f64)>,
    at: Option<Instant>,
}

/// `/proc/stat`'s first line: (busy, softirq, total) jiffies.
fn host_jiffies(stat: &str) -> Option<(u64, u64, u64)> {
    let line = stat.lines().next()?.strip_prefix("cpu ")?;
    let v: Vec<u64> = line
        .split_whitespace()
        .filter_map(|x| x.parse().ok())
        .collect();
    let total: u64 = v.iter().take(8).sum();
    // idle + iowait
    let idle = v.get(3).copied().unwrap_or(0) + v.get(4).copied().unwrap_or(0);
    Some((total - idle, v.get(6).copied().unwrap_or(0), total))
}

/// `/proc/self/stat`: utime + stime (fields 14 and 15; the command name may hold spaces).
fn process_ticks(stat: &str) -> Option<u64> {
    let rest = &stat[stat.rfind(')')? + 2..];
    let f: Vec<&str> = rest.split_whitespace().collect();
    Some(f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?)
}

/// Where a cgroup hierarchy is mounted: (mount point, its root within the hierarchy).
fn mount_of(mountinfo: &str, v2: bool, controller: &str) -> Option<(PathBuf, String)> {
    mountinfo.lines().find_map(|line| {
        let (pre, post) = line.split_once(" - ")?;
        let mut post = post.split_whitespace();
        let fstype = post.next()?;
        let _source = post.next();
        let options = post.next().unwrap_or("");
        let ok = if v2 {
            fstype == "cgroup2"
        } else {
            fstype == "cgroup" && options.split(',').any(|o| o == controller)
        };
        let pre: Vec<&str> = pre.split_whitespace().collect();
        if !ok {
            return None;
        }
        Some((PathBuf::from(pre.get(4)?), (*pre.get(3)?).to_owned()))
    })
}

/// This process's cgroup path in a hierarchy: v2 (`0::/path`) or the v1 line naming `controller`.
fn cgroup_path(proc_cgroup: &str, v2: bool, controller: &str) -> Option<String> {
    proc_cgroup.lines().find_map(|line| {
        let mut f = line.splitn(3, ':');
        let (id, controllers, path) = (f.next()?, f.next()?, f.next()?);
        let ok = if v2 {
            id == "0" && controllers.is_empty()
        } else {
            controllers.split(',').any(|c| c == controller)
        };
        ok.then(|| path.to_owned())
    })
}

fn in_hierarchy(mount: &(PathBuf, String), path: &str) -> PathBuf {
    let rel = path.strip_prefix(mount.1.as_str()).unwrap_or(path);
    mount.0.join(rel.trim_start_matches('/'))
}

fn read(p: &Path) -> Option<String> {
    std::fs::read_to_string(p).ok()
}

/// The daemon's cgroup CPU usage (ns) and quota (in CPUs) when its cgroup has a CPU quota: cgroup
/// v2 `cpu.max` and `cpu.stat`, or v1 `cpu.cfs_quota_us` / `cpu.cfs_period_us` and
/// `cpuacct.usage`. Read at every beat: the daemon may be moved into a cgroup while it runs.
fn cgroup_cpu() -> Option<(u64, f64)> {
    let mountinfo = read(Path::new("/proc/self/mountinfo"))?;
    let own = read(Path::new("/proc/self/cgroup"))?;
    // v1 first: on a hybrid host the cpu controller is there, not in the v2 tree.
    if let (Some(cpu_m), Some(acct_m)) = (
        mount_of(&mountinfo, false, "cpu"),
        mount_of(&mountinfo, false, "cpuacct"),
    ) {
        let cpu = in_hierarchy(&cpu_m, &cgroup_path(&own, false, "cpu")?);
        let acct = in_hierarchy(&acct_m, &cgroup_path(&own, false, "cpuacct")?);
        let quota: i64 = read(&cpu.join("cpu.cfs_quota_us"))?.trim().parse().ok()?;
        let period: u64 = read(&cpu.join("cpu.cfs_period_us"))?.trim().parse().ok()?;
        let usage: u64 = read(&acct.join("cpuacct.usage"))?.trim().parse().ok()?;
        #[allow(clippy::cast_precision_loss)]
        return (quota > 0 && period > 0).then(|| (usage, quota as f64 / period as f64));
    }
    let m = mount_of(&mountinfo, true, "")?;
    let dir = in_hierarchy(&m, &cgroup_path(&own, true, "")?);
    let max = read(&dir.join("cpu.max"))?;
    let mut f = max.split_whitespace();
    let (quota, period) = (f.next()?, f.next()?.parse::<u64>().ok()?);
    let quota: u64 = quota.parse().ok()?;
    let usec: u64 = read(&dir.join("cpu.stat"))?
        .lines()
        .find_map(|l| l.strip_prefix("usage_usec ")?.trim().parse().ok())?;
    #[allow(clippy::cast_precision_loss)]
    (period > 0).then(|| (usec * 1000, quota as f64 / period as f64))
}

fn cpu_times() -> CpuTimes {
    let (host_busy, host_softirq, host_total) = read(Path::new("/proc/stat"))
        .as_deref()
        .and_then(host_jiffies)
        .unwrap_or_default();
    CpuTimes {
        host_busy,
        host_softirq,
        host_total,
        daemon_ticks: read(Path::new("/proc/self/stat"))
            .as_deref()
            .and_then(process_ticks)
            .unwrap_or(0),
        cgroup: cgroup_cpu(),
        at: Some(Instant::now()),
    }
}

/// The CPU shares between two beats: (the engine's, its source, host, daemon, softirq), percent.
#[allow(clippy::cast_precision_loss)]
fn cpu_shares(before: &CpuTimes, now: &CpuTimes, cpus: f64) -> (f64, &'static str, f64, f64, f64) {
    let total = now.host_total.saturating_sub(before.host_total) as f64;
    let share = |a: u64, b: u64| {
        if total > 0.0 {
            100.0 * a.saturating_sub(b) as f64 / total
        } else {
            0.0
        }
    };
    let host = share(now.host_busy, before.host_busy);
    let softirq = share(now.host_softirq, before.host_softirq);
    let secs = match (before.at, now.at) {
        (Some(a), Some(b)) => b.duration_since(a).as_secs_f64(),
        _ => 0.0,
    };
    // Clock ticks are 100 per second on Linux.
    let daemon = if secs > 0.0 {
        100.0 * now.daemon_ticks.saturating_sub(before.daemon_ticks) as f64 / (100.0 * secs * cpus)
    } else {
        0.0
    };
    match (before.cgroup, now.cgroup) {
        (Some((u0, _)), Some((u1, quota))) if secs > 0.0 && quota > 0.0 => {
            let used = u1.saturating_sub(u0) as f64 / 1e9 / secs;
            (100.0 * used / quota, "cgroup", host, daemon, softirq)
        }
        _ => (host, "host", host, daemon, softirq),
    }
}

fn rss_bytes() -> u64 {
    std::fs::read_to_string("/proc/self/statm")
        .ok()
        .and_then(|s| s.split_whitespace().nth(1)?.parse::<u64>().ok())
        .map_or(0, |pages| pages * 4096)
}

impl Sampler {
    pub fn new(
        counters: Arc<Counters>,
        inventory: Arc<RwLock<Inventory>>,
        conns: Arc<ConnTable>,
    ) -> Self {
        Sampler {
            counters,
            inventory,
            conns,
            peers: None,
            bgp: None,
            last: Mutex::new(Last::default()),
        }
    }

    /// Heartbeats also carry this engine's claims (from the failover plan) and its peer view.
    #[must_use]
    pub fn with_peers(
        mut self,
        plan: watch::Receiver<Option<Plan>>,
        view: watch::Receiver<View>,
    ) -> Self {
        self.peers = Some((plan, view));
        self
    }

    /// Reports the BGP speaker's sessions too.
    #[must_use]
    pub fn with_bgp(mut self, peers: crate::bgp::PeerList) -> Self {
        self.bgp = Some(peers);
        self
    }

    /// The BGP sessions as the heartbeat carries them.
    fn bgp(&self) -> Vec<pb::BgpSession> {
        let Some(peers) = &self.bgp else {
            return Vec::new();
        };
        peers
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner)
            .iter()
            .map(|(addr, status)| {
                let s = status
                    .lock()
                    .unwrap_or_else(std::sync::PoisonError::into_inner);
                pb::BgpSession {
                    peer: addr.to_string(),
                    state: s.state.as_str().to_owned(),
                    uptime_s: s.established_at.map_or(0, |t| t.elapsed().as_secs()),
                    routes_announced: u32::try_from(s.announced).unwrap_or(u32::MAX),
                    last_error: s.last_error.clone().unwrap_or_default(),
                    bfd: s
                        .bfd
                        .as_ref()
                        .map(|b| b.borrow().as_str().to_owned())
                        .unwrap_or_default(),
                }
            })
            .collect()
    }

    /// (claims, peer view) as the heartbeat carries them.
    fn failover(&self) -> (Vec<pb::Claim>, Vec<pb::PeerView>) {
        let Some((plan, view)) = &self.peers else {
            return (Vec::new(), Vec::new());
        };
        let claims = plan.borrow().as_ref().map_or_else(Vec::new, |p| {
            p.claims
                .iter()
                .map(|c| pb::Claim {
                    vs_id: c.vs_id,
                    epoch: c.epoch,
                })
                .collect()
        });
        let peers = view
            .borrow()
            .iter()
            .map(|(id, s)| pb::PeerView {
                engine_id: *id,
                daemon_up: s.daemon_up,
                dataplane_up: s.dataplane_up,
            })
            .collect();
        (claims, peers)
    }

    #[allow(
        clippy::cast_precision_loss,
        clippy::cast_possible_truncation,
        clippy::cast_sign_loss
    )]
    pub fn sample(&self) -> pb::Heartbeat {
        let now = Instant::now();
        let inv = self
            .inventory
            .read()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let per_vs: Vec<(u32, String, (u64, u64))> = inv
            .virtual_services
            .iter()
            .filter_map(|(id, name)| {
                let c = self.counters.vs(*id).ok()?;
                Some((*id, name.clone(), (c.packets, c.bytes)))
            })
            .collect();
        let packets: u64 = per_vs.iter().map(|(_, _, (p, _))| p).sum();
        let accepted: u64 = inv
            .services
            .iter()
            .map(|s| s.stats.total.load(Ordering::Relaxed))
            .sum();
        let mut backends_up = HashMap::new();
        let mut backends = HashMap::new();
        for p in &inv.pools {
            let up = p
                .backends
                .iter()
                .filter(|b| b.enabled() && b.is_healthy())
                .count();
            backends_up.insert(p.name.clone(), u32::try_from(up).unwrap_or(u32::MAX));
            backends.insert(
                p.name.clone(),
                u32::try_from(p.backends.len()).unwrap_or(u32::MAX),
            );
        }
        let serving = inv
            .services
            .iter()
            .filter(|s| {
                s.drain_state() == Drain::Serving
                    && s.pool()
                        .backends
                        .iter()
                        .any(|b| b.enabled() && b.is_healthy())
            })
            .map(|s| s.name.to_string())
            .collect();
        let services = inv.services.clone();
        drop(inv);
        let mut last = self
            .last
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        let cpu = cpu_times();
        let cpus = std::thread::available_parallelism().map_or(1.0, |n| n.get() as f64);
        let (cpu_pct, cpu_source, host_cpu_pct, daemon_cpu_pct, softirq_pct) =
            last.cpu.map_or((0.0, "host", 0.0, 0.0, 0.0), |before| {
                cpu_shares(&before, &cpu, cpus)
            });
        let secs = last
            .packets
            .map_or(0.0, |(_, t0)| now.duration_since(t0).as_secs_f64());
        let rate = |now: u64, before: Option<u64>| match before {
            Some(b) if secs > 0.0 => now.saturating_sub(b) as f64 / secs,
            _ => 0.0,
        };
        let pps = rate(packets, last.packets.map(|(p, _)| p)) as u64;
        let mut vs_pps = HashMap::new();
        let mut vs_mbps = HashMap::new();
        for (id, name, (p, b)) in &per_vs {
            let before = last.vs_counts.get(id).copied();
            vs_pps.insert(name.clone(), rate(*p, before.map(|c| c.0)));
            vs_mbps.insert(name.clone(), rate(*b, before.map(|c| c.1)) * 8.0 / 1e6);
        }
        last.vs_counts = per_vs.iter().map(|(id, _, c)| (*id, *c)).collect();
        let new_connections_per_s = rate(accepted, last.accepted);
        last.accepted = Some(accepted);
        last.cpu = Some(cpu);
        last.packets = Some((packets, now));
        let drains = drains(&mut last.drains, &services);
        drop(last);
        let (claims, peers) = self.failover();
        pb::Heartbeat {
            cpu_pct,
            memory_bytes: rss_bytes(),
            pps,
            connections: self.conns.len() as u64,
            backends_up,
            backends,
            claims,
            peers,
            vs_pps,
            new_connections_per_s,
            vs_mbps,
            cpu_source: cpu_source.to_owned(),
            host_cpu_pct,
            daemon_cpu_pct,
            softirq_pct,
            serving,
            drains,
            bgp: self.bgp(),
        }
    }
}

/// Follows the drains of `services` (the proxy's, retiring ones included): a drain is tracked from
/// the first beat that sees it until it has ended (nothing open), reported at every beat and, when
/// it has ended, once with `done`. A service serving again is dropped without a last report.
fn drains(tracked: &mut Vec<Draining>, services: &[Arc<Service>]) -> Vec<pb::Drain> {
    for s in services {
        if matches!(s.drain_state(), Drain::Draining { .. })
            && !tracked.iter().any(|d| Arc::ptr_eq(&d.service, s))
        {
            tracked.push(Draining {
                service: s.clone(),
                open_at_start: s.stats.active.load(Ordering::Relaxed),
                resets_before: s.stats.drain_resets.load(Ordering::Relaxed),
            });
        }
    }
    let now = Instant::now();
    let mut reports = Vec::new();
    tracked.retain(|d| {
        let Drain::Draining { deadline } = d.service.drain_state() else {
            return false;
        };
        let open = d.service.stats.active.load(Ordering::Relaxed);
        let reset = d
            .service
            .stats
            .drain_resets
            .load(Ordering::Relaxed)
            .saturating_sub(d.resets_before);
        let done = open == 0;
        reports.push(pb::Drain {
            virtual_service: d.service.name.to_string(),
            open,
            finished: d.open_at_start.saturating_sub(open + reset),
            reset,
            remaining_ms: u64::try_from(deadline.saturating_duration_since(now).as_millis())
                .unwrap_or(u64::MAX),
            done,
        });
        if done {
            d.service.drain_end_reported();
        }
        !done
    });
    reports
}

/// Appends heartbeats to a file as JSON lines: the trace `controller simulate --trace` replays.
pub struct Recorder {
    engine: String,
    file: Mutex<std::fs::File>,
}

/// One line of a heartbeat trace (the names `controller simulate` reads).
#[derive(serde::Serialize)]
struct TraceLine<'a> {
    #[serde(rename = "type")]
    kind: &'static str,
    t_ms: u128,
    engine: &'a str,
    cpu_pct: f64,
    pps: u64,
    mbps: f64,
    connections: u64,
    new_connections_per_s: f64,
    vs_pps: BTreeMap<&'a str, f64>,
    vs_mbps: BTreeMap<&'a str, f64>,
}

impl Recorder {
    pub fn create(path: &Path, engine: &str) -> std::io::Result<Recorder> {
        let file = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)?;
        Ok(Recorder {
            engine: engine.to_owned(),
            file: Mutex::new(file),
        })
    }

    /// Appends one heartbeat; a failed write is logged, never fatal.
    pub fn record(&self, h: &pb::Heartbeat) {
        let line = TraceLine {
            kind: "heartbeat",
            t_ms: SystemTime::now()
                .duration_since(UNIX_EPOCH)
                .map_or(0, |d| d.as_millis()),
            engine: &self.engine,
            cpu_pct: h.cpu_pct,
            pps: h.pps,
            mbps: h.vs_mbps.values().sum(),
            connections: h.connections,
            new_connections_per_s: h.new_connections_per_s,
            vs_pps: h.vs_pps.iter().map(|(k, v)| (k.as_str(), *v)).collect(),
            vs_mbps: h.vs_mbps.iter().map(|(k, v)| (k.as_str(), *v)).collect(),
        };
        let Ok(mut text) = serde_json::to_string(&line) else {
            return;
        };
        text.push('\n');
        let mut f = self
            .file
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        if let Err(e) = f.write_all(text.as_bytes()) {
            tracing::warn!(error = %e, "recording a heartbeat failed");
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn host_jiffies_count_busy_and_softirq() {
        let stat = "cpu  100 5 50 800 20 3 7 0 0 0\ncpu0 1 2 3\n";
        assert_eq!(host_jiffies(stat), Some((165, 7, 985)));
        assert_eq!(host_jiffies("intr 1 2\n"), None);
    }

    #[test]
    fn process_ticks_survive_a_command_name_with_spaces() {
        let stat = "1234 (lb daemon) S 1 1234 1234 0 -1 4194560 100 0 0 0 250 75 0 0 20 0 9 0";
        assert_eq!(process_ticks(stat), Some(325));
        assert_eq!(process_ticks("garbage"), None);
    }

    const MOUNTINFO: &str = "\
30 23 0:26 / /sys/fs/cgroup/cpu rw,relatime shared:9 - cgroup cgroup rw,cpu
31 23 0:27 / /sys/fs/cgroup/cpuacct rw,relatime shared:10 - cgroup cgroup rw,cpuacct
35 23 0:31 / /sys/fs/cgroup/unified rw,relatime shared:14 - cgroup2 cgroup2 rw
";

    #[test]
    fn cgroup_files_are_found_in_v1_and_v2_hierarchies() {
        let own = "4:memory:/x\n1:cpu:/lab/se1\n2:cpuacct:/lab/se1\n0::/lab/se1\n";
        let cpu = mount_of(MOUNTINFO, false, "cpu").unwrap();
        assert_eq!(
            in_hierarchy(&cpu, &cgroup_path(own, false, "cpu").unwrap()),
            PathBuf::from("/sys/fs/cgroup/cpu/lab/se1")
        );
        let acct = mount_of(MOUNTINFO, false, "cpuacct").unwrap();
        assert_eq!(acct.0, PathBuf::from("/sys/fs/cgroup/cpuacct"));
        let v2 = mount_of(MOUNTINFO, true, "").unwrap();
        assert_eq!(
            in_hierarchy(&v2, &cgroup_path(own, true, "").unwrap()),
            PathBuf::from("/sys/fs/cgroup/unified/lab/se1")
        );
        // A combined "cpu,cpuacct" hierarchy serves both.
        let combined =
            "30 23 0:26 / /sys/fs/cgroup/cpu,cpuacct rw - cgroup cgroup rw,cpu,cpuacct\n";
        assert!(mount_of(combined, false, "cpuacct").is_some());
        assert_eq!(
            cgroup_path("3:cpu,cpuacct:/a\n", false, "cpuacct").as_deref(),
            Some("/a")
        );
    }

    #[test]
    fn the_engines_cpu_is_its_usage_against_its_quota() {
        let t0 = Instant::now();
        let before = CpuTimes {
            host_busy: 1000,
            host_softirq: 100,
            host_total: 4000,
            daemon_ticks: 50,
            cgroup: Some((0, 0.5)),
            at: Some(t0),
        };
        // 2 s later on 2 CPUs: 400 jiffies, 100 busy (10 softirq); the daemon used 40 ticks; its
        // cgroup 0.9 s of CPU against a quota of half a CPU.
        let after = CpuTimes {
            host_busy: 1100,
            host_softirq: 110,
            host_total: 4400,
            daemon_ticks: 90,
            cgroup: Some((900_000_000, 0.5)),
            at: Some(t0 + std::time::Duration::from_secs(2)),
        };
        let (cpu, source, host, daemon, softirq) = cpu_shares(&before, &after, 2.0);
        assert_eq!(source, "cgroup");
        assert!((cpu - 90.0).abs() < 1e-9, "{cpu}");
        assert!((host - 25.0).abs() < 1e-9, "{host}");
        assert!((softirq - 2.5).abs() < 1e-9, "{softirq}");
        assert!((daemon - 10.0).abs() < 1e-9, "{daemon}");
        // Without a quota: the host's.
        let (cpu, source, ..) = cpu_shares(
            &CpuTimes {
                cgroup: None,
                ..before
            },
            &CpuTimes {
                cgroup: None,
                ..after
            },
            2.0,
        );
        assert_eq!((source, cpu), ("host", host));
    }
}
