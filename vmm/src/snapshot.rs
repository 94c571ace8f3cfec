//! VM snapshots: a paused VM saved to a directory and a new VM restored from it.
//!
//! A snapshot is two files. `state` holds the machine: each vCPU (registers, special registers,
//! the MSRs KVM lists, LAPIC, XSAVE, XCRs, pending events, debug registers, MP state), the
//! in-kernel PIC, IOAPIC and PIT, kvmclock, the serial UART, PCI config-address latch and every
//! virtio-pci device's transport (config space, MSI-X table, queues and where the device is in
//! them). It starts with a magic, a format version and the SHA-256 of what follows, so a torn or
//! edited file is refused, not half-used. `memory` is guest RAM, regions back to back, written
//! sparse (all-zero pages are holes) and checked against the SHA-256 kept in `state`; a restore
//! maps it private copy-on-write, so VMs restored from one snapshot share its page cache.
//!
//! What cannot be saved is refused with a reason: hot-plugged devices, virtio-fs and virtio-net
//! (their state lives in host files and sockets), and vsock with connections open.
use kvm_bindings::{
    kvm_clock_data, kvm_debugregs, kvm_irqchip, kvm_lapic_state, kvm_mp_state, kvm_msr_entry, kvm_pit_state2, kvm_regs,
    kvm_sregs, kvm_vcpu_events, kvm_xcrs, kvm_xsave, Msrs, KVM_IRQCHIP_IOAPIC, KVM_IRQCHIP_PIC_MASTER,
    KVM_IRQCHIP_PIC_SLAVE,
};
use kvm_ioctls::{VcpuFd, VmFd};
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use shoji_devices::legacy::serial::SerialState;
use shoji_devices::virtio::transport::TransportState;
use std::fs::File;
use std::io::{Read, Seek, SeekFrom, Write};
use std::path::{Path, PathBuf};
use vm_memory::{Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, GuestMemoryRegion};

/// `state` begins with this, then the format version (u32 LE), the payload length (u64 LE) and
/// the payload's SHA-256.
const MAGIC: &[u8; 8] = b"SHOJISNP";
/// Bumped on any change to what `state` holds; another version is refused.
pub const FORMAT_VERSION: u32 = 2;
pub const STATE_FILE: &str = "state";
pub const MEMORY_FILE: &str = "memory";
const HEADER_LEN: usize = 8 + 4 + 8 + 32;
/// A state file is a few hundred KiB; anything far larger is not ours.
const MAX_STATE: u64 = 64 << 20;
const PAGE: usize = 4096;
const CHUNK: usize = 1 << 20;
const MSR_IA32_TSC: u32 = 0x10;
const MSR_IA32_TSC_DEADLINE: u32 = 0x6e0;

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("snapshot: the VM is not paused")]
    NotPaused,
    #[error("snapshot: the VM is not running")]
    NotRunning,
    #[error("snapshot: {0} cannot be saved: {1}")]
    Unsupported(String, String),
    #[error("snapshot: {0}: {1}")]
    Io(PathBuf, std::io::Error),
    #[error("snapshot: {0}: {1}")]
    Kvm(&'static str, kvm_ioctls::Error),
    #[error("snapshot: {0}: not a Shoji snapshot (bad magic)")]
    Magic(PathBuf),
    #[error("snapshot: {0}: format version {1}, this VMM reads {FORMAT_VERSION}")]
    Version(PathBuf, u32),
    #[error("snapshot: {0}: checksum mismatch (the file is damaged)")]
    Checksum(PathBuf),
    #[error("snapshot: {0}: {1}")]
    Decode(PathBuf, String),
    #[error("snapshot: it was taken with {field} {saved}, the VM is configured with {configured}")]
    Mismatch { field: &'static str, saved: String, configured: String },
    #[error("snapshot: restoring {0}: {1}")]
    Restore(String, String),
}

type Result<T> = std::result::Result<T, SnapshotError>;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> SnapshotError + '_ {
    move |e| SnapshotError::Io(path.to_path_buf(), e)
}

/// One vCPU's architectural state.
#[derive(Serialize, Deserialize)]
pub struct VcpuState {
    regs: kvm_regs,
    sregs: kvm_sregs,
    xsave: kvm_xsave,
    xcrs: kvm_xcrs,
    lapic: kvm_lapic_state,
    msrs: Vec<(u32, u64)>,
    events: kvm_vcpu_events,
    debugregs: kvm_debugregs,
    mp_state: kvm_mp_state,
}

