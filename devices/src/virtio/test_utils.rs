//! Shared by the device tests: an interrupt recorder and the descriptor flag shorthands.
use super::Interrupt;
use virtio_bindings::bindings::virtio_ring::{VRING_DESC_F_NEXT, VRING_DESC_F_WRITE};

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
