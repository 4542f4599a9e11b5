//! Running Rust code inside a network namespace.
//!
//! `setns(CLONE_NEWNET)` changes the namespace of the calling thread only, so [`in_ns`] runs the
//! closure on a fresh thread that enters the namespace first; the caller's thread never moves.
//! Sockets created there stay in that namespace for their whole life, so a `TcpStream` opened by
//! [`in_ns`] can be returned and used from any thread.

use std::fs::File;
use std::path::PathBuf;

use anyhow::{Context, Result, anyhow};
use nix::sched::{CloneFlags, setns};

/// The bind-mounted namespace file `ip netns add` creates.
pub fn ns_path(ns: &str) -> PathBuf {
    PathBuf::from("/run/netns").join(ns)
}

/// Moves the calling thread into network namespace `ns`. Only for threads made for that purpose.
pub fn enter(ns: &str) -> Result<()> {
    let path = ns_path(ns);
    let file = File::open(&path).with_context(|| format!("open {}", path.display()))?;
    setns(file, CloneFlags::CLONE_NEWNET).with_context(|| format!("setns into {ns}"))?;
    Ok(())
}

/// Runs `f` on a new thread inside namespace `ns` and returns its result. Borrows are allowed
/// (scoped thread); a panic in `f` becomes an error.
pub fn in_ns<T, F>(ns: &str, f: F) -> Result<T>
where
    F: FnOnce() -> Result<T> + Send,
    T: Send,
{
    std::thread::scope(|s| {
        s.spawn(|| {
            enter(ns)?;
            f()
        })
        .join()
        .map_err(|_| anyhow!("thread inside namespace {ns} panicked"))?
    })
}
