//! Origin-less edge apps: WebSocket endpoints relay serves itself.
//!
//! A route with `app = "echo"` or `app = "rooms"` sends its upgrades here instead of to an
//! origin pool. The worker that owns the connection answers the handshake, decodes frames
//! with the sans-IO codec (`proto::ws`), and hands whole messages to the route's app through
//! the [`EdgeApp`] trait. An app answers with messages for the sender and/or for the
//! sender's room; the worker frames them and sends them.
//!
//! Rooms span workers: each worker keeps the members it owns ([`RoomTable`]); a message is
//! framed once into an `Arc<[u8]>` and that one buffer is sent to every local member and
//! handed to every other worker through the [`RoomHub`] (a channel per worker plus an
//! eventfd that wakes its ring). The publish API on the admin listener uses the same hub.

use std::collections::HashMap;
use std::os::fd::RawFd;
use std::sync::{Arc, Mutex};

use crate::proto::ws::DataKind;
use crate::reactor::sys;

/// The demo page a `demo` route serves: join a room and chat.
pub const DEMO_PAGE: &str = include_str!("demo.html");

/// What an app may do in answer to a message.
#[derive(Default)]
pub struct Replies {
    /// Messages for the sender.
    pub to_sender: Vec<(DataKind, Vec<u8>)>,
    /// Messages for every other member of the sender's room.
    pub to_room: Vec<(DataKind, Vec<u8>)>,
}

/// An edge app. Runs on the worker that owns the connection; sees whole messages.
pub trait EdgeApp {
    /// A whole message arrived from the client.
    fn on_message(&self, kind: DataKind, payload: Vec<u8>, out: &mut Replies);
    /// The connection is ending (after a close frame, an error or a drain).
    fn on_close(&self) {}
}

/// Sends every message back.
pub struct Echo;

impl EdgeApp for Echo {
    fn on_message(&self, kind: DataKind, payload: Vec<u8>, out: &mut Replies) {
        out.to_sender.push((kind, payload));
    }
}

/// Pub/sub: every message reaches every other member of the room.
pub struct Rooms;

impl EdgeApp for Rooms {
    fn on_message(&self, kind: DataKind, payload: Vec<u8>, out: &mut Replies) {
        out.to_room.push((kind, payload));
    }
}

/// A frame on its way to the members of a room on another worker.
#[derive(Debug, Clone)]
pub struct RoomMsg {
    pub room: Arc<str>,
    pub frame: Arc<[u8]>,
    /// A join/leave event: only for members that asked for events.
    pub events_only: bool,
}

/// The cross-worker side of rooms: one inbox and one wake-up eventfd per worker, and each
/// worker's published member counts (for `GET /v1/rooms` and the publish API's answer).
pub struct RoomHub {
    inboxes: Vec<crossbeam_channel::Sender<RoomMsg>>,
    wakers: Vec<RawFd>,
    pub counts: Vec<Mutex<HashMap<Arc<str>, u32>>>,
}

impl RoomHub {
    /// Creates the hub for `workers` workers; returns it with each worker's inbox receiver.
    pub fn new(
        workers: usize,
    ) -> std::io::Result<(Arc<RoomHub>, Vec<crossbeam_channel::Receiver<RoomMsg>>)> {
        let mut inboxes = Vec::new();
        let mut rx = Vec::new();
        let mut wakers = Vec::new();
        for _ in 0..workers {
            let (t, r) = crossbeam_channel::unbounded();
            inboxes.push(t);
            rx.push(r);
            wakers.push(sys::eventfd()?);
        }
        let counts = (0..workers).map(|_| Mutex::new(HashMap::new())).collect();
        Ok((
            Arc::new(RoomHub {
                inboxes,
                wakers,
                counts,
            }),
            rx,
        ))
    }

    pub fn waker(&self, worker: usize) -> RawFd {
        self.wakers[worker]
    }

    /// Wakes every worker (the main thread raised a flag for them).
    pub fn wake_all(&self) {
        for &fd in &self.wakers {
            sys::eventfd_signal(fd);
        }
    }

    /// Hands a frame to every worker except `skip` and wakes them.
    pub fn broadcast(&self, msg: RoomMsg, skip: Option<usize>) {
        for (w, tx) in self.inboxes.iter().enumerate() {
            if Some(w) == skip {
                continue;
            }
            if tx.send(msg.clone()).is_ok() {
                sys::eventfd_signal(self.wakers[w]);
            }
        }
    }

    /// Members of `room` on every worker but `worker` (as last published).
    pub fn members_elsewhere(&self, room: &str, worker: usize) -> u32 {
        self.counts
            .iter()
            .enumerate()
            .filter(|(w, _)| *w != worker)
            .filter_map(|(_, c)| c.lock().ok().and_then(|c| c.get(room).copied()))
            .sum()
    }

    /// Members of each room over all workers (as last published, at most a tick old).
    pub fn members(&self) -> HashMap<Arc<str>, u32> {
        let mut t: HashMap<Arc<str>, u32> = HashMap::new();
        for c in &self.counts {
            if let Ok(c) = c.lock() {
                for (k, v) in c.iter() {
                    *t.entry(k.clone()).or_default() += v;
                }
            }
        }
        t.retain(|_, v| *v > 0);
        t
    }
}

