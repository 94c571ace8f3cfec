//! A container's `linux.namespaces` paths, made to mean something in the guest.
//!
//! containerd writes host paths there: a CRI pod's app containers join the pod's sandbox
//! (pause) container's namespaces as `/proc/<task pid>/ns/<kind>`, where the task pid is the one
//! this shim reported (its own), and the sandbox container names the pod's network namespace as
//! CNI made it (`/var/run/netns/cni-...`). Inside the VM those paths are other processes' or
//! nothing. So:
//!
//! - `/proc/<our pid>/ns/<kind>` becomes `/run/shoji-ns/<pod sandbox id>/<kind>`, which the agent
//!   resolves to that container's init in the guest (`devices::model::guest_container_ns`);
//! - in a CRI pod, any other network namespace path (the pod's CNI netns on the host) is dropped:
//!   the container gets a new network namespace in the guest, and the shim gives it the pod's
//!   interface (see docs/kubernetes.md, Network);
//! - any other path fails Create naming the entry: a host namespace cannot be joined from the VM
//!   (`ctr run --with-ns network:/var/run/netns/x` is refused, not quietly given another one).
use serde_json::Value;
use shoji_devices::model::guest_container_ns;

#[derive(Debug, thiserror::Error)]
pub enum NamespaceError {
    #[error("linux.namespaces[{index}].path: {path}: a host namespace cannot be joined from the sandbox VM")]
    Host { index: usize, path: String },
}

/// What [`rewrite`] changed, for the log.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Rewritten {
    /// (index, kind) joined from the pod's sandbox container.
    pub joined: Vec<(usize, String)>,
    /// Network namespace paths dropped (a new one in the guest instead).
    pub dropped_net: Vec<String>,
}

/// `/proc/<pid>/ns/<kind>` -> (pid, kind).
fn proc_ns(path: &str) -> Option<(u32, &str)> {
    let rest = path.strip_prefix("/proc/")?;
    let (pid, rest) = rest.split_once('/')?;
    let kind = rest.strip_prefix("ns/")?;
    if kind.is_empty() || kind.contains('/') {
        return None;
    }
    Some((pid.parse().ok()?, kind))
}

/// CRI's annotation on every container of a pod ("sandbox" or "container").
const CRI_CONTAINER_TYPE: &str = "io.kubernetes.cri.container-type";

/// Rewrites `spec`'s namespace paths for the guest: `our_pid` is the pid this shim reports for
/// its tasks, `sandbox` the pod's sandbox container id (CRI's sandbox id).
pub fn rewrite(spec: &mut Value, our_pid: u32, sandbox: &str) -> Result<Rewritten, NamespaceError> {
    let cri = spec.pointer("/annotations").and_then(|a| a.get(CRI_CONTAINER_TYPE)).is_some();
    let mut out = Rewritten::default();
    let Some(list) = spec.pointer_mut("/linux/namespaces").and_then(Value::as_array_mut) else { return Ok(out) };
    for (index, n) in list.iter_mut().enumerate() {
        let path = n.get("path").and_then(Value::as_str).unwrap_or_default().to_string();
        if path.is_empty() {
            continue;
        }
        let typ = n.get("type").and_then(Value::as_str).unwrap_or_default();
        match proc_ns(&path) {
            Some((pid, kind)) if pid == our_pid => {
                n["path"] = Value::String(guest_container_ns(sandbox, kind));
                out.joined.push((index, kind.to_string()));
            }
            _ if typ == "network" && cri => {
                if let Some(o) = n.as_object_mut() {
                    o.remove("path");
                }
                out.dropped_net.push(path);
            }
            _ => return Err(NamespaceError::Host { index, path }),
        }
    }
    Ok(out)
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde_json::json;

    /// An app container of a CRI pod as containerd 1.6 writes it (shim pid 4242).
    fn app() -> Value {
        json!({"linux": {"namespaces": [
            {"type": "pid"},
            {"type": "ipc", "path": "/proc/4242/ns/ipc"},
            {"type": "uts", "path": "/proc/4242/ns/uts"},
            {"type": "mount"},
            {"type": "network", "path": "/proc/4242/ns/net"}
        ]}})
    }

    #[test]
    fn an_app_container_joins_the_pods_sandbox_container_in_the_guest() {
        let mut s = app();
        let r = rewrite(&mut s, 4242, "pod1").unwrap();
        assert_eq!(r.joined, [(1, "ipc".into()), (2, "uts".into()), (4, "net".into())]);
        let ns = &s["linux"]["namespaces"];
        assert_eq!(ns[1]["path"], "/run/shoji-ns/pod1/ipc");
        assert_eq!(ns[4]["path"], "/run/shoji-ns/pod1/net");
        assert!(ns[0].get("path").is_none() && ns[3].get("path").is_none());
    }

    #[test]
    fn the_pods_cni_netns_becomes_a_new_one_in_the_guest() {
        let netns = json!({"linux": {"namespaces": [
            {"type": "network", "path": "/var/run/netns/cni-1234"}, {"type": "mount"}
        ]}});
        let mut s = netns.clone();
        s["annotations"] = json!({"io.kubernetes.cri.container-type": "sandbox"});
        let r = rewrite(&mut s, 4242, "pod1").unwrap();
        assert_eq!(r.dropped_net, ["/var/run/netns/cni-1234"]);
        assert_eq!(s["linux"]["namespaces"][0], json!({"type": "network"}));
        // Outside a CRI pod (ctr run --with-ns) it is refused, not replaced.
        let e = rewrite(&mut netns.clone(), 4242, "pod1").unwrap_err().to_string();
        assert!(e.starts_with("linux.namespaces[0].path: /var/run/netns/cni-1234: "), "{e}");
    }

    #[test]
    fn other_host_namespaces_are_refused_naming_the_entry() {
        for path in ["/proc/1/ns/ipc", "/var/run/ipcns/x", "/proc/4242/ns/", "/proc/x/ns/ipc"] {
            let mut s = json!({"linux": {"namespaces": [{"type": "mount"}, {"type": "ipc", "path": path}]}});
            let e = rewrite(&mut s, 4242, "pod1").unwrap_err().to_string();
            assert_eq!(
                e,
                format!("linux.namespaces[1].path: {path}: a host namespace cannot be joined from the sandbox VM")
            );
        }
    }

    #[test]
    fn a_spec_without_paths_is_untouched() {
        let mut s = json!({"linux": {"namespaces": [{"type": "pid"}, {"type": "mount"}]}});
        let before = s.clone();
        assert_eq!(rewrite(&mut s, 1, "x").unwrap(), Rewritten::default());
        assert_eq!(s, before);
        let mut s = json!({"process": {}});
        assert_eq!(rewrite(&mut s, 1, "x").unwrap(), Rewritten::default());
    }
}
