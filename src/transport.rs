//! Transports: listener URLs (`ws://`, `wss://`, `tcp://`, `unix://`, with `?roles=` and
//! `?pages=`),
//! the socket kinds behind them, and TLS driven without blocking on the reactor thread.

use std::fmt;
use std::io::{self, IoSlice, Read, Write};
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::str::FromStr;
use std::sync::Arc;

use mio::event::Source;
use mio::net::{TcpStream, UnixStream};
use mio::{Interest, Registry, Token};

use crate::broker::Role;
use crate::web::Pages;

/// How messages are framed on a listener's connections.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Scheme {
    /// WebSocket over TCP.
    Ws,
    /// WebSocket over TLS.
    Wss,
    /// The raw stream protocol over TCP.
    Tcp,
    /// The raw stream protocol over a Unix-domain socket.
    Unix,
}

impl Scheme {
    /// WebSocket framing (ws, wss) rather than the raw stream.
    pub fn is_websocket(self) -> bool {
        matches!(self, Scheme::Ws | Scheme::Wss)
    }
    /// The URL scheme.
    pub fn name(self) -> &'static str {
        match self {
            Scheme::Ws => "ws",
            Scheme::Wss => "wss",
            Scheme::Tcp => "tcp",
            Scheme::Unix => "unix",
        }
    }
}

/// Where a listener listens.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Endpoint {
    /// A TCP address.
    Tcp(SocketAddr),
    /// A Unix-domain socket path.
    Unix(PathBuf),
}

/// One listener: scheme, endpoint, the roles whose keys it accepts and the plain HTTP
/// pages it serves.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Listen {
    /// Framing (and TLS).
    pub scheme: Scheme,
    /// Address or path.
    pub endpoint: Endpoint,
    /// Roles accepted here; `None` accepts every role.
    pub roles: Option<Vec<Role>>,
    /// Plain HTTP pages served here (`?pages=`); every page by default.
    pub pages: Pages,
}

impl Listen {
    /// A plain WebSocket listener accepting every role.
    pub fn ws(addr: SocketAddr) -> Listen {
        Listen {
            scheme: Scheme::Ws,
            endpoint: Endpoint::Tcp(addr),
            roles: None,
            pages: Pages::ALL,
        }
    }

    /// Whether a key of `role` may connect here.
    pub fn allows(&self, role: Role) -> bool {
        self.roles.as_ref().is_none_or(|r| r.contains(&role))
    }

    /// True for loopback TCP addresses and Unix sockets (local by nature).
    pub fn is_local(&self) -> bool {
        match &self.endpoint {
            Endpoint::Tcp(a) => a.ip().is_loopback(),
            Endpoint::Unix(_) => true,
        }
    }
}

impl fmt::Display for Listen {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match &self.endpoint {
            Endpoint::Tcp(a) => write!(f, "{}://{a}", self.scheme.name())?,
            Endpoint::Unix(p) => write!(f, "unix://{}", p.display())?,
        }
        let mut sep = '?';
        if let Some(roles) = &self.roles {
            let names: Vec<&str> = roles.iter().map(|r| r.name()).collect();
            write!(f, "{sep}roles={}", names.join(","))?;
            sep = '&';
        }
        if self.pages != Pages::ALL {
            write!(f, "{sep}pages={}", self.pages)?;
        }
        Ok(())
    }
}

impl FromStr for Listen {
    type Err = String;

