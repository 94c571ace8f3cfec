//! The agent's container stats as containerd's cgroup v2 `Metrics` (what `ctr task metrics` and
//! the CRI plugin's ContainerStats decode; containerd 1.6 reads v1 and v2 alike), whatever the
//! guest's cgroup version.
use containerd_shim::protos::cgroups_v2::metrics::{CPUStat, MemoryEvents, MemoryStat, Metrics, PidsStat};
use containerd_shim::protos::protobuf::well_known_types::any::Any;
use containerd_shim::protos::protobuf::{Message, MessageField};
use containerd_shim::protos::ttrpc::{self, Code};
use shoji_sandbox::StatsContainerResponse;

pub const METRICS_TYPE_URL: &str = "io.containerd.cgroups.v2.Metrics";

pub fn metrics(s: &StatsContainerResponse) -> Metrics {
    Metrics {
        pids: MessageField::some(PidsStat { current: s.pids_current, limit: s.pids_limit, ..Default::default() }),
        cpu: MessageField::some(CPUStat { usage_usec: s.cpu_usage_usec, ..Default::default() }),
        memory: MessageField::some(MemoryStat {
            usage: s.memory_usage_bytes,
            usage_limit: s.memory_limit_bytes,
            ..Default::default()
        }),
        memory_events: MessageField::some(MemoryEvents { oom_kill: s.oom_kills, ..Default::default() }),
        ..Default::default()
    }
}

pub fn metrics_any(s: &StatsContainerResponse) -> ttrpc::Result<Any> {
    let value = metrics(s)
        .write_to_bytes()
        .map_err(|e| ttrpc::Error::RpcStatus(ttrpc::get_status(Code::INTERNAL, format!("stats: {e}"))))?;
    Ok(Any { type_url: METRICS_TYPE_URL.into(), value, ..Default::default() })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn agent_stats_map_to_cgroup_metrics() {
        let s = StatsContainerResponse {
            memory_usage_bytes: 5 << 20,
            memory_limit_bytes: 64 << 20,
            cpu_usage_usec: 1500,
            pids_current: 3,
            pids_limit: 10,
            oom_kills: 2,
            ..Default::default()
        };
        let any = metrics_any(&s).unwrap();
        assert_eq!(any.type_url, METRICS_TYPE_URL);
        let m = Metrics::parse_from_bytes(&any.value).unwrap();
        assert_eq!((m.memory.usage, m.memory.usage_limit), (5 << 20, 64 << 20));
        assert_eq!(m.cpu.usage_usec, 1500);
        assert_eq!((m.pids.current, m.pids.limit), (3, 10));
        assert_eq!(m.memory_events.oom_kill, 2);
    }
}