impl VcpuState {
    /// Reads a stopped vCPU (not in KVM_RUN). `msr_list` is KVM's list of saved MSRs.
    pub fn save(fd: &VcpuFd, msr_list: &[u32]) -> Result<Self> {
        let k = |what| move |e| SnapshotError::Kvm(what, e);
        let entries: Vec<kvm_msr_entry> =
            msr_list.iter().map(|&index| kvm_msr_entry { index, ..Default::default() }).collect();
        let mut msrs =
            Msrs::from_entries(&entries).map_err(|e| SnapshotError::Restore("MSRs".into(), format!("{e:?}")))?;
        let n = fd.get_msrs(&mut msrs).map_err(k("KVM_GET_MSRS"))?;
        let msrs = msrs.as_slice()[..n].iter().map(|e| (e.index, e.data)).collect();
        Ok(VcpuState {
            regs: fd.get_regs().map_err(k("KVM_GET_REGS"))?,
            sregs: fd.get_sregs().map_err(k("KVM_GET_SREGS"))?,
            xsave: fd.get_xsave().map_err(k("KVM_GET_XSAVE"))?,
            xcrs: fd.get_xcrs().map_err(k("KVM_GET_XCRS"))?,
            lapic: fd.get_lapic().map_err(k("KVM_GET_LAPIC"))?,
            msrs,
            events: fd.get_vcpu_events().map_err(k("KVM_GET_VCPU_EVENTS"))?,
            debugregs: fd.get_debug_regs().map_err(k("KVM_GET_DEBUGREGS"))?,
            mp_state: fd.get_mp_state().map_err(k("KVM_GET_MP_STATE"))?,
        })
    }

    /// Loads a new vCPU (CPUID already set), in the order KVM needs: the LAPIC after the
    /// special registers (its base MSR), the MSRs after the LAPIC (TSC deadline), the pending
    /// events last.
    pub fn restore(&self, fd: &VcpuFd) -> Result<()> {
        let k = |what| move |e| SnapshotError::Kvm(what, e);
        fd.set_mp_state(self.mp_state).map_err(k("KVM_SET_MP_STATE"))?;
        fd.set_regs(&self.regs).map_err(k("KVM_SET_REGS"))?;
        fd.set_sregs(&self.sregs).map_err(k("KVM_SET_SREGS"))?;
        // SAFETY: the buffer is a whole kvm_xsave read back from KVM_GET_XSAVE on a vCPU of
        // the same kind (KVM_CAP_XSAVE2 is 4096 bytes here, the size of kvm_xsave).
        unsafe { fd.set_xsave(&self.xsave) }.map_err(k("KVM_SET_XSAVE"))?;
        fd.set_xcrs(&self.xcrs).map_err(k("KVM_SET_XCRS"))?;
        fd.set_debug_regs(&self.debugregs).map_err(k("KVM_SET_DEBUGREGS"))?;
        fd.set_lapic(&self.lapic).map_err(k("KVM_SET_LAPIC"))?;
        // The TSC first and the TSC deadline last: KVM arms the LAPIC timer from the deadline
        // against the TSC as it is when the deadline is written, so a deadline written before
        // the TSC (a fresh vCPU's is near 0) would fire as late as the template ran long.
        let mut msrs = self.msrs.clone();
        msrs.sort_by_key(|&(index, _)| match index {
            MSR_IA32_TSC => 0,
            MSR_IA32_TSC_DEADLINE => 2,
            _ => 1,
        });
        let entries: Vec<kvm_msr_entry> =
            msrs.iter().map(|&(index, data)| kvm_msr_entry { index, data, ..Default::default() }).collect();
        let msrs = Msrs::from_entries(&entries).map_err(|e| SnapshotError::Restore("MSRs".into(), format!("{e:?}")))?;
        let n = fd.set_msrs(&msrs).map_err(k("KVM_SET_MSRS"))?;
        if n != entries.len() {
            let failed = entries.get(n).map_or(0, |e| e.index);
            return Err(SnapshotError::Restore("MSRs".into(), format!("KVM refused MSR {failed:#x}")));
        }
        fd.set_vcpu_events(&self.events).map_err(k("KVM_SET_VCPU_EVENTS"))?;
        Ok(())
    }
}

