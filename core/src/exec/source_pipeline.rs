//! The decode and watermark loop at the head of a shard's chain: each raw record is decoded,
//! stamped with its event time and its arrival watermark (`protocol::watermark`), and pushed on.

use std::sync::Arc;

use async_trait::async_trait;

use crate::decode::Decoder;
use crate::error::Error;
use crate::operator::{Emit, EpochCx, Ident, RecordCx, ReportFailure};
use crate::position::{EventTime, ShardId};
use crate::protocol::watermark::{is_valid_event_time, WatermarkRules};
use crate::record::RawBatch;
use crate::sink::Held;
use crate::topology::{EventTimeFn, Processed, Quarantined, ShardPipeline};

/// The reason a record with an event time outside the valid range is dead-lettered (no
/// value: the event time may be the payload's).
const INVALID_EVENT_TIME: &str =
    "event time outside the valid range (2^61 ms or more from the Unix epoch)";

pub(crate) struct SourcePipeline<D: Decoder> {
    pub(crate) decoder: Arc<D>,
    pub(crate) event_time: Option<EventTimeFn<D::Item>>,
    pub(crate) rules: WatermarkRules,
    pub(crate) down: Box<dyn Emit<D::Item>>,
    pub(crate) failures: Arc<dyn ReportFailure>,
    /// Records a keyed operator panicked on (`InstanceCx::quarantined`).
    pub(crate) quarantined: Quarantined,
}

#[async_trait]
impl<D: Decoder> ShardPipeline for SourcePipeline<D> {
    fn process(
        &mut self,
        raw: &Arc<RawBatch>,
        from: usize,
        watermark: &mut Option<EventTime>,
    ) -> Processed {
        let mut processed = Processed::default();
        for (index, record) in raw.iter().enumerate().skip(from) {
            // Batches hold at most 4 GiB of records, far fewer than u32::MAX of them.
            let index = index as u32;
            let failed = || RecordCx {
                event_time: record.arrival_ms,
                watermark: watermark.unwrap_or(EventTime::MIN),
                ident: Ident::Record { index, fanout: 0 },
            };
            if let Some(reason) = raw.fault(index as usize) {
                self.failures.fail(&failed(), "source", reason, 0, false);
                continue;
            }
            if let Some(stage) = self.quarantined.get(record.position) {
                let reason = super::user_code::Panic::REASON;
                self.failures.quarantined(&failed(), stage, reason);
                continue;
            }
            let Ok(decoded) = super::user_code::call(|| self.decoder.decode(record)) else {
                let reason = super::user_code::Panic::REASON;
                self.failures.fail(&failed(), "decode", reason, 0, false);
                continue;
            };
            match decoded {
                Ok(value) => {
                    let event_time = match &self.event_time {
                        Some(f) => match super::user_code::call(|| f(&value)) {
                            Ok(t) => t,
                            Err(_) => {
                                let reason = super::user_code::Panic::REASON;
                                self.failures
                                    .fail(&failed(), "event_time", reason, 0, false);
                                continue;
                            }
                        },
                        None => record.arrival_ms,
                    };
                    if !is_valid_event_time(event_time)
                        && !cfg!(shardflow_mutation = "admit_garbage_time")
                    {
                        // A garbage timestamp: a bad record, not a late one.
                        self.failures
                            .fail(&failed(), "event_time", INVALID_EVENT_TIME, 0, false);
                        continue;
                    }
                    let arrival_watermark =
                        self.rules.observe(watermark, event_time, record.arrival_ms);
                    if arrival_watermark == EventTime::MAX {
                        processed.untimely += 1;
                        processed.first_untimely.get_or_insert(index);
                    }
                    let cx = RecordCx {
                        event_time,
                        watermark: arrival_watermark,
                        ident: Ident::Record { index, fanout: 0 },
                    };
                    self.down.emit(&cx, value);
                    if self.failures.parked() {
                        // A user function waits to be called again: the rest of the batch
                        // waits too, so that the shard's records go on in order.
                        processed.parked_after = Some(index as usize);
                        return processed;
                    }
                }
                Err(error) => {
                    let cx = failed();
                    self.failures
                        .fail(&cx, "decode", &error.to_string(), 0, false);
                }
            }
        }
        processed
    }

    fn resume(&mut self) {
        self.down.resume();
    }

    fn rules(&self) -> WatermarkRules {
        self.rules
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
    fn held(&self) -> Vec<(String, ShardId, Held)> {
        let mut out = Vec::new();
        self.down.held(&mut out);
        out
    }
}
