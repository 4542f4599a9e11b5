//! Transmits that fail after the verdict: the XDP program returns `XDP_TX` or `XDP_REDIRECT`, and the
//! driver then cannot send the frame (too big for the peer, ring full, no XDP on the target). The
//! program never learns of it, so the kernel's `xdp` tracepoints are counted instead, for this
//! engine's program and interface only (`TX_ERROR_FILTER`), into `TX_ERRORS`
//! (`lb_common::TxError`). They fire on failures only, except `xdp_bulk_tx`, which fires once per
//! flushed batch and returns at once when the batch dropped nothing.
//!
//! A failure is also logged (aya-log, into the daemon's log) at most once a second per CPU and
//! kind: it is rare when the network is sound, and a sign of a wrong MTU or a broken peer when it
//! is not. Every failure is counted either way.

use aya_ebpf::{helpers::bpf_ktime_get_ns, macros::tracepoint, programs::TracePointContext};
use aya_log_ebpf::warn;
use lb_common::TxError;

use crate::maps::{TX_ERROR_FILTER, TX_ERRORS, TX_ERRORS_LOGGED};

/// The least time between two log lines of one kind on one CPU.
const LOG_INTERVAL_NS: u64 = 1_000_000_000;

/// `XDP_TX` and `XDP_REDIRECT`.
const ACT_TX: u32 = 3;
const ACT_REDIRECT: u32 = 4;

#[inline(always)]
fn add(kind: TxError, n: u64) {
    if let Some(c) = TX_ERRORS.get_ptr_mut(kind as u32) {
        // SAFETY: a per-CPU array slot, only this CPU writes it while this program runs.
        unsafe { *c += n };
    }
}

/// Whether a failure of `kind` is to be logged now: none was this second on this CPU.
#[inline(always)]
fn log_due(kind: TxError) -> bool {
    let Some(last) = TX_ERRORS_LOGGED.get_ptr_mut(kind as u32) else {
        return false;
    };
    // SAFETY: a helper without arguments.
    let now = unsafe { bpf_ktime_get_ns() };
    // SAFETY: a per-CPU array slot, only this CPU writes it while this program runs.
    unsafe {
        if *last != 0 && now.wrapping_sub(*last) < LOG_INTERVAL_NS {
            return false;
        }
        *last = now;
    }
    true
}

/// Field `off` of the tracepoint record.
#[inline(always)]
fn field(ctx: &TracePointContext, off: usize) -> Option<u32> {
    // SAFETY: the offsets are those of the tracepoints' formats (checked by the daemon before it
    // attaches); a failed read is reported, not undefined.
    unsafe { ctx.read_at::<u32>(off) }.ok()
}

/// `xdp:xdp_exception` (prog_id at 8, act at 12): the driver could not carry out the verdict.
#[tracepoint]
pub fn lb_xdp_exception(ctx: TracePointContext) -> u32 {
    let (Some(prog_id), Some(act), Some(filter)) =
        (field(&ctx, 8), field(&ctx, 12), TX_ERROR_FILTER.get(0))
    else {
        return 0;
    };
    if prog_id != filter.prog_id {
        return 0;
    }
    let kind = match act {
        ACT_TX => TxError::Tx,
        ACT_REDIRECT => TxError::Redirect,
        _ => TxError::Other,
    };
    add(kind, 1);
    if log_due(kind) {
        warn!(
            &ctx,
            "the driver could not carry out the XDP verdict {} (3: TX, 4: REDIRECT; others: aborted); \
             counted in lb_xdp_tx_errors_total, logged at most once a second per CPU",
            act
        );
    }
    0
}

/// `xdp:xdp_redirect_err` (prog_id at 8): a redirect to a device or map entry that cannot take it.
#[tracepoint]
pub fn lb_xdp_redirect_err(ctx: TracePointContext) -> u32 {
    let (Some(prog_id), Some(filter)) = (field(&ctx, 8), TX_ERROR_FILTER.get(0)) else {
        return 0;
    };
    if prog_id == filter.prog_id {
        add(TxError::Redirect, 1);
        if log_due(TxError::Redirect) {
            warn!(
                &ctx,
                "a redirect to a peer engine's interface failed (no XDP program on the target, \
                 or it is down); counted in lb_xdp_tx_errors_total, logged at most once a second \
                 per CPU"
            );
        }
    }
    0
}

/// `xdp:xdp_bulk_tx` (ifindex at 8, drops at 16): frames of a flushed `XDP_TX` batch that the
/// driver dropped (veth: bigger than the peer takes, or its ring full).
#[tracepoint]
pub fn lb_xdp_bulk_tx(ctx: TracePointContext) -> u32 {
    let Some(drops) = field(&ctx, 16) else {
        return 0;
    };
    if drops == 0 {
        return 0;
    }
    let (Some(ifindex), Some(filter)) = (field(&ctx, 8), TX_ERROR_FILTER.get(0)) else {
        return 0;
    };
    if ifindex == filter.ifindex {
        add(TxError::BulkDrop, u64::from(drops));
        if log_due(TxError::BulkDrop) {
            warn!(
                &ctx,
                "interface {} dropped {} frames the data plane transmitted (bigger than the link \
                 or the peer takes: is the tunnel path MTU right?, or its ring full); counted in \
                 lb_xdp_tx_errors_total, logged at most once a second per CPU",
                ifindex,
                drops
            );
        }
    }
    0
}