/// The in-kernel interrupt controllers and PIT (none with a split irqchip), and kvmclock.
#[derive(Serialize, Deserialize)]
pub struct VmState {
    legacy: Option<LegacyState>,
    clock: kvm_clock_data,
}

#[derive(Serialize, Deserialize)]
struct LegacyState {
    pic_master: kvm_irqchip,
    pic_slave: kvm_irqchip,
    ioapic: kvm_irqchip,
    pit: kvm_pit_state2,
}

fn chip(id: u32) -> kvm_irqchip {
    kvm_irqchip { chip_id: id, ..Default::default() }
}

impl VmState {
    /// `legacy`: the VM has the in-kernel PIC, IOAPIC and PIT.
    pub fn save(vm: &VmFd, legacy: bool) -> Result<Self> {
        let k = |what| move |e| SnapshotError::Kvm(what, e);
        let legacy = if legacy {
            let (mut pic_master, mut pic_slave, mut ioapic) =
                (chip(KVM_IRQCHIP_PIC_MASTER), chip(KVM_IRQCHIP_PIC_SLAVE), chip(KVM_IRQCHIP_IOAPIC));
            vm.get_irqchip(&mut pic_master).map_err(k("KVM_GET_IRQCHIP"))?;
            vm.get_irqchip(&mut pic_slave).map_err(k("KVM_GET_IRQCHIP"))?;
            vm.get_irqchip(&mut ioapic).map_err(k("KVM_GET_IRQCHIP"))?;
            let pit = vm.get_pit2().map_err(k("KVM_GET_PIT2"))?;
            Some(LegacyState { pic_master, pic_slave, ioapic, pit })
        } else {
            None
        };
        let mut clock = vm.get_clock().map_err(k("KVM_GET_CLOCK"))?;
        // KVM_SET_CLOCK takes only the clock value (and, with KVM_CLOCK_REALTIME, a host time
        // to advance from): the guest's clock goes on from where it stopped.
        clock.flags = 0;
        Ok(VmState { legacy, clock })
    }

    pub fn restore(&self, vm: &VmFd) -> Result<()> {
        let k = |what| move |e| SnapshotError::Kvm(what, e);
        if let Some(l) = &self.legacy {
            vm.set_irqchip(&l.pic_master).map_err(k("KVM_SET_IRQCHIP"))?;
            vm.set_irqchip(&l.pic_slave).map_err(k("KVM_SET_IRQCHIP"))?;
            vm.set_irqchip(&l.ioapic).map_err(k("KVM_SET_IRQCHIP"))?;
            vm.set_pit2(&l.pit).map_err(k("KVM_SET_PIT2"))?;
        }
        vm.set_clock(&self.clock).map_err(k("KVM_SET_CLOCK"))?;
        Ok(())
    }
}

/// A virtio-pci device in the snapshot, at its PCI path.
#[derive(Serialize, Deserialize)]
pub struct DeviceState {
    pub path: String,
    pub kind: String,
    pub transport: TransportState,
}

/// Guest RAM as saved: its size and checksum.
#[derive(Serialize, Deserialize, Clone, PartialEq, Eq, Debug)]
pub struct MemoryInfo {
    pub bytes: u64,
    pub sha256: String,
}

/// Everything in `state`.
#[derive(Serialize, Deserialize)]
pub struct Snapshot {
    pub vcpu_count: u8,
    pub memory_mib: u64,
    pub memory: MemoryInfo,
    pub vcpus: Vec<VcpuState>,
    pub vm: VmState,
    pub serial: SerialState,
    pub pci_root: (u32, u16),
    pub devices: Vec<DeviceState>,
}

impl Snapshot {
    /// Refuses a restore into a VM configured differently from the one saved (`legacy`: an
    /// in-kernel PIC, IOAPIC and PIT).
    pub fn check(&self, vcpus: u8, memory_mib: u64, legacy: bool, devices: &[(String, String)]) -> Result<()> {
        let mismatch =
            |field, saved: String, configured: String| Err(SnapshotError::Mismatch { field, saved, configured });
        let chip = |l: bool| if l { "in-kernel" } else { "split" }.to_string();
        if self.vm.legacy.is_some() != legacy {
            return mismatch("irqchip", chip(self.vm.legacy.is_some()), chip(legacy));
        }
        if self.vcpu_count != vcpus || self.vcpus.len() != usize::from(vcpus) {
            return mismatch("vcpus", self.vcpu_count.to_string(), vcpus.to_string());
        }
        if self.memory_mib != memory_mib || self.memory.bytes != memory_mib << 20 {
            return mismatch("memory_mib", self.memory_mib.to_string(), memory_mib.to_string());
        }
        let saved: Vec<String> = self.devices.iter().map(|d| format!("{}@{}", d.kind, d.path)).collect();
        let configured: Vec<String> = devices.iter().map(|(kind, path)| format!("{kind}@{path}")).collect();
        if saved != configured {
            return mismatch("devices", saved.join(","), configured.join(","));
        }
        Ok(())
    }
}

