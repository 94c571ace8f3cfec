//! Mount options ("ro", "nosuid", "rbind", "rslave", "size=64m"): the one table of option words
//! the host (the shim mounting containerd's snapshots) and the agent (storages, OCI mounts)
//! share. Pure: the `MS_*` values are Linux's ABI, defined here so that the model needs no libc.

/// `mount(2)` flags (Linux ABI values, as in `<linux/mount.h>`).
pub const MS_RDONLY: u64 = 1;
pub const MS_NOSUID: u64 = 1 << 1;
pub const MS_NODEV: u64 = 1 << 2;
pub const MS_NOEXEC: u64 = 1 << 3;
pub const MS_SYNCHRONOUS: u64 = 1 << 4;
pub const MS_REMOUNT: u64 = 1 << 5;
pub const MS_MANDLOCK: u64 = 1 << 6;
pub const MS_DIRSYNC: u64 = 1 << 7;
pub const MS_NOSYMFOLLOW: u64 = 1 << 8;
pub const MS_NOATIME: u64 = 1 << 10;
pub const MS_NODIRATIME: u64 = 1 << 11;
pub const MS_BIND: u64 = 1 << 12;
pub const MS_REC: u64 = 1 << 14;
pub const MS_SILENT: u64 = 1 << 15;
pub const MS_UNBINDABLE: u64 = 1 << 17;
pub const MS_PRIVATE: u64 = 1 << 18;
pub const MS_SLAVE: u64 = 1 << 19;
pub const MS_SHARED: u64 = 1 << 20;
pub const MS_RELATIME: u64 = 1 << 21;
pub const MS_I_VERSION: u64 = 1 << 23;
pub const MS_STRICTATIME: u64 = 1 << 24;
pub const MS_LAZYTIME: u64 = 1 << 25;

/// What one option word means.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MountOptionWord {
    /// Sets and clears `MS_*` flags ("ro" sets `MS_RDONLY`, "rw" clears it).
    Flags { set: u64, clear: u64 },
    /// A bind mount; "rbind" is recursive (`MS_REC`).
    Bind { recursive: bool },
    /// A propagation change (`MS_PRIVATE`, ..., with `MS_REC` for the "r" forms), made by a
    /// second mount(2) call after the mount.
    Propagation(u64),
    /// Accepted and ignored: "defaults", and runc's "tmpcopyup" (not supported).
    Ignored,
    /// Refused, with the reason: something Shoji cannot do and must not silently skip.
    Unsupported(&'static str),
}

use MountOptionWord::{Bind, Flags, Ignored, Propagation, Unsupported};

const fn set(f: u64) -> MountOptionWord {
    Flags { set: f, clear: 0 }
}
const fn clear(f: u64) -> MountOptionWord {
    Flags { set: 0, clear: f }
}

const RECURSIVE_ATTRS: MountOptionWord = Unsupported("recursive mount attributes are not supported");

