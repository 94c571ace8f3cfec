//! `shoji bench hotplug`: what a device after boot costs next to one at boot, in our Linux
//! guest with our agent and the built-in busybox rootfs, through the sandbox library as `shoji
//! run --device` and the shim use it.
//!
//! - **hot**: `Hotplug::plug_disk` (the VMM places a virtio-blk function) up to a container,
//!   created naming its PCI path (the agent rescans the bus, waits for the uevent and rewrites
//!   the spec), having printed the disk's first bytes; then the container is removed and the
//!   disk unplugged (untimed, the unplug is reported on its own);
//! - **cold**: the same container on a disk plugged at boot (`--disk`): create to bytes;
//! - **boot**: sandbox start to the agent's CreateSandbox answer, without and with a boot disk
//!   (what `--disk` adds to the boot).
//!
//! hot and cold alternate run by run in one sandbox (the order flips every run), after one
//! untimed round each; boots alternate too.
use crate::bench::stats::Summary;
use anyhow::{anyhow, bail, Context, Result};
use shoji_sandbox::{
    virtiofs_storage, ContainerSpec, Device, DiskConfig, Hotplug, PciPath, Sandbox, SandboxConfig, Session,
    SessionConfig, Stream, Unplugged,
};
use std::time::{Duration, Instant};

pub struct HotplugOpts {
    /// Timed hot and cold rounds each.
    pub runs: u32,
    /// Timed boots with and without a disk each.
    pub boots: u32,
    pub json: bool,
}

const MAGIC: &[u8; 16] = b"SHOJI-BENCH-DISK";
const GUEST_ROOTFS: &str = "/run/shoji/rootfs";
/// Where the containers see the hot-plugged disk.
const HOT_PATH: &str = "/dev/xvdz";

/// One series of samples, in milliseconds.
struct Series {
    name: &'static str,
    ms: Vec<f64>,
}

pub fn main(o: HotplugOpts) -> Result<()> {
    let load = std::fs::read_to_string("/proc/loadavg").unwrap_or_default();
    let rootfs = crate::run::rootfs::ensure()?;
    let (kernel, initrd) = crate::artifacts::ensure()?;
    let scratch = tempfile::Builder::new().prefix("shoji-bench-hotplug-").tempdir().context("scratch dir")?;
    let disk = scratch.path().join("disk.img");
    let mut data = vec![0u8; 1 << 20];
    data[..MAGIC.len()].copy_from_slice(MAGIC);
    std::fs::write(&disk, &data).with_context(|| format!("{}", disk.display()))?;
    let cfg = |n: usize, with_disk: bool| -> Result<SandboxConfig> {
        let dir = scratch.path().join(format!("vm{n}"));
        std::fs::create_dir(&dir).with_context(|| format!("{}", dir.display()))?;
        let mut c = SandboxConfig::new(dir);
        (c.kernel, c.initrd) = (Some(kernel.clone()), Some(initrd.clone()));
        c.shares = vec![shoji_sandbox::ShareConfig { dir: rootfs.clone(), tag: "rootfs".into(), read_only: true }];
        if with_disk {
            c.disks = vec![DiskConfig { path: disk.clone(), read_only: true }];
        }
        Ok(c)
    };
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().context("tokio runtime")?;

    let (mut boot_bare, mut boot_disk) = (Series::new("boot, no disk"), Series::new("boot, 1 disk (--disk)"));
    for i in 0..o.boots {
        for with_disk in if i % 2 == 0 { [false, true] } else { [true, false] } {
            let (ms, vm, session) = rt.block_on(boot(&cfg((2 * i + u32::from(with_disk)) as usize, with_disk)?))?;
            rt.block_on(async { session.destroy(Duration::from_secs(30)).await.ok() });
            stop(vm)?;
            if with_disk { &mut boot_disk } else { &mut boot_bare }.ms.push(ms);
        }
    }

    let (mut hot, mut plug, mut unplug, mut cold) = (
        Series::new("hot: plug to bytes in a new container"),
        Series::new("hot: the VMM's plug alone"),
        Series::new("hot: unplug (guest release, then the VMM)"),
        Series::new("cold: boot disk, new container to bytes"),
    );
    let (_, vm, session) = rt.block_on(boot(&cfg(usize::MAX >> 1, true)?))?;
    let rounds = rt.block_on(async {
        let hotplug = Hotplug::new();
        // The boot disk's slot, as the VMM places it (one disk, the rootfs share, vsock).
        let cold_path = shoji_devices::model::PciSlotPlan::new(1, 1, true)
            .map_err(|e| anyhow!("slot plan: {e}"))?
            .disk(0)
            .ok_or_else(|| anyhow!("slot plan: no disk 0"))?;
        for i in 0..=o.runs {
            let hot_first = i % 2 == 0;
            for is_hot in [hot_first, !hot_first] {
                let id = format!("{}{i}", if is_hot { "hot" } else { "cold" });
                if is_hot {
                    let t = Instant::now();
                    let at = hotplug
                        .plug_disk(&vm, DiskConfig { path: disk.clone(), read_only: true })
                        .await
                        .context("hot-add")?;
                    let plugged = t.elapsed();
                    let used = read_disk(&session, &hotplug, &id, &at, HOT_PATH).await? - t;
                    let t = Instant::now();
                    let how = hotplug.unplug(&vm, &session, &at, Duration::from_secs(10), false).await?;
                    if how != Unplugged::Released {
                        bail!("hot-remove of {at}: {how:?}");
                    }
                    if i > 0 {
                        hot.push(used);
                        plug.push(plugged);
                        unplug.push(t.elapsed());
                    }
                } else {
                    let t = Instant::now();
                    let used = read_disk(&session, &hotplug, &id, &cold_path, "/dev/vda").await? - t;
                    if i > 0 {
                        cold.push(used);
                    }
                }
            }
        }
        session.destroy(Duration::from_secs(30)).await.ok();
        Ok::<_, anyhow::Error>(())
    });
    let tail = vm.console_tail(20);
    stop(vm)?;
    rounds.map_err(|e| anyhow!("{e:#} (guest console: {})", tail.replace('\n', " | ")))?;

    let all = [hot, plug, unplug, cold, boot_bare, boot_disk];
    if o.json {
        let series: Vec<_> = all
            .iter()
            .map(|s| serde_json::json!({ "name": s.name, "ms": s.ms, "p50": Summary::of(&s.ms).map(|x| x.p50) }))
            .collect();
        println!("{}", serde_json::json!({ "bench": "hotplug", "load": load.trim(), "series": series }));
        return Ok(());
    }
    println!("Hot-plug vs cold-plug, Linux guest, built-in busybox rootfs (`shoji bench hotplug`)\n");
    println!("- Load average at start: {}", load.trim());
    println!(
        "- Runs: {} hot and {} cold, interleaved, after one untimed round each; {} boots each\n",
        o.runs, o.runs, o.boots
    );
    println!("| what | runs | p50 ms | p90 ms | min ms | max ms |\n|---|---|---|---|---|---|");
    for s in &all {
        if let Some(x) = Summary::of(&s.ms) {
            println!("| {} | {} | {:.1} | {:.1} | {:.1} | {:.1} |", s.name, s.ms.len(), x.p50, x.p90, x.min, x.max);
        }
    }
    let p50 = |s: &Series| Summary::of(&s.ms).map(|x| x.p50);
    if let (Some(h), Some(c)) = (p50(&all[0]), p50(&all[3])) {
        println!("\nhot-plug cost over a boot disk (p50 hot - p50 cold): {:.1} ms", h - c);
    }
    if let (Some(d), Some(b)) = (p50(&all[5]), p50(&all[4])) {
        println!("boot disk cost (p50 boot with - without): {:.1} ms", d - b);
    }
    Ok(())
}

