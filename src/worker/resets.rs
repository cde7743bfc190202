//! Input the consumer could not read because the broker deleted it first.
//!
//! When a consumer's position falls below a partition's log start (the
//! retention deleted the records, or the embedded broker dropped them past
//! its 5 MB), librdkafka resets the position to `auto.offset.reset` and says
//! so only in a WARNING log line (facility `OFFSET`). Those records are
//! neither predicted nor dead-lettered: they are gone. The worker reads that
//! line ([`parse`]), works out the range skipped (the new position, or the
//! partition's cached log start or end when the line has none), and logs it
//! as an error and counts it in `ml_worker_input_skipped_total`. A reset
//! backwards (a log truncated below the position) only re-reads records.

/// Where librdkafka moved a partition's position.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Target {
    Offset(i64),
    Beginning,
    End,
}

/// One offset reset librdkafka logged.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct OffsetReset {
    pub topic: String,
    pub partition: i32,
    /// The position the fetch failed at.
    pub from: i64,
    pub to: Target,
}

/// Reads librdkafka 2.12's `rd_kafka_offset_reset` log line:
/// `[thrd:main]: TOPIC [P]: offset reset (at offset A (leader epoch E), broker B) to
/// [cached BEGINNING offset ]offset X (leader epoch E): REASON: ERROR`.
pub fn parse(message: &str) -> Option<OffsetReset> {
    let (head, rest) = message.split_once("]: offset reset (at offset ")?;
    let (topic, partition) = head.rsplit_once(" [")?;
    // librdkafka prefixes its thread: "[thrd:main]: "
    let topic = topic.rsplit_once("]: ").map_or(topic, |(_, t)| t);
    let partition = partition.parse().ok()?;
    let (from, rest) = rest.split_once(' ')?;
    let from = from.parse().ok()?;
    let (_, to) = rest.split_once(") to ")?;
    let to = to.strip_prefix("cached BEGINNING offset ").unwrap_or(to);
    let to = to.strip_prefix("offset ")?;
    let word = to.split([' ', ':']).next()?;
    let to = match word {
        "BEGINNING" => Target::Beginning,
        "END" => Target::End,
        n => Target::Offset(n.parse().ok()?),
    };
    Some(OffsetReset {
        topic: topic.to_string(),
        partition,
        from,
        to,
    })
}

/// Offsets skipped by a reset, `from..to`, given the partition's cached
/// watermarks (for a reset to BEGINNING or END); empty when the position
/// moved back.
pub fn skipped(r: &OffsetReset, low: i64, high: i64) -> std::ops::Range<i64> {
    let to = match r.to {
        Target::Offset(o) => o,
        Target::Beginning => low,
        Target::End => high,
    };
    if r.from >= 0 && to > r.from {
        r.from..to
    } else {
        0..0
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_librdkafka_offset_reset_lines() {
        let cached = "[thrd:main]: features.v2 [3]: offset reset (at offset 100 (leader epoch -1), broker 1) to cached BEGINNING offset offset 130 (leader epoch -1): fetch failed due to requested offset not available on the broker: Broker: Offset out of range";
        let r = parse(cached).unwrap();
        assert_eq!(
            r,
            OffsetReset {
                topic: "features.v2".into(),
                partition: 3,
                from: 100,
                to: Target::Offset(130)
            }
        );
        assert_eq!(skipped(&r, 0, 0), 100..130);
        let queried = "f [0]: offset reset (at offset 5 (leader epoch 2), broker 1) to offset BEGINNING (leader epoch -1): fetch failed: Broker: Offset out of range";
        let r = parse(queried).unwrap();
        assert_eq!(r.to, Target::Beginning);
        assert_eq!(skipped(&r, 40, 90), 5..40);
        let end = "f [0]: offset reset (at offset 5 (leader epoch -1), broker 1) to offset END (leader epoch -1): x: y";
        assert_eq!(skipped(&parse(end).unwrap(), 40, 90), 5..90);
        // backwards (a truncated log): nothing skipped
        let back = "f [1]: offset reset (at offset 500 (leader epoch -1), broker 1) to cached BEGINNING offset offset 0 (leader epoch -1): x: y";
        assert!(skipped(&parse(back).unwrap(), 0, 0).is_empty());
        for other in ["f [1]: offset reset (at offset INVALID (leader epoch -1), broker -1) to offset BEGINNING (leader epoch -1): no previously committed offset available: Local: No offset stored", "something else", ""] {
            assert!(parse(other).is_none_or(|r| skipped(&r, 10, 20).is_empty()), "{other}");
        }
    }
}
