//! The Kinesis record limits the local stream enforces, and the check of one record.

use super::error::LocalStreamError;

/// Partition keys are 1 to 256 Unicode characters (Kinesis `PutRecord` API reference,
/// `PartitionKey`).
pub const MAX_PARTITION_KEY_CHARS: usize = 256;

/// Data plus partition key of one record is at most 1 MiB (Kinesis quotas: "the maximum size of
/// a data blob (the data payload before base64-encoding) ... is 1 MiB", counted with the key).
pub const MAX_RECORD_BYTES: usize = 1024 * 1024;

/// Checks record `index` of a batch for `stream`; never truncates, only rejects.
pub(crate) fn check_record(
    stream: &str,
    index: usize,
    partition_key: &str,
    data: &[u8],
) -> Result<(), LocalStreamError> {
    // Count characters only when the byte length leaves doubt: a key of at most 256 bytes has
    // at most 256 characters.
    let chars = if partition_key.len() <= MAX_PARTITION_KEY_CHARS {
        if partition_key.is_empty() {
            0
        } else {
            1
        }
    } else {
        partition_key.chars().count()
    };
    if chars == 0 || chars > MAX_PARTITION_KEY_CHARS {
        return Err(LocalStreamError::InvalidPartitionKey {
            stream: stream.to_owned(),
            index,
            chars,
        });
    }
    let bytes = partition_key.len() + data.len();
    if bytes > MAX_RECORD_BYTES {
        return Err(LocalStreamError::RecordTooLarge {
            stream: stream.to_owned(),
            index,
            bytes,
        });
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_of_1_to_256_characters_pass_even_when_multibyte() {
        assert!(check_record("s", 0, "k", b"").is_ok());
        assert!(check_record("s", 0, &"é".repeat(256), b"").is_ok());
        assert!(matches!(
            check_record("s", 3, &"é".repeat(257), b""),
            Err(LocalStreamError::InvalidPartitionKey {
                index: 3,
                chars: 257,
                ..
            })
        ));
        assert!(matches!(
            check_record("s", 0, "", b"x"),
            Err(LocalStreamError::InvalidPartitionKey { chars: 0, .. })
        ));
    }

    #[test]
    fn data_and_key_together_are_limited_to_one_mebibyte() {
        let data = vec![0u8; MAX_RECORD_BYTES - 1];
        assert!(check_record("s", 0, "k", &data).is_ok());
        let err = check_record("s", 0, "kk", &data).unwrap_err();
        assert!(
            matches!(err, LocalStreamError::RecordTooLarge { bytes, .. } if bytes == MAX_RECORD_BYTES + 1)
        );
    }
}
