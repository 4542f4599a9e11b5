//! Running host commands (`ip`, `sysctl`, `ethtool`, ...) with errors that say what failed.

use std::process::{Command, Output};

use anyhow::{Context, Result, bail};

/// Runs `argv` and returns its stdout; a non-zero exit is an error carrying the command line and
/// its stderr.
pub fn run(argv: &[&str]) -> Result<String> {
    let out = output(argv)?;
    if !out.status.success() {
        bail!(
            "`{}` failed ({}): {}",
            argv.join(" "),
            out.status,
            String::from_utf8_lossy(&out.stderr).trim()
        );
    }
    Ok(String::from_utf8_lossy(&out.stdout).into_owned())
}

/// Runs `argv` and returns whatever it did (for commands whose failure is not an error, such as
/// cleanup).
pub fn output(argv: &[&str]) -> Result<Output> {
    let (program, rest) = argv.split_first().context("empty command")?;
    Command::new(program)
        .args(rest)
        .output()
        .with_context(|| format!("cannot run `{}`", argv.join(" ")))
}

/// Runs `argv` and ignores the result (cleanup paths).
pub fn run_quiet(argv: &[&str]) {
    let _ = output(argv);
}
