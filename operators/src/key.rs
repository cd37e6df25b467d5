//! Grouping keys: hashable values that render into the text of output identities.

use std::hash::Hash;

use compact_str::{CompactString, ToCompactString};
use shardflow_core::sink::KeyId;

/// A type usable as a grouping key. Its text (`key_id`) names outputs (`w/<window>/<key>`), so
/// it must be the same in every run: derive it from the value only.
pub trait Key: Hash + Eq + Clone + Send + Sync + 'static {
    /// The key as text.
    fn key_id(&self) -> KeyId;
}

macro_rules! display_keys {
    ($($t:ty),*) => {$(
        impl Key for $t {
            fn key_id(&self) -> KeyId {
                self.to_compact_string()
            }
        }
    )*};
}

display_keys!(u8, u16, u32, u64, u128, usize, i8, i16, i32, i64, i128, isize, bool, char, String);

impl Key for &'static str {
    fn key_id(&self) -> KeyId {
        CompactString::from(*self)
    }
}

impl<A: Key, B: Key> Key for (A, B) {
    fn key_id(&self) -> KeyId {
        let mut s = self.0.key_id();
        s.push('|');
        s.push_str(&self.1.key_id());
        s
    }
}

impl<A: Key, B: Key, C: Key> Key for (A, B, C) {
    fn key_id(&self) -> KeyId {
        let mut s = (self.0.clone(), self.1.clone()).key_id();
        s.push('|');
        s.push_str(&self.2.key_id());
        s
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_render_as_their_display_text() {
        assert_eq!(42u64.key_id(), "42");
        assert_eq!("campaign-7".to_owned().key_id(), "campaign-7");
        assert_eq!((1u32, "x").key_id(), "1|x");
    }
}
