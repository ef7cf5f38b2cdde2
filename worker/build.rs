//! Keeps CUDA in the binary. tch links libtorch with the linker's default `--as-needed`, and since no Rust
//! symbol refers to `libtorch_cuda.so` directly the linker drops it: the binary then runs on a GPU machine
//! with `tch::Cuda::is_available() == false`. When the libtorch we build against has CUDA, link it
//! unconditionally. `WORKER_LINK_CUDA=0` opts out (e.g. to ship a CPU-only binary from a CUDA libtorch).

use std::path::PathBuf;
use std::process::Command;

fn torch_lib_dir() -> Option<PathBuf> {
    if let Ok(dir) = std::env::var("LIBTORCH") {
        return Some(PathBuf::from(dir).join("lib"));
    }
    if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        let python = std::env::var("PYTHON_SYS_EXECUTABLE").unwrap_or_else(|_| "python3".into());
        let out = Command::new(python)
            .args([
                "-c",
                "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
            ])
            .output()
            .ok()?;
        return out
            .status
            .success()
            .then(|| PathBuf::from(String::from_utf8_lossy(&out.stdout).trim()));
    }
    None
}

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    println!("cargo:rerun-if-env-changed=WORKER_LINK_CUDA");
    if std::env::var("WORKER_LINK_CUDA").is_ok_and(|v| v == "0") {
        return;
    }
    if let Some(dir) = torch_lib_dir()
        && dir.join("libtorch_cuda.so").exists()
    {
        println!("cargo:rustc-link-search=native={}", dir.display());
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
