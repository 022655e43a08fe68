//! relay: a thread-per-core io_uring WebSocket relay for CDN edge servers.
//!
//! - [`apps`]: origin-less edge apps (echo, rooms);
//! - [`config`]: the TOML schema and its validation;
//! - [`proto`]: sans-IO HTTP upgrade handling;
//! - [`reactor`]: the io_uring event loop (the only module with `unsafe`);
//! - [`session`]: per-connection state machines and the worker loop;
//! - [`control`]: start-up, signals, the admin listener and counters.

#![deny(unsafe_op_in_unsafe_fn)]

pub mod apps;
pub mod config;
pub mod control;
pub mod proto;
pub mod reactor;
pub mod session;
pub mod tls;
