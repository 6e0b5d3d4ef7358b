//! The middleman wire format (PROTOCOL.md §2): a pure, I/O-free codec.

pub mod decode;
pub mod encode;

pub use decode::{decode_simple, Decoded, Decoder, FrameError, Limits, Message};
pub use encode::{encode_into, Packet, PacketPool, Spent};
