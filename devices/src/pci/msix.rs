//! MSI-X: the capability, the vector table and the pending-bit array. The table lives in a BAR
//! the guest writes freely; every access is byte-granular and bounds-checked. Routing changes
//! and interrupts go through [`MsiInterrupts`], which the VMM backs with KVM GSI routes and
//! irqfds (so this crate stays KVM-free).
use std::sync::Arc;

pub const CAP_ID_MSIX: u8 = 0x11;
pub const ENTRY_SIZE: usize = 16;
const CTRL_ENABLE: u16 = 1 << 15;
const CTRL_FUNCTION_MASK: u16 = 1 << 14;
const VECTOR_MASKED: u32 = 1;
/// Spec limit: 2048 vectors per function.
pub const MAX_VECTORS: u16 = 2048;

/// Where an MSI goes, as the guest programmed it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MsiMessage {
    pub addr: u64,
    pub data: u32,
}

/// The VMM's side of MSI delivery.
pub trait MsiInterrupts: Send + Sync {
    /// Vector `vector` may now fire to `msg`, or (None) must not fire.
    fn set_route(&self, vector: u16, msg: Option<MsiMessage>);
    /// Deliver `vector`; called only while it is routed and unmasked.
    fn fire(&self, vector: u16);
}

/// What a snapshot keeps of MSI-X: the table and PBA as the guest left them, and the control bits.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct MsixState {
    pub table: Vec<u8>,
    pub pba: Vec<u8>,
    pub enabled: bool,
    pub function_masked: bool,
}

pub struct Msix {
    table: Vec<u8>,
    pba: Vec<u8>,
    routes: Vec<Option<MsiMessage>>,
    enabled: bool,
    function_masked: bool,
    irq: Arc<dyn MsiInterrupts>,
}

impl Msix {
    /// `vectors` in 1..=2048; all start masked, as the spec requires.
    pub fn new(vectors: u16, irq: Arc<dyn MsiInterrupts>) -> Self {
        let n = usize::from(vectors.clamp(1, MAX_VECTORS));
        let mut table = vec![0u8; n * ENTRY_SIZE];
        for e in table.chunks_mut(ENTRY_SIZE) {
            e[12..16].copy_from_slice(&VECTOR_MASKED.to_le_bytes());
        }
        Msix {
            table,
            pba: vec![0; n.div_ceil(64) * 8],
            routes: vec![None; n],
            enabled: false,
            function_masked: false,
            irq,
        }
    }

    pub fn vectors(&self) -> u16 {
        self.routes.len() as u16
    }
    pub fn table_size(&self) -> usize {
        self.table.len()
    }
    pub fn pba_size(&self) -> usize {
        self.pba.len()
    }

    /// The capability body (after ID/next) and its writable mask: only the enable and
    /// function-mask bits of Message Control.
    pub fn capability(&self, bar: u8, table_offset: u32, pba_offset: u32) -> ([u8; 10], [u8; 2]) {
        let mut b = [0u8; 10];
        b[0..2].copy_from_slice(&(self.vectors() - 1).to_le_bytes());
        b[2..6].copy_from_slice(&(table_offset | u32::from(bar & 7)).to_le_bytes());
        b[6..10].copy_from_slice(&(pba_offset | u32::from(bar & 7)).to_le_bytes());
        (b, [0x00, 0xc0])
    }

    /// Applies a new Message Control value from config space.
    pub fn set_control(&mut self, control: u16) {
        let enabled = control & CTRL_ENABLE != 0;
        let masked = control & CTRL_FUNCTION_MASK != 0;
        if (enabled, masked) == (self.enabled, self.function_masked) {
            return;
        }
        self.enabled = enabled;
        self.function_masked = masked;
        for v in 0..self.vectors() {
            self.refresh(v);
        }
    }

    pub fn enabled(&self) -> bool {
        self.enabled
    }

    fn entry_u32(&self, v: u16, field: usize) -> u32 {
        let o = usize::from(v) * ENTRY_SIZE + field;
        u32::from_le_bytes(self.table[o..o + 4].try_into().unwrap_or([0; 4]))
    }

    fn vector_masked(&self, v: u16) -> bool {
        self.entry_u32(v, 12) & VECTOR_MASKED != 0
    }

    fn pending(&self, v: u16) -> bool {
        self.pba[usize::from(v) / 8] & (1 << (v % 8)) != 0
    }

    fn set_pending(&mut self, v: u16, on: bool) {
        let (i, bit) = (usize::from(v) / 8, 1u8 << (v % 8));
        if on {
            self.pba[i] |= bit
        } else {
            self.pba[i] &= !bit
        }
    }

    /// Re-derives vector `v`'s route and delivers a pending interrupt it may now send.
    fn refresh(&mut self, v: u16) {
        let route = (self.enabled && !self.vector_masked(v)).then(|| MsiMessage {
            addr: u64::from(self.entry_u32(v, 0)) | (u64::from(self.entry_u32(v, 4)) << 32),
            data: self.entry_u32(v, 8),
        });
        if route != self.routes[usize::from(v)] {
            self.routes[usize::from(v)] = route;
            self.irq.set_route(v, route);
        }
        if route.is_some() && !self.function_masked && self.pending(v) {
            self.set_pending(v, false);
            self.irq.fire(v);
        }
    }

    pub fn state(&self) -> MsixState {
        MsixState {
            table: self.table.clone(),
            pba: self.pba.clone(),
            enabled: self.enabled,
            function_masked: self.function_masked,
        }
    }