    /// `ws://HOST:PORT` (also plain `HOST:PORT`), `wss://HOST:PORT`, `tcp://HOST:PORT`,
    /// `unix:///path`, each optionally followed by `?roles=service,monitor,client` and/or
    /// `pages=healthz,metrics,stats,console,js,demo` (or `pages=none`), joined by `&`.
    fn from_str(s: &str) -> Result<Self, Self::Err> {
        let s = s.trim();
        let (rest, query) = match s.split_once('?') {
            Some((r, q)) => (r, Some(q)),
            None => (s, None),
        };
        let (scheme, addr) = match rest.split_once("://") {
            Some((sch, a)) => (sch.to_ascii_lowercase(), a),
            None => ("ws".to_owned(), rest),
        };
        let scheme = match scheme.as_str() {
            "ws" => Scheme::Ws,
            "wss" => Scheme::Wss,
            "tcp" => Scheme::Tcp,
            "unix" => Scheme::Unix,
            other => {
                return Err(format!(
                    "listener {s:?}: unknown scheme {other:?} (use ws, wss, tcp or unix)"
                ))
            }
        };
        let endpoint = if scheme == Scheme::Unix {
            if addr.is_empty() {
                return Err(format!("listener {s:?}: unix:// needs a path"));
            }
            Endpoint::Unix(PathBuf::from(addr))
        } else {
            let addr = addr.trim_end_matches('/');
            let parsed = addr.parse::<SocketAddr>().or_else(|_| {
                // Accept "localhost:PORT".
                match addr.rsplit_once(':') {
                    Some(("localhost", port)) => port
                        .parse::<u16>()
                        .map(|p| SocketAddr::from(([127, 0, 0, 1], p)))
                        .map_err(|_| ()),
                    _ => Err(()),
                }
            });
            Endpoint::Tcp(parsed.map_err(|_| {
                format!("listener {s:?}: {addr:?} is not an IP address with a port")
            })?)
        };
        let mut roles = None;
        let mut pages = Pages::ALL;
        if let Some(q) = query {
            for pair in q.split('&').filter(|p| !p.is_empty()) {
                let (k, v) = pair.split_once('=').unwrap_or((pair, ""));
                if k == "pages" {
                    pages = Pages::parse_list(v).map_err(|e| format!("listener {s:?}: {e}"))?;
                    continue;
                }
                if k != "roles" {
                    return Err(format!(
                        "listener {s:?}: unknown option {k:?} (roles= or pages=)"
                    ));
                }
                let mut list = Vec::new();
                for name in v.split(',').map(str::trim).filter(|n| !n.is_empty()) {
                    list.push(match name {
                        "service" => Role::Service,
                        "client" => Role::Client,
                        "monitor" => Role::Monitor,
                        other => {
                            return Err(format!(
                                "listener {s:?}: unknown role {other:?} (service, client, monitor)"
                            ))
                        }
                    });
                }
                if list.is_empty() {
                    return Err(format!("listener {s:?}: roles= names no role"));
                }
                roles = Some(list);
            }
        }
        Ok(Listen {
            scheme,
            endpoint,
            roles,
            pages,
        })
    }
}

/// A connected socket of either kind.
#[derive(Debug)]
pub enum Sock {
    /// TCP.
    Tcp(TcpStream),
    /// Unix-domain stream.
    Unix(UnixStream),
}

impl Read for Sock {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.read(buf),
            Sock::Unix(s) => s.read(buf),
        }
    }
}

impl Write for Sock {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write(buf),
            Sock::Unix(s) => s.write(buf),
        }
    }
    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        match self {
            Sock::Tcp(s) => s.write_vectored(bufs),
            Sock::Unix(s) => s.write_vectored(bufs),
        }
    }
    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Sock {
    /// Shut down one or both directions.
    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.shutdown(how),
            Sock::Unix(s) => s.shutdown(how),
        }
    }
}

impl Source for Sock {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.register(r, t, i),
            Sock::Unix(s) => s.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.reregister(r, t, i),
            Sock::Unix(s) => s.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        match self {
            Sock::Tcp(s) => s.deregister(r),
            Sock::Unix(s) => s.deregister(r),
        }
    }
}

/// Most plaintext rustls may hold for sending; beyond it writes are partial and the rest
/// stays in the connection's own queue (where the slow-consumer cap counts it).
const TLS_BUFFER_LIMIT: usize = 64 * 1024;

/// A connection's byte stream: a socket, with TLS on top for `wss://`.
pub struct Link {
    /// The socket.
    pub sock: Sock,
    tls: Option<Box<rustls::ServerConnection>>,
}

impl Link {
    /// A plain link.
    pub fn plain(sock: Sock) -> Link {
        Link { sock, tls: None }
    }

    /// A TLS link (server side).
    pub fn tls(sock: Sock, config: &Arc<rustls::ServerConfig>) -> io::Result<Link> {
        let mut conn = rustls::ServerConnection::new(config.clone()).map_err(io::Error::other)?;
        conn.set_buffer_limit(Some(TLS_BUFFER_LIMIT));
        Ok(Link {
            sock,
            tls: Some(Box::new(conn)),
        })
    }

    /// TLS records are waiting to go out on the socket.
    pub fn tls_pending(&self) -> bool {
        self.tls.as_ref().is_some_and(|t| t.wants_write())
    }