/// Writes guest RAM to `path` (sparse: all-zero pages are skipped) and returns its size and
/// SHA-256. The caller keeps vCPUs and devices still while it runs.
pub fn write_memory(mem: &GuestMemoryMmap, path: &Path) -> Result<MemoryInfo> {
    let mut f = File::create(path).map_err(io(path))?;
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    let mut total = 0u64;
    for region in mem.iter() {
        let (start, len) = (region.start_addr(), region.len());
        let mut off = 0u64;
        while off < len {
            let n = (len - off).min(CHUNK as u64) as usize;
            mem.read_slice(&mut buf[..n], GuestAddress(start.0 + off))
                .map_err(|e| SnapshotError::Io(path.to_path_buf(), std::io::Error::other(e.to_string())))?;
            hash.update(&buf[..n]);
            for page in buf[..n].chunks(PAGE) {
                if page.iter().all(|b| *b == 0) {
                    f.seek(SeekFrom::Current(page.len() as i64)).map_err(io(path))?;
                } else {
                    f.write_all(page).map_err(io(path))?;
                }
            }
            off += n as u64;
        }
        total += len;
    }
    f.set_len(total).map_err(io(path))?;
    f.sync_all().map_err(io(path))?;
    let info = MemoryInfo { bytes: total, sha256: hex(&hash.finalize()) };
    // What was just written is what was hashed: the first restore need not hash it again.
    record_verified(path, &f.metadata().map_err(io(path))?, &info.sha256);
    Ok(info)
}

/// Beside `memory`: the identity of the file (device, inode, size, modification and change
/// times) when it last matched `state`'s SHA-256. Hashing reads the whole file (256 MiB for a
/// default sandbox) on every restore; a file whose identity has not changed since it was
/// verified is not hashed again. Any write to the file moves its change time (which user space cannot set back), so a
/// damaged or edited file is still caught; decay under an unchanged inode is the file system's
/// to catch, as for any file the host reads.
pub const VERIFIED_FILE: &str = "memory.verified";

/// What [`VERIFIED_FILE`] holds for `md` verified against `sha256`.
fn identity(md: &std::fs::Metadata, sha256: &str) -> String {
    use std::os::unix::fs::MetadataExt;
    format!(
        "{} {} {} {}.{:09} {}.{:09} {sha256}\n",
        md.dev(),
        md.ino(),
        md.len(),
        md.mtime(),
        md.mtime_nsec(),
        md.ctime(),
        md.ctime_nsec()
    )
}

/// Checks the memory file against what `state` says: size, then SHA-256 unless the file is the
/// very one verified before ([`VERIFIED_FILE`]); records a successful check there.
pub fn verify_memory(path: &Path, info: &MemoryInfo) -> Result<File> {
    let mut f = File::open(path).map_err(io(path))?;
    let md = f.metadata().map_err(io(path))?;
    if md.len() != info.bytes {
        return Err(SnapshotError::Decode(
            path.to_path_buf(),
            format!("{} bytes, the state says {}", md.len(), info.bytes),
        ));
    }
    let stamp = path.with_file_name(VERIFIED_FILE);
    let id = identity(&md, &info.sha256);
    if std::fs::read_to_string(&stamp).is_ok_and(|s| s == id) {
        tracing::debug!(path = %path.display(), "memory file verified before and unchanged since");
        return Ok(f);
    }
    let mut hash = Sha256::new();
    let mut buf = vec![0u8; CHUNK];
    loop {
        let n = f.read(&mut buf).map_err(io(path))?;
        if n == 0 {
            break;
        }
        hash.update(&buf[..n]);
    }
    if hex(&hash.finalize()) != info.sha256 {
        let _ = std::fs::remove_file(&stamp);
        return Err(SnapshotError::Checksum(path.to_path_buf()));
    }
    record_verified(path, &md, &info.sha256);
    Ok(f)
}

