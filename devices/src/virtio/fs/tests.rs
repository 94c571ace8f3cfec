//! virtio-fs driven through virtio-queue's mock split queue on real guest memory, against a
//! temporary host directory: `<tmp>/shoji-fs-<pid>-<name>/share` is shared, and
//! `<tmp>/shoji-fs-<pid>-<name>/secret.txt` lies next to it, outside the share.
use super::*;
use fuse_backend_rs::abi::fuse_abi::{
    Attr, AttrOut, CreateIn, EntryOut, ForgetIn, GetattrIn, GetxattrIn, InitIn, InitOut, LinkIn, MkdirIn, MknodIn,
    OpenOut, ReadIn, ReleaseIn, Rename2In, RenameIn, SetattrIn, SetxattrIn, WriteIn, WriteOut,
};
use std::os::unix::fs::{FileTypeExt, PermissionsExt};
use virtio_bindings::bindings::virtio_ring::VRING_DESC_F_WRITE;
use virtio_queue::desc::{split::Descriptor as SplitDescriptor, RawDescriptor};
use virtio_queue::mock::MockSplitQueue;
use vm_memory::GuestAddress;

const IN: u64 = 0x10_0000;
const OUT: u64 = 0x20_0000;
const OUT_LEN: u32 = 0x1_0000;
const WRITE: u16 = VRING_DESC_F_WRITE as u16;
/// Large enough that no test wraps the mock's available ring (the mock does not wrap it).
const MOCK_QUEUE_SIZE: u16 = 1024;
const ROOT: u64 = 1;
const HELLO: &[u8] = b"hello from the host\n";
const SECRET: &[u8] = b"outside the share\n";

use crate::virtio::test_utils::Irqs;

struct Rig {
    mem: &'static GuestMemoryMmap,
    vq: MockSplitQueue<'static, GuestMemoryMmap>,
    dev: Fs,
    /// The mock queue stands in for this device queue; the other one is left not ready.
    index: usize,
    base: PathBuf,
    next_desc: u16,
    next_unique: u64,
}

/// One FUSE reply as the guest sees it.
struct Reply {
    used: u32,
    header: OutHeader,
    body: Vec<u8>,
}

impl Reply {
    /// The reply body, or the (positive) errno.
    fn ok(self) -> Result<Vec<u8>, i32> {
        assert_eq!(self.header.len, self.used, "out_header.len matches the used length");
        if self.header.error != 0 {
            assert_eq!(self.used as usize, OUT_HEADER_BYTES, "error replies carry no body");
            return Err(-self.header.error);
        }
        Ok(self.body)
    }
}

fn desc(addr: u64, len: u32, flags: u16) -> RawDescriptor {
    RawDescriptor::from(SplitDescriptor::new(addr, len, flags, 0))
}

/// Reads a FUSE structure from the front of a reply body.
fn obj<T: ByteValued + Default>(b: &[u8]) -> T {
    let mut t = T::default();
    let n = size_of::<T>();
    assert!(b.len() >= n, "reply body of {} bytes, want {n}", b.len());
    t.as_mut_slice().copy_from_slice(&b[..n]);
    t
}

fn cstr(name: &str) -> Vec<u8> {
    let mut v = name.as_bytes().to_vec();
    v.push(0);
    v
}

fn args<T: ByteValued>(t: T, tail: &[u8]) -> Vec<u8> {
    let mut v = t.as_slice().to_vec();
    v.extend_from_slice(tail);
    v
}

impl Rig {
    fn new(name: &str, read_only: bool) -> Rig {
        Rig::on_queue(name, read_only, REQUEST_QUEUE)
    }

    fn on_queue(name: &str, read_only: bool, index: usize) -> Rig {
        Rig::build(name, read_only, index, FsLimits::default())
    }

    fn with_limits(name: &str, limits: FsLimits) -> Rig {
        Rig::build(name, false, REQUEST_QUEUE, limits)
    }

