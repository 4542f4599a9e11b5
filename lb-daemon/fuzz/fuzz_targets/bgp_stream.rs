//! A BGP peer's byte stream, as the session reads it: framing (marker, length), netgauze's
//! decoder, then what the session does with an OPEN. The first byte picks how the stream is cut
//! into reads, so messages split across reads are covered too.
#![no_main]

use std::net::Ipv4Addr;

use lb_daemon::bgp::{
    messages::check_open,
    session::{Families, Frame, Inbound},
};
use libfuzzer_sys::fuzz_target;
use netgauze_bgp_pkt::BgpMessage;

fuzz_target!(|data: &[u8]| {
    let Some((&cut, stream)) = data.split_first() else {
        return;
    };
    let read_size = usize::from(cut).max(1);
    let mut inbound = Inbound::new();
    for read in stream.chunks(read_size) {
        inbound.buffer().extend_from_slice(read);
        loop {
            let before = inbound.buffer().len();
            match inbound.next_frame() {
                Ok(None) => break,
                Ok(Some(Frame::Message(BgpMessage::Open(open)))) => {
                    let _ = check_open(&open, 65000, Ipv4Addr::new(10, 0, 0, 1), 90);
                    let _ = Families::of(&open);
                }
                Ok(Some(_)) => {}
                // The session sends the NOTIFICATION and closes.
                Err(_) => return,
            }
            assert!(inbound.buffer().len() < before, "a frame consumed nothing");
        }
    }
});
