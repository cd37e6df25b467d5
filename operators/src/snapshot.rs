//! The snapshot part format of the built-in keyed operators: bincode of a versioned header
//! (format, operator kind) and the operator's entries, read with a size limit so a corrupt
//! part is an error, never an allocation the size of a bogus length.

use bincode::Options;
use serde::de::DeserializeOwned;
use serde::Serialize;

/// The part format this version writes and reads.
const FORMAT: u8 = 1;

#[derive(Serialize)]
struct Header<'a, T> {
    format: u8,
    kind: &'a str,
    body: T,
}

fn options() -> impl Options {
    bincode::DefaultOptions::new()
}

/// Encodes `body` as a part of an operator of `kind`.
pub(crate) fn encode<T: Serialize>(kind: &str, body: &T) -> Result<Vec<u8>, String> {
    let header = Header {
        format: FORMAT,
        kind,
        body,
    };
    options()
        .serialize(&header)
        .map_err(|e| format!("cannot serialize the state of a {kind} operator: {e}"))
}

/// Decodes a part written by [`encode`] for an operator of `kind`: the header first, so that
/// a part of another kind or format says so instead of failing somewhere in its body.
pub(crate) fn decode<T: DeserializeOwned>(kind: &str, bytes: &[u8]) -> Result<T, String> {
    let limit = u64::try_from(bytes.len()).unwrap_or(u64::MAX);
    let unreadable = |e: bincode::Error| {
        format!(
            "not a readable {kind} snapshot part ({} bytes): {}",
            bytes.len(),
            category(&e)
        )
    };
    let mut reader = bytes;
    let (format, written_kind): (u8, String) = options()
        .with_limit(limit)
        .deserialize_from(&mut reader)
        .map_err(unreadable)?;
    if format != FORMAT {
        return Err(format!(
            "snapshot part format {format} (this version reads {FORMAT})"
        ));
    }
    if written_kind != kind {
        return Err(format!(
            "the part holds the state of a {written_kind} operator, not of a {kind} one"
        ));
    }
    let body = options()
        .with_limit(limit)
        .deserialize_from(&mut reader)
        .map_err(unreadable)?;
    if !reader.is_empty() {
        return Err(format!(
            "not a readable {kind} snapshot part ({} bytes): {} bytes after its end",
            bytes.len(),
            reader.len()
        ));
    }
    Ok(body)
}

/// What kind of decoding error `e` is, without its message: serde's messages may quote the
/// values they could not read (state holds keys and values of records).
fn category(e: &bincode::Error) -> &'static str {
    match &**e {
        bincode::ErrorKind::Io(_) => "it ends early",
        bincode::ErrorKind::SizeLimit => "a length beyond its size",
        bincode::ErrorKind::InvalidUtf8Encoding(_)
        | bincode::ErrorKind::InvalidBoolEncoding(_)
        | bincode::ErrorKind::InvalidCharEncoding
        | bincode::ErrorKind::InvalidTagEncoding(_) => "an invalid encoding",
        bincode::ErrorKind::Custom(_) => "a value its type refuses",
        _ => "an unsupported encoding",
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_part_reads_back_and_refuses_another_kind_or_garbage() {
        let bytes = encode("running", &vec![(1u64, 2u64), (3, 4)]).unwrap();
        assert_eq!(
            decode::<Vec<(u64, u64)>>("running", &bytes).unwrap(),
            vec![(1, 2), (3, 4)]
        );
        let wrong = decode::<Vec<(u64, u64)>>("fixed", &bytes).unwrap_err();
        assert!(wrong.contains("running"), "{wrong}");
        let mut corrupt = bytes.clone();
        corrupt.truncate(bytes.len() - 1);
        assert!(decode::<Vec<(u64, u64)>>("running", &corrupt).is_err());
        // A string that is not UTF-8: the error names the kind of fault, not the bytes.
        let text = encode("running", &vec![("secret-value".to_owned(), 1u64)]).unwrap();
        let mut bad = text;
        let at = bad.windows(6).position(|w| w == b"secret").unwrap();
        bad[at] = 0xff;
        let error = decode::<Vec<(String, u64)>>("running", &bad).unwrap_err();
        assert!(!error.contains("ecret"), "{error}");
        // A length that claims billions of entries fails on the limit, without allocating.
        let huge = encode("running", &(u64::MAX / 2)).unwrap();
        assert!(decode::<Vec<(u64, u64)>>("running", &huge).is_err());
    }
}
