//! The simulation's records and results, and their fixed-size encoding (any other length is
//! an undecodable record).

use shardflow_core::error::DecodeError;
use shardflow_core::record::RawRecord;

/// A record as the generator writes it (a serde type: a reduce keeps one in its state, which
/// snapshots hold).
#[derive(Clone, Debug, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Event {
    /// Unique per generated record (flat_map copies share it).
    pub uid: u64,
    pub key: u32,
    pub ts: i64,
    pub value: i64,
}

/// A keyed result, windowed (`start..end`) or running (`0..0`).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Res {
    pub key: u32,
    pub start: i64,
    pub end: i64,
    pub value: i64,
}

const EVENT_BYTES: usize = 28;

pub fn encode(e: &Event) -> Vec<u8> {
    let mut out = Vec::with_capacity(EVENT_BYTES);
    out.extend_from_slice(&e.uid.to_le_bytes());
    out.extend_from_slice(&e.key.to_le_bytes());
    out.extend_from_slice(&e.ts.to_le_bytes());
    out.extend_from_slice(&e.value.to_le_bytes());
    out
}

pub fn decode_bytes(data: &[u8]) -> Option<Event> {
    if data.len() != EVENT_BYTES {
        return None;
    }
    let u64_at = |i: usize| u64::from_le_bytes(data[i..i + 8].try_into().expect("8 bytes"));
    Some(Event {
        uid: u64_at(0),
        key: u32::from_le_bytes(data[8..12].try_into().expect("4 bytes")),
        ts: u64_at(12) as i64,
        value: u64_at(20) as i64,
    })
}

pub fn decode(record: RawRecord<'_>) -> Result<Event, DecodeError> {
    decode_bytes(record.data).ok_or_else(|| DecodeError {
        format: "sim",
        message: format!("{} bytes, expected {EVENT_BYTES}", record.data.len()),
    })
}
