//! A load-balancer lab in network namespaces.
//!
//! Every "host" (client, engines) is a network namespace that the lab creates with a unique name and
//! deletes again on drop (also on panic). Hosts share one L2 segment: namespace `sw` with bridge `br0`,
//! one veth pair per host. Everything is done with `ip`, `sysctl` and `ethtool` commands, so every step
//! can be repeated by hand.
//!
//! - [`lab`]: the topology builder ([`Lab`]) and tracked processes ([`Proc`]).
//! - [`netns`]: running Rust code inside a namespace (a thread that `setns`'d).
//! - [`nginx`]: an nginx per namespace answering its own name.
//! - [`engine`]: primary / secondary engine setup (VIP placement, ARP sysctls, nginx).
//! - [`daemon`]: `lb-daemon` config writer and process (reload, metrics, graceful stop).
//! - [`client`]: HTTP connection load from the client namespace, held keep-alive connections.
//! - [`steering`]: the standard topology used by the end-to-end tests and `lb-lab`.
//! - [`proxy_lab`]: engines whose daemon proxies the VIP to backend hosts (nginx, iperf3).
//! - [`baselines`]: `HAProxy` and nginx `stream` in a namespace (benchmark comparisons).
//! - [`tools`]: `wrk` and `iperf3` runs with parsed results.
//!
//! Needs root. The two veth traps of `/work/shared/notes/netns-lab.md` are handled here: every bridge
//! port can get an `XDP_PASS` program ([`Lab::enable_xdp_pass`]) and every host interface has tx
//! checksum offload turned off ([`Lab::attach`]).

pub mod baselines;
pub mod bgp_lab;
pub mod cgroup;
pub mod client;
pub mod cmd;
pub mod controller_lab;
pub mod daemon;
pub mod engine;
pub mod fixtures;
pub mod lab;
pub mod netns;
pub mod nginx;
pub mod proxy_lab;
pub mod steering;
pub mod tools;
pub mod tunnel;

use std::path::PathBuf;

pub use lab::{Iface, Lab, Ns, Proc};

/// The workspace root (the directory above this package).
pub fn workspace_root() -> PathBuf {
    let manifest = PathBuf::from(env!("CARGO_MANIFEST_DIR"));
    manifest.parent().map_or(manifest.clone(), PathBuf::from)
}

/// The daemon binary: `$LB_DAEMON_BIN`, default `<workspace>/target/debug/lb-daemon`.
pub fn daemon_bin() -> PathBuf {
    std::env::var_os("LB_DAEMON_BIN").map_or_else(
        || workspace_root().join("target/debug/lb-daemon"),
        PathBuf::from,
    )
}

/// The controller binary: `$LB_CONTROLLER_BIN`, default `<workspace>/target/debug/controller`.
pub fn controller_bin() -> PathBuf {
    std::env::var_os("LB_CONTROLLER_BIN").map_or_else(
        || workspace_root().join("target/debug/controller"),
        PathBuf::from,
    )
}

/// The CLI: `$LB_LBCTL_BIN`, default `<workspace>/target/debug/lbctl`.
pub fn lbctl_bin() -> PathBuf {
    std::env::var_os("LB_LBCTL_BIN").map_or_else(
        || workspace_root().join("target/debug/lbctl"),
        PathBuf::from,
    )
}

/// The data plane object: `$LB_XDP_OBJECT`, default `<workspace>/target/bpf/lb-xdp.o`.
pub fn xdp_object() -> PathBuf {
    std::env::var_os("LB_XDP_OBJECT").map_or_else(
        || workspace_root().join("target/bpf/lb-xdp.o"),
        PathBuf::from,
    )
}

/// The data plane built at another optimisation level (`lb-xdp-variant.o` beside [`xdp_object`]): a
/// different but compatible object to upgrade a running engine to.
pub fn xdp_variant_object() -> PathBuf {
    xdp_object().with_file_name("lb-xdp-variant.o")
}

/// The lab and benchmark helper object (`xdp_pass`, `xdp_floor`, `bench_wrap`), built beside the
/// data plane object: `lb-xdp-testkit.o` in the directory of [`xdp_object`].
pub fn testkit_object() -> PathBuf {
    xdp_object().with_file_name("lb-xdp-testkit.o")
}

/// True when running as root. Tests that need namespaces and XDP print a skip note and return
/// when this is false.
pub fn is_root() -> bool {
    nix::unistd::geteuid().is_root()
}

/// For tests: `if !lb_tests::require_root() { return; }` prints the standard skip message.
pub fn require_root() -> bool {
    if is_root() {
        true
    } else {
        eprintln!("skipping: needs root (network namespaces, XDP)");
        false
    }
}
