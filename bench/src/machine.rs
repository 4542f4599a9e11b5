//! Facts about the machine a benchmark ran on, for its report.

use std::fs;

/// A command's standard output, trimmed ("" if it cannot run).
pub fn cmd_output(cmd: &str, args: &[&str]) -> String {
    std::process::Command::new(cmd)
        .args(args)
        .output()
        .map(|o| String::from_utf8_lossy(&o.stdout).trim().to_owned())
        .unwrap_or_default()
}

/// "MODEL, N cores", from `/proc/cpuinfo` (which, unlike the scheduler, ignores CPU pinning).
pub fn cpu_model() -> String {
    let text = fs::read_to_string("/proc/cpuinfo").unwrap_or_default();
    let model = text
        .lines()
        .find_map(|l| l.strip_prefix("model name"))
        .and_then(|l| l.split_once(':'))
        .map_or_else(|| "unknown CPU".to_owned(), |(_, m)| m.trim().to_owned());
    let cores = text.lines().filter(|l| l.starts_with("processor")).count();
    format!("{model}, {cores} cores")
}

/// The median of `v`: the middle value, or the mean of the two middle ones; NaN (null in a
/// report) when there is none.
pub fn median(v: &[f64]) -> f64 {
    let mut v = v.to_vec();
    v.sort_by(f64::total_cmp);
    let m = v.len() / 2;
    match v.len() {
        0 => f64::NAN,
        n if n % 2 == 1 => v[m],
        _ => f64::midpoint(v[m - 1], v[m]),
    }
}

/// The 1, 5 and 15 minute load averages.
pub fn loadavg() -> String {
    fs::read_to_string("/proc/loadavg")
        .map(|l| l.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Where a benchmark writes its report: `--out-dir`, else `bench/results`; created if missing.
pub fn results_dir(out_dir: Option<&std::path::Path>) -> anyhow::Result<std::path::PathBuf> {
    let dir = out_dir.map_or_else(|| "bench/results".into(), std::path::Path::to_path_buf);
    fs::create_dir_all(&dir)?;
    Ok(dir)
}
