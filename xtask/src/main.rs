//! `cargo xtask <command>`: the project's build, test and benchmark tasks.
//!
//! The XDP program (`lb-ebpf`) is built with Debian's rustc and `bpf-linker` (see
//! `lb-ebpf/README.md`); everything else with the rustup toolchain that runs this tool.

mod setup;
mod util;

use std::ffi::OsString;
use std::fs;
use std::process::ExitCode;

use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};

use util::{
    CommandFailed, cargo, cmd, daemon_bin, root, run, target_dir, testkit_object, variant_object,
    xdp_object,
};

#[derive(Parser)]
#[command(about = "Project tasks for the XDP load balancer")]
struct Cli {
    #[command(subcommand)]
    command: Task,
}

#[derive(Subcommand)]
enum Task {
    /// Install what a fresh Debian 12 machine lacks (root), mount bpffs, then build-ebpf.
    Setup,
    /// Build the XDP program into target/bpf/lb-xdp.o.
    BuildEbpf,
    /// build-ebpf, then build the workspace (debug) and the daemon (release).
    Build,
    /// setup, build the daemon, then `cargo test --workspace [ARGS]`.
    ///
    /// ARGS go to `cargo test` as given: `cargo xtask test -- --nocapture`, `cargo xtask test conntrack`.
    Test {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// setup, build the daemon, then run the lab (`lb-lab [ARGS]`).
    Lab {
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
    /// setup, then run a benchmark (`lb-bench WHAT [ARGS]`, release build).
    Bench {
        what: Bench,
        #[arg(trailing_var_arg = true, allow_hyphen_values = true)]
        args: Vec<OsString>,
    },
}

#[derive(Clone, Copy, ValueEnum)]
enum Bench {
    /// The XDP program alone, through `BPF_PROG_TEST_RUN`.
    Xdp,
    /// End to end in the namespace lab: ours vs `HAProxy` vs nginx stream vs direct (release daemon).
    E2e,
    /// The TCP proxy's relay kinds on loopback (`bench/results/relay.md`).
    Relay,
    /// The control plane: change-to-ACK latency, controller CPU and memory (release controller).
    Control,
    /// Failover times and lost connections against keepalived (release daemon and controller).
    Failover,
    /// The auto-rebalance loop: the simulator's replay speed (`bench/results/rebalance.json`).
    Rebalance,
    /// BGP: next-hop changes at BIRD and FRR for dead and new engines (release daemon).
    Bgp,
    /// Fuzzing the daemon's network decoders for a bounded time (installs nightly and cargo-fuzz).
    Fuzz,
}

impl Bench {
    fn name(self) -> &'static str {
        match self {
            Bench::Xdp => "xdp",
            Bench::E2e => "e2e",
            Bench::Relay => "relay",
            Bench::Control => "control",
            Bench::Failover => "failover",
            Bench::Rebalance => "rebalance",
            Bench::Bgp => "bgp",
            Bench::Fuzz => "fuzz",
        }
    }
}

fn main() -> ExitCode {
    let cli = Cli::parse();
    match dispatch(cli.command) {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("xtask: error: {e:#}");
            let code = e
                .downcast_ref::<CommandFailed>()
                .and_then(|f| f.code)
                .and_then(|c| u8::try_from(c).ok())
                .filter(|&c| c != 0)
                .unwrap_or(1);
            ExitCode::from(code)
        }
    }
}

fn dispatch(task: Task) -> anyhow::Result<()> {
    match task {
        Task::Setup => setup::setup(),
        Task::BuildEbpf => build_ebpf(),
        Task::Build => build(),
        Task::Test { args } => test(&restore_separator(args)),
        Task::Lab { args } => lab(&args),
        Task::Bench { what, args } => bench(what, &args),
    }
}

/// clap drops a `--` right after the subcommand, but `cargo test` needs it to tell its own options
/// from the test harness's (`cargo xtask test -- --nocapture`): put it back.
fn restore_separator(mut args: Vec<OsString>) -> Vec<OsString> {
    if std::env::args_os().nth(2).is_some_and(|a| a == "--") {
        args.insert(0, "--".into());
    }
    args
}

