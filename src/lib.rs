//! p3proxy: a transparent sidecar that carries ps-lite traffic (MXNet `dist_sync`)
//! between hosts and sends what the next forward pass needs first.
//!
//! The wire parsers live in the `p3proxy-parsers` crate (`parsers/`); this crate
//! holds the decisions (`core`), the IO shell (`io`) and the tools around them.

#![warn(rust_2018_idioms, unreachable_pub, missing_docs)]

pub mod capture;

pub use p3proxy_parsers as parsers;