    fn build(name: &str, read_only: bool, index: usize, limits: FsLimits) -> Rig {
        let base = std::env::temp_dir().join(format!("shoji-fs-{}-{name}", std::process::id()));
        let _ = std::fs::remove_dir_all(&base);
        std::fs::create_dir_all(base.join("share/sub")).unwrap();
        std::fs::write(base.join("share/hello.txt"), HELLO).unwrap();
        std::fs::write(base.join("secret.txt"), SECRET).unwrap();
        std::os::unix::fs::symlink("../secret.txt", base.join("share/link")).unwrap();
        // Leaked so the mock queue (which borrows memory) can live in the rig; tests only.
        let mem: &'static GuestMemoryMmap =
            Box::leak(Box::new(GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x40_0000)]).unwrap()));
        let mut dev = Fs::with_limits("shoji", &base.join("share"), read_only, limits).unwrap();
        let vq = MockSplitQueue::new(mem, MOCK_QUEUE_SIZE);
        let mut queues = vec![Queue::new(QUEUE_SIZE).unwrap(), Queue::new(QUEUE_SIZE).unwrap()];
        queues[index] = vq.create_queue().unwrap();
        dev.activate(mem.clone(), queues, dev.features()).unwrap();
        Rig { mem, vq, dev, index, base, next_desc: 0, next_unique: 1 }
    }

    fn host(&self, rel: &str) -> PathBuf {
        self.base.join(rel)
    }

    /// Submits one chain (NEXT flags and indices are filled in) and processes the queue.
    fn submit(&mut self, descs: &[RawDescriptor]) -> DeviceResult {
        let base = self.next_desc;
        let chained = crate::virtio::test_utils::chained(descs, base);
        self.vq.add_desc_chains(&chained, base).unwrap();
        self.next_desc = (base + descs.len() as u16) % (MOCK_QUEUE_SIZE - 8);
        let mut irqs = Irqs::default();
        let r = self.dev.queue_event(self.index, &mut irqs);
        if r.is_ok() {
            assert_eq!(irqs.0, vec![self.index as u16], "used buffers are signalled");
        }
        r
    }

    fn last_used_len(&self) -> u32 {
        let idx = self.vq.used().idx().load();
        let slot = usize::from(idx.wrapping_sub(1)) % usize::from(MOCK_QUEUE_SIZE);
        self.vq.used().ring().ref_at(slot).unwrap().load().len()
    }

    /// Submits `descs` after writing `input` at IN and clearing OUT; returns what came back.
    fn exchange(&mut self, input: &[u8], descs: &[RawDescriptor]) -> Reply {
        self.mem.write_slice(input, GuestAddress(IN)).unwrap();
        self.mem.write_slice(&vec![0u8; OUT_LEN as usize], GuestAddress(OUT)).unwrap();
        self.submit(descs).unwrap();
        let used = self.last_used_len();
        let header: OutHeader = self.mem.read_obj(GuestAddress(OUT)).unwrap();
        let mut body = vec![0u8; (used as usize).saturating_sub(OUT_HEADER_BYTES)];
        self.mem.read_slice(&mut body, GuestAddress(OUT + OUT_HEADER_BYTES as u64)).unwrap();
        Reply { used, header, body }
    }

    /// A well-formed FUSE request: in_header + `args` readable, `OUT_LEN` bytes writable.
    fn request(&mut self, opcode: u32, nodeid: u64, args: &[u8]) -> Reply {
        let unique = self.next_unique;
        self.next_unique += 2;
        let len = (IN_HEADER_BYTES + args.len()) as u32;
        let header = InHeader { len, opcode, unique, nodeid, uid: 0, gid: 0, pid: 1, padding: 0 };
        let mut input = header.as_slice().to_vec();
        input.extend_from_slice(args);
        let reply = self.exchange(&input, &[desc(IN, len, 0), desc(OUT, OUT_LEN, WRITE)]);
        if reply.used != 0 {
            assert_eq!(reply.header.unique, unique, "reply matches the request");
        }
        reply
    }

    fn init(&mut self) -> InitOut {
        let init = InitIn { major: 7, minor: 31, max_readahead: 0x2_0000, flags: 0 };
        let body = self.request(Opcode::Init as u32, 0, init.as_slice()).ok().expect("INIT succeeds");
        obj(&body)
    }

    fn lookup(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        self.request(Opcode::Lookup as u32, parent, &cstr(name)).ok().map(|b| obj(&b))
    }

    fn getattr(&mut self, node: u64) -> Result<Attr, i32> {
        let body = self.request(Opcode::Getattr as u32, node, GetattrIn::default().as_slice()).ok()?;
        Ok(obj::<AttrOut>(&body).attr)
    }

    fn open(&mut self, node: u64, flags: i32) -> Result<u64, i32> {
        let open = OpenIn { flags: flags as u32, fuse_flags: 0 };
        let body = self.request(Opcode::Open as u32, node, open.as_slice()).ok()?;
        Ok(obj::<OpenOut>(&body).fh)
    }

    fn read(&mut self, node: u64, fh: u64, offset: u64, size: u32) -> Result<Vec<u8>, i32> {
        let read = ReadIn { fh, offset, size, ..Default::default() };
        self.request(Opcode::Read as u32, node, read.as_slice()).ok()
    }

    fn write(&mut self, node: u64, fh: u64, offset: u64, data: &[u8]) -> Result<u32, i32> {
        let write = WriteIn { fh, offset, size: data.len() as u32, flags: libc::O_RDWR as u32, ..Default::default() };
        let body = self.request(Opcode::Write as u32, node, &args(write, data)).ok()?;
        Ok(obj::<WriteOut>(&body).size)
    }

    fn create(&mut self, parent: u64, name: &str) -> Result<(EntryOut, u64), i32> {
        self.create_mode(parent, name, 0o100644, 0o022)
    }

    fn create_mode(&mut self, parent: u64, name: &str, mode: u32, umask: u32) -> Result<(EntryOut, u64), i32> {
        let create = CreateIn { flags: (libc::O_RDWR | libc::O_CREAT) as u32, mode, umask, fuse_flags: 0 };
        let body = self.request(Opcode::Create as u32, parent, &args(create, &cstr(name))).ok()?;
        let entry: EntryOut = obj(&body);
        let open: OpenOut = obj(&body[size_of::<EntryOut>()..]);
        Ok((entry, open.fh))
    }

    fn mkdir(&mut self, parent: u64, name: &str) -> Result<EntryOut, i32> {
        self.mkdir_mode(parent, name, 0o755)
    }

    fn mkdir_mode(&mut self, parent: u64, name: &str, mode: u32) -> Result<EntryOut, i32> {
        let mkdir = MkdirIn { mode, umask: 0 };
        self.request(Opcode::Mkdir as u32, parent, &args(mkdir, &cstr(name))).ok().map(|b| obj(&b))
    }

    fn mknod(&mut self, parent: u64, name: &str, mode: u32, rdev: u32) -> Result<EntryOut, i32> {
        let mknod = MknodIn { mode, rdev, umask: 0, padding: 0 };
        self.request(Opcode::Mknod as u32, parent, &args(mknod, &cstr(name))).ok().map(|b| obj(&b))
    }

    /// SETATTR of the mode only (FATTR_MODE), through `fh` when given (FATTR_FH).
    fn chmod(&mut self, node: u64, fh: Option<u64>, mode: u32) -> Result<Attr, i32> {
        let valid = 1 | if fh.is_some() { 1 << 6 } else { 0 };
        let setattr = SetattrIn { valid, mode, fh: fh.unwrap_or(0), ..Default::default() };
        let body = self.request(Opcode::Setattr as u32, node, setattr.as_slice()).ok()?;
        Ok(obj::<AttrOut>(&body).attr)
    }

    fn forget(&mut self, node: u64, nlookup: u64) {
        let reply = self.request(Opcode::Forget as u32, node, ForgetIn { nlookup }.as_slice());
        assert_eq!(reply.used, 0, "FORGET has no reply");
    }

    fn release(&mut self, node: u64, fh: u64) -> Result<Vec<u8>, i32> {
        let release = ReleaseIn { fh, ..Default::default() };
        self.request(Opcode::Release as u32, node, release.as_slice()).ok()
    }

    /// File descriptors of this process that point into this rig's directory (not counting other
    /// tests' fds, which run in parallel in the same process).
    fn fds_inside(&self) -> usize {
        let base = self.base.canonicalize().unwrap();
        std::fs::read_dir("/proc/self/fd")
            .unwrap()
            .filter_map(|e| std::fs::read_link(e.ok()?.path()).ok())
            .filter(|target| target.starts_with(&base))
            .count()
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.base);
    }
}

