//! The pod VM's size, Kata's static sandbox sizing: kubelet sums the pod's container limits
//! into the sandbox config, and containerd (1.6.7+) hands them to the runtime as annotations on
//! the sandbox container. The VM gets the shim config's `vcpus` and `memory_mib` (the guest's
//! own needs: kernel, agent, page cache; RuntimeClass overhead accounts for them) plus those
//! limits: one more vCPU per started CPU of quota, the memory limit in whole MiB. A pod without
//! limits gets the configured size. Requests beyond the host (its CPUs, its memory) are
//! refused naming the annotation, before anything boots.
use serde_json::Value;

pub const CPU_QUOTA: &str = "io.kubernetes.cri.sandbox-cpu-quota";
pub const CPU_PERIOD: &str = "io.kubernetes.cri.sandbox-cpu-period";
pub const MEMORY: &str = "io.kubernetes.cri.sandbox-memory";

#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum SizingError {
    #[error("annotations[{0}]: {1:?} is not a whole number")]
    NotANumber(&'static str, String),
    #[error("annotations[{what}]: the pod asks for {asked} {unit}, and with the VM's own {base} that is more than this host's {host}")]
    TooBig { what: &'static str, asked: u64, base: u64, host: u64, unit: &'static str },
}

/// The VM size for a sandbox container's spec: (vCPUs, memory in MiB).
pub fn vm_size(
    spec: &Value,
    base_vcpus: u8,
    base_mib: u64,
    host_cpus: u64,
    host_mib: u64,
) -> Result<(u8, u64), SizingError> {
    let ann = |key: &'static str| -> Result<Option<i64>, SizingError> {
        match spec.pointer("/annotations").and_then(|a| a.get(key)).and_then(Value::as_str) {
            None | Some("") => Ok(None),
            Some(v) => v.trim().parse::<i64>().map(Some).map_err(|_| SizingError::NotANumber(key, v.into())),
        }
    };
    let (quota, period) = (ann(CPU_QUOTA)?, ann(CPU_PERIOD)?);
    // A quota of -1 (or 0) is no limit.
    let cpus = match (quota, period) {
        (Some(q), Some(p)) if q > 0 && p > 0 => (q as u64).div_ceil(p as u64),
        _ => 0,
    };
    let vcpus = u64::from(base_vcpus) + cpus;
    // The configured size alone is the VM's checks' to judge; what the pod adds must fit.
    let max_vcpus = host_cpus.max(u64::from(base_vcpus)).min(u64::from(u8::MAX));
    if cpus > 0 && vcpus > max_vcpus {
        return Err(SizingError::TooBig {
            what: CPU_QUOTA,
            asked: cpus,
            base: u64::from(base_vcpus),
            host: max_vcpus,
            unit: "CPUs",
        });
    }
    let mib = match ann(MEMORY)? {
        Some(b) if b > 0 => (b as u64).div_ceil(1 << 20),
        _ => 0,
    };
    let memory = base_mib.saturating_add(mib);
    if mib > 0 && memory > host_mib {
        return Err(SizingError::TooBig { what: MEMORY, asked: mib, base: base_mib, host: host_mib, unit: "MiB" });
    }
    Ok((vcpus as u8, memory))
}

/// The host's online CPUs and total memory (MiB), the bounds of [`vm_size`].
pub fn host_limits() -> (u64, u64) {
    let cpus = std::thread::available_parallelism().map_or(1, |n| n.get() as u64);
    let mib = std::fs::read_to_string("/proc/meminfo")
        .ok()
        .and_then(|m| {
            m.lines()
                .find_map(|l| l.strip_prefix("MemTotal:"))
                .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        })
        .map_or(u64::MAX, |kb| kb / 1024);
    (cpus, mib)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    fn spec(quota: &str, period: &str, memory: &str) -> Value {
        json!({"annotations": {CPU_QUOTA: quota, CPU_PERIOD: period, MEMORY: memory}})
    }

    #[test]
    fn limits_add_to_the_configured_size() {
        // 1.5 CPUs of quota start two more vCPUs; 100 MiB + 1 byte is 101 MiB.
        let s = spec("150000", "100000", &((100u64 << 20) + 1).to_string());
        assert_eq!(vm_size(&s, 1, 256, 8, 4096), Ok((3, 357)));
        assert_eq!(vm_size(&spec("100000", "100000", "134217728"), 1, 256, 8, 4096), Ok((2, 384)));
    }

    #[test]
    fn no_limits_is_the_configured_size() {
        assert_eq!(vm_size(&json!({}), 2, 512, 8, 4096), Ok((2, 512)));
        assert_eq!(vm_size(&spec("-1", "100000", "0"), 2, 512, 8, 4096), Ok((2, 512)));
        assert_eq!(vm_size(&spec("", "", ""), 1, 256, 1, 300), Ok((1, 256)));
        // The configured size alone is never refused here (the VM's checks own it).
        assert_eq!(vm_size(&json!({}), 4, 512, 2, 300), Ok((4, 512)));
    }

    #[test]
    fn bad_or_too_big_requests_name_the_annotation() {
        let e = vm_size(&spec("x", "100000", ""), 1, 256, 8, 4096).unwrap_err().to_string();
        assert_eq!(e, "annotations[io.kubernetes.cri.sandbox-cpu-quota]: \"x\" is not a whole number");
        let e = vm_size(&spec("800000", "100000", ""), 1, 256, 8, 4096).unwrap_err().to_string();
        assert!(e.starts_with("annotations[io.kubernetes.cri.sandbox-cpu-quota]: the pod asks for 8 CPUs"), "{e}");
        let e = vm_size(&spec("", "", &(8u64 << 30).to_string()), 1, 256, 8, 4096).unwrap_err().to_string();
        assert!(e.starts_with("annotations[io.kubernetes.cri.sandbox-memory]: the pod asks for 8192 MiB"), "{e}");
    }
}
