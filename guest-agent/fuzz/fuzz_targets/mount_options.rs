//! Mount option lists (OCI `mounts[].options`, containerd's options; the shim shares this
//! parser): the input split at commas and newlines into options (NULs stay in). Errors are fine; a panic is a
//! finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoji_agent::runtime::parse_mount_options;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let opts: Vec<String> = text.split([',', '\n']).map(String::from).collect();
    if let Ok(m) = parse_mount_options("mounts[0].options", &opts) {
        // What the runtime does with a parse: options joined as mount(2) data.
        let _ = std::ffi::CString::new(m.data.join(","));
    }
});
