//! TLS for client and origin connections: rustls's unbuffered API driven from ring buffers.
//!
//! [`TlsConn`] is sans-IO. The worker hands it the ciphertext a receive brought and gets the
//! plaintext back in a Vec it passes in; everything rustls wants sent (handshake flights,
//! alerts, tickets, encrypted records) is appended to another Vec the worker sends. rustls's
//! unbuffered connection keeps no buffers of its own, so an idle TLS connection costs the
//! connection state (keys, the record layer) and nothing else: ciphertext that ends inside a
//! record is the only thing carried between receives, and that Vec is freed once it is used.
//!
//! Certificates (loading, SNI selection, reload) live in [`certs`]; the rustls configurations
//! built from `[listener.tls]` and a pool's `tls` settings in [`setup`].

pub mod certs;
pub mod setup;

use rustls::client::{ClientConnectionData, UnbufferedClientConnection};
use rustls::server::{ServerConnectionData, UnbufferedServerConnection};
use rustls::unbuffered::{
    ConnectionState, EncodeError, EncryptError, UnbufferedConnectionCommon, UnbufferedStatus,
};
use rustls::HandshakeKind;

pub use setup::{ClientTls, ServerTls};

/// rustls error, or the end of what the connection can do.
pub type Error = rustls::Error;

/// Bytes a TLS record adds to its payload at most (5 header, 8 explicit nonce in TLS 1.2
/// GCM, 16 tag, 1 inner content type in TLS 1.3, and room for padding-free slack).
const RECORD_OVERHEAD: usize = 32;
/// Largest plaintext per record.
const MAX_FRAGMENT: usize = 16384;

/// What a call to [`TlsConn::receive`] changed.
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Progress {
    /// The handshake finished during this call.
    pub established: bool,
    /// The peer sent close_notify: no more plaintext will come.
    pub peer_closed: bool,
}

/// Which end of the handshake this is.
enum Conn {
    Server(UnbufferedServerConnection),
    Client(UnbufferedClientConnection),
}

/// One TLS connection (server side toward a client, or client side toward an origin).
pub struct TlsConn {
    conn: Conn,
    /// Ciphertext received but not processed yet: a record cut by the end of a receive (or a
    /// handshake message rustls keeps in place until it is whole). Empty, and unallocated,
    /// between records.
    carry: Vec<u8>,
    established: bool,
    peer_closed: bool,
    close_sent: bool,
    /// rustls reported an error: the connection is finished and every call now fails (its
    /// state may point into input this driver has dropped).
    failed: bool,
}

/// Unprocessed ciphertext a connection may hold. An established connection needs at most
/// one record (16 KiB + overhead); a handshake message split into tiny records can need
/// more, up to this.
const MAX_CARRY: usize = 128 * 1024;

impl std::fmt::Debug for TlsConn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TlsConn")
            .field("server", &matches!(self.conn, Conn::Server(_)))
            .field("carry", &self.carry.len())
            .field("established", &self.established)
            .finish()
    }
}

