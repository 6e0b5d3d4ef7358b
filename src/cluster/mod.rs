//! Several middleman nodes as one cluster over a nats-server used as the backplane.
//!
//! Pure, no I/O: the NATS client protocol codec ([`proto`]), the mapping of middleman
//! targets to NATS subject tokens ([`subject`]), the node's view of the cluster
//! ([`node`]), what waits for nats-server ([`lanes`]) and the broker's side of it
//! ([`bridge`]). [`link`] is the one connection
//! to nats-server, driven by the server's event loop.

pub mod bridge;
pub mod history;
pub mod lanes;
pub mod link;
pub mod node;
pub mod proto;
pub mod rooms;
pub mod subject;
