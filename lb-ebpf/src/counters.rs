//! Counter updates. Per-CPU maps: plain adds, no atomics.

use lb_common::{Reason, TrafficCounters};

use crate::maps::{ENGINE_STATS, REASONS, VS_STATS};

#[inline(always)]
pub fn count(reason: Reason) {
    if let Some(c) = REASONS.get_ptr_mut(reason as u32) {
        // SAFETY: a per-CPU array slot, only this CPU writes it while this program runs.
        unsafe { *c += 1 };
    }
}

#[inline(always)]
fn add(c: Option<*mut TrafficCounters>, bytes: u64, new_flow: bool) {
    if let Some(c) = c {
        // SAFETY: as above.
        unsafe {
            (*c).packets += 1;
            (*c).bytes += bytes;
            if new_flow {
                (*c).new_flows += 1;
            }
        }
    }
}

/// Accounts a VIP packet to its virtual service and to the engine it is sent to.
#[inline(always)]
pub fn traffic(vs_id: u32, engine_id: u32, bytes: u64, new_flow: bool) {
    add(VS_STATS.get_ptr_mut(vs_id), bytes, new_flow);
    add(ENGINE_STATS.get_ptr_mut(engine_id), bytes, new_flow);
}

/// Accounts a VIP packet that goes up to this engine's proxy as a secondary to its service only.
#[inline(always)]
pub fn received(vs_id: u32, bytes: u64, new_flow: bool) {
    add(VS_STATS.get_ptr_mut(vs_id), bytes, new_flow);
}
