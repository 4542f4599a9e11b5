//! The session against scripted peers on loopback: peers that misbehave in ways no real router
//! does on purpose (garbage, a missing capability, a close mid-OPEN, silence), and a well-behaved
//! one to see the messages in order. Interoperability with real routers is `tests/e2e_bgp.rs`.

use std::{net::Ipv4Addr, time::Duration};

use bytes::BytesMut;
use lb_model::BgpPeerConfig;
use netgauze_bgp_pkt::{
    BgpMessage,
    capabilities::{BgpCapability, MultiProtocolExtensionsCapability},
    codec::BgpCodec,
    notification::{BgpNotificationMessage, CeaseError, MessageHeaderError, OpenMessageError},
    open::{BgpOpenMessage, BgpOpenMessageParameter},
};
use netgauze_iana::address_family::AddressType;
use tokio::{
    io::{AsyncReadExt, AsyncWriteExt},
    net::{TcpListener, TcpStream},
    sync::watch,
    time::{Instant, timeout},
};
use tokio_util::codec::{Decoder, Encoder};

use super::*;

const LIMIT: Duration = Duration::from_secs(10);
const PEER_ASN: u32 = 65000;
const LOCAL_ASN: u32 = 4_200_000_001;

struct Rig {
    listener: TcpListener,
    routes: watch::Sender<Routes>,
    stop: watch::Sender<bool>,
    status: Arc<Mutex<PeerStatus>>,
    task: tokio::task::JoinHandle<()>,
}

async fn rig(hold_time: u16, min_backoff: Duration) -> Rig {
    let listener = TcpListener::bind("127.0.0.1:0").await.unwrap();
    let addr = listener.local_addr().unwrap();
    let peer = Peer {
        config: BgpPeerConfig {
            address: addr.ip(),
            asn: PEER_ASN,
            port: addr.port(),
            hold_time_s: None,
            next_hop_v4: None,
            next_hop_v6: None,
            password: None,
            bfd: None,
        },
        local_asn: LOCAL_ASN,
        router_id: Ipv4Addr::new(10, 0, 0, 1),
        hold_time,
        communities: vec![],
        min_backoff,
        max_backoff: min_backoff * 4,
        bfd: None,
    };
    let (routes, routes_rx) = watch::channel(Routes::new());
    let (stop, stop_rx) = watch::channel(false);
    let status = Arc::new(Mutex::new(PeerStatus::default()));
    let task = tokio::spawn(run(peer, routes_rx, status.clone(), stop_rx));
    Rig {
        listener,
        routes,
        stop,
        status,
        task,
    }
}

/// The router's side of one connection.
struct Router {
    stream: TcpStream,
    codec: BgpCodec,
    rx: BytesMut,
}

impl Router {
    async fn accept(l: &TcpListener) -> Router {
        let (stream, _) = timeout(LIMIT, l.accept()).await.unwrap().unwrap();
        Router {
            stream,
            codec: BgpCodec::new(true),
            rx: BytesMut::new(),
        }
    }

    async fn send(&mut self, msg: BgpMessage) {
        let mut b = BytesMut::new();
        self.codec.encode(msg, &mut b).unwrap();
        self.stream.write_all(&b).await.unwrap();
    }

    /// The next message, or `None` at EOF.
    async fn next(&mut self) -> Option<BgpMessage> {
        loop {
            if let Some((m, _)) = self.codec.decode(&mut self.rx).unwrap() {
                return Some(m);
            }
            let n = timeout(LIMIT, self.stream.read_buf(&mut self.rx))
                .await
                .unwrap()
                .unwrap();
            if n == 0 {
                return None;
            }
        }
    }

    fn open(asn4: bool, hold: u16) -> BgpMessage {
        let mut caps = vec![BgpCapability::MultiProtocolExtensions(
            MultiProtocolExtensionsCapability::new(AddressType::Ipv4Unicast),
        )];
        if asn4 {
            caps.push(BgpCapability::FourOctetAs(
                netgauze_bgp_pkt::capabilities::FourOctetAsCapability::new(PEER_ASN),
            ));
        }
        BgpMessage::Open(BgpOpenMessage::new(
            u16::try_from(PEER_ASN).unwrap(),
            hold,
            Ipv4Addr::new(10, 0, 0, 254),
            vec![BgpOpenMessageParameter::new_capabilities(caps)],
        ))
    }

    /// Reads the speaker's OPEN, answers with OPEN and KEEPALIVE, reads its KEEPALIVE.
    async fn establish(&mut self, hold: u16) {
        assert!(matches!(self.next().await, Some(BgpMessage::Open(_))));
        self.send(Self::open(true, hold)).await;
        self.send(BgpMessage::KeepAlive).await;
        assert_eq!(self.next().await, Some(BgpMessage::KeepAlive));
    }
}

fn status(r: &Rig) -> PeerStatus {
    r.status.lock().unwrap().clone()
}

fn route(vip: &str) -> (IpAddr, Route) {
    let vip: IpAddr = vip.parse().unwrap();
    (
        vip,
        Route {
            vip,
            med: None,
            local_pref: None,
        },
    )
}