    /// Takes over a saved state (same vector count) and re-sends every route it implies.
    pub fn restore(&mut self, s: &MsixState) -> Result<(), String> {
        if s.table.len() != self.table.len() || s.pba.len() != self.pba.len() {
            return Err(format!("MSI-X: {} table bytes saved, the device has {}", s.table.len(), self.table.len()));
        }
        self.table.copy_from_slice(&s.table);
        self.pba.copy_from_slice(&s.pba);
        self.enabled = s.enabled;
        self.function_masked = s.function_masked;
        for v in 0..self.vectors() {
            self.routes[usize::from(v)] = None;
            self.refresh(v);
        }
        Ok(())
    }

    pub fn table_read(&self, offset: u64, data: &mut [u8]) {
        crate::copy_out(&self.table, offset, data, 0xff)
    }

    pub fn table_write(&mut self, offset: u64, data: &[u8]) {
        let mut touched: Vec<u16> = Vec::new();
        for (i, v) in data.iter().enumerate() {
            let Some(o) = offset.checked_add(i as u64).and_then(|o| usize::try_from(o).ok()) else { return };
            let Some(slot) = self.table.get_mut(o) else { return };
            *slot = *v;
            let vec = (o / ENTRY_SIZE) as u16;
            if touched.last() != Some(&vec) {
                touched.push(vec);
            }
        }
        for v in touched {
            self.refresh(v);
        }
    }

    pub fn pba_read(&self, offset: u64, data: &mut [u8]) {
        crate::copy_out(&self.pba, offset, data, 0xff)
    }

    /// Raises `vector`: delivered now, or left pending while masked. Without MSI-X enabled
    /// there is nothing to deliver (Shoji's PCI devices have no INTx line).
    pub fn trigger(&mut self, vector: u16) {
        if !self.enabled || vector >= self.vectors() {
            return;
        }
        if self.function_masked || self.routes[usize::from(vector)].is_none() {
            self.set_pending(vector, true);
        } else {
            self.irq.fire(vector);
        }
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use std::sync::Mutex;

    #[derive(Default)]
    pub struct Recorder {
        pub routes: Mutex<Vec<(u16, Option<MsiMessage>)>>,
        pub fired: Mutex<Vec<u16>>,
    }
    impl MsiInterrupts for Recorder {
        fn set_route(&self, v: u16, m: Option<MsiMessage>) {
            self.routes.lock().unwrap().push((v, m));
        }
        fn fire(&self, v: u16) {
            self.fired.lock().unwrap().push(v);
        }
    }

    fn program(m: &mut Msix, v: u16, addr: u64, data: u32, masked: bool) {
        let base = u64::from(v) * 16;
        m.table_write(base, &(addr as u32).to_le_bytes());
        m.table_write(base + 4, &((addr >> 32) as u32).to_le_bytes());
        m.table_write(base + 8, &data.to_le_bytes());
        m.table_write(base + 12, &u32::from(masked).to_le_bytes());
    }

    #[test]
    fn route_fire_mask_and_pending() {
        let rec = Arc::new(Recorder::default());
        let mut m = Msix::new(3, rec.clone());
        m.trigger(0);
        assert!(rec.fired.lock().unwrap().is_empty(), "disabled: nothing");
        m.set_control(CTRL_ENABLE);
        program(&mut m, 1, 0xfee0_0000, 0x41, false);
        assert_eq!(rec.routes.lock().unwrap().last(), Some(&(1, Some(MsiMessage { addr: 0xfee0_0000, data: 0x41 }))));
        m.trigger(1);
        assert_eq!(*rec.fired.lock().unwrap(), vec![1]);
        // Vector mask: pending, then delivered on unmask.
        m.table_write(16 + 12, &1u32.to_le_bytes());
        assert_eq!(rec.routes.lock().unwrap().last(), Some(&(1, None)));
        m.trigger(1);
        let mut pba = [0u8; 8];
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0b10);
        m.table_write(16 + 12, &0u32.to_le_bytes());
        assert_eq!(*rec.fired.lock().unwrap(), vec![1, 1]);
        m.pba_read(0, &mut pba);
        assert_eq!(pba[0], 0);
        // Function mask.
        m.set_control(CTRL_ENABLE | CTRL_FUNCTION_MASK);
        m.trigger(1);
        assert_eq!(rec.fired.lock().unwrap().len(), 2);
        m.set_control(CTRL_ENABLE);
        assert_eq!(rec.fired.lock().unwrap().len(), 3);
        // Out of range vector and table accesses.
        m.trigger(99);
        m.table_write(3 * 16 - 2, &[1, 2, 3, 4, 5]);
        m.table_write(u64::MAX, &[1, 2]);
        let mut b = [0u8; 4];
        m.table_read(1000, &mut b);
        assert_eq!(b, [0xff; 4]);
        m.pba_read(u64::MAX - 1, &mut b);
        assert_eq!(b, [0xff; 4]);
    }

    #[test]
    fn capability_layout() {
        let m = Msix::new(5, Arc::new(Recorder::default()));
        let (body, w) = m.capability(0, 0x4000, 0x5000);
        assert_eq!(u16::from_le_bytes([body[0], body[1]]), 4);
        assert_eq!(u32::from_le_bytes(body[2..6].try_into().unwrap()), 0x4000);
        assert_eq!(u32::from_le_bytes(body[6..10].try_into().unwrap()), 0x5000);
        assert_eq!(w, [0, 0xc0]);
        assert_eq!(m.table_size(), 80);
        assert_eq!(m.pba_size(), 8);
        assert_eq!(Msix::new(0, Arc::new(Recorder::default())).vectors(), 1);
        assert_eq!(Msix::new(5000, Arc::new(Recorder::default())).vectors(), 2048);
    }
}
