//! p3proxy: a transparent sidecar that carries ps-lite traffic (MXNet `dist_sync`)
//! between hosts and sends what the next forward pass needs first.
//!
//! Dependencies point one way: `io -> core -> parsers`. The wire parsers live in
//! the `p3proxy-parsers` crate (`parsers/`); `core` decides without IO; `io` moves
//! bytes with tokio.

#![warn(rust_2018_idioms, unreachable_pub, missing_docs)]

pub mod capture;
pub mod config;
pub mod core;
pub mod inspect;
pub mod io;
pub mod metrics;
pub mod sim;
pub mod testkit;

pub use p3proxy_parsers as parsers;
