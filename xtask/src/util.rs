//! Paths of the repository and running commands.

use std::env;
use std::ffi::{OsStr, OsString};
use std::fmt;
use std::path::{Path, PathBuf};
use std::process::Command;

/// The repository (workspace) root.
pub fn root() -> &'static Path {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .expect("xtask lives one level below the repository root")
}

/// The workspace's target directory: `$CARGO_TARGET_DIR` if set, else `<root>/target`.
pub fn target_dir() -> PathBuf {
    match env::var_os("CARGO_TARGET_DIR") {
        Some(dir) if !dir.is_empty() => env::current_dir().unwrap_or_default().join(dir),
        _ => root().join("target"),
    }
}

/// Where `build-ebpf` puts the XDP object (always under the repository, whatever the target dir).
pub fn xdp_object() -> PathBuf {
    root().join("target/bpf/lb-xdp.o")
}

/// Where `build-ebpf` puts the data plane built at another optimisation level (upgrade tests).
pub fn variant_object() -> PathBuf {
    root().join("target/bpf/lb-xdp-variant.o")
}

/// Where `build-ebpf` puts the benchmark helper programs.
pub fn testkit_object() -> PathBuf {
    root().join("target/bpf/lb-xdp-testkit.o")
}

/// The debug build of the daemon.
pub fn daemon_bin() -> PathBuf {
    target_dir().join("debug/lb-daemon")
}

/// `$CARGO_HOME/bin`, by default `~/.cargo/bin`: where `cargo install` puts `bpf-linker`.
pub fn cargo_bin_dir() -> PathBuf {
    match env::var_os("CARGO_HOME") {
        Some(home) if !home.is_empty() => PathBuf::from(home).join("bin"),
        _ => {
            PathBuf::from(env::var_os("HOME").unwrap_or_else(|| "/root".into())).join(".cargo/bin")
        }
    }
}

/// `$PATH` with the cargo bin directory in it (first, if it was missing).
pub fn child_path() -> OsString {
    let bin = cargo_bin_dir();
    let current = env::var_os("PATH").unwrap_or_default();
    let mut dirs: Vec<PathBuf> = env::split_paths(&current).collect();
    if !dirs.contains(&bin) {
        dirs.insert(0, bin);
    }
    env::join_paths(dirs).unwrap_or(current)
}

/// Looks `program` up in [`child_path`].
pub fn find_in_path(program: &str) -> Option<PathBuf> {
    env::split_paths(&child_path())
        .map(|dir| dir.join(program))
        .find(|p| p.is_file())
}

/// A command whose `PATH` includes the cargo bin directory.
pub fn cmd(program: impl AsRef<OsStr>) -> Command {
    let mut c = Command::new(program);
    c.env("PATH", child_path());
    c
}

/// The userspace `cargo` (rustup's, the one that runs xtask), in the repository root.
pub fn cargo() -> Command {
    let mut c = cmd(env::var_os("CARGO").unwrap_or_else(|| "cargo".into()));
    c.current_dir(root());
    c
}

/// A command that ran and failed; `main` exits with its exit code.
#[derive(Debug)]
pub struct CommandFailed {
    pub line: String,
    pub code: Option<i32>,
}

impl fmt::Display for CommandFailed {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self.code {
            Some(code) => write!(f, "`{}` exited with status {code}", self.line),
            None => write!(f, "`{}` was killed by a signal", self.line),
        }
    }
}

impl std::error::Error for CommandFailed {}

/// The command as a shell line, with the environment variables it sets (except `PATH`).
pub fn display(cmd: &Command) -> String {
    let mut parts: Vec<String> = Vec::new();
    if let Some(dir) = cmd.get_current_dir() {
        parts.push(format!("(cd {} &&", dir.display()));
    }
    let mut envs: Vec<_> = cmd.get_envs().filter(|(key, _)| *key != "PATH").collect();
    // `env -u NAME` options before the `NAME=VALUE` assignments.
    envs.sort_by_key(|(_, value)| value.is_some());
    if envs.iter().any(|(_, value)| value.is_none()) {
        parts.push("env".into());
    }
    for (key, value) in envs {
        match value {
            Some(v) => parts.push(format!("{}={}", key.display(), v.display())),
            None => parts.push(format!("-u {}", key.display())),
        }
    }
    parts.push(cmd.get_program().display().to_string());
    parts.extend(cmd.get_args().map(|a| a.display().to_string()));
    let mut line = parts.join(" ");
    if cmd.get_current_dir().is_some() {
        line.push(')');
    }
    line
}

/// Prints the command line, runs it with inherited stdio and fails unless it succeeds.
pub fn run(cmd: &mut Command) -> anyhow::Result<()> {
    let line = display(cmd);
    eprintln!("$ {line}");
    let status = cmd
        .status()
        .map_err(|e| anyhow::anyhow!("cannot start `{line}`: {e}"))?;
    if status.success() {
        Ok(())
    } else {
        Err(CommandFailed {
            line,
            code: status.code(),
        }
        .into())
    }
}
