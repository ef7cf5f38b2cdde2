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

/// `worker score`: the last position's logits for a prompt, written as a `.npy` file, so any reference
/// implementation (transformers on a GPU machine, see scripts/gpu-check.sh) can be compared with ours.
#[derive(Debug, clap::Args)]
pub struct ScoreArgs {
    #[command(flatten)]
    pub engine: crate::engine::EngineArgs,
    #[arg(long)]
    pub prompt: String,
    /// Where to write the float32 logits, shape `[vocab]`.
    #[arg(long)]
    pub out: std::path::PathBuf,
}

pub fn run_score(args: ScoreArgs) -> anyhow::Result<()> {
    use crate::lm::{CausalLm, KvCache, Logits};
    let engine = crate::engine::Engine::load(&args.engine.options()?)?;
    let encoding = engine
        .tokenizer()
        .encode(args.prompt.as_str(), false)
        .map_err(|e| anyhow::anyhow!("tokenizing the prompt: {e}"))?;
    let ids: Vec<i64> = encoding.get_ids().iter().map(|&i| i64::from(i)).collect();
    anyhow::ensure!(!ids.is_empty(), "the prompt has no tokens");
    let n = ids.len() as i64;
    let model = engine.model();
    let logits = tch::no_grad(|| -> anyhow::Result<tch::Tensor> {
        let input = tch::Tensor::from_slice(&ids).unsqueeze(0);
        let mask = tch::Tensor::ones([1, n], (tch::Kind::Int64, tch::Device::Cpu));
        let positions = tch::Tensor::arange(n, (tch::Kind::Int64, tch::Device::Cpu)).unsqueeze(0);
        let mut cache = KvCache::new(model.info().n_layer);
        let out = model.forward(&input, &mask, &positions, &mut cache, Logits::LastOnly, false)?;
        Ok(out
            .logits
            .to_kind(tch::Kind::Float)
            .to_device(tch::Device::Cpu)
            .reshape([-1]))
    })?;
    logits.write_npy(&args.out)?;
    eprintln!(
        "wrote {} logits for {} prompt tokens to {}",
        logits.size()[0],
        n,
        args.out.display()
    );
    Ok(())
}