    /// Write pending TLS records until the socket would block.
    pub fn flush_tls(&mut self) -> io::Result<()> {
        let Some(tls) = self.tls.as_mut() else {
            return Ok(());
        };
        while tls.wants_write() {
            match tls.write_tls(&mut self.sock) {
                Ok(0) => return Err(io::ErrorKind::WriteZero.into()),
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => return Ok(()),
                Err(e) if e.kind() == io::ErrorKind::Interrupted => {}
                Err(e) => return Err(e),
            }
        }
        Ok(())
    }

    /// Begin a TLS close (close_notify) after what is queued.
    pub fn send_close_notify(&mut self) {
        if let Some(tls) = self.tls.as_mut() {
            tls.send_close_notify();
        }
    }

    /// Shut down the socket.
    pub fn shutdown(&self, how: std::net::Shutdown) -> io::Result<()> {
        self.sock.shutdown(how)
    }
}

impl Read for Link {
    fn read(&mut self, buf: &mut [u8]) -> io::Result<usize> {
        let Some(tls) = self.tls.as_mut() else {
            return self.sock.read(buf);
        };
        loop {
            match tls.reader().read(buf) {
                Ok(n) => return Ok(n),
                Err(e) if e.kind() == io::ErrorKind::WouldBlock => {}
                Err(e) => return Err(e),
            }
            // No plaintext buffered: read records from the socket.
            match tls.read_tls(&mut self.sock) {
                Ok(0) => return Ok(0),
                Ok(_) => {
                    let state = tls.process_new_packets().map_err(|e| {
                        // Try to tell the peer why (the alert is queued by rustls).
                        let _ = tls.write_tls(&mut self.sock);
                        io::Error::new(io::ErrorKind::InvalidData, e)
                    });
                    // Handshake replies and alerts go out as soon as they exist.
                    while tls.wants_write() {
                        match tls.write_tls(&mut self.sock) {
                            Ok(_) => {}
                            Err(e) if e.kind() == io::ErrorKind::WouldBlock => break,
                            Err(e) => return Err(e),
                        }
                    }
                    let state = state?;
                    if state.peer_has_closed() && state.plaintext_bytes_to_read() == 0 {
                        return Ok(0);
                    }
                }
                Err(e) => return Err(e),
            }
        }
    }
}

impl Write for Link {
    fn write(&mut self, buf: &[u8]) -> io::Result<usize> {
        self.write_vectored(&[IoSlice::new(buf)])
    }

