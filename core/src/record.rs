//! Raw records as sources deliver them: a batch of payloads in one buffer, with positions.

use crate::pool::VecPool;
use crate::position::{EventTime, RecordPosition};

/// Spare payload buffers of dropped batches, for the next batches of any source.
static SPARE_BYTES: VecPool<u8> = VecPool::new(SPARE_BATCHES, 1 << 20);
/// Spare record tables of dropped batches (10 000 records take about 560 KiB).
static SPARE_RECORDS: VecPool<RecordMeta> = VecPool::new(SPARE_BATCHES, 1 << 20);
/// Dropped batches whose buffers are kept for reuse: enough for a few shards' reads in flight.
const SPARE_BATCHES: usize = 8;

/// A batch of raw records read from one shard.
///
/// Payloads and partition keys live in one contiguous buffer and each record keeps ranges into
/// it, so a batch of ten thousand records costs two allocations, not twenty thousand; and a
/// dropped batch leaves both (up to 1 MiB each) to the next one made with `with_capacity`.
#[derive(Clone, Debug, Default)]
pub struct RawBatch {
    bytes: Vec<u8>,
    records: Vec<RecordMeta>,
    /// Records the source could read but not make sense of (a corrupt KPL aggregate), by index,
    /// with the reason: the pipeline sends them to the dead-letter policy. Almost always empty.
    faults: Vec<(u32, String)>,
}

#[derive(Clone, Debug)]
struct RecordMeta {
    position: RecordPosition,
    arrival_ms: EventTime,
    key_start: u32,
    data_start: u32,
    data_end: u32,
}

/// One record of a [`RawBatch`], borrowed.
#[derive(Clone, Copy, Debug)]
pub struct RawRecord<'a> {
    /// The record's position in its shard.
    pub position: &'a RecordPosition,
    /// The approximate time the stream received the record (milliseconds since the epoch).
    pub arrival_ms: EventTime,
    /// The partition key the producer chose.
    pub partition_key: &'a [u8],
    /// The payload.
    pub data: &'a [u8],
}

impl RawBatch {
    /// An empty batch with room for `records` records of `bytes` bytes in all.
    pub fn with_capacity(records: usize, bytes: usize) -> Self {
        Self {
            bytes: SPARE_BYTES.take(bytes),
            records: SPARE_RECORDS.take(records),
            faults: Vec::new(),
        }
    }

    /// Appends a record. Positions must increase; the caller (a source) guarantees it.
    ///
    /// # Panics
    /// If the batch would exceed 4 GiB, which no source produces (Kinesis returns at most 10 MB).
    #[inline]
    pub fn push(
        &mut self,
        position: RecordPosition,
        arrival_ms: EventTime,
        partition_key: &[u8],
        data: &[u8],
    ) {
        let key_start = self.bytes.len();
        let data_start = key_start + partition_key.len();
        let data_end = data_start + data.len();
        // One check covers all three offsets: they only grow.
        let data_end = u32::try_from(data_end).expect("a raw batch holds at most 4 GiB");
        self.bytes.extend_from_slice(partition_key);
        self.bytes.extend_from_slice(data);
        let (key_start, data_start) = (key_start as u32, data_start as u32);
        self.records.push(RecordMeta {
            position,
            arrival_ms,
            key_start,
            data_start,
            data_end,
        });
    }

    /// Appends a record the source could not interpret (for example a KPL aggregate whose
    /// digest does not match): the pipeline hands it to the dead-letter policy with `reason`.
    pub fn push_faulty(
        &mut self,
        position: RecordPosition,
        arrival_ms: EventTime,
        partition_key: &[u8],
        data: &[u8],
        reason: String,
    ) {
        let index =
            u32::try_from(self.records.len()).expect("a raw batch holds fewer than 4 G records");
        self.push(position, arrival_ms, partition_key, data);
        self.faults.push((index, reason));
    }

    /// Why the record at `index` could not be interpreted, if it could not.
    pub fn fault(&self, index: usize) -> Option<&str> {
        if self.faults.is_empty() {
            return None;
        }
        self.faults
            .iter()
            .find(|(i, _)| *i as usize == index)
            .map(|(_, r)| r.as_str())
    }

    /// Number of records.
    pub fn len(&self) -> usize {
        self.records.len()
    }

    /// Whether the batch has no records.
    pub fn is_empty(&self) -> bool {
        self.records.is_empty()
    }

    /// Total payload and key bytes.
    pub fn byte_len(&self) -> usize {
        self.bytes.len()
    }