/// Writes [`VERIFIED_FILE`] for the memory file at `path` (best effort: without it the next
/// restore hashes again); through a temporary name, so a reader sees the whole line or none.
fn record_verified(path: &Path, md: &std::fs::Metadata, sha256: &str) {
    let stamp = path.with_file_name(VERIFIED_FILE);
    let tmp = stamp.with_extension(format!("verified.{}", std::process::id()));
    if let Err(e) = std::fs::write(&tmp, identity(md, sha256)).and_then(|()| std::fs::rename(&tmp, &stamp)) {
        let _ = std::fs::remove_file(&tmp);
        tracing::debug!(path = %stamp.display(), "not recorded (the next restore hashes again): {e}");
    }
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|x| format!("{x:02x}")).collect()
}

/// Writes `state` (header, checksum, JSON payload) next to the memory file, through a
/// temporary name so a reader never sees half of it.
pub fn write_state(dir: &Path, s: &Snapshot) -> Result<()> {
    let path = dir.join(STATE_FILE);
    let payload = serde_json::to_vec(s).map_err(|e| SnapshotError::Decode(path.clone(), e.to_string()))?;
    let mut out = Vec::with_capacity(HEADER_LEN + payload.len());
    out.extend_from_slice(MAGIC);
    out.extend_from_slice(&FORMAT_VERSION.to_le_bytes());
    out.extend_from_slice(&(payload.len() as u64).to_le_bytes());
    out.extend_from_slice(&Sha256::digest(&payload));
    out.extend_from_slice(&payload);
    let tmp = dir.join(format!("{STATE_FILE}.tmp"));
    let mut f = File::create(&tmp).map_err(io(&tmp))?;
    f.write_all(&out).and_then(|()| f.sync_all()).map_err(io(&tmp))?;
    std::fs::rename(&tmp, &path).map_err(io(&path))
}

