//! The in-kernel relay: the client and backend sockets of a connection go into a sockmap whose
//! sk_skb stream verdict program (`lb-ebpf/src/relay.rs`) redirects every chunk one socket
//! receives out of the other, so request/response traffic never wakes the daemon. The daemon
//! keeps what the userspace relay guarantees:
//!
//! - **Byte counters and idle timeout** from the program's per-socket entry (`RELAY_LINKS`:
//!   bytes redirected, last arrival), read when the idle deadline comes and when the relay ends.
//! - **Half-close.** FIN and RST still wake the socket (they are not data). On a side's EOF the
//!   daemon waits until the other socket has taken every byte redirected into it (the kernel
//!   sends redirected data from a work queue) and then shuts down its write half.
//! - **Drain reset and cancellation**: as with the userspace relay, the caller owns the sockets.
//!
//! Joining a connection: both sockets' entries are created first, then the sockets go into the
//! sockmap, then `SO_RCVLOWAT` is set on each, which makes the kernel run the verdict over bytes
//! that arrived before the socket was in the map (a client's first request, typically), in order
//! with whatever comes next.

use std::{
    io,
    os::fd::{AsFd, AsRawFd, BorrowedFd},
    sync::Mutex,
    time::{Duration, Instant},
};

use aya::{
    Ebpf,
    maps::{HashMap as BpfHashMap, MapData, SockHash},
    programs::SkSkb,
};
use lb_common::RelayLink;
use tokio::net::TcpStream;

use super::relay::{Progress, RelayEnd};

/// Name of the verdict program and its maps in the relay object.
const PROGRAM: &str = "relay_verdict";
const SOCKETS_MAP: &str = "RELAY_SOCKETS";
const LINKS_MAP: &str = "RELAY_LINKS";

/// How often a half-closing side looks whether its peer socket has taken every redirected byte.
const FLUSH_POLL: Duration = Duration::from_millis(1);

#[derive(Debug, thiserror::Error)]
pub enum SockmapError {
    #[error("loading the relay object: {0}")]
    Load(#[from] aya::EbpfError),
    #[error("the relay object has no {0}")]
    Missing(&'static str),
    #[error("relay program: {0}")]
    Program(#[from] aya::programs::ProgramError),
    #[error("relay map: {0}")]
    Map(#[from] aya::maps::MapError),
}

/// The loaded verdict program and its maps, shared by every relayed connection of the proxy.
pub struct KernelRelay {
    sockets: Mutex<SockHash<MapData, u64>>,
    links: Mutex<BpfHashMap<MapData, u64, RelayLink>>,
    /// Keeps the program loaded and attached to the sockmap.
    _ebpf: Ebpf,
}

impl std::fmt::Debug for KernelRelay {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("KernelRelay")
    }
}

impl KernelRelay {
    /// Loads the relay object and attaches its verdict program to its sockmap.
    pub fn load(object: &[u8]) -> Result<Self, SockmapError> {
        let mut ebpf = Ebpf::load(object)?;
        let sockets: SockHash<MapData, u64> = ebpf
            .take_map(SOCKETS_MAP)
            .ok_or(SockmapError::Missing(SOCKETS_MAP))?
            .try_into()?;
        let links: BpfHashMap<MapData, u64, RelayLink> = ebpf
            .take_map(LINKS_MAP)
            .ok_or(SockmapError::Missing(LINKS_MAP))?
            .try_into()?;
        let program: &mut SkSkb = ebpf
            .program_mut(PROGRAM)
            .ok_or(SockmapError::Missing(PROGRAM))?
            .try_into()?;
        program.load()?;
        program.attach(sockets.fd())?;
        Ok(KernelRelay {
            sockets: Mutex::new(sockets),
            links: Mutex::new(links),
            _ebpf: ebpf,
        })
    }

    fn link(&self, cookie: u64) -> Option<RelayLink> {
        let links = self
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        links.get(&cookie, 0).ok()
    }

    /// Puts both sockets in the map, linked to each other.
    fn join(&self, client: &Joined<'_>, backend: &Joined<'_>) -> io::Result<()> {
        {
            let mut links = self
                .links
                .lock()
                .unwrap_or_else(std::sync::PoisonError::into_inner);
            for (from, to) in [(client, backend), (backend, client)] {
                let link = RelayLink {
                    peer: to.cookie,
                    ..RelayLink::default()
                };
                links
                    .insert(from.cookie, link, 0)
                    .map_err(io::Error::other)?;
            }
        }
        let mut sockets = self
            .sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for s in [client, backend] {
            sockets
                .insert(s.cookie, s.fd.as_raw_fd(), 0)
                .map_err(io::Error::other)?;
        }
        Ok(())
    }

    /// Takes both sockets out of the map and forgets their entries (a socket closing leaves the
    /// sockmap by itself; this covers sockets that stay open, e.g. for a reset).
    fn leave(&self, cookies: [u64; 2]) {
        let mut sockets = self
            .sockets
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for c in cookies {
            let _ = sockets.remove(&c);
        }
        drop(sockets);
        let mut links = self
            .links
            .lock()
            .unwrap_or_else(std::sync::PoisonError::into_inner);
        for c in cookies {
            let _ = links.remove(&c);
        }
    }
}

struct Joined<'a> {
    fd: BorrowedFd<'a>,
    cookie: u64,
}

fn cookie(fd: BorrowedFd<'_>) -> io::Result<u64> {
    let mut cookie: u64 = 0;
    let mut len = libc::socklen_t::try_from(size_of::<u64>()).unwrap_or(8);
    // SAFETY: `cookie` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_COOKIE,
            (&raw mut cookie).cast(),
            &raw mut len,
        )
    };
    if rc == 0 {
        Ok(cookie)
    } else {
        Err(io::Error::last_os_error())
    }
}

