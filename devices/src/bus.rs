//! The interface between the VMM's I/O dispatch and a device.

/// A device reached through x86 port I/O. `offset` is relative to the device's base port.
///
/// Implementations must accept any access width and offset a guest may produce: reads of
/// unknown registers return all ones, writes are ignored. They must never panic.
pub trait PioDevice: Send {
    fn read(&mut self, offset: u16, data: &mut [u8]);
    fn write(&mut self, offset: u16, data: &[u8]);
}
