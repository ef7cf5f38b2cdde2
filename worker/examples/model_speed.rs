//! Scratch timing of the raw model (greedy, batch 1). Usage: model_speed DIR [dtype] [threads] [new_tokens]
use std::time::Instant;
use tch::{Device, Kind, Tensor};
use worker::lm::{CausalLm, KvCache, Logits};
use worker::model::{GptJ, LoadOptions};

fn main() -> anyhow::Result<()> {
    let args: Vec<String> = std::env::args().collect();
    let dtype = args.get(2).map(|s| s.parse()).transpose()?.unwrap_or_default();
    if let Some(t) = args.get(3) {
        tch::set_num_threads(t.parse()?);
    }
    let n_new: i64 = args.get(4).map(|s| s.parse()).transpose()?.unwrap_or(128);
    let t0 = Instant::now();
    let model = GptJ::load(std::path::Path::new(&args[1]), &LoadOptions { dtype, ..Default::default() })?;
    let load = t0.elapsed();
    let st = std::fs::read_to_string("/proc/self/status")?;
    for l in st.lines().filter(|l| l.starts_with("VmRSS") || l.starts_with("VmHWM") || l.starts_with("Rss")) { println!("{l}"); }
    let prompt: Vec<i64> = vec![464, 2068, 7586, 21831, 18045, 625, 262, 16931];
    let n = prompt.len() as i64;
    let mut cache = KvCache::new(model.info().n_layer);
    let t1 = Instant::now();
    let mut mask = Tensor::ones([1, n], (Kind::Int64, Device::Cpu));
    let out = model.forward(&Tensor::from_slice(&prompt).view([1, n]), &mask, &Tensor::arange(n, (Kind::Int64, Device::Cpu)).view([1, n]), &mut cache, Logits::LastOnly, false)?;
    let mut next = out.logits.argmax(-1, false).view([1, 1]);
    let prefill = t1.elapsed();
    let t2 = Instant::now();
    let mut toks = vec![];
    for i in 0..n_new - 1 {
        mask = Tensor::ones([1, n + i + 1], (Kind::Int64, Device::Cpu));
        let pos = Tensor::from_slice(&[n + i]).view([1, 1]);
        let out = model.forward(&next, &mask, &pos, &mut cache, Logits::LastOnly, false)?;
        next = out.logits.argmax(-1, false).view([1, 1]);
        toks.push(next.int64_value(&[0, 0]));
    }
    let decode = t2.elapsed();
    println!("load {:?} prefill {:?} decode {:?} -> {:.1} tok/s; first {:?}", load, prefill, decode, (n_new - 1) as f64 / decode.as_secs_f64(), &toks[..8.min(toks.len())]);
    Ok(())
}

#[allow(dead_code)]
fn unused() {}
