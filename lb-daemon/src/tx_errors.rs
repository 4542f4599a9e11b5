//! Watching for transmits that fail after the XDP verdict: the kernel's `xdp` tracepoints, counted by
//! the object's tracepoint programs (`lb-ebpf/src/tx_errors.rs`) for this engine's program and
//! interface. This module finds tracefs (mounting it where it is missing, as systemd does at boot)
//! and checks that each tracepoint's record has the fields where the programs read them, so a kernel
//! with another layout gets no wrong counts, only a warning.

use std::path::{Path, PathBuf};

use tracing::info;

/// Where tracefs is looked for, and mounted if it is at neither.
const TRACEFS: [&str; 2] = ["/sys/kernel/tracing", "/sys/kernel/debug/tracing"];

/// A tracepoint program of the object: its name, the tracepoint (category `xdp`) it attaches to, and
/// the fields it reads with their offsets.
pub type TracepointProgram = (&'static str, &'static str, &'static [(&'static str, usize)]);

pub const PROGRAMS: [TracepointProgram; 3] = [
    (
        "lb_xdp_exception",
        "xdp_exception",
        &[("prog_id", 8), ("act", 12)],
    ),
    ("lb_xdp_redirect_err", "xdp_redirect_err", &[("prog_id", 8)]),
    (
        "lb_xdp_bulk_tx",
        "xdp_bulk_tx",
        &[("ifindex", 8), ("drops", 16)],
    ),
];

#[derive(Debug, thiserror::Error)]
pub enum TxErrorsError {
    #[error("tracefs is not mounted and mounting it at {path} failed: {reason}")]
    Tracefs { path: PathBuf, reason: String },
    #[error("tracepoint xdp:{tracepoint}: {reason}")]
    Format { tracepoint: String, reason: String },
}

/// The tracefs root, mounting it at `/sys/kernel/tracing` when no tracefs is found.
pub fn tracefs() -> Result<PathBuf, TxErrorsError> {
    for p in TRACEFS {
        if Path::new(p).join("events").is_dir() {
            return Ok(PathBuf::from(p));
        }
    }
    let path = PathBuf::from(TRACEFS[0]);
    nix::mount::mount(
        Some("tracefs"),
        &path,
        Some("tracefs"),
        nix::mount::MsFlags::empty(),
        None::<&str>,
    )
    .map_err(|e| TxErrorsError::Tracefs {
        path: path.clone(),
        reason: e.to_string(),
    })?;
    info!(path = %path.display(), "mounted tracefs");
    Ok(path)
}

/// The offset of field `name` in a tracepoint `format` file.
pub fn field_offset(format: &str, name: &str) -> Option<usize> {
    format.lines().find_map(|line| {
        let decl = line.trim().strip_prefix("field:")?;
        let (decl, rest) = decl.split_once(';')?;
        let field = decl.split_whitespace().last()?;
        if field != name {
            return None;
        }
        rest.trim()
            .strip_prefix("offset:")?
            .split(';')
            .next()?
            .parse()
            .ok()
    })
}

/// Checks that every tracepoint record has the fields at the offsets the programs read.
pub fn check_formats(tracefs: &Path) -> Result<(), TxErrorsError> {
    for (_, tracepoint, fields) in PROGRAMS {
        let path = tracefs.join("events/xdp").join(tracepoint).join("format");
        let format = std::fs::read_to_string(&path).map_err(|e| TxErrorsError::Format {
            tracepoint: tracepoint.to_owned(),
            reason: format!("{}: {e}", path.display()),
        })?;
        for (field, want) in fields {
            match field_offset(&format, field) {
                Some(off) if off == *want => {}
                found => {
                    return Err(TxErrorsError::Format {
                        tracepoint: tracepoint.to_owned(),
                        reason: format!(
                            "field {field} at {found:?}, the program reads it at {want}"
                        ),
                    });
                }
            }
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// `events/xdp/xdp_bulk_tx/format` of kernel 6.18.
    const BULK_TX: &str = "name: xdp_bulk_tx
ID: 583
format:
\tfield:unsigned short common_type;\toffset:0;\tsize:2;\tsigned:0;
\tfield:unsigned char common_flags;\toffset:2;\tsize:1;\tsigned:0;
\tfield:unsigned char common_preempt_count;\toffset:3;\tsize:1;\tsigned:0;
\tfield:int common_pid;\toffset:4;\tsize:4;\tsigned:1;

\tfield:int ifindex;\toffset:8;\tsize:4;\tsigned:1;
\tfield:u32 act;\toffset:12;\tsize:4;\tsigned:0;
\tfield:int drops;\toffset:16;\tsize:4;\tsigned:1;
\tfield:int sent;\toffset:20;\tsize:4;\tsigned:1;
\tfield:int err;\toffset:24;\tsize:4;\tsigned:1;
";

    #[test]
    fn reads_field_offsets() {
        assert_eq!(field_offset(BULK_TX, "ifindex"), Some(8));
        assert_eq!(field_offset(BULK_TX, "drops"), Some(16));
        assert_eq!(field_offset(BULK_TX, "err"), Some(24));
        assert_eq!(field_offset(BULK_TX, "common_pid"), Some(4));
        assert_eq!(field_offset(BULK_TX, "prog_id"), None);
        assert_eq!(field_offset(BULK_TX, "ifind"), None);
    }

    #[test]
    fn a_moved_field_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        for (_, tp, _) in PROGRAMS {
            let d = dir.path().join("events/xdp").join(tp);
            std::fs::create_dir_all(&d).unwrap();
            let text = if tp == "xdp_bulk_tx" {
                BULK_TX.to_owned()
            } else {
                "\tfield:int prog_id;\toffset:8;\tsize:4;\tsigned:1;\n\tfield:u32 act;\toffset:12;\tsize:4;\tsigned:0;\n".to_owned()
            };
            std::fs::write(d.join("format"), text).unwrap();
        }
        check_formats(dir.path()).unwrap();
        let moved = BULK_TX.replace("drops;\toffset:16", "drops;\toffset:20");
        std::fs::write(dir.path().join("events/xdp/xdp_bulk_tx/format"), moved).unwrap();
        let err = check_formats(dir.path()).unwrap_err().to_string();
        assert_eq!(
            err,
            "tracepoint xdp:xdp_bulk_tx: field drops at Some(20), the program reads it at 16"
        );
    }
}
