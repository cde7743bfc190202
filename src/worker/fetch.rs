//! Reading fetched records in batches.
//!
//! rdkafka's `BaseConsumer::poll` hands out one record per call, and each
//! call pays for librdkafka's poll bookkeeping (clock reads, the poll-interval
//! tracker, an event wrapper and an `Arc`). At a few hundred thousand records
//! a second that is a large share of the consumer thread. The worker
//! therefore forwards every assigned partition's fetch queue to one queue of
//! its own, a [`FetchQueue`], and reads it with
//! `rd_kafka_consume_batch_queue`: one call per burst of records.
//!
//! The consumer's main queue keeps everything else (rebalances, commit
//! results, errors) and is still polled on every turn of the loop, so
//! `max.poll.interval.ms` and the rebalance protocol work as before.
//!
//! Forwarding is set in the rebalance handler *before* librdkafka starts
//! fetching a newly assigned partition, so no record of it goes to the main
//! queue first (order within a partition holds). librdkafka keeps an
//! application-set forward across later assignments of the same partition.
//! Records of a revoked partition still in this queue are dropped by
//! librdkafka's version barrier, or by the worker's slot check.
//!
//! All of the worker's raw librdkafka calls for this are in this file.

use std::ffi::{CStr, CString};
use std::ptr;
use std::time::Duration;

use rdkafka::bindings as rd;
use rdkafka::consumer::{BaseConsumer, Consumer, ConsumerContext};
use rdkafka::error::{KafkaError, RDKafkaErrorCode};
use rdkafka::message::{BorrowedMessage, Header, OwnedHeaders};
use rdkafka::Message;
use rdkafka::TopicPartitionList;

/// One record read from a [`FetchQueue`], borrowed until the callback returns.
#[derive(Debug)]
pub struct Incoming<'a> {
    pub topic: &'a str,
    pub partition: i32,
    pub offset: i64,
    /// Milliseconds since the epoch, when the record has a timestamp.
    pub timestamp: Option<i64>,
    pub payload: Option<&'a [u8]>,
    pub key: Option<&'a [u8]>,
    /// Copied out of the record, only when it has any.
    pub headers: Option<OwnedHeaders>,
}

impl<'a> Incoming<'a> {
    /// The same view of a record returned by `BaseConsumer::poll`.
    pub fn from_message(msg: &'a BorrowedMessage<'_>) -> Self {
        Incoming {
            topic: msg.topic(),
            partition: msg.partition(),
            offset: msg.offset(),
            timestamp: msg.timestamp().to_millis(),
            payload: msg.payload(),
            key: msg.key(),
            // SAFETY: a live message, borrowed for this call
            headers: unsafe { headers(msg.ptr()) },
        }
    }
}

/// A librdkafka queue that all assigned partitions forward their fetched
/// records to.
pub struct FetchQueue {
    rk: *mut rd::rd_kafka_t,
    queue: *mut rd::rd_kafka_queue_t,
}

// SAFETY: librdkafka queue handles and `rd_kafka_t` are thread-safe (every
// queue operation takes the queue's own lock); the handle is only destroyed
// in `Drop`.
unsafe impl Send for FetchQueue {}
unsafe impl Sync for FetchQueue {}

/// Most records taken from the queue in one call.
pub const MAX_BURST: usize = 512;

impl FetchQueue {
    /// A new, empty queue on `consumer`'s client. It must be dropped before
    /// the consumer.
    pub fn new<C: ConsumerContext>(consumer: &BaseConsumer<C>) -> Self {
        let rk = consumer.client().native_ptr();
        // SAFETY: `rk` is the live client of `consumer`; the returned queue
        // is owned by this value and destroyed once, in `Drop`.
        let queue = unsafe { rd::rd_kafka_queue_new(rk) };
        FetchQueue { rk, queue }
    }

    /// Forwards the fetch queues of `partitions` here. Call it before the
    /// partitions are assigned.
    pub fn attach(&self, partitions: &TopicPartitionList) {
        for e in partitions.elements() {
            let Ok(topic) = CString::new(e.topic()) else {
                continue; // not a Kafka topic name; librdkafka refuses it too
            };
            // SAFETY: `rk` outlives this queue (see `new`); the partition
            // queue handle is a new reference that is released right here
            // after setting the (persistent) forward.
            unsafe {
                let pq = rd::rd_kafka_queue_get_partition(self.rk, topic.as_ptr(), e.partition());
                if pq.is_null() {
                    tracing::warn!(
                        topic = e.topic(),
                        partition = e.partition(),
                        "no fetch queue for this partition; its records come through the main queue"
                    );
                    continue;
                }
                rd::rd_kafka_queue_forward(pq, self.queue);
                rd::rd_kafka_queue_destroy(pq);
            }
        }
    }

