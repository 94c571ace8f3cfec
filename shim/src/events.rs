//! Task events to containerd, from one background thread: publishing never blocks an RPC, and a
//! containerd restart (a dead ttrpc connection) is survived by reconnecting.
use containerd_shim::protos::protobuf::MessageDyn;
use containerd_shim::protos::ttrpc::context;
use containerd_shim::publisher::RemotePublisher;
use std::sync::mpsc;
use std::time::Duration;

const PUBLISH_TIMEOUT: Duration = Duration::from_secs(5);
const RETRIES: usize = 5;

pub struct Event {
    pub topic: &'static str,
    pub body: Box<dyn MessageDyn>,
}

/// The sending end; events are delivered in order.
#[derive(Clone)]
pub struct Events {
    tx: mpsc::Sender<Event>,
}

impl Events {
    /// Starts the publisher thread with a first connection (the crate's).
    pub fn start(first: RemotePublisher, ttrpc_address: String, namespace: String) -> Events {
        let (tx, rx) = mpsc::channel::<Event>();
        let spawned = std::thread::Builder::new().name("shim-events".into()).spawn(move || {
            let mut publisher = Some(first);
            for ev in rx {
                let mut sent = false;
                for attempt in 0..RETRIES {
                    if publisher.is_none() {
                        publisher = RemotePublisher::new(&ttrpc_address)
                            .map_err(|e| tracing::debug!("events: connecting to {ttrpc_address}: {e}"))
                            .ok();
                    }
                    if let Some(p) = &publisher {
                        let ctx = context::with_timeout(PUBLISH_TIMEOUT.as_nanos() as i64);
                        match p.publish(ctx, ev.topic, &namespace, ev.body.clone_box()) {
                            Ok(()) => {
                                sent = true;
                                break;
                            }
                            Err(e) => {
                                tracing::warn!("events: publishing {} (attempt {}): {e}", ev.topic, attempt + 1);
                                publisher = None;
                            }
                        }
                    }
                    std::thread::sleep(Duration::from_millis(200 << attempt.min(4)));
                }
                if !sent {
                    tracing::error!("events: {} dropped after {RETRIES} attempts", ev.topic);
                }
            }
        });
        if let Err(e) = spawned {
            tracing::error!("events: cannot start the publisher thread: {e}");
        }
        Events { tx }
    }

    pub fn publish(&self, topic: &'static str, body: Box<dyn MessageDyn>) {
        if self.tx.send(Event { topic, body }).is_err() {
            tracing::error!("events: the publisher thread is gone; {topic} dropped");
        }
    }
}
