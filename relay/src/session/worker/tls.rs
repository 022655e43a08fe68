//! The worker's TLS paths: sessions with TLS on the client side (a TLS listener), the origin
//! side (a TLS pool), or both.
//!
//! Such a session moves bytes through owned buffers instead of ring-buffer chunks: a receive
//! is decrypted (if its source speaks TLS) into the worker's scratch Vec, encrypted (if its
//! destination speaks TLS) or copied into the direction's `pend` buffer, and the ring buffer
//! goes straight back to the kernel. One send per direction carries whatever `pend` holds;
//! what arrives meanwhile collects behind it. `pend` is empty and unallocated while a
//! connection is idle, so an idle TLS connection costs its rustls state and nothing else.
//!
//! The life cycle is the plaintext one (see `session/mod.rs`); the differences:
//! - `ClientHead` runs the TLS handshake first (it counts against the handshake timeout;
//!   a timeout before the handshake completed closes without an answer, since there is no
//!   channel to answer on). A plaintext request on a TLS port gets a plaintext 400.
//! - `OriginHead` toward a TLS pool runs the origin handshake first; the request head goes
//!   out, encrypted, once it completes.
//! - An end of stream is passed on as close_notify, then shutdown(SHUT_WR).

use super::*;
use crate::session::SessionTls;
use crate::tls::{looks_like_http, TlsConn};

/// A TLS direction stops receiving once this many bytes wait to be sent (backpressure; the
/// plaintext path stops at four 16 KiB buffers, the same amount).
const TLS_HIGH_WATER: usize = 64 * 1024;

impl Worker {
    /// The session terminates TLS from its client.
    pub(super) fn client_tls(&self, slot: usize) -> bool {
        self.sessions[slot]
            .tls
            .as_ref()
            .is_some_and(|t| t.client.is_some())
    }

    /// The client's TLS handshake has not completed yet.
    pub(super) fn tls_handshaking(&self, slot: usize) -> bool {
        self.sessions[slot]
            .tls
            .as_ref()
            .and_then(|t| t.client.as_ref())
            .is_some_and(|c| !c.established())
    }

    /// The TLS settings of the pool a session's route goes to, if that pool speaks TLS.
    pub(super) fn pool_tls_of(&self, slot: usize) -> Option<&ClientTls> {
        let route = self.sessions[slot].route;
        if route == NO_ROUTE {
            return None;
        }
        match self.cfg.routes[route as usize].target {
            Target::Pool(p) => self.pool_tls.get(p).and_then(|t| t.as_ref()),
            Target::App(_) => None,
        }
    }

    /// Starts a send of what waits for `dir`'s destination, unless one is in flight.
    pub(super) fn tls_kick(&mut self, slot: usize, dir: Dir) {
        let ud = self.tok(dir.send_op(), slot);
        let s = &mut self.sessions[slot];
        let dst = s.dst(dir);
        if s.flow(dir).sending || dst < 0 {
            return;
        }
        let Some(t) = s.tls.as_mut() else {
            return;
        };
        let pend = t.pend(dir);
        if pend.is_empty() {
            return;
        }
        let bytes = std::mem::take(pend);
        s.flow_mut(dir).sending = true;
        s.inflight += 1;
        self.reactor.send_bytes(dst, bytes, 0, ud);
    }

    /// Queues close_notify toward `dir`'s destination if it speaks TLS and none went out yet.
    /// Returns true when there is now something to send first (the caller waits for it).
    pub(super) fn tls_flush_close(&mut self, slot: usize, dir: Dir) -> bool {
        let Some(t) = self.sessions[slot].tls.as_mut() else {
            return false;
        };
        let SessionTls {
            client,
            origin,
            pend,
        } = &mut **t;
        let conn = match dir {
            Dir::Up => origin.as_deref_mut(),
            Dir::Down => client.as_mut(),
        };
        if let Some(c) = conn {
            let _ = c.close(&mut pend[dir as usize]);
        }
        if pend[dir as usize].is_empty() {
            return false;
        }
        self.tls_kick(slot, dir);
        true
    }

