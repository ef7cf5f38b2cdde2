//! Checks the model on whatever devices this machine has, without Python: a quick smoke test for a GPU
//! machine (CUDA placement, half precision, a map split between a GPU and the CPU) and a raw decode timing.
//!
//! `cargo run --release -p worker --example model_check -- [DIR] [--medium]` — with no DIR it writes the
//! tiny random model to a temporary directory. Prints one line per check and fails on the first mismatch.

use std::path::Path;
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use worker::device_map::Placement;
use worker::lm::{CausalLm, KvCache, Logits};
use worker::model::{Dtype, GptJ, LoadOptions};
use worker::tiny::{TinyConfig, write_tiny_model};

fn logits(model: &GptJ, prompts: &[Vec<i64>]) -> anyhow::Result<Tensor> {
    // Left-padded batch, positions as transformers' generate derives them.
    let width = prompts.iter().map(Vec::len).max().unwrap_or(1) as i64;
    let (mut ids, mut mask) = (Vec::new(), Vec::new());
    for p in prompts {
        let pad = width as usize - p.len();
        ids.extend(std::iter::repeat_n(50256, pad).chain(p.iter().copied()));
        mask.extend(std::iter::repeat_n(0i64, pad).chain(std::iter::repeat_n(1, p.len())));
    }
    let b = prompts.len() as i64;
    let ids = Tensor::from_slice(&ids).view([b, width]);
    let mask = Tensor::from_slice(&mask).view([b, width]);
    let pos = (mask.cumsum(1, Kind::Int64) - 1).clamp_min(0);
    let mut cache = KvCache::new(model.info().n_layer);
    let out = model.forward(&ids, &mask, &pos, &mut cache, Logits::LastOnly, false)?;
    Ok(out.logits.to_device(Device::Cpu).view([b, -1]))
}

fn rel_diff(a: &Tensor, b: &Tensor) -> f64 {
    (a - b).abs().max().double_value(&[]) / b.abs().max().double_value(&[])
}

/// Greedy decoding at batch 1 after a short warm-up (CUDA loads kernels lazily, on first use of each
/// shape and dtype); returns tokens per second and the tokens.
fn decode(model: &GptJ, n_new: i64) -> anyhow::Result<(f64, Vec<i64>)> {
    decode_once(model, 4)?;
    decode_once(model, n_new)
}

fn decode_once(model: &GptJ, n_new: i64) -> anyhow::Result<(f64, Vec<i64>)> {
    let prompt: Vec<i64> = vec![464, 2068, 7586, 21831, 18045, 625, 262, 16931];
    let n = prompt.len() as i64;
    let cpu = (Kind::Int64, Device::Cpu);
    let mut cache = KvCache::new(model.info().n_layer);
    let out = model.forward(
        &Tensor::from_slice(&prompt).view([1, n]),
        &Tensor::ones([1, n], cpu),
        &Tensor::arange(n, cpu).view([1, n]),
        &mut cache,
        Logits::LastOnly,
        false,
    )?;
    let mut next = out.logits.argmax(-1, false).view([1, 1]).to_device(Device::Cpu);
    let mut tokens = vec![next.int64_value(&[0, 0])];
    let start = Instant::now();
    let (mut t_fwd, mut t_sync) = (0f64, 0f64);
    for i in 0..n_new - 1 {
        let t0 = Instant::now();
        let out = model.forward(
            &next,
            &Tensor::ones([1, n + i + 1], cpu),
            &Tensor::from_slice(&[n + i]).view([1, 1]),
            &mut cache,
            Logits::LastOnly,
            false,
        )?;
        t_fwd += t0.elapsed().as_secs_f64();
        let t1 = Instant::now();
        if let Device::Cuda(d) = model.output_device() {
            tch::Cuda::synchronize(d as i64);
        }
        t_sync += t1.elapsed().as_secs_f64();
        next = out.logits.argmax(-1, false).view([1, 1]).to_device(Device::Cpu);
        tokens.push(next.int64_value(&[0, 0]));
    }
    if std::env::var_os("TRACE").is_some() {
        let n = (n_new - 1) as f64;
        println!(
            "  per step: forward returns after {:.2} ms, then sync {:.2} ms",
            t_fwd / n * 1e3,
            t_sync / n * 1e3
        );
    }
    Ok(((n_new - 1) as f64 / start.elapsed().as_secs_f64(), tokens))
}

