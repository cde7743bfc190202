//! With the `torch` feature: compiles the TorchScript inspector
//! (`src/model/torch/inspect.cpp`, C++ against libtorch's headers), and
//! gives every binary an rpath to libtorch's `lib/` (the folder torch-sys
//! built against), so `ml-worker` runs without LD_LIBRARY_PATH. A binary
//! moved to another machine finds libtorch through `lib/` beside the
//! executable or LD_LIBRARY_PATH.

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=src/model/torch/inspect.cpp");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    if std::env::var_os("CARGO_FEATURE_TORCH").is_none() {
        return;
    }
    let Some(dir) = std::env::var_os("LIBTORCH") else {
        println!(
            "cargo:warning=LIBTORCH is not set: run `make libtorch` (or build with --no-default-features, without torch models)"
        );
        std::process::exit(1);
    };
    let root = std::path::Path::new(&dir);
    let include = root.join("include");
    if !include.join("torch").is_dir() {
        println!(
            "cargo:warning=LIBTORCH={} has no include/torch: run `make libtorch` (or build with --no-default-features, without torch models)",
            root.display()
        );
        std::process::exit(1);
    }
    cc::Build::new()
        .cpp(true)
        .file("src/model/torch/inspect.cpp")
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .define("_GLIBCXX_USE_CXX11_ABI", "1")
        .define("GLOG_USE_GLOG_EXPORT", None)
        .warnings(false)
        .opt_level(1)
        .compile("ml_worker_torch_inspect");
    let lib = root.join("lib");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-lib=dylib=torch_cpu");
    println!("cargo:rustc-link-lib=dylib=c10");
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,$ORIGIN/lib");
}
