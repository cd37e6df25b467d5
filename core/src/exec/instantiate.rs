//! How each declared stage becomes a running one: the executor's side of the interfaces that
//! `topology/` declares (`Instantiate`, `FanOut`, `InstantiateRoot`, `InstantiateBranch`).

use std::any::Any;
use std::hash::Hash;
use std::sync::Arc;

use tokio::sync::mpsc;
use tokio::task::JoinSet;

use crate::decode::Decoder;
use crate::error::Error;
use crate::operator::{Emit, Fan, KeyedOperator, Stateless};
use crate::protocol::watermark::WatermarkRules;
use crate::sink::SinkContext;
use crate::topology::{
    label_of, lock, ExchangeDecl, FallibleDecl, FanOut, InstanceCx, Instantiate, InstantiateBranch,
    InstantiateRoot, KeyedBranchDecl, Node, ShardPipeline, SinkDecl, SourceDecl, StatelessDecl,
    TeeDecl, WorkerCx,
};

use super::chain::{Discard, OperatorCounts, StatelessNode, Tee};
use super::exchange::{exchange, record_pool, Exchange, ExchangeEmitter};
use super::fallible::FallibleNode;
use super::keyed_worker::KeyedWorker;
use super::sink_emitter::SinkEmitter;
use super::source_pipeline::SourcePipeline;

impl<T: Send + 'static> Node<T> {
    /// The running chain below this node for one pipeline instance.
    pub(crate) fn instantiate(&self, cx: &InstanceCx) -> Box<dyn Emit<T>> {
        let consumers = lock(&self.consumers);
        match consumers.len() {
            0 => Box::new(Discard),
            1 => consumers[0].instantiate(cx),
            _ => {
                // Only `Stream::clone` adds a second consumer, and it declares the fan-out.
                let fan_out = lock(&self.fan_out)
                    .clone()
                    .expect("a stream with several consumers was cloned");
                fan_out.fan_out(consumers.iter().map(|c| c.instantiate(cx)).collect())
            }
        }
    }
}

impl<T: Clone + Send + 'static> FanOut<T> for TeeDecl {
    fn fan_out(&self, outs: Vec<Box<dyn Emit<T>>>) -> Box<dyn Emit<T>> {
        Box::new(Tee { outs })
    }
}

impl<T, U, O, M> Instantiate<T> for StatelessDecl<U, M>
where
    T: Send + 'static,
    U: Send + 'static,
    O: Stateless<T, U>,
    M: Fn() -> O + Send + Sync + 'static,
{
    fn instantiate(&self, cx: &InstanceCx) -> Box<dyn Emit<T>> {
        let fan = if self.fans_out {
            Fan::Numbered {
                bits: cx.fanout_bits,
            }
        } else {
            Fan::One
        };
        Box::new(StatelessNode {
            op: (self.make)(),
            fan,
            down: self.down.instantiate(cx),
            failures: cx.failures.clone(),
            counts: OperatorCounts::new(label_of(&self.label), cx),
        })
    }
}

impl<T, U, F, M> Instantiate<T> for FallibleDecl<U, M>
where
    T: Send + 'static,
    U: Send + 'static,
    F: FnMut(&T) -> Result<U, String> + Send + 'static,
    M: Fn() -> F + Send + Sync + 'static,
{
    fn instantiate(&self, cx: &InstanceCx) -> Box<dyn Emit<T>> {
        Box::new(FallibleNode::new(
            (self.make)(),
            self.stage,
            self.down.instantiate(cx),
            cx.failures
                .clone()
                .expect("fallible operators run only before key_by, on a shard's path"),
            OperatorCounts::new(label_of(&self.label), cx),
        ))
    }
}

impl<T: Send + 'static> Instantiate<T> for SinkDecl<T> {
    fn instantiate(&self, cx: &InstanceCx) -> Box<dyn Emit<T>> {
        let sink_cx = SinkContext {
            topology: cx.topology.clone(),
            instance: cx.instance.clone(),
        };
        let emitter = SinkEmitter::new(
            Arc::clone(&self.sink),
            sink_cx,
            cx.metrics.clone(),
            cx.random.clone(),
        )
        .with_failures(cx.failures.clone());
        let emitter = match &cx.resumed {
            // On a shard's own path, a sink that holds record outputs resumes exactly after
            // its last stored unit.
            Some(resumed) => emitter.on_shard_path(
                self.sink.holds_record_outputs().then(|| {
                    resumed
                        .sinks
                        .get(self.sink.name())
                        .unwrap_or(&resumed.committed)
                        .clone()
                }),
                cx.guard.clone(),
            ),
            None => emitter,
        };
        Box::new(emitter)
    }
}

