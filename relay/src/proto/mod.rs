//! Sans-IO protocol code: the HTTP/1.1 WebSocket upgrade (request validation and rewrite,
//! origin answer checking) and the error answers relay gives. Pure functions over byte
//! slices: no sockets, no clock. Everything here takes bytes a peer sent and must never
//! panic on them; the fuzz targets in `fuzz/` hold it to that.

pub mod http;
pub mod ws;

pub use http::{Reject, Status};
