//! Real mounts (we run as root): the attacks a guest with write access to the shared tree could
//! try on the shim's host mounts, and the properties of the mounts the shim makes.
use super::*;
use std::os::unix::fs::{symlink, MetadataExt};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

fn v(s: &[&str]) -> Vec<String> {
    s.iter().map(|x| x.to_string()).collect()
}

/// A sandbox directory, a source directory (file `f`, empty `sub/`) and a victim directory,
/// all in one temp dir whose mounts are all undone on drop.
struct Rig {
    tmp: tempfile::TempDir,
    dir: PathBuf,
    src: PathBuf,
    victim: PathBuf,
    share: Share,
}

impl Rig {
    fn new() -> Rig {
        // SAFETY: geteuid has no preconditions.
        assert_eq!(unsafe { libc::geteuid() }, 0, "these tests need root (mounts); CI runs as root");
        let tmp = tempfile::tempdir().unwrap();
        let src = tmp.path().join("src");
        std::fs::create_dir_all(src.join("sub")).unwrap();
        std::fs::write(src.join("f"), "x").unwrap();
        let victim = tmp.path().join("victim");
        std::fs::create_dir(&victim).unwrap();
        let dir = tmp.path().join("sandbox");
        let share = Share::open(&dir).unwrap();
        Rig { tmp, dir, src, victim, share }
    }

    fn staging(&self, rel: &str) -> PathBuf {
        self.dir.join("staging").join(rel)
    }

    fn shared(&self, rel: &str) -> PathBuf {
        self.dir.join("shared").join(rel)
    }
}

impl Drop for Rig {
    fn drop(&mut self) {
        for _ in 0..4 {
            for m in mounts_under(self.tmp.path()) {
                let p = CString::new(m.as_os_str().as_bytes()).unwrap();
                // SAFETY: p is a NUL-terminated path that outlives the call.
                unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
            }
        }
    }
}

/// The per-mount options of the top mount at `p`.
fn mount_opts(p: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").unwrap();
    info.lines().rfind(|l| l.split(' ').nth(4).map(unescape).as_deref() == Some(p)).map(|l| {
        let f: Vec<&str> = l.split(' ').collect();
        format!("{},{}", f[5], f[f.len() - 1])
    })
}

fn mode(p: &Path) -> u32 {
    std::fs::symlink_metadata(p).unwrap().mode() & 0o7777
}

fn tmpfs(at: &Path) {
    let (s, t) = (c"tmpfs", CString::new(at.as_os_str().as_bytes()).unwrap());
    // SAFETY: NUL-terminated strings that outlive the call; no data argument.
    assert_eq!(unsafe { libc::mount(s.as_ptr(), t.as_ptr(), s.as_ptr(), 0, std::ptr::null()) }, 0);
}

#[test]
fn options_split_into_flags_and_data() {
    let (f, d) = parse_options(&v(&["index=off", "workdir=/w", "upperdir=/u", "lowerdir=/l1:/l2"])).unwrap();
    assert_eq!((f, d.as_str()), (0, "index=off,workdir=/w,upperdir=/u,lowerdir=/l1:/l2"));
    let (f, d) = parse_options(&v(&["rbind", "ro", "nosuid"])).unwrap();
    assert_eq!(f, libc::MS_BIND | libc::MS_REC | libc::MS_RDONLY | libc::MS_NOSUID);
    assert_eq!(d, "");
    let (f, _) = parse_options(&v(&["ro", "rw"])).unwrap();
    assert_eq!(f, 0, "the last of ro/rw wins");
    assert!(parse_options(&v(&["idmap"])).is_err());
    // containerd may put several words in one entry.
    let (f, d) = parse_options(&v(&["ro,nodev", "size=1m"])).unwrap();
    assert_eq!((f, d.as_str()), (libc::MS_RDONLY | libc::MS_NODEV, "size=1m"));
}

#[test]
fn mountinfo_escapes_are_undone() {
    assert_eq!(unescape(r"/a\040b\134c\011"), Path::new("/a b\\c\t"));
    assert_eq!(unescape(r"/a\04"), Path::new(r"/a\04"));
}

#[test]
fn bind_and_remove_leave_nothing() {
    let r = Rig::new();
    r.share.bind(Path::new("c/rootfs"), &r.src, true).unwrap();
    r.share.bind(Path::new("c/mounts/0"), &r.src.join("f"), false).unwrap();
    assert_eq!(std::fs::read_to_string(r.shared("c/rootfs/f")).unwrap(), "x");
    assert!(std::fs::write(r.shared("c/rootfs/g"), "y").is_err(), "read-only bind");
    std::fs::write(r.shared("c/mounts/0"), "z").unwrap();
    assert_eq!(std::fs::read_to_string(r.src.join("f")).unwrap(), "z", "read-write bind of a file");
    assert_eq!(mounts_under(&r.shared("c")).len(), 2);
    // A second Share::open (every Create opens it) reuses the view.
    Share::open(&r.dir).unwrap();
    assert_eq!(mounts_under(&r.dir).len(), 3, "{:?}", mounts_under(&r.dir));

    remove_container(&r.dir, "c");
    assert!(mounts_under(&r.shared("c")).is_empty());
    assert!(!r.staging("c").exists());
    remove_container(&r.dir, "c"); // again: nothing to do
    remove_tree(&r.dir);
    assert!(!r.dir.exists());
    assert!(mounts_under(r.tmp.path()).is_empty());
    assert_eq!(std::fs::read_to_string(r.src.join("f")).unwrap(), "z", "the source is untouched");
    remove_tree(&r.dir); // again: nothing to do
}