    /// Takes up to [`MAX_BURST`] records, waiting at most `timeout` for the
    /// first, and hands each to `each` in queue order (per-partition order).
    /// Returns how many records (and record-level errors) were taken.
    pub fn consume(
        &self,
        timeout: Duration,
        mut each: impl FnMut(Result<Incoming<'_>, KafkaError>),
    ) -> usize {
        let mut buf: [*mut rd::rd_kafka_message_t; MAX_BURST] = [ptr::null_mut(); MAX_BURST];
        let mut n = 0;
        if !timeout.is_zero() {
            // The batch call waits its whole timeout unless the batch fills,
            // so the wait is for one record and the batch call never waits.
            let timeout_ms = timeout.as_millis().clamp(1, i32::MAX as u128) as i32;
            // SAFETY: on success we own the message until destroyed below.
            let first = unsafe { rd::rd_kafka_consume_queue(self.queue, timeout_ms) };
            if first.is_null() {
                return 0;
            }
            buf[0] = first;
            n = 1;
        }
        // SAFETY: `buf[n..]` has room for MAX_BURST - n pointers; librdkafka
        // fills the first of them with messages we own until
        // `rd_kafka_message_destroy`.
        let more = unsafe {
            rd::rd_kafka_consume_batch_queue(self.queue, 0, buf[n..].as_mut_ptr(), MAX_BURST - n)
        };
        n += usize::try_from(more).unwrap_or(0);
        for &m in &buf[..n] {
            // SAFETY: `m` is a valid message until destroyed right after;
            // the borrowed slices do not escape `each`.
            unsafe {
                each(incoming(m));
                rd::rd_kafka_message_destroy(m);
            }
        }
        n
    }
}

/// A view of a raw librdkafka message.
///
/// # Safety
/// `m` must be a valid message that outlives the returned value.
unsafe fn incoming<'a>(m: *mut rd::rd_kafka_message_t) -> Result<Incoming<'a>, KafkaError> {
    let msg = &*m;
    if msg.err != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR {
        return Err(KafkaError::MessageConsumption(RDKafkaErrorCode::from(
            msg.err,
        )));
    }
    let topic = if msg.rkt.is_null() {
        ""
    } else {
        CStr::from_ptr(rd::rd_kafka_topic_name(msg.rkt))
            .to_str()
            .unwrap_or("")
    };
    let slice = |p: *mut std::ffi::c_void, len: usize| -> Option<&'a [u8]> {
        if p.is_null() {
            None
        } else {
            Some(std::slice::from_raw_parts(p as *const u8, len))
        }
    };
    let mut tstype = rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE;
    let ts = rd::rd_kafka_message_timestamp(m, &mut tstype);
    Ok(Incoming {
        topic,
        partition: msg.partition,
        offset: msg.offset,
        timestamp: (tstype != rd::rd_kafka_timestamp_type_t::RD_KAFKA_TIMESTAMP_NOT_AVAILABLE
            && ts >= 0)
            .then_some(ts),
        payload: slice(msg.payload, msg.len),
        key: slice(msg.key, msg.key_len),
        headers: headers(m),
    })
}

/// Header names the worker writes on dead letters; an input record's own
/// headers under these are dropped, so a dead letter's `error.reason` is
/// always the worker's (the record cannot forge or shadow it).
pub const RESERVED_HEADER_PREFIXES: [&str; 2] = ["error.", "source."];

/// The record's headers, copied (names read as bytes: they need not be
/// UTF-8), except those under [`RESERVED_HEADER_PREFIXES`]; `None` when
/// none are left.
///
/// # Safety
/// `m` must be a valid message.
unsafe fn headers(m: *mut rd::rd_kafka_message_t) -> Option<OwnedHeaders> {
    let mut hdrs: *mut rd::rd_kafka_headers_t = ptr::null_mut();
    if rd::rd_kafka_message_headers(m, &mut hdrs)
        != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        || hdrs.is_null()
    {
        return None;
    }
    let count = rd::rd_kafka_header_cnt(hdrs);
    if count == 0 {
        return None;
    }
    let mut owned = OwnedHeaders::new_with_capacity(count);
    let mut kept = 0;
    for i in 0..count {
        let mut name: *const std::ffi::c_char = ptr::null();
        let mut value: *const std::ffi::c_void = ptr::null();
        let mut size: usize = 0;
        if rd::rd_kafka_header_get_all(hdrs, i, &mut name, &mut value, &mut size)
            != rd::rd_kafka_resp_err_t::RD_KAFKA_RESP_ERR_NO_ERROR
        {
            break;
        }
        let raw = CStr::from_ptr(name).to_bytes();
        if RESERVED_HEADER_PREFIXES
            .iter()
            .any(|p| raw.len() >= p.len() && raw[..p.len()].eq_ignore_ascii_case(p.as_bytes()))
        {
            continue;
        }
        let key = String::from_utf8_lossy(raw);
        let value =
            (!value.is_null()).then(|| std::slice::from_raw_parts(value as *const u8, size));
        owned = owned.insert(Header { key: &key, value });
        kept += 1;
    }
    (kept > 0).then_some(owned)
}

impl Drop for FetchQueue {
    fn drop(&mut self) {
        // SAFETY: created in `new`, destroyed only here. Partition queues
        // that still forward here hold their own reference to it.
        unsafe { rd::rd_kafka_queue_destroy(self.queue) }
    }
}
