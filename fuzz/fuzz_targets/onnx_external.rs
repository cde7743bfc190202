//! The ONNX external-data rewriter (a protobuf reader and writer): any
//! input gives a model with its external tensors inline, `None`, or an
//! error; it never reads outside its folder and never panics. The folder
//! holds one weights file the input may name.
#![no_main]

use libfuzzer_sys::fuzz_target;
use ml_worker::model::onnx::external;
use std::sync::OnceLock;

fn folder() -> &'static std::path::Path {
    static DIR: OnceLock<std::path::PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let d = std::env::temp_dir().join(format!("ml-worker-fuzz-onnx-{}", std::process::id()));
        std::fs::create_dir_all(&d).unwrap();
        std::fs::write(d.join("w.bin"), [7u8; 64]).unwrap();
        d
    })
}

fuzz_target!(|data: &[u8]| {
    let _ = external::inline(data, folder(), 1 << 20);
});
