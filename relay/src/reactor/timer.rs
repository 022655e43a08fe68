//! A hashed timer wheel for session deadlines (handshake, origin connect, idle, linger).
//!
//! Time is counted in ticks (the worker picks the tick length, 100 ms by default). Each entry
//! names a slot, its generation and the tick it was armed for. Entries are never removed
//! early: when a session's deadline moves, the session simply arms a new entry and remembers
//! its tick; an entry whose tick no longer matches the session's is ignored when it fires.
//! That keeps the hot path (moving bytes) free of timer work: an idle deadline is computed
//! from `last_active` only when its entry fires, and re-armed if the session was busy.
//!
//! Invariant: `advance(now)` yields every entry armed for a tick `<= now` exactly once.

/// One armed deadline.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TimerEntry {
    pub slot: u32,
    pub gen: u32,
    pub at: u32,
}

pub struct TimerWheel {
    buckets: Vec<Vec<TimerEntry>>,
    /// The next tick whose bucket has not been processed yet.
    cursor: u32,
    len: usize,
}

impl TimerWheel {
    /// `buckets` must be a power of two.
    pub fn new(buckets: usize, now: u32) -> TimerWheel {
        assert!(buckets.is_power_of_two());
        TimerWheel {
            buckets: (0..buckets).map(|_| Vec::new()).collect(),
            cursor: now,
            len: 0,
        }
    }

    pub fn len(&self) -> usize {
        self.len
    }

    pub fn is_empty(&self) -> bool {
        self.len == 0
    }

    fn mask(&self) -> u32 {
        self.buckets.len() as u32 - 1
    }

    /// Arms an entry for tick `at`; a tick in the past fires on the next `advance`.
    pub fn arm(&mut self, slot: u32, gen: u32, at: u32) {
        let at = at.max(self.cursor);
        let idx = (at & self.mask()) as usize;
        self.buckets[idx].push(TimerEntry { slot, gen, at });
        self.len += 1;
    }

    /// Moves the wheel to `now`, appending every entry due at or before `now` to `due`.
    /// Entries for a later lap of the wheel stay where they are.
    pub fn advance(&mut self, now: u32, due: &mut Vec<TimerEntry>) {
        // Never walk more than one lap: beyond that every bucket has been visited.
        let laps_end = self.cursor.wrapping_add(self.buckets.len() as u32);
        let end = if now.wrapping_sub(self.cursor) as usize >= self.buckets.len() {
            laps_end
        } else {
            now.wrapping_add(1)
        };
        let mut t = self.cursor;
        while t != end {
            let idx = (t & self.mask()) as usize;
            let bucket = &mut self.buckets[idx];
            let mut i = 0;
            while i < bucket.len() {
                if bucket[i].at <= now {
                    due.push(bucket.swap_remove(i));
                    self.len -= 1;
                } else {
                    i += 1;
                }
            }
            t = t.wrapping_add(1);
        }
        self.cursor = now.wrapping_add(1);
    }

    /// The earliest tick at or before `horizon` that an armed entry is due at, if any (an
    /// entry armed in the past counts as due at the cursor). Looks at most one lap ahead.
    pub fn next_due(&self, horizon: u32) -> Option<u32> {
        if self.len == 0 {
            return None;
        }
        let span = horizon.wrapping_sub(self.cursor) as usize;
        let steps = span.saturating_add(1).min(self.buckets.len());
        let mut t = self.cursor;
        for _ in 0..steps {
            let bucket = &self.buckets[(t & self.mask()) as usize];
            if bucket.iter().any(|e| e.at <= t) {
                return Some(t);
            }
            t = t.wrapping_add(1);
        }
        None
    }

    /// Ticks in one lap of the wheel (its bucket count).
    pub fn lap(&self) -> u32 {
        self.buckets.len() as u32
    }

    /// The tick of the wheel's cursor: the earliest tick an entry can still fire at.
    pub fn cursor(&self) -> u32 {
        self.cursor
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fire(w: &mut TimerWheel, now: u32) -> Vec<u32> {
        let mut due = Vec::new();
        w.advance(now, &mut due);
        let mut s: Vec<u32> = due.iter().map(|e| e.slot).collect();
        s.sort();
        s
    }

    #[test]
    fn fires_at_deadline_not_before() {
        let mut w = TimerWheel::new(8, 0);
        w.arm(1, 0, 3);
        w.arm(2, 0, 5);
        assert_eq!(fire(&mut w, 2), Vec::<u32>::new());
        assert_eq!(fire(&mut w, 3), vec![1]);
        assert_eq!(fire(&mut w, 4), Vec::<u32>::new());
        assert_eq!(fire(&mut w, 5), vec![2]);
        assert!(w.is_empty());
    }

    #[test]
    fn entries_beyond_one_lap_wait_for_their_lap() {
        let mut w = TimerWheel::new(4, 0);
        w.arm(1, 0, 9); // bucket 1, two laps ahead
        assert_eq!(fire(&mut w, 1), Vec::<u32>::new());
        assert_eq!(fire(&mut w, 5), Vec::<u32>::new());
        assert_eq!(fire(&mut w, 8), Vec::<u32>::new());
        assert_eq!(fire(&mut w, 9), vec![1]);
    }

    #[test]
    fn a_long_jump_fires_everything_due() {
        let mut w = TimerWheel::new(4, 0);
        for s in 0..10 {
            w.arm(s, 0, s);
        }
        assert_eq!(fire(&mut w, 100), (0..10).collect::<Vec<_>>());
        assert_eq!(w.len(), 0);
    }

    #[test]
    fn next_due_finds_the_earliest_entry_within_the_horizon() {
        let mut w = TimerWheel::new(8, 0);
        assert_eq!(w.next_due(100), None);
        w.arm(1, 0, 13); // bucket 5, one lap ahead
        w.arm(2, 0, 6);
        assert_eq!(w.next_due(5), None);
        assert_eq!(w.next_due(6), Some(6));
        assert_eq!(w.next_due(100), Some(6));
        let mut due = Vec::new();
        w.advance(6, &mut due);
        assert_eq!(w.next_due(12), None, "13 is beyond the horizon");
        assert_eq!(w.next_due(100), Some(13));
        w.advance(20, &mut due);
        assert_eq!(w.next_due(100), None);
        assert_eq!(due.len(), 2);
    }

    #[test]
    fn next_due_of_a_past_entry_is_the_cursor() {
        let mut w = TimerWheel::new(8, 10);
        w.arm(7, 3, 2);
        assert_eq!(w.next_due(50), Some(10));
    }

    #[test]
    fn past_deadline_fires_next_advance() {
        let mut w = TimerWheel::new(8, 10);
        w.arm(7, 3, 2);
        let mut due = Vec::new();
        w.advance(10, &mut due);
        assert_eq!(
            due,
            vec![TimerEntry {
                slot: 7,
                gen: 3,
                at: 10
            }]
        );
    }
}
