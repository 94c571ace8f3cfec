//! Interrupt routing for PCI devices: each MSI-X vector gets a GSI with an irqfd; the guest's
//! MSI-X programming becomes KVM MSI routes. KVM_SET_GSI_ROUTING replaces the whole table, so
//! the default in-kernel PIC/IOAPIC routes for GSIs 0-23 are always re-sent with it.
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use shoji_devices::pci::msix::{MsiInterrupts, MsiMessage};
use std::collections::{BTreeMap, BTreeSet};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use vmm_sys_util::eventfd::EventFd;

/// GSIs 0-23 belong to the IOAPIC pins; MSI vectors start after them.
const FIRST_MSI_GSI: u32 = 24;
/// KVM_MAX_IRQ_ROUTES is 4096 on x86.
const MAX_GSI: u32 = 4095;

#[derive(Debug, thiserror::Error)]
pub enum IrqError {
    #[error("out of interrupt GSIs")]
    NoGsi,
    #[error("irqfd: {0}")]
    Irqfd(String),
}

/// The MSI GSIs handed out and the routes the guest programmed for them.
struct State {
    /// Never handed out yet: this one and every one above it.
    next: u32,
    /// Handed out once and given back by an unplugged device: reused lowest first.
    free: BTreeSet<u32>,
    routes: BTreeMap<u32, MsiMessage>,
}

pub struct IrqRouting {
    vm: Arc<VmFd>,
    /// An in-kernel PIC and IOAPIC, whose pins' routes go with every table (none when split).
    legacy: bool,
    state: Mutex<State>,
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// The routing table KVM sets up by default for an in-kernel irqchip (`legacy`), plus `msi`.
pub fn routing_entries(msi: &BTreeMap<u32, MsiMessage>, legacy: bool) -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::with_capacity(40 + msi.len());
    for gsi in (0..24).filter(|_| legacy) {
        if gsi < 8 {
            v.push(irqchip(gsi, KVM_IRQCHIP_PIC_MASTER, gsi));
        } else if gsi < 16 {
            v.push(irqchip(gsi, KVM_IRQCHIP_PIC_SLAVE, gsi - 8));
        }
        v.push(irqchip(gsi, KVM_IRQCHIP_IOAPIC, gsi));
    }
    for (gsi, m) in msi {
        let mut e = kvm_irq_routing_entry { gsi: *gsi, type_: KVM_IRQ_ROUTING_MSI, ..Default::default() };
        e.u.msi.address_lo = m.addr as u32;
        e.u.msi.address_hi = (m.addr >> 32) as u32;
        e.u.msi.data = m.data;
        v.push(e);
    }
    v
}

impl IrqRouting {
    pub fn new(vm: Arc<VmFd>, legacy: bool) -> Self {
        IrqRouting {
            vm,
            legacy,
            state: Mutex::new(State { next: FIRST_MSI_GSI, free: BTreeSet::new(), routes: BTreeMap::new() }),
        }
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, State> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn allocate(&self) -> Result<u32, IrqError> {
        let mut g = self.lock();
        if let Some(gsi) = g.free.pop_first() {
            return Ok(gsi);
        }
        if g.next > MAX_GSI {
            return Err(IrqError::NoGsi);
        }
        g.next += 1;
        Ok(g.next - 1)
    }

    /// MSI GSIs held by devices now (a hot-unplug gives its device's back).
    pub fn gsis_in_use(&self) -> usize {
        let g = self.lock();
        (g.next - FIRST_MSI_GSI) as usize - g.free.len()
    }

    /// Sends KVM the whole table (KVM_SET_GSI_ROUTING replaces it).
    fn push(&self, g: &State) {
        let entries = routing_entries(&g.routes, self.legacy);
        let result = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| format!("{e:?}"))
            .and_then(|r| self.vm.set_gsi_routing(&r).map_err(|e| e.to_string()));
        if let Err(e) = result {
            tracing::error!("KVM_SET_GSI_ROUTING failed: {e}");
        }
    }

    /// One GSI + irqfd per vector for a device with `vectors` MSI-X vectors. On an error what
    /// was already taken is given back.
    pub fn device(self: &Arc<Self>, vectors: u16) -> Result<Arc<DeviceMsi>, IrqError> {
        let mut msi = DeviceMsi {
            routing: self.clone(),
            vectors: Vec::with_capacity(usize::from(vectors)),
            released: AtomicBool::new(false),
        };
        for _ in 0..vectors {
            if let Err(e) = self.add_vector(&mut msi) {
                let _ = msi.release();
                return Err(e);
            }
        }
        Ok(Arc::new(msi))
    }

    fn add_vector(&self, msi: &mut DeviceMsi) -> Result<(), IrqError> {
        let gsi = self.allocate()?;
        let wired = EventFd::new(libc::EFD_NONBLOCK)
            .map_err(|e| IrqError::Irqfd(e.to_string()))
            .and_then(|evt| self.vm.register_irqfd(&evt, gsi).map(|_| evt).map_err(|e| IrqError::Irqfd(e.to_string())));
        match wired {
            Ok(evt) => {
                msi.vectors.push((gsi, evt));
                Ok(())
            }
            Err(e) => {
                self.lock().free.insert(gsi);
                Err(e)
            }
        }
    }
}

