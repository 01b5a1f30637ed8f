//! Everything that decides, sans-IO: no sockets, no clock reads, no tokio. The IO
//! shell (`crate::io`) feeds events in and does what these types say.

pub mod admin;
pub mod answer_idle;
pub mod delivery;
pub mod dscp;
pub mod job_order;
pub mod journal;
pub mod learner;
pub mod live;
pub mod optimizer;
pub mod order;
pub mod pacing;
pub mod pairing;
pub mod policy;
pub mod preamble;
pub mod priority;
pub mod proxy;
pub mod scheduler;
pub mod slice;
pub mod split;
pub mod topology;
