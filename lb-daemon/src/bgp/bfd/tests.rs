//! The BFD state machine and packet checks, on explicit instants (no sockets, no sleeping).

use super::*;

const FAST: Timers = Timers {
    min_tx: Duration::from_millis(100),
    min_rx: Duration::from_millis(100),
    multiplier: 3,
};

fn peer(state: State, your_disc: u32) -> Packet {
    Packet {
        diag: 0,
        state,
        poll: false,
        final_: false,
        detect_mult: 3,
        my_disc: 0xabcd,
        your_disc,
        desired_min_tx: 100_000,
        required_min_rx: 100_000,
    }
}

#[test]
fn a_packet_round_trips() {
    let p = Packet {
        diag: 3,
        state: State::Up,
        poll: true,
        final_: false,
        detect_mult: 5,
        my_disc: 7,
        your_disc: 9,
        desired_min_tx: 300_000,
        required_min_rx: 200_000,
    };
    let b = p.encode();
    assert_eq!(b[0], 0x23, "version 1, diag 3");
    assert_eq!(b[1], 0xe0, "state Up, poll");
    assert_eq!(b[3], 24);
    assert_eq!(Packet::decode(&b), Ok(p));
}

#[test]
fn bad_packets_are_refused_by_rule() {
    let good = peer(State::Up, 1).encode();
    let mut v = good;
    v[0] = 0x40;
    assert_eq!(Packet::decode(&v), Err(Invalid::Version));
    assert_eq!(Packet::decode(&good[..20]), Err(Invalid::Length));
    let mut v = good;
    v[3] = 30;
    assert_eq!(
        Packet::decode(&v),
        Err(Invalid::Length),
        "length beyond the datagram"
    );
    let mut v = good;
    v[2] = 0;
    assert_eq!(Packet::decode(&v), Err(Invalid::DetectMult));
    let mut v = good;
    v[1] |= 0x01;
    assert_eq!(Packet::decode(&v), Err(Invalid::Multipoint));
    let mut v = good;
    v[1] |= 0x04;
    assert_eq!(Packet::decode(&v), Err(Invalid::Authentication));
    let mut v = good;
    v[4..8].fill(0);
    assert_eq!(Packet::decode(&v), Err(Invalid::MyDiscriminator));
    assert_eq!(
        Packet::decode(&peer(State::Up, 0).encode()),
        Err(Invalid::YourDiscriminator)
    );
    assert!(Packet::decode(&peer(State::Down, 0).encode()).is_ok());
}

#[test]
fn the_three_way_handshake_reaches_up_and_speeds_up_with_a_poll() {
    let t0 = Instant::now();
    let mut m = Machine::new(42, FAST);
    let first = m.packet();
    assert_eq!((first.state, first.your_disc), (State::Down, 0));
    assert_eq!(first.desired_min_tx, 1_000_000, "1 s while not Up");
    assert!(m.receive(&peer(State::Down, 0), t0));
    assert_eq!(m.state, State::Init);
    assert_eq!(m.packet().your_disc, 0xabcd);
    assert!(m.receive(&peer(State::Up, 42), t0));
    assert_eq!(m.state, State::Up);
    // The faster rate is announced with a Poll until the peer's Final.
    let p = m.packet();
    assert!(p.poll);
    assert_eq!(p.desired_min_tx, 100_000);
    assert_eq!(m.tx_interval(), Duration::from_millis(100));
    let mut fin = peer(State::Up, 42);
    fin.final_ = true;
    m.receive(&fin, t0);
    assert!(!m.packet().poll);
}

#[test]
fn a_poll_is_answered_with_a_final() {
    let t0 = Instant::now();
    let mut m = Machine::new(42, FAST);
    let mut p = peer(State::Down, 0);
    p.poll = true;
    assert!(m.receive(&p, t0));
    let answer = m.packet();
    assert!(answer.final_ && !answer.poll);
    assert!(!m.packet().final_, "one Final per Poll");
}

#[test]
fn silence_for_the_detection_time_takes_the_session_down() {
    let t0 = Instant::now();
    let mut m = Machine::new(42, FAST);
    m.receive(&peer(State::Down, 0), t0);
    m.receive(&peer(State::Up, 42), t0);
    assert_eq!(m.state, State::Up);
    // 3 × max(our 100 ms required rx, their 100 ms desired tx).
    assert_eq!(m.detection_time(), Duration::from_millis(300));
    assert_eq!(
        m.detection_deadline(),
        Some(t0 + Duration::from_millis(300))
    );
    let later = t0 + Duration::from_millis(200);
    m.receive(&peer(State::Up, 42), later);
    assert_eq!(
        m.detection_deadline(),
        Some(later + Duration::from_millis(300))
    );
    m.expire();
    assert_eq!(m.state, State::Down);
    let p = m.packet();
    assert_eq!(p.diag, 1, "control detection time expired");
    assert_eq!(p.your_disc, 0);
    assert_eq!(p.desired_min_tx, 1_000_000, "back to 1 s while down");
    assert_eq!(m.detection_deadline(), None);
}

#[test]
fn the_slower_side_sets_the_detection_time() {
    let t0 = Instant::now();
    let mut m = Machine::new(42, FAST);
    let mut slow = peer(State::Down, 0);
    slow.desired_min_tx = 500_000;
    slow.detect_mult = 4;
    m.receive(&slow, t0);
    assert_eq!(m.detection_time(), Duration::from_secs(2));
    // And it sends no faster than the peer asks to receive.
    let mut picky = peer(State::Init, 42);
    picky.required_min_rx = 250_000;
    m.receive(&picky, t0);
    assert_eq!(m.state, State::Up);
    assert_eq!(m.tx_interval(), Duration::from_millis(250));
}

#[test]
fn the_peer_going_down_or_admin_down_takes_us_down() {
    let t0 = Instant::now();
    for remote in [State::Down, State::AdminDown] {
        let mut m = Machine::new(42, FAST);
        m.receive(&peer(State::Down, 0), t0);
        m.receive(&peer(State::Up, 42), t0);
        assert_eq!(m.state, State::Up);
        assert!(m.receive(&peer(remote, 42), t0));
        assert_eq!(m.state, State::Down, "{remote:?}");
        assert_eq!(m.packet().diag, 3, "neighbor signaled session down");
    }
}

#[test]
fn a_packet_for_another_discriminator_is_ignored() {
    let t0 = Instant::now();
    let mut m = Machine::new(42, FAST);
    assert!(!m.receive(&peer(State::Init, 41), t0));
    assert_eq!(m.state, State::Down);
}

#[test]
fn admin_down_is_sent_on_a_stop() {
    let mut m = Machine::new(42, FAST);
    m.admin_down();
    let p = m.packet();
    assert_eq!((p.state, p.diag), (State::AdminDown, 7));
}

#[test]
fn jitter_stays_within_75_to_99_percent() {
    let mut seed = 12345;
    for _ in 0..1000 {
        let d = jittered(Duration::from_millis(100), &mut seed);
        assert!(
            d >= Duration::from_millis(75) && d < Duration::from_millis(100),
            "{d:?}"
        );
    }
}
