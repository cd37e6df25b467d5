//! Partition keys to 128-bit hash keys (MD5, as Kinesis), and the even split of the hash space.

use md5::{Digest, Md5};

/// The hash key of a partition key: the MD5 of its UTF-8 bytes as a big-endian `u128`, which is
/// how Kinesis maps a partition key to a shard.
pub fn partition_key_hash(partition_key: &str) -> u128 {
    u128::from_be_bytes(Md5::digest(partition_key.as_bytes()).into())
}

/// `count` inclusive ranges that split the 128-bit hash space evenly, in order, as Kinesis
/// `CreateStream` does: shard `i` starts at `i * floor(2^128 / count)`, the last ends at
/// `2^128 - 1`.
///
/// # Panics
/// If `count` is 0 (callers validate it first).
pub(crate) fn even_ranges(count: u32) -> Vec<(u128, u128)> {
    assert!(count > 0, "a stream has at least one shard");
    if count == 1 {
        // floor(2^128 / 1) does not fit in a u128.
        return vec![(0, u128::MAX)];
    }
    let n = u128::from(count);
    // floor(2^128 / n) without overflowing: 2^128 = u128::MAX + 1.
    let width = u128::MAX / n + u128::from(u128::MAX % n == n - 1);
    (0..n)
        .map(|i| {
            let start = i * width;
            let end = if i + 1 == n {
                u128::MAX
            } else {
                (i + 1) * width - 1
            };
            (start, end)
        })
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn hash_is_the_big_endian_md5_of_the_key() {
        // MD5("") = d41d8cd98f00b204e9800998ecf8427e
        assert_eq!(partition_key_hash(""), 0xd41d8cd98f00b204e9800998ecf8427e);
        // MD5("a") = 0cc175b9c0f1b6a831c399e269772661
        assert_eq!(partition_key_hash("a"), 0x0cc175b9c0f1b6a831c399e269772661);
    }

    #[test]
    fn even_ranges_cover_the_hash_space_without_gaps_like_kinesis() {
        for count in [1, 2, 3, 4, 7, 10, 64] {
            let ranges = even_ranges(count);
            assert_eq!(ranges.len(), count as usize);
            assert_eq!(ranges[0].0, 0);
            assert_eq!(ranges.last().unwrap().1, u128::MAX);
            for pair in ranges.windows(2) {
                assert_eq!(
                    pair[0].1 + 1,
                    pair[1].0,
                    "adjacent ranges for {count} shards"
                );
            }
        }
        // Kinesis gives a 4-shard stream these starting hash keys.
        let starts: Vec<u128> = even_ranges(4).iter().map(|r| r.0).collect();
        assert_eq!(
            starts,
            [
                0,
                85_070_591_730_234_615_865_843_651_857_942_052_864,
                170_141_183_460_469_231_731_687_303_715_884_105_728,
                255_211_775_190_703_847_597_530_955_573_826_158_592
            ]
        );
    }
}