/// Builds `lb-ebpf` with Debian's toolchain (its own target dir) and copies the objects to
/// `target/bpf/lb-xdp.o` (the data plane) and `target/bpf/lb-xdp-testkit.o` (benchmark helpers).
/// It also builds the same source at another optimisation level into
/// `target/bpf/lb-xdp-variant.o`: a different but compatible object, which the restart tests
/// upgrade a running engine to.
pub fn build_ebpf() -> anyhow::Result<()> {
    let crate_dir = root().join("lb-ebpf");
    let ebpf_cargo = |target_dir: &str| {
        let mut c = cmd("/usr/bin/cargo");
        c.current_dir(&crate_dir)
            .args(["build", "--release", "--target", "bpfel-unknown-none"])
            .args(["--target-dir", target_dir])
            .env("RUSTC_BOOTSTRAP", "1")
            .env("RUSTC", "/usr/bin/rustc")
            // Settings meant for the userspace build must not leak into this one.
            .env_remove("CARGO_TARGET_DIR")
            .env_remove("CARGO_BUILD_TARGET_DIR")
            .env_remove("RUSTFLAGS")
            .env_remove("CARGO_ENCODED_RUSTFLAGS")
            .env_remove("RUSTC_WRAPPER")
            .env_remove("RUSTC_WORKSPACE_WRAPPER");
        c
    };
    run(&mut ebpf_cargo("target"))?;
    run(ebpf_cargo("target/variant").env("CARGO_PROFILE_RELEASE_OPT_LEVEL", "2"))?;
    for (dir, name, object) in [
        ("target", "lb-xdp", xdp_object()),
        ("target", "lb-xdp-testkit", testkit_object()),
        ("target/variant", "lb-xdp", variant_object()),
    ] {
        let built = crate_dir
            .join(dir)
            .join("bpfel-unknown-none/release")
            .join(name);
        let dir = object.parent().expect("object path has a parent");
        fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
        fs::copy(&built, &object)
            .with_context(|| format!("cannot copy {} to {}", built.display(), object.display()))?;
        println!("{}", object.display());
    }
    Ok(())
}

fn build() -> anyhow::Result<()> {
    build_ebpf()?;
    run(cargo().args(["build", "--workspace"]))?;
    run(cargo().args(["build", "--release", "-p", "lb-daemon"]))
}

fn test(args: &[OsString]) -> anyhow::Result<()> {
    setup::setup()?;
    // The end-to-end tests run these binaries.
    run(cargo().args(["build", "-p", "lb-daemon", "-p", "controller"]))?;
    run(cargo()
        .args(["test", "--workspace"])
        .args(args)
        .env("LB_XDP_OBJECT", xdp_object())
        .env("LB_DAEMON_BIN", daemon_bin()))
}

fn lab(args: &[OsString]) -> anyhow::Result<()> {
    setup::setup()?;
    run(cargo().args(["build", "-p", "lb-daemon", "-p", "controller"]))?;
    run(cargo()
        .args(["run", "-p", "lb-tests", "--bin", "lb-lab", "--"])
        .args(args)
        .env("LB_XDP_OBJECT", xdp_object())
        .env("LB_DAEMON_BIN", daemon_bin()))
}

fn bench(what: Bench, args: &[OsString]) -> anyhow::Result<()> {
    setup::setup()?;
    let mut bench = cargo();
    bench
        .args(["run", "--release", "-p", "lb-bench", "--", what.name()])
        .args(args)
        .env("LB_XDP_OBJECT", xdp_object());
    if matches!(what, Bench::Fuzz) {
        setup::fuzz_tools()?;
    }
    if matches!(what, Bench::Control) {
        run(cargo().args(["build", "--release", "-p", "controller"]))?;
        bench.env("LB_CONTROLLER_BIN", target_dir().join("release/controller"));
    }
    if matches!(
        what,
        Bench::E2e | Bench::Failover | Bench::Rebalance | Bench::Bgp
    ) {
        // The daemon under test is the release build.
        run(cargo().args(["build", "--release", "-p", "lb-daemon"]))?;
        bench.env("LB_DAEMON_BIN", target_dir().join("release/lb-daemon"));
    }
    if matches!(what, Bench::Failover | Bench::Rebalance) {
        run(cargo().args(["build", "--release", "-p", "controller"]))?;
        bench
            .env("LB_CONTROLLER_BIN", target_dir().join("release/controller"))
            .env("LB_LBCTL_BIN", target_dir().join("release/lbctl"));
    }
    run(&mut bench)
}
