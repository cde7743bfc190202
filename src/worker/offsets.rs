//! At-least-once bookkeeping: which input offsets may be committed.
//!
//! Every event read is tracked with the number of outputs it produces
//! (prediction + signal, or one dead letter). An output's broker
//! acknowledgement acks one of them. A partition's committable offset is the
//! lowest offset still waiting for an acknowledgement (or one past the
//! highest offset read, when none waits): committing it never skips an event
//! whose outputs are not yet safe, whatever order acknowledgements come in.
//!
//! Partitions are known by *slot*: a number given to one assignment of a
//! topic partition (see [`Slots`]). A partition revoked and assigned again
//! gets a new slot, so a late acknowledgement from before the revocation can
//! never be mistaken for one of the new assignment's events.

use std::collections::{HashMap, VecDeque};

/// One assignment of a topic partition.
pub type Slot = u32;

/// Slots are packed with the offset into a producer's delivery opaque.
const SLOT_BITS: u32 = 20;
const OFFSET_BITS: u32 = 64 - SLOT_BITS;

/// Packs a slot and an offset into one `usize` (offsets below 2^44).
pub fn pack(slot: Slot, offset: i64) -> usize {
    debug_assert!((0..(1i64 << OFFSET_BITS)).contains(&offset));
    (((slot as u64) << OFFSET_BITS) | (offset as u64 & ((1u64 << OFFSET_BITS) - 1))) as usize
}

/// Inverse of [`pack`].
pub fn unpack(v: usize) -> (Slot, i64) {
    let v = v as u64;
    (
        (v >> OFFSET_BITS) as Slot,
        (v & ((1u64 << OFFSET_BITS) - 1)) as i64,
    )
}

#[derive(Debug)]
struct Partition {
    /// `(offset, outputs still unacknowledged)` of the events waiting,
    /// by increasing offset; the front's count is never 0. Only events are
    /// stored, not the offsets between them, so gaps (compaction,
    /// transaction markers) cost nothing.
    waiting: VecDeque<(i64, u32)>,
    /// one past the highest offset tracked (or the first offset to expect)
    next: i64,
    /// last offset handed out for commit
    committed: Option<i64>,
    /// events with outputs outstanding
    pending: usize,
    /// assigned now: only active partitions are committed
    active: bool,
}

impl Partition {
    fn new(active: bool) -> Partition {
        Partition {
            waiting: VecDeque::new(),
            next: 0,
            committed: None,
            pending: 0,
            active,
        }
    }

    fn committable(&self) -> Option<i64> {
        match self.waiting.front() {
            Some(&(offset, _)) => Some(offset),
            None => (self.next > 0 || self.committed.is_some()).then_some(self.next),
        }
    }

    /// Where `offset` is in `waiting` (found) or would go (not found).
    fn find(&self, offset: i64) -> Result<usize, usize> {
        // acknowledgements come mostly in order and offsets mostly without
        // gaps: try the dense position first
        if let Some(&(front, _)) = self.waiting.front() {
            if let Ok(i) = usize::try_from(offset - front) {
                if self.waiting.get(i).is_some_and(|e| e.0 == offset) {
                    return Ok(i);
                }
            }
        }
        self.waiting.binary_search_by_key(&offset, |e| e.0)
    }

    fn pop_done(&mut self) {
        while self.waiting.front().is_some_and(|e| e.1 == 0) {
            self.waiting.pop_front();
        }
    }
}

/// Offsets of the partitions this worker reads.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<Slot, Partition>,
}

impl OffsetTracker {
    /// A partition was assigned under `slot`.
    pub fn assign(&mut self, slot: Slot) {
        self.partitions.insert(slot, Partition::new(true));
    }

    /// Records an event read at `offset` that will produce `outputs` outputs.
    /// An event with no outputs is done at once. Offsets of one slot are
    /// tracked in increasing order (gaps are fine).
    pub fn track(&mut self, slot: Slot, offset: i64, outputs: u32) {
        let p = self
            .partitions
            .entry(slot)
            .or_insert_with(|| Partition::new(false));
        p.next = p.next.max(offset + 1);
        if outputs == 0 {
            return;
        }
        if p.waiting.back().is_none_or(|e| e.0 < offset) {
            p.waiting.push_back((offset, outputs));
            p.pending += 1;
            return;
        }
        // tracked again, or out of order (not expected)
        match p.find(offset) {
            Ok(i) => {
                if p.waiting[i].1 == 0 {
                    p.pending += 1;
                }
                p.waiting[i].1 += outputs;
            }
            Err(i) => {
                p.waiting.insert(i, (offset, outputs));
                p.pending += 1;
            }
        }
    }

