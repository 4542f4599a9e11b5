//! `lb-bench`: benchmarks, run by `cargo xtask bench <what>`. Results go to `bench/results/`.

mod bgp;
mod control;
mod e2e;
mod failover;
mod fuzz;
mod machine;
mod rebalance;
mod relay;
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
    /// End to end in the namespace lab: ours (XDP primary → engine proxies) vs `HAProxy` and nginx
    /// stream vs direct, with wrk (keep-alive, short connections) and iperf3.
    E2e(e2e::Options),
    /// The TCP proxy's relay (copy, splice, tokio-uring) on loopback against a direct connection.
    Relay(relay::Options),
    /// The control plane: change-to-ACK latency on every engine, the controller's CPU and memory.
    Control(control::Options),
    /// Failover: a dead secondary marked down, a gone primary replaced, held connections lost;
    /// against keepalived (VRRP) in the same lab.
    Failover(failover::Options),
    /// The auto-rebalance loop: `controller simulate`'s replay speed, in engine-hours of trace
    /// per second.
    Rebalance(rebalance::Options),
    /// BGP: dead (kill -9, SIGSTOP with BFD and with the hold timer only) and new engines against
    /// BIRD and FRR, time until the router's next hop changes.
    Bgp(bgp::Options),
    /// Fuzzing the daemon's network decoders (BGP stream, BFD, peer messages) with cargo fuzz,
    /// for a bounded time per target (nightly).
    Fuzz(fuzz::Options),
}

fn main() -> anyhow::Result<()> {
    if !nix::unistd::geteuid().is_root() {
        anyhow::bail!("needs root (loads XDP programs)");
    }
    match Cli::parse().what {
        What::Xdp(opts) => xdp::run(&opts),
        What::E2e(opts) => e2e::run(&opts),
        What::Relay(opts) => relay::run(&opts),
        What::Control(opts) => control::run(&opts),
        What::Failover(opts) => failover::run(&opts),
        What::Rebalance(opts) => rebalance::run(&opts),
        What::Bgp(opts) => bgp::run(&opts),
        What::Fuzz(opts) => fuzz::run(&opts),
    }
}