/// `SO_RCVLOWAT` = 1 (the default, so nothing changes but the kernel's readiness check): on a
/// socket in the sockmap this hands bytes already queued to the verdict.
fn rcvlowat_one(fd: BorrowedFd<'_>) {
    let one: libc::c_int = 1;
    let len = libc::socklen_t::try_from(size_of::<libc::c_int>()).unwrap_or(4);
    // SAFETY: `one` is valid for reads of `len` bytes.
    let _ = unsafe {
        libc::setsockopt(
            fd.as_raw_fd(),
            libc::SOL_SOCKET,
            libc::SO_RCVLOWAT,
            (&raw const one).cast(),
            len,
        )
    };
}

/// Bytes the application (here: the kernel's redirect) has written into the socket so far: new
/// data sent plus data queued but not sent, from one `TCP_INFO` snapshot.
fn written(fd: BorrowedFd<'_>) -> io::Result<u64> {
    // struct tcp_info (linux/tcp.h): tcpi_notsent_bytes (u32) at 144, tcpi_bytes_sent (u64) at
    // 200, tcpi_bytes_retrans (u64) at 208; all there since Linux 4.19.
    const LEN: usize = 216;
    let mut info = [0u8; LEN];
    let mut len = libc::socklen_t::try_from(LEN).unwrap_or(0);
    // SAFETY: `info` and `len` are valid for writes of the sizes given.
    let rc = unsafe {
        libc::getsockopt(
            fd.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_INFO,
            info.as_mut_ptr().cast(),
            &raw mut len,
        )
    };
    if rc != 0 {
        return Err(io::Error::last_os_error());
    }
    if usize::try_from(len).unwrap_or(0) < LEN {
        return Err(io::Error::new(
            io::ErrorKind::Unsupported,
            "TCP_INFO too short (kernel older than 4.19)",
        ));
    }
    let u64_at = |o: usize| u64::from_ne_bytes(info[o..o + 8].try_into().unwrap_or([0; 8]));
    let notsent = u32::from_ne_bytes(info[144..148].try_into().unwrap_or([0; 4]));
    Ok(u64_at(200).saturating_sub(u64_at(208)) + u64::from(notsent))
}

/// Relays between `client` and `backend` in the kernel until both directions end, one side
/// fails, or nothing moved for `idle` (`Duration::ZERO`: no idle timeout). Counters reach
/// `progress` when the idle deadline is checked and when the relay ends.
pub async fn relay(
    kernel: &KernelRelay,
    client: &mut TcpStream,
    backend: &mut TcpStream,
    idle: Duration,
    progress: &Progress,
) -> RelayEnd {
    progress.touch();
    let (c, b) = match (cookie(client.as_fd()), cookie(backend.as_fd())) {
        (Ok(c), Ok(b)) => (c, b),
        (Err(e), _) => return RelayEnd::ClientError(e.kind()),
        (_, Err(e)) => return RelayEnd::BackendError(e.kind()),
    };
    let cj = Joined {
        fd: client.as_fd(),
        cookie: c,
    };
    let bj = Joined {
        fd: backend.as_fd(),
        cookie: b,
    };
    if let Err(e) = kernel.join(&cj, &bj) {
        kernel.leave([c, b]);
        tracing::debug!("sockmap join: {e}");
        return RelayEnd::ClientError(e.kind());
    }
    // Bytes that arrived before the join go through the verdict now.
    for s in [client.as_fd(), backend.as_fd()] {
        rcvlowat_one(s);
    }
    let guard = Leave {
        kernel,
        cookies: [c, b],
    };
    let end = tokio::select! {
        biased;
        end = both_ways(kernel, client, backend, [c, b]) => end,
        () = idle_watch(kernel, idle, [c, b], progress) => RelayEnd::IdleTimeout,
    };
    publish(kernel, [c, b], progress);
    drop(guard);
    end
}