    /// Bytes for the client: encrypted if the client speaks TLS.
    fn queue_for_client(&mut self, slot: usize, bytes: &[u8]) -> Result<(), crate::tls::Error> {
        let t = self.sessions[slot].tls.as_mut().expect("TLS session");
        match t.client.as_mut() {
            Some(c) => c.send(bytes, &mut t.pend[Dir::Down as usize]),
            None => {
                t.pend[Dir::Down as usize].extend_from_slice(bytes);
                Ok(())
            }
        }
    }

    /// Relay's own answer (an error status, a page) to a TLS client, then close_notify; the
    /// session is in `Responding` and lingers once everything is sent.
    pub(super) fn tls_answer(&mut self, slot: usize, bytes: &[u8]) {
        let r = self.queue_for_client(slot, bytes);
        let queued = r.is_ok() && self.tls_flush_close(slot, Dir::Down);
        if !queued && !self.sessions[slot].down.sending {
            self.begin_close(slot, CloseCause::Refused);
        }
    }

    /// Ends a client whose TLS failed: the alert rustls produced (if any), then close.
    fn tls_fail(&mut self, slot: usize, alert: Vec<u8>) {
        let ud = self.tok(Op::ClientSend, slot);
        let now = self.now;
        let s = &mut self.sessions[slot];
        // Nothing more will be encrypted; what follows is the plaintext refusal path.
        s.tls = None;
        if alert.is_empty() || s.down.sending {
            self.begin_close(slot, CloseCause::Refused);
            return;
        }
        s.phase = Phase::Responding;
        s.phase_since = now;
        s.down.sending = true;
        s.inflight += 1;
        self.reactor.send_bytes(s.client, alert, 0, ud);
        self.arm_timer(slot);
    }

    /// A receive from a TLS client during `ClientHead`: the handshake, then the request head.
    pub(super) fn tls_client_head(&mut self, slot: usize, n: usize, bid: u16) {
        let s = &mut self.sessions[slot];
        let t = s.tls.as_mut().expect("TLS session");
        let conn = t.client.as_mut().expect("client TLS");
        if !conn.established() && conn.carried() == 0 && looks_like_http(self.reactor.buf(bid, n)) {
            // Plain HTTP on a TLS port: answered in plain text (as nginx does), then closed.
            self.reactor.recycle(bid);
            self.counters.tls_fail_plain_http += 1;
            s.tls = None;
            self.respond(
                slot,
                Reject {
                    status: Status::BadRequest,
                    reason: "plain HTTP request sent to a TLS port",
                },
            );
            return;
        }
        let mut plain = std::mem::take(&mut self.scratch);
        plain.clear();
        let mut out = Vec::new();
        let r = conn.receive(self.reactor.buf_mut(bid, n), &mut plain, &mut out);
        self.reactor.recycle(bid);
        let p = match r {
            Ok(p) => p,
            Err(e) => {
                self.scratch = plain;
                self.counters.tls_fail_protocol += 1;
                tracing::debug!(worker = self.id, peer = %s.peer, "TLS handshake failed: {e}");
                self.tls_fail(slot, out);
                return;
            }
        };
        if p.established {
            if conn.resumed() {
                self.counters.tls_resumed += 1;
            } else {
                self.counters.tls_full += 1;
            }
        }
        let pend = t.pend(Dir::Down);
        if pend.is_empty() {
            *pend = out;
        } else {
            pend.extend_from_slice(&out);
        }
        self.tls_kick(slot, Dir::Down);
        let s = &mut self.sessions[slot];
        if plain.is_empty() {
            self.scratch = plain;
            if p.peer_closed {
                self.begin_close(slot, CloseCause::ClientClosed);
            } else {
                self.arm_recv_once(slot, Dir::Up);
            }
            return;
        }
        let fwd = Forwarding {
            peer: s.peer,
            proto: "https",
        };
        let max = self.cfg.limits.max_head_bytes as usize;
        let hs = s.hs.get_or_insert_with(Box::default);
        hs.buf.extend_from_slice(&plain);
        self.scratch = plain;
        let parsed = http::parse_upgrade(&hs.buf, max, fwd);
        let page = match &parsed {
            Err(r) if r.status == Status::UpgradeRequired => http::plain_get(&hs.buf),
            _ => None,
        };
        if matches!(parsed, Ok(None)) && p.peer_closed {
            self.begin_close(slot, CloseCause::ClientClosed);
            return;
        }
        self.head_parsed(slot, parsed, page);
    }

