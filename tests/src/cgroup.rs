//! A CPU quota per engine: the namespaces share the host's CPUs, so an engine's CPU reading would
//! be the host's. A daemon moved into a cgroup of its own with a CPU quota reports its usage
//! against the quota (`cpu_source = "cgroup"` in its heartbeats), an honest per-engine reading
//! that a load can push past a threshold. cgroup v1 (`cpu` + `cpuacct`, as on a hybrid host) or
//! v2 (`cpu.max`, where the v2 tree has the cpu controller). Removed on drop (its processes go
//! back to the root cgroup first).
//!
//! `ip netns exec` gives the command a mount namespace with a fresh `/sys` and no cgroup mounts,
//! so a daemon started there cannot read its cgroup: [`CpuQuota::wrapper`] mounts the hierarchies
//! in that namespace, moves the shell into the cgroup and `exec`s the daemon.

use std::{
    fs,
    path::{Path, PathBuf},
};

use anyhow::{Context, Result, bail};

pub struct CpuQuota {
    name: String,
    v1: bool,
    /// The cgroup directories made (one per v1 hierarchy, or one v2).
    dirs: Vec<PathBuf>,
    /// Where processes go back to on drop.
    roots: Vec<PathBuf>,
}

const V1_CPU: &str = "/sys/fs/cgroup/cpu";
const V1_CPUACCT: &str = "/sys/fs/cgroup/cpuacct";
const V2: &str = "/sys/fs/cgroup";

fn v2_has_cpu() -> bool {
    fs::read_to_string(Path::new(V2).join("cgroup.controllers"))
        .is_ok_and(|c| c.split_whitespace().any(|x| x == "cpu"))
}

impl CpuQuota {
    /// A cgroup `name` limited to `cpus` CPUs' worth of time (e.g. 0.2).
    pub fn new(name: &str, cpus: f64) -> Result<CpuQuota> {
        let period: u32 = 100_000;
        #[allow(clippy::cast_possible_truncation, clippy::cast_sign_loss)]
        let quota = (cpus * f64::from(period)) as u64;
        if Path::new(V1_CPU).join("cpu.cfs_quota_us").exists()
            && Path::new(V1_CPUACCT).join("cpuacct.usage").exists()
        {
            let q = CpuQuota {
                name: name.to_owned(),
                v1: true,
                dirs: vec![
                    Path::new(V1_CPU).join(name),
                    Path::new(V1_CPUACCT).join(name),
                ],
                roots: vec![V1_CPU.into(), V1_CPUACCT.into()],
            };
            for d in &q.dirs {
                fs::create_dir_all(d).with_context(|| format!("mkdir {}", d.display()))?;
            }
            write(&q.dirs[0].join("cpu.cfs_period_us"), &period.to_string())?;
            write(&q.dirs[0].join("cpu.cfs_quota_us"), &quota.to_string())?;
            return Ok(q);
        }
        if v2_has_cpu() {
            let root = PathBuf::from(V2);
            let subtree = fs::read_to_string(root.join("cgroup.subtree_control"))?;
            if !subtree.split_whitespace().any(|c| c == "cpu") {
                write(&root.join("cgroup.subtree_control"), "+cpu")?;
            }
            let dir = root.join(name);
            fs::create_dir_all(&dir).with_context(|| format!("mkdir {}", dir.display()))?;
            write(&dir.join("cpu.max"), &format!("{quota} {period}"))?;
            return Ok(CpuQuota {
                name: name.to_owned(),
                v1: false,
                dirs: vec![dir],
                roots: vec![root],
            });
        }
        bail!("no cgroup CPU controller (v1 cpu+cpuacct or v2 cpu) on this host")
    }

    /// A command prefix (`sh -c SCRIPT sh`) for `ip netns exec`: it mounts the cgroup
    /// hierarchies in the command's own mount namespace (so the daemon can read them), moves
    /// itself into this cgroup and `exec`s the rest of its argv.
    pub fn wrapper(&self) -> Vec<String> {
        let name = &self.name;
        let script = if self.v1 {
            format!(
                "set -e; mount -t tmpfs lb-cgroups /sys/fs/cgroup; \
                 for c in cpu cpuacct; do mkdir -p /sys/fs/cgroup/$c; \
                 mount -t cgroup -o $c cgroup /sys/fs/cgroup/$c; \
                 echo $$ > /sys/fs/cgroup/$c/{name}/cgroup.procs; done; exec \"$@\""
            )
        } else {
            format!(
                "set -e; mount -t cgroup2 cgroup2 /sys/fs/cgroup; \
                 echo $$ > /sys/fs/cgroup/{name}/cgroup.procs; exec \"$@\""
            )
        };
        vec!["sh".into(), "-c".into(), script, "sh".into()]
    }
}

fn write(path: &Path, value: &str) -> Result<()> {
    fs::write(path, value).with_context(|| format!("write {value:?} to {}", path.display()))
}

impl Drop for CpuQuota {
    fn drop(&mut self) {
        for (d, root) in self.dirs.iter().zip(&self.roots) {
            if let Ok(procs) = fs::read_to_string(d.join("cgroup.procs")) {
                for pid in procs.split_whitespace() {
                    let _ = fs::write(root.join("cgroup.procs"), pid);
                }
            }
            let _ = fs::remove_dir(d);
        }
    }
}
