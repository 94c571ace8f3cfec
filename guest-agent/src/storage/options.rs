//! Mount options as strings ("ro", "nosuid", "size=64m") → mount(2) flags, propagation and data.

use libc::c_ulong;

/// What mount(2) gets from a list of option strings.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    /// `MS_*` flags for the mount itself (`MS_BIND`, `MS_REC` included).
    pub flags: c_ulong,
    /// `MS_PRIVATE`, `MS_SHARED`, ... (with `MS_REC` for the `r` forms): applied by a second call.
    pub propagation: Option<c_ulong>,
    /// What is left ("size=64m,mode=755"), passed to the filesystem as data.
    pub data: String,
}

impl MountOptions {
    pub fn is_bind(&self) -> bool {
        self.flags & libc::MS_BIND != 0
    }
}

/// Splits options into flags, propagation and filesystem data; an option that is no flag is
/// data. Later options win ("ro,rw" is read-write), as with mount(8).
pub fn parse_mount_options<S: AsRef<str>>(options: &[S]) -> MountOptions {
    let mut out = MountOptions::default();
    let mut data: Vec<&str> = Vec::new();
    for opt in options.iter().flat_map(|o| o.as_ref().split(',')) {
        let opt = opt.trim();
        if opt.is_empty() || opt == "defaults" {
            continue;
        }
        if let Some((set, flag)) = flag_of(opt) {
            if set {
                out.flags |= flag;
            } else {
                out.flags &= !flag;
            }
        } else if let Some(p) = propagation_of(opt) {
            out.propagation = Some(p);
        } else {
            data.push(opt);
        }
    }
    out.data = data.join(",");
    out
}

/// (set or clear, flag) for a flag option.
fn flag_of(opt: &str) -> Option<(bool, c_ulong)> {
    Some(match opt {
        "ro" => (true, libc::MS_RDONLY),
        "rw" => (false, libc::MS_RDONLY),
        "nosuid" => (true, libc::MS_NOSUID),
        "suid" => (false, libc::MS_NOSUID),
        "nodev" => (true, libc::MS_NODEV),
        "dev" => (false, libc::MS_NODEV),
        "noexec" => (true, libc::MS_NOEXEC),
        "exec" => (false, libc::MS_NOEXEC),
        "sync" => (true, libc::MS_SYNCHRONOUS),
        "async" => (false, libc::MS_SYNCHRONOUS),
        "dirsync" => (true, libc::MS_DIRSYNC),
        "noatime" => (true, libc::MS_NOATIME),
        "atime" => (false, libc::MS_NOATIME),
        "nodiratime" => (true, libc::MS_NODIRATIME),
        "diratime" => (false, libc::MS_NODIRATIME),
        "relatime" => (true, libc::MS_RELATIME),
        "norelatime" => (false, libc::MS_RELATIME),
        "strictatime" => (true, libc::MS_STRICTATIME),
        "bind" => (true, libc::MS_BIND),
        "rbind" => (true, libc::MS_BIND | libc::MS_REC),
        _ => return None,
    })
}

fn propagation_of(opt: &str) -> Option<c_ulong> {
    Some(match opt {
        "private" => libc::MS_PRIVATE,
        "rprivate" => libc::MS_PRIVATE | libc::MS_REC,
        "shared" => libc::MS_SHARED,
        "rshared" => libc::MS_SHARED | libc::MS_REC,
        "slave" => libc::MS_SLAVE,
        "rslave" => libc::MS_SLAVE | libc::MS_REC,
        "unbindable" => libc::MS_UNBINDABLE,
        "runbindable" => libc::MS_UNBINDABLE | libc::MS_REC,
        _ => return None,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flags_propagation_and_data_are_split() {
        let o = parse_mount_options(&["ro", "nosuid,nodev", "size=64m", "mode=755", "rprivate"]);
        assert_eq!(o.flags, libc::MS_RDONLY | libc::MS_NOSUID | libc::MS_NODEV);
        assert_eq!(o.propagation, Some(libc::MS_PRIVATE | libc::MS_REC));
        assert_eq!(o.data, "size=64m,mode=755");
        assert!(!o.is_bind());
    }

    #[test]
    fn later_options_win_and_empty_ones_are_skipped() {
        let o = parse_mount_options(&["ro", "", "defaults", "rw", " exec "]);
        assert_eq!(o, MountOptions::default());
        let o = parse_mount_options(&["rbind"]);
        assert!(o.is_bind() && o.flags & libc::MS_REC != 0);
        assert_eq!(parse_mount_options::<&str>(&[]), MountOptions::default());
    }
}
