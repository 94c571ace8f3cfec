//! Shared by the device tests: an interrupt recorder, the descriptor flag shorthands and the
//! chain builder.
use super::Interrupt;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};

pub const WRITE: u16 = VRING_DESC_F_WRITE as u16;
pub const NEXT: u16 = VRING_DESC_F_NEXT as u16;

/// Records which queues a device signalled.
#[derive(Default)]
pub struct Irqs(pub Vec<u16>);

impl Interrupt for Irqs {
    fn queue(&mut self, q: u16) {
        self.0.push(q)
    }
    fn config(&mut self) {}
}

/// `descs` as one chain at table index `base`: NEXT set on all but the last, each pointing at
/// the following index (for `MockSplitQueue::add_desc_chains(&chain, base)`).
pub fn chained(descs: &[RawDescriptor], base: u16) -> Vec<RawDescriptor> {
    descs
        .iter()
        .enumerate()
        .map(|(i, d)| {
            let d = SplitDescriptor::from(*d);
            let last = i + 1 == descs.len();
            let flags = if last { d.flags() & !NEXT } else { d.flags() | NEXT };
            RawDescriptor::from(SplitDescriptor::new(d.addr().0, d.len(), flags, base + i as u16 + 1))
        })
        .collect()
}
