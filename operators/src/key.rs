//! Grouping keys: hashable values that render into the text of output identities.

use std::hash::Hash;

use compact_str::{format_compact, ToCompactString};
use serde::de::DeserializeOwned;
use serde::Serialize;
use shardflow_core::sink::KeyId;

/// A type usable as a grouping key. Its text (`key_id`) names outputs (`w/<window>/<key>`), so
/// it must be the same in every run: derive it from the value only. Keys are serde types, so
/// that keyed state can be snapshotted (`StatePolicy::Snapshot`): use `String` where a
/// `&'static str` comes to mind.
pub trait Key: Hash + Eq + Clone + Send + Sync + Serialize + DeserializeOwned + 'static {
    /// The key as text.
    fn key_id(&self) -> KeyId;
}

macro_rules! integer_keys {
    ($make:ident, $as:ty: $($t:ty),*) => {$(
        impl Key for $t {
            fn key_id(&self) -> KeyId {
                KeyId::$make(<$as>::from(*self))
            }
        }
    )*};
}

integer_keys!(unsigned, u64: u8, u16, u32, u64);
integer_keys!(signed, i64: i8, i16, i32, i64);

macro_rules! text_keys {
    ($($t:ty),*) => {$(
        impl Key for $t {
            fn key_id(&self) -> KeyId {
                KeyId::text(self.to_compact_string())
            }
        }
    )*};
}

text_keys!(u128, usize, i128, isize, bool, char, String);

impl<A: Key, B: Key> Key for (A, B) {
    fn key_id(&self) -> KeyId {
        KeyId::text(format_compact!("{}|{}", self.0.key_id(), self.1.key_id()))
    }
}

impl<A: Key, B: Key, C: Key> Key for (A, B, C) {
    fn key_id(&self) -> KeyId {
        KeyId::text(format_compact!(
            "{}|{}|{}",
            self.0.key_id(),
            self.1.key_id(),
            self.2.key_id()
        ))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn keys_render_as_their_display_text() {
        assert_eq!(42u64.key_id(), KeyId::unsigned(42));
        assert_eq!(42u64.key_id().to_string(), "42");
        assert_eq!((-3i32).key_id().to_string(), "-3");
        assert_eq!("campaign-7".to_owned().key_id(), KeyId::text("campaign-7"));
        assert_eq!((1u32, "x".to_owned()).key_id(), KeyId::text("1|x"));
    }
}