    /// The TCP connection to a TLS origin is up: send the ClientHello. The request head
    /// waits in `hs.origin_head` until the handshake completes.
    pub(super) fn tls_origin_start(&mut self, slot: usize) {
        let Some(cfg) = self.pool_tls_of(slot) else {
            unreachable!("called for TLS pools only")
        };
        let mut hello = Vec::new();
        let conn = TlsConn::client(cfg).and_then(|mut c| c.start(&mut hello).map(|()| c));
        let conn = match conn {
            Ok(c) => Box::new(c),
            Err(e) => return self.origin_tls_failed(slot, e),
        };
        let now = self.now;
        let s = &mut self.sessions[slot];
        let t = s.tls.get_or_insert_with(Box::default);
        t.origin = Some(conn);
        t.pend(Dir::Up).extend_from_slice(&hello);
        s.phase = Phase::OriginHead;
        s.phase_since = now;
        self.tls_kick(slot, Dir::Up);
        self.arm_recv_once(slot, Dir::Down);
        self.arm_timer(slot);
    }

    /// A receive from the origin during `OriginHead` on a TLS session (TLS on either side).
    pub(super) fn tls_origin_head(&mut self, slot: usize, res: i32, bid: Option<u16>) {
        if res <= 0 {
            // Closed, reset or out of buffers: the plaintext handling applies.
            self.origin_head(slot, res, bid);
            return;
        }
        let bid = bid.expect("a receive with data carries a buffer");
        let n = res as usize;
        let max = self.cfg.limits.max_head_bytes as usize;
        let s = &mut self.sessions[slot];
        let t = s.tls.as_mut().expect("TLS session");
        let hs = s.hs.as_mut().expect("handshake state");
        let data = self.reactor.buf_mut(bid, n);
        if let Some(conn) = t.origin.as_deref_mut() {
            let mut plain = std::mem::take(&mut self.scratch);
            plain.clear();
            let mut out = Vec::new();
            let r = conn.receive(data, &mut plain, &mut out);
            self.reactor.recycle(bid);
            match r {
                Err(e) => {
                    self.scratch = plain;
                    self.origin_tls_failed(slot, e);
                    return;
                }
                Ok(p) => {
                    t.pend[Dir::Up as usize].extend_from_slice(&out);
                    if p.established {
                        if let Some(head) = hs.origin_head.take() {
                            let _ = conn.send(&head, &mut t.pend[Dir::Up as usize]);
                        }
                    }
                    hs.buf.extend_from_slice(&plain);
                    self.scratch = plain;
                }
            }
            self.tls_kick(slot, Dir::Up);
        } else {
            hs.buf.extend_from_slice(data);
            self.reactor.recycle(bid);
        }
        let s = &mut self.sessions[slot];
        let hs = s.hs.as_mut().expect("handshake state");
        if hs.buf.is_empty() {
            self.arm_recv_once(slot, Dir::Down);
            return;
        }
        let head = match http::parse_answer(&hs.buf, max, &hs.accept) {
            Ok(Some(h)) => h,
            Ok(None) => {
                self.arm_recv_once(slot, Dir::Down);
                return;
            }
            Err(r) => {
                self.respond(slot, r);
                return;
            }
        };
        let total = hs.buf.len();
        let send_len = self.origin_answered(slot, &head, total);
        let hs = self.sessions[slot].hs.as_mut().expect("handshake state");
        let mut bytes = std::mem::take(&mut hs.buf);
        bytes.truncate(send_len);
        if self.queue_for_client(slot, &bytes).is_err() {
            self.abort(slot, CloseCause::ClientReset);
            return;
        }
        self.tls_kick(slot, Dir::Down);
        let s = &mut self.sessions[slot];
        if s.phase == Phase::Relay {
            s.hs = None;
            self.await_bytes(slot, Dir::Up);
            self.await_bytes(slot, Dir::Down);
        } else if !s.down.eof {
            self.arm_recv_multi(slot, Dir::Down);
        }
        self.arm_timer(slot);
    }