/// Reads and checks `state`: magic, version, length and checksum, then the payload.
pub fn read_state(dir: &Path) -> Result<Snapshot> {
    let path = dir.join(STATE_FILE);
    let f = File::open(&path).map_err(io(&path))?;
    let mut bytes = Vec::new();
    f.take(MAX_STATE).read_to_end(&mut bytes).map_err(io(&path))?;
    if bytes.len() < HEADER_LEN || &bytes[..8] != MAGIC {
        return Err(SnapshotError::Magic(path));
    }
    let word = |r: std::ops::Range<usize>| bytes[r].to_vec();
    let version = u32::from_le_bytes(word(8..12).try_into().unwrap_or_default());
    if version != FORMAT_VERSION {
        return Err(SnapshotError::Version(path, version));
    }
    let len = u64::from_le_bytes(word(12..20).try_into().unwrap_or_default());
    let payload = &bytes[HEADER_LEN..];
    if payload.len() as u64 != len || Sha256::digest(payload).as_slice() != &bytes[20..52] {
        return Err(SnapshotError::Checksum(path));
    }
    serde_json::from_slice(payload).map_err(|e| SnapshotError::Decode(path, e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn tiny() -> Snapshot {
        Snapshot {
            vcpu_count: 1,
            memory_mib: 1,
            memory: MemoryInfo { bytes: 1 << 20, sha256: "00".into() },
            vcpus: vec![VcpuState {
                regs: Default::default(),
                sregs: Default::default(),
                xsave: Default::default(),
                xcrs: Default::default(),
                lapic: Default::default(),
                msrs: vec![(0x10, 1)],
                events: Default::default(),
                debugregs: Default::default(),
                mp_state: Default::default(),
            }],
            vm: VmState {
                legacy: Some(LegacyState {
                    pic_master: chip(0),
                    pic_slave: chip(1),
                    ioapic: chip(2),
                    pit: Default::default(),
                }),
                clock: Default::default(),
            },
            serial: SerialState { registers: [0; 9], in_buffer: Vec::new() },
            pci_root: (0x8000_0000, 6),
            devices: Vec::new(),
        }
    }

    #[test]
    fn state_round_trips_and_any_damage_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        write_state(dir.path(), &tiny()).unwrap();
        let back = read_state(dir.path()).unwrap();
        assert_eq!((back.pci_root, back.memory.bytes), ((0x8000_0000, 6), 1 << 20));
        let path = dir.path().join(STATE_FILE);
        let good = std::fs::read(&path).unwrap();
        for (at, what) in [(0usize, "magic"), (9, "version"), (HEADER_LEN + 3, "payload"), (30, "checksum")] {
            let mut bad = good.clone();
            bad[at] ^= 0x40;
            std::fs::write(&path, &bad).unwrap();
            let e = read_state(dir.path()).err().unwrap_or_else(|| panic!("damaged {what} was accepted"));
            assert!(
                matches!(e, SnapshotError::Magic(_) | SnapshotError::Version(..) | SnapshotError::Checksum(_)),
                "{what}: {e}"
            );
        }
        std::fs::write(&path, &good[..good.len() - 1]).unwrap();
        assert!(matches!(read_state(dir.path()), Err(SnapshotError::Checksum(_))), "a truncated state");
    }

    #[test]
    fn a_restore_into_another_shape_is_refused_naming_the_field() {
        let s = tiny();
        let e = s.check(1, 2, true, &[]).unwrap_err().to_string();
        assert!(e.contains("memory_mib 1") && e.contains("configured with 2"), "{e}");
        let e = s.check(1, 1, true, &[("virtio-blk".into(), "01".into())]).unwrap_err().to_string();
        assert!(e.contains("devices"), "{e}");
        let e = s.check(2, 1, true, &[]).unwrap_err().to_string();
        assert!(e.contains("vcpus"), "{e}");
        let e = s.check(1, 1, false, &[]).unwrap_err().to_string();
        assert!(e.contains("irqchip in-kernel") && e.contains("configured with split"), "{e}");
    }

    /// 1 MiB of guest memory with "hello" at 0x5000, written to a memory file in a new dir.
    fn saved_memory() -> (tempfile::TempDir, PathBuf, MemoryInfo) {
        let mem = GuestMemoryMmap::<()>::from_ranges(&[(GuestAddress(0), 1 << 20)]).unwrap();
        mem.write_slice(b"hello", GuestAddress(0x5000)).unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join(MEMORY_FILE);
        let info = write_memory(&mem, &path).unwrap();
        (dir, path, info)
    }

    #[test]
    fn memory_is_written_sparse_and_verified() {
        let (dir, path, info) = saved_memory();
        assert_eq!(info.bytes, 1 << 20);
        use std::os::unix::fs::MetadataExt;
        assert!(std::fs::metadata(&path).unwrap().blocks() * 512 < 64 << 10, "zero pages are holes");
        verify_memory(&path, &info).unwrap();
        std::thread::sleep(std::time::Duration::from_millis(20));
        let mut data = std::fs::read(&path).unwrap();
        data[0x5001] = b'E';
        std::fs::write(&path, &data).unwrap();
        assert!(matches!(verify_memory(&path, &info), Err(SnapshotError::Checksum(_))));
        assert!(!dir.path().join(VERIFIED_FILE).exists(), "no record of a file that failed");
    }

    #[test]
    fn an_unchanged_memory_file_is_hashed_once_and_a_changed_one_again() {
        let (dir, path, info) = saved_memory();
        verify_memory(&path, &info).unwrap();
        let stamp = std::fs::read_to_string(dir.path().join(VERIFIED_FILE)).unwrap();
        assert!(stamp.ends_with(&format!(" {}\n", info.sha256)), "{stamp}");
        // The record is what is trusted for this very file: shown by a record made for a
        // checksum the file does not have, which passes without hashing...
        let wrong = MemoryInfo { bytes: info.bytes, sha256: "ab".repeat(32) };
        let md = std::fs::metadata(&path).unwrap();
        std::fs::write(dir.path().join(VERIFIED_FILE), identity(&md, &wrong.sha256)).unwrap();
        verify_memory(&path, &wrong).unwrap();
        // ...and no longer once the file is written to (its change time moves).
        std::thread::sleep(std::time::Duration::from_millis(20));
        let f = std::fs::OpenOptions::new().write(true).open(&path).unwrap();
        std::os::unix::fs::FileExt::write_all_at(&f, b"E", 0x5001).unwrap();
        drop(f);
        assert!(matches!(verify_memory(&path, &wrong), Err(SnapshotError::Checksum(_))));
        assert!(matches!(verify_memory(&path, &info), Err(SnapshotError::Checksum(_))));
    }
}
