//! The pure core, no I/O: the protocol's wire format ([`protocol`]), the WebSocket frame
//! reader ([`websocket`]), the routing tables ([`router`]) and the meaning of each
//! command ([`broker`]). Unit tested, fuzzed and benchmarked without sockets.

pub mod broker;
pub mod history;
pub mod protocol;
pub mod rooms;
pub mod router;
pub mod websocket;
