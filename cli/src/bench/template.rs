//! `shoji bench template`: a sandbox started to its agent's first answer (CreateSandbox done),
//! in this process, restored from its VM template and cold booted, interleaved. That is what
//! `shoji run`, `run -d` and the shim wait for before their first container; the VM's
//! teardown is not timed. The warm-up builds the template when it is missing.
use super::stats::Summary;
use super::{machine, peer_first, Peer};
use anyhow::{anyhow, Context, Result};
use serde_json::json;
use shoji_sandbox::{Sandbox, SandboxConfig, Session, SessionConfig};
use std::fmt::Write as _;
use std::time::Instant;

/// One start: milliseconds to the agent's CreateSandbox answer, and whether it was restored.
async fn start(cfg: &SandboxConfig, cold: bool) -> Result<(f64, bool)> {
    let t0 = Instant::now();
    let vm = if cold { Sandbox::start(cfg) } else { Sandbox::launch(cfg).await }.map_err(|e| anyhow!("{e}"))?;
    let session = Session::create(&vm, SessionConfig { sandbox_id: "bench".into(), ..Default::default() }).await;
    let ms = t0.elapsed().as_secs_f64() * 1e3;
    let restored = vm.placement().restored;
    let stopped = vm.stop();
    session.map_err(|e| anyhow!("{e}"))?;
    stopped.map_err(|e| anyhow!("VM: {e}"))?;
    Ok((ms, restored))
}

pub fn main(n: u32, cold_runs: bool, json: bool) -> Result<()> {
    let (kernel, initrd) = crate::artifacts::ensure()?;
    let scratch = tempfile::tempdir().context("scratch directory")?;
    let mut cfg = SandboxConfig::new(scratch.path().to_path_buf());
    (cfg.kernel, cfg.initrd) = (Some(kernel), Some(initrd));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;
    let (mut restored_ms, mut cold_ms) = (Vec::new(), Vec::new());
    rt.block_on(async {
        let (_, restored) = start(&cfg, false).await.context("warm-up")?;
        if !restored {
            return Err(anyhow!("the warm-up did not restore from a template (SHOJI_TEMPLATES=off?)"));
        }
        for run in 1..=n {
            let mut sides = vec![false];
            if cold_runs {
                sides.push(true);
                if peer_first(run) {
                    sides.reverse();
                }
            }
            for cold in sides {
                let (ms, restored) = start(&cfg, cold).await.with_context(|| format!("run {run}"))?;
                if cold {
                    cold_ms.push(ms);
                } else if restored {
                    restored_ms.push(ms);
                } else {
                    return Err(anyhow!("run {run}: not restored from the template"));
                }
            }
        }
        Ok(())
    })?;
    let t = Summary::of(&restored_ms).ok_or_else(|| anyhow!("no sample"))?;
    let c = Summary::of(&cold_ms);
    if json {
        let j = json!({ "bench": "template", "template_ms": restored_ms, "cold_ms": cold_ms });
        println!("{j}");
        return Ok(());
    }
    let mut s =
        machine(None).header(&format!("shoji bench template -n {n}{}", if cold_runs { " --peer-cold" } else { "" }));
    let _ = writeln!(
        s,
        "- Measures: a sandbox (1 vCPU, 256 MiB) from start to its agent's CreateSandbox answer, in-process"
    );
    if cold_runs {
        let _ = writeln!(s, "- Peer: {}", Peer::Cold.describe());
    }
    let _ = writeln!(s, "\n| | p50 ms | p90 ms | min | max |\n|---|---|---|---|---|");
    let _ = writeln!(s, "| template | {:.1} | {:.1} | {:.1} | {:.1} |", t.p50, t.p90, t.min, t.max);
    if let Some(c) = c {
        let _ = writeln!(s, "| cold boot | {:.1} | {:.1} | {:.1} | {:.1} |", c.p50, c.p90, c.min, c.max);
        let _ = writeln!(s, "\ntemplate/cold (p50): {:.3}", t.p50 / c.p50);
    }
    print!("{s}");
    Ok(())
}
