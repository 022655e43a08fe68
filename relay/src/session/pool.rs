//! Per-worker origin pool state: balancing and passive health.
//!
//! Each worker keeps its own view (shared nothing): a round-robin cursor, the number of
//! connections it has open to each origin (for least-connections), and until when an origin
//! that refused a connection is skipped. Workers learn of a dead origin independently, which
//! costs at most one refused connect per worker per `down_time`.

use std::net::IpAddr;

use crate::config::{Balance, Pool};

#[derive(Debug, Default)]
pub struct PoolState {
    rr: usize,
    src_rr: usize,
    active: Vec<u32>,
    down_until: Vec<u32>,
}

/// Origins already tried for one handshake, as a bit set (origins past 64 are never marked).
#[derive(Debug, Default, Clone, Copy, PartialEq, Eq)]
pub struct Tried(pub u64);

impl Tried {
    pub fn has(self, i: usize) -> bool {
        i < 64 && self.0 & (1 << i) != 0
    }
    pub fn add(&mut self, i: usize) {
        if i < 64 {
            self.0 |= 1 << i;
        }
    }
    pub fn count(self) -> u32 {
        self.0.count_ones()
    }
}

impl PoolState {
    pub fn new(pool: &Pool) -> PoolState {
        PoolState {
            rr: 0,
            src_rr: 0,
            active: vec![0; pool.origins.len()],
            down_until: vec![0; pool.origins.len()],
        }
    }

    fn usable(&self, i: usize, now: u32, tried: Tried) -> bool {
        !tried.has(i) && self.down_until[i] <= now
    }

    /// Picks the next origin to try, or `None` when every untried origin is down.
    pub fn pick(&mut self, pool: &Pool, now: u32, tried: Tried) -> Option<usize> {
        let n = pool.origins.len();
        let start = self.rr % n;
        self.rr = self.rr.wrapping_add(1);
        let order = (0..n).map(|k| (start + k) % n);
        match pool.balance {
            Balance::RoundRobin => order.into_iter().find(|&i| self.usable(i, now, tried)),
            Balance::LeastConnections => order
                .filter(|&i| self.usable(i, now, tried))
                .min_by_key(|&i| self.active[i]),
        }
    }

    /// The source address for the next origin connection, if the pool sets any.
    pub fn source(&mut self, pool: &Pool) -> Option<IpAddr> {
        if pool.source_addresses.is_empty() {
            return None;
        }
        let ip = pool.source_addresses[self.src_rr % pool.source_addresses.len()];
        self.src_rr = self.src_rr.wrapping_add(1);
        Some(ip)
    }

    pub fn mark_down(&mut self, i: usize, until: u32) {
        self.down_until[i] = until;
    }

    pub fn acquire(&mut self, i: usize) {
        self.active[i] += 1;
    }

    pub fn release(&mut self, i: usize) {
        self.active[i] = self.active[i].saturating_sub(1);
    }

    /// True when at least one origin is not marked down.
    pub fn any_up(&self, now: u32) -> bool {
        self.down_until.iter().any(|&d| d <= now)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::Duration;

    fn pool(n: usize, balance: Balance) -> Pool {
        Pool {
            name: "p".into(),
            origins: (0..n)
                .map(|i| format!("127.0.0.1:{}", 9000 + i).parse().unwrap())
                .collect(),
            balance,
            source_addresses: vec!["127.0.0.2".parse().unwrap(), "127.0.0.3".parse().unwrap()],
            down_time: Duration::from_secs(2),
            tls: None,
            host: None,
        }
    }

    #[test]
    fn round_robin_rotates_and_skips_down() {
        let p = pool(3, Balance::RoundRobin);
        let mut s = PoolState::new(&p);
        let picks: Vec<_> = (0..6)
            .map(|_| s.pick(&p, 0, Tried::default()).unwrap())
            .collect();
        assert_eq!(picks, vec![0, 1, 2, 0, 1, 2]);
        s.mark_down(1, 10);
        let picks: Vec<_> = (0..4)
            .map(|_| s.pick(&p, 5, Tried::default()).unwrap())
            .collect();
        assert!(!picks.contains(&1));
        // Back after its down time.
        let picks: Vec<_> = (0..3)
            .map(|_| s.pick(&p, 10, Tried::default()).unwrap())
            .collect();
        assert!(picks.contains(&1));
    }

    #[test]
    fn tried_origins_are_not_picked_again() {
        let p = pool(2, Balance::RoundRobin);
        let mut s = PoolState::new(&p);
        let mut t = Tried::default();
        let a = s.pick(&p, 0, t).unwrap();
        t.add(a);
        let b = s.pick(&p, 0, t).unwrap();
        assert_ne!(a, b);
        t.add(b);
        assert_eq!(s.pick(&p, 0, t), None);
    }

    #[test]
    fn least_connections_prefers_idle_origin() {
        let p = pool(3, Balance::LeastConnections);
        let mut s = PoolState::new(&p);
        s.acquire(0);
        s.acquire(0);
        s.acquire(2);
        assert_eq!(s.pick(&p, 0, Tried::default()), Some(1));
        s.acquire(1);
        s.acquire(1);
        assert_eq!(s.pick(&p, 0, Tried::default()), Some(2));
    }

    #[test]
    fn all_down_means_none() {
        let p = pool(2, Balance::RoundRobin);
        let mut s = PoolState::new(&p);
        s.mark_down(0, 10);
        s.mark_down(1, 10);
        assert_eq!(s.pick(&p, 3, Tried::default()), None);
        assert!(!s.any_up(3));
    }

    #[test]
    fn source_addresses_rotate() {
        let p = pool(1, Balance::RoundRobin);
        let mut s = PoolState::new(&p);
        let a = s.source(&p).unwrap();
        let b = s.source(&p).unwrap();
        assert_ne!(a, b);
        assert_eq!(s.source(&p).unwrap(), a);
    }
}
