//! The decode and watermark loop at the head of a shard's chain: each raw record is decoded,
//! stamped with its event time and the shard's watermark at its arrival, and pushed on.

use std::sync::Arc;

use async_trait::async_trait;

use crate::decode::Decoder;
use crate::error::Error;
use crate::operator::{Emit, EpochCx, Ident, RecordCx, ReportFailure, NO_WATERMARK};
use crate::position::{EventTime, ShardId};
use crate::record::RawBatch;
use crate::sink::Held;
use crate::topology::{EventTimeFn, ShardPipeline};

pub(crate) struct SourcePipeline<D: Decoder> {
    pub(crate) decoder: Arc<D>,
    pub(crate) event_time: Option<EventTimeFn<D::Item>>,
    pub(crate) bound_ms: i64,
    pub(crate) down: Box<dyn Emit<D::Item>>,
    pub(crate) failures: Arc<dyn ReportFailure>,
}

#[async_trait]
impl<D: Decoder> ShardPipeline for SourcePipeline<D> {
    fn process(&mut self, raw: &Arc<RawBatch>, max_event_time: &mut Option<EventTime>) {
        // Plain locals in the loop; the Option is only the interface.
        let (mut seen, mut max) = (
            max_event_time.is_some(),
            max_event_time.unwrap_or(EventTime::MIN),
        );
        for (index, record) in raw.iter().enumerate() {
            // Batches hold at most 4 GiB of records, far fewer than u32::MAX of them.
            let index = index as u32;
            let watermark = if seen {
                max.saturating_sub(self.bound_ms)
            } else {
                NO_WATERMARK
            };
            if let Some(reason) = raw.fault(index as usize) {
                let cx = RecordCx {
                    event_time: record.arrival_ms,
                    watermark,
                    ident: Ident::Record { index, fanout: 0 },
                };
                self.failures.fail(&cx, "source", reason, 0, false);
                continue;
            }
            match self.decoder.decode(record) {
                Ok(value) => {
                    let event_time = match &self.event_time {
                        Some(f) => f(&value),
                        None => record.arrival_ms,
                    };
                    max = if seen {
                        max.max(event_time)
                    } else {
                        event_time
                    };
                    seen = true;
                    let cx = RecordCx {
                        event_time,
                        watermark,
                        ident: Ident::Record { index, fanout: 0 },
                    };
                    self.down.emit(&cx, value);
                }
                Err(error) => {
                    let cx = RecordCx {
                        event_time: record.arrival_ms,
                        watermark,
                        ident: Ident::Record { index, fanout: 0 },
                    };
                    self.failures
                        .fail(&cx, "decode", &error.to_string(), 0, false);
                }
            }
        }
        if seen {
            *max_event_time = Some(max);
        }
    }

    fn out_of_orderness_ms(&self) -> i64 {
        self.bound_ms
    }

    async fn flush(&mut self, epoch: &EpochCx) -> Result<(), Error> {
        self.down.flush(epoch).await
    }

    async fn commit(&mut self) -> Result<(), Error> {
        self.down.commit().await
    }

    fn discard(&mut self) {
        self.down.discard();
    }
    fn held(&self) -> Vec<(ShardId, Held)> {
        let mut out = Vec::new();
        self.down.held(&mut out);
        out
    }
}