    /// The record at `index`.
    ///
    /// # Panics
    /// If `index >= self.len()`.
    #[inline]
    pub fn get(&self, index: usize) -> RawRecord<'_> {
        self.view(&self.records[index])
    }

    /// The records in order.
    pub fn iter(&self) -> impl ExactSizeIterator<Item = RawRecord<'_>> + '_ {
        self.records.iter().map(|meta| self.view(meta))
    }

    #[inline]
    fn view<'a>(&'a self, meta: &'a RecordMeta) -> RawRecord<'a> {
        RawRecord {
            position: &meta.position,
            arrival_ms: meta.arrival_ms,
            partition_key: &self.bytes[meta.key_start as usize..meta.data_start as usize],
            data: &self.bytes[meta.data_start as usize..meta.data_end as usize],
        }
    }

    /// The position of the first record.
    pub fn first_position(&self) -> Option<&RecordPosition> {
        self.records.first().map(|m| &m.position)
    }

    /// The position of the last record.
    pub fn last_position(&self) -> Option<&RecordPosition> {
        self.records.last().map(|m| &m.position)
    }

    /// Splits off the records after the first `at`, returning them as a new batch.
    pub fn split_off(&mut self, at: usize) -> RawBatch {
        let mut rest = RawBatch::default();
        for i in at..self.len() {
            let r = self.get(i);
            match self.fault(i) {
                Some(reason) => rest.push_faulty(
                    r.position.clone(),
                    r.arrival_ms,
                    r.partition_key,
                    r.data,
                    reason.to_owned(),
                ),
                None => rest.push(r.position.clone(), r.arrival_ms, r.partition_key, r.data),
            }
        }
        self.faults.retain(|(i, _)| (*i as usize) < at);
        if let Some(meta) = self.records.get(at) {
            self.bytes.truncate(meta.key_start as usize);
        }
        self.records.truncate(at);
        rest
    }
}

impl Drop for RawBatch {
    fn drop(&mut self) {
        SPARE_BYTES.give(std::mem::take(&mut self.bytes));
        SPARE_RECORDS.give(std::mem::take(&mut self.records));
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::SequenceNumber;

    fn pos(n: u128) -> RecordPosition {
        RecordPosition::new(SequenceNumber::from_u128(n))
    }

    #[test]
    fn records_read_back_as_pushed() {
        let mut batch = RawBatch::default();
        batch.push(pos(1), 10, b"k1", b"hello");
        batch.push(pos(2), 11, b"", b"");
        batch.push(pos(3), 12, b"key-3", b"world");
        let got: Vec<_> = batch
            .iter()
            .map(|r| (r.partition_key.to_vec(), r.data.to_vec()))
            .collect();
        assert_eq!(
            got,
            vec![
                (b"k1".to_vec(), b"hello".to_vec()),
                (vec![], vec![]),
                (b"key-3".to_vec(), b"world".to_vec())
            ]
        );
        assert_eq!(batch.get(2).arrival_ms, 12);
        assert_eq!(batch.last_position(), Some(&pos(3)));
    }

    #[test]
    fn faults_stay_with_their_records_across_a_split() {
        let mut batch = RawBatch::default();
        batch.push(pos(1), 0, b"k", b"a");
        batch.push_faulty(pos(2), 0, b"k", b"bad", "digest mismatch".into());
        batch.push(pos(3), 0, b"k", b"c");
        batch.push_faulty(pos(4), 0, b"k", b"worse", "malformed".into());
        assert_eq!(batch.fault(1), Some("digest mismatch"));
        assert_eq!(batch.fault(0), None);
        let rest = batch.split_off(2);
        assert_eq!(batch.fault(1), Some("digest mismatch"));
        assert_eq!(rest.fault(0), None);
        assert_eq!(rest.fault(1), Some("malformed"));
        assert_eq!(batch.fault(3), None);
    }

    #[test]
    fn split_off_keeps_both_halves_intact() {
        let mut batch = RawBatch::default();
        for i in 0..5u8 {
            batch.push(pos(u128::from(i)), 0, &[i], &[i, i]);
        }
        let rest = batch.split_off(2);
        assert_eq!(batch.len(), 2);
        assert_eq!(rest.len(), 3);
        assert_eq!(batch.get(1).data, &[1, 1]);
        assert_eq!(rest.get(0).data, &[2, 2]);
        assert_eq!(rest.first_position(), Some(&pos(2)));
        assert_eq!(batch.byte_len(), 6);
    }
}