/// Takes the sockets out of the map when the relay ends or is dropped.
struct Leave<'a> {
    kernel: &'a KernelRelay,
    cookies: [u64; 2],
}

impl Drop for Leave<'_> {
    fn drop(&mut self) {
        self.kernel.leave(self.cookies);
    }
}

/// Copies the program's counters into `progress`; returns the latest arrival.
fn publish(kernel: &KernelRelay, [c, b]: [u64; 2], progress: &Progress) -> Option<Instant> {
    let up = kernel.link(c)?;
    let down = kernel.link(b)?;
    progress
        .to_backend
        .store(up.bytes, std::sync::atomic::Ordering::Relaxed);
    progress
        .to_client
        .store(down.bytes, std::sync::atomic::Ordering::Relaxed);
    let last_ns = up.last_ns.max(down.last_ns);
    (last_ns != 0).then(|| monotonic_instant(last_ns))
}

/// The `Instant` of a `CLOCK_MONOTONIC` reading (which `bpf_ktime_get_ns` and `Instant` share).
fn monotonic_instant(ns: u64) -> Instant {
    let now = Instant::now();
    let now_ns = nix::time::clock_gettime(nix::time::ClockId::CLOCK_MONOTONIC).map_or(0, |t| {
        u64::try_from(t.tv_sec()).unwrap_or(0) * 1_000_000_000
            + u64::try_from(t.tv_nsec()).unwrap_or(0)
    });
    now.checked_sub(Duration::from_nanos(now_ns.saturating_sub(ns)))
        .unwrap_or(now)
}

async fn idle_watch(kernel: &KernelRelay, idle: Duration, cookies: [u64; 2], progress: &Progress) {
    if idle.is_zero() {
        return std::future::pending().await;
    }
    loop {
        if let Some(last) = publish(kernel, cookies, progress)
            && last > progress.last_activity()
        {
            progress.touch_at(last);
        }
        let deadline = progress.last_activity() + idle;
        if Instant::now() >= deadline {
            return;
        }
        tokio::time::sleep_until(deadline.into()).await;
    }
}

async fn both_ways(
    kernel: &KernelRelay,
    client: &TcpStream,
    backend: &TcpStream,
    [c, b]: [u64; 2],
) -> RelayEnd {
    let up = one_way(kernel, client, backend, c);
    let down = one_way(kernel, backend, client, b);
    match tokio::try_join!(async { up.await.map_err(|e| e.map_side(true)) }, async {
        down.await.map_err(|e| e.map_side(false))
    },)
    {
        Ok(_) => RelayEnd::Closed,
        Err(end) => end,
    }
}

#[derive(Debug)]
enum WayError {
    From(io::ErrorKind),
    To(io::ErrorKind),
}

impl WayError {
    /// `up`: the way from the client to the backend.
    fn map_side(self, up: bool) -> RelayEnd {
        match (self, up) {
            (WayError::From(k), true) | (WayError::To(k), false) => RelayEnd::ClientError(k),
            (WayError::From(k), false) | (WayError::To(k), true) => RelayEnd::BackendError(k),
        }
    }
}

/// Waits for `from`'s EOF (its bytes go to `to` in the kernel), then for `to` to have taken every
/// byte redirected into it, then shuts down `to`'s write half.
async fn one_way(
    kernel: &KernelRelay,
    from: &TcpStream,
    to: &TcpStream,
    from_cookie: u64,
) -> Result<(), WayError> {
    let mut spill = [0u8; 16 * 1024];
    loop {
        from.readable()
            .await
            .map_err(|e| WayError::From(e.kind()))?;
        match from.try_read(&mut spill) {
            Ok(0) => break,
            // Passed up by the verdict (no link for a moment): written on by hand.
            Ok(n) => write_all(to, &spill[..n]).await.map_err(WayError::To)?,
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(WayError::From(e.kind())),
        }
    }
    // Every byte before the FIN went through the verdict; wait until `to` has it all.
    let redirected = kernel.link(from_cookie).map_or(0, |l| l.bytes);
    loop {
        match written(to.as_fd()) {
            Ok(w) if w >= redirected => break,
            Ok(_) => tokio::time::sleep(FLUSH_POLL).await,
            Err(e) => return Err(WayError::To(e.kind())),
        }
        if let Ok(Some(e)) = to.take_error() {
            return Err(WayError::To(e.kind()));
        }
    }
    nix::sys::socket::shutdown(to.as_raw_fd(), nix::sys::socket::Shutdown::Write)
        .map_err(|e| WayError::To(io::Error::from(e).kind()))
}