impl Series {
    fn new(name: &'static str) -> Series {
        Series { name, ms: Vec::new() }
    }

    fn push(&mut self, d: Duration) {
        self.ms.push(d.as_secs_f64() * 1e3);
    }
}

/// Boots a sandbox to the agent's CreateSandbox answer (the rootfs share mounted): how long.
async fn boot(cfg: &SandboxConfig) -> Result<(f64, Sandbox, Session)> {
    let t = Instant::now();
    let vm = Sandbox::start(cfg).map_err(|e| anyhow!("{e}"))?;
    let sc = SessionConfig {
        sandbox_id: "bench-hotplug".into(),
        hostname: "bench".into(),
        storages: vec![virtiofs_storage("rootfs", GUEST_ROOTFS, true)],
    };
    match Session::create(&vm, sc).await {
        Ok(s) => Ok((t.elapsed().as_secs_f64() * 1e3, vm, s)),
        Err(e) => {
            let tail = vm.console_tail(20);
            let _ = vm.stop();
            Err(anyhow!("boot: {e} (guest console: {})", tail.replace('\n', " | ")))
        }
    }
}

fn stop(vm: Sandbox) -> Result<()> {
    vm.stop().map_err(|e| anyhow!("stopping the VM: {e}"))
}

/// A container that prints the first 16 bytes of the disk at `pci` (seen at `path`), run to its
/// end and removed; checks the bytes. When its output had ended.
async fn read_disk(session: &Session, hotplug: &Hotplug, id: &str, pci: &PciPath, path: &str) -> Result<Instant> {
    let spec = serde_json::json!({
        "ociVersion": "1.0.2",
        "root": { "path": GUEST_ROOTFS, "readonly": true },
        "process": {
            "terminal": false,
            "user": { "uid": 0, "gid": 0 },
            "args": ["head", "-c", "16", path],
            "env": ["PATH=/bin:/sbin:/usr/bin"],
            "cwd": "/"
        },
        "mounts": [
            { "destination": "/proc", "type": "proc", "source": "proc" },
            { "destination": "/dev", "type": "tmpfs", "source": "tmpfs", "options": ["nosuid", "mode=755", "size=64k"] }
        ],
        "linux": {
            "namespaces": [ { "type": "pid" }, { "type": "mount" } ],
            "devices": [ { "path": path, "type": "b", "major": 0, "minor": 99, "fileMode": 432 } ],
            "resources": { "devices": [
                { "allow": false, "access": "rwm" },
                { "allow": true, "type": "b", "major": 0, "minor": 99, "access": "r" }
            ]}
        }
    });
    let c = ContainerSpec {
        id: id.into(),
        spec_json: serde_json::to_vec(&spec)?,
        rootfs: GUEST_ROOTFS.into(),
        devices: vec![Device {
            id: pci.to_string(),
            type_: "blk".into(),
            container_path: path.into(),
            ..Default::default()
        }],
        ..Default::default()
    };
    let process = {
        let _plugs = hotplug.lock().await;
        session.create_container(c).await.map_err(|e| anyhow!("{id}: {e}"))?
    };
    process.start().await.map_err(|e| anyhow!("{id}: {e}"))?;
    let mut out = Vec::new();
    process.copy_output(Stream::Stdout, &mut out).await.map_err(|e| anyhow!("{id}: {e}"))?;
    let done = Instant::now();
    let status = process.wait().await.map_err(|e| anyhow!("{id}: {e}"))?;
    session.remove_container(id).await.map_err(|e| anyhow!("{id}: {e}"))?;
    if status.status != 0 || out != MAGIC {
        bail!("{id}: exit {} and {:?} instead of the disk's bytes", status.status, String::from_utf8_lossy(&out));
    }
    Ok(done)
}