/// Every option word Shoji knows; any other word is filesystem data ("size=64m", "mode=755").
pub const MOUNT_OPTIONS: &[(&str, MountOptionWord)] = &[
    ("defaults", Ignored),
    ("ro", set(MS_RDONLY)),
    ("rw", clear(MS_RDONLY)),
    ("nosuid", set(MS_NOSUID)),
    ("suid", clear(MS_NOSUID)),
    ("nodev", set(MS_NODEV)),
    ("dev", clear(MS_NODEV)),
    ("noexec", set(MS_NOEXEC)),
    ("exec", clear(MS_NOEXEC)),
    ("sync", set(MS_SYNCHRONOUS)),
    ("async", clear(MS_SYNCHRONOUS)),
    ("dirsync", set(MS_DIRSYNC)),
    ("remount", set(MS_REMOUNT)),
    ("mand", set(MS_MANDLOCK)),
    ("nomand", clear(MS_MANDLOCK)),
    ("atime", clear(MS_NOATIME)),
    ("noatime", set(MS_NOATIME)),
    ("diratime", clear(MS_NODIRATIME)),
    ("nodiratime", set(MS_NODIRATIME)),
    ("relatime", set(MS_RELATIME)),
    ("norelatime", clear(MS_RELATIME)),
    ("strictatime", set(MS_STRICTATIME)),
    ("nostrictatime", clear(MS_STRICTATIME)),
    ("lazytime", set(MS_LAZYTIME)),
    ("nolazytime", clear(MS_LAZYTIME)),
    ("iversion", set(MS_I_VERSION)),
    ("noiversion", clear(MS_I_VERSION)),
    ("silent", set(MS_SILENT)),
    ("loud", clear(MS_SILENT)),
    ("nosymfollow", set(MS_NOSYMFOLLOW)),
    ("symfollow", clear(MS_NOSYMFOLLOW)),
    ("bind", Bind { recursive: false }),
    ("rbind", Bind { recursive: true }),
    ("private", Propagation(MS_PRIVATE)),
    ("rprivate", Propagation(MS_PRIVATE | MS_REC)),
    ("shared", Propagation(MS_SHARED)),
    ("rshared", Propagation(MS_SHARED | MS_REC)),
    ("slave", Propagation(MS_SLAVE)),
    ("rslave", Propagation(MS_SLAVE | MS_REC)),
    ("unbindable", Propagation(MS_UNBINDABLE)),
    ("runbindable", Propagation(MS_UNBINDABLE | MS_REC)),
    ("tmpcopyup", Ignored),
    ("idmap", Unsupported("id-mapped mounts are not supported")),
    ("ridmap", Unsupported("id-mapped mounts are not supported")),
    ("rro", RECURSIVE_ATTRS),
    ("rrw", RECURSIVE_ATTRS),
    ("rnosuid", RECURSIVE_ATTRS),
    ("rsuid", RECURSIVE_ATTRS),
    ("rnodev", RECURSIVE_ATTRS),
    ("rdev", RECURSIVE_ATTRS),
    ("rnoexec", RECURSIVE_ATTRS),
    ("rexec", RECURSIVE_ATTRS),
    ("rnoatime", RECURSIVE_ATTRS),
    ("ratime", RECURSIVE_ATTRS),
    ("rnodiratime", RECURSIVE_ATTRS),
    ("rdiratime", RECURSIVE_ATTRS),
    ("rrelatime", RECURSIVE_ATTRS),
    ("rnorelatime", RECURSIVE_ATTRS),
    ("rstrictatime", RECURSIVE_ATTRS),
    ("rnostrictatime", RECURSIVE_ATTRS),
    ("rnosymfollow", RECURSIVE_ATTRS),
    ("rsymfollow", RECURSIVE_ATTRS),
];

