//! `lb-bench`: benchmarks, run by `cargo xtask bench <what>`. Results go to `bench/results/`.

mod xdp;

use clap::{Parser, Subcommand};

#[derive(Parser)]
#[command(about = "Load balancer benchmarks (need root)")]
struct Cli {
    #[command(subcommand)]
    what: What,
}

#[derive(Subcommand)]
enum What {
    /// ns/packet of the XDP program's paths against a trivial `XDP_TX` program, via `BPF_PROG_TEST_RUN`.
    Xdp(xdp::Options),
}

fn main() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("needs root (loads XDP programs)");
    }
    match Cli::parse().what {
        What::Xdp(opts) => xdp::run(&opts),
    }
}
