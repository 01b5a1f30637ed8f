//! Relayed sessions, one module each, none importing another: `relay` (both
//! directions pumped), `origin` (the app's side of a scheduled session) and `receiver`
//! (the far end of a sliced tunnel session), on `pump` (one direction, message by
//! message, and what they share).

pub(crate) mod origin;
pub(crate) mod pump;
pub(crate) mod receiver;
pub(crate) mod relay;
