//! A datagram on the engines' peer port: the header and MAC checks, then the body decoder of
//! its kind. Raw inputs rarely carry a valid MAC, so odd first bytes seal the rest with the test
//! key first (as a peer would) and exercise the body decoders behind the MAC.
#![no_main]

use lb_daemon::{
    mirror, owners,
    peers::{self, Kind, Message},
};
use libfuzzer_sys::fuzz_target;
use ring::hmac;

fuzz_target!(|data: &[u8]| {
    let key = hmac::Key::new(hmac::HMAC_SHA256, b"fuzz key");
    let Some((&mode, rest)) = data.split_first() else {
        return;
    };
    let datagram = if mode & 1 == 1 {
        let Some((&kind, body)) = rest.split_first() else {
            return;
        };
        // A peer seals at most MAX_BODY bytes (`seal`'s precondition); longer ones are the
        // unsealed mode's business.
        let (Some(kind), true) = (Kind::of(kind), body.len() <= peers::MAX_BODY) else {
            return;
        };
        peers::seal(
            &key,
            &Message {
                kind,
                from: 7,
                epoch: 1,
                seq: 1,
                body: body.to_vec(),
            },
        )
    } else {
        rest.to_vec()
    };
    let Ok(m) = peers::open(&key, &datagram) else {
        return;
    };
    match m.kind {
        Kind::Request | Kind::Reply => {
            let _ = peers::decode_claims(&m.body);
        }
        Kind::Health => {
            let _ = peers::decode_ids(&m.body);
        }
        Kind::Query | Kind::Owned => {
            let _ = owners::decode_flows(&m.body);
        }
        Kind::Persist => {
            let _ = mirror::decode(&m.body);
        }
        Kind::Echo | Kind::EchoReply => {}
    }
});
