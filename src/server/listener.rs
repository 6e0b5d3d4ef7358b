//! Bound listeners: TCP and Unix sockets behind one `mio` source.

use std::io;
use std::net::IpAddr;

use mio::net::{TcpListener, UnixListener};
use mio::{Interest, Token};

use crate::transport::{Endpoint, Listen, Sock};

/// A bound listener.
pub(super) struct Listener {
    sock: ListenSock,
    /// The spec with the port actually bound.
    pub(super) bound: Listen,
}

enum ListenSock {
    Tcp(TcpListener),
    Unix(UnixListener, std::path::PathBuf),
}

impl Listener {
    pub(super) fn bind(spec: &Listen, reuse_port: bool) -> io::Result<Listener> {
        let (sock, endpoint) = match &spec.endpoint {
            Endpoint::Tcp(addr) => {
                let l = crate::transport::bind_tcp(*addr, reuse_port)?;
                let local = l.local_addr()?;
                (ListenSock::Tcp(l), Endpoint::Tcp(local))
            }
            Endpoint::Unix(path) => {
                // A socket file left by an earlier run is replaced; anything else is not.
                if let Ok(meta) = std::fs::symlink_metadata(path) {
                    use std::os::unix::fs::FileTypeExt;
                    if meta.file_type().is_socket() {
                        std::fs::remove_file(path)?;
                    }
                }
                let l = UnixListener::bind(path)?;
                (
                    ListenSock::Unix(l, path.clone()),
                    Endpoint::Unix(path.clone()),
                )
            }
        };
        Ok(Listener {
            sock,
            bound: Listen {
                endpoint,
                ..spec.clone()
            },
        })
    }

    pub(super) fn accept(&self) -> io::Result<(Sock, String, Option<IpAddr>)> {
        match &self.sock {
            ListenSock::Tcp(l) => {
                let (s, peer) = l.accept()?;
                let _ = s.set_nodelay(true);
                Ok((Sock::Tcp(s), peer.to_string(), Some(peer.ip())))
            }
            ListenSock::Unix(l, path) => {
                let (s, _) = l.accept()?;
                Ok((Sock::Unix(s), format!("unix:{}", path.display()), None))
            }
        }
    }
}

impl mio::event::Source for Listener {
    fn register(&mut self, r: &mio::Registry, t: Token, i: Interest) -> io::Result<()> {
        match &mut self.sock {
            ListenSock::Tcp(l) => l.register(r, t, i),
            ListenSock::Unix(l, _) => l.register(r, t, i),
        }
    }
    fn reregister(&mut self, r: &mio::Registry, t: Token, i: Interest) -> io::Result<()> {
        match &mut self.sock {
            ListenSock::Tcp(l) => l.reregister(r, t, i),
            ListenSock::Unix(l, _) => l.reregister(r, t, i),
        }
    }
    fn deregister(&mut self, r: &mio::Registry) -> io::Result<()> {
        match &mut self.sock {
            ListenSock::Tcp(l) => l.deregister(r),
            ListenSock::Unix(l, _) => l.deregister(r),
        }
    }
}

impl Drop for Listener {
    fn drop(&mut self) {
        if let ListenSock::Unix(_, path) = &self.sock {
            let _ = std::fs::remove_file(path);
        }
    }
}
