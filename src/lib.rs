//! middleman: a low-latency publish/subscribe and request/response server over WebSocket.
//!
//! Layers, bottom up: [`protocol`] (the wire format, pure), [`router`] (routing tables,
//! pure), [`broker`] (the meaning of each command, pure), [`conn`] and [`reactor`] (sockets,
//! WebSocket framing and the event loop).

pub mod args;
pub mod bench;
pub mod broker;
pub mod cli;
pub mod client;
pub mod cluster;
pub mod config;
pub mod config_file;
pub mod conn;
pub mod http;
pub mod metrics;
pub mod protocol;
pub mod reactor;
pub mod router;

pub use config::Config;
pub use reactor::{Running, Server, StopHandle};
pub mod transport;
pub mod web;
