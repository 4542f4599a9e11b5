//! TCP MD5 signatures (RFC 2385) on a BGP session's socket: the `TCP_MD5SIG` socket option, which
//! no crate here wraps (libc has the constant, not the structure).

use std::{io, net::SocketAddr, os::fd::AsRawFd};

/// `struct tcp_md5sig` of `<linux/tcp.h>`.
#[repr(C)]
struct TcpMd5Sig {
    addr: libc::sockaddr_storage,
    flags: u8,
    prefixlen: u8,
    keylen: u16,
    ifindex: u32,
    key: [u8; lb_model::MAX_PASSWORD_BYTES],
}

/// Signs (and requires signatures on) every segment between `socket` and `peer` with `key`
/// (1–80 bytes).
pub fn set_key(socket: &impl AsRawFd, peer: SocketAddr, key: &[u8]) -> io::Result<()> {
    if key.is_empty() || key.len() > lb_model::MAX_PASSWORD_BYTES {
        return Err(io::Error::new(
            io::ErrorKind::InvalidInput,
            "a TCP MD5 key is 1-80 bytes",
        ));
    }
    let addr = socket2::SockAddr::from(peer);
    // SAFETY: all-zero is a valid value of this plain C structure.
    let mut sig: TcpMd5Sig = unsafe { std::mem::zeroed() };
    // SAFETY: `addr` holds `addr.len()` bytes of a socket address, at most a sockaddr_storage.
    unsafe {
        std::ptr::copy_nonoverlapping(
            addr.as_ptr().cast::<u8>(),
            std::ptr::from_mut(&mut sig.addr).cast::<u8>(),
            addr.len() as usize,
        );
    }
    sig.keylen = u16::try_from(key.len()).unwrap_or(0);
    sig.key[..key.len()].copy_from_slice(key);
    // SAFETY: a valid descriptor, and a pointer to a structure of the length given.
    let r = unsafe {
        libc::setsockopt(
            socket.as_raw_fd(),
            libc::IPPROTO_TCP,
            libc::TCP_MD5SIG,
            std::ptr::from_ref(&sig).cast(),
            u32::try_from(std::mem::size_of::<TcpMd5Sig>()).unwrap_or(0),
        )
    };
    if r == 0 {
        Ok(())
    } else {
        Err(io::Error::last_os_error())
    }
}

#[cfg(test)]
mod tests {
    use std::time::Duration;

    use tokio::net::{TcpListener, TcpSocket};

    use super::*;

    /// A loopback listener that requires `key` from 127.0.0.1.
    fn listener(key: &[u8]) -> TcpListener {
        let s = TcpSocket::new_v4().unwrap();
        set_key(&s, "127.0.0.1:0".parse().unwrap(), key).unwrap();
        s.bind("127.0.0.1:0".parse().unwrap()).unwrap();
        s.listen(8).unwrap()
    }

    async fn connects(to: SocketAddr, key: Option<&[u8]>) -> bool {
        let s = TcpSocket::new_v4().unwrap();
        if let Some(k) = key {
            set_key(&s, to, k).unwrap();
        }
        matches!(
            tokio::time::timeout(Duration::from_millis(500), s.connect(to)).await,
            Ok(Ok(_))
        )
    }

    #[tokio::test]
    async fn only_the_same_key_gets_a_connection() {
        let l = listener(b"s3cret");
        let to = l.local_addr().unwrap();
        assert!(connects(to, Some(b"s3cret")).await, "the same key");
        assert!(!connects(to, Some(b"other")).await, "another key");
        assert!(!connects(to, None).await, "no signature");
    }

    #[test]
    fn bad_keys_are_refused_before_the_kernel() {
        let s = TcpSocket::new_v4().unwrap();
        let to = "127.0.0.1:179".parse().unwrap();
        assert!(set_key(&s, to, b"").is_err());
        assert!(set_key(&s, to, &[b'k'; 81]).is_err());
        set_key(&s, to, &[b'k'; 80]).unwrap();
    }
}
