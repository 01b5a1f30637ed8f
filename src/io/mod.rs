//! Everything that moves bytes (tokio): the listeners, original destinations, ZMTP
//! sessions toward apps, tunnels toward peer proxies. Thin: it asks `core` what to
//! do and does it, like quinn over quinn-proto.

mod egress;
mod inbound;
mod journal;
mod memory;
mod net;
mod relay;
mod scheduled;
mod server;
mod session;
mod split;
mod streamed;

pub use inbound::InboundError;
pub use journal::JournalFileError;
pub use net::{Env, OrigDst};
pub use server::{run, Bound, Shared, StartError};
