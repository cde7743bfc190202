//! At-least-once bookkeeping: which input offsets may be committed.
//!
//! Every event read is tracked with the number of outputs it produces
//! (prediction + signal, or one dead letter). An output's broker
//! acknowledgement acks one of them. A partition's committable offset is the
//! lowest offset still waiting for an acknowledgement (or one past the
//! highest offset read, when none waits): committing it never skips an event
//! whose outputs are not yet safe, whatever order acknowledgements come in.

use std::collections::{BTreeMap, HashMap};

/// A topic partition.
pub type TopicPartition = (String, i32);

#[derive(Debug, Default)]
struct Partition {
    /// offset -> outputs still unacknowledged
    pending: BTreeMap<i64, u32>,
    /// one past the highest offset tracked
    next: i64,
    /// last offset handed out for commit
    committed: i64,
}

impl Partition {
    fn committable(&self) -> i64 {
        self.pending.keys().next().copied().unwrap_or(self.next)
    }
}

/// Offsets of all assigned partitions.
#[derive(Debug, Default)]
pub struct OffsetTracker {
    partitions: HashMap<TopicPartition, Partition>,
}

impl OffsetTracker {
    /// Records an event read at `offset` that will produce `outputs` outputs.
    /// An event with no outputs is done at once.
    pub fn track(&mut self, tp: &TopicPartition, offset: i64, outputs: u32) {
        let p = self
            .partitions
            .entry(tp.clone())
            .or_insert_with(|| Partition {
                committed: offset,
                ..Partition::default()
            });
        p.next = p.next.max(offset + 1);
        if outputs > 0 {
            *p.pending.entry(offset).or_insert(0) += outputs;
        }
    }

    /// One output of the event at `offset` was acknowledged. Returns false
    /// for an unknown event (its partition was revoked meanwhile).
    pub fn ack(&mut self, tp: &TopicPartition, offset: i64) -> bool {
        let Some(p) = self.partitions.get_mut(tp) else {
            return false;
        };
        match p.pending.get_mut(&offset) {
            Some(n) if *n > 1 => *n -= 1,
            Some(_) => {
                p.pending.remove(&offset);
            }
            None => return false,
        }
        true
    }

    /// Offsets to commit now (only those that moved since the last call).
    pub fn take_committable(&mut self) -> Vec<(TopicPartition, i64)> {
        let mut out = Vec::new();
        for (tp, p) in &mut self.partitions {
            let c = p.committable();
            if c > p.committed {
                p.committed = c;
                out.push((tp.clone(), c));
            }
        }
        out.sort();
        out
    }

    /// Events read but not fully acknowledged, across partitions.
    pub fn in_flight(&self) -> usize {
        self.partitions.values().map(|p| p.pending.len()).sum()
    }

    /// Forgets a revoked partition; returns its final committable offset.
    pub fn revoke(&mut self, tp: &TopicPartition) -> Option<i64> {
        self.partitions.remove(tp).map(|p| p.committable())
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tp(p: i32) -> TopicPartition {
        ("t".to_string(), p)
    }

    #[test]
    fn commits_never_pass_an_unacknowledged_event() {
        let mut t = OffsetTracker::default();
        for o in 10..15 {
            t.track(&tp(0), o, 2);
        }
        assert!(t.take_committable().is_empty());
        // acks arrive out of order
        for o in [12, 12, 13, 11, 10, 10] {
            assert!(t.ack(&tp(0), o));
        }
        // 10 is done, 11 still has one output outstanding
        assert_eq!(t.take_committable(), vec![(tp(0), 11)]);
        t.ack(&tp(0), 11);
        t.ack(&tp(0), 13);
        assert_eq!(t.take_committable(), vec![(tp(0), 14)]);
        t.ack(&tp(0), 14);
        t.ack(&tp(0), 14);
        assert_eq!(t.take_committable(), vec![(tp(0), 15)]);
        assert!(t.take_committable().is_empty(), "nothing moved");
        assert_eq!(t.in_flight(), 0);
    }

    #[test]
    fn partitions_are_independent_and_revocation_forgets() {
        let mut t = OffsetTracker::default();
        t.track(&tp(0), 0, 1);
        t.track(&tp(1), 100, 1);
        t.track(&tp(1), 101, 0);
        t.ack(&tp(1), 100);
        assert_eq!(t.take_committable(), vec![(tp(1), 102)]);
        assert_eq!(t.revoke(&tp(0)), Some(0));
        assert!(!t.ack(&tp(0), 0), "ack after revoke is ignored");
        assert!(!t.ack(&tp(1), 55), "unknown offset");
        assert_eq!(t.in_flight(), 0);
    }
}
