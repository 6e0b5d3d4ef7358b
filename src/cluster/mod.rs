//! Pieces for running several middleman nodes as one cluster over a NATS server used as
//! the backplane. This part is pure and does no I/O: the NATS client protocol codec
//! ([`proto`]) and the mapping of middleman targets to NATS subject tokens ([`subject`]).
//! The reactor drives them over its own sockets.

pub mod proto;
pub mod subject;