    /// One output of the event at `offset` was acknowledged. Returns false
    /// for an unknown event (its partition was revoked meanwhile).
    pub fn ack(&mut self, slot: Slot, offset: i64) -> bool {
        let Some(p) = self.partitions.get_mut(&slot) else {
            return false;
        };
        let Ok(i) = p.find(offset) else {
            return false;
        };
        let n = &mut p.waiting[i].1;
        if *n == 0 {
            return false;
        }
        *n -= 1;
        if *n == 0 {
            p.pending -= 1;
            p.pop_done();
        }
        true
    }

    /// Offsets to commit now (only those that moved since the last call),
    /// for assigned partitions. Forgets revoked partitions once they are done.
    pub fn take_committable(&mut self) -> Vec<(Slot, i64)> {
        let mut out = Vec::new();
        self.partitions.retain(|_, p| p.active || p.pending > 0);
        for (slot, p) in &mut self.partitions {
            if !p.active {
                continue;
            }
            if let Some(c) = p.committable() {
                if p.committed.is_none_or(|done| c > done) {
                    p.committed = Some(c);
                    out.push((*slot, c));
                }
            }
        }
        out.sort();
        out
    }

    /// A commit of `offset` failed: hand it out again on the next
    /// [`OffsetTracker::take_committable`].
    pub fn commit_failed(&mut self, slot: Slot, offset: i64) {
        if let Some(p) = self.partitions.get_mut(&slot) {
            if p.committed == Some(offset) {
                p.committed = None;
            }
        }
    }

    /// Events read but not fully acknowledged, across partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|p| p.pending).sum()
    }

    /// Events of one slot not fully acknowledged.
    pub fn pending(&self, slot: Slot) -> usize {
        self.partitions.get(&slot).map_or(0, |p| p.pending)
    }

    /// Stops committing a revoked partition; returns its final committable
    /// offset. Late acknowledgements for it are accepted and ignored.
    pub fn revoke(&mut self, slot: Slot) -> Option<i64> {
        let p = self.partitions.get_mut(&slot)?;
        p.active = false;
        let c = p.committable();
        if p.pending == 0 {
            self.partitions.remove(&slot);
        }
        c
    }
}

/// Slot numbers for topic partitions: a fresh slot per assignment.
#[derive(Debug, Default)]
pub struct Slots {
    current: HashMap<String, HashMap<i32, Slot>>,
    names: HashMap<Slot, (String, i32)>,
    next: Slot,
}

impl Slots {
    /// Gives `topic`/`partition` a new slot (on assignment).
    pub fn assign(&mut self, topic: &str, partition: i32) -> Slot {
        // numbers wrap after 2^20 assignments: skip those still in use
        let mut slot = self.next;
        while self.names.contains_key(&slot) {
            slot = (slot + 1) & ((1 << SLOT_BITS) - 1);
        }
        self.next = (slot + 1) & ((1 << SLOT_BITS) - 1);
        if let Some(old) = self.current_slot(topic, partition) {
            self.names.remove(&old);
        }
        self.current
            .entry(topic.to_string())
            .or_default()
            .insert(partition, slot);
        self.names.insert(slot, (topic.to_string(), partition));
        slot
    }

    /// Forgets the current slot of a revoked partition.
    pub fn revoke(&mut self, topic: &str, partition: i32) -> Option<Slot> {
        let slot = self.current.get_mut(topic)?.remove(&partition)?;
        self.names.remove(&slot);
        Some(slot)
    }

    /// The slot of an assigned partition.
    pub fn current_slot(&self, topic: &str, partition: i32) -> Option<Slot> {
        self.current.get(topic)?.get(&partition).copied()
    }