impl<T, K, F> Instantiate<T> for ExchangeDecl<K, F>
where
    T: Send + 'static,
    K: Hash + Send + 'static,
    F: Fn(&T) -> K + Clone + Send + Sync + 'static,
{
    fn instantiate(&self, cx: &InstanceCx) -> Box<dyn Emit<T>> {
        Box::new(ExchangeEmitter::new(
            self.key_fn.clone(),
            exchange::<K, T>(&cx.exchanges, self.branch),
            cx.failures.clone(),
        ))
    }
}

impl<D: Decoder> InstantiateRoot for SourceDecl<D> {
    fn instantiate(&self, cx: &InstanceCx) -> Box<dyn ShardPipeline> {
        let millis = |d: std::time::Duration| i64::try_from(d.as_millis()).unwrap_or(i64::MAX);
        Box::new(SourcePipeline {
            decoder: Arc::clone(&self.decoder),
            event_time: lock(&self.settings.event_time).clone(),
            rules: WatermarkRules {
                out_of_orderness_ms: millis(*lock(&self.settings.out_of_orderness)),
                max_skew_ms: millis(*lock(&self.settings.max_skew)),
                idleness: *lock(&self.settings.idleness),
            },
            down: self.node.instantiate(cx),
            quarantined: Arc::clone(&cx.quarantined),
            failures: cx
                .failures
                .clone()
                .expect("a shard pipeline has its dead-letter policy"),
        })
    }
}

impl<Op, M> InstantiateBranch for KeyedBranchDecl<Op, M>
where
    Op: KeyedOperator,
    Op::Key: Hash + Eq,
    M: Fn() -> Op + Send + Sync + 'static,
{
    fn spawn(
        &self,
        n: usize,
        first_path: usize,
        cx: &WorkerCx,
        tasks: &mut JoinSet<Result<(), Error>>,
    ) -> Box<dyn Any + Send + Sync> {
        let mut senders = Vec::with_capacity(n);
        let pool = record_pool(n);
        for worker in 0..n {
            let (tx, rx) = mpsc::channel(cx.capacity);
            senders.push(tx);
            let path = first_path + worker;
            let instance = InstanceCx {
                topology: cx.topology.clone(),
                instance: format!("worker-{path}"),
                failures: None,
                exchanges: Arc::new(Vec::new()),
                metrics: cx.metrics.clone(),
                random: cx.random.clone(),
                fanout_bits: cx.fanout_bits,
                resumed: None,
                guard: None,
                quarantined: Arc::default(),
            };
            let worker = KeyedWorker {
                op: (self.make_op)(),
                main: self.main.instantiate(&instance),
                late: self.late.instantiate(&instance),
                letters: cx.dead_letter.sink().map(|sink| {
                    let cx = SinkContext {
                        topology: cx.topology.clone(),
                        instance: format!("dead-letters-worker-{path}"),
                    };
                    SinkEmitter::new(
                        Arc::clone(sink),
                        cx,
                        instance.metrics.clone(),
                        instance.random.clone(),
                    )
                }),
                stream: cx.stream.clone(),
                label: label_of(&self.label),
                tracker: cx.tracker.clone(),
                pool: Arc::clone(&pool),
                path,
                commit_interval: cx.commit_interval,
                metrics: cx.metrics.clone(),
                topology: cx.topology.clone(),
                state_store: cx.state_store.clone(),
                worker,
                workers: n,
                _key: std::marker::PhantomData,
            };
            tasks.spawn(worker.run(rx));
        }
        Box::new(Exchange { senders, pool })
    }

    fn label(&self) -> Arc<str> {
        label_of(&self.label)
    }

    fn snapshots(&self) -> bool {
        Op::SNAPSHOTS
    }
}
