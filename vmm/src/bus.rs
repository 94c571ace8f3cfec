//! Dispatch of port-I/O exits to devices by address: [`shoji_devices::bus::PioBus`] (in the
//! device crate so its fuzz target drives the same code).
pub use shoji_devices::bus::{BusOverlap, PioBus};
