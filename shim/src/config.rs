//! The shim's configuration: a TOML file, every key optional, defaults that boot the cached guest.
//!
//! Found at, first match: the `config_path` of the runtime options containerd passes (CRI's
//! `[...runtimes.shoji.options] ConfigPath = "..."`), `$SHOJI_SHIM_CONFIG`, `/etc/shoji/shim.toml`.
//! A missing default file means the defaults; a named file that is missing or wrong is an error.
use serde::Deserialize;
use std::path::{Path, PathBuf};

pub const DEFAULT_PATH: &str = "/etc/shoji/shim.toml";
pub const ENV_PATH: &str = "SHOJI_SHIM_CONFIG";

#[derive(Debug, thiserror::Error)]
pub enum ConfigError {
    #[error("shim config {path}: {msg}")]
    File { path: PathBuf, msg: String },
    #[error("shim config {path}: {field}: {msg}")]
    Field { path: PathBuf, field: &'static str, msg: String },
}

#[derive(Debug, Clone, PartialEq, Eq, Deserialize)]
#[serde(default, deny_unknown_fields)]
pub struct ShimConfig {
    /// Guest kernel (default: the cached build of kernel-config/).
    pub kernel: Option<PathBuf>,
    /// Guest initramfs with the agent as /init (default: the cached build of rootfs/).
    pub initrd: Option<PathBuf>,
    pub vcpus: u8,
    pub memory_mib: u64,
    /// tracing filter for the shim's log (containerd's log FIFO), e.g. "info" or "debug".
    pub log_level: String,
    /// Copy the guest's serial console into the shim log when the sandbox stops.
    pub debug_console: bool,
}

impl Default for ShimConfig {
    fn default() -> Self {
        ShimConfig {
            kernel: None,
            initrd: None,
            vcpus: 1,
            memory_mib: 256,
            log_level: "info".into(),
            debug_console: false,
        }
    }
}

impl ShimConfig {
    /// Parses and checks a config file's text.
    pub fn parse(text: &str, path: &Path) -> Result<ShimConfig, ConfigError> {
        let c: ShimConfig = toml::from_str(text)
            .map_err(|e| ConfigError::File { path: path.into(), msg: e.message().replace('\n', " ") })?;
        let field = |field, msg: String| ConfigError::Field { path: path.into(), field, msg };
        if c.vcpus == 0 {
            return Err(field("vcpus", "must be at least 1".into()));
        }
        if c.memory_mib < 64 {
            return Err(field("memory_mib", format!("{} is below the guest's minimum of 64", c.memory_mib)));
        }
        for (name, p) in [("kernel", &c.kernel), ("initrd", &c.initrd)] {
            if let Some(p) = p {
                if !p.is_file() {
                    return Err(field(name, format!("{} is not a file", p.display())));
                }
            }
        }
        if tracing_subscriber::EnvFilter::try_new(&c.log_level).is_err() {
            return Err(field("log_level", format!("{:?} is not a log filter", c.log_level)));
        }
        Ok(c)
    }

