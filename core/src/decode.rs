//! Decoders from raw payloads to typed records (JSON, bincode, raw bytes, a function), and the
//! typed source a topology starts from.

use std::marker::PhantomData;
use std::sync::Arc;

use serde::de::DeserializeOwned;

use crate::error::DecodeError;
use crate::record::RawRecord;
use crate::source::Source;

/// Turns one raw record into a typed value. A failure goes to the dead-letter policy.
pub trait Decoder: Send + Sync + 'static {
    /// The decoded type.
    type Item: Send + 'static;
    /// Decodes one record.
    fn decode(&self, record: RawRecord<'_>) -> Result<Self::Item, DecodeError>;
}

/// JSON via serde_json.
pub struct Json<T>(PhantomData<fn() -> T>);

impl<T> Default for Json<T> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T: DeserializeOwned + Send + 'static> Decoder for Json<T> {
    type Item = T;
    fn decode(&self, record: RawRecord<'_>) -> Result<T, DecodeError> {
        serde_json::from_slice(record.data).map_err(|e| DecodeError {
            format: "json",
            message: crate::redact::without_values(&e.to_string()),
        })
    }
}

/// bincode (1.x, default options).
pub struct Bincode<T>(PhantomData<fn() -> T>);

impl<T> Default for Bincode<T> {
    fn default() -> Self {
        Self(PhantomData)
    }
}

impl<T: DeserializeOwned + Send + 'static> Decoder for Bincode<T> {
    type Item = T;
    fn decode(&self, record: RawRecord<'_>) -> Result<T, DecodeError> {
        bincode::deserialize(record.data).map_err(|e| DecodeError {
            format: "bincode",
            message: crate::redact::without_values(&e.to_string()),
        })
    }
}

/// The payload bytes as they are.
#[derive(Default)]
pub struct RawBytes;

impl Decoder for RawBytes {
    type Item = Vec<u8>;
    fn decode(&self, record: RawRecord<'_>) -> Result<Vec<u8>, DecodeError> {
        Ok(record.data.to_vec())
    }
}

/// A user-supplied decoding function.
pub struct DecodeFn<F>(F);

impl<T, F> Decoder for DecodeFn<F>
where
    T: Send + 'static,
    F: Fn(RawRecord<'_>) -> Result<T, DecodeError> + Send + Sync + 'static,
{
    type Item = T;
    fn decode(&self, record: RawRecord<'_>) -> Result<T, DecodeError> {
        (self.0)(record)
    }
}

/// A source together with the decoder of its records: what `Topology::builder(..).source(..)`
/// takes. Build one with the [`SourceExt`] methods: `LocalSource::new(&stream).json::<Click>()`.
pub struct Decoded<S, D> {
    pub(crate) source: Arc<S>,
    pub(crate) decoder: Arc<D>,
}

impl<S, D> Decoded<S, D> {
    /// The source.
    pub fn source(&self) -> &S {
        &self.source
    }
}

/// Attaches a decoder to a source.
pub trait SourceExt: Source + Sized {
    /// Records are JSON documents of type `T`.
    fn json<T: DeserializeOwned + Send + 'static>(self) -> Decoded<Self, Json<T>> {
        self.decode_with(Json::default())
    }

    /// Records are bincode-encoded values of type `T`.
    fn bincode<T: DeserializeOwned + Send + 'static>(self) -> Decoded<Self, Bincode<T>> {
        self.decode_with(Bincode::default())
    }

    /// Records stay raw bytes.
    fn raw(self) -> Decoded<Self, RawBytes> {
        self.decode_with(RawBytes)
    }

    /// Records are decoded by `decoder`.
    fn decode_with<D: Decoder>(self, decoder: D) -> Decoded<Self, D> {
        Decoded {
            source: Arc::new(self),
            decoder: Arc::new(decoder),
        }
    }

    /// Records are decoded by a function.
    fn decode_fn<T, F>(self, f: F) -> Decoded<Self, DecodeFn<F>>
    where
        T: Send + 'static,
        F: Fn(RawRecord<'_>) -> Result<T, DecodeError> + Send + Sync + 'static,
    {
        self.decode_with(DecodeFn(f))
    }
}

impl<S: Source> SourceExt for S {}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::position::{RecordPosition, SequenceNumber};

    fn record(data: &[u8]) -> (RecordPosition, Vec<u8>) {
        (
            RecordPosition::new(SequenceNumber::from_u128(1)),
            data.to_vec(),
        )
    }

    #[test]
    fn json_decoder_reports_the_parse_error() {
        let (pos, data) = record(b"{\"a\": 1");
        let raw = RawRecord {
            position: &pos,
            arrival_ms: 0,
            partition_key: b"k",
            data: &data,
        };
        let err = Json::<serde_json::Value>::default()
            .decode(raw)
            .unwrap_err();
        assert_eq!(err.format, "json");
        assert!(err.message.contains("EOF"), "{}", err.message);
    }

    #[test]
    fn bincode_decoder_round_trips() {
        let data = bincode::serialize(&(7u32, "x".to_owned())).unwrap();
        let pos = RecordPosition::new(SequenceNumber::from_u128(1));
        let raw = RawRecord {
            position: &pos,
            arrival_ms: 0,
            partition_key: b"k",
            data: &data,
        };
        let got: (u32, String) = Bincode::default().decode(raw).unwrap();
        assert_eq!(got, (7, "x".to_owned()));
    }
}
