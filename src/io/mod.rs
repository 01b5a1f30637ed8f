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
mod state;
mod streamed;

pub use inbound::InboundError;
pub use journal::JournalFileError;
pub use net::{Bound, Env, OrigDst};
pub use server::run;
pub use state::{Shared, StartError};