/// A device's MSI-X vectors: a GSI and an irqfd each. Dropping it does not give them back
/// (at VM teardown closing the VM fd does that, and the VM's own thread may not make KVM
/// calls): an unplug calls [`DeviceMsi::release`].
pub struct DeviceMsi {
    routing: Arc<IrqRouting>,
    vectors: Vec<(u32, EventFd)>,
    /// Set under the routing lock: after it, the GSIs may belong to another device, so this
    /// one neither routes nor fires.
    released: AtomicBool,
}

impl DeviceMsi {
    /// Gives the vectors back: each irqfd unregistered from KVM, its route dropped from the
    /// table, its GSI free for the next device. A second call does nothing. The first KVM error
    /// is returned; the GSIs are freed anyway (nothing fires this device's irqfds any more).
    pub fn release(&self) -> Result<(), IrqError> {
        let mut g = self.routing.lock();
        if self.released.swap(true, Ordering::AcqRel) {
            return Ok(());
        }
        let mut result = Ok(());
        for (gsi, evt) in &self.vectors {
            if let Err(e) = self.routing.vm.unregister_irqfd(evt, *gsi) {
                tracing::error!(gsi, "cannot unregister an irqfd: {e}");
                if result.is_ok() {
                    result = Err(IrqError::Irqfd(e.to_string()));
                }
            }
            g.routes.remove(gsi);
            g.free.insert(*gsi);
        }
        self.routing.push(&g);
        result
    }

    /// The GSIs of the vectors, in vector order.
    pub fn gsis(&self) -> Vec<u32> {
        self.vectors.iter().map(|(g, _)| *g).collect()
    }
}

impl MsiInterrupts for DeviceMsi {
    fn set_route(&self, vector: u16, msg: Option<MsiMessage>) {
        let Some((gsi, _)) = self.vectors.get(usize::from(vector)) else { return };
        let mut g = self.routing.lock();
        if self.released.load(Ordering::Acquire) {
            return;
        }
        match msg {
            Some(m) => g.routes.insert(*gsi, m),
            None => g.routes.remove(gsi),
        };
        self.routing.push(&g);
    }
    fn fire(&self, vector: u16) {
        if self.released.load(Ordering::Relaxed) {
            return;
        }
        if let Some((_, evt)) = self.vectors.get(usize::from(vector)) {
            if let Err(e) = evt.write(1) {
                tracing::error!("irqfd write: {e}");
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn default_routes_are_kept_with_msi_routes() {
        let mut msi = BTreeMap::new();
        msi.insert(24, MsiMessage { addr: 0xfee0_0000, data: 0x41 });
        let e = routing_entries(&msi, true);
        assert_eq!(e.len(), 16 + 24 + 1);
        let gsi4: Vec<_> = e.iter().filter(|x| x.gsi == 4).collect();
        assert_eq!(gsi4.len(), 2, "PIC + IOAPIC");
        // SAFETY: (test) reading the union member matching type_.
        let last = e.last().unwrap();
        assert_eq!(last.type_, KVM_IRQ_ROUTING_MSI);
        // SAFETY: the entry's type is MSI (checked above), so `msi` is the union's live member.
        assert_eq!(unsafe { (last.u.msi.address_lo, last.u.msi.data) }, (0xfee0_0000, 0x41));
        let slave: Vec<_> = e.iter().filter(|x| x.gsi == 12 && x.type_ == KVM_IRQ_ROUTING_IRQCHIP).collect();
        // SAFETY: only IRQCHIP entries are kept, whose live union member is `irqchip`.
        assert!(slave.iter().any(|x| unsafe { x.u.irqchip.irqchip == KVM_IRQCHIP_PIC_SLAVE && x.u.irqchip.pin == 4 }));
    }

    /// GSIs come back on release and go out again lowest first; a released device neither
    /// routes nor fires (its GSIs may be another device's by then). Needs /dev/kvm.
    #[test]
    fn released_gsis_are_reused_lowest_first_and_the_released_device_goes_quiet() {
        let kvm = kvm_ioctls::Kvm::new().expect("/dev/kvm");
        let vm = kvm.create_vm().unwrap();
        vm.create_irq_chip().unwrap();
        let routing = Arc::new(IrqRouting::new(Arc::new(vm), true));
        let a = routing.device(2).unwrap();
        let b = routing.device(3).unwrap();
        assert_eq!((a.gsis(), b.gsis()), (vec![24, 25], vec![26, 27, 28]));
        assert_eq!(routing.gsis_in_use(), 5);
        a.set_route(1, Some(MsiMessage { addr: 0xfee0_0000, data: 0x41 }));
        b.set_route(0, Some(MsiMessage { addr: 0xfee0_0000, data: 0x42 }));
        a.release().unwrap();
        a.release().unwrap();
        assert_eq!(routing.gsis_in_use(), 3);
        assert_eq!(routing.lock().routes.keys().copied().collect::<Vec<_>>(), [26], "a's route is dropped");
        a.set_route(0, Some(MsiMessage { addr: 0xfee0_0000, data: 0x43 }));
        assert_eq!(routing.lock().routes.len(), 1, "a released device routes nothing");
        a.fire(0);
        let c = routing.device(3).unwrap();
        assert_eq!(c.gsis(), [24, 25, 29]);
        assert_eq!(routing.gsis_in_use(), 6);
    }
}
