//! Loads a kernel (PVH ELF vmlinux preferred, bzImage or a plain 64-bit ELF otherwise), the
//! command line, the initrd and the MP table into guest memory, and writes the boot parameters
//! the chosen entry expects.
use crate::layout::*;
use crate::mptable;
use crate::regs::BootEntry;
use linux_loader::bootparam::{boot_e820_entry, boot_params};
use linux_loader::configurator::{
    linux::LinuxBootConfigurator, pvh::PvhBootConfigurator, BootConfigurator, BootParams,
};
use linux_loader::loader::elf::start_info::{hvm_memmap_table_entry, hvm_modlist_entry, hvm_start_info};
use linux_loader::loader::{BzImage, Cmdline, Elf, KernelLoader, PvhBootCapability};
use std::fs::File;
use std::io::{Read, Seek, SeekFrom};
use vm_memory::{ByteValued, Bytes, GuestAddress, GuestMemory, GuestMemoryMmap, ReadVolatile};

#[derive(Debug, thiserror::Error)]
pub enum BootError {
    #[error("kernel: not an ELF vmlinux or a bzImage")]
    UnknownKernelFormat,
    #[error("kernel: {0}")]
    Load(linux_loader::loader::Error),
    #[error("kernel: cannot read: {0}")]
    Read(std::io::Error),
    #[error("cmdline: {0}")]
    Cmdline(String),
    #[error("initrd: {size} bytes do not fit in guest memory above the kernel (ends at {kernel_end:#x}); give the VM more memory")]
    InitrdTooLarge { size: u64, kernel_end: u64 },
    #[error("initrd: cannot load: {0}")]
    Initrd(String),
    #[error("vcpus: {0}")]
    MpTable(#[from] mptable::MpTableError),
    #[error("writing boot parameters: {0}")]
    Params(String),
    #[error("guest memory: {0}")]
    Memory(#[from] vm_memory::GuestMemoryError),
}

const PVH_MAGIC: u32 = 0x336e_c578;
const KERNEL_BOOT_FLAG_MAGIC: u16 = 0xaa55;
const KERNEL_HDR_MAGIC: u32 = 0x5372_6448;
const KERNEL_LOADER_OTHER: u8 = 0xff;
const KERNEL_MIN_ALIGNMENT_BYTES: u32 = 0x0100_0000;
const LINUX64_ENTRY_OFFSET: u64 = 0x200;

// SAFETY: these are plain-old-data C structs from linux-loader's generated bindings; any byte
// pattern is a valid value, and the wrappers are transparent.
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct StartInfo(hvm_start_info);
// SAFETY: a transparent wrapper of a plain-old-data C struct (see above).
unsafe impl ByteValued for StartInfo {}
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct MemmapEntry(hvm_memmap_table_entry);
// SAFETY: a transparent wrapper of a plain-old-data C struct (see above).
unsafe impl ByteValued for MemmapEntry {}
#[derive(Clone, Copy, Default)]
#[repr(transparent)]
struct ModlistEntry(hvm_modlist_entry);
// SAFETY: a transparent wrapper of a plain-old-data C struct (see above).
unsafe impl ByteValued for ModlistEntry {}
#[derive(Clone, Copy)]
#[repr(transparent)]
struct ZeroPage(boot_params);
// SAFETY: a transparent wrapper of a plain-old-data C struct (see above).
unsafe impl ByteValued for ZeroPage {}

/// Kernel image formats we can tell apart by their first bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum KernelFormat {
    Elf,
    BzImage,
}

/// Sniffs the format, so a wrong file fails before any VM resource exists.
pub fn kernel_format(file: &mut File) -> Result<KernelFormat, BootError> {
    let mut head = [0u8; 0x206];
    file.seek(SeekFrom::Start(0)).map_err(BootError::Read)?;
    let n = read_up_to(file, &mut head).map_err(BootError::Read)?;
    file.seek(SeekFrom::Start(0)).map_err(BootError::Read)?;
    if n >= 4 && head[..4] == *b"\x7fELF" {
        return Ok(KernelFormat::Elf);
    }
    if n >= 0x206 && head[0x202..0x206] == *b"HdrS" {
        return Ok(KernelFormat::BzImage);
    }
    Err(BootError::UnknownKernelFormat)
}

fn read_up_to(file: &mut File, buf: &mut [u8]) -> std::io::Result<usize> {
    let mut n = 0;
    while n < buf.len() {
        match file.read(&mut buf[n..])? {
            0 => break,
            k => n += k,
        }
    }
    Ok(n)
}

/// Builds the guest command line, enforcing Linux's size limit.
pub fn build_cmdline(cmdline: &str) -> Result<Cmdline, BootError> {
    if cmdline.len() >= CMDLINE_MAX_SIZE {
        return Err(BootError::Cmdline(format!(
            "{} bytes is over the limit of {} bytes",
            cmdline.len(),
            CMDLINE_MAX_SIZE - 1
        )));
    }
    if cmdline.bytes().any(|b| b == 0 || !(b.is_ascii_graphic() || b == b' ')) {
        return Err(BootError::Cmdline("only printable ASCII characters and spaces are allowed".into()));
    }
    Cmdline::try_from(cmdline, CMDLINE_MAX_SIZE).map_err(|e| BootError::Cmdline(e.to_string()))
}

/// What was loaded, for the vCPU set-up and for tests.
#[derive(Debug, Clone, Copy)]
pub struct Loaded {
    pub entry: BootEntry,
    pub kernel_end: u64,
    pub initrd: Option<(u64, u64)>,
}

/// Places the initrd at the top of low RAM (below 2 GiB and the MMIO gap), page aligned.
pub fn initrd_address(mem_bytes: u64, kernel_end: u64, size: u64) -> Option<u64> {
    let top = mem_bytes.min(MMIO_GAP_START).min(INITRD_ADDR_MAX + 1);
    let addr = top.checked_sub(size)? & !0xfff;
    (addr >= kernel_end && size > 0).then_some(addr)
}

pub fn load(
    mem: &GuestMemoryMmap,
    mem_bytes: u64,
    kernel: &mut File,
    cmdline: &str,
    initrd: Option<&mut File>,
    vcpus: u8,
    ioapic: bool,
) -> Result<Loaded, BootError> {
    let cmdline = build_cmdline(cmdline)?;
    let format = kernel_format(kernel)?;
    let result = match format {
        KernelFormat::Elf => Elf::load(mem, None, kernel, Some(HIMEM_START)).map_err(BootError::Load)?,
        KernelFormat::BzImage => BzImage::load(mem, None, kernel, Some(HIMEM_START)).map_err(BootError::Load)?,
    };
    let entry = match (format, result.pvh_boot_cap) {
        (KernelFormat::Elf, PvhBootCapability::PvhEntryPresent(addr)) => BootEntry::Pvh { entry: addr.0 },
        (KernelFormat::Elf, _) => BootEntry::Linux64 { entry: result.kernel_load.0 },
        (KernelFormat::BzImage, _) => BootEntry::Linux64 { entry: result.kernel_load.0 + LINUX64_ENTRY_OFFSET },
    };
    linux_loader::loader::load_cmdline(mem, CMDLINE_START, &cmdline).map_err(|e| BootError::Cmdline(e.to_string()))?;
    let cmdline_len = cmdline.as_cstring().map(|c| c.as_bytes().len()).unwrap_or(0);

    let initrd = match initrd {
        Some(f) => {
            let size = f.metadata().map_err(|e| BootError::Initrd(e.to_string()))?.len();
            let addr = initrd_address(mem_bytes, result.kernel_end, size)
                .ok_or(BootError::InitrdTooLarge { size, kernel_end: result.kernel_end })?;
            f.seek(SeekFrom::Start(0)).map_err(|e| BootError::Initrd(e.to_string()))?;
            read_into(mem, GuestAddress(addr), f, size)?;
            Some((addr, size))
        }
        None => None,
    };

    mem.write_slice(&mptable::build(vcpus, ioapic)?, MPTABLE_START)?;

    let e820 = e820_map(mem_bytes);
    match entry {
        BootEntry::Pvh { .. } => write_pvh_params(mem, &e820, initrd)?,
        BootEntry::Linux64 { .. } => write_linux_params(mem, &e820, initrd, result.setup_header, cmdline_len)?,
    }
    Ok(Loaded { entry, kernel_end: result.kernel_end, initrd })
}

fn read_into(mem: &GuestMemoryMmap, addr: GuestAddress, f: &mut File, size: u64) -> Result<(), BootError> {
    let len = usize::try_from(size).map_err(|_| BootError::Initrd("too large".into()))?;
    let mut slice = mem.get_slice(addr, len).map_err(|e| BootError::Initrd(e.to_string()))?;
    f.read_exact_volatile(&mut slice).map_err(|e| BootError::Initrd(format!("{e:?}")))?;
    Ok(())
}

fn write_pvh_params(mem: &GuestMemoryMmap, e820: &[E820Entry], initrd: Option<(u64, u64)>) -> Result<(), BootError> {
    let memmap: Vec<MemmapEntry> = e820
        .iter()
        .map(|e| MemmapEntry(hvm_memmap_table_entry { addr: e.addr, size: e.size, type_: e.kind, reserved: 0 }))
        .collect();
    let mut info = hvm_start_info {
        magic: PVH_MAGIC,
        version: 1,
        cmdline_paddr: CMDLINE_START.0,
        memmap_paddr: PVH_MEMMAP_START.0,
        memmap_entries: memmap.len() as u32,
        ..Default::default()
    };
    let mut params = BootParams::new(&StartInfo(info), PVH_INFO_START);
    if let Some((addr, size)) = initrd {
        info.nr_modules = 1;
        info.modlist_paddr = PVH_MODLIST_START.0;
        params = BootParams::new(&StartInfo(info), PVH_INFO_START);
        let module = ModlistEntry(hvm_modlist_entry { paddr: addr, size, ..Default::default() });
        params.set_modules(&[module], PVH_MODLIST_START);
    }
    params.set_sections(&memmap, PVH_MEMMAP_START);
    PvhBootConfigurator::write_bootparams::<GuestMemoryMmap>(&params, mem).map_err(|e| BootError::Params(e.to_string()))
}

fn write_linux_params(
    mem: &GuestMemoryMmap,
    e820: &[E820Entry],
    initrd: Option<(u64, u64)>,
    header: Option<linux_loader::bootparam::setup_header>,
    cmdline_len: usize,
) -> Result<(), BootError> {
    // SAFETY: boot_params is a C struct of integers and arrays; all zeroes is its defined
    // initial state in the Linux boot protocol.
    let mut params: boot_params = unsafe { std::mem::zeroed() };
    match header {
        Some(h) => params.hdr = h,
        None => {
            params.hdr.boot_flag = KERNEL_BOOT_FLAG_MAGIC;
            params.hdr.header = KERNEL_HDR_MAGIC;
            params.hdr.kernel_alignment = KERNEL_MIN_ALIGNMENT_BYTES;
        }
    }
    params.hdr.type_of_loader = KERNEL_LOADER_OTHER;
    params.hdr.cmd_line_ptr = CMDLINE_START.0 as u32;
    params.hdr.cmdline_size = cmdline_len as u32;
    if let Some((addr, size)) = initrd {
        params.hdr.ramdisk_image = addr as u32;
        params.hdr.ramdisk_size = size as u32;
    }
    if e820.len() > params.e820_table.len() {
        return Err(BootError::Params("too many E820 entries".into()));
    }
    for (slot, e) in params.e820_table.iter_mut().zip(e820) {
        *slot = boot_e820_entry { addr: e.addr, size: e.size, type_: e.kind };
    }
    params.e820_entries = e820.len() as u8;
    LinuxBootConfigurator::write_bootparams::<GuestMemoryMmap>(
        &BootParams::new(&ZeroPage(params), ZERO_PAGE_START),
        mem,
    )
    .map_err(|e| BootError::Params(e.to_string()))
}

#[cfg(test)]
mod tests {
    use super::*;
    const MIB: u64 = 1 << 20;

