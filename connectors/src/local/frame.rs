//! The on-disk frame of one record in a shard log: length, CRC-32C, then the record.
//!
//! ```text
//! u32 LE  body length
//! u32 LE  CRC-32C of the body
//! body:
//!   u128 LE  sequence number
//!   i64 LE   approximate arrival time, ms since the epoch
//!   u16 LE   partition key length in bytes
//!   [u8]     partition key (UTF-8)
//!   [u8]     data
//! ```
//!
//! The checksum covers the whole body, so a frame torn by a crash or a half-visible concurrent
//! write is never mistaken for a record.

use super::crc::crc32c;
use super::limits::MAX_RECORD_BYTES;

/// Length and checksum.
pub(crate) const FRAME_HEADER_LEN: usize = 8;
/// Sequence number, arrival time, key length.
const BODY_FIXED_LEN: usize = 16 + 8 + 2;
/// No valid body is longer: a larger length field is damage, not a record still being written.
const MAX_BODY_LEN: usize = BODY_FIXED_LEN + MAX_RECORD_BYTES;
/// Partition keys are at most 256 characters of up to 4 UTF-8 bytes.
const MAX_KEY_BYTES: usize = 4 * super::limits::MAX_PARTITION_KEY_CHARS;

/// The encoded size of a record.
pub(crate) fn frame_len(partition_key: &[u8], data: &[u8]) -> usize {
    FRAME_HEADER_LEN + BODY_FIXED_LEN + partition_key.len() + data.len()
}

/// Appends the frame of one record to `out`.
pub(crate) fn encode_frame(
    out: &mut Vec<u8>,
    sequence: u128,
    arrival_ms: i64,
    partition_key: &[u8],
    data: &[u8],
) {
    // Callers checked the record limits, which keep both conversions in range.
    let key_len = u16::try_from(partition_key.len()).expect("partition keys are checked first");
    let body_len = BODY_FIXED_LEN + partition_key.len() + data.len();
    let body_len32 = u32::try_from(body_len).expect("records are checked first");
    let start = out.len();
    out.reserve(FRAME_HEADER_LEN + body_len);
    out.extend_from_slice(&body_len32.to_le_bytes());
    out.extend_from_slice(&[0; 4]);
    out.extend_from_slice(&sequence.to_le_bytes());
    out.extend_from_slice(&arrival_ms.to_le_bytes());
    out.extend_from_slice(&key_len.to_le_bytes());
    out.extend_from_slice(partition_key);
    out.extend_from_slice(data);
    let crc = crc32c(&out[start + FRAME_HEADER_LEN..]);
    out[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
}

/// One decoded record, borrowing the buffer it was read from.
#[derive(Clone, Copy, Debug)]
pub(crate) struct FrameRef<'a> {
    pub(crate) sequence: u128,
    pub(crate) arrival_ms: i64,
    pub(crate) partition_key: &'a [u8],
    pub(crate) data: &'a [u8],
}

/// Where a valid frame's parts lie, without borrowing the buffer (so that a caller can decide
/// to read more into that buffer first).
#[derive(Clone, Copy, Debug)]
pub(crate) struct FrameMeta {
    sequence: u128,
    arrival_ms: i64,
    key_len: usize,
    /// The frame's whole length, header included.
    pub(crate) len: usize,
}

impl FrameMeta {
    /// The record, given the buffer the frame was decoded from (starting at the frame).
    pub(crate) fn view(self, buf: &[u8]) -> FrameRef<'_> {
        let key_start = FRAME_HEADER_LEN + BODY_FIXED_LEN;
        let data_start = key_start + self.key_len;
        FrameRef {
            sequence: self.sequence,
            arrival_ms: self.arrival_ms,
            partition_key: &buf[key_start..data_start],
            data: &buf[data_start..self.len],
        }
    }
}

/// What the bytes at the start of a buffer hold.
#[derive(Clone, Copy, Debug)]
pub(crate) enum Decoded {
    /// A whole, valid frame.
    Frame(FrameMeta),
    /// Not enough bytes yet: the frame needs `needed` bytes in all (at least the header).
    Incomplete { needed: usize },
    /// Damage: a length out of range or a checksum mismatch.
    Corrupt(&'static str),
}

/// Decodes the frame at the start of `buf`.
pub(crate) fn decode_frame(buf: &[u8]) -> Decoded {
    let Some(header) = buf.get(..FRAME_HEADER_LEN) else {
        return Decoded::Incomplete {
            needed: FRAME_HEADER_LEN,
        };
    };
    let body_len = u32::from_le_bytes([header[0], header[1], header[2], header[3]]) as usize;
    if !(BODY_FIXED_LEN..=MAX_BODY_LEN).contains(&body_len) {
        return Decoded::Corrupt("frame length out of range");
    }
    let len = FRAME_HEADER_LEN + body_len;
    let Some(body) = buf.get(FRAME_HEADER_LEN..len) else {
        return Decoded::Incomplete { needed: len };
    };
    let crc = u32::from_le_bytes([header[4], header[5], header[6], header[7]]);
    if crc32c(body) != crc {
        return Decoded::Corrupt("checksum mismatch");
    }
    let sequence = u128::from_le_bytes(body[..16].try_into().expect("16 bytes"));
    let arrival_ms = i64::from_le_bytes(body[16..24].try_into().expect("8 bytes"));
    let key_len = usize::from(u16::from_le_bytes([body[24], body[25]]));
    if key_len > body_len - BODY_FIXED_LEN || key_len > MAX_KEY_BYTES {
        return Decoded::Corrupt("partition key length out of range");
    }
    Decoded::Frame(FrameMeta {
        sequence,
        arrival_ms,
        key_len,
        len,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_report_their_length() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 42, 1_700_000_000_123, b"key", b"payload");
        assert_eq!(buf.len(), frame_len(b"key", b"payload"));
        let Decoded::Frame(meta) = decode_frame(&buf) else {
            panic!("a whole frame")
        };
        assert_eq!(meta.len, buf.len());
        let frame = meta.view(&buf);
        assert_eq!(frame.sequence, 42);
        assert_eq!(frame.arrival_ms, 1_700_000_000_123);
        assert_eq!(frame.partition_key, b"key");
        assert_eq!(frame.data, b"payload");
    }

    #[test]
    fn a_cut_frame_is_incomplete_and_a_flipped_bit_is_corrupt() {
        let mut buf = Vec::new();
        encode_frame(&mut buf, 1, 0, b"k", b"data");
        for cut in 0..buf.len() {
            assert!(
                matches!(decode_frame(&buf[..cut]), Decoded::Incomplete { .. }),
                "cut {cut}"
            );
        }
        let last = buf.len() - 1;
        buf[last] ^= 1;
        assert!(matches!(decode_frame(&buf), Decoded::Corrupt(_)));
    }

    #[test]
    fn a_garbage_length_is_corrupt_not_a_wait_for_gigabytes() {
        let garbage = [0xFFu8; 16];
        assert!(matches!(decode_frame(&garbage), Decoded::Corrupt(_)));
    }
}
