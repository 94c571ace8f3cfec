//! A minimal i8042 keyboard controller: only what Linux needs to reboot through it
//! (`reboot=k`) and to probe it quickly. Writing 0xfe (pulse reset line) to the command port
//! signals `reset` and the VMM stops the VM.
use crate::bus::PioDevice;
use vmm_sys_util::eventfd::EventFd;

/// Data port 0x60 is offset 0, command/status port 0x64 is offset 4.
pub const I8042_BASE: u16 = 0x60;
pub const I8042_LEN: u16 = 5;

const CMD_RESET_CPU: u8 = 0xfe;
const OFFSET_DATA: u16 = 0;
const OFFSET_COMMAND: u16 = 4;

pub struct I8042 {
    reset: EventFd,
}

impl I8042 {
    pub fn new(reset: EventFd) -> Self {
        I8042 { reset }
    }
}

impl PioDevice for I8042 {
    fn read(&mut self, offset: u16, data: &mut [u8]) {
        // Status 0 (no data, input buffer empty) and data 0 make Linux's probe finish at once.
        let v = match offset {
            OFFSET_DATA | OFFSET_COMMAND => 0,
            _ => 0xff,
        };
        data.fill(v);
    }

    fn write(&mut self, offset: u16, data: &[u8]) {
        if offset == OFFSET_COMMAND && data.first() == Some(&CMD_RESET_CPU) {
            tracing::debug!("i8042: guest pulsed the reset line");
            if let Err(e) = self.reset.write(1) {
                tracing::error!("i8042: cannot signal reset: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reset_command_signals_and_others_do_not() {
        let evt = EventFd::new(libc_nonblock()).unwrap();
        let mut dev = I8042::new(evt.try_clone().unwrap());
        dev.write(OFFSET_DATA, &[CMD_RESET_CPU]);
        dev.write(OFFSET_COMMAND, &[0x20]);
        dev.write(OFFSET_COMMAND, &[]);
        assert!(evt.read().is_err(), "no reset expected yet");
        dev.write(OFFSET_COMMAND, &[CMD_RESET_CPU]);
        assert_eq!(evt.read().unwrap(), 1);
        let mut b = [7u8; 4];
        dev.read(OFFSET_COMMAND, &mut b);
        assert_eq!(b, [0; 4]);
        dev.read(2, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    fn libc_nonblock() -> i32 {
        // EFD_NONBLOCK
        0o4000
    }
}