/// The two connection types share one driver; rustls gives each its own
/// `process_tls_records`.
trait Side: Sized {
    fn process<'c, 'i>(
        c: &'c mut UnbufferedConnectionCommon<Self>,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self>;
}

impl Side for ServerConnectionData {
    fn process<'c, 'i>(
        c: &'c mut UnbufferedConnectionCommon<Self>,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self> {
        c.process_tls_records(incoming)
    }
}

impl Side for ClientConnectionData {
    fn process<'c, 'i>(
        c: &'c mut UnbufferedConnectionCommon<Self>,
        incoming: &'i mut [u8],
    ) -> UnbufferedStatus<'c, 'i, Self> {
        c.process_tls_records(incoming)
    }
}

/// Appends at most `need` bytes written by `write` to `out` (which gets `need` bytes of room;
/// on "too small" it retries once with the size the callee asked for).
fn append<E>(
    out: &mut Vec<u8>,
    need: usize,
    mut write: impl FnMut(&mut [u8]) -> Result<usize, E>,
    required: impl Fn(&E) -> Option<usize>,
) -> Result<(), E> {
    let start = out.len();
    out.resize(start + need, 0);
    let r = match write(&mut out[start..]) {
        Err(e) => match required(&e) {
            Some(size) => {
                out.resize(start + size, 0);
                write(&mut out[start..])
            }
            None => Err(e),
        },
        ok => ok,
    };
    match r {
        Ok(n) => {
            out.truncate(start + n);
            Ok(())
        }
        Err(e) => {
            out.truncate(start);
            Err(e)
        }
    }
}

fn encode_need(e: &EncodeError) -> Option<usize> {
    match e {
        EncodeError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

fn encrypt_need(e: &EncryptError) -> Option<usize> {
    match e {
        EncryptError::InsufficientSize(s) => Some(s.required_size),
        _ => None,
    }
}

fn encrypt_err(e: EncryptError) -> Error {
    match e {
        EncryptError::EncryptExhausted => Error::EncryptError,
        other => Error::General(other.to_string()),
    }
}

/// What the driver does once rustls has nothing more to say.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Goal {
    /// Process the incoming bytes; stop when more are needed.
    Read,
    /// Encrypt this application data.
    Write,
    /// Send close_notify.
    Close,
}

/// After an error: takes the alert rustls queued, if any, in one call. rustls hands out
/// queued records before it looks at its input again, and looking again would parse the
/// offending record a second time (a second fatal alert trips a debug assertion in rustls),
/// so this never loops back into the state machine.
fn take_alert<D: Side>(
    conn: &mut UnbufferedConnectionCommon<D>,
    rest: &mut [u8],
    out: &mut Vec<u8>,
) {
    let UnbufferedStatus { state, .. } = D::process(conn, rest);
    if let Ok(ConnectionState::EncodeTlsData(mut e)) = state {
        let _ = append(out, 64, |b| e.encode(b), encode_need);
    }
}

/// Runs rustls's state machine over `incoming` until it needs more input (Read) or has done
/// the write. Returns how many bytes of `incoming` were consumed.
fn drive<D: Side>(
    conn: &mut UnbufferedConnectionCommon<D>,
    incoming: &mut [u8],
    goal: Goal,
    data: &[u8],
    plain: &mut Vec<u8>,
    out: &mut Vec<u8>,
    progress: &mut Progress,
) -> Result<usize, (usize, Error)> {
    let mut off = 0;
    // Each turn either consumes input, emits output or changes state; the bound only guards
    // against a state machine that stops making progress.
    for _ in 0..4096 {
        let UnbufferedStatus { mut discard, state } = D::process(conn, &mut incoming[off..]);
        let state = match state {
            Ok(s) => s,
            Err(e) => return Err((off + discard, e)),
        };
        match state {
            ConnectionState::ReadTraffic(mut r) => {
                while let Some(rec) = r.next_record() {
                    let rec = rec.map_err(|e| (off, e))?;
                    discard += rec.discard;
                    plain.extend_from_slice(rec.payload);
                }
            }
            ConnectionState::EncodeTlsData(mut e) => {
                append(out, 2048, |b| e.encode(b), encode_need)
                    .map_err(|e| (off, Error::General(e.to_string())))?;
            }
            ConnectionState::TransmitTlsData(t) => {
                // The bytes are in `out`, which the caller sends in order.
                t.done();
            }
            ConnectionState::PeerClosed => progress.peer_closed = true,
            ConnectionState::Closed => {
                progress.peer_closed = true;
                return Ok(off + discard);
            }
            ConnectionState::BlockedHandshake => {
                if goal != Goal::Read {
                    return Err((off + discard, Error::HandshakeNotComplete));
                }
                return Ok(off + discard);
            }
            ConnectionState::WriteTraffic(mut w) => {
                match goal {
                    Goal::Read => {}
                    Goal::Write => {
                        let records = data.len().div_ceil(MAX_FRAGMENT).max(1);
                        let need = data.len() + records * RECORD_OVERHEAD;
                        append(out, need, |b| w.encrypt(data, b), encrypt_need)
                            .map_err(|e| (off, encrypt_err(e)))?;
                    }
                    Goal::Close => {
                        append(out, 64, |b| w.queue_close_notify(b), encrypt_need)
                            .map_err(|e| (off, encrypt_err(e)))?;
                    }
                }
                return Ok(off + discard);
            }
            _ => return Err((off + discard, Error::General("unexpected TLS state".into()))),
        }
        off += discard;
    }
    Err((
        off,
        Error::General("TLS state machine made no progress".into()),
    ))
}

impl TlsConn {
    /// A server-side connection for a client that just connected.
    pub fn server(cfg: &ServerTls) -> Result<TlsConn, Error> {
        Ok(TlsConn::new(Conn::Server(UnbufferedServerConnection::new(
            cfg.config.clone(),
        )?)))
    }

    /// A client-side connection toward an origin. Call [`TlsConn::start`] to get the
    /// ClientHello.
    pub fn client(cfg: &ClientTls) -> Result<TlsConn, Error> {
        let conn = UnbufferedClientConnection::new(cfg.config.clone(), cfg.server_name.clone())?;
        Ok(TlsConn::new(Conn::Client(conn)))
    }

    fn new(conn: Conn) -> TlsConn {
        TlsConn {
            conn,
            carry: Vec::new(),
            established: false,
            peer_closed: false,
            close_sent: false,
            failed: false,
        }
    }

    fn run(
        &mut self,
        incoming: &mut [u8],
        goal: Goal,
        data: &[u8],
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
        progress: &mut Progress,
    ) -> Result<usize, (usize, Error)> {
        match &mut self.conn {
            Conn::Server(c) => drive(c, incoming, goal, data, plain, out, progress),
            Conn::Client(c) => drive(c, incoming, goal, data, plain, out, progress),
        }
    }

    /// Client side: appends the ClientHello to `out`.
    pub fn start(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        let mut plain = Vec::new();
        let mut p = Progress::default();
        self.run(&mut [], Goal::Read, &[], &mut plain, out, &mut p)
            .map(|_| ())
            .map_err(|(_, e)| e)
    }

    /// Processes ciphertext from the peer. Decrypted application data is appended to `plain`,
    /// bytes to send to the peer (handshake messages, alerts, session tickets) to `out`.
    /// `data` may be modified (it is the receive's own buffer). On error `out` holds the alert
    /// to send before closing, when rustls produced one.
    pub fn receive(
        &mut self,
        data: &mut [u8],
        plain: &mut Vec<u8>,
        out: &mut Vec<u8>,
    ) -> Result<Progress, Error> {
        let mut progress = Progress::default();
        if self.failed {
            return Err(Error::General("TLS connection already failed".into()));
        }
        if self.peer_closed {
            // Nothing the peer sends after close_notify is read; dropping it keeps a peer
            // that goes on sending from growing the carry.
            return Ok(progress);
        }
        let mut carry = std::mem::take(&mut self.carry);
        let result = if carry.is_empty() {
            // The common case: whole records in the buffer the receive filled.
            let r = self.run(data, Goal::Read, &[], plain, out, &mut progress);
            let used = match r {
                Ok(n) | Err((n, _)) => n,
            };
            if used < data.len() {
                carry.extend_from_slice(&data[used..]);
            }
            r
        } else {
            carry.extend_from_slice(data);
            let r = self.run(&mut carry, Goal::Read, &[], plain, out, &mut progress);
            let used = match r {
                Ok(n) | Err((n, _)) => n,
            };
            carry.drain(..used);
            r
        };
        if let Err((_, e)) = result {
            // rustls may have queued an alert; it must see the input it has not consumed
            // (its handshake reassembly points into it).
            match &mut self.conn {
                Conn::Server(c) => take_alert(c, &mut carry, out),
                Conn::Client(c) => take_alert(c, &mut carry, out),
            }
            self.failed = true;
            return Err(e);
        }
        if progress.peer_closed {
            // Whatever followed close_notify is never read.
            carry = Vec::new();
        } else if carry.len() > MAX_CARRY {
            self.failed = true;
            return Err(Error::General(format!(
                "more than {MAX_CARRY} bytes of TLS input without a complete record"
            )));
        }
        if !carry.is_empty() {
            self.carry = carry;
        }
        if !self.established && !self.is_handshaking() {
            self.established = true;
            progress.established = true;
        }
        if progress.peer_closed {
            self.peer_closed = true;
        }
        Ok(progress)
    }

    /// Encrypts application data for the peer, appending the records to `out`.
    pub fn send(&mut self, data: &[u8], out: &mut Vec<u8>) -> Result<(), Error> {
        if data.is_empty() {
            return Ok(());
        }
        if self.failed {
            return Err(Error::General("TLS connection already failed".into()));
        }
        let mut carry = std::mem::take(&mut self.carry);
        let mut plain = Vec::new();
        let mut p = Progress::default();
        let r = self.run(&mut carry, Goal::Write, data, &mut plain, out, &mut p);
        self.restore_carry(carry, &r);
        r.map(|_| ()).map_err(|(_, e)| e)
    }

    /// Appends close_notify to `out` (once).
    pub fn close(&mut self, out: &mut Vec<u8>) -> Result<(), Error> {
        if self.close_sent || !self.established || self.failed {
            return Ok(());
        }
        self.close_sent = true;
        let mut carry = std::mem::take(&mut self.carry);
        let mut plain = Vec::new();
        let mut p = Progress::default();
        let r = self.run(&mut carry, Goal::Close, &[], &mut plain, out, &mut p);
        self.restore_carry(carry, &r);
        r.map(|_| ()).map_err(|(_, e)| e)
    }

    fn restore_carry(&mut self, mut carry: Vec<u8>, r: &Result<usize, (usize, Error)>) {
        let used = match r {
            Ok(n) => *n,
            Err((n, _)) => {
                self.failed = true;
                *n
            }
        };
        carry.drain(..used.min(carry.len()));
        if !carry.is_empty() {
            self.carry = carry;
        }
    }

    pub fn is_handshaking(&self) -> bool {
        match &self.conn {
            Conn::Server(c) => c.is_handshaking(),
            Conn::Client(c) => c.is_handshaking(),
        }
    }

    pub fn established(&self) -> bool {
        self.established
    }

    pub fn peer_closed(&self) -> bool {
        self.peer_closed
    }

    /// Whether the handshake was a resumption (once established).
    pub fn resumed(&self) -> bool {
        let kind = match &self.conn {
            Conn::Server(c) => c.handshake_kind(),
            Conn::Client(c) => c.handshake_kind(),
        };
        kind == Some(HandshakeKind::Resumed)
    }

    /// Bytes of ciphertext carried over to the next receive.
    pub fn carried(&self) -> usize {
        self.carry.len()
    }
}

/// Whether the first bytes a client sent look like a plaintext HTTP request rather than a
/// TLS record (which starts with content type 22, handshake).
pub fn looks_like_http(first: &[u8]) -> bool {
    first.first().is_some_and(|b| b.is_ascii_uppercase())
}

#[cfg(test)]
mod tests;