    /// The TLS handshake with the origin failed (or could not start): 502, counted, logged.
    fn origin_tls_failed(&mut self, slot: usize, e: crate::tls::Error) {
        self.counters.origin_tls_failures += 1;
        let origin = self.origin_addr(slot);
        tracing::warn!(worker = self.id, %origin, "TLS handshake with origin failed: {e}");
        self.respond(
            slot,
            Reject {
                status: Status::BadGateway,
                reason: "TLS handshake with the origin failed",
            },
        );
    }

    /// The address of the session's origin, for logs.
    fn origin_addr(&self, slot: usize) -> String {
        let s = &self.sessions[slot];
        match self.cfg.routes.get(s.route as usize).map(|r| r.target) {
            Some(Target::Pool(p)) if s.origin_idx != u16::MAX => {
                self.cfg.pools[p].origins[s.origin_idx as usize].to_string()
            }
            _ => String::new(),
        }
    }

    /// A receive on an upgraded (or passthrough) TLS session.
    pub(super) fn tls_flow_recv(
        &mut self,
        slot: usize,
        dir: Dir,
        res: i32,
        bid: Option<u16>,
        more: bool,
    ) {
        let now = self.now;
        if res > 0 {
            let bid = bid.expect("a receive with data carries a buffer");
            let n = res as usize;
            let mut plain = std::mem::take(&mut self.scratch);
            plain.clear();
            let s = &mut self.sessions[slot];
            let SessionTls {
                client,
                origin,
                pend,
            } = &mut **s.tls.as_mut().expect("TLS session");
            let (src, dst) = match dir {
                Dir::Up => (client.as_mut(), origin.as_deref_mut()),
                Dir::Down => (origin.as_deref_mut(), client.as_mut()),
            };
            let data = self.reactor.buf_mut(bid, n);
            let mut peer_closed = false;
            let mut failed = false;
            let mut enc_failed = false;
            let back = dir_back(dir);
            let mut out = Vec::new();
            // Plaintext the source sent (decrypted if it speaks TLS), then into the
            // direction's buffer (encrypted if the destination speaks TLS). Decrypting
            // straight into that buffer saves a copy when the destination is plaintext.
            let limit = match (s.phase, s.hs.as_ref()) {
                (Phase::Passthrough, Some(hs)) => hs.remaining,
                _ => None,
            };
            let got = match (src, dst) {
                (Some(src), None) => {
                    let buf = &mut pend[dir as usize];
                    let start = buf.len();
                    match src.receive(data, buf, &mut out) {
                        Ok(p) => peer_closed = p.peer_closed,
                        Err(_) => failed = true,
                    }
                    let got = (buf.len() - start) as u64;
                    let keep = limit.map_or(got, |l| got.min(l));
                    buf.truncate(start + keep as usize);
                    keep
                }
                (Some(src), Some(dst)) => {
                    match src.receive(data, &mut plain, &mut out) {
                        Ok(p) => peer_closed = p.peer_closed,
                        Err(_) => failed = true,
                    }
                    let keep = limit.map_or(plain.len(), |l| plain.len().min(l as usize));
                    enc_failed = dst.send(&plain[..keep], &mut pend[dir as usize]).is_err();
                    keep as u64
                }
                (None, Some(dst)) => {
                    let keep = limit.map_or(n, |l| n.min(l as usize));
                    enc_failed = dst.send(&data[..keep], &mut pend[dir as usize]).is_err();
                    keep as u64
                }
                (None, None) => unreachable!("a TLS session has TLS on one side at least"),
            };
            // Replies to the source (a key update, say) go the other way.
            pend[back as usize].extend_from_slice(&out);
            if let (Some(r), Some(hs)) = (limit, s.hs.as_mut()) {
                hs.remaining = Some(r - got);
                if r == got {
                    s.down.eof = true;
                }
            }
            if got > 0 {
                s.last_active = now;
            }
            let m = got;
            self.reactor.recycle(bid);
            self.scratch = plain;
            let s = &mut self.sessions[slot];
            count_bytes(&mut self.counters, &mut self.routes, s, dir, m);
            if failed || enc_failed {
                let cause = if failed {
                    dir.src_failed()
                } else {
                    dir.dst_failed()
                };
                self.abort(slot, cause);
                return;
            }
            self.tls_kick(slot, dir);
            self.tls_kick(slot, dir_back(dir));
            if peer_closed {
                self.tls_eof(slot, dir);
                return;
            }
            let waiting = self.sessions[slot]
                .tls
                .as_mut()
                .map_or(0, |t| t.pend(dir).len());
            let full = waiting >= TLS_HIGH_WATER;
            self.pace_recv(slot, dir, full, !full, more);
            let s = &self.sessions[slot];
            if s.phase == Phase::Passthrough && s.down.eof && s.down.quiet() && waiting == 0 {
                self.finish_passthrough(slot);
            }
        } else if res == 0 {
            self.tls_eof(slot, dir);
        } else {
            match -res {
                libc::ENOBUFS => {
                    if !more {
                        self.starve(slot, dir);
                    }
                }
                libc::ECANCELED => {
                    let waiting = self.sessions[slot]
                        .tls
                        .as_mut()
                        .map_or(0, |t| t.pend(dir).len());
                    if waiting < TLS_HIGH_WATER / 2 {
                        self.start_reading(slot, dir);
                    }
                }
                _ => {
                    let cause = dir.src_failed();
                    self.abort(slot, cause);
                }
            }
        }
    }