    /// The topic partition of an assigned slot.
    pub fn name(&self, slot: Slot) -> Option<&(String, i32)> {
        self.names.get(&slot)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn commits_never_pass_an_unacknowledged_event() {
        let mut t = OffsetTracker::default();
        t.assign(0);
        for o in 10..15 {
            t.track(0, o, 2);
        }
        assert_eq!(t.take_committable(), vec![(0, 10)], "nothing done yet");
        // acks arrive out of order
        for o in [12, 12, 13, 11, 10, 10] {
            assert!(t.ack(0, o));
        }
        // 10 is done, 11 still has one output outstanding
        assert_eq!(t.take_committable(), vec![(0, 11)]);
        t.ack(0, 11);
        t.ack(0, 13);
        assert_eq!(t.take_committable(), vec![(0, 14)]);
        t.ack(0, 14);
        t.ack(0, 14);
        assert_eq!(t.take_committable(), vec![(0, 15)]);
        assert!(t.take_committable().is_empty(), "nothing moved");
        assert_eq!(t.in_flight(), 0);
        assert!(!t.ack(0, 14), "already done");
        t.commit_failed(0, 15);
        assert_eq!(
            t.take_committable(),
            vec![(0, 15)],
            "a failed commit is retried"
        );
        t.commit_failed(0, 3);
        assert!(
            t.take_committable().is_empty(),
            "an older failure changes nothing"
        );
    }

    #[test]
    fn gaps_and_zero_output_events_do_not_hold_commits() {
        let mut t = OffsetTracker::default();
        t.assign(3);
        t.track(3, 100, 1);
        t.track(3, 101, 0);
        t.track(3, 105, 1); // 102..104 are gaps (compaction, markers)
        assert_eq!(t.take_committable(), vec![(3, 100)]);
        t.ack(3, 100);
        assert_eq!(t.take_committable(), vec![(3, 105)]);
        t.ack(3, 105);
        assert_eq!(t.take_committable(), vec![(3, 106)]);
    }

    #[test]
    fn a_huge_gap_costs_nothing_and_acks_find_their_event_after_it() {
        let mut t = OffsetTracker::default();
        t.assign(1);
        t.track(1, 5, 1);
        // a compacted topic: the next record is 10^12 offsets later
        let far = 1_000_000_000_005;
        for o in far..far + 1000 {
            t.track(1, o, 2);
        }
        assert_eq!(t.partitions[&1].waiting.len(), 1001, "events, not offsets");
        assert_eq!(t.take_committable(), vec![(1, 5)]);
        // acks out of order, across the gap
        for o in (far..far + 1000).rev() {
            assert!(t.ack(1, o));
        }
        assert!(t.ack(1, 5));
        assert_eq!(
            t.take_committable(),
            vec![(1, far)],
            "the far events still wait"
        );
        for o in (far..far + 1000).step_by(7) {
            assert!(t.ack(1, o));
        }
        assert!(!t.ack(1, far), "already done");
        assert!(!t.ack(1, far - 1), "never read");
        for o in far..far + 1000 {
            if (o - far) % 7 != 0 {
                assert!(t.ack(1, o));
            }
        }
        assert_eq!(t.take_committable(), vec![(1, far + 1000)]);
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn an_event_tracked_out_of_order_still_holds_the_commit() {
        let mut t = OffsetTracker::default();
        t.assign(0);
        t.track(0, 10, 1);
        t.track(0, 20, 1);
        t.track(0, 15, 1); // not expected, but kept in place
        t.ack(0, 10);
        assert_eq!(t.take_committable(), vec![(0, 15)]);
        t.ack(0, 20);
        assert!(t.take_committable().is_empty(), "15 still waits");
        t.ack(0, 15);
        assert_eq!(t.take_committable(), vec![(0, 21)]);
    }

    #[test]
    fn revoked_slots_take_late_acks_but_are_never_committed() {
        let mut t = OffsetTracker::default();
        t.assign(0);
        t.assign(1);
        t.track(0, 0, 1);
        t.track(1, 100, 1);
        t.track(1, 101, 0);
        t.ack(1, 100);
        assert_eq!(t.take_committable(), vec![(0, 0), (1, 102)]);
        assert_eq!(t.revoke(0), Some(0));
        assert!(t.ack(0, 0), "a late ack is accepted");
        t.track(0, 1, 1); // a late event of the revoked assignment
        assert!(t.take_committable().is_empty(), "revoked: never committed");
        assert_eq!(t.in_flight(), 1);
        t.ack(0, 1);
        assert!(t.take_committable().is_empty());
        assert_eq!(t.in_flight(), 0);
        assert!(!t.ack(1, 55), "unknown offset");
    }

    #[test]
    fn slots_are_fresh_per_assignment_and_pack_with_offsets() {
        let mut s = Slots::default();
        let a = s.assign("t", 0);
        assert_eq!(s.current_slot("t", 0), Some(a));
        assert_eq!(s.revoke("t", 0), Some(a));
        let b = s.assign("t", 0);
        assert_ne!(a, b);
        assert_eq!(s.name(b), Some(&("t".to_string(), 0)));
        assert_eq!(s.name(a), None);
        for (slot, off) in [(0, 0), (b, 12345), ((1 << SLOT_BITS) - 1, (1 << 44) - 1)] {
            assert_eq!(unpack(pack(slot, off)), (slot, off));
        }
    }
}