    /// The configuration: from `explicit` (runtime options), else the environment, else the
    /// default path (defaults when that file does not exist).
    pub fn load(explicit: Option<&Path>) -> Result<ShimConfig, ConfigError> {
        let env = std::env::var_os(ENV_PATH).filter(|v| !v.is_empty()).map(PathBuf::from);
        let (path, required) = match (explicit, env) {
            (Some(p), _) => (p.to_path_buf(), true),
            (None, Some(p)) => (p, true),
            (None, None) => (PathBuf::from(DEFAULT_PATH), false),
        };
        match std::fs::read_to_string(&path) {
            Ok(text) => Self::parse(&text, &path),
            Err(e) if !required && e.kind() == std::io::ErrorKind::NotFound => Ok(ShimConfig::default()),
            Err(e) => Err(ConfigError::File { path, msg: e.to_string() }),
        }
    }
}

/// The `config_path` of containerd's runtime options, if any.
///
/// CRI passes `runtimeoptions.v1.Options { type_url = 1; config_path = 2; }`; other option types
/// (e.g. runc's) carry no config path and are ignored. Decoded by hand: two string fields.
pub fn options_config_path(type_url: &str, value: &[u8]) -> Option<PathBuf> {
    if !type_url.ends_with("runtimeoptions.v1.Options") {
        return None;
    }
    let mut i = 0;
    let mut found = None;
    while i < value.len() {
        let (key, n) = varint(&value[i..])?;
        i += n;
        match key & 7 {
            0 => i += varint(&value[i..])?.1,
            2 => {
                let (len, n) = varint(&value[i..])?;
                i += n;
                let end = i.checked_add(usize::try_from(len).ok()?).filter(|&e| e <= value.len())?;
                if key >> 3 == 2 {
                    found = Some(PathBuf::from(String::from_utf8(value[i..end].to_vec()).ok()?));
                }
                i = end;
            }
            _ => return None,
        }
    }
    found.filter(|p| !p.as_os_str().is_empty())
}

fn varint(b: &[u8]) -> Option<(u64, usize)> {
    let mut v = 0u64;
    for (i, byte) in b.iter().enumerate().take(10) {
        v |= u64::from(byte & 0x7f) << (7 * i);
        if byte & 0x80 == 0 {
            return Some((v, i + 1));
        }
    }
    None
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(t: &str) -> Result<ShimConfig, String> {
        ShimConfig::parse(t, Path::new("/etc/shoji/shim.toml")).map_err(|e| e.to_string())
    }

    #[test]
    fn empty_file_is_the_defaults() {
        assert_eq!(parse("").unwrap(), ShimConfig::default());
        let c = parse("vcpus = 2\nmemory_mib = 512\nlog_level = \"debug\"\ndebug_console = true\n").unwrap();
        assert_eq!((c.vcpus, c.memory_mib, c.log_level.as_str(), c.debug_console), (2, 512, "debug", true));
    }

    #[test]
    fn errors_name_the_file_and_field() {
        assert_eq!(parse("vcpus = 0").unwrap_err(), "shim config /etc/shoji/shim.toml: vcpus: must be at least 1");
        assert!(parse("memory_mib = 8").unwrap_err().contains(": memory_mib: 8 is below"));
        assert!(parse("kernel = \"/nonexistent/vmlinux\"")
            .unwrap_err()
            .contains(": kernel: /nonexistent/vmlinux is not a file"));
        assert!(parse("cpus = 2").unwrap_err().contains("unknown field `cpus`"));
        assert!(parse("vcpus = \"x\"").unwrap_err().starts_with("shim config /etc/shoji/shim.toml: "));
        assert!(parse("log_level = \"a=b=c\"").unwrap_err().contains("log_level"));
    }

    #[test]
    fn a_named_file_must_exist_the_default_need_not() {
        let e = ShimConfig::load(Some(Path::new("/nonexistent/shim.toml"))).unwrap_err().to_string();
        assert!(e.starts_with("shim config /nonexistent/shim.toml: "), "{e}");
        let d = tempfile::tempdir().unwrap();
        let f = d.path().join("s.toml");
        std::fs::write(&f, "vcpus = 3").unwrap();
        assert_eq!(ShimConfig::load(Some(&f)).unwrap().vcpus, 3);
    }

    #[test]
    fn runtime_options_config_path() {
        // type_url = "x" (field 1), config_path = "/etc/c.toml" (field 2)
        let mut v = vec![0x0a, 1, b'x', 0x12, 11];
        v.extend_from_slice(b"/etc/c.toml");
        let t = "type.googleapis.com/runtimeoptions.v1.Options";
        assert_eq!(options_config_path(t, &v), Some(PathBuf::from("/etc/c.toml")));
        assert_eq!(options_config_path("containerd.runc.v1.Options", &v), None);
        assert_eq!(options_config_path(t, &v[..8]), None, "truncated");
        assert_eq!(options_config_path(t, &[0x0a, 1, b'x']), None, "no path");
        assert_eq!(options_config_path(t, &[0xff; 12]), None, "bad varint");
    }
}