impl Drop for RoomHub {
    fn drop(&mut self) {
        for &fd in &self.wakers {
            sys::close(fd);
        }
    }
}

/// A member of a room: a session slot and its generation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Member {
    pub slot: u32,
    pub gen: u32,
}

/// The members of each room that one worker owns.
#[derive(Default)]
pub struct RoomTable {
    rooms: HashMap<Arc<str>, Vec<Member>>,
    dirty: bool,
}

impl RoomTable {
    /// Adds a member; returns the room's shared name and the member's index in it.
    pub fn join(&mut self, room: &str, m: Member) -> (Arc<str>, usize) {
        self.dirty = true;
        if let Some(v) = self.rooms.get_mut(room) {
            v.push(m);
            let idx = v.len() - 1;
            let k = self.rooms.get_key_value(room).map(|(k, _)| k.clone());
            return (k.expect("room exists"), idx);
        }
        let k: Arc<str> = Arc::from(room);
        self.rooms.insert(k.clone(), vec![m]);
        (k, 0)
    }

    /// Removes the member at `idx`; returns the member that moved into `idx`, if any (its
    /// stored index must be updated).
    pub fn leave(&mut self, room: &str, idx: usize) -> Option<Member> {
        self.dirty = true;
        let v = self.rooms.get_mut(room)?;
        if idx >= v.len() {
            return None;
        }
        v.swap_remove(idx);
        let moved = v.get(idx).copied();
        if v.is_empty() {
            self.rooms.remove(room);
        }
        moved
    }

    pub fn members(&self, room: &str) -> &[Member] {
        self.rooms.get(room).map_or(&[], |v| v.as_slice())
    }

    /// Publishes member counts if they changed since the last call.
    pub fn publish(&mut self, into: &Mutex<HashMap<Arc<str>, u32>>) {
        if !self.dirty {
            return;
        }
        self.dirty = false;
        if let Ok(mut c) = into.lock() {
            c.clear();
            for (k, v) in &self.rooms {
                c.insert(k.clone(), v.len() as u32);
            }
        }
    }
}

/// Whether a request path asks for room events: `?events=1` (or `true`).
pub fn wants_events(path: &str) -> bool {
    path.split_once('?').is_some_and(|(_, q)| {
        q.split('&')
            .any(|kv| kv == "events=1" || kv == "events=true")
    })
}

/// The JSON text of a room event (the tiny documented protocol).
pub fn event_json(kind: &str, room: &str, members: u32) -> String {
    serde_json::json!({"type": kind, "room": room, "members": members}).to_string()
}

/// The room a path names under a route's prefix: `/rooms/lobby` under `/rooms/` is `lobby`.
/// Query strings are ignored; an empty name is the room `""`... which is refused by the
/// caller.
pub fn room_name<'a>(path: &'a str, prefix: &str) -> &'a str {
    let p = path.split('?').next().unwrap_or("");
    p.strip_prefix(prefix).unwrap_or("").trim_matches('/')
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn events_are_opt_in() {
        assert!(wants_events("/rooms/a?events=1"));
        assert!(wants_events("/rooms/a?x=2&events=true"));
        assert!(!wants_events("/rooms/a"));
        assert!(!wants_events("/rooms/a?events=0"));
        assert_eq!(
            event_json("join", "a", 3),
            r#"{"members":3,"room":"a","type":"join"}"#
        );
    }

    #[test]
    fn room_names() {
        assert_eq!(room_name("/rooms/lobby", "/rooms/"), "lobby");
        assert_eq!(room_name("/rooms/lobby?x=1", "/rooms/"), "lobby");
        assert_eq!(room_name("/rooms/", "/rooms/"), "");
        assert_eq!(room_name("/rooms/a/b/", "/rooms"), "a/b");
    }

    #[test]
    fn join_and_leave_keep_indices_right() {
        let mut t = RoomTable::default();
        let m = |s| Member { slot: s, gen: 1 };
        assert_eq!(t.join("r", m(1)).1, 0);
        assert_eq!(t.join("r", m(2)).1, 1);
        assert_eq!(t.join("r", m(3)).1, 2);
        // Removing index 0 moves the last member (3) there.
        assert_eq!(t.leave("r", 0), Some(m(3)));
        assert_eq!(t.members("r"), &[m(3), m(2)]);
        assert_eq!(t.leave("r", 1), None);
        assert_eq!(t.leave("r", 0), None);
        assert!(t.members("r").is_empty());
    }

    #[test]
    fn echo_and_rooms_answer_as_documented() {
        let mut r = Replies::default();
        Echo.on_message(DataKind::Text, b"hi".to_vec(), &mut r);
        Rooms.on_message(DataKind::Binary, b"all".to_vec(), &mut r);
        assert_eq!(r.to_sender, vec![(DataKind::Text, b"hi".to_vec())]);
        assert_eq!(r.to_room, vec![(DataKind::Binary, b"all".to_vec())]);
    }
}
