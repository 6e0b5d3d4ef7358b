//! middleman: a low-latency publish/subscribe and request/response server over WebSocket.
//!
//! Layers, bottom up: [`protocol`] (the wire format, pure), [`router`] (routing tables,
//! pure), [`broker`] (the meaning of each command, pure), [`conn`] and [`reactor`] (sockets,
//! WebSocket framing and the event loop).

pub mod protocol;