    #[test]
    fn cmdline_limits() {
        assert!(build_cmdline("console=ttyS0 quiet").is_ok());
        assert!(build_cmdline(&"a".repeat(CMDLINE_MAX_SIZE - 1)).is_ok());
        let err = build_cmdline(&"a".repeat(CMDLINE_MAX_SIZE)).unwrap_err().to_string();
        assert!(err.starts_with("cmdline: 2048 bytes is over the limit of 2047"), "{err}");
        assert!(build_cmdline("a\nb").unwrap_err().to_string().starts_with("cmdline:"));
        assert!(build_cmdline("é").is_err());
        assert!(build_cmdline("").is_ok());
    }

    #[test]
    fn initrd_goes_to_the_top_of_low_ram_page_aligned() {
        assert_eq!(initrd_address(128 * MIB, 20 * MIB, 4096), Some(128 * MIB - 4096));
        assert_eq!(initrd_address(128 * MIB, 20 * MIB, 5000), Some(128 * MIB - 8192));
        // Big guests keep the initrd under 2 GiB.
        assert_eq!(initrd_address(8192 * MIB, 20 * MIB, 4096), Some(0x8000_0000 - 4096));
        // Does not fit above the kernel, or empty.
        assert_eq!(initrd_address(32 * MIB, 20 * MIB, 13 * MIB), None);
        assert_eq!(initrd_address(32 * MIB, 20 * MIB, 64 * MIB), None);
        assert_eq!(initrd_address(32 * MIB, 20 * MIB, 0), None);
    }

    #[test]
    fn format_sniffing() {
        let dir = std::env::temp_dir().join(format!("shoji-boot-test-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let cases: [(&str, Vec<u8>, Option<KernelFormat>); 3] = [
            ("elf", b"\x7fELF\x02\x01\x01".to_vec(), Some(KernelFormat::Elf)),
            (
                "bz",
                {
                    let mut v = vec![0u8; 0x300];
                    v[0x202..0x206].copy_from_slice(b"HdrS");
                    v
                },
                Some(KernelFormat::BzImage),
            ),
            ("text", b"hello world".to_vec(), None),
        ];
        for (name, bytes, want) in cases {
            let p = dir.join(name);
            std::fs::write(&p, bytes).unwrap();
            let got = kernel_format(&mut File::open(&p).unwrap()).ok();
            assert_eq!(got, want, "{name}");
        }
        std::fs::remove_dir_all(&dir).unwrap();
    }
}
