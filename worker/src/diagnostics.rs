//! `worker info`: what this binary can run on. Operators (and scripts/gpu-check.sh) ask it first, because a
//! libtorch linked without its CUDA library runs silently on the CPU of a GPU machine.

use serde::Serialize;

#[derive(Debug, clap::Args)]
pub struct InfoArgs {
    /// Print one JSON object.
    #[arg(long)]
    pub json: bool,
}

#[derive(Debug, Serialize)]
pub struct DeviceInfo {
    pub cuda_available: bool,
    pub cuda_device_count: i64,
    pub cudnn_available: bool,
    pub cpu_threads: i32,
    pub version: &'static str,
}

pub fn device_info() -> DeviceInfo {
    DeviceInfo {
        cuda_available: tch::Cuda::is_available(),
        cuda_device_count: tch::Cuda::device_count(),
        cudnn_available: tch::Cuda::cudnn_is_available(),
        cpu_threads: tch::get_num_threads(),
        version: env!("CARGO_PKG_VERSION"),
    }
}

pub fn run_info(args: InfoArgs) -> anyhow::Result<()> {
    let info = device_info();
    if args.json {
        println!("{}", serde_json::to_string(&info)?);
    } else {
        println!("worker {}", info.version);
        println!(
            "cuda available: {} ({} devices)",
            info.cuda_available, info.cuda_device_count
        );
        println!("cudnn available: {}", info.cudnn_available);
        println!("cpu threads: {}", info.cpu_threads);
    }
    Ok(())
}