fn nlri(m: &BgpMessage) -> (Vec<String>, Vec<String>) {
    let BgpMessage::Update(u) = m else {
        panic!("not an UPDATE: {m:?}")
    };
    (
        u.nlri()
            .iter()
            .map(|n| n.network().address().to_string())
            .collect(),
        u.withdraw_routes()
            .iter()
            .map(|n| n.network().address().to_string())
            .collect(),
    )
}

#[tokio::test]
async fn announces_withdraws_and_ceases_in_order() {
    let r = rig(9, Duration::from_millis(50)).await;
    r.routes.send_replace(Routes::from([route("10.200.0.10")]));
    let mut router = Router::accept(&r.listener).await;
    router.establish(30).await;
    let first = router.next().await.unwrap();
    assert_eq!(nlri(&first), (vec!["10.200.0.10/32".into()], vec![]));
    // End-of-RIB for IPv4 only: the router offered no IPv6 (RFC 4760: nothing of a family the
    // peer did not offer; GoBGP resets a session that gets one).
    assert_eq!(nlri(&router.next().await.unwrap()), (vec![], vec![]));
    assert_eq!(status(&r).state, State::Established);
    assert_eq!(status(&r).announced, 1);

    // An IPv6 VIP is not announced to it, and counted; the IPv4 change goes out.
    r.routes
        .send_replace(Routes::from([route("10.200.0.11"), route("fd00:200::10")]));
    let a = router.next().await.unwrap();
    let b = router.next().await.unwrap();
    assert_eq!(
        nlri(&a),
        (vec![], vec!["10.200.0.10/32".into()]),
        "withdrawals come first"
    );
    assert_eq!(nlri(&b), (vec!["10.200.0.11/32".into()], vec![]));
    assert_eq!(status(&r).unannounceable, 1);
    assert_eq!(status(&r).announced, 1);

    // An UPDATE from the router is counted and changes nothing.
    router
        .send(BgpMessage::Update(
            netgauze_bgp_pkt::update::BgpUpdateMessage::new(vec![], vec![], vec![]),
        ))
        .await;
    let deadline = Instant::now() + LIMIT;
    while status(&r).updates_received == 0 {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }

    r.stop.send_replace(true);
    assert_eq!(
        nlri(&router.next().await.unwrap()),
        (vec![], vec!["10.200.0.11/32".into()]),
        "a stop withdraws first"
    );
    assert!(matches!(
        router.next().await,
        Some(BgpMessage::Notification(
            BgpNotificationMessage::CeaseError(CeaseError::AdministrativeShutdown { .. })
        ))
    ));
    assert_eq!(router.next().await, None);
    timeout(LIMIT, r.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn garbage_gets_a_notification_and_a_reconnect() {
    let r = rig(9, Duration::from_millis(50)).await;
    let mut router = Router::accept(&r.listener).await;
    assert!(matches!(router.next().await, Some(BgpMessage::Open(_))));
    router.stream.write_all(&[0u8; 40]).await.unwrap();
    assert!(matches!(
        router.next().await,
        Some(BgpMessage::Notification(
            BgpNotificationMessage::MessageHeaderError(
                MessageHeaderError::ConnectionNotSynchronized { .. }
            )
        ))
    ));
    assert_eq!(router.next().await, None);
    // It comes back, and the next session works.
    let mut again = Router::accept(&r.listener).await;
    again.establish(9).await;
    assert!(
        status(&r).last_error.is_none_or(|e| e.contains("marker")),
        "{:?}",
        status(&r).last_error
    );
    r.stop.send_replace(true);
}

#[tokio::test]
async fn a_bad_length_is_refused_without_buffering_it() {
    let r = rig(9, Duration::from_millis(50)).await;
    let mut router = Router::accept(&r.listener).await;
    assert!(matches!(router.next().await, Some(BgpMessage::Open(_))));
    let mut header = [0xffu8; 19];
    header[16..18].copy_from_slice(&60_000u16.to_be_bytes());
    header[18] = 4;
    router.stream.write_all(&header).await.unwrap();
    assert!(matches!(
        router.next().await,
        Some(BgpMessage::Notification(
            BgpNotificationMessage::MessageHeaderError(MessageHeaderError::BadMessageLength { .. })
        ))
    ));
    r.stop.send_replace(true);
}

#[tokio::test]
async fn a_peer_without_four_octet_as_is_refused() {
    let r = rig(9, Duration::from_millis(50)).await;
    let mut router = Router::accept(&r.listener).await;
    assert!(matches!(router.next().await, Some(BgpMessage::Open(_))));
    router.send(Router::open(false, 9)).await;
    assert!(matches!(
        router.next().await,
        Some(BgpMessage::Notification(
            BgpNotificationMessage::OpenMessageError(
                OpenMessageError::UnsupportedCapability { .. }
            )
        ))
    ));
    assert_eq!(router.next().await, None);
    let deadline = Instant::now() + LIMIT;
    while status(&r).last_error.is_none() {
        assert!(Instant::now() < deadline);
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert!(status(&r).last_error.unwrap().contains("4-octet"));
    r.stop.send_replace(true);
}

#[tokio::test]
async fn a_close_mid_open_backs_off_doubling() {
    let backoff = Duration::from_millis(100);
    let r = rig(9, backoff).await;
    let mut accepted = Vec::new();
    for _ in 0..4 {
        let mut router = Router::accept(&r.listener).await;
        accepted.push(Instant::now());
        assert!(matches!(router.next().await, Some(BgpMessage::Open(_))));
        // Half an OPEN, then gone.
        router.stream.write_all(&[0xff; 10]).await.unwrap();
        drop(router);
    }
    let gaps: Vec<Duration> = accepted.windows(2).map(|w| w[1] - w[0]).collect();
    // 100, 200, 400 ms (the cap is 4x the first).
    for (gap, want) in gaps.iter().zip([100u64, 200, 400]) {
        let want = Duration::from_millis(want);
        assert!(
            *gap >= want && *gap < want + Duration::from_millis(300),
            "gaps {gaps:?}"
        );
    }
    assert_eq!(status(&r).established_total, 0);
    r.stop.send_replace(true);
    timeout(LIMIT, r.task).await.unwrap().unwrap();
}

#[tokio::test]
async fn a_silent_peer_expires_the_hold_timer() {
    let r = rig(3, Duration::from_millis(50)).await;
    let mut router = Router::accept(&r.listener).await;
    router.establish(3).await;
    let established = Instant::now();
    // Keepalives come every hold/3 = 1 s; the router never answers.
    let mut keepalives = 0;
    loop {
        match router.next().await {
            Some(BgpMessage::KeepAlive) => keepalives += 1,
            Some(BgpMessage::Update(_)) => {}
            Some(BgpMessage::Notification(BgpNotificationMessage::HoldTimerExpiredError(_))) => {
                break;
            }
            other => panic!("unexpected {other:?}"),
        }
    }
    let took = established.elapsed();
    assert!(
        took >= Duration::from_millis(2900) && took < Duration::from_secs(4),
        "{took:?}"
    );
    assert!(keepalives >= 2, "{keepalives} keepalives in {took:?}");
    r.stop.send_replace(true);
}

#[tokio::test]
async fn a_malformed_update_is_counted_and_the_session_stays() {
    let r = rig(9, Duration::from_millis(50)).await;
    let mut router = Router::accept(&r.listener).await;
    router.establish(9).await;
    // A well-framed UPDATE whose path attributes length runs past the message.
    let mut bad = vec![0xffu8; 16];
    bad.extend_from_slice(&27u16.to_be_bytes());
    bad.push(2);
    bad.extend_from_slice(&[0, 0, 0, 200, 1, 2, 3, 4]);
    router.stream.write_all(&bad).await.unwrap();
    router.send(BgpMessage::KeepAlive).await;
    let deadline = Instant::now() + LIMIT;
    while status(&r).malformed_updates == 0 {
        assert!(Instant::now() < deadline, "{:?}", status(&r));
        tokio::time::sleep(Duration::from_millis(5)).await;
    }
    assert_eq!(status(&r).state, State::Established);
    r.stop.send_replace(true);
}

fn framed(kind: u8, body: &[u8]) -> Vec<u8> {
    let mut m = vec![0xff; 16];
    m.extend_from_slice(&u16::try_from(19 + body.len()).unwrap().to_be_bytes());
    m.push(kind);
    m.extend_from_slice(body);
    m
}

/// A malformed UPDATE is consumed whole (its length says where the next message starts), so
/// the KEEPALIVE behind it reads; a message cut across reads waits for its rest.
#[test]
fn framing_consumes_a_malformed_update_and_reads_on() {
    let mut inbound = Inbound::new();
    // Withdrawn routes longer than the message.
    let bad = framed(2, &[0xff, 0xff, 0, 0]);
    let keepalive = framed(4, &[]);
    inbound.buffer().extend_from_slice(&bad);
    inbound.buffer().extend_from_slice(&keepalive[..10]);
    assert!(matches!(
        inbound.next_frame(),
        Ok(Some(Frame::MalformedUpdate(_)))
    ));
    assert!(matches!(inbound.next_frame(), Ok(None)));
    inbound.buffer().extend_from_slice(&keepalive[10..]);
    assert!(matches!(
        inbound.next_frame(),
        Ok(Some(Frame::Message(BgpMessage::KeepAlive)))
    ));
    assert!(matches!(inbound.next_frame(), Ok(None)));
    assert!(inbound.buffer().is_empty());
    // A lost marker ends the stream with a header error.
    inbound.buffer().extend_from_slice(&[0; 19]);
    assert!(matches!(
        inbound.next_frame(),
        Err(Unframed {
            notification: BgpNotificationMessage::MessageHeaderError(
                MessageHeaderError::ConnectionNotSynchronized { .. }
            ),
            ..
        })
    ));
}
