//! What a refused conditional write means: this writer's own earlier try, whose reply was lost,
//! or another writer's object, which fences this one.
//!
//! Every object the sink stores carries a `write-id` unique to that store call. S3 refuses a
//! write whose condition (no object; the object with the ETag read) no longer holds. If the
//! refused write was a retry, its first try may have landed: then the object now stored
//! carries this call's write id, and the write is done. Anything else at the key was written by
//! someone else since this writer looked, and the writer stops like a fenced one: its shard
//! restarts from the checkpoint and conforms to what is stored.

use std::collections::HashMap;

/// The metadata key of the id that names one store call.
pub(crate) const WRITE_ID: &str = "write-id";

/// A fresh write id.
pub(crate) fn new_write_id() -> String {
    format!(
        "{:016x}{:016x}",
        rand::random::<u64>(),
        rand::random::<u64>()
    )
}

/// The reading of a refused write.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub(crate) enum Refusal {
    /// The object stored is this call's own: an earlier try landed and its reply was lost.
    OwnEarlierTry,
    /// Another writer changed the key since this writer read it (or removed the object).
    Overtaken,
}

/// Reads a refusal of the write `write_id` from the metadata now stored at the key (`None`:
/// no object).
pub(crate) fn judge_refusal(write_id: &str, now: Option<&HashMap<String, String>>) -> Refusal {
    match now.and_then(|m| m.get(WRITE_ID)) {
        Some(stored) if stored == write_id => Refusal::OwnEarlierTry,
        _ => Refusal::Overtaken,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn metadata(id: &str) -> HashMap<String, String> {
        [(WRITE_ID.to_owned(), id.to_owned())].into()
    }

    #[test]
    fn only_an_object_with_the_same_write_id_is_the_writers_own() {
        let id = new_write_id();
        assert_eq!(
            judge_refusal(&id, Some(&metadata(&id))),
            Refusal::OwnEarlierTry
        );
        assert_eq!(
            judge_refusal(&id, Some(&metadata(&new_write_id()))),
            Refusal::Overtaken
        );
        assert_eq!(
            judge_refusal(&id, Some(&HashMap::new())),
            Refusal::Overtaken,
            "an object without a write id is another writer's"
        );
        assert_eq!(judge_refusal(&id, None), Refusal::Overtaken);
    }

    #[test]
    fn write_ids_differ_between_calls() {
        assert_ne!(new_write_id(), new_write_id());
        assert_eq!(new_write_id().len(), 32);
    }
}
