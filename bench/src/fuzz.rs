//! Fuzzing what the daemon decodes from the network, for a bounded time: `cargo fuzz` (libFuzzer,
//! `AddressSanitizer`, nightly) on the targets in `lb-daemon/fuzz` — a BGP peer's byte stream
//! (framing, netgauze's decoder, the OPEN checks), a BFD control packet sequence through the
//! session's state machine, and a datagram on the engines' peer port (MAC check and body
//! decoders). Each target starts from its committed seeds (`seeds/<target>`) and the corpus it
//! grew in earlier runs (`corpus/<target>`, not committed). A crash stops that target; its input
//! is in `artifacts/<target>/` and the benchmark fails after running the others. The report
//! (`fuzz.json`) has each target's executions, their rate, the corpus size and its peak memory.
//! Not in CI: it needs nightly and minutes of CPU.

use std::{
    fs,
    io::{BufRead, BufReader},
    path::{Path, PathBuf},
    process::{Command, Stdio},
};

use anyhow::{Context, Result, bail, ensure};
use serde::Serialize;

use crate::machine::{cmd_output, cpu_model};

const TARGETS: [&str; 3] = ["bgp_stream", "bfd_packet", "peer_message"];

#[derive(clap::Args)]
pub struct Options {
    /// Fuzzing time per target, seconds (the build is not counted).
    #[arg(long, default_value_t = 60)]
    seconds: u64,
    /// Targets to run (all by default): `bgp_stream`, `bfd_packet`, `peer_message`.
    #[arg(long = "target", value_parser = clap::builder::PossibleValuesParser::new(TARGETS))]
    targets: Vec<String>,
    /// The fuzz crate.
    #[arg(long, default_value = "lb-daemon/fuzz")]
    fuzz_dir: PathBuf,
    #[arg(long)]
    out_dir: Option<PathBuf>,
}

#[derive(Serialize)]
struct Report {
    date: String,
    machine: String,
    seconds_per_target: u64,
    targets: Vec<TargetRun>,
}

#[derive(Serialize)]
struct TargetRun {
    target: String,
    runs: u64,
    runs_per_s: f64,
    /// Inputs in the corpus after the run (the seeds not counted).
    corpus_inputs: usize,
    peak_rss_mb: u64,
    /// The input that crashed the target, if one did.
    crash: Option<String>,
}

pub fn run(opts: &Options) -> Result<()> {
    ensure!(opts.seconds > 0, "--seconds must be at least 1");
    ensure!(
        opts.fuzz_dir.join("Cargo.toml").is_file(),
        "no fuzz crate in {} (run from the repository root)",
        opts.fuzz_dir.display()
    );
    let targets: Vec<&str> = if opts.targets.is_empty() {
        TARGETS.to_vec()
    } else {
        opts.targets.iter().map(String::as_str).collect()
    };
    let mut runs = Vec::new();
    for target in targets {
        let r = fuzz(&opts.fuzz_dir, target, opts.seconds)?;
        println!(
            "{target}: {} runs in {} s ({:.0}/s), corpus {} inputs, peak RSS {} MB{}",
            r.runs,
            opts.seconds,
            r.runs_per_s,
            r.corpus_inputs,
            r.peak_rss_mb,
            r.crash
                .as_ref()
                .map(|c| format!(", CRASHED: {c}"))
                .unwrap_or_default()
        );
        runs.push(r);
    }
    let report = Report {
        date: cmd_output("date", &["-u", "+%Y-%m-%d %H:%M UTC"]),
        machine: cpu_model(),
        seconds_per_target: opts.seconds,
        targets: runs,
    };
    let dir = crate::machine::results_dir(opts.out_dir.as_deref())?;
    let path = dir.join("fuzz.json");
    fs::write(&path, serde_json::to_string_pretty(&report)? + "\n")?;
    println!("→ {}", path.display());
    let crashed: Vec<_> = report
        .targets
        .iter()
        .filter_map(|t| t.crash.as_ref().map(|c| format!("{}: {c}", t.target)))
        .collect();
    if !crashed.is_empty() {
        bail!(
            "fuzzing found crashes (reproduce with `cargo +nightly fuzz run TARGET INPUT` in {}):\n{}",
            opts.fuzz_dir.display(),
            crashed.join("\n")
        );
    }
    Ok(())
}

/// One target for `seconds`: libFuzzer's final statistics, and the crash input if it wrote one.
fn fuzz(dir: &Path, target: &str, seconds: u64) -> Result<TargetRun> {
    let corpus = dir.join("corpus").join(target);
    fs::create_dir_all(&corpus)?;
    let mut child = Command::new("cargo")
        .current_dir(dir)
        .args(["+nightly", "fuzz", "run", target])
        .arg(Path::new("corpus").join(target))
        .arg(Path::new("seeds").join(target))
        .args([
            "--",
            &format!("-max_total_time={seconds}"),
            "-print_final_stats=1",
            "-rss_limit_mb=2048",
        ])
        .stderr(Stdio::piped())
        .spawn()
        .context("cannot run `cargo +nightly fuzz` (cargo xtask bench fuzz installs it)")?;
    let stderr = child.stderr.take().context("no stderr")?;
    let (mut runs, mut peak_rss_mb, mut crash) = (0, 0, None);
    for line in BufReader::new(stderr).lines() {
        let line = line?;
        // libFuzzer's progress lines (`#1024 NEW cov: …`) are many: show the rest.
        if !line.starts_with('#') {
            eprintln!("{line}");
        }
        if let Some(v) = line.strip_prefix("stat::number_of_executed_units:") {
            runs = v.trim().parse().unwrap_or(0);
        } else if let Some(v) = line.strip_prefix("stat::peak_rss_mb:") {
            peak_rss_mb = v.trim().parse().unwrap_or(0);
        } else if let Some((_, file)) = line.split_once("Test unit written to ") {
            crash = Some(file.trim().to_owned());
        }
    }
    let status = child.wait()?;
    if !status.success() && crash.is_none() {
        bail!("`cargo fuzz run {target}` failed ({status}) without a crash input: see above");
    }
    Ok(TargetRun {
        target: target.to_owned(),
        runs,
        #[allow(clippy::cast_precision_loss)]
        runs_per_s: runs as f64 / seconds as f64,
        corpus_inputs: fs::read_dir(&corpus)?.count(),
        peak_rss_mb,
        crash,
    })
}