    fn write_vectored(&mut self, bufs: &[IoSlice<'_>]) -> io::Result<usize> {
        if self.tls.is_none() {
            return self.sock.write_vectored(bufs);
        }
        self.flush_tls()?;
        let Some(tls) = self.tls.as_mut() else {
            return Ok(0);
        };
        let n = tls.writer().write_vectored(bufs)?;
        self.flush_tls()?;
        if n == 0 && bufs.iter().any(|b| !b.is_empty()) {
            // rustls' buffer is at its limit until the socket drains.
            return Err(io::ErrorKind::WouldBlock.into());
        }
        Ok(n)
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Source for Link {
    fn register(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        self.sock.register(r, t, i)
    }
    fn reregister(&mut self, r: &Registry, t: Token, i: Interest) -> io::Result<()> {
        self.sock.reregister(r, t, i)
    }
    fn deregister(&mut self, r: &Registry) -> io::Result<()> {
        self.sock.deregister(r)
    }
}

/// Load a PEM certificate chain and private key into a rustls server configuration.
pub fn load_tls(cert: &Path, key: &Path) -> Result<Arc<rustls::ServerConfig>, String> {
    use rustls::pki_types::pem::PemObject;
    use rustls::pki_types::{CertificateDer, PrivateKeyDer};
    let certs: Vec<CertificateDer<'static>> = CertificateDer::pem_file_iter(cert)
        .map_err(|e| format!("TLS certificate {}: {e}", cert.display()))?
        .collect::<Result<_, _>>()
        .map_err(|e| format!("TLS certificate {}: {e}", cert.display()))?;
    if certs.is_empty() {
        return Err(format!(
            "TLS certificate {}: no certificate found",
            cert.display()
        ));
    }
    let key =
        PrivateKeyDer::from_pem_file(key).map_err(|e| format!("TLS key {}: {e}", key.display()))?;
    let provider = Arc::new(rustls::crypto::ring::default_provider());
    let config = rustls::ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(|e| format!("TLS: {e}"))?
        .with_no_client_auth()
        .with_single_cert(certs, key)
        .map_err(|e| format!("TLS certificate/key: {e}"))?;
    Ok(Arc::new(config))
}

/// Bind a TCP listener. With `reuse_port`, SO_REUSEPORT is set before the bind so that
/// several processes can listen on the same address and port (Linux spreads new
/// connections over them); every one of them must set it.
pub fn bind_tcp(addr: SocketAddr, reuse_port: bool) -> io::Result<mio::net::TcpListener> {
    if !reuse_port {
        return mio::net::TcpListener::bind(addr);
    }
    use socket2::{Domain, Socket, Type};
    let s = Socket::new(Domain::for_address(addr), Type::STREAM, None)?;
    s.set_reuse_address(true)?;
    s.set_reuse_port(true)?;
    s.set_nonblocking(true)?;
    s.bind(&addr.into())?;
    s.listen(1024)?;
    Ok(mio::net::TcpListener::from_std(s.into()))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn listener_urls() {
        let l: Listen = "127.0.0.1:8765".parse().unwrap();
        assert_eq!(l, Listen::ws("127.0.0.1:8765".parse().unwrap()));
        let l: Listen = "wss://0.0.0.0:443?roles=client".parse().unwrap();
        assert_eq!(l.scheme, Scheme::Wss);
        assert_eq!(l.roles, Some(vec![Role::Client]));
        assert!(!l.is_local());
        let l: Listen = "tcp://127.0.0.1:8764?roles=service,monitor"
            .parse()
            .unwrap();
        assert!(l.allows(Role::Monitor) && !l.allows(Role::Client));
        assert_eq!(l.to_string(), "tcp://127.0.0.1:8764?roles=service,monitor");
        let l: Listen = "unix:///tmp/mm.sock".parse().unwrap();
        assert_eq!(l.endpoint, Endpoint::Unix("/tmp/mm.sock".into()));
        assert!(l.is_local());
        let l: Listen = "ws://localhost:9000/".parse().unwrap();
        assert_eq!(l.endpoint, Endpoint::Tcp("127.0.0.1:9000".parse().unwrap()));
        assert!("http://x:1".parse::<Listen>().is_err());
        assert!("tcp://nohost".parse::<Listen>().is_err());
        assert!("tcp://127.0.0.1:1?roles=admin".parse::<Listen>().is_err());
        assert!("tcp://127.0.0.1:1?x=1".parse::<Listen>().is_err());
        assert!("unix://".parse::<Listen>().is_err());
    }

    #[test]
    fn listener_pages() {
        let l: Listen = "ws://127.0.0.1:1".parse().unwrap();
        assert_eq!(l.pages, Pages::ALL);
        assert_eq!(l.to_string(), "ws://127.0.0.1:1");
        let l: Listen = "wss://0.0.0.0:443?pages=healthz".parse().unwrap();
        assert!(l.pages.serves("/healthz") && !l.pages.serves("/metrics"));
        assert_eq!(l.to_string(), "wss://0.0.0.0:443?pages=healthz");
        let l: Listen = "ws://127.0.0.1:2?roles=client&pages=healthz,metrics"
            .parse()
            .unwrap();
        assert_eq!(l.roles, Some(vec![Role::Client]));
        assert_eq!(
            l.to_string(),
            "ws://127.0.0.1:2?roles=client&pages=healthz,metrics"
        );
        assert_eq!(l.to_string().parse::<Listen>().unwrap(), l);
        let l: Listen = "tcp://127.0.0.1:3?pages=none".parse().unwrap();
        assert_eq!(l.pages, Pages::NONE);
        assert_eq!(l.to_string(), "tcp://127.0.0.1:3?pages=none");
        // Every page named is the same as no option.
        let l: Listen = "ws://127.0.0.1:4?pages=demo,js,console,stats,metrics,healthz"
            .parse()
            .unwrap();
        assert_eq!(l.to_string(), "ws://127.0.0.1:4");
        for bad in [
            "ws://127.0.0.1:1?pages=",
            "ws://127.0.0.1:1?pages=admin",
            "ws://127.0.0.1:1?pages=healthz,nope",
            "ws://127.0.0.1:1?pages=none,stats",
        ] {
            let e = bad.parse::<Listen>().unwrap_err();
            assert!(e.contains("page"), "{bad}: {e}");
        }
    }
}