    /// A direction's source ended (FIN or close_notify): pass it on once everything is sent.
    fn tls_eof(&mut self, slot: usize, dir: Dir) {
        let s = &mut self.sessions[slot];
        if s.flow(dir).eof && s.phase != Phase::Passthrough {
            return;
        }
        if s.first_end.is_none() {
            s.first_end = Some(dir);
        }
        s.flow_mut(dir).eof = true;
        if s.phase == Phase::Passthrough {
            let waiting = s.tls.as_mut().map_or(0, |t| t.pend(Dir::Down).len());
            if s.down.quiet() && waiting == 0 {
                self.finish_passthrough(slot);
            }
            return;
        }
        if self.sessions[slot].flow(dir).quiet() && self.tls_flush_close(slot, dir) {
            // close_notify is on its way; the send completion passes the end on.
            return;
        }
        self.pass_eof(slot, dir);
    }

    /// A send on a TLS session completed.
    pub(super) fn tls_sent(&mut self, slot: usize, dir: Dir, c: Completion) {
        let phase = self.sessions[slot].phase;
        if phase == Phase::Closing {
            return;
        }
        if c.result < 0 {
            match phase {
                Phase::Responding | Phase::Lingering => self.begin_close(slot, CloseCause::Refused),
                Phase::App | Phase::AppClosing => self.abort(slot, CloseCause::ClientReset),
                _ => self.abort(slot, dir.dst_failed()),
            }
            return;
        }
        let n = c.result as usize;
        if let Some(mut bytes) = c.bytes {
            if n < bytes.len() {
                // Short write: the rest first.
                bytes.drain(..n);
                let ud = self.tok(dir.send_op(), slot);
                let s = &mut self.sessions[slot];
                s.flow_mut(dir).sending = true;
                s.inflight += 1;
                self.reactor.send_bytes(s.dst(dir), bytes, 0, ud);
                return;
            }
        }
        let s = &mut self.sessions[slot];
        let waiting = s.tls.as_mut().map_or(0, |t| t.pend(dir).len());
        if waiting > 0 {
            self.tls_kick(slot, dir);
            return;
        }
        match phase {
            Phase::Responding if dir == Dir::Down => self.start_lingering(slot),
            Phase::App | Phase::AppClosing => self.tls_app_kick(slot),
            Phase::Relay | Phase::Passthrough => {
                let f = s.flow(dir);
                if f.eof {
                    if phase == Phase::Passthrough {
                        if dir == Dir::Down {
                            self.finish_passthrough(slot);
                        }
                        return;
                    }
                    if !self.tls_flush_close(slot, dir) {
                        self.pass_eof(slot, dir);
                    }
                    return;
                }
                let reading = phase == Phase::Relay || dir == Dir::Down;
                if reading {
                    self.start_reading(slot, dir);
                }
            }
            _ => {}
        }
    }