async fn write_all(to: &TcpStream, mut buf: &[u8]) -> Result<(), io::ErrorKind> {
    while !buf.is_empty() {
        to.writable().await.map_err(|e| e.kind())?;
        match to.try_write(buf) {
            Ok(n) => buf = &buf[n..],
            Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
            Err(e) => return Err(e.kind()),
        }
    }
    Ok(())
}

/// Prototype switch: `LB_RELAY_OBJECT` names the relay object to use for every TCP connection.
pub fn global() -> Option<&'static KernelRelay> {
    static KERNEL: std::sync::OnceLock<Option<KernelRelay>> = std::sync::OnceLock::new();
    KERNEL
        .get_or_init(|| {
            let path = std::env::var_os("LB_RELAY_OBJECT")?;
            let object = std::fs::read(path).ok()?;
            match KernelRelay::load(&object) {
                Ok(k) => Some(k),
                Err(e) => {
                    tracing::error!("sockmap relay: {e}");
                    None
                }
            }
        })
        .as_ref()
}

#[cfg(test)]
mod tests {
    use std::sync::Arc;

    use tokio::{
        io::{AsyncReadExt, AsyncWriteExt},
        net::{TcpListener, TcpStream},
        time::timeout,
    };

    use super::*;

    fn kernel() -> &'static KernelRelay {
        static K: std::sync::OnceLock<KernelRelay> = std::sync::OnceLock::new();
        K.get_or_init(|| {
            let path = concat!(env!("CARGO_MANIFEST_DIR"), "/../target/bpf/lb-relay.o");
            KernelRelay::load(&std::fs::read(path).unwrap()).unwrap()
        })
    }

    #[tokio::test]
    async fn prototype_round_trips() {
        let front = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let back = TcpListener::bind("127.0.0.1:0").await.unwrap();
        let mut client = TcpStream::connect(front.local_addr().unwrap())
            .await
            .unwrap();
        client.write_all(b"early").await.unwrap();
        let (mut ec, _) = front.accept().await.unwrap();
        let mut eb = TcpStream::connect(back.local_addr().unwrap())
            .await
            .unwrap();
        let (mut backend, _) = back.accept().await.unwrap();
        for s in [&client, &ec, &eb, &backend] {
            s.set_nodelay(true).unwrap();
        }
        let progress = Arc::new(Progress::default());
        let p = progress.clone();
        let r = tokio::spawn(async move {
            relay(kernel(), &mut ec, &mut eb, Duration::from_secs(10), &p).await
        });
        let mut buf = [0u8; 5];
        timeout(Duration::from_secs(5), backend.read_exact(&mut buf))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(&buf, b"early");
        let t0 = Instant::now();
        for i in 0..1000u32 {
            if i % 100 == 0 {
                eprintln!("{i} {:?}", t0.elapsed());
            }
            client.write_all(&i.to_be_bytes()).await.unwrap();
            let mut q = [0u8; 4];
            backend.read_exact(&mut q).await.unwrap();
            backend.write_all(&q).await.unwrap();
            backend.write_all(&q).await.unwrap();
            let mut a = [0u8; 8];
            client.read_exact(&mut a).await.unwrap();
            assert_eq!(a[..4], i.to_be_bytes());
        }
        eprintln!("loop {:?}", t0.elapsed());
        client.write_all(b"last").await.unwrap();
        client.shutdown().await.unwrap();
        let mut rest = Vec::new();
        timeout(Duration::from_secs(5), backend.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rest, b"last");
        backend.write_all(b"bye").await.unwrap();
        backend.shutdown().await.unwrap();
        let mut rest = Vec::new();
        timeout(Duration::from_secs(5), client.read_to_end(&mut rest))
            .await
            .unwrap()
            .unwrap();
        assert_eq!(rest, b"bye");
        assert_eq!(
            timeout(Duration::from_secs(5), r).await.unwrap().unwrap(),
            RelayEnd::Closed
        );
        assert_eq!(
            progress
                .to_backend
                .load(std::sync::atomic::Ordering::Relaxed),
            5 + 4000 + 4
        );
        assert_eq!(
            progress
                .to_client
                .load(std::sync::atomic::Ordering::Relaxed),
            8000 + 3
        );
    }
}
