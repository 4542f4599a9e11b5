//! A BFD control packet from the router (RFC 5880): the checks of 6.8.6, then the session's state
//! machine, driven by a sequence of packets cut from the input.
#![no_main]

use std::time::{Duration, Instant};

use lb_daemon::bgp::bfd::{Machine, Packet, Timers};
use libfuzzer_sys::fuzz_target;

fuzz_target!(|data: &[u8]| {
    let mut machine = Machine::new(
        0x1234_5678,
        Timers {
            min_tx: Duration::from_millis(100),
            min_rx: Duration::from_millis(100),
            multiplier: 3,
        },
    );
    let start = Instant::now();
    // Every packet is 24 bytes or the rest; the length byte inside says what the packet claims.
    for (i, datagram) in data.chunks(24).enumerate() {
        if let Ok(p) = Packet::decode(datagram) {
            let now = start + Duration::from_millis(u64::try_from(i).unwrap_or(u64::MAX) * 50);
            machine.receive(&p, now.into());
            let _ = machine.detection_deadline();
            let _ = machine.tx_interval();
            let sent = machine.packet();
            assert!(
                Packet::decode(&sent.encode()).is_ok(),
                "this speaker's own packet does not decode: {sent:?}"
            );
        }
    }
});
