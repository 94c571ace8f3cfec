//! Interrupt routing for PCI devices: each MSI-X vector gets a GSI with an irqfd; the guest's
//! MSI-X programming becomes KVM MSI routes. KVM_SET_GSI_ROUTING replaces the whole table, so
//! the default in-kernel PIC/IOAPIC routes for GSIs 0-23 are always re-sent with it.
use kvm_bindings::{
    kvm_irq_routing_entry, KvmIrqRouting, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER, KVM_IRQCHIP_PIC_SLAVE,
    KVM_IRQ_ROUTING_IRQCHIP, KVM_IRQ_ROUTING_MSI,
};
use kvm_ioctls::VmFd;
use shoji_devices::pci::msix::{MsiInterrupts, MsiMessage};
use std::collections::BTreeMap;
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

pub struct IrqRouting {
    vm: Arc<VmFd>,
    msi: Mutex<(u32, BTreeMap<u32, MsiMessage>)>,
}

fn irqchip(gsi: u32, chip: u32, pin: u32) -> kvm_irq_routing_entry {
    let mut e = kvm_irq_routing_entry { gsi, type_: KVM_IRQ_ROUTING_IRQCHIP, ..Default::default() };
    e.u.irqchip.irqchip = chip;
    e.u.irqchip.pin = pin;
    e
}

/// The routing table KVM sets up by default for an in-kernel irqchip, plus `msi`.
pub fn routing_entries(msi: &BTreeMap<u32, MsiMessage>) -> Vec<kvm_irq_routing_entry> {
    let mut v = Vec::with_capacity(40 + msi.len());
    for gsi in 0..24 {
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
    pub fn new(vm: Arc<VmFd>) -> Self {
        IrqRouting { vm, msi: Mutex::new((FIRST_MSI_GSI, BTreeMap::new())) }
    }

    fn allocate(&self) -> Result<u32, IrqError> {
        let mut g = self.msi.lock().unwrap_or_else(|p| p.into_inner());
        if g.0 > MAX_GSI {
            return Err(IrqError::NoGsi);
        }
        g.0 += 1;
        Ok(g.0 - 1)
    }

    fn set(&self, gsi: u32, msg: Option<MsiMessage>) {
        let mut g = self.msi.lock().unwrap_or_else(|p| p.into_inner());
        match msg {
            Some(m) => g.1.insert(gsi, m),
            None => g.1.remove(&gsi),
        };
        let entries = routing_entries(&g.1);
        let result = KvmIrqRouting::from_entries(&entries)
            .map_err(|e| format!("{e:?}"))
            .and_then(|r| self.vm.set_gsi_routing(&r).map_err(|e| e.to_string()));
        if let Err(e) = result {
            tracing::error!("KVM_SET_GSI_ROUTING failed: {e}");
        }
    }

    /// One GSI + irqfd per vector for a device with `vectors` MSI-X vectors.
    pub fn device(self: &Arc<Self>, vectors: u16) -> Result<Arc<DeviceMsi>, IrqError> {
        let mut v = Vec::with_capacity(usize::from(vectors));
        for _ in 0..vectors {
            let gsi = self.allocate()?;
            let evt = EventFd::new(libc::EFD_NONBLOCK).map_err(|e| IrqError::Irqfd(e.to_string()))?;
            self.vm.register_irqfd(&evt, gsi).map_err(|e| IrqError::Irqfd(e.to_string()))?;
            v.push((gsi, evt));
        }
        Ok(Arc::new(DeviceMsi { routing: self.clone(), vectors: v }))
    }
}

pub struct DeviceMsi {
    routing: Arc<IrqRouting>,
    vectors: Vec<(u32, EventFd)>,
}

impl MsiInterrupts for DeviceMsi {
    fn set_route(&self, vector: u16, msg: Option<MsiMessage>) {
        if let Some((gsi, _)) = self.vectors.get(usize::from(vector)) {
            self.routing.set(*gsi, msg);
        }
    }
    fn fire(&self, vector: u16) {
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
        let e = routing_entries(&msi);
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
}