fn load(dir: &Path, dtype: Dtype, placement: Placement) -> anyhow::Result<(GptJ, f64)> {
    let start = Instant::now();
    let model = GptJ::load(dir, &LoadOptions { dtype, placement })?;
    Ok((model, start.elapsed().as_secs_f64()))
}

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().skip(1).collect();
    let medium = args.iter().any(|a| a == "--medium");
    let n_new: i64 = match args.iter().position(|a| a == "--tokens") {
        Some(i) => args.get(i + 1).map(|s| s.parse()).transpose()?.unwrap_or(32),
        None => 32,
    };
    let tmp = tempfile::tempdir()?;
    let dir = match args.first().filter(|a| !a.starts_with("--")) {
        Some(d) => Path::new(d).to_path_buf(),
        None => {
            let cfg = if medium {
                TinyConfig::medium()
            } else {
                TinyConfig::tiny()
            };
            write_tiny_model(tmp.path(), &cfg, 1)?;
            tmp.path().to_path_buf()
        }
    };
    let cuda = tch::Cuda::device_count();
    println!("cuda devices: {cuda}, threads: {}", tch::get_num_threads());
    let prompts: Vec<Vec<i64>> = vec![
        vec![15496, 995, 318, 257, 1332, 13],
        vec![7],
        vec![50256, 40, 1842],
    ];
    let (reference, secs) = load(&dir, Dtype::Float32, Placement::default())?;
    let want = logits(&reference, &prompts)?;
    let (speed, want_tokens) = decode(&reference, n_new)?;
    println!("cpu float32: load {secs:.2}s, greedy {speed:.1} tok/s");

    let mut runs: Vec<(String, Dtype, Placement, f64)> =
        vec![("cpu bfloat16".into(), Dtype::BFloat16, Placement::default(), 2e-2)];
    if cuda > 0 {
        let n_layer = reference.info().n_layer;
        let half = n_layer / 2;
        runs.extend([
            (
                "cuda float32".into(),
                Dtype::Float32,
                Placement::Device(Device::Cuda(0)),
                1e-3,
            ),
            (
                "cuda float16".into(),
                Dtype::Float16,
                Placement::Device(Device::Cuda(0)),
                2e-2,
            ),
            (
                "cuda bfloat16".into(),
                Dtype::BFloat16,
                Placement::Device(Device::Cuda(0)),
                5e-2,
            ),
            (
                format!("cuda:0=0-{} + cpu float32", half - 1),
                Dtype::Float32,
                Placement::parse_device_map(&format!("cuda:0=embed,0-{}", half - 1))?,
                1e-3,
            ),
            (
                "cpu embed, rest cuda float16".to_string(),
                Dtype::Float16,
                Placement::parse_device_map(&format!("cuda:0=0-{}+norm+head", n_layer - 1))?,
                2e-2,
            ),
            (
                "cuda embed, block 0 cpu, rest cuda float16".to_string(),
                Dtype::Float16,
                Placement::parse_device_map(&format!(
                    "cuda:0=embed,cpu=0,cuda:0=1-{}+norm+head",
                    n_layer - 1
                ))?,
                2e-2,
            ),
            (
                format!("cpu embed, cuda:0={half}-{} + head float16", n_layer - 1),
                Dtype::Float16,
                Placement::parse_device_map(&format!("cuda:0={half}-{}+norm+head", n_layer - 1))?,
                2e-2,
            ),
        ]);
    }
    for (name, dtype, placement, tol) in runs {
        let (model, secs) = load(&dir, dtype, placement)?;
        let got = logits(&model, &prompts)?;
        let diff = rel_diff(&got, &want);
        let (speed, tokens) = decode(&model, n_new)?;
        let agree = tokens
            .iter()
            .zip(&want_tokens)
            .take_while(|(a, b)| a == b)
            .count();
        println!(
            "{name}: map {}; load {secs:.2}s; batch logits rel diff {diff:.2e} (tol {tol:.0e}); greedy {speed:.1} tok/s, \
             {agree}/{n_new} tokens as float32 cpu",
            model.device_map().describe()
        );
        anyhow::ensure!(diff <= tol, "{name}: logits differ by {diff}");
    }
    Ok(())
}