/// The meaning of `word`, or `None` for filesystem data.
pub fn mount_option(word: &str) -> Option<MountOptionWord> {
    MOUNT_OPTIONS.iter().find(|(w, _)| *w == word).map(|(_, m)| *m)
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum MountOptionError {
    #[error("{option:?}: {why}")]
    Unsupported { option: String, why: &'static str },
    #[error("{option:?}: contains a NUL byte")]
    Nul { option: String },
}

/// What mount(2) gets from a list of options.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct MountOptions {
    /// `MS_*` flags of the mount (`MS_REC` for "rbind"; `MS_BIND` is in [`Self::bind`]).
    pub flags: u64,
    /// "bind" or "rbind" was given.
    pub bind: bool,
    /// Propagation changes to make after the mount, in order.
    pub propagation: Vec<u64>,
    /// Filesystem data words, in order; [`Self::data_string`] joins them for mount(2).
    pub data: Vec<String>,
}

impl MountOptions {
    /// Parses option lists as OCI (`mounts[].options`) and containerd (`Mount.options`) give
    /// them: each entry may itself hold several comma-separated words; blanks around words
    /// and empty words are dropped. Later words win ("ro,rw" is read-write), as with mount(8).
    pub fn parse<S: AsRef<str>>(options: &[S]) -> Result<Self, MountOptionError> {
        let mut m = MountOptions::default();
        for word in options.iter().flat_map(|o| o.as_ref().split(',')).map(str::trim).filter(|w| !w.is_empty()) {
            match mount_option(word) {
                Some(Flags { set, clear }) => m.flags = (m.flags | set) & !clear,
                Some(Bind { recursive }) => {
                    m.bind = true;
                    if recursive {
                        m.flags |= MS_REC;
                    }
                }
                Some(Propagation(p)) => m.propagation.push(p),
                Some(Ignored) => {
                    if word != "defaults" {
                        tracing::debug!("mount option {word:?} is not supported; ignored");
                    }
                }
                Some(Unsupported(why)) => return Err(MountOptionError::Unsupported { option: word.into(), why }),
                None if word.contains('\0') => return Err(MountOptionError::Nul { option: word.into() }),
                None => m.data.push(word.to_string()),
            }
        }
        Ok(m)
    }

    /// The flags for a single mount(2) call: [`Self::flags`] plus `MS_BIND` for a bind mount.
    pub fn mount_flags(&self) -> u64 {
        self.flags | if self.bind { MS_BIND } else { 0 }
    }

    /// The data words joined for mount(2) ("size=64m,mode=755").
    pub fn data_string(&self) -> String {
        self.data.join(",")
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &[&str]) -> Result<MountOptions, MountOptionError> {
        MountOptions::parse(v)
    }

    #[test]
    fn flags_bind_propagation_and_data_are_split() {
        let m = parse(&["nosuid", "noexec", "mode=755", "size=65536k", "rbind", "rslave", "ro", "rw"]).unwrap();
        assert_eq!(m.flags, MS_NOSUID | MS_NOEXEC | MS_REC);
        assert!(m.bind);
        assert_eq!(m.mount_flags(), MS_NOSUID | MS_NOEXEC | MS_REC | MS_BIND);
        assert_eq!(m.propagation, vec![MS_SLAVE | MS_REC]);
        assert_eq!(m.data, ["mode=755", "size=65536k"]);
        assert_eq!(m.data_string(), "mode=755,size=65536k");
    }

    #[test]
    fn commas_blanks_defaults_and_order() {
        let m = parse(&["ro", "nosuid,nodev", "", " defaults ", "size=64m", "rprivate,shared"]).unwrap();
        assert_eq!(m.flags, MS_RDONLY | MS_NOSUID | MS_NODEV);
        assert_eq!(m.propagation, vec![MS_PRIVATE | MS_REC, MS_SHARED]);
        assert_eq!(m.data_string(), "size=64m");
        assert_eq!(parse(&["ro", "rw", " exec ", "tmpcopyup"]).unwrap(), MountOptions::default());
        assert_eq!(parse(&[]).unwrap(), MountOptions::default());
        let m = parse(&["bind"]).unwrap();
        assert!(m.bind && m.flags & MS_REC == 0);
    }

    #[test]
    fn unsupported_words_and_nul_are_refused() {
        for w in ["idmap", "ridmap", "rro", "rnosymfollow"] {
            assert!(matches!(parse(&[w]), Err(MountOptionError::Unsupported { .. })), "{w}");
        }
        let e = parse(&["ro", "idmap"]).unwrap_err().to_string();
        assert_eq!(e, "\"idmap\": id-mapped mounts are not supported");
        assert_eq!(parse(&["a\0b"]), Err(MountOptionError::Nul { option: "a\0b".into() }));
    }

    #[test]
    fn every_word_is_in_the_table_once() {
        for (i, (w, _)) in MOUNT_OPTIONS.iter().enumerate() {
            assert!(MOUNT_OPTIONS[..i].iter().all(|(x, _)| x != w), "{w} twice");
            assert!(!w.contains(',') && !w.contains('='), "{w}");
        }
    }

    /// The ABI values defined here are libc's.
    #[test]
    fn flag_values_are_linux_abi() {
        let ours = [
            (MS_RDONLY, libc::MS_RDONLY),
            (MS_NOSUID, libc::MS_NOSUID),
            (MS_NODEV, libc::MS_NODEV),
            (MS_NOEXEC, libc::MS_NOEXEC),
            (MS_SYNCHRONOUS, libc::MS_SYNCHRONOUS),
            (MS_REMOUNT, libc::MS_REMOUNT),
            (MS_MANDLOCK, libc::MS_MANDLOCK),
            (MS_DIRSYNC, libc::MS_DIRSYNC),
            (MS_NOATIME, libc::MS_NOATIME),
            (MS_NODIRATIME, libc::MS_NODIRATIME),
            (MS_BIND, libc::MS_BIND),
            (MS_REC, libc::MS_REC),
            (MS_SILENT, libc::MS_SILENT),
            (MS_UNBINDABLE, libc::MS_UNBINDABLE),
            (MS_PRIVATE, libc::MS_PRIVATE),
            (MS_SLAVE, libc::MS_SLAVE),
            (MS_SHARED, libc::MS_SHARED),
            (MS_RELATIME, libc::MS_RELATIME),
            (MS_I_VERSION, libc::MS_I_VERSION),
            (MS_STRICTATIME, libc::MS_STRICTATIME),
            (MS_LAZYTIME, libc::MS_LAZYTIME),
        ];
        for (i, (a, b)) in ours.iter().enumerate() {
            assert_eq!(u128::from(*a), u128::from(*b), "flag {i}");
        }
        // libc has no MS_NOSYMFOLLOW; the kernel's is 256.
        assert_eq!(MS_NOSYMFOLLOW, 256);
    }
}
