//! `cargo xtask setup`: make a fresh Debian 12 machine able to build and test everything.
//! Every step checks first and does nothing when its work is already done.

use std::fs;
use std::path::Path;
use std::process::Command;

use anyhow::{Context, bail};

use crate::util::{cargo, cmd, find_in_path, run};

/// Debian packages: the BPF toolchain (see `lb-ebpf/README.md`) and the tools the tests and benchmarks run.
const PACKAGES: &[&str] = &[
    // Debian's rustc ships a prebuilt `core` for bpfel-unknown-none; bpf-linker links against LLVM 22.
    "rustc-web",
    "cargo-web",
    "libstd-rust-web-dev-bpf",
    "llvm-22-dev",
    "clang-19",
    "bpftool",
    // Lab and benchmarks.
    "iproute2",
    "ethtool",
    "nginx-light",
    "libnginx-mod-stream",
    "haproxy",
    "wrk",
    "iperf3",
    "tcpdump",
    // Holds back a client's handshake ACKs in the migration test.
    "nftables",
    "iputils-ping",
    "curl",
    // The failover benchmark's baseline (VRRP).
    "keepalived",
    // Real BGP routers and speakers the BGP tests peer with.
    "bird2",
    "frr",
    "gobgpd",
];

const LLVM_PREFIX: &str = "/usr/lib/llvm-22";
const BPFFS: &str = "/sys/fs/bpf";

pub fn setup() -> anyhow::Result<()> {
    let root = is_root();
    install_packages(root)?;
    install_bpf_linker()?;
    mount_bpffs(root)?;
    crate::build_ebpf()?;
    Ok(())
}

/// Whether we run with effective uid 0 (from `/proc/self/status`).
fn is_root() -> bool {
    let Ok(status) = fs::read_to_string("/proc/self/status") else {
        return false;
    };
    status
        .lines()
        .find_map(|l| l.strip_prefix("Uid:"))
        .and_then(|ids| ids.split_whitespace().nth(1))
        == Some("0")
}

fn is_installed(package: &str) -> anyhow::Result<bool> {
    let out = Command::new("dpkg-query")
        .args(["-W", "-f=${Status}", package])
        .output()
        .context("cannot run dpkg-query: setup supports Debian only")?;
    // "install ok installed" (or "hold ok installed"); a package dpkg never saw makes it fail.
    Ok(out.status.success()
        && String::from_utf8_lossy(&out.stdout)
            .split_whitespace()
            .nth(2)
            == Some("installed"))
}

fn install_packages(root: bool) -> anyhow::Result<()> {
    let mut missing = Vec::new();
    for &package in PACKAGES {
        if !is_installed(package)? {
            missing.push(package);
        }
    }
    if missing.is_empty() {
        eprintln!(
            "setup: all {} Debian packages are installed",
            PACKAGES.len()
        );
        return Ok(());
    }
    if !root {
        bail!(
            "setup needs these Debian packages, and installing them needs root:\n  \
             apt-get update && DEBIAN_FRONTEND=noninteractive apt-get install -y {}",
            missing.join(" ")
        );
    }
    run(Command::new("apt-get").arg("update"))?;
    run(Command::new("apt-get")
        .env("DEBIAN_FRONTEND", "noninteractive")
        .args(["install", "-y"])
        .args(&missing))
}

fn install_bpf_linker() -> anyhow::Result<()> {
    if let Some(path) = find_in_path("bpf-linker") {
        eprintln!("setup: bpf-linker is {}", path.display());
        return Ok(());
    }
    // Against Debian's LLVM 22; without the -L the link fails with `unable to find library -lLLVM`.
    run(cargo()
        .args([
            "install",
            "bpf-linker",
            "--no-default-features",
            "--features",
            "llvm-22",
        ])
        .env("RUSTFLAGS", format!("-L {LLVM_PREFIX}/lib"))
        .env("LLVM_SYS_221_PREFIX", LLVM_PREFIX))?;
    match find_in_path("bpf-linker") {
        Some(path) => {
            eprintln!("setup: bpf-linker is {}", path.display());
            Ok(())
        }
        None => bail!(
            "`cargo install bpf-linker` succeeded but bpf-linker is neither in PATH nor in the cargo bin directory"
        ),
    }
}

fn bpffs_mounted() -> bool {
    fs::read_to_string("/proc/mounts").is_ok_and(|mounts| {
        mounts.lines().any(|l| {
            let mut fields = l.split_whitespace().skip(1);
            fields.next() == Some(BPFFS) && fields.next() == Some("bpf")
        })
    })
}

fn mount_bpffs(root: bool) -> anyhow::Result<()> {
    if bpffs_mounted() {
        eprintln!("setup: bpffs is mounted at {BPFFS}");
        return Ok(());
    }
    if !root {
        eprintln!(
            "setup: warning: bpffs is not mounted at {BPFFS} and mounting it needs root \
             (`mount -t bpf bpf {BPFFS}`); the daemon cannot pin its maps without it"
        );
        return Ok(());
    }
    if !Path::new(BPFFS).is_dir() {
        fs::create_dir_all(BPFFS).with_context(|| format!("cannot create {BPFFS}"))?;
    }
    run(cmd("mount").args(["-t", "bpf", "bpf", BPFFS]))
}

/// What `bench fuzz` runs on: a nightly toolchain (the sanitizer) and cargo-fuzz.
pub fn fuzz_tools() -> anyhow::Result<()> {
    let toolchains = Command::new("rustup")
        .args(["toolchain", "list"])
        .output()
        .context("cannot run rustup: the fuzz benchmark needs a nightly toolchain from rustup")?;
    if String::from_utf8_lossy(&toolchains.stdout)
        .lines()
        .any(|l| l.starts_with("nightly"))
    {
        eprintln!("setup: a nightly toolchain is installed");
    } else {
        run(cmd("rustup").args(["toolchain", "install", "nightly", "--profile", "minimal"]))?;
    }
    if let Some(path) = find_in_path("cargo-fuzz") {
        eprintln!("setup: cargo-fuzz is {}", path.display());
        return Ok(());
    }
    run(cargo().args(["install", "cargo-fuzz", "--locked", "--version", "0.13.2"]))
}
