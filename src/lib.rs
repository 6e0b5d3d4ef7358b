//! middleman: a low-latency publish/subscribe and request/response server over WebSocket.
//!
//! Layers, bottom up: [`core`] (the wire format, the routing tables and the meaning of
//! each command: pure), [`config`] (command line, file, listener URLs), [`server`]
//! (sockets, WebSocket framing, HTTP and the event loop), [`cluster`] (several nodes over
//! nats-server), [`client`] (the Rust client and the command line tool), [`bench`].
//!
//! The paths from before the layers were folders stay valid (`middleman::broker`,
//! `middleman::transport`, ...): they are re-exported below.

pub mod bench;
pub mod client;
pub mod cluster;
pub mod config;
pub mod core;
pub mod server;

pub use client::cli;
pub use config::{args, file as config_file};
pub use core::{broker, protocol, router};
pub use server::request as http;
pub use server::{conn, metrics, transport, web};

pub use config::Config;
pub use server::{Running, Server, StopHandle};