/// What virtio-fs serves is read-only but for the binds: the guest cannot plant anything
/// where the shim creates its mount targets.
#[test]
fn the_guest_cannot_change_the_shared_tree() {
    let r = Rig::new();
    r.share.bind(Path::new("c/rootfs"), &r.src, false).unwrap();
    let erofs = |res: io::Result<()>| res.map_err(|e| e.raw_os_error());
    assert_eq!(erofs(std::fs::create_dir(r.shared("d"))), Err(Some(libc::EROFS)));
    assert_eq!(erofs(symlink(&r.victim, r.shared("c/mounts"))), Err(Some(libc::EROFS)));
    assert_eq!(erofs(std::fs::rename(r.shared("c"), r.shared("c2"))), Err(Some(libc::EROFS)));
    assert_eq!(erofs(std::fs::remove_dir(r.shared("c"))), Err(Some(libc::EROFS)));
    // ...while the container's own rootfs stays writable.
    std::fs::write(r.shared("c/rootfs/new"), "y").unwrap();
    assert!(r.src.join("new").exists());
}

/// Planted before Create: a symlink at the target itself.
#[test]
fn a_planted_symlink_target_redirects_nothing() {
    let r = Rig::new();
    std::fs::create_dir(r.staging("c")).unwrap();
    symlink(&r.victim, r.staging("c/rootfs")).unwrap();
    let e = r.share.bind(Path::new("c/rootfs"), &r.src, false).unwrap_err();
    assert_eq!(e.raw_os_error(), None, "a message that names the path: {e}");
    assert!(e.to_string().contains("c/rootfs"), "{e}");
    assert!(mounts_under(&r.victim).is_empty(), "victim mounted: {:?}", mounts_under(&r.victim));
    assert!(mounts_under(&r.shared("c")).is_empty());
    // A file target too.
    symlink(r.victim.join("file"), r.staging("c/m0")).unwrap();
    assert!(r.share.bind(Path::new("c/m0"), &r.src.join("f"), false).is_err());
    assert!(!r.victim.join("file").exists(), "nothing created through the symlink");
}

/// Planted before Create: a symlink on a parent component.
#[test]
fn a_planted_symlink_parent_redirects_nothing() {
    let r = Rig::new();
    symlink(&r.victim, r.staging("c")).unwrap();
    let e = r.share.bind(Path::new("c/mounts/0"), &r.src, false).unwrap_err();
    assert!(e.to_string().contains("c/mounts/0"), "{e}");
    assert!(mounts_under(&r.victim).is_empty(), "victim mounted: {:?}", mounts_under(&r.victim));
    assert_eq!(std::fs::read_dir(&r.victim).unwrap().count(), 0, "nothing created in the victim");
    // An absolute symlink to a parent of the sandbox, and `..`, are refused too.
    std::fs::remove_file(r.staging("c")).unwrap();
    symlink("..", r.staging("c")).unwrap();
    assert!(r.share.bind(Path::new("c/x"), &r.src, false).is_err());
    assert!(r.share.bind(Path::new("../victim"), &r.src, false).is_err());
    assert!(mounts_under(&r.victim).is_empty());
}