    /// Sends the frames an app queued for a TLS client, encrypted, a batch per send.
    pub(super) fn tls_app_kick(&mut self, slot: usize) {
        let s = &mut self.sessions[slot];
        if s.down.sending || s.phase == Phase::Closing {
            return;
        }
        let (Some(a), Some(t)) = (s.app.as_mut(), s.tls.as_mut()) else {
            return;
        };
        let conn = t.client.as_mut().expect("client TLS");
        let pend = &mut t.pend[Dir::Down as usize];
        let mut frames = 0;
        let mut bytes = 0u64;
        let mut failed = false;
        while pend.len() < TLS_HIGH_WATER {
            let Some(f) = a.out.pop_front() else {
                break;
            };
            let (b, frame): (&[u8], u64) = match &f {
                Frame::Head(v) => (v, 0),
                Frame::Owned(v) => (v, 1),
                Frame::Shared(b) => (b, 1),
            };
            if conn.send(b, pend).is_err() {
                failed = true;
                break;
            }
            frames += frame;
            bytes += b.len() as u64;
        }
        let closing_done = s.phase == Phase::AppClosing && a.close_sent && a.out.is_empty();
        self.counters.app_frames_out += frames;
        count_bytes(&mut self.counters, &mut self.routes, s, Dir::Down, bytes);
        if failed {
            self.abort(slot, CloseCause::ClientReset);
            return;
        }
        let waiting = !self.sessions[slot]
            .tls
            .as_mut()
            .is_some_and(|t| t.pend(Dir::Down).is_empty());
        if waiting {
            self.tls_kick(slot, Dir::Down);
        } else if closing_done && !self.tls_flush_close(slot, Dir::Down) {
            // Everything, the close frame and close_notify last, is out: let the client close.
            sys::shutdown_write(self.sessions[slot].client);
        }
    }

    /// A receive from a TLS edge-app client.
    pub(super) fn tls_app_recv(&mut self, slot: usize, n: usize, bid: u16, more: bool) {
        let mut plain = std::mem::take(&mut self.scratch);
        plain.clear();
        let s = &mut self.sessions[slot];
        s.last_active = self.now;
        let t = s.tls.as_mut().expect("TLS session");
        let conn = t.client.as_mut().expect("client TLS");
        let mut out = Vec::new();
        let r = conn.receive(self.reactor.buf_mut(bid, n), &mut plain, &mut out);
        self.reactor.recycle(bid);
        t.pend(Dir::Down).extend_from_slice(&out);
        let p = match r {
            Ok(p) => p,
            Err(e) => {
                self.scratch = plain;
                tracing::debug!(worker = self.id, "TLS record error from app client: {e}");
                self.abort(slot, CloseCause::ClientReset);
                return;
            }
        };
        count_bytes(
            &mut self.counters,
            &mut self.routes,
            s,
            Dir::Up,
            plain.len() as u64,
        );
        let decoded = match s.app.as_mut() {
            Some(app) if !plain.is_empty() => decode_app(app, &plain),
            _ => (Vec::new(), Ok(())),
        };
        self.scratch = plain;
        self.app_input(slot, decoded);
        self.app_kick(slot);
        if p.peer_closed {
            self.begin_close(slot, CloseCause::ClientClosed);
            return;
        }
        let rearm = self
            .sessions
            .get(slot)
            .is_some_and(|s| s.up.recv == RecvState::Idle && s.phase != Phase::Closing);
        if !more && rearm {
            self.arm_recv_multi(slot, Dir::Up);
        }
    }
}

fn dir_back(d: Dir) -> Dir {
    match d {
        Dir::Up => Dir::Down,
        Dir::Down => Dir::Up,
    }
}