#[test]
fn identity_and_config_space() {
    let r = Rig::new("config", false);
    assert_eq!(r.dev.device_type(), TYPE_FS);
    assert_eq!(r.dev.queue_max_sizes(), vec![1024, 1024]);
    assert_eq!(r.dev.features(), VIRTIO_F_VERSION_1);
    let mut cfg = [0xffu8; 44];
    r.dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..5], b"shoji");
    assert!(cfg[5..36].iter().all(|b| *b == 0), "tag is NUL-padded");
    assert_eq!(u32::from_le_bytes([cfg[36], cfg[37], cfg[38], cfg[39]]), 1, "one request queue");
    assert_eq!(cfg[40..], [0; 4], "nothing past the config structure");
    let mut far = [7u8; 4];
    r.dev.read_config(u64::MAX - 1, &mut far);
    assert_eq!(far, [0; 4]);
}

#[test]
fn init_lookup_open_read_getattr() {
    let mut r = Rig::new("read", false);
    let init = r.init();
    assert_eq!(init.major, 7, "FUSE protocol 7.x");
    assert!(init.minor >= 31, "minor {}", init.minor);
    let entry = r.lookup(ROOT, "hello.txt").unwrap();
    assert!(entry.nodeid > ROOT);
    assert_eq!(entry.attr.size, HELLO.len() as u64);
    assert_eq!(r.lookup(ROOT, "missing").unwrap_err(), libc::ENOENT);
    let fh = r.open(entry.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(r.read(entry.nodeid, fh, 0, 4096).unwrap(), HELLO);
    assert_eq!(r.read(entry.nodeid, fh, 6, 4).unwrap(), b"from");
    assert_eq!(r.getattr(entry.nodeid).unwrap().size, HELLO.len() as u64);
    assert_eq!(r.getattr(ROOT).unwrap().mode & libc::S_IFMT, libc::S_IFDIR);
    assert_eq!(r.dev.errors(), 0);
}

#[test]
fn read_write_share_creates_and_writes_on_the_host() {
    let mut r = Rig::new("rw", false);
    r.init();
    let (entry, fh) = r.create(ROOT, "new.txt").unwrap();
    assert_eq!(r.write(entry.nodeid, fh, 0, b"written by the guest").unwrap(), 20);
    assert_eq!(std::fs::read(r.host("share/new.txt")).unwrap(), b"written by the guest");
    assert_eq!(r.write(entry.nodeid, fh, 8, b"BY").unwrap(), 2);
    assert_eq!(std::fs::read(r.host("share/new.txt")).unwrap(), b"written BY the guest");
    r.mkdir(ROOT, "dir").unwrap();
    assert!(r.host("share/dir").is_dir());
    // Modes are the guest's, with the guest's umask (not the host process's) applied.
    use std::os::unix::fs::PermissionsExt;
    let mode = |r: &Rig, f: &str| std::fs::metadata(r.host(f)).unwrap().permissions().mode() & 0o777;
    r.create_mode(ROOT, "open.txt", 0o100666, 0).unwrap();
    assert_eq!(mode(&r, "share/open.txt"), 0o666);
    r.create_mode(ROOT, "masked.txt", 0o100666, 0o027).unwrap();
    assert_eq!(mode(&r, "share/masked.txt"), 0o640);
    assert_eq!(r.dev.errors(), 0);
}

/// The `Umask:` a thread's /proc status shows (its fs struct's umask); read-only, unlike umask(2).
fn umask_of(tid: libc::pid_t) -> u32 {
    let status = std::fs::read_to_string(format!("/proc/self/task/{tid}/status")).unwrap();
    let line = status.lines().find(|l| l.starts_with("Umask:")).unwrap();
    u32::from_str_radix(line["Umask:".len()..].trim(), 8).unwrap()
}

fn gettid() -> libc::pid_t {
    // SAFETY: gettid has no arguments and cannot fail.
    unsafe { libc::gettid() }
}

/// Attack: the umask is process-wide, so zeroing it for fuse-backend-rs made every file another
/// thread (the shim, the CLI) created meanwhile world-writable. Another thread watches its own
/// umask while the device serves requests (INIT, CREATE, MKDIR, DESTROY, reset) in this one.
#[test]
fn serving_requests_leaves_the_process_umask_alone() {
    use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
    use std::sync::Arc;
    let stop = Arc::new(AtomicBool::new(false));
    let (tid_tx, tid_rx) = std::sync::mpsc::channel();
    let seen_other = Arc::new(AtomicU32::new(u32::MAX));
    let watcher = {
        let (stop, seen_other) = (stop.clone(), seen_other.clone());
        std::thread::spawn(move || {
            let tid = gettid();
            let mine = umask_of(tid);
            tid_tx.send((tid, mine)).unwrap();
            while !stop.load(Ordering::Relaxed) {
                let now = umask_of(tid);
                if now != mine {
                    seen_other.store(now, Ordering::Relaxed);
                }
            }
        })
    };
    let (watcher_tid, watcher_umask) = tid_rx.recv().unwrap();
    let mut r = Rig::new("umask", false);
    for round in 0..50 {
        r.init();
        r.create_mode(ROOT, &format!("f{round}"), 0o100666, 0).unwrap();
        r.mkdir_mode(ROOT, &format!("d{round}"), 0o777).unwrap();
        assert_eq!(r.request(Opcode::Destroy as u32, 0, &[]).used, 0);
    }
    r.dev.reset();
    // The serving thread has an fs struct of its own: a umask set here is not the watcher's.
    // SAFETY: sets this (test) thread's umask; restored below.
    let old = unsafe { libc::umask(0o077) };
    std::thread::sleep(std::time::Duration::from_millis(20));
    let watcher_now = umask_of(watcher_tid);
    // SAFETY: as above.
    unsafe { libc::umask(old) };
    stop.store(true, Ordering::Relaxed);
    watcher.join().unwrap();
    let seen = seen_other.load(Ordering::Relaxed);
    assert_eq!(seen, u32::MAX, "another thread saw umask {seen:#o} instead of {watcher_umask:#o}");
    assert_eq!(watcher_now, watcher_umask, "the watcher shares no fs struct with the serving thread");
    // The guest's modes still come out exactly (no host umask applied on top).
    let mode = |f: &str| std::fs::metadata(r.host(f)).unwrap().permissions().mode() & 0o777;
    assert_eq!((mode("share/f0"), mode("share/d0")), (0o666, 0o777));
}

/// Attack (containerd CVE-2021-41103 class): the server runs as root and makes what the guest
/// asks, so a guest could leave a block or char device node in a host directory.
#[test]
fn guest_cannot_make_device_nodes() {
    let mut r = Rig::new("mknod", false);
    r.init();
    let dev = |major: u32, minor: u32| (major << 8) | minor;
    for (name, kind, rdev) in [
        ("loop0", libc::S_IFBLK, dev(7, 0)),
        ("sda", libc::S_IFBLK, dev(8, 0)),
        ("mem", libc::S_IFCHR, dev(1, 1)),
        ("null", libc::S_IFCHR, dev(1, 3)),
        ("whiteout", libc::S_IFCHR, 0),
    ] {
        assert_eq!(r.mknod(ROOT, name, kind | 0o666, rdev).unwrap_err(), libc::EPERM, "{name}");
        assert!(std::fs::symlink_metadata(r.host(&format!("share/{name}"))).is_err(), "{name} exists on the host");
    }
    // RENAME_WHITEOUT leaves a 0:0 char device where the source was.
    r.create(ROOT, "a").unwrap();
    let rename = Rename2In { newdir: ROOT, flags: libc::RENAME_WHITEOUT, padding: 0 };
    let reply = r.request(Opcode::Rename2 as u32, ROOT, &args(rename, b"a\0b\0"));
    assert_eq!(reply.ok().unwrap_err(), libc::EPERM);
    assert!(std::fs::metadata(r.host("share/a")).unwrap().is_file(), "no whiteout replaced a");
    // FIFOs, sockets and plain files stay possible.
    r.mknod(ROOT, "fifo", libc::S_IFIFO | 0o644, 0).unwrap();
    r.mknod(ROOT, "sock", libc::S_IFSOCK | 0o644, 0).unwrap();
    r.mknod(ROOT, "plain", libc::S_IFREG | 0o644, 0).unwrap();
    assert!(std::fs::metadata(r.host("share/fifo")).unwrap().file_type().is_fifo());
    assert!(std::fs::metadata(r.host("share/sock")).unwrap().file_type().is_socket());
    assert!(std::fs::metadata(r.host("share/plain")).unwrap().is_file());
    for entry in std::fs::read_dir(r.host("share")).unwrap() {
        let t = entry.unwrap().file_type().unwrap();
        assert!(!t.is_block_device() && !t.is_char_device());
    }
}

/// Attack: a guest root makes a setuid-root (or setgid) file in the share, which host users can
/// then run. Every way to set a mode drops S_ISUID and S_ISGID; the rest of the mode stays.
#[test]
fn guest_cannot_make_setuid_or_setgid_files() {
    let mut r = Rig::new("suid", false);
    r.init();
    let mode = |r: &Rig, f: &str| std::fs::symlink_metadata(r.host(f)).unwrap().permissions().mode() & 0o7777;
    let (suid, fh) = r.create_mode(ROOT, "suid", 0o104755, 0).unwrap();
    assert_eq!(mode(&r, "share/suid"), 0o755, "CREATE 04755");
    assert_eq!(suid.attr.mode & 0o7777, 0o755);
    r.create_mode(ROOT, "sgid", 0o102755, 0).unwrap();
    assert_eq!(mode(&r, "share/sgid"), 0o755, "CREATE 02755");
    r.mkdir_mode(ROOT, "sgid-dir", 0o2775).unwrap();
    assert_eq!(mode(&r, "share/sgid-dir"), 0o775, "MKDIR 02775");
    r.mkdir_mode(ROOT, "suid-dir", 0o4755).unwrap();
    assert_eq!(mode(&r, "share/suid-dir"), 0o755, "MKDIR 04755");
    r.mknod(ROOT, "suid-node", libc::S_IFREG | 0o6755, 0).unwrap();
    assert_eq!(mode(&r, "share/suid-node"), 0o755, "MKNOD 06755");
    // chmod by path (no handle) and through an open handle.
    let hello = r.lookup(ROOT, "hello.txt").unwrap().nodeid;
    let attr = r.chmod(hello, None, 0o104755).unwrap();
    assert_eq!(mode(&r, "share/hello.txt"), 0o755, "SETATTR 04755");
    assert_eq!(attr.mode & 0o7777, 0o755, "the reply shows what the host has");
    r.chmod(suid.nodeid, Some(fh), 0o106711).unwrap();
    assert_eq!(mode(&r, "share/suid"), 0o711, "SETATTR 06711 through a handle");
    let dir = r.lookup(ROOT, "sgid-dir").unwrap().nodeid;
    r.chmod(dir, None, 0o042777).unwrap();
    assert_eq!(mode(&r, "share/sgid-dir"), 0o777, "SETATTR 02777 on a directory");
    // The sticky bit is no privilege and stays.
    r.chmod(dir, None, 0o041777).unwrap();
    assert_eq!(mode(&r, "share/sgid-dir"), 0o1777);
    // So nothing in the share runs with the owner's (root's) privileges from the host.
    for entry in std::fs::read_dir(r.host("share")).unwrap() {
        let m = entry.unwrap().metadata().unwrap().permissions().mode();
        assert_eq!(m & 0o6000, 0, "mode {m:o}");
    }
}

/// Attack: every looked-up inode keeps an O_PATH fd and every open file one more, with no cap, so
/// a guest exhausts the VMM's (or the shim's) fds. Past the caps it gets ENFILE; FORGET and
/// RELEASE give the slots back.
#[test]
fn lookup_and_open_floods_end_in_enfile() {
    const FILES: usize = 300;
    let limits = FsLimits { max_inodes: 32, max_handles: 8 };
    let mut r = Rig::with_limits("flood", limits);
    for i in 0..FILES {
        std::fs::write(r.host(&format!("share/f{i}")), b"x").unwrap();
    }
    r.init();
    let before = r.fds_inside();
    let mut nodes = Vec::new();
    let mut refused = 0;
    for i in 0..FILES {
        match r.lookup(ROOT, &format!("f{i}")) {
            Ok(e) => nodes.push(e.nodeid),
            Err(e) => {
                assert_eq!(e, libc::ENFILE, "f{i}");
                refused += 1;
            }
        }
    }
    let after_lookups = r.fds_inside();
    assert!(refused > 0, "no lookup was refused");
    assert_eq!(nodes.len(), limits.max_inodes, "lookups up to the cap succeed");
    assert!(after_lookups - before <= limits.max_inodes, "{before} -> {after_lookups} fds");
    // At the cap, inodes the guest already holds stay reachable, and creating is refused too.
    assert_eq!(r.lookup(ROOT, "f0").unwrap().nodeid, nodes[0]);
    assert_eq!(r.create(ROOT, "new").unwrap_err(), libc::ENFILE);
    assert_eq!(r.mkdir(ROOT, "newdir").unwrap_err(), libc::ENFILE);
    assert!(!r.host("share/new").exists() && !r.host("share/newdir").exists());

    // Open flood on one file.
    let mut handles = Vec::new();
    for _ in 0..200 {
        match r.open(nodes[1], libc::O_RDONLY) {
            Ok(fh) => handles.push(fh),
            Err(e) => assert_eq!(e, libc::ENFILE),
        }
    }
    let after_opens = r.fds_inside();
    assert_eq!(handles.len(), limits.max_handles, "opens up to the cap succeed");
    assert!(after_opens - after_lookups <= limits.max_handles, "{after_lookups} -> {after_opens} fds");
    // RELEASE gives a handle back.
    assert_eq!(r.release(nodes[1], handles[0]).unwrap(), Vec::<u8>::new());
    assert!(r.open(nodes[1], libc::O_RDONLY).is_ok(), "a released handle slot is reusable");
    assert_eq!(r.open(nodes[1], libc::O_RDONLY).unwrap_err(), libc::ENFILE);
    for fh in &handles[1..] {
        r.release(nodes[1], *fh).unwrap();
    }
    // FORGET gives inodes back (f0 was looked up twice).
    r.forget(nodes[0], 2);
    for n in &nodes[2..] {
        r.forget(*n, 1);
    }
    let fresh = r.lookup(ROOT, &format!("f{}", FILES - 1)).unwrap();
    assert!(fresh.nodeid > ROOT, "a forgotten slot is reusable");
    assert!(r.fds_inside() <= before + 3, "fds are closed again: {before} -> {}", r.fds_inside());
    assert_eq!(r.dev.errors(), 0, "ENFILE answers are not guest errors");
}

/// Names must carry their NUL inside the request; otherwise EINVAL, before the request reaches
/// fuse-backend-rs (which logs the whole request buffer, up to 1 MiB, on such names).
#[test]
fn names_without_nul_are_refused_before_dispatch() {
    let mut r = Rig::new("nul", false);
    r.init();
    let hello = r.lookup(ROOT, "hello.txt").unwrap().nodeid;
    let cases: Vec<(Opcode, Vec<u8>)> = vec![
        (Opcode::Lookup, b"hello.txt".to_vec()),
        (Opcode::Mkdir, args(MkdirIn { mode: 0o755, umask: 0 }, b"d")),
        (Opcode::Mknod, args(MknodIn { mode: libc::S_IFREG | 0o644, ..Default::default() }, b"n")),
        (Opcode::Create, args(CreateIn { flags: libc::O_RDWR as u32, mode: 0o644, ..Default::default() }, b"c")),
        (Opcode::Unlink, b"hello.txt".to_vec()),
        (Opcode::Rmdir, b"sub".to_vec()),
        (Opcode::Rename, args(RenameIn { newdir: ROOT }, b"hello.txt\0moved")),
        (Opcode::Rename, args(RenameIn { newdir: ROOT }, b"hello.txt")),
        (Opcode::Rename2, args(Rename2In { newdir: ROOT, ..Default::default() }, b"hello.txt\0moved")),
        (Opcode::Link, args(LinkIn { oldnodeid: hello }, b"hard")),
        (Opcode::Symlink, b"sym\0target".to_vec()),
        (Opcode::Symlink, b"sym".to_vec()),
        (Opcode::Setxattr, args(SetxattrIn { size: 1, flags: 0 }, b"user.x")),
        (Opcode::Getxattr, args(GetxattrIn { size: 64, padding: 0 }, b"user.x")),
        (Opcode::Removexattr, b"user.x".to_vec()),
    ];
    let dispatched = r.dev.dispatched.load(std::sync::atomic::Ordering::Relaxed);
    for (i, (op, body)) in cases.iter().enumerate() {
        let reply = r.request(*op as u32, ROOT, body);
        assert_eq!((reply.used, reply.header.error), (16, -libc::EINVAL), "case {i}: {op:?}");
        assert_eq!(r.dev.errors(), i as u64 + 1, "case {i}: counted as a guest error");
    }
    assert_eq!(
        r.dev.dispatched.load(std::sync::atomic::Ordering::Relaxed),
        dispatched,
        "none of them reached fuse-backend-rs"
    );
    let names: Vec<String> =
        std::fs::read_dir(r.host("share")).unwrap().map(|e| e.unwrap().file_name().into_string().unwrap()).collect();
    let mut names = names;
    names.sort();
    assert_eq!(names, ["hello.txt", "link", "sub"], "nothing was created, moved or removed");
    // The same requests with their NULs go through.
    r.request(Opcode::Symlink as u32, ROOT, b"sym\0target\0").ok().unwrap();
    let rename = RenameIn { newdir: ROOT };
    r.request(Opcode::Rename as u32, ROOT, &args(rename, b"sym\0moved\0")).ok().unwrap();
    assert_eq!(std::fs::read_link(r.host("share/moved")).unwrap(), Path::new("target"));
}

#[test]
fn read_only_share_refuses_modifications_but_reads() {
    let mut r = Rig::new("ro", true);
    assert!(r.dev.read_only());
    r.init();
    assert_eq!(r.create(ROOT, "new.txt").unwrap_err(), libc::EROFS);
    assert!(!r.host("share/new.txt").exists());
    assert_eq!(r.mkdir(ROOT, "dir").unwrap_err(), libc::EROFS);
    assert!(!r.host("share/dir").exists());

    let hello = r.lookup(ROOT, "hello.txt").unwrap().nodeid;
    for flags in [libc::O_WRONLY, libc::O_RDWR, libc::O_RDONLY | libc::O_TRUNC] {
        assert_eq!(r.open(hello, flags).unwrap_err(), libc::EROFS, "open flags {flags:#x}");
    }
    let fh = r.open(hello, libc::O_RDONLY).unwrap();
    assert_eq!(r.write(hello, fh, 0, b"overwrite").unwrap_err(), libc::EROFS);
    let truncate = SetattrIn { valid: 1 << 3, size: 0, ..Default::default() }; // FATTR_SIZE
    assert_eq!(r.request(Opcode::Setattr as u32, hello, truncate.as_slice()).ok().unwrap_err(), libc::EROFS);
    assert_eq!(r.request(Opcode::Unlink as u32, ROOT, &cstr("hello.txt")).ok().unwrap_err(), libc::EROFS);
    assert_eq!(std::fs::read(r.host("share/hello.txt")).unwrap(), HELLO, "host file untouched");

    assert_eq!(r.read(hello, fh, 0, 4096).unwrap(), HELLO, "reads still work");
    assert_eq!(r.getattr(hello).unwrap().size, HELLO.len() as u64);
    assert_eq!(r.dev.errors(), 0, "EROFS answers are not guest errors");
}

#[test]
fn guest_cannot_escape_the_share() {
    let mut r = Rig::new("escape", false);
    r.init();
    // `..` of the root is the root.
    let up = r.lookup(ROOT, "..").unwrap();
    assert_eq!(up.nodeid, ROOT);
    assert_eq!(r.lookup(up.nodeid, "secret.txt").unwrap_err(), libc::ENOENT);
    assert_eq!(r.lookup(ROOT, "secret.txt").unwrap_err(), libc::ENOENT);
    // `..` of a subdirectory is the root too.
    let sub = r.lookup(ROOT, "sub").unwrap().nodeid;
    let sub_up = r.lookup(sub, "..").unwrap();
    assert_eq!(sub_up.nodeid, ROOT);
    assert_eq!(r.lookup(sub, "../../secret.txt").unwrap_err(), libc::EINVAL);
    // Names with slashes, absolute or relative, are refused.
    for name in ["../secret.txt", "/etc/passwd", "sub/../../secret.txt"] {
        assert_eq!(r.lookup(ROOT, name).unwrap_err(), libc::EINVAL, "{name}");
    }
    let absolute = r.base.join("secret.txt");
    assert_eq!(r.lookup(ROOT, absolute.to_str().unwrap()).unwrap_err(), libc::EINVAL);
    // A host symlink pointing outside is never followed on the host.
    let link = r.lookup(ROOT, "link").unwrap();
    assert_eq!(link.attr.mode & libc::S_IFMT, libc::S_IFLNK);
    assert!(r.open(link.nodeid, libc::O_RDONLY).is_err(), "opening a symlink inode fails");
    // Node ids the device never handed out lead nowhere.
    assert!(r.getattr(0xdead_beef).is_err());
    assert!(r.lookup(0xdead_beef, "secret.txt").is_err());
    // Nothing can be created outside either.
    assert_eq!(r.create(ROOT, "..").unwrap_err(), libc::EINVAL);
    assert_eq!(r.create(ROOT, "../created.txt").unwrap_err(), libc::EINVAL);
    assert_eq!(r.mkdir(ROOT, "../created-dir").unwrap_err(), libc::EINVAL);
    assert!(!r.host("created.txt").exists() && !r.host("created-dir").exists());
    let (entry, _) = r.create(up.nodeid, "created.txt").unwrap();
    assert!(entry.nodeid > ROOT);
    assert!(r.host("share/created.txt").exists() && !r.host("created.txt").exists(), "lands in the share");
    assert_eq!(std::fs::read(r.host("secret.txt")).unwrap(), SECRET);
}

#[test]
fn malformed_requests_are_counted_and_survived() {
    let mut r = Rig::new("malformed", false);
    r.init();
    let mut expected = 0;
    let mut bump = |r: &Rig, what: &str| {
        expected += 1;
        assert_eq!(r.dev.errors(), expected, "{what} is counted");
    };

    // Truncated in_header.
    let reply = r.exchange(&[0u8; 20], &[desc(IN, 20, 0), desc(OUT, OUT_LEN, WRITE)]);
    assert_eq!(reply.used, 0);
    bump(&r, "truncated in_header");

    // in_header.len larger than the chain.
    let header = InHeader { len: 4096, opcode: Opcode::Lookup as u32, unique: 77, nodeid: ROOT, ..Default::default() };
    let mut input = header.as_slice().to_vec();
    input.extend_from_slice(&cstr("hello.txt"));
    let reply = r.exchange(&input, &[desc(IN, input.len() as u32, 0), desc(OUT, OUT_LEN, WRITE)]);
    assert_eq!((reply.used, reply.header.error, reply.header.unique), (16, -libc::EINVAL, 77));
    bump(&r, "len beyond the chain");

    // in_header.len smaller than the header itself.
    let header = InHeader { len: 8, opcode: Opcode::Getattr as u32, unique: 78, nodeid: ROOT, ..Default::default() };
    let reply = r.exchange(header.as_slice(), &[desc(IN, 40, 0), desc(OUT, OUT_LEN, WRITE)]);
    assert_eq!((reply.used, reply.header.error), (16, -libc::EINVAL));
    bump(&r, "len below the header size");

    // Unknown opcodes.
    for opcode in [0, 7, 19, 53, 9999, u32::MAX] {
        let reply = r.request(opcode, ROOT, &[]);
        assert_eq!((reply.used, reply.header.error), (16, -libc::ENOSYS), "opcode {opcode}");
        bump(&r, "unknown opcode");
    }

    // A write-only chain: nothing readable at all.
    let reply = r.exchange(&[], &[desc(OUT, OUT_LEN, WRITE)]);
    assert_eq!(reply.used, 0);
    bump(&r, "write-only chain");

    // A read-only chain: no room for any reply.
    let len = (IN_HEADER_BYTES + size_of::<GetattrIn>()) as u32;
    let header = InHeader { len, opcode: Opcode::Getattr as u32, unique: 79, nodeid: ROOT, ..Default::default() };
    let input = args(header, GetattrIn::default().as_slice());
    let reply = r.exchange(&input, &[desc(IN, input.len() as u32, 0)]);
    assert_eq!(reply.used, 0);
    bump(&r, "no writable part");

    // A reply buffer too small for the reply.
    r.mem.write_slice(&input, GuestAddress(IN)).unwrap();
    r.submit(&[desc(IN, input.len() as u32, 0), desc(OUT, 8, WRITE)]).unwrap();
    assert_eq!(r.last_used_len(), 0);
    bump(&r, "short reply buffer");

    // A name without its NUL: EINVAL before dispatch.
    let reply = r.request(Opcode::Lookup as u32, ROOT, b"hello.txt");
    assert_eq!((reply.used, reply.header.error), (16, -libc::EINVAL));
    bump(&r, "name without NUL");

    // A request cut short: OPEN without its OpenIn.
    let reply = r.request(Opcode::Open as u32, ROOT, &[0u8; 3]);
    assert_eq!(reply.used, 0);
    bump(&r, "short OPEN");

    // Buffers outside guest memory.
    r.mem.write_slice(&input, GuestAddress(IN)).unwrap();
    r.submit(&[desc(IN, input.len() as u32, 0), desc(0xffff_0000_0000, 4096, WRITE)]).unwrap();
    assert_eq!(r.last_used_len(), 0);
    bump(&r, "reply buffer outside memory");
    r.submit(&[desc(0xffff_0000_0000, 64, 0), desc(OUT, 4096, WRITE)]).unwrap();
    assert_eq!(r.last_used_len(), 0);
    bump(&r, "request outside memory");

    // The device keeps working.
    let entry = r.lookup(ROOT, "hello.txt").unwrap();
    let fh = r.open(entry.nodeid, libc::O_RDONLY).unwrap();
    assert_eq!(r.read(entry.nodeid, fh, 0, 4096).unwrap(), HELLO);
}

#[test]
fn read_only_share_checks_open_flags_before_anything_else() {
    let mut r = Rig::new("ro-short", true);
    r.init();
    // OPEN too short to carry its flags: refused, counted, not dispatched.
    let reply = r.request(Opcode::Open as u32, ROOT, &[0u8; 3]);
    assert_eq!((reply.used, reply.header.error), (16, -libc::EINVAL));
    assert_eq!(r.dev.errors(), 1);
    assert!(open_modifies(libc::O_WRONLY as u32));
    assert!(open_modifies((libc::O_RDONLY | libc::O_CREAT) as u32));
    assert!(!open_modifies((libc::O_RDONLY | libc::O_NONBLOCK | libc::O_DIRECTORY) as u32));
    // Defined opcodes the server lacks are answered ENOSYS by it and not counted.
    let reply = r.request(51, ROOT, &[0u8; 16]); // FUSE_TMPFILE: refused on a read-only share
    assert_eq!(reply.header.error, -libc::EROFS);
    let reply = r.request(50, ROOT, &[0u8; 8]); // FUSE_SYNCFS
    assert_eq!((reply.used, reply.header.error), (16, -libc::ENOSYS));
    assert_eq!(r.dev.errors(), 1);
}

#[test]
fn hiprio_queue_serves_forget() {
    let mut r = Rig::on_queue("hiprio", false, HIPRIO_QUEUE);
    r.init();
    let hello = r.lookup(ROOT, "hello.txt").unwrap().nodeid;
    let reply = r.request(Opcode::Forget as u32, hello, ForgetIn { nlookup: 1 }.as_slice());
    assert_eq!(reply.used, 0, "FORGET has no reply");
    assert_eq!(r.dev.errors(), 0);
    // The request queue was never made ready: notifications for it are ignored.
    let mut irqs = Irqs::default();
    assert!(r.dev.queue_event(REQUEST_QUEUE, &mut irqs).is_ok());
    assert!(r.dev.queue_event(7, &mut irqs).is_ok(), "no such queue");
    assert!(irqs.0.is_empty());
}

#[test]
fn reset_then_remount() {
    let mut r = Rig::new("remount", false);
    r.init();
    let hello = r.lookup(ROOT, "hello.txt").unwrap().nodeid;
    r.dev.reset();
    let mut irqs = Irqs::default();
    assert!(r.dev.queue_event(REQUEST_QUEUE, &mut irqs).is_ok(), "after reset nothing to do");
    // The driver sets the queue up again where the rings are now.
    let mut q: Queue = r.vq.create_queue().unwrap();
    q.set_next_avail(r.vq.avail().idx().load());
    q.set_next_used(r.vq.used().idx().load());
    let queues = vec![Queue::new(QUEUE_SIZE).unwrap(), q];
    r.dev.activate(r.mem.clone(), queues, VIRTIO_F_VERSION_1).unwrap();
    assert_eq!(r.getattr(hello).unwrap_err(), libc::EBADF, "old node ids are gone");
    assert_eq!(r.init().major, 7);
    let hello = r.lookup(ROOT, "hello.txt").unwrap().nodeid;
    let fh = r.open(hello, libc::O_RDONLY).unwrap();
    assert_eq!(r.read(hello, fh, 0, 4096).unwrap(), HELLO);
    // DESTROY (guest unmount) and INIT again without a device reset.
    assert_eq!(r.request(Opcode::Destroy as u32, 0, &[]).used, 0);
    assert_eq!(r.init().major, 7);
    assert_eq!(r.lookup(ROOT, "hello.txt").unwrap().attr.size, HELLO.len() as u64);
}

#[test]
fn runaway_available_index_breaks_the_device() {
    let mut r = Rig::new("idx", false);
    r.vq.avail().idx().store(5000);
    let mut irqs = Irqs::default();
    let err = r.dev.queue_event(REQUEST_QUEUE, &mut irqs).unwrap_err();
    assert!(matches!(err, DeviceError::AvailableRing { queue: "request", .. }), "{err}");
    r.dev.reset();
    assert!(r.dev.queue_event(REQUEST_QUEUE, &mut irqs).is_ok(), "after reset nothing to do");
}

#[test]
fn activation_wants_two_queues() {
    let dir = std::env::temp_dir();
    let mut dev = Fs::new("t", &dir, true).unwrap();
    let mem = GuestMemoryMmap::from_ranges(&[(GuestAddress(0), 0x1_0000)]).unwrap();
    let err = dev.activate(mem, vec![Queue::new(QUEUE_SIZE).unwrap()], VIRTIO_F_VERSION_1).unwrap_err();
    assert!(matches!(err, DeviceError::QueueCount { expected: 2, got: 1 }), "{err}");
    assert_eq!(err.to_string(), "expected 2 queue(s), got 1");
}

#[test]
fn bad_constructor_input() {
    let base = std::env::temp_dir().join(format!("shoji-fs-{}-ctor", std::process::id()));
    let _ = std::fs::remove_dir_all(&base);
    std::fs::create_dir_all(&base).unwrap();
    let file = base.join("plain-file");
    std::fs::write(&file, b"x").unwrap();

    let missing = base.join("missing");
    let e = Fs::new("tag", &missing, false).err().unwrap();
    assert!(matches!(e, FsError::Dir(..)), "{e}");
    assert!(e.to_string().starts_with(&format!("share: {}: ", missing.display())), "{e}");

    let e = Fs::new("tag", &file, false).err().unwrap();
    assert!(matches!(e, FsError::NotDir(_)), "{e}");
    assert_eq!(e.to_string(), format!("share: {}: not a directory", file.display()));

    for tag in ["", "a\0b", &"x".repeat(37)] {
        let e = Fs::new(tag, &base, false).err().unwrap();
        assert!(matches!(e, FsError::Tag(_)), "{e}");
        assert!(e.to_string().starts_with("share: tag "), "{e}");
    }
    let long = "y".repeat(36);
    let dev = Fs::new(&long, &base, false).unwrap();
    let mut cfg = [0u8; 40];
    dev.read_config(0, &mut cfg);
    assert_eq!(&cfg[..36], long.as_bytes(), "a 36-byte tag has no NUL");
    assert_eq!(dev.tag(), long);
    assert_eq!(dev.dir(), base.canonicalize().unwrap());
    drop(dev);
    std::fs::remove_dir_all(&base).unwrap();
}
