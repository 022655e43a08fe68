//! Operation tokens: what an io_uring `user_data` means.
//!
//! A token packs `(op, generation, slot)` into the 64-bit `user_data` of a submission so that
//! a completion names both the operation that finished and the exact owner that asked for it.
//! Slots are reused after a session ends; the generation is bumped on every reuse, so a late
//! completion for an old owner carries a generation that no longer matches and is dropped
//! (its provided buffer, if any, still goes back to the ring).
//!
//! Layout: bits 56..64 op, bits 32..56 generation (24 bits, wraps), bits 0..32 slot.

/// What a submitted operation was for.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
#[repr(u8)]
pub enum Op {
    /// Multishot accept on a listener; `slot` is the listener index.
    Accept = 1,
    /// Receive from the client socket.
    ClientRecv = 2,
    /// Receive from the origin socket.
    OriginRecv = 3,
    /// Send to the client socket.
    ClientSend = 4,
    /// Send to the origin socket.
    OriginSend = 5,
    /// Connect the origin socket.
    Connect = 6,
    /// An `ASYNC_CANCEL` issued for a session; counted so the slot is freed only after it.
    Cancel = 7,
    /// A splice of the client→origin direction (socket → pipe, or pipe → socket).
    SpliceUp = 8,
    /// A splice of the origin→client direction.
    SpliceDown = 9,
    /// A readiness poll for the client→origin direction (source readable or
    /// destination writable, as the flow's splice stage says).
    PollUp = 10,
    /// A readiness poll for the origin→client direction.
    PollDown = 11,
    /// Internal ring traffic with no owner (wake-ups).
    Wake = 12,
}

impl Op {
    fn from_u8(v: u8) -> Option<Op> {
        Some(match v {
            1 => Op::Accept,
            2 => Op::ClientRecv,
            3 => Op::OriginRecv,
            4 => Op::ClientSend,
            5 => Op::OriginSend,
            6 => Op::Connect,
            7 => Op::Cancel,
            8 => Op::SpliceUp,
            9 => Op::SpliceDown,
            10 => Op::PollUp,
            11 => Op::PollDown,
            12 => Op::Wake,
            _ => return None,
        })
    }
}

/// Generation counters are 24 bits wide in a token.
pub const GEN_MASK: u32 = 0x00ff_ffff;

/// A decoded `user_data`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Token {
    pub op: Op,
    pub gen: u32,
    pub slot: u32,
}

impl Token {
    pub fn new(op: Op, slot: u32, gen: u32) -> Token {
        Token {
            op,
            gen: gen & GEN_MASK,
            slot,
        }
    }

    pub fn encode(self) -> u64 {
        ((self.op as u64) << 56) | (((self.gen & GEN_MASK) as u64) << 32) | self.slot as u64
    }

    /// Decodes a `user_data`; `None` for values this process never submitted.
    pub fn decode(v: u64) -> Option<Token> {
        let op = Op::from_u8((v >> 56) as u8)?;
        Some(Token {
            op,
            gen: ((v >> 32) as u32) & GEN_MASK,
            slot: v as u32,
        })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn round_trip() {
        for op in [
            Op::Accept,
            Op::ClientRecv,
            Op::OriginSend,
            Op::Cancel,
            Op::Wake,
        ] {
            for (slot, gen) in [(0, 0), (1, 7), (u32::MAX, GEN_MASK), (12345, 0x1234_5678)] {
                let t = Token::new(op, slot, gen);
                let d = Token::decode(t.encode()).unwrap();
                assert_eq!(d, t);
                assert_eq!(d.gen, gen & GEN_MASK);
            }
        }
    }

    #[test]
    fn unknown_op_is_rejected() {
        assert_eq!(Token::decode(0), None);
        assert_eq!(Token::decode(0xff00_0000_0000_0000), None);
    }

    #[test]
    fn generation_distinguishes_reused_slot() {
        let old = Token::new(Op::ClientRecv, 5, 1).encode();
        let new = Token::new(Op::ClientRecv, 5, 2).encode();
        assert_ne!(old, new);
    }
}
