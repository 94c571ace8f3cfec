//! The OCI layer unpacker (`shoji run --image`) on arbitrary tar bytes: one or two layers applied
//! in order to a fresh rootfs. Beside the rootfs is a sentinel directory a layer may try to
//! reach (`../sentinel/...`, or its absolute path, which the seeds hold, through symlinks,
//! hard links, whiteouts, opaque whiteouts); after every input the sentinel must be exactly as
//! it was and nothing but the rootfs may have appeared in their parent directory. Errors are
//! fine (most inputs are refused); escaping, or a panic, is the bug.
//!
//! Input: a little-endian u32 N, then layer 1 (N bytes, clamped), then layer 2 (the rest, when
//! not empty). Shorter than 4 bytes: the whole input is one layer.
#![no_main]
use libfuzzer_sys::fuzz_target;
use shoji_cli::layer::{apply, Budget, Rootfs};
use std::io::Cursor;
use std::os::unix::fs::MetadataExt;
use std::path::{Path, PathBuf};
use std::sync::OnceLock;

/// Fixed, so that seeds can name the sentinel by its absolute path.
const TOP: &str = "/tmp/shoji-fuzz-oci-layer";

struct Fixture {
    top: PathBuf,
    sentinel: PathBuf,
    snapshot: Vec<(PathBuf, u32, u64, u64, Vec<u8>)>,
}

/// (path, mode, nlink, size, contents or link target) of everything under `dir`, sorted.
fn snapshot(dir: &Path) -> Vec<(PathBuf, u32, u64, u64, Vec<u8>)> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        for e in std::fs::read_dir(&d).expect("sentinel listing") {
            let p = e.expect("sentinel entry").path();
            let m = std::fs::symlink_metadata(&p).expect("sentinel metadata");
            let body = if m.file_type().is_symlink() {
                std::fs::read_link(&p).expect("sentinel link").into_os_string().into_encoded_bytes()
            } else if m.is_file() {
                std::fs::read(&p).expect("sentinel file")
            } else {
                stack.push(p.clone());
                Vec::new()
            };
            out.push((p, m.mode(), m.nlink(), m.len(), body));
        }
    }
    out.sort();
    out
}

fn fixture() -> &'static Fixture {
    static F: OnceLock<Fixture> = OnceLock::new();
    F.get_or_init(|| {
        let top = PathBuf::from(TOP);
        let _ = std::fs::remove_dir_all(&top);
        let sentinel = top.join("sentinel");
        std::fs::create_dir_all(sentinel.join("sub")).unwrap();
        std::fs::write(sentinel.join("keep"), b"sentinel file").unwrap();
        std::fs::write(sentinel.join("sub/deep"), b"deeper").unwrap();
        std::os::unix::fs::symlink("keep", sentinel.join("link")).unwrap();
        let snapshot = snapshot(&sentinel);
        Fixture { top, sentinel, snapshot }
    })
}

fuzz_target!(|data: &[u8]| {
    let f = fixture();
    let (l1, l2) = match data.get(..4) {
        Some(n) => {
            let rest = &data[4..];
            let n = (u32::from_le_bytes([n[0], n[1], n[2], n[3]]) as usize).min(rest.len());
            (&rest[..n], Some(&rest[n..]).filter(|r| !r.is_empty()))
        }
        None => (data, None),
    };
    let root = f.top.join("rootfs");
    std::fs::create_dir(&root).unwrap();
    let rootfs = Rootfs::open(&root).unwrap();
    // Small enough to keep runs fast; the caps themselves are exercised too.
    let mut budget = Budget { bytes: 1 << 20, entries: 4096 };
    if apply(&rootfs, &mut Cursor::new(l1), &mut budget).is_ok() {
        if let Some(l2) = l2 {
            let _ = apply(&rootfs, &mut Cursor::new(l2), &mut budget);
        }
    }
    drop(rootfs);
    assert!(snapshot(&f.sentinel) == f.snapshot, "the sentinel directory changed");
    let mut names: Vec<_> = std::fs::read_dir(&f.top).unwrap().map(|e| e.unwrap().file_name()).collect();
    names.sort();
    assert_eq!(names, ["rootfs", "sentinel"], "something appeared beside the rootfs");
    // remove_dir_all does not follow symlinks; a layer's 000 directories are no obstacle to root.
    std::fs::remove_dir_all(&root).unwrap();
});