/// Swapped in while the shim works: a thread exchanges the target's parent with a symlink to
/// the victim, and the target with a symlink, as fast as it can, while bind runs many times.
#[test]
fn a_symlink_swapped_in_during_bind_redirects_nothing() {
    const ROUNDS: usize = 2000;
    let r = Rig::new();
    std::fs::create_dir_all(r.staging("c/mounts/t")).unwrap();
    std::fs::create_dir_all(r.victim.join("t")).unwrap();
    symlink(&r.victim, r.staging("c/link")).unwrap();
    symlink(r.victim.join("t"), r.staging("c/mounts/tl")).unwrap();
    let stop = Arc::new(AtomicBool::new(false));
    let (c, m) = (open_dir(&r.staging("c")).unwrap(), open_dir(&r.staging("c/mounts")).unwrap());
    let racer = {
        let stop = stop.clone();
        std::thread::spawn(move || {
            // SAFETY: renameat2 on a valid dir fd and NUL-terminated names that outlive the call.
            let xchg = |d: &OwnedFd, a: &CStr, b: &CStr| unsafe {
                libc::renameat2(d.as_raw_fd(), a.as_ptr(), d.as_raw_fd(), b.as_ptr(), libc::RENAME_EXCHANGE)
            };
            let mut swaps = 0u64;
            while !stop.load(Ordering::Relaxed) {
                swaps += u64::from(xchg(&c, c"mounts", c"link") == 0);
                swaps += u64::from(xchg(&m, c"t", c"tl") == 0);
            }
            swaps
        })
    };
    let (mut ok, mut refused, mut hits) = (0, 0, 0);
    for _ in 0..ROUNDS {
        match r.share.bind(Path::new("c/mounts/t"), &r.src, false) {
            Ok(()) => ok += 1,
            Err(_) => refused += 1,
        }
        if !mounts_under(&r.victim).is_empty() {
            hits += 1;
            let p = CString::new(r.victim.join("t").as_os_str().as_bytes()).unwrap();
            // SAFETY: p is a NUL-terminated path that outlives the call.
            unsafe { libc::umount2(p.as_ptr(), libc::MNT_DETACH) };
        }
        // Our mount may be under either name while the racer runs.
        while !mounts_under(&r.shared("c")).is_empty() {
            unmount_beneath(&r.dir, &r.shared("c"));
        }
    }
    stop.store(true, Ordering::Relaxed);
    let swaps = racer.join().unwrap();
    eprintln!("{ROUNDS} binds: {ok} mounted, {refused} refused, {hits} redirected; {swaps} swaps");
    assert_eq!(hits, 0, "a swapped-in symlink redirected {hits} of {ROUNDS} binds");
    assert!(refused > 0 && swaps > 0, "the race never hit the shim (test did not test)");
    assert!(ok > 0, "binds succeed between swaps");
}

#[test]
fn binds_are_nosuid_nodev_and_what_the_shim_creates_is_private() {
    let r = Rig::new();
    // A directory an older shim made 0755 is tightened.
    std::fs::set_permissions(&r.dir, std::fs::Permissions::from_mode(0o755)).unwrap();
    let share = Share::open(&r.dir).unwrap();
    share.bind(Path::new("c/rootfs"), &r.src, false).unwrap();
    share.bind(Path::new("c/mounts/0"), &r.src.join("f"), true).unwrap();
    for (p, want) in [("c/rootfs", "rw"), ("c/mounts/0", "ro"), ("", "ro")] {
        let o = mount_opts(&r.shared(p).components().collect::<PathBuf>()).unwrap_or_default();
        let has = |w: &str| o.split(',').any(|x| x == w);
        assert!(has("nosuid") && has("nodev") && has(want), "{p}: {o}");
    }
    for p in ["", "c", "c/mounts", "c/rootfs"] {
        assert_eq!(mode(&r.staging(p)), 0o700, "staging/{p}");
    }
    assert_eq!(mode(&r.staging("c/mounts/0")), 0o600);
    assert_eq!(mode(&r.dir), 0o700);
    assert_eq!(mode(&r.dir.join("shared")), 0o700);
}

#[test]
fn a_read_only_bind_is_read_only_in_its_submounts() {
    let r = Rig::new();
    tmpfs(&r.src.join("sub"));
    r.share.bind(Path::new("c/ro"), &r.src, true).unwrap();
    r.share.bind(Path::new("c/rw"), &r.src, false).unwrap();
    let e = std::fs::write(r.shared("c/ro/sub/x"), "y").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    std::fs::write(r.shared("c/rw/sub/x"), "y").unwrap();
    assert_eq!(std::fs::read_to_string(r.shared("c/ro/sub/x")).unwrap(), "y", "same submount, read-only");
    let o = mount_opts(&r.shared("c/ro/sub")).unwrap();
    assert!(o.split(',').any(|x| x == "nosuid") && o.split(',').any(|x| x == "nodev"), "{o}");
}

/// Teardown reads mount points from mountinfo and unmounts them a moment later: a symlink
/// planted on that path meanwhile must not make it unmount something else.
#[test]
fn teardown_does_not_follow_a_planted_symlink() {
    let r = Rig::new();
    std::fs::create_dir(r.victim.join("rootfs")).unwrap();
    tmpfs(&r.victim.join("rootfs"));
    symlink(&r.victim, r.staging("c")).unwrap();
    let root = open_dir(&r.dir).unwrap();
    unmount_at(root.as_fd(), Path::new("shared/c/rootfs"));
    remove_container(&r.dir, "c");
    assert_eq!(mounts_under(&r.victim).len(), 1, "the victim's mount is still there");
    assert!(r.victim.join("rootfs").exists());
}

/// containerd's bind snapshot mounts (`<bundle>/rootfs`): read-only all the way down too.
#[test]
fn snapshot_bind_mounts_are_recursive_read_only() {
    let r = Rig::new();
    tmpfs(&r.src.join("sub"));
    let target = r.tmp.path().join("bundle-rootfs");
    std::fs::create_dir(&target).unwrap();
    let m = MountSpec { fstype: "bind".into(), source: r.src.display().to_string(), options: v(&["rbind", "ro"]) };
    mount_all(&[m], &target).unwrap();
    let e = std::fs::write(target.join("sub/x"), "y").unwrap_err();
    assert_eq!(e.raw_os_error(), Some(libc::EROFS), "{e}");
    unmount_all(&target);
    assert!(mounts_under(&target).is_empty());
}
