//! Mount option lists (OCI `mounts[].options`, containerd's options) through the agent's parser,
//! which is the one table in `shoji_devices::model::mount` the shim uses too: the input split
//! at newlines into entries (commas stay in: the parser splits entries itself; NULs stay in).
//! Errors are fine; a panic is a finding.
#![no_main]

use libfuzzer_sys::fuzz_target;
use shoji_agent::runtime::parse_mount_options;

fuzz_target!(|data: &[u8]| {
    let text = String::from_utf8_lossy(data);
    let opts: Vec<String> = text.split('\n').map(String::from).collect();
    if let Ok(m) = parse_mount_options("mounts[0].options", &opts) {
        // What the runtime does with a parse: options joined as mount(2) data.
        let _ = std::ffi::CString::new(m.data_string());
    }
});
