//! With the `torch` feature, every binary carries an rpath to libtorch's
//! `lib/` (the folder torch-sys built against), so `ml-worker` runs without
//! LD_LIBRARY_PATH. A binary moved to another machine finds libtorch through
//! `lib/` beside the executable or LD_LIBRARY_PATH (deploy/ documents both).

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if std::env::var_os("CARGO_FEATURE_TORCH").is_none() {
        return;
    }
    if let Some(dir) = std::env::var_os("LIBTORCH") {
        let lib = std::path::Path::new(&dir).join("lib");
        println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    }
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/lib");
}
