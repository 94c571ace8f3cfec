//! Legacy PC devices.
pub mod i8042;
pub mod serial;

pub use i8042::{I8042, I8042_BASE, I8042_LEN};
pub use serial::{ConsoleWriter, Serial, SerialError, COM1_BASE, COM1_GSI, COM1_LEN};
