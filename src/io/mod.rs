//! Everything that moves bytes (tokio): the listeners, original destinations, ZMTP
//! sessions toward apps, tunnels toward peer proxies. Thin: it asks `core` what to
//! do and does it, like quinn over quinn-proto.

mod admin;
mod captured;
mod egress;
mod error;
mod handshake;
mod inbound;
mod journal;
mod listener;
pub mod memory;
mod net;
mod redirect_check;
mod session;
mod splice;
mod split;
mod state;
mod tunnel_in;
mod upstream;

pub use admin::{serve_admin, Admin, LogControl, SetFilter};
pub use error::{SessionError, Side};
pub use inbound::InboundError;
pub use journal::JournalFileError;
pub use listener::run;
pub use net::{Bound, Env, OrigDst};
pub use state::{Shared, StartError};
