//! A server on its own thread, and the handle that stops it from another.

use std::io;
use std::net::SocketAddr;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

use mio::Waker;

use crate::config::Config;
use crate::transport::Listen;

use super::Server;

/// Stops a running [`Server`] from another thread (tests, embedding).
#[derive(Clone)]
pub struct StopHandle {
    pub(super) flag: Arc<AtomicBool>,
    pub(super) waker: Arc<Waker>,
}

impl StopHandle {
    /// Begin a graceful shutdown, as SIGTERM would.
    pub fn stop(&self) {
        self.flag.store(true, Ordering::SeqCst);
        let _ = self.waker.wake();
    }
}

/// A server running on its own thread (for tests and embedding).
pub struct Running {
    /// The first bound TCP address.
    pub addr: SocketAddr,
    /// Every listener as bound (ports filled in).
    pub listeners: Vec<Listen>,
    stop: StopHandle,
    thread: Option<std::thread::JoinHandle<io::Result<()>>>,
}

impl Running {
    /// Bind and run `cfg` on a new thread. The server itself is single-threaded and not
    /// `Send`, so it is built on the thread that runs it.
    pub fn spawn(cfg: Config) -> io::Result<Running> {
        let (tx, rx) = std::sync::mpsc::channel();
        let thread = std::thread::Builder::new()
            .name("middleman".into())
            .spawn(move || match Server::bind(cfg) {
                Ok(server) => {
                    let _ = tx.send(Ok((
                        server.local_addr(),
                        server.listeners(),
                        server.stop_handle(),
                    )));
                    server.run()
                }
                Err(e) => {
                    let _ = tx.send(Err(io::Error::new(e.kind(), e.to_string())));
                    Err(e)
                }
            })?;
        let (addr, listeners, stop) = rx
            .recv()
            .map_err(|_| io::Error::other("server thread ended before binding"))??;
        Ok(Running {
            addr,
            listeners,
            stop,
            thread: Some(thread),
        })
    }

    /// A handle that stops the server.
    pub fn stop_handle(&self) -> StopHandle {
        self.stop.clone()
    }

    /// Stop gracefully and wait for the loop to end.
    pub fn stop(mut self) -> io::Result<()> {
        self.stop.stop();
        self.join()
    }

    fn join(&mut self) -> io::Result<()> {
        match self.thread.take() {
            Some(t) => t
                .join()
                .map_err(|_| io::Error::other("server thread panicked"))?,
            None => Ok(()),
        }
    }
}

impl Drop for Running {
    fn drop(&mut self) {
        if self.thread.is_some() {
            self.stop.stop();
            let _ = self.join();
        }
    }
}
