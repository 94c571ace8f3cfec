//! The 8250 UART on COM1, backed by vm-superio. Output goes to a [`ConsoleWriter`]; the
//! interrupt line is an eventfd the VMM wires to GSI 4 through KVM's irqfd.
use crate::bus::PioDevice;
use std::io::{self, Write};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::Arc;
use vm_superio::Trigger;
use vmm_sys_util::eventfd::EventFd;

pub const COM1_BASE: u16 = 0x3f8;
pub const COM1_LEN: u16 = 8;
pub const COM1_GSI: u32 = 4;

#[derive(Debug, thiserror::Error)]
pub enum SerialError {
    #[error("serial interrupt eventfd: {0}")]
    EventFd(io::Error),
}

/// Raises the UART's interrupt by writing to an eventfd registered as a KVM irqfd.
pub struct EventFdTrigger(EventFd);

impl Trigger for EventFdTrigger {
    type E = io::Error;
    fn trigger(&self) -> io::Result<()> {
        self.0.write(1)
    }
}

/// Line-buffers console output: vm-superio flushes after every byte, and a write syscall per
/// byte would double the cost of each serial exit.
pub struct ConsoleWriter {
    inner: Box<dyn Write + Send>,
    buf: Vec<u8>,
    errors: Arc<AtomicU64>,
}

impl ConsoleWriter {
    pub fn new(inner: Box<dyn Write + Send>) -> Self {
        ConsoleWriter { inner, buf: Vec::with_capacity(256), errors: Arc::new(AtomicU64::new(0)) }
    }

    /// Write errors on the host side are counted, never passed to the guest.
    pub fn errors(&self) -> Arc<AtomicU64> {
        self.errors.clone()
    }

    /// Pushes out a partial last line; the VMM calls it when the VM stops.
    pub fn finish(&mut self) {
        self.push();
    }

    fn push(&mut self) {
        if self.buf.is_empty() {
            return;
        }
        if self.inner.write_all(&self.buf).and_then(|_| self.inner.flush()).is_err() {
            self.errors.fetch_add(1, Ordering::Relaxed);
        }
        self.buf.clear();
    }
}

impl Write for ConsoleWriter {
    fn write(&mut self, data: &[u8]) -> io::Result<usize> {
        self.buf.extend_from_slice(data);
        if data.contains(&b'\n') || self.buf.len() >= 4096 {
            self.push();
        }
        Ok(data.len())
    }

    fn flush(&mut self) -> io::Result<()> {
        Ok(())
    }
}

impl Drop for ConsoleWriter {
    fn drop(&mut self) {
        self.push();
    }
}

pub struct Serial {
    uart: vm_superio::Serial<EventFdTrigger, vm_superio::serial::NoEvents, ConsoleWriter>,
}

impl Serial {
    pub fn new(irq: EventFd, out: ConsoleWriter) -> Self {
        Serial { uart: vm_superio::Serial::new(EventFdTrigger(irq), out) }
    }

    pub fn console(&mut self) -> &mut ConsoleWriter {
        self.uart.writer_mut()
    }

    /// The UART's registers and receive FIFO, for a snapshot.
    pub fn state(&self) -> SerialState {
        let s = self.uart.state();
        SerialState {
            registers: [
                s.baud_divisor_low,
                s.baud_divisor_high,
                s.interrupt_enable,
                s.interrupt_identification,
                s.line_control,
                s.line_status,
                s.modem_control,
                s.modem_status,
                s.scratch,
            ],
            in_buffer: s.in_buffer,
        }
    }

    /// A UART in a saved state, raising `irq` and writing to `out`.
    pub fn from_state(irq: EventFd, out: ConsoleWriter, s: &SerialState) -> Result<Self, String> {
        let [baud_divisor_low, baud_divisor_high, interrupt_enable, interrupt_identification, line_control, line_status, modem_control, modem_status, scratch] =
            s.registers;
        let state = vm_superio::serial::SerialState {
            baud_divisor_low,
            baud_divisor_high,
            interrupt_enable,
            interrupt_identification,
            line_control,
            line_status,
            modem_control,
            modem_status,
            scratch,
            in_buffer: s.in_buffer.clone(),
        };
        let uart = vm_superio::Serial::from_state(&state, EventFdTrigger(irq), vm_superio::serial::NoEvents, out)
            .map_err(|e| format!("serial: {e:?}"))?;
        Ok(Serial { uart })
    }
}

/// The UART in a snapshot: its nine registers (vm-superio's order) and the receive FIFO.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct SerialState {
    pub registers: [u8; 9],
    pub in_buffer: Vec<u8>,
}

impl PioDevice for Serial {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        match (u8::try_from(offset), data.len()) {
            (Ok(off), 1) if offset < COM1_LEN => data[0] = self.uart.read(off),
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if let (Ok(off), [value]) = (u8::try_from(offset), data) {
            if offset < COM1_LEN {
                if let Err(e) = self.uart.write(off, *value) {
                    tracing::debug!("serial: {e:?}");
                }
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Clone, Default)]
    struct Shared(Arc<Mutex<Vec<u8>>>);
    impl Write for Shared {
        fn write(&mut self, d: &[u8]) -> io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(d);
            Ok(d.len())
        }
        fn flush(&mut self) -> io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn bytes_reach_the_console_by_line_and_bad_accesses_are_ignored() {
        let sink = Shared::default();
        let mut s = Serial::new(EventFd::new(0).unwrap(), ConsoleWriter::new(Box::new(sink.clone())));
        for b in b"hi" {
            s.write(0, &[*b]);
        }
        assert!(sink.0.lock().unwrap().is_empty(), "partial line stays buffered");
        s.write(0, b"\n");
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\n");
        // Wide or out-of-range accesses from a guest: no panic, reads give all ones.
        s.write(0, &[1, 2, 3, 4]);
        s.write(0xffff, &[1]);
        let mut four = [0u8; 4];
        s.read(0, &mut four);
        assert_eq!(four, [0xff; 4]);
        let mut one = [0u8; 1];
        s.read(9, &mut one);
        assert_eq!(one, [0xff]);
        s.write(0, b"x");
        s.console().finish();
        assert_eq!(&*sink.0.lock().unwrap(), b"hi\nx");
    }
}
